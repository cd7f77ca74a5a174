-- The indexes the pollers read ("what is due?") hold only the rows still queued, not the
-- history. Before, each was `(status, time)` over the whole table: every delivery, invoice,
-- payment and email ever written stayed in it, so a year of weekly boxes at 100,000
-- subscribers put 5.2 million finished deliveries in the index the renewal reads its due
-- ones from, and each change of status deleted one entry and inserted another. A partial
-- index is written when a row enters the queue and once more when it leaves; a paid invoice
-- is never in the dunning index at all. Each query that reads a queue names the status as a
-- literal, which is what lets both SQLite and PostgreSQL use the partial index.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (cutoff_at) WHERE status = 'scheduled';
DROP INDEX invoices_dunning;
CREATE INDEX invoices_dunning ON invoices (next_attempt_at) WHERE status = 'past_due';
-- Pending intents are swept in `seq` order, so the index is in that order.
DROP INDEX payment_intents_due;
CREATE INDEX payment_intents_due ON payment_intents (seq) WHERE status = 'pending';
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE status = 'pending';
