//! Server-rendered pages: `/ops` (jobs, next slots, last runs, durations, failures, instances,
//! run/pause/resume) and the `/login` form that sets its session cookie.
//!
//! Pages accept the admin bearer token or a session cookie holding it (HttpOnly,
//! SameSite=Strict); their state-changing buttons also carry a CSRF token derived from it.

use super::error::ApiError;
use crate::app::AppState;
use crate::ids::hash_token;
use crate::scheduler::schedule::UpcomingSlot;
use crate::store::{RunFilter, instant};
use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

const COOKIE: &str = "pooled_session";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/ops", get(ops_page))
        .route("/ops/jobs/{name}/{action}", post(ops_action))
}

/// Whether the request carries the admin token, as a bearer or in the session cookie.
fn is_admin(headers: &HeaderMap, state: &AppState) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
        .next();
    [bearer.map(str::to_owned), cookie]
        .into_iter()
        .flatten()
        .any(|t| hash_token(&t) == *state.admin_token_hash)
}

/// The CSRF token of the admin session: derived from the admin token, never the token itself.
fn csrf_token(state: &AppState) -> String {
    hash_token(&format!("csrf:{}", state.admin_token_hash))
}

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
struct LoginPage {
    failed: bool,
}

async fn login_form() -> LoginPage {
    LoginPage { failed: false }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    if hash_token(form.token.trim()) != *state.admin_token_hash {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            LoginPage { failed: true },
        )
            .into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        form.token.trim()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/ops")).into_response()
}

struct JobRow {
    name: String,
    schedule: String,
    catchup: String,
    paused: bool,
    paused_note: Option<String>,
    upcoming: Vec<UpcomingSlot>,
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
    jobs: Vec<JobRow>,
    failures: Vec<Failure>,
    instances: Vec<InstanceRow>,
    csrf: String,
}

async fn ops_page(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if !is_admin(&headers, &state) {
        return Ok(Redirect::to("/login").into_response());
    }
    let now = state.clock.now();
    let defs = state.store.job_defs().await?;
    let mut jobs = Vec::new();
    for spec in state.scheduler.jobs() {
        let Some(def) = defs.iter().find(|d| d.name == spec.name) else {
            continue;
        };
        let schedule = spec.parsed_schedule().map_err(|e| ApiError::internal(&e))?;
        let recent = state
            .store
            .runs(&RunFilter {
                job: Some(spec.name.clone()),
                limit: 30,
                ..RunFilter::default()
            })
            .await?;
        let last_run = recent
            .iter()
            .find(|r| r.state != "pending")
            .map(|r| LastRun {
                state: r.state.clone(),
                scheduled_for: instant(r.scheduled_for).to_rfc3339(),
                duration: r.duration_ms.map_or("–".into(), |d| format!("{d} ms")),
                lag: r.started_at.map_or("–".into(), |s| {
                    format!("{} ms", (s - r.scheduled_for) / 1000)
                }),
                attempt: r.attempt,
            });
        let durations: Vec<i64> = recent.iter().rev().filter_map(|r| r.duration_ms).collect();
        jobs.push(JobRow {
            name: spec.name.clone(),
            schedule: schedule.describe(),
            catchup: def.catchup_policy.clone(),
            paused: def.paused_at.is_some(),
            paused_note: def.paused_note.clone(),
            upcoming: schedule.upcoming(now, 5),
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
        jobs,
        failures,
        instances,
        csrf: csrf_token(&state),
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

#[derive(Deserialize)]
struct ActionForm {
    csrf: String,
}

async fn ops_action(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Result<Response, ApiError> {
    if !is_admin(&headers, &state) {
        return Err(ApiError::unauthorized());
    }
    if form.csrf != csrf_token(&state) {
        return Err(ApiError::forbidden());
    }
    if state.scheduler.job(&name).is_none() {
        return Err(ApiError::not_found(format!("no job named {name}")));
    }
    let now = state.clock.now().timestamp_micros();
    match action.as_str() {
        "run" => {
            state.scheduler.run_now(&name).await?;
        }
        "pause" => {
            state
                .store
                .pause_job(&name, Some("paused from /ops"), now)
                .await?;
        }
        "resume" => {
            state.store.resume_job(&name, now).await?;
        }
        other => return Err(ApiError::not_found(format!("no action {other}"))),
    }
    Ok(Redirect::to("/ops").into_response())
}
