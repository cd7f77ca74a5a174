-- A grower order, once sent, is final; boxes added after it (a signup between the order-by
-- date and the cutoff) go out as a supplementary line for the same item and ripening day.
-- Before, one line per (supplier, sku, ripening_start) was allowed, so those units were
-- never ordered. Now only the line still being planned is unique; sent ones are history.
ALTER TABLE grower_orders DROP CONSTRAINT grower_orders_supplier_sku_ripening_start_key;
CREATE UNIQUE INDEX grower_orders_planned
    ON grower_orders (supplier, sku, ripening_start) WHERE status = 'planned';
CREATE INDEX grower_orders_key ON grower_orders (supplier, sku, ripening_start);
