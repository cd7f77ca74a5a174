-- The key of a subscription's private calendar link (`/subscriptions/{id}/calendar?key=…`):
-- random, minted the first time the link is shown, and the same afterwards. Whoever holds the
-- link reads that calendar and nothing else.
ALTER TABLE subscriptions ADD COLUMN calendar_key TEXT;
