//! Server-rendered pages: `/ops` (jobs, next slots, last runs, durations, failures, recent
//! runs, the email outbox, instances; run, pause with a note, resume, backfill, send a failed
//! email again), the `/login` form that sets its session cookie, the public
//! `/campaigns/{id}` (tiers, progress to the next tier, time left, a chart of pooled demand)
//! and a subscription's delivery calendar `/subscriptions/{id}/calendar`.
//!
//! Pages accept a bearer token, read as the API reads it, or a session cookie (HttpOnly,
//! SameSite=Strict, Secure over HTTPS) holding a random session id that answers as the token
//! it signed in with, until sign-out or 12 hours; `/ops` wants the admin's, and its
//! state-changing buttons also carry a CSRF token derived from the session. A calendar also
//! opens with its private link.

use super::error::{ApiError, PageError};
use super::extract::{PageForm, PageQuery, bearer_token, principal_of, principal_of_hash};
use crate::app::AppState;
use crate::domain::identity::Principal;
use crate::ids::hash_token;
use crate::scheduler::schedule::UpcomingSlot;
use crate::store::{RunFilter, instant};
use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

const COOKIE: &str = "pooled_session";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/ops", get(ops_page))
        .route("/ops/jobs/{name}/{action}", post(ops_action))
        .route("/ops/outbox/{id}/retry", post(ops_retry_email))
        .route("/campaigns/{id}", get(campaign_page))
        .route("/subscriptions/{id}/calendar", get(calendar_page))
}

/// What a page request signs in with: a bearer header, else the session cookie.
enum Credential {
    Bearer(String),
    /// The session id the cookie holds (never a token).
    Session(String),
}

fn credential(headers: &HeaderMap) -> Option<Credential> {
    match bearer_token(headers) {
        Some(token) => Some(Credential::Bearer(token.to_owned())),
        None => session_cookie(headers).map(Credential::Session),
    }
}

/// The session id in the request's cookie (the first non-empty one).
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))
        .find(|id| !id.is_empty())
        .map(str::to_owned)
}

/// Who a page request is from, with the CSRF token its forms carry.
struct PageCaller {
    who: Principal,
    /// Derived from the credential's hash: each session has its own, and it says nothing
    /// about the credential.
    csrf: String,
    /// Signed in with the cookie (a page shows "sign out").
    signed_in: bool,
}

/// Who the page request is from, as the API would answer for the same token; a session
/// answers as the token it signed in with, until it ends or expires.
async fn session(headers: &HeaderMap, state: &AppState) -> Result<Option<PageCaller>, ApiError> {
    let (token_hash, secret_hash, signed_in) = match credential(headers) {
        None => return Ok(None),
        Some(Credential::Bearer(token)) => {
            let hash = hash_token(&token);
            (hash.clone(), hash, false)
        }
        Some(Credential::Session(id)) => {
            let id_hash = hash_token(&id);
            let now = state.clock.now().timestamp_micros();
            match state.store.page_session_token(&id_hash, now).await? {
                Some(token_hash) => (token_hash, id_hash, true),
                None => return Ok(None),
            }
        }
    };
    Ok(principal_of_hash(state, token_hash)
        .await?
        .map(|who| PageCaller {
            who,
            csrf: hash_token(&format!("csrf:{secret_hash}")),
            signed_in,
        }))
}

/// The request's caller if it is ops.
async fn admin(headers: &HeaderMap, state: &AppState) -> Result<Option<PageCaller>, ApiError> {
    Ok(session(headers, state)
        .await?
        .filter(|c| c.who == Principal::Admin))
}

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
struct LoginPage {
    failed: bool,
    signed_in: bool,
    signed_out: bool,
    next: String,
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
    signed_in: Option<bool>,
    signed_out: Option<bool>,
}

async fn login_form(PageQuery(q): PageQuery<LoginQuery>) -> LoginPage {
    LoginPage {
        failed: false,
        signed_in: q.signed_in.unwrap_or(false),
        signed_out: q.signed_out.unwrap_or(false),
        next: q.next.filter(|n| local_path(n)).unwrap_or_default(),
    }
}

/// How long a page session lasts before the token is asked for again.
const SESSION_SECS: u32 = 12 * 3600;

/// Whether a form was posted from this site. Browsers say so in `Sec-Fetch-Site`, which a
/// proxy in front leaves alone (`same-origin`, or `none` when the user typed the address);
/// older ones only send `Origin`, compared with `Host` (case aside). Clients that send
/// neither (scripts) pass: the check is against a browser made to post by another site.
fn same_origin(headers: &HeaderMap) -> bool {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = value("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    let Some(origin) = value(header::ORIGIN.as_str()) else {
        return true;
    };
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    match (origin_host, value(header::HOST.as_str())) {
        (Some(o), Some(h)) => o.eq_ignore_ascii_case(h),
        _ => false,
    }
}

/// Whether the browser reached us over HTTPS. This service speaks plain HTTP, so only a TLS
/// proxy in front of it can say so (`X-Forwarded-Proto: https`, or `proto=https` in
/// `Forwarded`), or the browser's own `Origin`. A client that claims it falsely only marks its
/// own cookie `Secure`.
fn over_https(headers: &HeaderMap) -> bool {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let forwarded_proto = value("x-forwarded-proto")
        .and_then(|v| v.split(',').next())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    // The first hop's `proto` (the proxy nearest the browser), quoted or not.
    let forwarded = value("forwarded").is_some_and(|v| {
        v.split(',')
            .next()
            .unwrap_or_default()
            .split(';')
            .any(|pair| {
                let pair = pair.trim().replace('"', "");
                pair.eq_ignore_ascii_case("proto=https")
            })
    });
    let origin = value(header::ORIGIN.as_str()).is_some_and(|o| o.starts_with("https://"));
    forwarded_proto || forwarded || origin
}

/// The session cookie's header: HttpOnly (no script reads it), SameSite=Strict (no other site
/// sends it), and `Secure` when the sign-in came over HTTPS, so the browser never sends it
/// over plain HTTP. `max_age` 0 makes the browser forget it.
fn session_cookie_header(value: &str, max_age: u32, headers: &HeaderMap) -> String {
    let secure = if over_https(headers) { "; Secure" } else { "" };
    format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}")
}

/// A path on this site (`/…`, not `//host…`): the only place a sign-in sends the browser on
/// to, so the form can't be used to redirect elsewhere.
fn local_path(next: &str) -> bool {
    // Browsers drop tabs and newlines from URLs and read `\` as `/`, so `/\t/evil` would be
    // `//evil`: only printable ASCII other than `\` is let through (which also keeps the
    // `Location` header valid).
    next.starts_with('/')
        && !next.starts_with("//")
        && next.chars().all(|c| c.is_ascii_graphic() && c != '\\')
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

const CROSS_SITE: &str = "this form was sent from another site";

/// A form the page refuses (403): `why`, and what to do about it.
fn form_refused(why: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        "forbidden",
        format!("{why}; nothing was changed. Reload the page and try again."),
    )
}

/// Any party's token signs in: ops land on `/ops`, shoppers where they were going (their
/// calendar), else back here, signed in.
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    PageForm(form): PageForm<LoginForm>,
) -> Result<Response, PageError> {
    // A form posted from another site would sign this browser in as someone else.
    if !same_origin(&headers) {
        return Err(form_refused(CROSS_SITE).into());
    }
    let token = form.token.trim();
    let Some(who) = principal_of(&state, token).await? else {
        let page = LoginPage {
            failed: true,
            signed_in: false,
            signed_out: false,
            next: form.next.clone(),
        };
        return Ok((axum::http::StatusCode::UNAUTHORIZED, page).into_response());
    };
    // A session this browser had ends: the new cookie replaces it.
    if let Some(old) = session_cookie(&headers) {
        state.store.end_page_session(&hash_token(&old)).await?;
    }
    // The cookie holds a session id, so the token itself is never stored in the browser and
    // signing out ends the session for good, wherever the cookie was copied to.
    let id = crate::ids::new_token("ses");
    let now = state.clock.now().timestamp_micros();
    let expires_at = now + i64::from(SESSION_SECS) * 1_000_000;
    state
        .store
        .start_page_session(&hash_token(&id), &hash_token(token), now, expires_at)
        .await?;
    let cookie = session_cookie_header(&id, SESSION_SECS, &headers);
    let to = if local_path(&form.next) {
        form.next
    } else if who == Principal::Admin {
        "/ops".to_owned()
    } else {
        "/login?signed_in=true".to_owned()
    };
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&to)).into_response())
}

/// Signs out: the session ends (its cookie no longer signs anyone in, even if replayed) and
/// the browser forgets it.
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, PageError> {
    // Another site could otherwise sign this browser out.
    if !same_origin(&headers) {
        return Err(form_refused(CROSS_SITE).into());
    }
    // The cookie's session, even when a bearer header came with it.
    if let Some(id) = session_cookie(&headers) {
        state.store.end_page_session(&hash_token(&id)).await?;
    }
    let cookie = session_cookie_header("", 0, &headers);
    Ok((
        [(header::SET_COOKIE, cookie)],
        Redirect::to("/login?signed_out=true"),
    )
        .into_response())
}

struct JobRow {
    name: String,
    schedule: String,
    catchup: String,
    paused: bool,
    paused_note: Option<String>,
    upcoming: Vec<UpcomingSlot>,
    /// When a waiting timer or retry runs, if before the next slot.
    waiting: Option<String>,
    last_run: Option<LastRun>,
    chart: String,
}

struct LastRun {
    state: String,
    scheduled_for: String,
    duration: String,
    lag: String,
    attempt: i64,
}

struct Failure {
    job: String,
    scheduled_for: String,
    state: String,
    attempt: i64,
    error: String,
}

struct RunRow {
    id: i64,
    job: String,
    scheduled_for: String,
    trigger: String,
    state: String,
    attempt: i64,
    started_at: String,
    duration: String,
    instance: String,
    /// The error of a failed run, the reason of a skipped one.
    note: String,
}

struct FailedEmail {
    id: i64,
    to: String,
    subject: String,
    attempts: i64,
    created_at: String,
    error: String,
}

struct InstanceRow {
    id: String,
    version: String,
    started_at: String,
    heartbeat_at: String,
    clock_skew_ms: i64,
}

#[derive(Template, WebTemplate)]
#[template(path = "ops.html")]
struct OpsPage {
    clock_mode: &'static str,
    now: String,
    /// What the last button did, when it has something to say.
    notice: Option<String>,
    jobs: Vec<JobRow>,
    failures: Vec<Failure>,
    /// The job whose runs `runs` lists, or every job's.
    runs_of: Option<String>,
    runs: Vec<RunRow>,
    emails_pending: i64,
    oldest_pending: Option<String>,
    emails_failed: i64,
    failed_emails: Vec<FailedEmail>,
    instances: Vec<InstanceRow>,
    csrf: String,
    signed_in: bool,
}

/// Runs and failed emails `/ops` lists.
const OPS_ROWS: i64 = 25;

#[derive(Deserialize)]
struct OpsQuery {
    /// Lists this job's runs only.
    job: Option<String>,
    /// A backfill of `job` just scheduled this many slots.
    backfilled: Option<u64>,
    /// This email was just sent again.
    retried: Option<i64>,
}

async fn ops_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    PageQuery(q): PageQuery<OpsQuery>,
) -> Result<Response, PageError> {
    let Some(caller) = admin(&headers, &state).await? else {
        return Ok(Redirect::to("/login").into_response());
    };
    if let Some(job) = &q.job
        && state.scheduler.job(job).is_none()
    {
        return Err(ApiError::not_found(format!("no job named {job}")).into());
    }
    // Only what the query can say is shown, never its text: a link can't put words here.
    let notice = match (&q.job, q.backfilled, q.retried) {
        (Some(job), Some(n), _) => Some(format!(
            "Backfill of {job}: {} that had not run will run.",
            crate::email::count(n as i64, "slot")
        )),
        (_, _, Some(id)) => Some(format!("Email {id} will be sent again.")),
        _ => None,
    };
    let now = state.clock.now();
    let mut jobs = Vec::new();
    for job in super::ops::job_snapshots(&state, 30).await? {
        let last_run = job.last_run.as_ref().map(|r| LastRun {
            state: r.state.clone(),
            scheduled_for: instant(r.scheduled_for).to_rfc3339(),
            duration: r.duration_ms.map_or("–".into(), |d| format!("{d} ms")),
            lag: r.started_at.map_or("–".into(), |s| {
                format!("{} ms", (s - r.scheduled_for) / 1000)
            }),
            attempt: r.attempt,
        });
        let durations: Vec<i64> = job
            .recent
            .iter()
            .rev()
            .filter_map(|r| r.duration_ms)
            .collect();
        jobs.push(JobRow {
            name: job.name,
            schedule: job.schedule.describe(),
            catchup: job.def.catchup_policy.clone(),
            paused: job.def.paused_at.is_some(),
            paused_note: job.def.paused_note.clone(),
            // A timer or retry due before the next slot (a renewal's cutoff, say) runs first.
            waiting: job
                .next_due
                .map(instant)
                .filter(|at| job.upcoming.first().is_none_or(|slot| *at < slot.utc))
                .map(|at| {
                    let local = at.with_timezone(&job.schedule.zone());
                    format!(
                        "{} · {}",
                        local.format("%a %Y-%m-%d %H:%M %Z"),
                        at.to_rfc3339()
                    )
                }),
            upcoming: job.upcoming,
            last_run,
            chart: duration_chart(&durations),
        });
    }
    let mut failures = Vec::new();
    for state_name in ["failed", "retrying"] {
        let rows = state
            .store
            .runs(&RunFilter {
                state: Some(state_name.into()),
                limit: 20,
                ..RunFilter::default()
            })
            .await?;
        failures.extend(rows.into_iter().map(|r| Failure {
            job: r.job_name,
            scheduled_for: instant(r.scheduled_for).to_rfc3339(),
            state: r.state,
            attempt: r.attempt,
            error: r.last_error.unwrap_or_default(),
        }));
    }
    let runs = state
        .store
        .runs(&RunFilter {
            job: q.job.clone(),
            limit: OPS_ROWS,
            ..RunFilter::default()
        })
        .await?
        .into_iter()
        .map(|r| RunRow {
            id: r.id,
            scheduled_for: instant(r.scheduled_for).to_rfc3339(),
            started_at: r.started_at.map_or("–".into(), |t| instant(t).to_rfc3339()),
            duration: r.duration_ms.map_or("–".into(), |d| format!("{d} ms")),
            instance: r.lease_owner.unwrap_or_default(),
            // A run that succeeded on a retry keeps its earlier error: said as such, not as
            // the run's error.
            note: match (r.state.as_str(), r.last_error) {
                ("succeeded", Some(e)) => format!("attempt {} failed: {e}", r.attempt - 1),
                (_, error) => error.or(r.skip_reason).unwrap_or_default(),
            },
            job: r.job_name,
            trigger: r.trigger,
            state: r.state,
            attempt: r.attempt,
        })
        .collect();
    let outbox = state.store.outbox_health(OPS_ROWS).await?;
    let failed_emails = outbox
        .latest_failed
        .into_iter()
        .map(|e| FailedEmail {
            id: e.id,
            to: e.to_addr,
            subject: e.subject,
            attempts: e.attempts,
            created_at: instant(e.created_at).to_rfc3339(),
            error: e.last_error.unwrap_or_default(),
        })
        .collect();
    let instances = state
        .store
        .instances()
        .await?
        .into_iter()
        .map(|i| InstanceRow {
            id: i.id,
            version: i.version,
            started_at: instant(i.started_at).to_rfc3339(),
            heartbeat_at: instant(i.heartbeat_at).to_rfc3339(),
            clock_skew_ms: i.clock_skew_ms,
        })
        .collect();
    Ok(OpsPage {
        clock_mode: if state.clock.as_manual().is_some() {
            "manual"
        } else {
            "system"
        },
        now: now.to_rfc3339(),
        notice,
        jobs,
        failures,
        runs_of: q.job,
        runs,
        emails_pending: outbox.pending,
        oldest_pending: outbox.oldest_pending_at.map(|t| instant(t).to_rfc3339()),
        emails_failed: outbox.failed,
        failed_emails,
        instances,
        csrf: caller.csrf,
        signed_in: caller.signed_in,
    }
    .into_response())
}

/// An SVG bar chart of run durations, oldest left; bars scale to the slowest run.
fn duration_chart(durations_ms: &[i64]) -> String {
    let (w, h) = (160.0, 32.0);
    if durations_ms.is_empty() {
        return String::new();
    }
    let max = durations_ms.iter().copied().max().unwrap_or(1).max(1) as f64;
    let bar = w / durations_ms.len() as f64;
    let bars: String = durations_ms
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let bh = (*d as f64 / max * (h - 2.0)).max(1.0);
            format!(
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4a7"><title>{d} ms</title></rect>"##,
                i as f64 * bar,
                h - bh,
                (bar - 1.0).max(1.0),
                bh
            )
        })
        .collect();
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="durations of recent runs, slowest {max} ms">{bars}</svg>"#
    )
}

/// A button of `/ops`: its CSRF token, and the fields of the forms that have them (a
/// pause's note, a backfill's range).
#[derive(Deserialize)]
struct ActionForm {
    csrf: String,
    note: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// The admin a `/ops` form came from, if its CSRF token is their session's.
async fn ops_form(headers: &HeaderMap, state: &AppState, csrf: &str) -> Result<(), ApiError> {
    let Some(caller) = admin(headers, state).await? else {
        return Err(ApiError::unauthorized());
    };
    // Compared as hashes, so the time taken says nothing about the expected token's prefix.
    if hash_token(csrf) != hash_token(&caller.csrf) {
        return Err(form_refused(
            "this form is not from your current session of /ops",
        ));
    }
    Ok(())
}

async fn ops_action(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    PageForm(form): PageForm<ActionForm>,
) -> Result<Response, PageError> {
    ops_form(&headers, &state, &form.csrf).await?;
    if state.scheduler.job(&name).is_none() {
        return Err(ApiError::not_found(format!("no job named {name}")).into());
    }
    let now = state.clock.now().timestamp_micros();
    let back = match action.as_str() {
        "run" => {
            state.scheduler.run_now(&name).await?;
            format!("/ops?job={name}#runs")
        }
        "pause" => {
            let note = form
                .note
                .as_deref()
                .map(str::trim)
                .filter(|n| !n.is_empty());
            super::ops::pause(&state, &name, Some(note.unwrap_or("paused from /ops"))).await?;
            "/ops".into()
        }
        "resume" => {
            state.store.resume_job(&name, now).await?;
            "/ops".into()
        }
        "backfill" => {
            let from = form_instant("from", form.from.as_deref())?;
            let to = form_instant("to", form.to.as_deref())?;
            let n = super::ops::backfill(&state, &name, from, to).await?;
            format!("/ops?job={name}&backfilled={n}#runs")
        }
        other => return Err(ApiError::not_found(format!("no action {other}")).into()),
    };
    Ok(Redirect::to(&back).into_response())
}

/// An instant typed into a `/ops` form: RFC 3339, or a browser's `datetime-local` value
/// (`2026-12-01T09:00`, seconds optional), which the form labels UTC.
fn form_instant(
    field: &str,
    value: Option<&str>,
) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    let value = value.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(ApiError::field(field, "is required"));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(t.to_utc());
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(value, f).ok())
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            ApiError::field(
                field,
                format!("'{value}' is not an instant: write 2026-12-01T09:00 (UTC) or 2026-12-01T09:00:00Z"),
            )
        })
}

/// Sends a failed email once more (see [`super::ops::retry_failed_email`]).
async fn ops_retry_email(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    PageForm(form): PageForm<ActionForm>,
) -> Result<Response, PageError> {
    ops_form(&headers, &state, &form.csrf).await?;
    let email = super::ops::retry_failed_email(&state, &id).await?;
    Ok(Redirect::to(&format!("/ops?retried={}#outbox", email.id)).into_response())
}

struct TierRow {
    min_qty: i64,
    price: String,
    reached: bool,
}

struct CampaignView {
    title: String,
    status: String,
    pooled: i64,
    deposit: String,
    refundable: bool,
    ceiling: String,
    deadline: String,
    current: Option<String>,
    next: Option<String>,
    next_goal: i64,
    tiers: Vec<TierRow>,
    chart: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "campaign.html")]
struct CampaignPage {
    c: CampaignView,
}

/// "3 days 4 hours" (or "2 hours 5 minutes" under a day).
fn time_left(d: chrono::Duration) -> String {
    let (days, hours, minutes) = (d.num_days(), d.num_hours() % 24, d.num_minutes() % 60);
    if days > 0 {
        format!("{days} days {hours} hours")
    } else {
        format!("{hours} hours {minutes} minutes")
    }
}

/// The public campaign page.
async fn campaign_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<CampaignPage, PageError> {
    use crate::domain::money::Money;
    use crate::domain::presale;
    let l = crate::presales::load(&state.store, &id).await?;
    let c = &l.campaign;
    let cur = l.currency;
    let fmt = |minor: i64| format!("{} {cur}", Money::from_minor(minor, cur));
    let now = state.clock.now();
    let closes = instant(c.closes_at);
    let zone = crate::presales::zone_of(c);
    let local = closes.with_timezone(&zone).format("%A %-d %B %Y, %H:%M %Z");
    // An open campaign past its deadline waits for its last deposits' answers to close.
    let deadline = if c.status == "open" && closes <= now {
        format!(
            "Closed {local} ({}): the price locks once the last deposits are answered.",
            c.time_zone
        )
    } else if c.status == "open" || c.status == "scheduled" {
        format!(
            "Closes {local} ({}) — {} left.",
            c.time_zone,
            time_left(closes - now)
        )
    } else {
        format!("Closed {local} ({}).", c.time_zone)
    };
    let rules = l.rules();
    let progress = presale::progress(&rules, c.pooled_qty, cur);
    let steps = presale::price_steps(&rules, cur);
    let changes = state.store.demand_changes(&id).await?;
    let points = super::presales::demand_history(&changes, 500);
    let view = CampaignView {
        title: c.title.clone(),
        status: c.status.clone(),
        pooled: c.pooled_qty,
        deposit: fmt(c.deposit_per_unit_minor),
        refundable: c.deposit_refundable,
        ceiling: c.price_ceiling_minor.map_or("—".into(), fmt),
        deadline,
        current: c
            .locked_price_minor
            .or(progress.current.map(|m| m.minor()))
            .map(fmt),
        next: progress.next.map(|s| {
            format!(
                "{} more units unlock {} per unit for everyone.",
                progress.units_to_next.unwrap_or(0),
                fmt(s.unit_price.minor())
            )
        }),
        next_goal: progress.next.map_or(0, |s| s.min_qty),
        tiers: steps
            .iter()
            .map(|s| TierRow {
                min_qty: s.min_qty,
                price: fmt(s.unit_price.minor()),
                reached: c.pooled_qty >= s.min_qty,
            })
            .collect(),
        chart: demand_chart(
            &points,
            &steps.iter().map(|s| s.min_qty).collect::<Vec<_>>(),
            (
                c.opens_at,
                c.closes_at
                    .min(crate::store::micros(now))
                    .max(c.opens_at + 1),
            ),
        ),
    };
    Ok(CampaignPage { c: view })
}

/// An SVG step chart of the pooled quantity over the campaign, with a dashed line at each
/// tier's threshold.
fn demand_chart(points: &[(i64, i64)], thresholds: &[i64], (start, end): (i64, i64)) -> String {
    let (w, h, pad) = (600.0, 200.0, 4.0);
    let top = points
        .iter()
        .map(|p| p.1)
        .chain(thresholds.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |t: i64| {
        pad + (t.clamp(start, end) - start) as f64 / (end - start) as f64 * (w - 2.0 * pad)
    };
    let y = |q: i64| h - pad - q as f64 / top * (h - 2.0 * pad);
    let mut path = format!("M{:.1},{:.1}", x(start), y(0));
    let mut last = 0;
    for &(t, q) in points {
        path.push_str(&format!(" H{:.1} V{:.1}", x(t), y(q)));
        last = q;
    }
    path.push_str(&format!(" H{:.1}", x(end)));
    let lines: String = thresholds
        .iter()
        .map(|&q| {
            format!(
                r##"<line x1="{pad}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#c5221f" stroke-dasharray="4 3"><title>tier at {q} units</title></line>"##,
                w - pad,
                y(q),
                y(q)
            )
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="pooled demand over time, now {last} units">{lines}<path d="{path}" fill="none" stroke="#1a73e8" stroke-width="2"/></svg>"##
    )
}

/// The private link to a subscription's calendar page: whoever holds it reads that calendar
/// without signing in (as with a calendar app's secret address). Its key is random, minted
/// the first time the link is shown; `None` when there is no such subscription.
pub async fn calendar_link(
    state: &AppState,
    subscription_id: &str,
) -> Result<Option<String>, ApiError> {
    // Read first: the link is in every subscription answer, and minted only once.
    let key = match state.store.calendar_key(subscription_id).await? {
        Some(key) => Some(key),
        None => {
            let fresh = crate::ids::new_token("cal");
            state
                .store
                .mint_calendar_key(subscription_id, &fresh)
                .await?
        }
    };
    Ok(key.map(|key| calendar_path(subscription_id, &key)))
}

/// The private link to a subscription's calendar page with key `key`.
pub fn calendar_path(subscription_id: &str, key: &str) -> String {
    format!("/subscriptions/{subscription_id}/calendar?key={key}")
}

struct CalendarDay {
    date: String,
    today: bool,
    arrives: Option<String>,
    ready: Vec<String>,
    portions: i64,
    short: bool,
}

struct CalendarDelivery {
    date: String,
    status: String,
    cutoff: String,
    amount: String,
    lines: Vec<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "calendar.html")]
struct CalendarPage {
    signed_in: bool,
    plan: String,
    status: String,
    ready_word: &'static str,
    need: i64,
    days: Vec<CalendarDay>,
    deliveries: Vec<CalendarDelivery>,
}

#[derive(Deserialize)]
struct CalendarQuery {
    key: Option<String>,
}

/// Days shown: from a few days back to the end of the last box on its way, at most six weeks.
const CALENDAR_DAYS_BACK: i64 = 3;
const CALENDAR_MAX_DAYS: i64 = 42;

/// A subscription's delivery calendar: what is ready on each day until the last box on its
/// way runs out, and each delivery with its status, cutoff and lines. Its shopper or ops (by
/// session or bearer), or whoever holds its private link.
async fn calendar_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    PageQuery(q): PageQuery<CalendarQuery>,
) -> Result<Response, PageError> {
    use crate::subscriptions::{date_of, lines_of, plan_of, today};
    let not_found = || PageError(ApiError::not_found(format!("no subscription {id}")));
    // With the private link, nobody signs in; without it, the session says who may look.
    let who = match &q.key {
        // Compared as hashes, so the time taken says nothing about the key's prefix.
        Some(key)
            if state
                .store
                .calendar_key(&id)
                .await?
                .is_some_and(|stored| hash_token(&stored) == hash_token(key)) =>
        {
            None
        }
        Some(_) => return Err(not_found()),
        None => match session(&headers, &state).await? {
            None => {
                let next: String = form_urlencoded::byte_serialize(
                    format!("/subscriptions/{id}/calendar").as_bytes(),
                )
                .collect();
                return Ok(Redirect::to(&format!("/login?next={next}")).into_response());
            }
            Some(PageCaller {
                who: Principal::Manufacturer(_),
                ..
            }) => return Err(ApiError::forbidden().into()),
            Some(caller) => Some(caller),
        },
    };
    let sub = state.store.subscription(&id).await?.ok_or_else(not_found)?;
    if who.as_ref().is_some_and(|c| {
        c.who != Principal::Admin && c.who != Principal::Shopper(sub.shopper_id.clone())
    }) {
        return Err(not_found());
    }
    let signed_in = who.is_some_and(|c| c.signed_in);
    let plan = plan_of(&state.store, &sub.plan_id).await?;
    let zone = crate::subscriptions::zone_of(&plan);
    let now = state.clock.now();
    let today = today(&plan, now);
    let currency = crate::domain::money::Currency::parse(&plan.currency)
        .map_err(|e| ApiError::internal(&e))?;
    let mut deliveries = Vec::new();
    // Each day's ready lines, from the boxes that come (a skipped or held one does not).
    let mut ready: std::collections::BTreeMap<chrono::NaiveDate, (Vec<String>, i64)> =
        Default::default();
    let mut arrives = std::collections::BTreeMap::new();
    for d in state.store.deliveries_of(&id).await? {
        let date = date_of(&d.delivery_date)?;
        let status =
            crate::domain::subscription::shown_status(&d.status, date, today, plan.transit_days)
                .to_owned();
        let lines = lines_of(&d);
        if matches!(
            status.as_str(),
            "scheduled" | "locked" | "paid" | "dispatched"
        ) {
            arrives.insert(date, status.clone());
            for l in &lines {
                for offset in l.ready_from..=l.ready_until {
                    let day = ready
                        .entry(date + chrono::Duration::days(offset))
                        .or_default();
                    day.0.push(format!("{} × {}", l.qty, l.name));
                    day.1 += l.qty;
                }
            }
        }
        deliveries.push(CalendarDelivery {
            date: date.format("%a %-d %b %Y").to_string(),
            status,
            cutoff: instant(d.cutoff_at)
                .with_timezone(&zone)
                .format("%a %-d %b, %H:%M %Z")
                .to_string(),
            amount: d.amount_minor.map_or_else(
                || "–".to_owned(),
                |m| {
                    format!(
                        "{} {currency}",
                        crate::domain::money::Money::from_minor(m, currency)
                    )
                },
            ),
            lines: lines
                .iter()
                .map(|l| {
                    format!(
                        "{} × {}: {} {}–{}",
                        l.qty,
                        l.name,
                        crate::subscriptions::ready_word(&plan),
                        (date + chrono::Duration::days(l.ready_from)).format("%-d %b"),
                        (date + chrono::Duration::days(l.ready_until)).format("%-d %b"),
                    )
                })
                .collect(),
        });
    }
    let first_box = arrives.keys().next().copied();
    let from = today - chrono::Duration::days(CALENDAR_DAYS_BACK);
    let last = ready
        .keys()
        .next_back()
        .copied()
        .unwrap_or(today)
        .max(today);
    let until = last.min(from + chrono::Duration::days(CALENDAR_MAX_DAYS - 1));
    let days = from
        .iter_days()
        .take_while(|d| *d <= until)
        .map(|d| {
            let (lines, portions) = ready.remove(&d).unwrap_or_default();
            CalendarDay {
                date: d.format("%a %-d %b").to_string(),
                today: d == today,
                arrives: arrives.get(&d).cloned(),
                short: first_box.is_some_and(|f| d >= f) && portions < plan.portions_per_day,
                ready: lines,
                portions,
            }
        })
        .collect();
    Ok(CalendarPage {
        signed_in,
        ready_word: crate::subscriptions::ready_word(&plan),
        plan: plan.name,
        status: sub.status,
        need: plan.portions_per_day,
        days,
        deliveries,
    }
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_read_from_the_proxy_or_the_origin() {
        let with = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, value.parse().unwrap());
            headers
        };
        assert!(over_https(&with("x-forwarded-proto", "https")));
        assert!(over_https(&with("x-forwarded-proto", "HTTPS, http")));
        assert!(over_https(&with(
            "forwarded",
            "for=192.0.2.1;proto=https;by=203.0.113.5"
        )));
        let quoted = r#"for="[2001:db8::1]";proto="https", for=10.0.0.1;proto=http"#;
        assert!(over_https(&with("forwarded", quoted)));
        let second_hop = "for=10.0.0.1;proto=http, for=192.0.2.1;proto=https";
        assert!(!over_https(&with("forwarded", second_hop)));
        assert!(over_https(&with("origin", "https://shop.example")));
        assert!(!over_https(&with("x-forwarded-proto", "http")));
        assert!(!over_https(&with("forwarded", "for=192.0.2.1;proto=http")));
        assert!(!over_https(&with("origin", "http://shop.example")));
        assert!(!over_https(&HeaderMap::new()));
    }
}
