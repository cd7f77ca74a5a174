-- A remembered answer that may still change (a join's, written with its pledge while the
-- deposit is charged): a retry under its key is told the request is still running (409)
-- until the claim is old enough that its request has surely ended, then shown the answer.
ALTER TABLE idempotency_keys ADD COLUMN provisional BOOLEAN NOT NULL DEFAULT FALSE;
