-- Ripening-aware subscriptions (DESIGN.md "Subscription rules", "Ripening planner").
-- Money: INTEGER minor units. Instants: µs. Dates: YYYY-MM-DD in the plan's zone.

CREATE TABLE catalog_items (
    sku                TEXT PRIMARY KEY,
    name               TEXT NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('fruit', 'flower')),
    ripening_days_min  INTEGER NOT NULL,  -- flowers: bud to open
    ripening_days_max  INTEGER NOT NULL,
    ready_window_days  INTEGER NOT NULL,  -- flowers: vase life
    ethylene_producer  TEXT NOT NULL,     -- none | low | medium | high
    ethylene_sensitive BOOLEAN NOT NULL,
    unit_cost_minor    INTEGER NOT NULL,
    currency           TEXT NOT NULL,
    available_months   TEXT NOT NULL,     -- space-separated months 1–12
    grower             TEXT NOT NULL,
    grower_email       TEXT NOT NULL,
    lead_time_days     INTEGER NOT NULL,  -- grower order to our warehouse
    updated_at         INTEGER NOT NULL
);

CREATE TABLE plans (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    kind              TEXT NOT NULL CHECK (kind IN ('fruit', 'flower')),
    currency          TEXT NOT NULL,
    price_minor       INTEGER NOT NULL CHECK (price_minor > 0), -- per delivery; applies from the next unlocked one
    cadence_weeks     INTEGER NOT NULL CHECK (cadence_weeks IN (1, 2)),
    portions_per_day  INTEGER NOT NULL CHECK (portions_per_day > 0), -- flowers: stems in bloom
    cutoff_hours      INTEGER NOT NULL,
    delivery_weekdays TEXT NOT NULL,      -- e.g. "mon thu"
    time_zone         TEXT NOT NULL,
    variety_cap       INTEGER NOT NULL,
    transit_days      INTEGER NOT NULL,
    created_at        INTEGER NOT NULL
);

CREATE TABLE subscriptions (
    id               TEXT PRIMARY KEY,
    shopper_id       TEXT NOT NULL REFERENCES shoppers (id),
    plan_id          TEXT NOT NULL REFERENCES plans (id),
    delivery_weekday TEXT NOT NULL,
    start_date       TEXT NOT NULL,
    exclusions       TEXT NOT NULL,       -- JSON array of skus, sorted
    status           TEXT NOT NULL CHECK (status IN ('active', 'paused', 'past_due', 'suspended', 'cancelled')),
    paused_until     TEXT,                -- first delivery date after the pause; NULL = until resumed
    created_at       INTEGER NOT NULL,
    ended_at         INTEGER
);
CREATE INDEX subscriptions_status ON subscriptions (status);

CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL REFERENCES subscriptions (id),
    delivery_date   TEXT NOT NULL,
    cutoff_at       INTEGER NOT NULL,     -- after it: locked, planned, billed
    status          TEXT NOT NULL CHECK (status IN
                        ('scheduled', 'skipped', 'locked', 'paid', 'payment_failed', 'dispatched')),
    skip_reason     TEXT,                 -- skipped | paused | cancelled | suspended
    amount_minor    INTEGER,              -- the plan's price when locked
    lines           TEXT,                 -- JSON box lines (provisional before cutoff, final after)
    UNIQUE (subscription_id, delivery_date) -- one delivery per subscription and date
);
CREATE INDEX deliveries_due ON deliveries (status, cutoff_at);

CREATE TABLE box_plans (
    profile    TEXT PRIMARY KEY,          -- plan | exclusions | weekday | delivery date: solved once
    lines      TEXT NOT NULL,
    cost_minor INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE invoices (
    id              TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL REFERENCES subscriptions (id),
    delivery_id     TEXT NOT NULL REFERENCES deliveries (id),
    delivery_date   TEXT NOT NULL,
    amount_minor    INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'past_due', 'uncollectible', 'void')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    first_failed_at INTEGER,
    next_attempt_at INTEGER,              -- the next dunning retry
    created_at      INTEGER NOT NULL,
    paid_at         INTEGER,
    UNIQUE (subscription_id, delivery_date) -- one invoice per delivery, ever
);
CREATE INDEX invoices_dunning ON invoices (status, next_attempt_at);

CREATE TABLE grower_orders (
    id             TEXT PRIMARY KEY,
    week           TEXT NOT NULL,         -- ISO week of the deliveries, e.g. 2026-W44
    supplier       TEXT NOT NULL,
    supplier_email TEXT NOT NULL,
    sku            TEXT NOT NULL,
    qty            INTEGER NOT NULL,
    ripening_start TEXT NOT NULL,         -- date the warehouse starts ripening
    order_by       TEXT NOT NULL,         -- ripening start − grower lead time
    status         TEXT NOT NULL CHECK (status IN ('planned', 'sent')),
    sent_at        INTEGER,
    UNIQUE (supplier, sku, ripening_start)
);
CREATE INDEX grower_orders_due ON grower_orders (status, order_by);
