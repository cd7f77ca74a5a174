-- Payments and ledger (DESIGN.md "Payments and ledger"). Money: BIGINT minor units of the row's
-- ISO 4217 currency. Instants: µs since the epoch.

-- The sandbox gateway's own record: what "the bank" saw. It stands in for an external system,
-- so it is written in its own transactions, never in the caller's.
CREATE TABLE sandbox_payments (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- listing order and cursor
    id              TEXT NOT NULL UNIQUE,  -- ch_… / re_…: the gateway's reference
    kind            TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
    idempotency_key TEXT NOT NULL,
    customer        TEXT NOT NULL,         -- the shopper id as the gateway knows it
    payment_method  TEXT,                  -- charge: the token of the latest attempt
    charge_id       TEXT REFERENCES sandbox_payments (id), -- refund: the charge it returns money from
    amount_minor    BIGINT NOT NULL CHECK (amount_minor > 0),
    currency        TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('succeeded', 'declined', 'failed')),
    decline_reason  TEXT,
    -- charge: money already returned; the check makes over-refunding impossible, whatever races
    refunded_minor  BIGINT NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    calls           BIGINT NOT NULL DEFAULT 1, -- every call with this key, replays included
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    UNIQUE (kind, idempotency_key)         -- the same key never moves money twice
);
CREATE INDEX sandbox_payments_customer ON sandbox_payments (customer, seq);

-- Our side: every charge or refund is committed here, with its idempotency key, before it is
-- sent; its result is recorded afterwards. A pending row older than its next_attempt_at is
-- resent with the same key (the gateway then answers with what it already did).
CREATE TABLE payment_intents (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- listing order and cursor
    id              TEXT NOT NULL UNIQUE,  -- pi_…
    idempotency_key TEXT NOT NULL UNIQUE,  -- e.g. deposit:{pledge}, renewal:{subscription}:{date}
    kind            TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
    purpose         TEXT NOT NULL,         -- deposit | balance | renewal | adjustment | refund: whose state the result moves
    subject_id      TEXT NOT NULL,         -- the pledge, invoice, … it is for
    shopper_id      TEXT NOT NULL REFERENCES shoppers (id),
    amount_minor    BIGINT NOT NULL CHECK (amount_minor > 0),
    currency        TEXT NOT NULL,
    account         TEXT NOT NULL,         -- ledger account on the other side of gateway_clearing
    refund_of       TEXT REFERENCES payment_intents (id), -- refund: the charge intent
    -- charge: refunds decided so far; a guarded update keeps it within the amount
    refunded_minor  BIGINT NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'declined', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0, -- gateway calls made
    next_attempt_at BIGINT NOT NULL,      -- a sweep resends pending intents due by then
    gateway_ref     TEXT,                  -- the gateway's id of the movement
    payment_method  TEXT,                  -- token used by the deciding attempt
    decline_reason  TEXT,
    last_error      TEXT,
    memo            TEXT NOT NULL DEFAULT '',
    created_at      BIGINT NOT NULL,
    resolved_at     BIGINT
);
CREATE INDEX payment_intents_due ON payment_intents (status, next_attempt_at);
CREATE INDEX payment_intents_subject ON payment_intents (subject_id);
CREATE INDEX payment_intents_shopper ON payment_intents (shopper_id, seq);

-- Double-entry journal. Lines are written first, the entry row last: a trigger refuses the
-- entry unless its lines (at least two) sum to zero, lines can't join a posted entry, lines
-- without an entry fail the deferred foreign key at commit, and nothing is ever updated or
-- deleted. Debits are positive, credits negative.
CREATE TABLE ledger_entries (
    id         TEXT PRIMARY KEY,           -- je_…
    currency   TEXT NOT NULL,
    cause_type TEXT NOT NULL,              -- payment_intent, pledge, campaign, …
    cause_id   TEXT NOT NULL,
    event      TEXT NOT NULL,              -- which moment of the cause (succeeded, refund_decided, …)
    memo       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (cause_type, cause_id, event)   -- a cause books each event once, however often it re-runs
);
CREATE TABLE ledger_lines (
    entry_id     TEXT NOT NULL REFERENCES ledger_entries (id) DEFERRABLE INITIALLY DEFERRED,
    line_no      BIGINT NOT NULL,
    account      TEXT NOT NULL,            -- gateway_clearing, deposits_held, balances, refunds, …
    shopper_id   TEXT,                     -- the shopper whose money this line moves, if any
    amount_minor BIGINT NOT NULL CHECK (amount_minor <> 0),
    PRIMARY KEY (entry_id, line_no)
);
CREATE INDEX ledger_lines_account ON ledger_lines (account, shopper_id);

CREATE FUNCTION ledger_entry_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT COUNT(*) FROM ledger_lines WHERE entry_id = NEW.id) < 2
       OR (SELECT SUM(amount_minor) FROM ledger_lines WHERE entry_id = NEW.id) <> 0 THEN
        RAISE EXCEPTION 'unbalanced journal entry %', NEW.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_entry_balanced BEFORE INSERT ON ledger_entries
FOR EACH ROW EXECUTE FUNCTION ledger_entry_balanced();

CREATE FUNCTION ledger_lines_closed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM ledger_entries WHERE id = NEW.entry_id) THEN
        RAISE EXCEPTION 'journal entry % already posted', NEW.entry_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_lines_closed BEFORE INSERT ON ledger_lines
FOR EACH ROW EXECUTE FUNCTION ledger_lines_closed();

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only' USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_lines_append_only BEFORE UPDATE OR DELETE ON ledger_lines
FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
