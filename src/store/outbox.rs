//! The email outbox: rows written with their cause (see [`enqueue_email!`]), read and marked by
//! the `outbox-deliver` job, listed for ops.

use super::{Store, StoreResult};
use serde::Serialize;

/// The job that delivers the outbox (woken when an email is enqueued).
pub const OUTBOX_JOB: &str = "outbox-deliver";

/// `SELECT` of an [`OutboxRow`]'s columns `FROM outbox`, for a statement to go on from.
macro_rules! select_emails {
    () => {
        "SELECT id, template, entity, event, to_addr, subject, text_body, html_body, status,
                attempts, next_attempt_at, last_error, created_at, sent_at
         FROM outbox "
    };
}

/// The outbox's queue: up to `$2` pending emails due by `$1`, oldest first, read through the
/// partial `outbox_pending` index (the store's `poll_plans` test checks it).
pub(super) const DUE_EMAILS: &str = concat!(
    select_emails!(),
    "WHERE status = 'pending' AND next_attempt_at <= $1
     ORDER BY next_attempt_at, id LIMIT $2"
);

/// How many emails are pending and the oldest one's `created_at`, read through the partial
/// `outbox_pending` index (the store's `poll_plans` test checks it).
pub(super) const PENDING_EMAILS: &str =
    "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE status = 'pending'";

/// How many emails gave up, read through the partial `outbox_failed` index (checked too).
pub(super) const FAILED_EMAILS: &str = "SELECT COUNT(*) FROM outbox WHERE status = 'failed'";

/// The newest `$1` emails that gave up, through the same index (checked too).
pub(super) const LATEST_FAILED_EMAILS: &str = concat!(
    select_emails!(),
    "WHERE status = 'failed' ORDER BY id DESC LIMIT $1"
);

/// An email to enqueue, already rendered.
#[derive(Debug, Clone)]
pub struct NewEmail {
    pub template: String,
    pub entity: String,
    pub event: String,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub attachments: Vec<NewAttachment>,
}

#[derive(Debug, Clone)]
pub struct NewAttachment {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
}

/// An outbox row as stored.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub template: String,
    pub entity: String,
    pub event: String,
    pub to_addr: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
}

impl Store {
    /// Enqueues one email on its own (for causes that have no other row to write, such as an
    /// ops alert). Returns whether it was new.
    pub async fn enqueue_email(&self, email: &NewEmail, now: i64) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            let new = enqueue_email!(tx, email, now);
            tx.commit().await?;
            Ok(new)
        })
    }

    /// Pending emails due by `now`, oldest first.
    pub async fn due_emails(&self, now: i64, limit: i64) -> StoreResult<Vec<OutboxRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(DUE_EMAILS)
                .bind(now)
                .bind(limit)
                .fetch_all(pool)
                .await?
        }))
    }

    /// The attachments of one email.
    pub async fn email_attachments(&self, outbox_id: i64) -> StoreResult<Vec<NewAttachment>> {
        let rows: Vec<(String, String, Vec<u8>)> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT filename, content_type, content FROM outbox_attachments WHERE outbox_id = $1",
            )
            .bind(outbox_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(filename, content_type, content)| NewAttachment {
                filename,
                content_type,
                content,
            })
            .collect())
    }

    /// Marks a pending email sent; false if it was not pending (already handled).
    pub async fn mark_email_sent(&self, id: i64, now: i64) -> StoreResult<bool> {
        let n = on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE outbox SET status = 'sent', sent_at = $2, attempts = attempts + 1, last_error = NULL
                 WHERE id = $1 AND status = 'pending'",
            )
            .bind(id)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Records a failed attempt: retried at `retry_at`, or `failed` for good when `None`.
    pub async fn mark_email_attempt_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: Option<i64>,
    ) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2,
                        status = CASE WHEN $3 IS NULL THEN 'failed' ELSE 'pending' END,
                        next_attempt_at = COALESCE($3, next_attempt_at)
                 WHERE id = $1 AND status = 'pending'",
            )
            .bind(id)
            .bind(error)
            .bind(retry_at)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(())
    }

    /// One email by id.
    pub async fn email(&self, id: i64) -> StoreResult<Option<OutboxRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(select_emails!(), "WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Emails newest first, optionally to one address.
    pub async fn outbox(
        &self,
        to: Option<&str>,
        limit: i64,
        before_id: Option<i64>,
    ) -> StoreResult<Vec<OutboxRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                select_emails!(),
                "WHERE ($1 IS NULL OR to_addr = $1) AND ($2 IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ))
            .bind(to)
            .bind(before_id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Emails not yet sent (pending), for the backlog metric.
    pub async fn outbox_backlog(&self) -> StoreResult<i64> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(pool)
                .await?
        }))
    }

    /// What ops need to see of the outbox: the backlog, since when it waits, and the emails
    /// that gave up (each read through a partial index: the sent ones are never read).
    pub async fn outbox_health(&self, failed_shown: i64) -> StoreResult<OutboxHealth> {
        Ok(on_pool!(self, |pool| {
            let (pending, oldest_pending_at): (i64, Option<i64>) =
                sqlx::query_as(PENDING_EMAILS).fetch_one(pool).await?;
            let failed: i64 = sqlx::query_scalar(FAILED_EMAILS).fetch_one(pool).await?;
            let latest_failed = sqlx::query_as(LATEST_FAILED_EMAILS)
                .bind(failed_shown)
                .fetch_all(pool)
                .await?;
            OutboxHealth {
                pending,
                oldest_pending_at,
                failed,
                latest_failed,
            }
        }))
    }

    /// Sends an email that gave up once more, from now (ops, after mending the mail server):
    /// it is pending again with its attempts so far, and the deliverer is woken. `false` when
    /// the email is not `failed` (sent, still pending, or unknown): nothing changes.
    pub async fn retry_failed_email(&self, id: i64, now: i64) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            let retried = sqlx::query(
                "UPDATE outbox SET status = 'pending', next_attempt_at = $2
                 WHERE id = $1 AND status = 'failed'",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if retried {
                wake_deliverer!(tx, now);
            }
            tx.commit().await?;
            Ok(retried)
        })
    }
}

/// The outbox as ops see it (see [`Store::outbox_health`]).
#[derive(Debug, Clone)]
pub struct OutboxHealth {
    /// Emails waiting for their first or next attempt.
    pub pending: i64,
    /// When the oldest of them was written.
    pub oldest_pending_at: Option<i64>,
    /// Emails that gave up after their retries.
    pub failed: i64,
    /// The newest of those, newest first.
    pub latest_failed: Vec<OutboxRow>,
}
