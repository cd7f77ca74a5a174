//! Extractors: JSON bodies and query strings with problem+json rejections (and the pages'
//! forms and query strings, whose rejections are shown as pages), field validation, and the
//! caller's identity from the bearer token (the one place roles are checked).

use super::error::{ApiError, FieldError, PageError};
use crate::app::AppState;
use crate::domain::identity::Principal;
use crate::ids::hash_token;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use std::fmt::Display;
use std::time::{Duration, Instant};

/// A JSON request body. Wrong content type → 415, unparseable → 400, wrong shape → 422 naming
/// the field, too large → 413; all as problem+json.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = media_type(&req)
            .is_some_and(|mime| mime == "application/json" || mime.ends_with("+json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        parse_json(&body_of(req, state).await?).map(ApiJson)
    }
}

/// An optional JSON body: none (or only whitespace) is `None`, anything else is read as
/// [`ApiJson`] reads it, with the same problem+json answers (for `pause`, whose body is
/// optional, so a client may send none and no content type).
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_of(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        parse_json(&bytes).map(|v| OptionalJson(Some(v)))
    }
}

/// The request's `Content-Type` without its parameters, lowercase.
fn media_type(req: &Request) -> Option<String> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
}

/// The request's body, with a too-large or broken one answered as problem+json.
async fn body_of<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            too_large()
        }
        other => ApiError::new(other.status(), "bad_request", other.body_text()),
    })
}

/// A query string. A parameter of the wrong shape (`?limit=abc`) → 422 naming it, as
/// problem+json, like a body's fields.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        parse_urlencoded(query.as_bytes(), "query").map(ApiQuery)
    }
}

/// A page's query string, read as [`ApiQuery`] reads one; its errors are shown as a page.
pub struct PageQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for PageQuery<T> {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, PageError> {
        let ApiQuery(query) = ApiQuery::from_request_parts(parts, state).await?;
        Ok(PageQuery(query))
    }
}

/// A page's posted form (`application/x-www-form-urlencoded`): a field missing or of the
/// wrong shape is a 422 naming it, shown as a page.
pub struct PageForm<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for PageForm<T> {
    type Rejection = PageError;

    async fn from_request(req: Request, state: &S) -> Result<Self, PageError> {
        if media_type(&req).as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the form as a browser does, as application/x-www-form-urlencoded",
            )
            .into());
        }
        let body = body_of(req, state).await?;
        Ok(PageForm(parse_urlencoded(&body, "form")?))
    }
}

/// Parses `name=value&…` pairs into `T`, or a 422 naming the field (`root` for the whole).
fn parse_urlencoded<T: DeserializeOwned>(bytes: &[u8], root: &str) -> Result<T, ApiError> {
    let pairs = serde_urlencoded::Deserializer::new(form_urlencoded::parse(bytes));
    serde_path_to_error::deserialize(pairs).map_err(|e| shape_error(e, root))
}

pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body exceeds {} bytes", super::BODY_LIMIT),
    )
}

/// Parses a JSON body: 400 if it isn't JSON, 422 naming the field if it has the wrong shape.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| shape_error(e, "body"))
}

/// The messages of `chrono::format::ParseError`, the error a date or instant field reports.
const CHRONO_PARSE_ERRORS: &[&str] = &[
    "input is out of range",
    "no possible date and time matching input",
    "input is not enough for unique date and time",
    "input contains invalid characters",
    "premature end of input",
    "trailing input",
];

/// A 422 naming the field a query or body got wrong. serde reports a missing field at the
/// object that lacks it, so that field's name is read from the message and added to the path;
/// an error of the whole (`root`) names `root`.
fn shape_error<E: Display>(e: serde_path_to_error::Error<E>, root: &str) -> ApiError {
    let path = e.path().to_string();
    let mut message = e.into_inner().to_string();
    // chrono's parse errors say what went wrong but not what it wanted.
    if CHRONO_PARSE_ERRORS.contains(&message.as_str()) {
        message.push_str(": write a date as 2026-12-10 and an instant as 2026-12-01T09:00:00Z");
    }
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    let field = match (path.as_str(), missing) {
        (".", Some(name)) => name.to_owned(),
        (".", None) => root.to_owned(),
        (_, Some(name)) => format!("{path}.{name}"),
        (_, None) => path,
    };
    ApiError::validation(vec![FieldError { field, message }])
}

/// Collects per-field problems so a client sees all of them at once.
#[derive(Default)]
pub struct Validation(Vec<FieldError>);

impl Validation {
    /// Records `result`'s error under `field` and passes its value on.
    pub fn check<T, E: Display>(&mut self, field: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(field, message.to_string());
                None
            }
        }
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// `Err` with every recorded problem, or `Ok` when there were none.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.0))
        }
    }
}

/// The authenticated caller. Missing or unknown token → 401.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        principal_of(state, token)
            .await?
            .map(Caller)
            .ok_or_else(ApiError::unauthorized)
    }
}

/// The party a token stands for, or `None` for an unknown token. The API's [`Caller`] and the
/// pages' sessions both ask this.
pub async fn principal_of(state: &AppState, token: &str) -> Result<Option<Principal>, ApiError> {
    principal_of_hash(state, hash_token(token)).await
}

/// The party the token of `hash` stands for (a page session keeps only the hash).
pub async fn principal_of_hash(
    state: &AppState,
    hash: String,
) -> Result<Option<Principal>, ApiError> {
    // Compared as hashes so the comparison doesn't leak the admin token's prefix by timing.
    if hash == *state.admin_token_hash {
        return Ok(Some(Principal::Admin));
    }
    let now = Instant::now();
    if let Some(known) = state.known_tokens.get(&hash, now) {
        return Ok(Some(known));
    }
    let principal = state.store.token_subject(&hash).await?;
    if let Some(p) = &principal {
        state.known_tokens.insert(hash, p.clone(), now);
    }
    Ok(principal)
}

/// Bearer tokens this process has resolved lately, by hash. A token never changes its party,
/// so an answer read once holds; each is kept for [`KnownTokens::FOR`] only, so a token
/// deleted from the database (a leaked one, by hand) stops working within that time on every
/// instance. Unknown tokens are never kept. Without it, every request read its token: in a
/// stampede of joins, the one query run per request rather than per batch.
#[derive(Default)]
pub struct KnownTokens(std::sync::RwLock<std::collections::HashMap<String, (Principal, Instant)>>);

impl KnownTokens {
    const FOR: Duration = Duration::from_secs(10);
    /// Past this many, the map starts over rather than grow with every token ever seen.
    const MAX: usize = 100_000;

    fn get(&self, hash: &str, now: Instant) -> Option<Principal> {
        let known = self.0.read().unwrap_or_else(|e| e.into_inner());
        let (principal, read_at) = known.get(hash)?;
        (now.saturating_duration_since(*read_at) < Self::FOR).then(|| principal.clone())
    }

    fn insert(&self, hash: String, principal: Principal, now: Instant) {
        let mut known = self.0.write().unwrap_or_else(|e| e.into_inner());
        if known.len() >= Self::MAX {
            known.clear();
        }
        known.insert(hash, (principal, now));
    }
}

/// The token of an `Authorization: Bearer …` header (the scheme in any case).
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Caller {
    /// Ops only; any other role → 403.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.0 {
            Principal::Admin => Ok(()),
            _ => Err(ApiError::forbidden()),
        }
    }

    /// The shopper's id; other roles → 403.
    pub fn require_shopper(&self) -> Result<&str, ApiError> {
        match &self.0 {
            Principal::Shopper(id) => Ok(id),
            _ => Err(ApiError::forbidden()),
        }
    }

    /// The manufacturer's id; other roles → 403.
    pub fn require_manufacturer(&self) -> Result<&str, ApiError> {
        match &self.0 {
            Principal::Manufacturer(id) => Ok(id),
            _ => Err(ApiError::forbidden()),
        }
    }

    /// Shoppers' resources (pledges, subscriptions) are read by shoppers and ops: a
    /// manufacturer gets a 403, the wrong role. Checked before the resource is looked up, so
    /// the answer says nothing about whether the id exists.
    pub fn reads_shoppers(&self) -> Result<(), ApiError> {
        match self.0 {
            Principal::Manufacturer(_) => Err(ApiError::forbidden()),
            _ => Ok(()),
        }
    }

    /// Manufacturers' resources (purchase orders, a campaign's demand) are read by
    /// manufacturers and ops: a shopper
    /// gets a 403, as [`Caller::reads_shoppers`].
    pub fn reads_manufacturers(&self) -> Result<(), ApiError> {
        match self.0 {
            Principal::Shopper(_) => Err(ApiError::forbidden()),
            _ => Ok(()),
        }
    }

    /// Whether the caller may read resources owned by this shopper (they or ops). Another
    /// shopper gets a 404, so ids can't be probed; the wrong role a 403.
    pub fn may_see_shopper(&self, shopper_id: &str) -> Result<(), ApiError> {
        self.reads_shoppers()?;
        match &self.0 {
            Principal::Admin => Ok(()),
            Principal::Shopper(id) if id == shopper_id => Ok(()),
            _ => Err(ApiError::not_found("no such shopper")),
        }
    }

    /// Whether the caller may read this manufacturer's resources (they or ops): another
    /// manufacturer gets a 404, the wrong role a 403.
    pub fn may_see_manufacturer(&self, manufacturer_id: &str) -> Result<(), ApiError> {
        self.reads_manufacturers()?;
        match &self.0 {
            Principal::Admin => Ok(()),
            Principal::Manufacturer(id) if id == manufacturer_id => Ok(()),
            _ => Err(ApiError::not_found("no such manufacturer")),
        }
    }
}

/// The part of the Authorization header that scopes idempotency keys: callers never share
/// keys, and anonymous callers share the `public` scope.
pub fn idempotency_scope(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(hash_token)
        .unwrap_or_else(|| "public".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_token_is_answered_for_a_while_then_read_again() {
        let known = KnownTokens::default();
        let t0 = Instant::now();
        let ana = Principal::Shopper("shp_ana".into());
        assert_eq!(known.get("h1", t0), None, "never read");
        known.insert("h1".into(), ana.clone(), t0);
        assert_eq!(known.get("h1", t0 + KnownTokens::FOR / 2), Some(ana));
        assert_eq!(
            known.get("h1", t0 + KnownTokens::FOR),
            None,
            "read again after FOR"
        );
        assert_eq!(known.get("h2", t0), None, "only the token read");
    }

    #[test]
    fn the_known_tokens_start_over_rather_than_grow() {
        let known = KnownTokens::default();
        let t0 = Instant::now();
        for i in 0..=KnownTokens::MAX {
            known.insert(
                format!("h{i}"),
                Principal::Manufacturer(format!("mfr_{i}")),
                t0,
            );
        }
        let held = known.0.read().unwrap().len();
        assert_eq!(held, 1, "full at MAX, so the next one started a new map");
        assert_eq!(
            known.get(&format!("h{}", KnownTokens::MAX), t0),
            Some(Principal::Manufacturer(format!("mfr_{}", KnownTokens::MAX)))
        );
    }
}
