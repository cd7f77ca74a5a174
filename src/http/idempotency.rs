//! `Idempotency-Key` for every POST, implemented once as a layer.
//!
//! Same key and same request → the first response again (with `Idempotent-Replayed: true`);
//! same key, different request → 422 `idempotency_key_reused`; same key while the first is still
//! running → 409 `conflict`. Responses that may change on retry (5xx, 409, 429) are not kept,
//! so the client can retry them with the same key.
//!
//! Claims and completions are group-committed ([`crate::batch`]): a stampede of keyed POSTs
//! costs one commit per batch, not two per request.

use super::error::ApiError;
use super::extract::{idempotency_scope, too_large};
use crate::app::AppState;
use crate::batch::Batcher;
use crate::store::{
    IdempotencyBegin, IdempotencyClaim, IdempotencyDone, Store, StoreResult, StoredResponse,
    per_request,
};
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A claim older than this is taken to belong to a request that died mid-way.
fn abandon_after() -> chrono::Duration {
    chrono::Duration::minutes(5)
}

/// The key a request runs under, claimed by this layer (a request extension). A route whose
/// commit is the point of no return (a join: units taken, a deposit charged) writes its
/// response for the key in that same transaction, so a retry after a crash between the commit
/// and the layer's own record replays it instead of running the request a second time.
#[derive(Debug, Clone)]
pub struct ClaimedKey(pub IdempotencyClaim);

/// The group-commit queues for claims and completions. Cheap to clone.
#[derive(Clone)]
pub struct Keys {
    begin:
        Batcher<(IdempotencyClaim, chrono::DateTime<chrono::Utc>), StoreResult<IdempotencyBegin>>,
    complete: Batcher<IdempotencyDone, StoreResult<()>>,
}

impl Keys {
    /// Starts the two batch workers on the current runtime.
    pub fn spawn(store: &Store) -> Keys {
        let s = store.clone();
        let begin = Batcher::spawn(
            "idempotency-begin",
            256,
            move |claims: Vec<(IdempotencyClaim, chrono::DateTime<chrono::Utc>)>| {
                let store = s.clone();
                async move {
                    // One instant for the batch: the latest, so no claim is judged earlier than it was made.
                    let now = claims.iter().map(|(_, at)| *at).max().unwrap_or_default();
                    let claims: Vec<_> = claims.into_iter().map(|(c, _)| c).collect();
                    per_request(
                        store.idempotency_begin(&claims, now, abandon_after()).await,
                        claims.len(),
                    )
                }
            },
        );
        let s = store.clone();
        let complete = Batcher::spawn(
            "idempotency-complete",
            256,
            move |done: Vec<IdempotencyDone>| {
                let store = s.clone();
                async move {
                    per_request(
                        store
                            .idempotency_complete(&done)
                            .await
                            .map(|()| vec![(); done.len()]),
                        done.len(),
                    )
                }
            },
        );
        Keys { begin, complete }
    }
}

pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get(&IDEMPOTENCY_KEY) else {
        return next.run(req).await;
    };
    match run_once(&state, key.clone(), req, next).await {
        Ok(response) | Err(response) => response,
    }
}

async fn run_once(
    state: &AppState,
    key: HeaderValue,
    req: Request,
    next: Next,
) -> Result<Response, Response> {
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::field("Idempotency-Key", "must be 1–255 visible ASCII characters")
                .into_response()
        })?
        .to_owned();
    let scope = idempotency_scope(req.headers());
    let (mut parts, body) = req.into_parts();
    let body = to_bytes(body, super::BODY_LIMIT)
        .await
        .map_err(|_| too_large().into_response())?;
    let request_hash = {
        let mut h = Sha256::new();
        h.update(parts.method.as_str());
        h.update([0]);
        h.update(parts.uri.path_and_query().map_or("", |p| p.as_str()));
        h.update([0]);
        h.update(&body);
        hex::encode(h.finalize())
    };
    let store = &state.store;
    let claim = IdempotencyClaim {
        scope: scope.clone(),
        key: key.clone(),
        request_hash,
    };
    let begin = state
        .idempotency
        .begin
        .call((claim.clone(), state.clock.now()))
        .await
        .map_err(|e| ApiError::internal(&e).into_response())?
        .map_err(|e| ApiError::from(e).into_response())?;
    match begin {
        IdempotencyBegin::Run => {}
        IdempotencyBegin::Replay(StoredResponse {
            status,
            content_type,
            body,
        }) => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            response
                .headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            return Ok(response);
        }
        IdempotencyBegin::InFlight => {
            return Err(ApiError::conflict(
                "conflict",
                "a request with this Idempotency-Key is still being processed; retry shortly",
            )
            .into_response());
        }
        IdempotencyBegin::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request",
            )
            .into_response());
        }
    }

    // A route that commits state may remember its own response with that state (see
    // `ClaimedKey`); the one remembered below, after the route answered, replaces it.
    parts.extensions.insert(ClaimedKey(claim));
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    let status = response.status();
    let remember = !(status.is_server_error()
        || status == StatusCode::CONFLICT
        || status == StatusCode::TOO_MANY_REQUESTS);
    if !remember {
        if let Err(e) = store.idempotency_release(&scope, &key).await {
            tracing::warn!(error = %e, "could not release an idempotency key");
        }
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::internal(&e).into_response())?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let done = IdempotencyDone {
        scope,
        key,
        response: StoredResponse {
            status: status.as_u16(),
            content_type,
            body: body.to_vec(),
        },
    };
    state
        .idempotency
        .complete
        .call(done)
        .await
        .map_err(|e| ApiError::internal(&e).into_response())?
        .map_err(|e| ApiError::from(e).into_response())?;
    Ok(Response::from_parts(parts, Body::from(body)))
}
