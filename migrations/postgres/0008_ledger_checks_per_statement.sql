-- The ledger's two insert checks (0004), once per statement instead of once per row.
--
-- Why: a renewal or settlement chunk posts 1,000 entries and 2,000 lines in two statements,
-- and the row triggers ran 3,000 PL/pgSQL calls of their own lookups for them (about a sixth
-- of PostgreSQL's time in a 100,000-subscription renewal). The rules are unchanged: every
-- entry has at least two lines that sum to zero when it is posted, and no line is added to an
-- entry already posted. Both are checked over the statement's new rows (a transition table),
-- and a violation still aborts the statement, so the transaction, with the same error.
--
-- Each new row is looked up by key (a LATERAL subquery the planner can't turn into a join):
-- a join over the whole statement was planned as a merge of the entire ledger, once per
-- statement, which grows with the ledger. EXECUTE plans each check afresh rather than keep a
-- plan made while the ledger was small.

DROP TRIGGER ledger_entry_balanced ON ledger_entries;
DROP FUNCTION ledger_entry_balanced();
DROP TRIGGER ledger_lines_closed ON ledger_lines;
DROP FUNCTION ledger_lines_closed();

CREATE FUNCTION ledger_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced TEXT;
BEGIN
    EXECUTE 'SELECT e.id FROM posted e,
                 LATERAL (SELECT COUNT(*) AS n, COALESCE(SUM(l.amount_minor), 0) AS total
                          FROM ledger_lines l WHERE l.entry_id = e.id) AS lines
             WHERE lines.n < 2 OR lines.total <> 0
             LIMIT 1' INTO unbalanced;
    IF unbalanced IS NOT NULL THEN
        RAISE EXCEPTION 'unbalanced journal entry %', unbalanced USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
REFERENCING NEW TABLE AS posted
FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_balanced();

-- Lines come before their entry (the entry's check needs them), so a line whose entry exists
-- before this statement's lines were added belongs to an entry already posted.
CREATE FUNCTION ledger_lines_closed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    posted TEXT;
BEGIN
    EXECUTE 'SELECT l.entry_id FROM added l,
                 LATERAL (SELECT 1 FROM ledger_entries e WHERE e.id = l.entry_id LIMIT 1) AS entry
             LIMIT 1' INTO posted;
    IF posted IS NOT NULL THEN
        RAISE EXCEPTION 'journal entry % already posted', posted USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_lines_closed AFTER INSERT ON ledger_lines
REFERENCING NEW TABLE AS added
FOR EACH STATEMENT EXECUTE FUNCTION ledger_lines_closed();
