-- PostgreSQL's 0008 runs the ledger's insert checks once per statement instead of once per
-- row. SQLite has no statement-level triggers, and its row triggers (0004) cost little: they
-- are plain lookups inside the engine, not calls into a procedural language. They stay as they
-- are; this file keeps the two backends' migration histories in step.
SELECT 1;
