-- Joint presales (DESIGN.md "Presale rules"). Money: INTEGER minor units of the campaign's
-- currency. Unit prices: INTEGER 1/10000 of a unit. Percentages: basis points. Instants: µs.

CREATE TABLE campaigns (
    id                     TEXT PRIMARY KEY,
    title                  TEXT NOT NULL,
    sku                    TEXT NOT NULL,
    currency               TEXT NOT NULL,
    reference_price_minor  INTEGER NOT NULL CHECK (reference_price_minor > 0),
    deposit_bps            INTEGER NOT NULL CHECK (deposit_bps > 0 AND deposit_bps <= 5000),
    deposit_per_unit_minor INTEGER NOT NULL CHECK (deposit_per_unit_minor >= 0),
    deposit_refundable     BOOLEAN NOT NULL,
    opens_at               INTEGER NOT NULL,
    closes_at              INTEGER NOT NULL,   -- exclusive: a join at closes_at is late
    time_zone              TEXT NOT NULL,      -- IANA zone the deadline is shown in
    balance_window_hours   INTEGER NOT NULL,
    variants               TEXT NOT NULL,      -- JSON array of variant names; [] = none
    status                 TEXT NOT NULL CHECK (status IN
                               ('scheduled', 'open', 'settling', 'succeeded', 'failed', 'cancelled')),
    pooled_qty             INTEGER NOT NULL DEFAULT 0 CHECK (pooled_qty >= 0), -- units held by pending and active pledges
    capacity               INTEGER,            -- Σ quote capacities; NULL = unbounded
    price_ceiling_minor    INTEGER,            -- nobody pays more per unit; NULL until a quote exists
    locked_price_minor     INTEGER,            -- the price at close, applied to everyone
    final_unit_price_minor INTEGER,            -- what paying shoppers paid per unit (= locked)
    balance_due_at         INTEGER,            -- end of the balance window (from the close run, never earlier)
    surplus_qty            INTEGER NOT NULL DEFAULT 0, -- units ordered beyond paid demand: platform stock
    shortfall_minor        INTEGER NOT NULL DEFAULT 0, -- award cost not covered by shoppers (after forfeits)
    closed_at              INTEGER,
    settled_at             INTEGER,
    created_at             INTEGER NOT NULL,
    CHECK (closes_at > opens_at),
    CHECK (capacity IS NULL OR pooled_qty <= capacity) -- never oversold, whatever the race
);
CREATE INDEX campaigns_status ON campaigns (status, closes_at);

CREATE TABLE quotes (
    id              TEXT PRIMARY KEY,
    campaign_id     TEXT NOT NULL REFERENCES campaigns (id),
    manufacturer_id TEXT NOT NULL REFERENCES manufacturers (id),
    tiers           TEXT NOT NULL,   -- JSON [{"min_qty":100,"unit_price_scaled":1800000}, …]
    capacity        INTEGER,
    lead_time_days  INTEGER NOT NULL CHECK (lead_time_days >= 0),
    created_at      INTEGER NOT NULL,
    UNIQUE (campaign_id, manufacturer_id) -- one quote per manufacturer; re-quoting replaces it
);

CREATE TABLE pledges (
    seq                 INTEGER PRIMARY KEY, -- listing order and cursor
    id                  TEXT NOT NULL UNIQUE,
    campaign_id         TEXT NOT NULL REFERENCES campaigns (id),
    shopper_id          TEXT NOT NULL REFERENCES shoppers (id),
    qty                 INTEGER NOT NULL CHECK (qty > 0),
    variant             TEXT,
    -- pending (deposit being charged) → active | declined (never counted);
    -- active → awaiting_balance → paid | defaulted; active → cancelled | refunded
    status              TEXT NOT NULL CHECK (status IN ('pending', 'declined', 'active',
                            'awaiting_balance', 'paid', 'defaulted', 'cancelled', 'refunded')),
    deposit_minor       INTEGER NOT NULL,
    price_ceiling_minor INTEGER NOT NULL, -- shown at join; the final price never exceeds it
    balance_minor       INTEGER,          -- qty × final price − deposit, set at close
    balance_paid_at     INTEGER,
    refunded_minor      INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    ended_at            INTEGER,          -- when it stopped counting (cancelled, declined, refunded)
    updated_at          INTEGER NOT NULL
);
CREATE INDEX pledges_campaign ON pledges (campaign_id, status);
CREATE INDEX pledges_shopper ON pledges (shopper_id, seq);

CREATE TABLE purchase_orders (
    seq               INTEGER PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    campaign_id       TEXT NOT NULL REFERENCES campaigns (id),
    manufacturer_id   TEXT NOT NULL REFERENCES manufacturers (id),
    quote_id          TEXT NOT NULL REFERENCES quotes (id),
    currency          TEXT NOT NULL,
    qty               INTEGER NOT NULL CHECK (qty > 0),
    unit_price_scaled INTEGER NOT NULL,  -- the quote's break price at qty, 1/10000
    total_minor       INTEGER NOT NULL,
    lines             TEXT NOT NULL,     -- JSON [{"variant":"M","qty":120}, …]
    issued_at         INTEGER NOT NULL,
    ship_by           TEXT NOT NULL,     -- YYYY-MM-DD in the campaign's zone: issue date + lead time
    UNIQUE (campaign_id, manufacturer_id) -- one purchase order per awarded manufacturer
);
CREATE INDEX purchase_orders_manufacturer ON purchase_orders (manufacturer_id, seq);
