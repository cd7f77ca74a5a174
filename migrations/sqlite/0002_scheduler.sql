-- The scheduler's run ledger (DESIGN.md "Scheduler"). Instants: INTEGER µs since the epoch.

-- One row per job: its schedule and policies (code defaults, overridable by configuration,
-- synced at start) and the state the planner keeps.
CREATE TABLE job_defs (
    name                TEXT PRIMARY KEY,
    schedule            TEXT NOT NULL,     -- cron expression (in time_zone) or "every <n><s|m|h>" (UTC)
    time_zone           TEXT NOT NULL,     -- IANA zone of the cron expression
    catchup_policy      TEXT NOT NULL CHECK (catchup_policy IN ('skip', 'latest', 'all')),
    catchup_window_secs INTEGER NOT NULL,  -- slots older than this before now are never planned
    start_grace_secs    INTEGER NOT NULL,  -- a slot later than this is "late" (catch-up policy applies)
    overlap_policy      TEXT NOT NULL CHECK (overlap_policy IN ('skip', 'allow')),
    max_attempts        INTEGER NOT NULL,
    lease_secs          INTEGER NOT NULL,  -- a running attempt silent for this long is presumed dead
    paused_at           INTEGER,           -- NULL unless paused; a paused job plans and claims nothing
    paused_note         TEXT,
    known_since         INTEGER NOT NULL,  -- first start that knew this job: no slot before it ever runs
    last_planned_slot   INTEGER            -- planner watermark; only ever moves forward
);

-- One row per (job, slot): the slot's whole life. The unique key is what makes a slot run
-- once across any number of instances; `attempt` is the fencing token of the running attempt.
CREATE TABLE job_runs (
    id               INTEGER PRIMARY KEY,
    job_name         TEXT NOT NULL REFERENCES job_defs (name),
    scheduled_for    INTEGER NOT NULL,     -- the slot (or timer instant, or manual request time)
    trigger          TEXT NOT NULL CHECK (trigger IN ('schedule', 'timer', 'catchup', 'manual', 'backfill', 'retry')),
    state            TEXT NOT NULL CHECK (state IN ('pending', 'running', 'retrying', 'succeeded', 'failed', 'skipped')),
    exclusive        BOOLEAN NOT NULL,     -- copied from overlap_policy = 'skip' when planned
    attempt          INTEGER NOT NULL DEFAULT 0,
    due_at           INTEGER NOT NULL,     -- earliest business instant it may be claimed (slot, or retry time)
    lease_owner      TEXT,                 -- scheduler_instances.id of the running attempt
    lease_expires_at INTEGER,              -- database time, so that instances agree
    heartbeat_at     INTEGER,              -- database time of the last heartbeat
    started_at       INTEGER,              -- clock time the last attempt started
    finished_at      INTEGER,              -- clock time it reached succeeded|failed|skipped
    duration_ms      INTEGER,              -- wall time of the last attempt
    skip_reason      TEXT,                 -- coalesced | missed_grace | overlap
    coalesced        INTEGER NOT NULL DEFAULT 0, -- older slots folded into this one (never materialised)
    last_error       TEXT,
    result           TEXT,                 -- JSON summary returned by the job
    created_at       INTEGER NOT NULL,
    UNIQUE (job_name, scheduled_for)
);
CREATE INDEX job_runs_due ON job_runs (state, due_at);
CREATE INDEX job_runs_job ON job_runs (job_name, scheduled_for);
-- At most one running attempt per exclusive job, whichever instance claims it.
CREATE UNIQUE INDEX job_runs_one_running ON job_runs (job_name) WHERE state = 'running' AND exclusive;

CREATE TABLE scheduler_instances (
    id            TEXT PRIMARY KEY,
    version       TEXT NOT NULL,
    started_at    INTEGER NOT NULL,       -- clock time
    heartbeat_at  INTEGER NOT NULL,       -- database time
    clock_skew_ms INTEGER NOT NULL        -- this instance's clock minus database time at the last heartbeat
);
