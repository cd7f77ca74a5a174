-- The quantity of the last price step every pledger was told the pool reached ("tier
-- unlocked"): `presale-reminders` announces a step once, and only a step beyond it.
ALTER TABLE campaigns ADD COLUMN announced_step_qty BIGINT NOT NULL DEFAULT 0;
