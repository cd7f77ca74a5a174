-- Page sign-ins (`/login`): the browser's cookie holds a random session id, never the token it
-- signed in with. Only hashes are stored: the session's, and the token's, so a session ends
-- with its token and answers as that token's party. Sign-out deletes the row; expired rows are
-- pruned by `maintenance-prune`.
CREATE TABLE page_sessions (
    id_hash    TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX page_sessions_expiry ON page_sessions (expires_at);
