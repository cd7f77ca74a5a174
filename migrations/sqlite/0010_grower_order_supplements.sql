-- A grower order, once sent, is final; boxes added after it (a signup between the order-by
-- date and the cutoff) go out as a supplementary line for the same item and ripening day.
-- Before, one line per (supplier, sku, ripening_start) was allowed, so those units were
-- never ordered. Now only the line still being planned is unique; sent ones are history.
-- SQLite cannot drop a table constraint, so the table is rebuilt without it.
CREATE TABLE grower_orders_new (
    id             TEXT PRIMARY KEY,
    week           TEXT NOT NULL,         -- ISO week of the deliveries, e.g. 2026-W44
    supplier       TEXT NOT NULL,
    supplier_email TEXT NOT NULL,
    sku            TEXT NOT NULL,
    qty            BIGINT NOT NULL,
    ripening_start TEXT NOT NULL,         -- date the warehouse starts ripening
    order_by       TEXT NOT NULL,         -- ripening start − grower lead time
    status         TEXT NOT NULL CHECK (status IN ('planned', 'sent')),
    sent_at        BIGINT
);
INSERT INTO grower_orders_new SELECT id, week, supplier, supplier_email, sku, qty,
    ripening_start, order_by, status, sent_at FROM grower_orders;
DROP TABLE grower_orders;
ALTER TABLE grower_orders_new RENAME TO grower_orders;
CREATE INDEX grower_orders_due ON grower_orders (status, order_by);
CREATE UNIQUE INDEX grower_orders_planned
    ON grower_orders (supplier, sku, ripening_start) WHERE status = 'planned';
CREATE INDEX grower_orders_key ON grower_orders (supplier, sku, ripening_start);
