//! The HTTP layer's one error type and its renderings: RFC 7807 problem+json, and the same
//! problem as an HTML page for the pages.
//!
//! Every failure a client can see goes through [`ApiError`]: handlers, extractors, the
//! idempotency layer and the fallbacks. Each carries a stable `code` from API.md; server errors
//! are logged with their cause and shown without it. A page handler answers its errors as
//! [`PageError`], the same `ApiError` shown as a page.

use crate::payments::PaymentsError;
use crate::presales::PresaleError;
use crate::store::{StoreError, StoredResponse};
use crate::subscriptions::SubscriptionError;
use askama::Template;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// A problem to report to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
}

/// The problem+json body.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    code: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<FieldError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            errors,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                detail,
            )
        }
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)",
        )
    }

    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token's role may not do this",
        )
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle this request; it has been logged",
        )
    }

    /// A request with this `Idempotency-Key` is still running.
    pub fn key_in_flight() -> Self {
        Self::conflict(
            "conflict",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        )
    }

    /// This `Idempotency-Key` already ran another request.
    pub fn key_reused() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request",
        )
    }

    /// The problem as remembered for an `Idempotency-Key`, replayed byte for byte.
    pub fn remembered(self) -> StoredResponse {
        let (status, body) = self.problem();
        StoredResponse {
            status: status.as_u16(),
            content_type: Some(PROBLEM_JSON.to_owned()),
            body: serde_json::to_vec(&body).expect("a problem serializes"),
        }
    }

    fn problem(self) -> (StatusCode, Problem) {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = Problem {
            kind: format!("/problems/{}", self.code),
            title,
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code,
            errors: self.errors,
        };
        (self.status, body)
    }
}

const PROBLEM_JSON: &str = "application/problem+json";

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("no such resource"),
            StoreError::Conflict(detail) => ApiError::conflict("conflict", detail),
            other => ApiError::internal(&other),
        }
    }
}

impl From<PaymentsError> for ApiError {
    fn from(e: PaymentsError) -> Self {
        match e {
            PaymentsError::Store(e) => e.into(),
            other => ApiError::internal(&other),
        }
    }
}

impl From<PresaleError> for ApiError {
    fn from(e: PresaleError) -> Self {
        match e {
            PresaleError::NotFound(detail) => ApiError::not_found(detail),
            PresaleError::NotOpen(detail) => ApiError::conflict("campaign_not_open", detail),
            PresaleError::SoldOut(detail) => ApiError::conflict("sold_out", detail),
            PresaleError::Conflict(detail) => ApiError::conflict("conflict", detail),
            PresaleError::Declined(reason) => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_declined",
                format!("the payment was declined: {reason}"),
            ),
            PresaleError::Invalid { field, message } => ApiError::field(field, message),
            PresaleError::KeyInFlight => ApiError::key_in_flight(),
            PresaleError::KeyReused => ApiError::key_reused(),
            PresaleError::Payments(e) => e.into(),
            PresaleError::Store(e) => e.into(),
            e @ (PresaleError::Batch(_) | PresaleError::Stopped(_)) => ApiError::internal(&e),
        }
    }
}

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> Self {
        match e {
            SubscriptionError::NotFound(detail) => ApiError::not_found(detail),
            SubscriptionError::Conflict(detail) => ApiError::conflict("conflict", detail),
            SubscriptionError::Locked(detail) => ApiError::conflict("delivery_locked", detail),
            SubscriptionError::Invalid { field, message } => ApiError::field(field, message),
            SubscriptionError::Payments(e) => e.into(),
            SubscriptionError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.problem();
        let mut response = (status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// An [`ApiError`] met by a page: whoever opened a page reads its answer in a browser, so the
/// problem is shown as a page (status, title, detail, the invalid fields) instead of JSON.
pub struct PageError(pub ApiError);

// Why a blanket conversion: page handlers meet the same errors as the API's (`?` on a store
// or domain error, or an `ApiError` from a shared helper).
impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    status: u16,
    title: &'static str,
    detail: String,
    code: &'static str,
    errors: Vec<FieldError>,
    /// Not signed in: the page links to the sign-in form.
    sign_in: bool,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, p) = self.0.problem();
        let page = ErrorPage {
            status: p.status,
            title: p.title,
            detail: p.detail,
            code: p.code,
            errors: p.errors,
            sign_in: status == StatusCode::UNAUTHORIZED,
        };
        // The template is checked at compile time; rendering only fails on a formatter error.
        let html = page
            .render()
            .unwrap_or_else(|e| format!("{status} (page error: {e})"));
        (status, Html(html)).into_response()
    }
}
