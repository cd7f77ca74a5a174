-- Counts additions to the planned grower orders: a signup's, a resume's or a lock's boxes,
-- added in the commit that boxes them. A recomputation of the orders reads the count before
-- it reads the boxes and replaces the orders only if the count has not moved since: an
-- addition committed in between came from boxes it did not read, and replacing the orders
-- with its totals would drop those units.
CREATE TABLE grower_order_adds (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    adds BIGINT NOT NULL
);
INSERT INTO grower_order_adds (id, adds) VALUES (1, 0);
