//! The scheduler ops can trust: every run is a row of the ledger (`job_runs`), each slot runs
//! once across any number of instances, missed slots are caught up by policy.
//!
//! Loops (DESIGN.md "Scheduler"), run by every instance, no leader:
//! 1. **plan** — each unpaused job's slots since its watermark become rows, judged by its
//!    catch-up policy; never before `known_since`, never beyond the catch-up window;
//! 2. **claim** — a due row becomes `running` with `attempt + 1` (the fencing token) and a lease
//!    in database time;
//! 3. **execute** — the job's body, with a heartbeat; its completion is guarded by `attempt`;
//! 4. **reap** — expired leases are retried with backoff, or `failed` with an alert to ops.
//!
//! On the system clock, tokio-cron-scheduler is only the heartbeat that ticks these loops every
//! second; it never evaluates a schedule. On the manual clock, [`Scheduler::advance_to`] walks
//! time from one due instant to the next and runs what is due at each.

pub mod jobs;
pub mod schedule;

use crate::clock::Clock;
use crate::config::Settings;
use crate::email::{self, mailer::Mailer};
use crate::payments::Payments;
use crate::store::{Claimed, JobDefRow, NewRun, Store, StoreResult};
use chrono::{DateTime, Duration, Utc};
use jobs::JobSpec;
use schedule::{CatchUp, Schedule, plan_catch_up, retry_delay};
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// An error a job body reports; the run is retried or failed with its text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

/// What a job's body returns: a JSON summary recorded on the run.
pub type JobResult = Result<serde_json::Value, JobError>;
pub type JobBody =
    Arc<dyn Fn(RunCtx) -> Pin<Box<dyn Future<Output = JobResult> + Send>> + Send + Sync>;

/// What a job body can reach.
#[derive(Clone)]
pub struct JobEnv {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub mailer: Mailer,
    pub payments: Payments,
    pub settings: Arc<Settings>,
}

/// One execution of a job.
#[derive(Clone)]
pub struct RunCtx {
    pub env: JobEnv,
    pub job: String,
    pub run_id: i64,
    pub scheduled_for: DateTime<Utc>,
    pub trigger: String,
    pub attempt: i64,
    /// The clock, read once when the attempt started.
    pub now: DateTime<Utc>,
}

/// A run as reported by [`Scheduler::advance_to`] and friends.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RunReport {
    /// A string in JSON, as every id the API shows (`/ops/runs` shows the same run).
    #[serde(serialize_with = "id_as_string")]
    pub id: i64,
    pub job: String,
    pub scheduled_for: DateTime<Utc>,
    pub trigger: String,
    pub state: String,
    pub attempt: i64,
}

fn id_as_string<S: serde::Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

pub struct Scheduler {
    env: JobEnv,
    jobs: Vec<JobSpec>,
    instance_id: String,
    started_at: DateTime<Utc>,
    /// Serialises this instance's ticks (instances coordinate through the database only).
    ticking: tokio::sync::Mutex<()>,
}

/// Retries of a failed run start here and double up to the cap.
const RETRY_BASE: Duration = Duration::seconds(30);
const RETRY_CAP: Duration = Duration::hours(1);

impl Scheduler {
    /// Registers `jobs` in the ledger (new jobs are known from now on).
    pub async fn start(
        env: JobEnv,
        jobs: Vec<JobSpec>,
        instance_id: String,
    ) -> StoreResult<Arc<Scheduler>> {
        let now = env.clock.now();
        for job in &jobs {
            env.store
                .sync_job_def(&JobDefRow {
                    name: job.name.clone(),
                    schedule: job.schedule.clone(),
                    time_zone: job.zone.name().to_owned(),
                    catchup_policy: job.catchup.as_str().to_owned(),
                    catchup_window_secs: job.catchup_window.num_seconds(),
                    start_grace_secs: job.start_grace.num_seconds(),
                    overlap_policy: if job.exclusive { "skip" } else { "allow" }.to_owned(),
                    max_attempts: job.max_attempts,
                    lease_secs: job.lease.num_seconds().max(1),
                    paused_at: None,
                    paused_note: None,
                    known_since: now.timestamp_micros(),
                    last_planned_slot: None,
                })
                .await?;
        }
        let scheduler = Arc::new(Scheduler {
            env,
            jobs,
            instance_id,
            started_at: now,
            ticking: tokio::sync::Mutex::new(()),
        });
        scheduler.heartbeat().await?;
        Ok(scheduler)
    }

    pub fn env(&self) -> &JobEnv {
        &self.env
    }

    pub fn jobs(&self) -> &[JobSpec] {
        &self.jobs
    }

    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// The names of the jobs this instance runs.
    fn job_names(&self) -> Vec<&str> {
        self.jobs.iter().map(|j| j.name.as_str()).collect()
    }

    async fn heartbeat(&self) -> StoreResult<()> {
        self.env
            .store
            .heartbeat_instance(
                &self.instance_id,
                env!("CARGO_PKG_VERSION"),
                self.started_at.timestamp_micros(),
                self.env.clock.now().timestamp_micros(),
            )
            .await
    }

    /// Plans every unpaused job's slots up to `now`.
    pub async fn plan(&self, now: DateTime<Utc>) -> StoreResult<()> {
        for def in self.env.store.job_defs().await? {
            if def.paused_at.is_some() {
                continue;
            }
            let Some(spec) = self.job(&def.name) else {
                continue;
            };
            let Ok(schedule) = spec.parsed_schedule() else {
                continue;
            };
            let window_start = [
                def.last_planned_slot.unwrap_or(i64::MIN),
                def.known_since,
                (now - spec.catchup_window).timestamp_micros(),
            ]
            .into_iter()
            .max()
            .and_then(DateTime::from_timestamp_micros)
            .unwrap_or(now);
            if window_start >= now {
                continue;
            }
            // `all` runs every slot of the window: the oldest page now, and the rest at the
            // next pass (the watermark stops at the page's last slot), none folded into a
            // count. The other policies run at most the newest slot late, so one page of
            // the newest is all they need.
            let (slots, uncounted, watermark) = match spec.catchup {
                CatchUp::All => {
                    let (slots, more) = schedule.first_slots_in(window_start, now);
                    let watermark = slots.last().filter(|_| more).copied().unwrap_or(now);
                    (slots, 0, watermark)
                }
                _ => {
                    let (slots, older) = schedule.slots_in(window_start, now);
                    (slots, older, now)
                }
            };
            let decisions = plan_catch_up(
                spec.catchup,
                spec.start_grace,
                now,
                &slots,
                uncounted,
                schedule.is_frequent(),
            );
            let runs: Vec<NewRun> = decisions
                .iter()
                .map(|d| NewRun {
                    scheduled_for: d.at.timestamp_micros(),
                    trigger: if d.late { "catchup" } else { "schedule" },
                    state: if d.skip.is_some() {
                        "skipped"
                    } else {
                        "pending"
                    },
                    skip_reason: d.skip,
                    coalesced: d.coalesced as i64,
                })
                .collect();
            self.env
                .store
                .plan_runs(
                    &def.name,
                    spec.exclusive,
                    &runs,
                    def.last_planned_slot,
                    watermark.timestamp_micros(),
                    now.timestamp_micros(),
                )
                .await?;
        }
        Ok(())
    }

    /// Expired leases: the attempt is presumed dead; retry or fail it.
    pub async fn reap(&self) -> StoreResult<()> {
        for claimed in self.env.store.expired_runs().await? {
            let error = format!(
                "lease expired: instance {} stopped heartbeating",
                claimed.run.lease_owner.as_deref().unwrap_or("?")
            );
            self.record_failure(&claimed, &error, None).await?;
        }
        Ok(())
    }

    async fn record_failure(
        &self,
        claimed: &Claimed,
        error: &str,
        duration_ms: Option<i64>,
    ) -> StoreResult<bool> {
        let run = &claimed.run;
        let now = self.env.clock.now();
        let retry_at = (run.attempt < claimed.max_attempts).then(|| {
            now + retry_delay(
                run.attempt as u32,
                RETRY_BASE,
                RETRY_CAP,
                rand::random::<f64>(),
            )
        });
        let alert = match (retry_at, &self.env.settings.ops_email) {
            (None, Some(to)) => Some(email::job_failed(
                to,
                &run.job_name,
                run.id,
                &crate::store::instant(run.scheduled_for).to_rfc3339(),
                run.attempt,
                error,
            )),
            _ => None,
        };
        if retry_at.is_none() {
            tracing::error!(job = %run.job_name, run = run.id, %error, "run failed for good");
        }
        let changed = self
            .env
            .store
            .fail_run(
                run.id,
                run.attempt,
                error,
                retry_at.map(|t| t.timestamp_micros()),
                now.timestamp_micros(),
                duration_ms,
                alert.as_ref(),
            )
            .await?;
        if changed {
            let state = if retry_at.is_some() {
                "retrying"
            } else {
                "failed"
            };
            metrics::counter!("job_runs_total", "job" => run.job_name.clone(), "state" => state)
                .increment(1);
        }
        Ok(changed)
    }

    /// Claims one due run and executes it to the end. `None` when nothing is due.
    async fn run_one(&self, now: DateTime<Utc>) -> StoreResult<Option<RunReport>> {
        let Some(claimed) = self
            .env
            .store
            .claim_next(
                &self.instance_id,
                &self.job_names(),
                now.timestamp_micros(),
                self.env.clock.now().timestamp_micros(),
            )
            .await?
        else {
            return Ok(None);
        };
        self.execute(claimed).await.map(Some)
    }

    /// Runs a claimed attempt with a heartbeat, then records its outcome, guarded by attempt.
    /// If the caller's future is dropped meanwhile, the body and its heartbeat stop with it;
    /// the lease then lapses and a reaper retries. (An HTTP client hanging up on a manual-clock
    /// run does not drop it: write requests run to their end on a task of their own.)
    async fn execute(&self, claimed: Claimed) -> StoreResult<RunReport> {
        let run = claimed.run.clone();
        let started = std::time::Instant::now();
        let now = self.env.clock.now();
        let lag = (now - crate::store::instant(run.scheduled_for))
            .num_milliseconds()
            .max(0) as f64
            / 1000.0;
        metrics::histogram!("job_start_lag_seconds", "job" => run.job_name.clone()).record(lag);
        let Some(spec) = self.job(&run.job_name).cloned() else {
            let error = format!(
                "no job named {} is registered in this version",
                run.job_name
            );
            self.record_failure(&claimed, &error, Some(0)).await?;
            return self.report(run.id).await;
        };
        let ctx = RunCtx {
            env: self.env.clone(),
            job: run.job_name.clone(),
            run_id: run.id,
            scheduled_for: crate::store::instant(run.scheduled_for),
            trigger: run.trigger.clone(),
            attempt: run.attempt,
            now,
        };
        // The heartbeat task ends only when the attempt is fenced out: a reaper gave the slot
        // to a new attempt, which will do this work again.
        let mut fenced = AbortOnDrop({
            let store = self.env.store.clone();
            let every =
                std::time::Duration::from_millis((claimed.lease_secs * 1000 / 3).max(200) as u64);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match store.heartbeat_run(run.id, run.attempt).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                    }
                }
            })
        });
        // The body runs in its own task so that a panic is an error of the run, not of the
        // scheduler.
        let mut body = AbortOnDrop(tokio::spawn(async move {
            if let Some(delay) = spec.debug_delay {
                tokio::time::sleep(delay.to_std().unwrap_or_default()).await;
            }
            if spec.debug_fail {
                return Err(JobError("debug_fail is set for this job".into()));
            }
            (spec.body)(ctx).await
        }));
        let outcome = tokio::select! {
            joined = &mut body.0 => {
                joined.unwrap_or_else(|e| Err(JobError(format!("the job panicked: {e}"))))
            }
            // Fenced out: stop the body where it is, as a crash would (every step it takes
            // is a guarded write, so the new attempt finds what it left), rather than let it
            // do the new attempt's work beside it. Its outcome is fenced out below. (A
            // heartbeat task that panicked is not a fence: that arm then waits no more.)
            Ok(()) = &mut fenced.0 => {
                body.0.abort();
                let _stopped = (&mut body.0).await;
                Err(JobError("fenced out: the lease passed to a new attempt".into()))
            }
        };
        drop(fenced);
        let duration_ms = started.elapsed().as_millis() as i64;
        metrics::histogram!("job_run_duration_seconds", "job" => run.job_name.clone())
            .record(duration_ms as f64 / 1000.0);
        match outcome {
            Ok(summary) => {
                let done = self
                    .env
                    .store
                    .succeed_run(
                        run.id,
                        run.attempt,
                        self.env.clock.now().timestamp_micros(),
                        duration_ms,
                        &summary.to_string(),
                    )
                    .await?;
                if done {
                    metrics::counter!("job_runs_total", "job" => run.job_name.clone(), "state" => "succeeded").increment(1);
                } else {
                    tracing::warn!(
                        run = run.id,
                        attempt = run.attempt,
                        "finished after losing the lease; nothing recorded"
                    );
                }
            }
            Err(e) => {
                self.record_failure(&claimed, &e.0, Some(duration_ms))
                    .await?;
            }
        }
        self.report(run.id).await
    }

    async fn report(&self, id: i64) -> StoreResult<RunReport> {
        let run = self
            .env
            .store
            .run(id)
            .await?
            .ok_or(crate::store::StoreError::NotFound)?;
        Ok(RunReport {
            id: run.id,
            job: run.job_name,
            scheduled_for: crate::store::instant(run.scheduled_for),
            trigger: run.trigger,
            state: run.state,
            attempt: run.attempt,
        })
    }

    /// Everything before claiming: plan new slots, reap dead attempts, skip overlapping ones.
    /// Reaping first: a dead instance's attempt still marked `running` must not make live
    /// slots look like overlaps.
    async fn prepare(&self, now: DateTime<Utc>) -> StoreResult<()> {
        self.plan(now).await?;
        self.reap().await?;
        self.env
            .store
            .skip_overlapping(now.timestamp_micros())
            .await?;
        Ok(())
    }

    /// Plans, reaps and runs everything due at `now`, one run at a time, until nothing is due.
    pub async fn run_until_idle(&self, now: DateTime<Utc>) -> StoreResult<Vec<RunReport>> {
        let mut reports = Vec::new();
        loop {
            self.prepare(now).await?;
            match self.run_one(now).await? {
                Some(report) => reports.push(report),
                None => return Ok(reports),
            }
        }
    }

    /// Manual clock: moves from one due instant to the next up to `to`, setting the clock to
    /// each and running what is due there; returns when idle at `to`. Pollers (hourly or
    /// faster) are not stops: they catch up by policy at every stop, so a month takes seconds.
    pub async fn advance_to(&self, to: DateTime<Utc>) -> Result<Vec<RunReport>, AdvanceError> {
        let manual = self.env.clock.as_manual().ok_or(AdvanceError::NotManual)?;
        let _guard = self.ticking.lock().await;
        // No ticker beats for a manual clock: each advance is this instance's sign of life.
        self.heartbeat().await?;
        let mut reports = self.run_until_idle(self.env.clock.now()).await?;
        loop {
            let now = self.env.clock.now();
            let next = self.next_stop(now).await?.filter(|t| *t <= to);
            let stop = next.unwrap_or(to);
            manual
                .set(stop)
                .map_err(|e| AdvanceError::Backwards(e.to_string()))?;
            reports.extend(self.run_until_idle(stop).await?);
            if next.is_none() {
                return Ok(reports);
            }
        }
    }

    /// The next instant after `now` at which something is due: a pending run (timer, retry,
    /// backfill) or a slot of a job that runs less often than hourly
    /// ([`Schedule::stops_manual_clock`]).
    async fn next_stop(&self, now: DateTime<Utc>) -> StoreResult<Option<DateTime<Utc>>> {
        let pending = self
            .env
            .store
            .next_due_after(now.timestamp_micros())
            .await?
            .map(crate::store::instant);
        let defs = self.env.store.job_defs().await?;
        let slots = self.jobs.iter().filter_map(|spec| {
            let def = defs.iter().find(|d| d.name == spec.name)?;
            if def.paused_at.is_some() {
                return None;
            }
            let schedule: Schedule = spec.parsed_schedule().ok()?;
            schedule
                .stops_manual_clock()
                .then(|| schedule.next_after(now))
                .flatten()
        });
        Ok(pending.into_iter().chain(slots).min())
    }

    /// System clock: one pass of the loops, executing claimed runs concurrently. Ticks of one
    /// instance never overlap.
    pub async fn tick(self: &Arc<Self>) {
        let Ok(_guard) = self.ticking.try_lock() else {
            return;
        };
        if let Err(e) = self.tick_once().await {
            tracing::warn!(error = %e, "scheduler tick failed");
        }
    }

    async fn tick_once(self: &Arc<Self>) -> StoreResult<()> {
        self.heartbeat().await?;
        let now = self.env.clock.now();
        self.prepare(now).await?;
        while let Some(claimed) = self
            .env
            .store
            .claim_next(
                &self.instance_id,
                &self.job_names(),
                now.timestamp_micros(),
                now.timestamp_micros(),
            )
            .await?
        {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = me.execute(claimed).await {
                    tracing::warn!(error = %e, "recording a run failed");
                }
            });
        }
        Ok(())
    }

    /// Starts the once-a-second heartbeat (system clock only).
    pub async fn spawn_ticker(
        self: &Arc<Self>,
    ) -> Result<tokio_cron_scheduler::JobScheduler, tokio_cron_scheduler::JobSchedulerError> {
        use tokio_cron_scheduler::{Job, JobScheduler};
        let ticker = JobScheduler::new().await?;
        let me = Arc::clone(self);
        ticker
            .add(Job::new_repeated_async(
                std::time::Duration::from_secs(1),
                move |_, _| {
                    let me = Arc::clone(&me);
                    Box::pin(async move { me.tick().await })
                },
            )?)
            .await?;
        ticker.start().await?;
        Ok(ticker)
    }

    /// Ops "run now": a `manual` run at the current instant. On the manual clock it runs before
    /// this returns; otherwise the next tick (within a second) picks it up.
    pub async fn run_now(self: &Arc<Self>, job: &str) -> StoreResult<RunReport> {
        let now = self.env.clock.now().timestamp_micros();
        let id = self
            .env
            .store
            .insert_requested_run(job, now, "manual", now)
            .await?;
        self.kick().await?;
        self.report(id).await
    }

    /// Runs what is due now: inline on the manual clock, in the background otherwise.
    pub async fn kick(self: &Arc<Self>) -> StoreResult<()> {
        if self.env.clock.as_manual().is_some() {
            let _guard = self.ticking.lock().await;
            self.run_until_idle(self.env.clock.now()).await?;
        } else {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.tick().await });
        }
        Ok(())
    }

    /// Backfill: the slots of `job` in `[from, to]` that have not run are run now.
    pub async fn backfill(
        self: &Arc<Self>,
        job: &JobSpec,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<u64, AdvanceError> {
        let schedule = job
            .parsed_schedule()
            .map_err(|e| AdvanceError::Invalid(e.0))?;
        let (slots, older) = schedule.slots_in(from - Duration::microseconds(1), to);
        if older > 0 {
            return Err(AdvanceError::Invalid(format!(
                "the range holds more than {} slots; backfill a shorter range",
                schedule::MAX_SLOTS
            )));
        }
        let slots: Vec<i64> = slots.iter().map(|s| s.timestamp_micros()).collect();
        let n = self
            .env
            .store
            .backfill_runs(&job.name, &slots, self.env.clock.now().timestamp_micros())
            .await?;
        self.kick().await?;
        Ok(n)
    }
}

/// Why the clock could not be advanced or a backfill planned.
#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    #[error("the clock is not manual")]
    NotManual,
    #[error("{0}")]
    Backwards(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A task aborted when its handle is dropped, so it never outlives the run that owns it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
