//! The run ledger: job definitions, runs with leases and fencing, scheduler instances.
//!
//! Every decision that two instances could race on is a single guarded statement: slots are
//! inserted with `ON CONFLICT DO NOTHING`, claims update only `pending|retrying` rows, and every
//! later write of an attempt is guarded by its `attempt` number (the fencing token), so a worker
//! that lost its lease changes nothing. Leases are measured in database time.

use super::{Db, NewEmail, Store, StoreResult, json_array};
use serde::Serialize;

/// A job definition as stored.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct JobDefRow {
    pub name: String,
    pub schedule: String,
    pub time_zone: String,
    pub catchup_policy: String,
    pub catchup_window_secs: i64,
    pub start_grace_secs: i64,
    pub overlap_policy: String,
    pub max_attempts: i64,
    pub lease_secs: i64,
    pub paused_at: Option<i64>,
    pub paused_note: Option<String>,
    pub known_since: i64,
    pub last_planned_slot: Option<i64>,
}

/// A run as stored.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct JobRunRow {
    pub id: i64,
    pub job_name: String,
    pub scheduled_for: i64,
    pub trigger: String,
    pub state: String,
    pub exclusive: bool,
    pub attempt: i64,
    pub due_at: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub heartbeat_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
    pub skip_reason: Option<String>,
    pub coalesced: i64,
    pub last_error: Option<String>,
    pub result: Option<String>,
    pub created_at: i64,
}

/// A slot decided by the planner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    pub scheduled_for: i64,
    pub trigger: &'static str,
    /// `pending` to run, `skipped` to record without running.
    pub state: &'static str,
    pub skip_reason: Option<&'static str>,
    /// Older slots folded into this one.
    pub coalesced: i64,
}

/// A run this instance now holds the lease of.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub run: JobRunRow,
    pub max_attempts: i64,
    pub lease_secs: i64,
}

/// Filters of the runs listing.
#[derive(Debug, Default, Clone)]
pub struct RunFilter {
    pub job: Option<String>,
    pub state: Option<String>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct SchedulerInstanceRow {
    pub id: String,
    pub version: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub clock_skew_ms: i64,
}

/// The columns of [`JobRunRow`], for `concat!` into `&'static str` queries.
macro_rules! run_columns {
    () => {
        "id, job_name, scheduled_for, trigger, state, exclusive, attempt, due_at, lease_owner,
         lease_expires_at, heartbeat_at, started_at, finished_at, duration_ms, skip_reason,
         coalesced, last_error, result, created_at"
    };
}

/// Candidate for a claim. PostgreSQL skips rows another instance is claiming right now; SQLite
/// has one writer (`BEGIN IMMEDIATE`), so there is nothing to skip. Only runs of the jobs the
/// instance runs (`$2`, a JSON array of `[name]`), or due before `$3`: in a rolling deploy an
/// older instance would otherwise claim a new job's runs and fail their attempts ("no job named
/// …"), while one that knows the job stood by; a run no instance took by `$3` is failed with
/// that reason rather than left pending for ever.
const CLAIM_CANDIDATE_PG: &str =
    "SELECT r.id FROM job_runs r JOIN job_defs d ON d.name = r.job_name
    WHERE r.state IN ('pending', 'retrying') AND r.due_at <= $1
      AND (d.paused_at IS NULL OR r.trigger IN ('manual', 'backfill'))
      AND (r.job_name IN (SELECT value->>0 FROM jsonb_array_elements($2::jsonb)) OR r.due_at <= $3)
      AND NOT (r.exclusive AND EXISTS (
          SELECT 1 FROM job_runs x WHERE x.job_name = r.job_name AND x.state = 'running'))
    ORDER BY r.due_at, r.id LIMIT 1
    FOR UPDATE OF r SKIP LOCKED";
const CLAIM_CANDIDATE_SQLITE: &str =
    "SELECT r.id FROM job_runs r JOIN job_defs d ON d.name = r.job_name
    WHERE r.state IN ('pending', 'retrying') AND r.due_at <= $1
      AND (d.paused_at IS NULL OR r.trigger IN ('manual', 'backfill'))
      AND (r.job_name IN (SELECT value->>0 FROM jsonb_each($2)) OR r.due_at <= $3)
      AND NOT (r.exclusive AND EXISTS (
          SELECT 1 FROM job_runs x WHERE x.job_name = r.job_name AND x.state = 'running'))
    ORDER BY r.due_at, r.id LIMIT 1";

/// How long a run of a job this instance doesn't run waits for an instance that does.
const UNKNOWN_JOB_GRACE: chrono::Duration = chrono::Duration::minutes(10);

impl Store {
    /// The database's own clock in µs: leases use it so that instances agree on expiry.
    pub async fn db_now(&self) -> StoreResult<i64> {
        let now: i64 = match &self.db {
            Db::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
                )
                .fetch_one(pool)
                .await?
            }
            Db::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT",
                )
                .fetch_one(pool)
                .await?
            }
        };
        Ok(now)
    }

    /// Creates or updates a job's definition; keeps its pause, `known_since` and watermark.
    pub async fn sync_job_def(&self, def: &JobDefRow) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(
                "INSERT INTO job_defs (name, schedule, time_zone, catchup_policy, catchup_window_secs,
                    start_grace_secs, overlap_policy, max_attempts, lease_secs, known_since)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (name) DO UPDATE SET schedule = excluded.schedule,
                    time_zone = excluded.time_zone, catchup_policy = excluded.catchup_policy,
                    catchup_window_secs = excluded.catchup_window_secs,
                    start_grace_secs = excluded.start_grace_secs,
                    overlap_policy = excluded.overlap_policy, max_attempts = excluded.max_attempts,
                    lease_secs = excluded.lease_secs",
            )
            .bind(&def.name)
            .bind(&def.schedule)
            .bind(&def.time_zone)
            .bind(&def.catchup_policy)
            .bind(def.catchup_window_secs)
            .bind(def.start_grace_secs)
            .bind(&def.overlap_policy)
            .bind(def.max_attempts)
            .bind(def.lease_secs)
            .bind(def.known_since)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(())
    }

    pub async fn job_defs(&self) -> StoreResult<Vec<JobDefRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT name, schedule, time_zone, catchup_policy, catchup_window_secs,
                    start_grace_secs, overlap_policy, max_attempts, lease_secs, paused_at,
                    paused_note, known_since, last_planned_slot
                 FROM job_defs ORDER BY name",
            )
            .fetch_all(pool)
            .await?
        }))
    }

    /// Records planned slots (existing ones are left alone) and moves the watermark forward.
    /// Returns how many slots were new.
    pub async fn plan_runs(
        &self,
        job: &str,
        exclusive: bool,
        runs: &[NewRun],
        planned_from: Option<i64>,
        watermark: i64,
        now: i64,
    ) -> StoreResult<u64> {
        in_tx!(self, |tx| {
            // The watermark moves only forward, and only from the value this plan was made
            // from: an instance that planned the same slots meanwhile wins, and this plan
            // rolls back. Otherwise one plan's row and the other's coalesced count could both
            // cover a slot.
            // And only while the job is not paused: a pause that commits after the plan read
            // the job would otherwise find nothing to skip, and the slots would run on resume.
            let moved = sqlx::query(
                "UPDATE job_defs SET last_planned_slot = $2
                 WHERE name = $1 AND last_planned_slot IS NOT DISTINCT FROM $3
                   AND (last_planned_slot IS NULL OR last_planned_slot < $2)
                   AND paused_at IS NULL",
            )
            .bind(job)
            .bind(watermark)
            .bind(planned_from)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 0 {
                return Ok(0);
            }
            let mut inserted = 0;
            for r in runs {
                inserted += sqlx::query(
                    "INSERT INTO job_runs (job_name, scheduled_for, trigger, state, exclusive, due_at,
                        skip_reason, coalesced, finished_at, created_at)
                     VALUES ($1, $2, $3, $4, $5, $2, $6, $7,
                        CASE WHEN $4 = 'skipped' THEN $8 END, $8)
                     ON CONFLICT (job_name, scheduled_for) DO NOTHING",
                )
                .bind(job)
                .bind(r.scheduled_for)
                .bind(r.trigger)
                .bind(r.state)
                .bind(exclusive)
                .bind(r.skip_reason)
                .bind(r.coalesced)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    /// Slots of exclusive jobs that came due while the job is still running are skipped
    /// (overlap policy `skip`); timers, manual runs and backfills wait instead. Only slots due
    /// after the running attempt started: the missed slots a catch-up planned at once (all due
    /// before it) wait their turn, where skipping them dropped every one but the first.
    pub async fn skip_overlapping(&self, now: i64) -> StoreResult<u64> {
        Ok(on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE job_runs SET state = 'skipped', skip_reason = 'overlap', finished_at = $1
                 WHERE state = 'pending' AND trigger IN ('schedule', 'catchup') AND due_at <= $1
                   AND exclusive AND EXISTS (
                     SELECT 1 FROM job_runs x
                     WHERE x.job_name = job_runs.job_name AND x.state = 'running'
                       AND job_runs.due_at > x.started_at)",
            )
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// Claims the next due run for `owner`, which runs `jobs`: `running`, `attempt + 1`, leased
    /// until database time + the job's lease. `None` when nothing is claimable.
    pub async fn claim_next(
        &self,
        owner: &str,
        jobs: &[&str],
        now: i64,
        started_at: i64,
    ) -> StoreResult<Option<Claimed>> {
        let db_now = self.db_now().await?;
        let jobs = json_array(jobs.iter().map(|name| (name,)));
        let unknown_due_by = now - UNKNOWN_JOB_GRACE.num_microseconds().unwrap_or(0);
        let candidate_sql = match self.db {
            Db::Sqlite(_) => CLAIM_CANDIDATE_SQLITE,
            Db::Postgres(_) => CLAIM_CANDIDATE_PG,
        };
        const CLAIM: &str = concat!(
            "UPDATE job_runs SET state = 'running', attempt = attempt + 1, lease_owner = $2,
                lease_expires_at = $3 + (SELECT lease_secs FROM job_defs d WHERE d.name = job_runs.job_name) * 1000000,
                heartbeat_at = $3, started_at = $4, finished_at = NULL
             WHERE id = $1 AND state IN ('pending', 'retrying')
             RETURNING ",
            run_columns!()
        );
        let result: Result<Option<JobRunRow>, sqlx::Error> = in_tx!(self, |tx| {
            let id: Option<i64> = sqlx::query_scalar(candidate_sql)
                .bind(now)
                .bind(&jobs)
                .bind(unknown_due_by)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(id) = id else {
                return Ok(None);
            };
            let row = sqlx::query_as(CLAIM)
                .bind(id)
                .bind(owner)
                .bind(db_now)
                .bind(started_at)
                .fetch_optional(&mut *tx)
                .await;
            match row {
                Ok(row) => {
                    tx.commit().await?;
                    Ok(row)
                }
                Err(e) => Err(e),
            }
        });
        let run = match result {
            Ok(Some(run)) => run,
            Ok(None) => return Ok(None),
            // Another instance claimed a run of the same exclusive job first: the partial
            // unique index decided, and this instance simply has nothing to do.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (max_attempts, lease_secs): (i64, i64) = on_pool!(self, |pool| {
            sqlx::query_as("SELECT max_attempts, lease_secs FROM job_defs WHERE name = $1")
                .bind(&run.job_name)
                .fetch_one(pool)
                .await?
        });
        Ok(Some(Claimed {
            run,
            max_attempts,
            lease_secs,
        }))
    }

    /// Extends the lease of attempt `attempt`; false if that attempt no longer holds it.
    pub async fn heartbeat_run(&self, id: i64, attempt: i64) -> StoreResult<bool> {
        let db_now = self.db_now().await?;
        let n = on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE job_runs SET heartbeat_at = $3,
                    lease_expires_at = $3 + (SELECT lease_secs FROM job_defs d WHERE d.name = job_runs.job_name) * 1000000
                 WHERE id = $1 AND attempt = $2 AND state = 'running'",
            )
            .bind(id)
            .bind(attempt)
            .bind(db_now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Completes attempt `attempt` successfully; false (and nothing changed) if it was fenced
    /// out by a newer attempt or a reaper.
    pub async fn succeed_run(
        &self,
        id: i64,
        attempt: i64,
        finished_at: i64,
        duration_ms: i64,
        result: &str,
    ) -> StoreResult<bool> {
        let n = on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE job_runs SET state = 'succeeded', finished_at = $3, duration_ms = $4, result = $5,
                    lease_expires_at = NULL
                 WHERE id = $1 AND attempt = $2 AND state = 'running'",
            )
            .bind(id)
            .bind(attempt)
            .bind(finished_at)
            .bind(duration_ms)
            .bind(result)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Ends attempt `attempt` with an error: `retrying` from `retry_at`, or `failed` for good
    /// (with `alert` enqueued in the same transaction). False if fenced out.
    #[allow(clippy::too_many_arguments)]
    pub async fn fail_run(
        &self,
        id: i64,
        attempt: i64,
        error: &str,
        retry_at: Option<i64>,
        finished_at: i64,
        duration_ms: Option<i64>,
        alert: Option<&NewEmail>,
    ) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            let n = sqlx::query(
                "UPDATE job_runs SET last_error = $3, lease_expires_at = NULL,
                    duration_ms = COALESCE($6, duration_ms),
                    state = CASE WHEN $4 IS NULL THEN 'failed' ELSE 'retrying' END,
                    due_at = COALESCE($4, due_at),
                    finished_at = CASE WHEN $4 IS NULL THEN $5 END
                 WHERE id = $1 AND attempt = $2 AND state = 'running'",
            )
            .bind(id)
            .bind(attempt)
            .bind(error)
            .bind(retry_at)
            .bind(finished_at)
            .bind(duration_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1
                && let Some(email) = alert
            {
                let _new = enqueue_email!(tx, email, finished_at);
            }
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    /// Running attempts whose lease has expired in database time.
    pub async fn expired_runs(&self) -> StoreResult<Vec<Claimed>> {
        let db_now = self.db_now().await?;
        let rows: Vec<JobRunRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                run_columns!(),
                " FROM job_runs WHERE state = 'running' AND lease_expires_at < $1 ORDER BY id"
            ))
            .bind(db_now)
            .fetch_all(pool)
            .await?
        });
        let defs = self.job_defs().await?;
        Ok(rows
            .into_iter()
            .filter_map(|run| {
                let def = defs.iter().find(|d| d.name == run.job_name)?;
                Some(Claimed {
                    max_attempts: def.max_attempts,
                    lease_secs: def.lease_secs,
                    run,
                })
            })
            .collect())
    }

    /// Inserts a run requested by ops (`manual`) at `at`, moving to the next free microsecond
    /// if that slot is taken. Returns its id.
    pub async fn insert_requested_run(
        &self,
        job: &str,
        at: i64,
        trigger: &'static str,
        now: i64,
    ) -> StoreResult<i64> {
        let mut at = at;
        loop {
            let id: Option<i64> = on_writer!(self, |pool| {
                sqlx::query_scalar(
                    "INSERT INTO job_runs (job_name, scheduled_for, trigger, state, exclusive, due_at, created_at)
                     SELECT name, $2, $3, 'pending', overlap_policy = 'skip', $4, $4 FROM job_defs WHERE name = $1
                     ON CONFLICT (job_name, scheduled_for) DO NOTHING RETURNING id",
                )
                .bind(job)
                .bind(at)
                .bind(trigger)
                .bind(now)
                .fetch_optional(pool)
                .await?
            });
            if let Some(id) = id {
                return Ok(id);
            }
            at += 1;
        }
    }

    /// Backfill: slots in `slots` that have not run become pending `backfill` runs (new ones
    /// are inserted, skipped ones revived). Returns how many will run.
    pub async fn backfill_runs(&self, job: &str, slots: &[i64], now: i64) -> StoreResult<u64> {
        in_tx!(self, |tx| {
            let mut n = 0;
            for slot in slots {
                n += sqlx::query(
                    "INSERT INTO job_runs (job_name, scheduled_for, trigger, state, exclusive, due_at, created_at)
                     SELECT name, $2, 'backfill', 'pending', overlap_policy = 'skip', $3, $3 FROM job_defs WHERE name = $1
                     ON CONFLICT (job_name, scheduled_for) DO UPDATE SET state = 'pending',
                        trigger = 'backfill', due_at = excluded.due_at, skip_reason = NULL, finished_at = NULL
                     WHERE job_runs.state = 'skipped'",
                )
                .bind(job)
                .bind(slot)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
            Ok(n)
        })
    }

    /// Pauses a job: it plans and claims nothing; its planned-but-unstarted slots are skipped.
    /// Pausing a paused job keeps when the pause began and takes the new note. False if there
    /// is no such job.
    pub async fn pause_job(&self, job: &str, note: Option<&str>, now: i64) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            let n = sqlx::query(
                "UPDATE job_defs SET paused_at = COALESCE(paused_at, $2), paused_note = $3
                 WHERE name = $1",
            )
            .bind(job)
            .bind(now)
            .bind(note)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(
                "UPDATE job_runs SET state = 'skipped', skip_reason = 'paused', finished_at = $2
                 WHERE job_name = $1 AND state = 'pending' AND trigger IN ('schedule', 'catchup')",
            )
            .bind(job)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    /// Resumes a paused job from `now`: slots that fell in the pause are never planned. A job
    /// that is not paused is left alone (moving its watermark would drop its catch-up): false.
    pub async fn resume_job(&self, job: &str, now: i64) -> StoreResult<bool> {
        let n = on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE job_defs SET paused_at = NULL, paused_note = NULL,
                    last_planned_slot = CASE WHEN last_planned_slot IS NULL OR last_planned_slot < $2
                                             THEN $2 ELSE last_planned_slot END
                 WHERE name = $1 AND paused_at IS NOT NULL",
            )
            .bind(job)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Job `name`'s run that began last (a timer still waiting for its instant has not; a
    /// run waiting for its retry has), and the earliest instant one of its pending or
    /// retrying runs is due. By start, not id: a timer is inserted long before it runs.
    pub async fn job_timeline(&self, name: &str) -> StoreResult<(Option<JobRunRow>, Option<i64>)> {
        const LAST: &str = concat!(
            "SELECT ",
            run_columns!(),
            " FROM job_runs WHERE job_name = $1 AND started_at IS NOT NULL
               ORDER BY started_at DESC, id DESC LIMIT 1"
        );
        Ok(on_pool!(self, |pool| {
            let last = sqlx::query_as(LAST).bind(name).fetch_optional(pool).await?;
            // Only what would be claimed: while the job is paused, runs asked for by hand.
            let next = sqlx::query_scalar(
                "SELECT MIN(r.due_at) FROM job_runs r JOIN job_defs d ON d.name = r.job_name
                 WHERE r.job_name = $1 AND r.state IN ('pending', 'retrying')
                   AND (d.paused_at IS NULL OR r.trigger IN ('manual', 'backfill'))",
            )
            .bind(name)
            .fetch_one(pool)
            .await?;
            (last, next)
        }))
    }

    /// Whether a run of `job` that started at or after `since` has succeeded (read through
    /// the job's runs by start).
    pub async fn succeeded_since(&self, job: &str, since: i64) -> StoreResult<bool> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM job_runs
                                WHERE job_name = $1 AND started_at >= $2 AND state = 'succeeded')",
            )
            .bind(job)
            .bind(since)
            .fetch_one(pool)
            .await?
        }))
    }

    /// The earliest due instant of a pending or retrying run strictly after `after`.
    pub async fn next_due_after(&self, after: i64) -> StoreResult<Option<i64>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT MIN(r.due_at) FROM job_runs r JOIN job_defs d ON d.name = r.job_name
                 WHERE r.state IN ('pending', 'retrying') AND r.due_at > $1
                   AND (d.paused_at IS NULL OR r.trigger IN ('manual', 'backfill'))",
            )
            .bind(after)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Whether anything is running right now (on any instance).
    pub async fn runs_in_flight(&self) -> StoreResult<i64> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM job_runs WHERE state = 'running'")
                .fetch_one(pool)
                .await?
        }))
    }

    /// Runs newest first.
    pub async fn runs(&self, f: &RunFilter) -> StoreResult<Vec<JobRunRow>> {
        const SQL: &str = concat!(
            "SELECT ",
            run_columns!(),
            " FROM job_runs WHERE ($1 IS NULL OR job_name = $1) AND ($2 IS NULL OR state = $2)
               AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        );
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(SQL)
                .bind(&f.job)
                .bind(&f.state)
                .bind(f.before_id)
                .bind(f.limit)
                .fetch_all(pool)
                .await?
        }))
    }

    /// One run by id.
    pub async fn run(&self, id: i64) -> StoreResult<Option<JobRunRow>> {
        const SQL: &str = concat!("SELECT ", run_columns!(), " FROM job_runs WHERE id = $1");
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(SQL).bind(id).fetch_optional(pool).await?
        }))
    }

    /// Registers or refreshes this instance's heartbeat.
    pub async fn heartbeat_instance(
        &self,
        id: &str,
        version: &str,
        started_at: i64,
        clock_now: i64,
    ) -> StoreResult<()> {
        let db_now = self.db_now().await?;
        let skew_ms = (clock_now - db_now) / 1000;
        on_writer!(self, |pool| {
            sqlx::query(
                "INSERT INTO scheduler_instances (id, version, started_at, heartbeat_at, clock_skew_ms)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version,
                    heartbeat_at = excluded.heartbeat_at, clock_skew_ms = excluded.clock_skew_ms",
            )
            .bind(id)
            .bind(version)
            .bind(started_at)
            .bind(db_now)
            .bind(skew_ms)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(())
    }

    /// Every scheduler instance, the most recently started first (an order heartbeats don't
    /// move, so the API's pages hold still).
    pub async fn instances(&self) -> StoreResult<Vec<SchedulerInstanceRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, version, started_at, heartbeat_at, clock_skew_ms FROM scheduler_instances
                 ORDER BY started_at DESC, id",
            )
            .fetch_all(pool)
            .await?
        }))
    }

    /// Deletes finished runs that ended before `before` (keeping each job's latest),
    /// idempotency records older than `keys_before`, page sessions expired by `now`, and
    /// instances whose last heartbeat is
    /// older than `silent_for` in database time (heartbeats are stamped with it). Every start
    /// under the default instance id (`host-pid`) registers a new instance, so without this the
    /// ops page would list every process that ever ran.
    pub async fn prune(
        &self,
        before: i64,
        keys_before: i64,
        now: i64,
        silent_for: chrono::Duration,
    ) -> StoreResult<Pruned> {
        let silent_since = self.db_now().await? - silent_for.num_microseconds().unwrap_or(i64::MAX);
        in_tx!(self, |tx| {
            let runs = sqlx::query(
                "DELETE FROM job_runs WHERE state IN ('succeeded', 'skipped', 'failed')
                   AND finished_at IS NOT NULL AND finished_at < $1
                   AND id NOT IN (SELECT MAX(id) FROM job_runs GROUP BY job_name)",
            )
            .bind(before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let keys = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
                .bind(keys_before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let sessions = sqlx::query("DELETE FROM page_sessions WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let instances = sqlx::query("DELETE FROM scheduler_instances WHERE heartbeat_at < $1")
                .bind(silent_since)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(Pruned {
                runs,
                keys,
                sessions,
                instances,
            })
        })
    }
}

/// What [`Store::prune`] deleted.
#[derive(Debug, PartialEq, Eq)]
pub struct Pruned {
    pub runs: u64,
    pub keys: u64,
    pub sessions: u64,
    pub instances: u64,
}

impl Store {
    /// A timer outside any business transaction (e.g. an email retry): a pending run of `job`
    /// at `at`.
    pub async fn add_timer(&self, job: &str, at: i64, now: i64) -> StoreResult<()> {
        on_writer!(self, |pool| schedule_timer!(pool, job, at, now)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}
