-- Identity and request idempotency.
-- Conventions for every table on this backend (and the SQLite twin):
--   * instants are BIGINT microseconds since the Unix epoch, UTC: one sortable representation
--     on both backends, always bound from the service's Clock (never SQL now());
--   * money is BIGINT minor units of the owning object's currency;
--   * every integer is BIGINT so both backends decode it as i64; ids are TEXT.

CREATE TABLE shoppers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    email         TEXT NOT NULL,
    time_zone     TEXT NOT NULL,          -- IANA name, for the shopper's dates
    payment_token TEXT,                   -- saved payment method at the gateway; NULL until set
    created_at    BIGINT NOT NULL
);

CREATE TABLE manufacturers (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    email      TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Bearer tokens of shoppers and manufacturers. Only the SHA-256 of a token is kept, so a
-- leaked database does not leak credentials. The admin token is configuration, not a row.
CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,          -- lowercase hex SHA-256 of the bearer token
    role       TEXT NOT NULL CHECK (role IN ('shopper', 'manufacturer')),
    subject_id TEXT NOT NULL,             -- shoppers.id or manufacturers.id, per role
    created_at BIGINT NOT NULL
);
CREATE INDEX api_tokens_subject ON api_tokens (role, subject_id);

-- Idempotency-Key records: the first response to a creating POST, replayed for the same key
-- and body. The key is scoped to the caller so two callers can't collide.
CREATE TABLE idempotency_keys (
    scope         TEXT NOT NULL,          -- hash of the caller's credentials, or 'public'
    idem_key      TEXT NOT NULL,          -- the Idempotency-Key header
    request_hash  TEXT NOT NULL,          -- SHA-256 of method, path and body
    status_code   BIGINT,                 -- NULL while the first request is in flight
    content_type  TEXT,
    response_body BYTEA,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (scope, idem_key)
);
