//! Ops API: the clock (and, with the scheduler, jobs, runs and the outbox). Admin only.

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use crate::app::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_clock))
        .routes(routes!(advance_clock))
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
    runs: Vec<serde_json::Value>,
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
    manual
        .set(input.to)
        .map_err(|e| ApiError::field("to", e.to_string()))?;
    Ok(Json(AdvanceOut {
        now: state.clock.now(),
        runs: Vec::new(),
    }))
}
