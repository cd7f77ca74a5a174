-- Emails that gave up after their retries, for the ops page: they are few among millions
-- sent, so a partial index finds them, and their count, without reading the rest.
CREATE INDEX outbox_failed ON outbox (id) WHERE status = 'failed';
