//! `Idempotency-Key` records: claim a key, remember the first response, replay it.
//!
//! The primary key `(scope, idem_key)` decides races: of two concurrent requests with the same
//! key, exactly one inserts the row and runs; the other sees it in flight. Claims are written
//! by `claim_keys!` (in `store/mod.rs`), so a route may claim inside its own transaction.

use super::{Store, StoreResult};
use chrono::{DateTime, Utc};

/// A claim in flight for longer than this is taken to belong to a request that died mid-way.
pub fn abandon_claims_after() -> chrono::Duration {
    chrono::Duration::minutes(5)
}

/// A provisional answer ([`IdempotencyDone::provisional`]) is replayed only once its claim is
/// this old. Before, its request is likely still running (a join waiting on the gateway, and
/// its quick retries), and a retry under the key is told so (409) rather than shown a pending
/// pledge that the deposit's decline is about to take back.
pub fn replay_provisional_answers_after() -> chrono::Duration {
    chrono::Duration::seconds(30)
}

/// What a request carrying an `Idempotency-Key` should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key is new (or its earlier attempt was abandoned): run the request.
    Run,
    /// The same request already completed: send this response again.
    Replay(StoredResponse),
    /// The same key is still being processed by another request.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
}

/// A request claiming its key.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub scope: String,
    pub key: String,
    pub request_hash: String,
}

/// A response as remembered for a key, replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// The response to remember for a key.
#[derive(Debug, Clone)]
pub struct IdempotencyDone {
    pub scope: String,
    pub key: String,
    pub response: StoredResponse,
    /// Remembered before the request ended, in case it never does (a join's pending pledge,
    /// written with the pledge before its deposit is charged); replaced by the final answer.
    pub provisional: bool,
}

/// A key's row as a later claim judges it.
#[derive(sqlx::FromRow)]
pub(crate) struct KeyRow {
    request_hash: String,
    status_code: Option<i64>,
    content_type: Option<String>,
    response_body: Option<Vec<u8>>,
    provisional: bool,
    pub(crate) created_at: i64,
}

impl KeyRow {
    /// What a claim of this key with `request_hash` should do; `None` when the claim may take
    /// the key over (still in flight, but claimed before `abandoned_before`). A provisional
    /// answer claimed after `provisional_before` is still in flight.
    pub(crate) fn judge(
        self,
        request_hash: &str,
        abandoned_before: i64,
        provisional_before: i64,
    ) -> Option<IdempotencyBegin> {
        if self.request_hash != request_hash {
            Some(IdempotencyBegin::Mismatch)
        } else if self.provisional && self.created_at > provisional_before {
            Some(IdempotencyBegin::InFlight)
        } else if let Some(status) = self.status_code {
            Some(IdempotencyBegin::Replay(StoredResponse {
                status: u16::try_from(status).unwrap_or(500),
                content_type: self.content_type,
                body: self.response_body.unwrap_or_default(),
            }))
        } else if self.created_at < abandoned_before {
            None
        } else {
            Some(IdempotencyBegin::InFlight)
        }
    }
}

impl Store {
    /// Claims each `(scope, key)` for a request whose hash is `request_hash`, all in one
    /// transaction (group commit); answers in order (see `claim_keys!`).
    pub async fn idempotency_begin(
        &self,
        claims: &[IdempotencyClaim],
        now: DateTime<Utc>,
        abandon_after: chrono::Duration,
    ) -> StoreResult<Vec<IdempotencyBegin>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        in_tx!(self, |tx| {
            let claims: Vec<&IdempotencyClaim> = claims.iter().collect();
            let outcomes = claim_keys!(tx, &claims, now, abandon_after);
            tx.commit().await?;
            Ok(outcomes)
        })
    }

    /// Records the responses of requests that ran under their keys.
    pub async fn idempotency_complete(&self, done: &[IdempotencyDone]) -> StoreResult<()> {
        on_writer!(self, |pool| remember_responses!(pool, done));
        Ok(())
    }

    /// Forgets an in-flight claim whose outcome should not be replayed (a server error, a
    /// conflict that may clear), so the client may retry with the same key.
    pub async fn idempotency_release(&self, scope: &str, key: &str) -> StoreResult<()> {
        in_tx!(self, |tx| {
            release_keys!(tx, &[(scope, key)]);
            tx.commit().await?;
        });
        Ok(())
    }
}
