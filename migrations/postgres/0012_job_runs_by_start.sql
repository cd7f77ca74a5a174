-- A job's last run is the one that began last. Ids follow insertion, and a timer is inserted
-- long before it runs (a renewal's cutoff, at signup), so the latest id is not the latest
-- start; this index finds the latest start of one job without sorting its history.
CREATE INDEX job_runs_started ON job_runs (job_name, started_at);
