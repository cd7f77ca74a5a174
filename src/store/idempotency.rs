//! `Idempotency-Key` records: claim a key, remember the first response, replay it.
//!
//! The primary key `(scope, idem_key)` decides races: of two concurrent requests with the same
//! key, exactly one inserts the row and runs; the other sees it in flight.

use super::{Store, StoreResult, micros};
use chrono::{DateTime, Utc};

/// What a request carrying an `Idempotency-Key` should do.
#[derive(Debug, PartialEq, Eq)]
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
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    request_hash: String,
    status_code: Option<i64>,
    content_type: Option<String>,
    response_body: Option<Vec<u8>>,
    created_at: i64,
}

impl Store {
    /// Claims each `(scope, key)` for a request whose hash is `request_hash`, all in one
    /// transaction (group commit); answers in order. Of two claims of one key in the batch, the
    /// first runs and the second sees it in flight.
    ///
    /// A claim left in flight for longer than `abandon_after` (its process died between
    /// claiming and answering) may be taken over, so a crash never blocks a key forever.
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
            // New keys, the common case, are claimed with one multi-row insert per chunk.
            let mut claimed = std::collections::HashSet::new();
            for chunk in claims.chunks(super::rows_per_statement(3)) {
                let values = super::value_rows(2, chunk.len(), 3, "$1");
                let sql = format!(
                    "INSERT INTO idempotency_keys (scope, idem_key, request_hash, created_at)
                     VALUES {} ON CONFLICT (scope, idem_key) DO NOTHING
                     RETURNING scope, idem_key",
                    values
                );
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(micros(now));
                for c in chunk {
                    q = q.bind(&c.scope).bind(&c.key).bind(&c.request_hash);
                }
                let rows: Vec<(String, String)> = q.fetch_all(&mut *tx).await?;
                claimed.extend(rows);
            }
            let mut outcomes = Vec::with_capacity(claims.len());
            for claim in claims {
                // The first claim of a new key runs; any other is judged against the row.
                if claimed.remove(&(claim.scope.clone(), claim.key.clone())) {
                    outcomes.push(IdempotencyBegin::Run);
                    continue;
                }
                let row: KeyRow = sqlx::query_as(
                    "SELECT request_hash, status_code, content_type, response_body, created_at
                     FROM idempotency_keys WHERE scope = $1 AND idem_key = $2",
                )
                .bind(&claim.scope)
                .bind(&claim.key)
                .fetch_one(&mut *tx)
                .await?;
                outcomes.push(if row.request_hash != claim.request_hash {
                    IdempotencyBegin::Mismatch
                } else if let Some(status) = row.status_code {
                    IdempotencyBegin::Replay(StoredResponse {
                        status: u16::try_from(status).unwrap_or(500),
                        content_type: row.content_type,
                        body: row.response_body.unwrap_or_default(),
                    })
                } else if row.created_at < micros(now - abandon_after) {
                    // Guarded on the old created_at: of two takers, one wins.
                    let taken = sqlx::query(
                        "UPDATE idempotency_keys SET created_at = $3
                         WHERE scope = $1 AND idem_key = $2 AND status_code IS NULL
                           AND created_at = $4",
                    )
                    .bind(&claim.scope)
                    .bind(&claim.key)
                    .bind(micros(now))
                    .bind(row.created_at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if taken == 1 {
                        IdempotencyBegin::Run
                    } else {
                        IdempotencyBegin::InFlight
                    }
                } else {
                    IdempotencyBegin::InFlight
                });
            }
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
        on_writer!(self, |pool| {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 AND status_code IS NULL",
            )
            .bind(scope)
            .bind(key)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(())
    }
}
