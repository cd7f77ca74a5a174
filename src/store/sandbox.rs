//! The sandbox gateway's own record (`sandbox_payments`): what "the bank" saw. Each method is
//! its own transaction, never part of a caller's, because the sandbox stands in for a system
//! outside ours.

use super::{Store, StoreResult};
use serde::Serialize;

/// One charge or refund as the sandbox recorded it (one row per idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct SandboxPaymentRow {
    /// Listing order; assigned by the database (ignored on insert).
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub idempotency_key: String,
    pub customer: String,
    pub payment_method: Option<String>,
    pub charge_id: Option<String>,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub decline_reason: Option<String>,
    pub refunded_minor: i64,
    pub calls: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Why a sandbox refund was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxRefund {
    Recorded,
    /// Another call with the same key won the race; read the key again.
    KeyTaken,
    /// No succeeded charge with that id and currency, or not enough left on it.
    Refused,
}

macro_rules! sandbox_columns {
    () => {
        "seq, id, kind, idempotency_key, customer, payment_method, charge_id, amount_minor,
         currency, status, decline_reason, refunded_minor, calls, created_at, updated_at"
    };
}

impl Store {
    /// The sandbox's row for `(kind, key)`, if that key was ever used.
    pub async fn sandbox_payment_by_key(
        &self,
        kind: &str,
        key: &str,
    ) -> StoreResult<Option<SandboxPaymentRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                sandbox_columns!(),
                " FROM sandbox_payments WHERE kind = $1 AND idempotency_key = $2"
            ))
            .bind(kind)
            .bind(key)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Records first calls with new keys, in one statement; each answer is `false` when that
    /// key was taken already (by an earlier call, or earlier in `rows`).
    pub async fn sandbox_insert(&self, rows: &[SandboxPaymentRow]) -> StoreResult<Vec<bool>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let json = super::json_array(rows.iter().map(|r| {
            (
                &r.id,
                &r.kind,
                &r.idempotency_key,
                &r.customer,
                &r.payment_method,
                &r.charge_id,
                r.amount_minor,
                &r.currency,
                &r.status,
                &r.decline_reason,
                r.refunded_minor,
                r.calls,
                r.created_at,
                r.updated_at,
            )
        }));
        let ids: Vec<String> = on_writer!(self, |pool| {
            let sql = format!(
                "INSERT INTO sandbox_payments (id, kind, idempotency_key, customer, payment_method,
                     charge_id, amount_minor, currency, status, decline_reason, refunded_minor,
                     calls, created_at, updated_at)
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5,
                     CAST(value->>6 AS BIGINT), value->>7, value->>8, value->>9,
                     CAST(value->>10 AS BIGINT), CAST(value->>11 AS BIGINT),
                     CAST(value->>12 AS BIGINT), CAST(value->>13 AS BIGINT)
                 FROM {} WHERE true
                 ON CONFLICT (kind, idempotency_key) DO NOTHING RETURNING id",
                super::json_rows(pool, 1)
            );
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(&json)
                .fetch_all(pool)
                .await?
        });
        let inserted: std::collections::HashSet<String> = ids.into_iter().collect();
        Ok(rows.iter().map(|r| inserted.contains(&r.id)).collect())
    }

    /// Re-decides an unsuccessful charge on a later call with the same key, if nobody changed
    /// the row since `seen_calls` (optimistic: `false` means read it again).
    pub async fn sandbox_redecide(
        &self,
        id: &str,
        seen_calls: i64,
        status: &str,
        method: &str,
        decline_reason: Option<&str>,
        now: i64,
    ) -> StoreResult<bool> {
        let done = on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE sandbox_payments
                 SET status = $3, payment_method = $4, decline_reason = $5, calls = calls + 1,
                     updated_at = $6
                 WHERE id = $1 AND calls = $2 AND status <> 'succeeded'",
            )
            .bind(id)
            .bind(seen_calls)
            .bind(status)
            .bind(method)
            .bind(decline_reason)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// Counts a replayed call (a key whose answer is already decided).
    pub async fn sandbox_replayed(&self, id: &str, now: i64) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE sandbox_payments SET calls = calls + 1, updated_at = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }

    /// Records a refund: takes the amount off its charge (guarded so nothing is ever refunded
    /// beyond what the charge has left) and inserts the refund row, in one transaction.
    pub async fn sandbox_refund(&self, refund: &SandboxPaymentRow) -> StoreResult<SandboxRefund> {
        in_tx!(self, |tx| {
            let taken = sqlx::query(
                "UPDATE sandbox_payments SET refunded_minor = refunded_minor + $2, updated_at = $4
                 WHERE id = $1 AND kind = 'charge' AND status = 'succeeded' AND currency = $3
                   AND refunded_minor + $2 <= amount_minor",
            )
            .bind(&refund.charge_id)
            .bind(refund.amount_minor)
            .bind(&refund.currency)
            .bind(refund.created_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if taken == 0 {
                return Ok(SandboxRefund::Refused);
            }
            let inserted = sqlx::query(
                "INSERT INTO sandbox_payments (id, kind, idempotency_key, customer, payment_method,
                     charge_id, amount_minor, currency, status, decline_reason, refunded_minor,
                     calls, created_at, updated_at)
                 SELECT $1, 'refund', $2, customer, NULL, id, $3, currency, 'succeeded', NULL, 0,
                        1, $4, $4
                 FROM sandbox_payments WHERE id = $5
                 ON CONFLICT (kind, idempotency_key) DO NOTHING",
            )
            .bind(&refund.id)
            .bind(&refund.idempotency_key)
            .bind(refund.amount_minor)
            .bind(refund.created_at)
            .bind(&refund.charge_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                // Dropping the transaction rolls the charge's refunded amount back.
                return Ok(SandboxRefund::KeyTaken);
            }
            tx.commit().await?;
            Ok(SandboxRefund::Recorded)
        })
    }

    /// The sandbox's record, newest first, optionally for one customer; `after` is a `seq`.
    pub async fn sandbox_payments(
        &self,
        customer: Option<&str>,
        after: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<SandboxPaymentRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                sandbox_columns!(),
                " FROM sandbox_payments
                 WHERE ($1 IS NULL OR customer = $1) AND ($2 IS NULL OR seq < $2)
                 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(customer)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }
}
