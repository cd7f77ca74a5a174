-- Joint presales (DESIGN.md "Presale rules"). Money: BIGINT minor units of the campaign's
-- currency. Unit prices: BIGINT 1/10000 of a unit. Percentages: basis points. Instants: µs.

CREATE TABLE campaigns (
    id                     TEXT PRIMARY KEY,
    title                  TEXT NOT NULL,
    sku                    TEXT NOT NULL,
    currency               TEXT NOT NULL,
    reference_price_minor  BIGINT NOT NULL CHECK (reference_price_minor > 0),
    deposit_bps            BIGINT NOT NULL CHECK (deposit_bps > 0 AND deposit_bps <= 5000),
    deposit_per_unit_minor BIGINT NOT NULL CHECK (deposit_per_unit_minor >= 0),
    deposit_refundable     BOOLEAN NOT NULL,
    opens_at               BIGINT NOT NULL,
    closes_at              BIGINT NOT NULL,   -- exclusive: a join at closes_at is late
    time_zone              TEXT NOT NULL,      -- IANA zone the deadline is shown in
    balance_window_hours   BIGINT NOT NULL,
    variants               TEXT NOT NULL,      -- JSON array of variant names; [] = none
    status                 TEXT NOT NULL CHECK (status IN
                               ('scheduled', 'open', 'settling', 'succeeded', 'failed', 'cancelled')),
    pooled_qty             BIGINT NOT NULL DEFAULT 0 CHECK (pooled_qty >= 0), -- units held by pending and active pledges
    capacity               BIGINT,            -- Σ quote capacities; NULL = unbounded
    price_ceiling_minor    BIGINT,            -- nobody pays more per unit; NULL until a quote exists
    locked_price_minor     BIGINT,            -- the price at close, applied to everyone
    final_unit_price_minor BIGINT,            -- what paying shoppers paid per unit (= locked)
    balance_due_at         BIGINT,            -- end of the balance window (from the close run, never earlier)
    surplus_qty            BIGINT NOT NULL DEFAULT 0, -- units ordered beyond paid demand: platform stock
    shortfall_minor        BIGINT NOT NULL DEFAULT 0, -- award cost not covered by shoppers (after forfeits)
    closed_at              BIGINT,
    settled_at             BIGINT,
    created_at             BIGINT NOT NULL,
    CHECK (closes_at > opens_at),
    CHECK (capacity IS NULL OR pooled_qty <= capacity) -- never oversold, whatever the race
);
CREATE INDEX campaigns_status ON campaigns (status, closes_at);

CREATE TABLE quotes (
    id              TEXT PRIMARY KEY,
    campaign_id     TEXT NOT NULL REFERENCES campaigns (id),
    manufacturer_id TEXT NOT NULL REFERENCES manufacturers (id),
    tiers           TEXT NOT NULL,   -- JSON [{"min_qty":100,"unit_price_scaled":1800000}, …]
    capacity        BIGINT,
    lead_time_days  BIGINT NOT NULL CHECK (lead_time_days >= 0),
    created_at      BIGINT NOT NULL,
    UNIQUE (campaign_id, manufacturer_id) -- one quote per manufacturer; re-quoting replaces it
);

CREATE TABLE pledges (
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- listing order and cursor
    id                  TEXT NOT NULL UNIQUE,
    campaign_id         TEXT NOT NULL REFERENCES campaigns (id),
    shopper_id          TEXT NOT NULL REFERENCES shoppers (id),
    qty                 BIGINT NOT NULL CHECK (qty > 0),
    variant             TEXT,
    -- pending (deposit being charged) → active | declined (never counted);
    -- active → awaiting_balance → paid | defaulted; active → cancelled | refunded
    status              TEXT NOT NULL CHECK (status IN ('pending', 'declined', 'active',
                            'awaiting_balance', 'paid', 'defaulted', 'cancelled', 'refunded')),
    deposit_minor       BIGINT NOT NULL,
    price_ceiling_minor BIGINT NOT NULL, -- shown at join; the final price never exceeds it
    balance_minor       BIGINT,          -- qty × final price − deposit, set at close
    balance_paid_at     BIGINT,
    refunded_minor      BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    ended_at            BIGINT,          -- when it stopped counting (cancelled, declined, refunded)
    updated_at          BIGINT NOT NULL
);
CREATE INDEX pledges_campaign ON pledges (campaign_id, status);
CREATE INDEX pledges_shopper ON pledges (shopper_id, seq);

CREATE TABLE purchase_orders (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    campaign_id       TEXT NOT NULL REFERENCES campaigns (id),
    manufacturer_id   TEXT NOT NULL REFERENCES manufacturers (id),
    quote_id          TEXT NOT NULL REFERENCES quotes (id),
    currency          TEXT NOT NULL,
    qty               BIGINT NOT NULL CHECK (qty > 0),
    unit_price_scaled BIGINT NOT NULL,  -- the quote's break price at qty, 1/10000
    total_minor       BIGINT NOT NULL,
    lines             TEXT NOT NULL,     -- JSON [{"variant":"M","qty":120}, …]
    issued_at         BIGINT NOT NULL,
    ship_by           TEXT NOT NULL,     -- YYYY-MM-DD in the campaign's zone: issue date + lead time
    UNIQUE (campaign_id, manufacturer_id) -- one purchase order per awarded manufacturer
);
CREATE INDEX purchase_orders_manufacturer ON purchase_orders (manufacturer_id, seq);
