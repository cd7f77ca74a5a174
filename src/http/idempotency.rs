//! `Idempotency-Key` for every POST, implemented once as a layer.
//!
//! Same key and same request → the first response again (with `Idempotent-Replayed: true`);
//! same key, different request → 422 `idempotency_key_reused`; same key while the first is still
//! running → 409 `conflict`. Responses that may change on retry (5xx, 409, 429) are not kept,
//! so the client can retry them with the same key.
//!
//! Every write request runs to its end on a task of its own, even if its client hangs up.
//!
//! Claims and completions are group-committed ([`crate::batch`]): a stampede of keyed POSTs
//! costs one commit per batch, not two per request. Joins go further and claim their key in
//! their own transaction ([`ROUTES_CLAIMING_THEIR_KEY`]).

use super::error::ApiError;
use super::extract::{idempotency_scope, too_large};
use crate::app::AppState;
use crate::batch::Batcher;
use crate::store::{
    IdempotencyBegin, IdempotencyClaim, IdempotencyDone, Store, StoreResult, StoredResponse,
    abandon_claims_after, per_request,
};
use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::Instrument;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Routes that claim their request's key themselves, in the transaction that commits what the
/// request does, and remember their answers with it (a join: [`crate::presales::Joins`]; a
/// signup). Why: the key's claim and the answer then cost no commits of their own, and a crash
/// between the commit and the answer can't leave the key to run the request again (a second
/// pledge, a second subscription billed every week). As Stripe does, a request refused before
/// it commits (a 422) leaves its key unused.
const ROUTES_CLAIMING_THEIR_KEY: &[&str] =
    &["/api/v1/campaigns/{id}/pledges", "/api/v1/subscriptions"];

/// A request's key as this layer checked it, for a route that claims it itself
/// ([`ROUTES_CLAIMING_THEIR_KEY`]); a request extension.
#[derive(Debug, Clone)]
pub struct UnclaimedKey(pub IdempotencyClaim);

/// What makes two requests under one key the same request: method, path and query, body.
pub fn request_hash(method: &Method, path_and_query: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_str());
    h.update([0]);
    h.update(path_and_query);
    h.update([0]);
    h.update(body);
    hex::encode(h.finalize())
}

/// The remembered `answer` to a key, sent again.
pub fn replayed(answer: StoredResponse) -> Response {
    let StoredResponse {
        status,
        content_type,
        body,
    } = answer;
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

/// A JSON answer as a route that claims its own key remembers it, replayed byte for byte.
pub fn remembered_json(status: StatusCode, body: &impl serde::Serialize) -> StoredResponse {
    StoredResponse {
        status: status.as_u16(),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(body).expect("an answer serializes"),
    }
}

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
                        store
                            .idempotency_begin(&claims, now, abandon_claims_after())
                            .await,
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
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    // Why on a task of its own: a client that hangs up drops its request's future wherever it
    // stands, which could cut a write between two of its commits, or between its commit and
    // the remembering of its key's answer (then a retry runs it again). Spawned, it runs to the
    // end whether or not anyone still listens.
    let task = tokio::spawn(
        async move {
            let key = (req.method() == Method::POST)
                .then(|| req.headers().get(&IDEMPOTENCY_KEY).cloned())
                .flatten();
            let Some(key) = key else {
                return next.run(req).await;
            };
            match run_once(&state, key, req, next).await {
                Ok(response) | Err(response) => response,
            }
        }
        .in_current_span(),
    );
    task.await
        .unwrap_or_else(|e| ApiError::internal(&e).into_response())
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
    let request_hash = request_hash(
        &parts.method,
        parts.uri.path_and_query().map_or("", |p| p.as_str()),
        &body,
    );
    let store = &state.store;
    let claim = IdempotencyClaim {
        scope: scope.clone(),
        key: key.clone(),
        request_hash,
    };
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    if route.is_some_and(|r| ROUTES_CLAIMING_THEIR_KEY.contains(&r)) {
        parts.extensions.insert(UnclaimedKey(claim));
        return Ok(next.run(Request::from_parts(parts, Body::from(body))).await);
    }
    let begin = state
        .idempotency
        .begin
        .call((claim.clone(), state.clock.now()))
        .await
        .map_err(|e| ApiError::internal(&e).into_response())?
        .map_err(|e| ApiError::from(e).into_response())?;
    match begin {
        IdempotencyBegin::Run => {}
        IdempotencyBegin::Replay(answer) => return Ok(replayed(answer)),
        IdempotencyBegin::InFlight => return Err(ApiError::key_in_flight().into_response()),
        IdempotencyBegin::Mismatch => return Err(ApiError::key_reused().into_response()),
    }

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
        provisional: false,
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
