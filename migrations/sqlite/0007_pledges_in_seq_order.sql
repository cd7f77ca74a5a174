-- Pledges of a campaign in one status are read a chunk at a time in `seq` order (settlement,
-- balances, reminders). With `seq` in the index each chunk is a range scan; without it,
-- PostgreSQL sorted every remaining pledge of the status for each chunk of 500.
DROP INDEX pledges_campaign;
CREATE INDEX pledges_campaign ON pledges (campaign_id, status, seq);
