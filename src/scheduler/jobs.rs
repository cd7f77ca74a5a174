//! The jobs of DESIGN.md's table: their default schedules and policies, configuration
//! overrides, and their bodies. Each body is one callable step shared by the scheduler, the ops
//! "run now" button and the tests.

use super::schedule::{CatchUp, Schedule};
use super::{JobBody, JobError, JobResult, RunCtx};
use crate::payments::PAYMENT_RETRY_JOB;
use crate::presales;
use crate::store::{OUTBOX_JOB, StoreError};
use crate::subscriptions;
use chrono::Duration;
use chrono_tz::Tz;
use serde_json::json;
use std::sync::Arc;

/// A job: what it runs and when.
#[derive(Clone)]
pub struct JobSpec {
    pub name: String,
    /// `every <n>s|m|h` or cron.
    pub schedule: String,
    pub zone: Tz,
    pub catchup: CatchUp,
    pub catchup_window: Duration,
    pub start_grace: Duration,
    /// `true`: at most one running attempt; a slot due while one runs is skipped.
    pub exclusive: bool,
    pub max_attempts: i64,
    pub lease: Duration,
    /// Chaos testing only: wait this long before the body runs.
    pub debug_delay: Option<Duration>,
    /// Chaos testing only: fail every attempt.
    pub debug_fail: bool,
    pub body: JobBody,
}

/// A job body from a step that returns any error, recorded on the run as its message.
fn body<F, Fut, E>(step: F) -> JobBody
where
    F: Fn(RunCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, E>> + Send + 'static,
    E: std::fmt::Display,
{
    Arc::new(move |ctx| {
        let run = step(ctx);
        Box::pin(async move { run.await.map_err(|e| JobError(e.to_string())) })
    })
}

/// The body of a subscription billing step (renewal, dunning): each runs over the store, the
/// gateway and the configured dunning schedule, with any further arguments (the shop zone).
macro_rules! billing {
    ($step:path $(, $arg:expr)*) => {
        body(move |ctx| async move {
            let env = &ctx.env;
            $step(
                &env.store,
                &env.payments,
                &env.settings.dunning_days,
                $($arg,)*
                ctx.now,
            )
            .await
        })
    };
}

impl JobSpec {
    fn new(name: &str, schedule: &str, zone: Tz, catchup: CatchUp, body: JobBody) -> JobSpec {
        JobSpec {
            name: name.to_owned(),
            schedule: schedule.to_owned(),
            zone,
            catchup,
            catchup_window: Duration::days(3),
            start_grace: Duration::minutes(5),
            exclusive: true,
            max_attempts: 5,
            lease: Duration::seconds(60),
            debug_delay: None,
            debug_fail: false,
            body,
        }
    }

    pub fn parsed_schedule(&self) -> Result<Schedule, JobError> {
        Schedule::parse(&self.schedule, self.zone).map_err(|e| JobError(e.to_string()))
    }
}

/// The jobs with their default schedules, in the shop zone `shop`.
pub fn defaults(shop: Tz) -> Vec<JobSpec> {
    let utc = chrono_tz::UTC;
    let mut reminders = JobSpec::new(
        presales::REMINDERS_JOB,
        "0 * * * *",
        utc,
        CatchUp::Skip,
        body(|ctx| async move { presales::run_reminders(&ctx.env.store, ctx.now).await }),
    );
    reminders.start_grace = Duration::hours(2);
    let mut outbox = JobSpec::new(
        OUTBOX_JOB,
        "every 10s",
        utc,
        CatchUp::Latest,
        body(deliver_outbox),
    );
    outbox.start_grace = Duration::seconds(30);
    vec![
        JobSpec::new(
            presales::CLOSE_JOB,
            "every 15m",
            utc,
            CatchUp::Latest,
            body(|ctx| async move {
                presales::run_close(&ctx.env.store, &ctx.env.payments, ctx.now).await
            }),
        ),
        JobSpec::new(
            presales::BALANCES_JOB,
            "every 15m",
            utc,
            CatchUp::Latest,
            body(|ctx| async move {
                presales::run_balances(&ctx.env.store, &ctx.env.payments, ctx.now).await
            }),
        ),
        reminders,
        JobSpec::new(
            "subscription-plan",
            "0 6 * * 3",
            shop,
            CatchUp::All,
            body(
                move |ctx| async move { subscriptions::run_plan(&ctx.env.store, ctx.now, shop).await },
            ),
        ),
        JobSpec::new(
            subscriptions::RENEW_JOB,
            "every 15m",
            utc,
            CatchUp::Latest,
            billing!(subscriptions::run_renew, shop),
        ),
        JobSpec::new(
            subscriptions::DUNNING_JOB,
            "0 * * * *",
            utc,
            CatchUp::Latest,
            billing!(subscriptions::run_dunning),
        ),
        JobSpec::new(
            subscriptions::GROWER_ORDERS_JOB,
            "0 5 * * *",
            shop,
            CatchUp::All,
            body(move |ctx| async move {
                subscriptions::run_grower_orders(&ctx.env.store, ctx.now, shop).await
            }),
        ),
        outbox,
        JobSpec::new(
            PAYMENT_RETRY_JOB,
            "every 1m",
            utc,
            CatchUp::Latest,
            body(retry_payments),
        ),
        JobSpec::new(
            "maintenance-prune",
            "0 3 * * *",
            shop,
            CatchUp::Latest,
            body(prune),
        ),
    ]
}

/// Resends payment intents whose retry time has come (and any a crashed sender left behind).
async fn retry_payments(ctx: RunCtx) -> JobResult {
    let attempted = ctx
        .env
        .payments
        .sweep(ctx.now, false)
        .await
        .map_err(|e| JobError(e.to_string()))?;
    Ok(json!({ "attempted": attempted }))
}

/// Applies `POOLED_JOB_OVERRIDES`: `;`-separated `job.key=value` with keys `schedule`,
/// `catchup` (all|latest|skip), `window`, `grace`, `lease` (durations such as 90s, 5m, 2h, 3d),
/// `max_attempts`, `overlap` (skip|allow), and for chaos tests `debug_delay`, `debug_fail`.
pub fn apply_overrides(jobs: &mut [JobSpec], spec: &str) -> Result<(), String> {
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: &str| format!("POOLED_JOB_OVERRIDES: '{entry}': {why}");
        let (lhs, value) = entry
            .split_once('=')
            .ok_or_else(|| bad("expected job.key=value"))?;
        let (job, key) = lhs
            .trim()
            .split_once('.')
            .ok_or_else(|| bad("expected job.key=value"))?;
        let value = value.trim();
        let spec = jobs
            .iter_mut()
            .find(|j| j.name == job)
            .ok_or_else(|| bad("no such job"))?;
        match key {
            "schedule" => {
                Schedule::parse(value, spec.zone).map_err(|e| bad(&e.message))?;
                spec.schedule = value.to_owned();
            }
            "catchup" => {
                spec.catchup =
                    CatchUp::parse(value).ok_or_else(|| bad("expected all, latest or skip"))?
            }
            // A zero window would make every slot too late to run the moment it is due, and
            // a zero lease would let another instance take every run as it starts.
            "window" => {
                spec.catchup_window = parse_duration(value)
                    .filter(|d| *d > Duration::zero())
                    .ok_or_else(|| bad("expected a duration above zero such as 3d"))?
            }
            // The ticker plans a slot up to a few seconds after it falls, so a shorter grace
            // would record on-time slots as late (and a `skip` job would never run).
            "grace" => {
                spec.start_grace = parse_duration(value)
                    .filter(|d| *d >= MIN_START_GRACE)
                    .ok_or_else(|| bad("expected a duration of at least 10s such as 5m"))?
            }
            "lease" => {
                spec.lease = parse_duration(value)
                    .filter(|d| *d > Duration::zero())
                    .ok_or_else(|| bad("expected a duration above zero such as 60s"))?
            }
            "max_attempts" => {
                spec.max_attempts = value
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad("expected a whole number ≥ 1"))?
            }
            "overlap" => {
                spec.exclusive = match value {
                    "skip" => true,
                    "allow" => false,
                    _ => return Err(bad("expected skip or allow")),
                }
            }
            "debug_delay" => {
                spec.debug_delay =
                    Some(parse_duration(value).ok_or_else(|| bad("expected a duration"))?)
            }
            "debug_fail" => spec.debug_fail = value == "true",
            _ => return Err(bad("unknown key")),
        }
    }
    Ok(())
}

/// The shortest start grace a job may be given.
const MIN_START_GRACE: Duration = Duration::seconds(10);

/// `90s`, `5m`, `2h`, `3d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    // Split before the last character, whatever its width (`5µ` is refused, not a panic).
    let (n, unit) = s.split_at(s.char_indices().last()?.0);
    let n: i64 = n.parse().ok().filter(|n| *n >= 0)?;
    match unit {
        "s" => Some(Duration::seconds(n)),
        "m" => Some(Duration::minutes(n)),
        "h" => Some(Duration::hours(n)),
        "d" => Some(Duration::days(n)),
        _ => None,
    }
}

/// How many times an email is tried before it is marked failed.
const EMAIL_MAX_ATTEMPTS: i64 = 8;

/// Sends due outbox emails. A transient failure is retried with backoff (and a timer wakes
/// this job then); a permanent one, or the last attempt, marks the email failed.
async fn deliver_outbox(ctx: RunCtx) -> Result<serde_json::Value, JobError> {
    let store = &ctx.env.store;
    let now = ctx.now.timestamp_micros();
    let (mut sent, mut retrying, mut failed) = (0, 0, 0);
    loop {
        let batch = store.due_emails(now, 100).await?;
        if batch.is_empty() {
            break;
        }
        for email in batch {
            let attachments = store.email_attachments(email.id).await?;
            match ctx.env.mailer.send(&email, &attachments).await {
                Ok(()) => {
                    store.mark_email_sent(email.id, now).await?;
                    sent += 1;
                }
                Err(e) => {
                    let attempt = email.attempts + 1;
                    let retry_at = (e.transient && attempt < EMAIL_MAX_ATTEMPTS).then(|| {
                        let delay = super::schedule::retry_delay(
                            attempt as u32,
                            Duration::seconds(30),
                            Duration::hours(1),
                            rand::random::<f64>(),
                        );
                        (ctx.now + delay).timestamp_micros()
                    });
                    store
                        .mark_email_attempt_failed(email.id, &e.message, retry_at)
                        .await?;
                    if let Some(at) = retry_at {
                        store.add_timer(OUTBOX_JOB, at, now).await?;
                        retrying += 1;
                    } else {
                        failed += 1;
                    }
                    tracing::warn!(email = email.id, error = %e, "email delivery failed");
                }
            }
        }
    }
    let backlog = store.outbox_backlog().await?;
    metrics::gauge!("outbox_backlog").set(backlog as f64);
    Ok(json!({"sent": sent, "retrying": retrying, "failed": failed}))
}

/// Days finished runs are kept. Past them nobody knows which slots ran, so a backfill may not
/// reach back further.
pub const RUN_RETENTION_DAYS: i64 = 90;

/// Prunes finished runs older than [`RUN_RETENTION_DAYS`] and idempotency records older than
/// a day.
async fn prune(ctx: RunCtx) -> Result<serde_json::Value, JobError> {
    // An instance silent for a week is long gone: ops have seen its last heartbeat by then.
    let pruned = ctx
        .env
        .store
        .prune(
            (ctx.now - Duration::days(RUN_RETENTION_DAYS)).timestamp_micros(),
            (ctx.now - Duration::days(1)).timestamp_micros(),
            ctx.now.timestamp_micros(),
            Duration::days(7),
        )
        .await?;
    Ok(json!({
        "runs_pruned": pruned.runs,
        "idempotency_keys_pruned": pruned.keys,
        "page_sessions_pruned": pruned.sessions,
        "instances_pruned": pruned.instances,
    }))
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        JobError(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_applied_and_bad_ones_refused_by_entry() {
        let mut jobs = defaults(chrono_tz::UTC);
        apply_overrides(
            &mut jobs,
            "grower-orders.window=2h; grower-orders.lease=90s",
        )
        .unwrap();
        let grower = jobs.iter().find(|j| j.name == "grower-orders").unwrap();
        assert_eq!(grower.catchup_window, Duration::hours(2));
        assert_eq!(grower.lease, Duration::seconds(90));
        for (spec, why) in [
            ("grower-orders.window=0s", "above zero"),
            ("grower-orders.lease=0m", "above zero"),
            ("grower-orders.window=-1h", "expected a duration"),
            ("grower-orders.grace=5y", "expected a duration"),
            ("grower-orders.grace=0s", "at least 10s"),
            ("grower-orders.grace=9s", "at least 10s"),
            ("grower-orders.grace=5µ", "expected a duration"),
            ("grower-orders.lease=µ", "expected a duration"),
            ("grower-orders.max_attempts=0", "≥ 1"),
            ("grower-orders.colour=red", "unknown key"),
            ("nope.window=1h", "no such job"),
            (
                "grower-orders.schedule=61 * * * *",
                "grower-orders.schedule",
            ),
            ("grower-orders", "expected job.key=value"),
        ] {
            let err = apply_overrides(&mut jobs, spec).unwrap_err();
            assert!(err.contains(spec) && err.contains(why), "{spec}: {err}");
        }
    }
}
