-- Email outbox (DESIGN.md "Email"): every email is a row written in the same transaction as
-- its cause, then delivered by the outbox-deliver job with retries.

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    template        TEXT NOT NULL,        -- templates/email/<template>.{txt,html}
    entity          TEXT NOT NULL,        -- what the email is about (pledge id, job name, …)
    event           TEXT NOT NULL,        -- which moment of that entity (e.g. a run id, a date)
    to_addr         TEXT NOT NULL,
    subject         TEXT NOT NULL,
    text_body       TEXT NOT NULL,        -- rendered when enqueued, so it says what was true then
    html_body       TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,     -- clock time of the next delivery attempt
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    UNIQUE (template, entity, event)      -- one email per (template, entity, event), ever
);
CREATE INDEX outbox_pending ON outbox (status, next_attempt_at);
CREATE INDEX outbox_to ON outbox (to_addr, created_at);

CREATE TABLE outbox_attachments (
    outbox_id    INTEGER NOT NULL REFERENCES outbox (id),
    filename     TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content      BLOB NOT NULL
);
CREATE INDEX outbox_attachments_email ON outbox_attachments (outbox_id);
