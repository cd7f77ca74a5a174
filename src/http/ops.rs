//! Ops API: the clock, jobs and their runs, scheduler instances, the email outbox. Admin only.

use super::error::ApiError;
use super::extract::{ApiJson, ApiQuery, Caller, OptionalJson};
use crate::app::AppState;
use crate::clock::Clock;
use crate::scheduler::jobs::{JobSpec, RUN_RETENTION_DAYS};
use crate::scheduler::schedule::UpcomingSlot;
use crate::scheduler::{AdvanceError, RunReport};
use crate::store::{JobRunRow, OutboxRow, RunFilter, SchedulerInstanceRow, instant};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_clock))
        .routes(routes!(advance_clock))
        .routes(routes!(list_jobs))
        .routes(routes!(run_job))
        .routes(routes!(pause_job))
        .routes(routes!(resume_job))
        .routes(routes!(backfill_job))
        .routes(routes!(list_runs))
        .routes(routes!(list_instances))
        .routes(routes!(list_outbox))
        .routes(routes!(retry_email))
}

#[derive(Serialize, ToSchema)]
pub struct ClockOut {
    /// `system` or `manual`.
    mode: &'static str,
    now: DateTime<Utc>,
}

/// The service's clock.
#[utoipa::path(get, path = "/api/v1/ops/clock", tag = "ops",
    responses((status = 200, body = ClockOut)))]
async fn get_clock(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ClockOut>, ApiError> {
    caller.require_admin()?;
    Ok(Json(ClockOut {
        mode: if state.clock.as_manual().is_some() {
            "manual"
        } else {
            "system"
        },
        now: state.clock.now(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdvanceIn {
    /// The instant to move to (RFC 3339); not before the current time.
    to: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct AdvanceOut {
    now: DateTime<Utc>,
    /// Runs executed on the way, in order.
    #[schema(value_type = Vec<Object>)]
    runs: Vec<RunReport>,
}

/// Move the manual clock forward (manual mode only).
#[utoipa::path(post, path = "/api/v1/ops/clock/advance", tag = "ops", request_body = AdvanceIn,
    responses((status = 200, body = AdvanceOut), (status = 409, body = super::error::Problem)))]
async fn advance_clock(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<AdvanceIn>,
) -> Result<Json<AdvanceOut>, ApiError> {
    caller.require_admin()?;
    let manual = state.clock.as_manual().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "clock_not_manual",
            "the clock follows the system time; start with POOLED_CLOCK=manual to move it",
        )
    })?;
    if input.to < manual.now() {
        return Err(ApiError::field(
            "to",
            format!("is before the current time {}", manual.now().to_rfc3339()),
        ));
    }
    let runs = state
        .scheduler
        .advance_to(input.to)
        .await
        .map_err(advance_error)?;
    Ok(Json(AdvanceOut {
        now: state.clock.now(),
        runs,
    }))
}

fn advance_error(e: AdvanceError) -> ApiError {
    match e {
        AdvanceError::NotManual => {
            ApiError::conflict("clock_not_manual", "the clock is not manual")
        }
        AdvanceError::Backwards(m) => ApiError::field("to", m),
        AdvanceError::Invalid(m) => ApiError::field("to", m),
        AdvanceError::Store(e) => e.into(),
    }
}

/// A run as ops see it.
#[derive(Serialize, ToSchema)]
pub struct RunOut {
    id: String,
    job: String,
    scheduled_for: DateTime<Utc>,
    trigger: String,
    state: String,
    attempt: i64,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    duration_ms: Option<i64>,
    /// Start lag: how long after its slot the last attempt started.
    lag_ms: Option<i64>,
    #[schema(value_type = Object)]
    result: Option<serde_json::Value>,
    last_error: Option<String>,
    skip_reason: Option<String>,
    /// Older slots folded into this one.
    coalesced: i64,
    instance: Option<String>,
}

impl From<JobRunRow> for RunOut {
    fn from(r: JobRunRow) -> Self {
        RunOut {
            id: r.id.to_string(),
            job: r.job_name,
            scheduled_for: instant(r.scheduled_for),
            trigger: r.trigger,
            state: r.state,
            attempt: r.attempt,
            started_at: r.started_at.map(instant),
            finished_at: r.finished_at.map(instant),
            duration_ms: r.duration_ms,
            lag_ms: r.started_at.map(|s| (s - r.scheduled_for) / 1000),
            result: r.result.and_then(|j| serde_json::from_str(&j).ok()),
            last_error: r.last_error,
            skip_reason: r.skip_reason,
            coalesced: r.coalesced,
            instance: r.lease_owner,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct JobOut {
    name: String,
    /// The schedule in words.
    schedule: String,
    /// The schedule as configured (cron or `every …`).
    spec: String,
    time_zone: String,
    catchup_policy: String,
    paused: bool,
    paused_note: Option<String>,
    next_run_at: Option<DateTime<Utc>>,
    #[schema(value_type = Vec<Object>)]
    upcoming: Vec<UpcomingSlot>,
    last_run: Option<RunOut>,
}

#[derive(Serialize, ToSchema)]
pub struct Page<T> {
    items: Vec<T>,
    next: Option<String>,
}

/// Every job with its schedule, next slots (local and UTC, DST changes marked) and last run,
/// in the order of DESIGN.md's table.
#[utoipa::path(get, path = "/api/v1/ops/jobs", tag = "ops", params(PageQuery),
    responses((status = 200, body = Page<JobOut>)))]
async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<JobOut>>, ApiError> {
    caller.require_admin()?;
    let jobs = job_views(&state).await?;
    Ok(Json(page_in_memory(jobs, &q, |j| &j.name, |j| j)?))
}

pub(super) async fn job_views(state: &AppState) -> Result<Vec<JobOut>, ApiError> {
    Ok(job_snapshots(state, 0)
        .await?
        .into_iter()
        .map(|j| JobOut {
            name: j.name,
            schedule: j.schedule.describe(),
            spec: j.spec,
            time_zone: j.schedule.zone().name().to_owned(),
            catchup_policy: j.def.catchup_policy.clone(),
            paused: j.def.paused_at.is_some(),
            paused_note: j.def.paused_note.clone(),
            // The next slot, or a timer or retry due before it (a renewal's cutoff); while
            // paused, only a run asked for by hand.
            next_run_at: {
                let slot = j.upcoming.first().map(|u| u.utc);
                let waiting = j.next_due.map(instant);
                slot.into_iter().chain(waiting).min()
            },
            upcoming: j.upcoming,
            last_run: j.last_run.map(RunOut::from),
        })
        .collect())
}

/// One job as ops see it: its definition, parsed schedule, next five slots, most recent
/// runs (newest first, timers not yet due among them), the latest run that has begun, and
/// when its earliest waiting run that would be claimed is due. The API's job list and the `/ops` page both render
/// this.
pub(super) struct JobSnapshot {
    pub name: String,
    pub spec: String,
    pub schedule: crate::scheduler::schedule::Schedule,
    pub def: crate::store::JobDefRow,
    pub upcoming: Vec<UpcomingSlot>,
    pub recent: Vec<JobRunRow>,
    pub last_run: Option<JobRunRow>,
    pub next_due: Option<i64>,
}

pub(super) async fn job_snapshots(
    state: &AppState,
    recent_runs: i64,
) -> Result<Vec<JobSnapshot>, ApiError> {
    let now = state.clock.now();
    let defs = state.store.job_defs().await?;
    let mut items = Vec::new();
    for spec in state.scheduler.jobs() {
        let Some(def) = defs.iter().find(|d| d.name == spec.name) else {
            continue;
        };
        let schedule = spec.parsed_schedule().map_err(|e| ApiError::internal(&e))?;
        let recent = if recent_runs == 0 {
            Vec::new()
        } else {
            state
                .store
                .runs(&RunFilter {
                    job: Some(spec.name.clone()),
                    limit: recent_runs,
                    ..RunFilter::default()
                })
                .await?
        };
        let (last_run, next_due) = state.store.job_timeline(&spec.name).await?;
        items.push(JobSnapshot {
            name: spec.name.clone(),
            last_run,
            next_due,
            spec: spec.schedule.clone(),
            // A paused job's slots don't run: none is shown as coming.
            upcoming: if def.paused_at.is_some() {
                Vec::new()
            } else {
                schedule.upcoming(now, 5)
            },
            schedule,
            def: def.clone(),
            recent,
        });
    }
    Ok(items)
}

fn known_job<'a>(state: &'a AppState, name: &str) -> Result<&'a JobSpec, ApiError> {
    state
        .scheduler
        .job(name)
        .ok_or_else(|| ApiError::not_found(format!("no job named {name}")))
}

/// Run a job now (`trigger=manual`). On the manual clock it has run when this answers.
#[utoipa::path(post, path = "/api/v1/ops/jobs/{name}/run", tag = "ops",
    responses((status = 202, body = RunOut), (status = 404, body = super::error::Problem)))]
async fn run_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<RunOut>), ApiError> {
    caller.require_admin()?;
    known_job(&state, &name)?;
    let report = state.scheduler.run_now(&name).await?;
    let run = state
        .store
        .run(report.id)
        .await?
        .ok_or_else(|| ApiError::not_found("run vanished"))?;
    Ok((StatusCode::ACCEPTED, Json(run.into())))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PauseIn {
    note: Option<String>,
}

/// Pause a job: it plans and runs nothing until resumed.
#[utoipa::path(post, path = "/api/v1/ops/jobs/{name}/pause", tag = "ops", request_body = Option<PauseIn>,
    responses((status = 200, body = JobOut)))]
async fn pause_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    OptionalJson(body): OptionalJson<PauseIn>,
) -> Result<Json<JobOut>, ApiError> {
    caller.require_admin()?;
    // The body is optional: none means no note.
    let note = body.and_then(|b| b.note);
    pause(&state, &name, note.as_deref()).await?;
    one_job(&state, &name).await
}

/// Pauses job `name` with an optional `note` of at most 500 characters (the API and `/ops`).
pub(super) async fn pause(
    state: &AppState,
    name: &str,
    note: Option<&str>,
) -> Result<(), ApiError> {
    known_job(state, name)?;
    if note.is_some_and(|n| n.chars().count() > 500) {
        return Err(ApiError::field("note", "must be at most 500 characters"));
    }
    state
        .store
        .pause_job(name, note, state.clock.now().timestamp_micros())
        .await?;
    Ok(())
}

/// Resume a paused job from now: slots that fell in the pause are not run. Resuming a job that
/// is not paused changes nothing (its catch-up stays planned).
#[utoipa::path(post, path = "/api/v1/ops/jobs/{name}/resume", tag = "ops",
    responses((status = 200, body = JobOut)))]
async fn resume_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<JobOut>, ApiError> {
    caller.require_admin()?;
    known_job(&state, &name)?;
    state
        .store
        .resume_job(&name, state.clock.now().timestamp_micros())
        .await?;
    one_job(&state, &name).await
}

async fn one_job(state: &AppState, name: &str) -> Result<Json<JobOut>, ApiError> {
    job_views(state)
        .await?
        .into_iter()
        .find(|j| j.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no job named {name}")))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillIn {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct BackfillOut {
    /// Slots of the range that had not run and now will.
    scheduled: u64,
}

/// Run the slots of a range that have not run (`trigger=backfill`).
#[utoipa::path(post, path = "/api/v1/ops/jobs/{name}/backfill", tag = "ops", request_body = BackfillIn,
    responses((status = 200, body = BackfillOut)))]
async fn backfill_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(input): ApiJson<BackfillIn>,
) -> Result<Json<BackfillOut>, ApiError> {
    caller.require_admin()?;
    let scheduled = backfill(&state, &name, input.from, input.to).await?;
    Ok(Json(BackfillOut { scheduled }))
}

/// Runs the slots of job `name` in `[from, to]` that have not run (the API and `/ops`);
/// returns how many.
pub(super) async fn backfill(
    state: &AppState,
    name: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<u64, ApiError> {
    let job = known_job(state, name)?.clone();
    if to < from {
        return Err(ApiError::field("to", "must not be before from"));
    }
    let now = state.clock.now();
    if to > now {
        return Err(ApiError::field("to", "must not be in the future"));
    }
    // Older runs are pruned: their slots would look as if they never ran, and run again.
    if from < now - chrono::Duration::days(RUN_RETENTION_DAYS) {
        return Err(ApiError::field(
            "from",
            format!("must be within the last {RUN_RETENTION_DAYS} days (older runs are pruned)"),
        ));
    }
    state
        .scheduler
        .backfill(&job, from, to)
        .await
        .map_err(advance_error)
}

#[derive(Deserialize, IntoParams)]
pub struct RunsQuery {
    job: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

/// The run ledger, newest first.
#[utoipa::path(get, path = "/api/v1/ops/runs", tag = "ops", params(RunsQuery),
    responses((status = 200, body = Page<RunOut>)))]
async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<RunsQuery>,
) -> Result<Json<Page<RunOut>>, ApiError> {
    caller.require_admin()?;
    let limit = page_limit(q.limit)?;
    let before_id = cursor(q.after.as_deref())?;
    if let Some(s) = &q.state
        && ![
            "pending",
            "running",
            "retrying",
            "succeeded",
            "failed",
            "skipped",
        ]
        .contains(&s.as_str())
    {
        return Err(ApiError::field(
            "state",
            "must be pending, running, retrying, succeeded, failed or skipped",
        ));
    }
    let rows = state
        .store
        .runs(&RunFilter {
            job: q.job,
            state: q.state,
            before_id,
            limit: limit + 1,
        })
        .await?;
    Ok(Json(paginate(rows, limit, |r| r.id, RunOut::from)))
}

/// `?limit=` and `?after=` of a list with nothing else to filter on.
#[derive(Deserialize, IntoParams)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub after: Option<String>,
}

/// Validates `?limit=` (default 50, 1–500).
pub(super) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=500).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::field("limit", "must be between 1 and 500")),
    }
}

/// Decodes `?after=` (an id-based cursor).
pub(super) fn cursor(after: Option<&str>) -> Result<Option<i64>, ApiError> {
    after
        .map(|a| a.parse::<i64>().map_err(|_| bad_cursor()))
        .transpose()
}

/// The answer to an `?after=` no page gave out.
pub(super) fn bad_cursor() -> ApiError {
    ApiError::field("after", "is not a cursor from a previous page")
}

/// A page of a short list read whole (jobs, instances), in its order: the rows after the one
/// whose key is `?after=`. The key is the cursor, so a page never repeats or skips a row
/// that is still there.
fn page_in_memory<R, T>(
    rows: Vec<R>,
    q: &PageQuery,
    key: impl Fn(&R) -> &str,
    view: impl Fn(R) -> T,
) -> Result<Page<T>, ApiError> {
    let limit = page_limit(q.limit)?;
    let start = match q.after.as_deref() {
        None => 0,
        Some(after) => {
            rows.iter()
                .position(|r| key(r) == after)
                .ok_or_else(bad_cursor)?
                + 1
        }
    };
    let rows: Vec<R> = rows
        .into_iter()
        .skip(start)
        .take(limit as usize + 1)
        .collect();
    Ok(paginate(rows, limit, |r| key(r).to_owned(), view))
}

/// Cuts `rows` (fetched with one extra) into a page and the cursor of the next.
pub(super) fn paginate<R, T, K: ToString>(
    mut rows: Vec<R>,
    limit: i64,
    id: impl Fn(&R) -> K,
    view: impl Fn(R) -> T,
) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|r| id(r).to_string())
    } else {
        None
    };
    Page {
        items: rows.into_iter().map(view).collect(),
        next,
    }
}

#[derive(Serialize, ToSchema)]
pub struct InstanceOut {
    id: String,
    version: String,
    started_at: DateTime<Utc>,
    heartbeat_at: DateTime<Utc>,
    clock_skew_ms: i64,
}

/// Scheduler instances with their heartbeat and clock skew against the database, the most
/// recently started first.
#[utoipa::path(get, path = "/api/v1/ops/instances", tag = "ops", params(PageQuery),
    responses((status = 200, body = Page<InstanceOut>)))]
async fn list_instances(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<InstanceOut>>, ApiError> {
    caller.require_admin()?;
    let instances = state.store.instances().await?;
    let view = |i: SchedulerInstanceRow| InstanceOut {
        id: i.id,
        version: i.version,
        started_at: instant(i.started_at),
        heartbeat_at: instant(i.heartbeat_at),
        clock_skew_ms: i.clock_skew_ms,
    };
    Ok(Json(page_in_memory(instances, &q, |i| &i.id, view)?))
}

#[derive(Deserialize, IntoParams)]
pub struct OutboxQuery {
    to: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct EmailOut {
    id: String,
    to: String,
    subject: String,
    template: String,
    entity: String,
    event: String,
    status: String,
    attempts: i64,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
}

/// The email outbox, newest first.
#[utoipa::path(get, path = "/api/v1/ops/outbox", tag = "ops", params(OutboxQuery),
    responses((status = 200, body = Page<EmailOut>)))]
async fn list_outbox(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<OutboxQuery>,
) -> Result<Json<Page<EmailOut>>, ApiError> {
    caller.require_admin()?;
    let limit = page_limit(q.limit)?;
    let rows = state
        .store
        .outbox(q.to.as_deref(), limit + 1, cursor(q.after.as_deref())?)
        .await?;
    Ok(Json(paginate(rows, limit, |r| r.id, email_out)))
}

fn email_out(r: OutboxRow) -> EmailOut {
    EmailOut {
        id: r.id.to_string(),
        to: r.to_addr,
        subject: r.subject,
        template: r.template,
        entity: r.entity,
        event: r.event,
        status: r.status,
        attempts: r.attempts,
        last_error: r.last_error,
        created_at: instant(r.created_at),
        sent_at: r.sent_at.map(instant),
    }
}

/// Send an email that gave up after its retries once more, from now (say, once the mail
/// server is mended). 409 `conflict` unless the email is `failed`.
#[utoipa::path(post, path = "/api/v1/ops/outbox/{id}/retry", tag = "ops",
    responses((status = 200, body = EmailOut), (status = 404, body = super::error::Problem),
        (status = 409, body = super::error::Problem)))]
async fn retry_email(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EmailOut>, ApiError> {
    caller.require_admin()?;
    let row = retry_failed_email(&state, &id).await?;
    Ok(Json(email_out(row)))
}

/// Sends failed email `id` once more (the API and `/ops`); the email as it now stands.
pub(super) async fn retry_failed_email(state: &AppState, id: &str) -> Result<OutboxRow, ApiError> {
    let not_found = || ApiError::not_found(format!("no email {id}"));
    let id: i64 = id.parse().map_err(|_| not_found())?;
    let now = state.clock.now().timestamp_micros();
    let retried = state.store.retry_failed_email(id, now).await?;
    let row = state.store.email(id).await?.ok_or_else(not_found)?;
    if !retried {
        return Err(ApiError::conflict(
            "conflict",
            format!(
                "email {id} is {}: only a failed email is sent again",
                row.status
            ),
        ));
    }
    Ok(row)
}
