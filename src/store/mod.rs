//! Storage: one [`Store`] over SQLite or PostgreSQL that the rest of the service uses without
//! knowing which.
//!
//! sqlx's `Any` driver cannot carry decimals or timestamps, so each backend keeps its native
//! pool and every query is written once as SQL both dialects read the same way (`$1…$N`
//! placeholders, `ON CONFLICT`, `RETURNING`), expanded for both pools by [`on_pool!`] and
//! [`in_tx!`]. Columns are restricted to TEXT, BIGINT/INTEGER, BOOLEAN and bytes, which both
//! backends decode into the same Rust types; instants are microseconds since the Unix epoch
//! and money is minor units (see the first migration). Dialect differences, when a query needs
//! one, live in the module that owns the query, side by side, named by backend; the one
//! shared difference is `Dialect`: batches of rows travel as one JSON array parameter, read
//! as a table with `json_rows`, so one statement writes a batch of any size.

use crate::config::DatabaseUrl;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Runs `$body` once per backend with `$pool` bound to that backend's pool.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.db {
            $crate::store::Db::Sqlite($pool) => $body,
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}

/// Runs the single-statement write `$body` with `$pool` bound to the backend's writer: on
/// SQLite the one writer connection [`in_tx!`] uses, so writes queue in the process rather
/// than in SQLite's busy handler.
macro_rules! on_writer {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.db {
            $crate::store::Db::Sqlite(pool) => {
                let $pool = $store.sqlite_writer.as_ref().unwrap_or(pool);
                $body
            }
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` inside a write transaction bound to `$tx`; the body commits it.
///
/// SQLite transactions run on the one writer connection, queued in order in the process (a
/// writer waiting on SQLite's own lock would sleep in its busy handler, which under load costs
/// more than the writes), and start with `BEGIN IMMEDIATE` so the lock is taken up front.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {
        match &$store.db {
            $crate::store::Db::Sqlite(pool) => {
                let writer = $store.sqlite_writer.as_ref().unwrap_or(pool);
                #[allow(unused_mut)]
                let mut $tx = writer.begin_with("BEGIN IMMEDIATE").await?;
                $body
            }
            $crate::store::Db::Postgres(pool) => {
                #[allow(unused_mut)]
                let mut $tx = pool.begin().await?;
                $body
            }
        }
    };
}

/// Inserts a pending run of sweep job `$job` at the instant `$at` (µs), inside the caller's
/// transaction (`$exec` is `&mut *tx`), so a business deadline fires on time rather than at the
/// next poll. Equal instants merge on `(job_name, scheduled_for)`.
#[allow(unused_macros)]
macro_rules! schedule_timer {
    ($exec:expr, $job:expr, $at:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO job_runs (job_name, scheduled_for, trigger, state, exclusive, due_at, created_at)
             SELECT name, $2, 'timer', 'pending', overlap_policy = 'skip', $2, $3
             FROM job_defs WHERE name = $1
             ON CONFLICT (job_name, scheduled_for) DO NOTHING",
        )
        .bind($job)
        .bind($at)
        .bind($now)
        .execute($exec)
    };
}

/// Wakes `outbox-deliver` now, inside the caller's transaction (`$tx`), unless a pending run
/// that will see the new outbox rows exists.
macro_rules! wake_deliverer {
    ($tx:ident, $now:expr) => {
        sqlx::query(
            "INSERT INTO job_runs (job_name, scheduled_for, trigger, state, exclusive, due_at, created_at)
             SELECT name, $2, 'timer', 'pending', overlap_policy = 'skip', $2, $2
             FROM job_defs WHERE name = $1 AND NOT EXISTS (
                 SELECT 1 FROM job_runs r
                 WHERE r.job_name = $1 AND r.state = 'pending' AND r.due_at <= $2)
             ON CONFLICT (job_name, scheduled_for) DO NOTHING",
        )
        .bind($crate::store::OUTBOX_JOB)
        .bind($now)
        .execute(&mut *$tx)
        .await?
    };
}

/// Writes emails (`$emails`: `&[&NewEmail]`) to the outbox inside the caller's transaction
/// (`$tx`), skipping keys already used: those without attachments (nearly all) with one
/// statement and one wake-up of the deliverer, the rest one at a time.
macro_rules! enqueue_emails {
    ($tx:ident, $emails:expr, $now:expr) => {{
        let emails: &[&$crate::store::NewEmail] = $emails;
        let now: i64 = $now;
        let (emails, attached): (Vec<&$crate::store::NewEmail>, Vec<&$crate::store::NewEmail>) =
            emails.iter().partition(|e| e.attachments.is_empty());
        for email in attached {
            let _new = enqueue_email!($tx, email, now);
        }
        if !emails.is_empty() {
            let sql = format!(
                "INSERT INTO outbox (template, entity, event, to_addr, subject, text_body,
                     html_body, status, next_attempt_at, created_at)
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5,
                     value->>6, 'pending', $2, $2
                 FROM {} WHERE true
                 ON CONFLICT (template, entity, event) DO NOTHING",
                $crate::store::json_rows(&$tx, 1)
            );
            let json = $crate::store::json_array(emails.iter().map(|e| {
                (
                    &e.template,
                    &e.entity,
                    &e.event,
                    &e.to,
                    &e.subject,
                    &e.text,
                    &e.html,
                )
            }));
            let written = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(json)
                .bind(now)
                .execute(&mut *$tx)
                .await?
                .rows_affected();
            if written > 0 {
                wake_deliverer!($tx, now);
            }
        }
    }};
}

/// Writes an email to the outbox inside the caller's transaction (`$tx`), with its
/// attachments, and wakes `outbox-deliver` unless a pending run will already see it. Evaluates
/// to whether the email is new (its `(template, entity, event)` key had not been used).
macro_rules! enqueue_email {
    ($tx:ident, $email:expr, $now:expr) => {{
        let email: &$crate::store::NewEmail = $email;
        let now: i64 = $now;
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO outbox (template, entity, event, to_addr, subject, text_body, html_body,
                                 status, next_attempt_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $8)
             ON CONFLICT (template, entity, event) DO NOTHING
             RETURNING id",
        )
        .bind(&email.template)
        .bind(&email.entity)
        .bind(&email.event)
        .bind(&email.to)
        .bind(&email.subject)
        .bind(&email.text)
        .bind(&email.html)
        .bind(now)
        .fetch_optional(&mut *$tx)
        .await?;
        if let Some(id) = id {
            for a in &email.attachments {
                sqlx::query(
                    "INSERT INTO outbox_attachments (outbox_id, filename, content_type, content)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(id)
                .bind(&a.filename)
                .bind(&a.content_type)
                .bind(&a.content)
                .execute(&mut *$tx)
                .await?;
            }
            wake_deliverer!($tx, now);
        }
        id.is_some()
    }};
}

/// Posts a balanced [`JournalEntry`](crate::domain::ledger::JournalEntry) inside the caller's
/// transaction (`$tx`): lines first, then the entry row, which the database refuses unless its
/// lines sum to zero. Posts nothing when the entry's `(cause, event)` was already booked.
macro_rules! post_entry {
    ($tx:ident, $entry:expr, $now:expr) => {{
        let entry: &$crate::domain::ledger::JournalEntry = $entry;
        let booked: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM ledger_entries WHERE cause_type = $1 AND cause_id = $2 AND event = $3",
        )
        .bind(entry.cause_type)
        .bind(&entry.cause_id)
        .bind(entry.event)
        .fetch_optional(&mut *$tx)
        .await?;
        if booked.is_none() {
            let id = $crate::ids::new_id("je");
            for (line_no, line) in entry.lines.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO ledger_lines (entry_id, line_no, account, shopper_id, amount_minor)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&id)
                .bind(line_no as i64)
                .bind(line.account.as_str())
                .bind(&line.shopper_id)
                .bind(line.amount_minor)
                .execute(&mut *$tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO ledger_entries (id, currency, cause_type, cause_id, event, memo, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&id)
            .bind(entry.currency.code())
            .bind(entry.cause_type)
            .bind(&entry.cause_id)
            .bind(entry.event)
            .bind(&entry.memo)
            .bind($now)
            .execute(&mut *$tx)
            .await?;
        }
    }};
}

/// Posts new balanced entries (`$entries`: `&[JournalEntry]`) inside the caller's transaction
/// with two statements: lines first, then the entry rows, which the database refuses unless
/// their lines sum to zero. For causes whose entries cannot have been booked yet (guarded by
/// the caller); a repeat fails on the `(cause, event)` key.
macro_rules! post_entries {
    ($tx:ident, $entries:expr, $now:expr) => {{
        let entries: &[$crate::domain::ledger::JournalEntry] = $entries;
        if !entries.is_empty() {
            let ids: Vec<String> = entries.iter().map(|_| $crate::ids::new_id("je")).collect();
            let lines = $crate::store::json_array(entries.iter().zip(&ids).flat_map(|(e, id)| {
                e.lines.iter().enumerate().map(move |(n, l)| {
                    (id, n, l.account.as_str(), &l.shopper_id, l.amount_minor)
                })
            }));
            let sql = format!(
                "INSERT INTO ledger_lines (entry_id, line_no, account, shopper_id, amount_minor)
                 SELECT value->>0, CAST(value->>1 AS BIGINT), value->>2, value->>3,
                     CAST(value->>4 AS BIGINT)
                 FROM {}",
                $crate::store::json_rows(&$tx, 1)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(lines)
                .execute(&mut *$tx)
                .await?;
            let rows = $crate::store::json_array(ids.iter().zip(entries).map(|(id, e)| {
                (id, e.currency.code(), e.cause_type, &e.cause_id, e.event, &e.memo)
            }));
            let sql = format!(
                "INSERT INTO ledger_entries (id, currency, cause_type, cause_id, event, memo,
                     created_at)
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, $2
                 FROM {}",
                $crate::store::json_rows(&$tx, 1)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(rows)
                .bind($now)
                .execute(&mut *$tx)
                .await?;
        }
    }};
}

/// Commits a payment intent ([`NewIntent`]) inside the caller's transaction, pending, to be
/// sent after the commit. Evaluates to `false` when its idempotency key already names one.
macro_rules! insert_intent {
    ($tx:ident, $intent:expr, $now:expr) => {{
        let intent: &$crate::store::NewIntent = $intent;
        sqlx::query(
            "INSERT INTO payment_intents (id, idempotency_key, kind, purpose, subject_id, shopper_id,
                 amount_minor, currency, account, refund_of, status, next_attempt_at, memo, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', $11, $12, $13)
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(&intent.id)
        .bind(&intent.idempotency_key)
        .bind(intent.kind)
        .bind(intent.purpose)
        .bind(&intent.subject_id)
        .bind(&intent.shopper_id)
        .bind(intent.amount.minor())
        .bind(intent.amount.currency().code())
        .bind(intent.account.as_str())
        .bind(&intent.refund_of)
        .bind(intent.first_sweep_at)
        .bind(&intent.memo)
        .bind($now)
        .execute(&mut *$tx)
        .await?
        .rows_affected()
            == 1
    }};
}

/// The columns of an [`IntentRow`], in its field order.
macro_rules! intent_columns {
    () => {
        "seq, id, idempotency_key, kind, purpose, subject_id, shopper_id, amount_minor, currency,
         account, refund_of, refunded_minor, status, attempts, next_attempt_at, gateway_ref,
         payment_method, decline_reason, last_error, memo, created_at, resolved_at"
    };
}

/// Commits many pending intents (`$intents`: `&[&NewIntent]`) with one statement inside the
/// caller's transaction, each with its first attempt already taken (held until
/// `first_sweep_at`, as `Store::begin_intent_attempts` would), and evaluates to the rows
/// inserted (keys already used are skipped). Every caller sends them right after its commit,
/// which saves the separate commit that would take them.
///
/// Only `seq` and `id` come back: the rest of each row is what was sent
/// ([`IntentRow::begun`]). Every value a statement returns is copied and handed across to
/// this task one by one, which cost SQLite's renewal more than inserting the row did.
macro_rules! insert_begun_intents {
    ($tx:ident, $intents:expr, $now:expr) => {{
        let intents: &[&$crate::store::NewIntent] = $intents;
        let now: i64 = $now;
        let sql = format!(
            "INSERT INTO payment_intents (id, idempotency_key, kind, purpose, subject_id,
                 shopper_id, amount_minor, currency, account, refund_of, next_attempt_at,
                 memo, created_at, status, attempts)
             SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5,
                 CAST(value->>6 AS BIGINT), value->>7, value->>8, value->>9,
                 CAST(value->>10 AS BIGINT), value->>11, $2, 'pending', 1
             FROM {} WHERE true
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING seq, id",
            $crate::store::json_rows(&$tx, 1)
        );
        let json = $crate::store::json_array(intents.iter().map(|i| {
            (
                &i.id,
                &i.idempotency_key,
                i.kind,
                i.purpose,
                &i.subject_id,
                &i.shopper_id,
                i.amount.minor(),
                i.amount.currency().code(),
                i.account.as_str(),
                &i.refund_of,
                i.first_sweep_at,
                &i.memo,
            )
        }));
        let inserted: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(json)
            .bind(now)
            .fetch_all(&mut *$tx)
            .await?;
        let by_id: std::collections::HashMap<&str, &$crate::store::NewIntent> =
            intents.iter().map(|i| (i.id.as_str(), *i)).collect();
        let rows: Vec<$crate::store::IntentRow> = inserted
            .into_iter()
            .filter_map(|(seq, id)| {
                Some($crate::store::IntentRow::begun(
                    by_id.get(id.as_str())?,
                    seq,
                    now,
                ))
            })
            .collect();
        rows
    }};
}

/// Remembers the responses of requests that ran under their `Idempotency-Key`s, on `$exec` (a
/// pool, or `&mut *tx` to write them with the state they describe). Multi-row `VALUES`, chunked:
/// the bodies are bytes, which a JSON array can't carry.
macro_rules! remember_responses {
    ($exec:expr, $done:expr) => {{
        let done: &[$crate::store::IdempotencyDone] = $done;
        for chunk in done.chunks($crate::store::rows_per_statement(6)) {
            let sql = format!(
                "UPDATE idempotency_keys
                 SET status_code = v.column3, content_type = v.column4, response_body = v.column5,
                     provisional = v.column6
                 FROM (VALUES {}) AS v
                 WHERE idempotency_keys.scope = v.column1 AND idempotency_keys.idem_key = v.column2",
                $crate::store::value_rows(1, chunk.len(), 6, "")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for d in chunk {
                q = q
                    .bind(&d.scope)
                    .bind(&d.key)
                    .bind(i64::from(d.response.status))
                    .bind(&d.response.content_type)
                    .bind(&d.response.body)
                    .bind(d.provisional);
            }
            q.execute($exec).await?;
        }
    }};
}

/// Claims each `(scope, key)` of `$claims` (`&[&IdempotencyClaim]`) inside the caller's
/// transaction (`$tx`) at `$now` (a `DateTime<Utc>`); evaluates to one [`IdempotencyBegin`] per
/// claim, in order. The primary key decides races: of two claims of one new key, the first runs
/// and the second sees it in flight. A claim left in flight for longer than `$abandon_after`
/// (its process died between claiming and answering) may be taken over, so a crash never
/// blocks a key forever.
macro_rules! claim_keys {
    ($tx:ident, $claims:expr, $now:expr, $abandon_after:expr) => {{
        let claims: &[&$crate::store::IdempotencyClaim] = $claims;
        let now: chrono::DateTime<chrono::Utc> = $now;
        // New keys, the common case, are claimed with one multi-row insert per chunk.
        let mut claimed = std::collections::HashSet::new();
        for chunk in claims.chunks($crate::store::rows_per_statement(3)) {
            let values = $crate::store::value_rows(2, chunk.len(), 3, "$1");
            let sql = format!(
                "INSERT INTO idempotency_keys (scope, idem_key, request_hash, created_at)
                 VALUES {} ON CONFLICT (scope, idem_key) DO NOTHING
                 RETURNING scope, idem_key",
                values
            );
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind($crate::store::micros(now));
            for c in chunk {
                q = q.bind(&c.scope).bind(&c.key).bind(&c.request_hash);
            }
            let rows: Vec<(String, String)> = q.fetch_all(&mut *$tx).await?;
            claimed.extend(rows);
        }
        let mut outcomes = Vec::with_capacity(claims.len());
        for claim in claims {
            // The first claim of a new key runs; any other is judged against the row.
            if claimed.remove(&(claim.scope.clone(), claim.key.clone())) {
                outcomes.push($crate::store::IdempotencyBegin::Run);
                continue;
            }
            let row: $crate::store::idempotency::KeyRow = sqlx::query_as(
                "SELECT request_hash, status_code, content_type, response_body, provisional,
                        created_at
                 FROM idempotency_keys WHERE scope = $1 AND idem_key = $2",
            )
            .bind(&claim.scope)
            .bind(&claim.key)
            .fetch_one(&mut *$tx)
            .await?;
            let abandoned_before = $crate::store::micros(now - $abandon_after);
            let provisional_before = $crate::store::micros(
                now - $crate::store::idempotency::replay_provisional_answers_after(),
            );
            let claimed_at = row.created_at;
            outcomes.push(
                match row.judge(&claim.request_hash, abandoned_before, provisional_before) {
                    Some(outcome) => outcome,
                    None => {
                        // Guarded on the old created_at: of two takers, one wins.
                        let taken = sqlx::query(
                            "UPDATE idempotency_keys SET created_at = $3
                         WHERE scope = $1 AND idem_key = $2 AND status_code IS NULL
                           AND created_at = $4",
                        )
                        .bind(&claim.scope)
                        .bind(&claim.key)
                        .bind($crate::store::micros(now))
                        .bind(claimed_at)
                        .execute(&mut *$tx)
                        .await?
                        .rows_affected();
                        if taken == 1 {
                            $crate::store::IdempotencyBegin::Run
                        } else {
                            $crate::store::IdempotencyBegin::InFlight
                        }
                    }
                },
            );
        }
        outcomes
    }};
}

/// Lets go of in-flight claims (`$keys`: `&[(&str, &str)]`, scope and key) inside the caller's
/// transaction (`$tx`): the requests ended without an answer worth replaying, so a retry with
/// the same key runs afresh.
macro_rules! release_keys {
    ($tx:ident, $keys:expr) => {{
        let keys: &[(&str, &str)] = $keys;
        if !keys.is_empty() {
            let sql = format!(
                "DELETE FROM idempotency_keys
                 WHERE (scope, idem_key) IN (SELECT value->>0, value->>1 FROM {})
                   AND status_code IS NULL",
                $crate::store::json_rows(&$tx, 1)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind($crate::store::json_array(keys.iter()))
                .execute(&mut *$tx)
                .await?;
        }
    }};
}

/// Decides a refund inside the caller's transaction: takes its amount off the charge intent
/// named by `refund_of` (guarded, so refunds never exceed the charge), commits the refund
/// intent and books the decision (debit the intent's account, credit `refunds`). Evaluates to
/// `false`, changing nothing, when the charge has not succeeded or has too little left.
macro_rules! decide_refund {
    ($tx:ident, $intent:expr, $now:expr) => {{
        let intent: &$crate::store::NewIntent = $intent;
        let taken = sqlx::query(
            "UPDATE payment_intents SET refunded_minor = refunded_minor + $2
             WHERE id = $1 AND kind = 'charge' AND status = 'succeeded' AND currency = $3
               AND refunded_minor + $2 <= amount_minor",
        )
        .bind(&intent.refund_of)
        .bind(intent.amount.minor())
        .bind(intent.amount.currency().code())
        .execute(&mut *$tx)
        .await?
        .rows_affected()
            == 1;
        if taken && insert_intent!($tx, intent, $now) {
            let entry = $crate::domain::ledger::JournalEntry::transfer(
                ("payment_intent", &intent.id, "refund_decided"),
                format!("{} refund decided", intent.purpose),
                intent.account,
                $crate::domain::ledger::Account::Refunds,
                intent.amount,
                Some(&intent.shopper_id),
            )
            .map_err(|e| $crate::store::StoreError::Inconsistent(e.to_string()))?;
            post_entry!($tx, &entry, $now);
        }
        taken
    }};
}

pub(crate) mod idempotency;
mod identity;
mod outbox;
mod payments;
mod presale;
mod sandbox;
mod scheduler;
mod subscription;

pub use idempotency::{
    IdempotencyBegin, IdempotencyClaim, IdempotencyDone, StoredResponse, abandon_claims_after,
};
pub use identity::TokenSubject;
pub use outbox::{NewAttachment, NewEmail, OUTBOX_JOB, OutboxHealth, OutboxRow};
pub use payments::{
    AccountBalance, FollowUp, IntentFilter, IntentResult, IntentRow, KeyAnswer, LedgerCheck,
    NewIntent,
};
pub use presale::{
    CampaignRow, JoinAttempt, JoinDecision, NewPledge, PledgeContact, PledgeRow, PledgeStep,
    PurchaseOrderRow, QuotePut, QuoteRow, Settlement,
};
pub use sandbox::{SandboxPaymentRow, SandboxRefund};
pub use scheduler::{
    Claimed, JobDefRow, JobRunRow, NewRun, Pruned, RunFilter, SchedulerInstanceRow,
};
pub use subscription::{
    CatalogRow, DeliveryLock, DeliveryRow, GrowerOrderMerge, GrowerOrderRow, InvoiceRow, Locked,
    NewSubscription, PlanRow, SubscriptionRow,
};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error(
        "the database {0} is in use by another pooled process (lock file {1}); stop it first or choose another POOLED_DATA_DIR"
    )]
    Locked(String, String),
    #[error("cannot open the database {url}: {message}")]
    Open { url: String, message: String },
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is inconsistent: {0}")]
    Inconsistent(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A group-committed batch failed; every request in it gets the same error.
    #[error("{0}")]
    Batch(Arc<StoreError>),
}

/// Answers each of `n` batched requests from their batch's result: a failure reaches every
/// caller in the batch.
pub fn per_request<T>(result: StoreResult<Vec<T>>, n: usize) -> Vec<StoreResult<T>> {
    match result {
        Ok(answers) => answers.into_iter().map(Ok).collect(),
        Err(e) => {
            let e = Arc::new(e);
            (0..n).map(|_| Err(StoreError::Batch(e.clone()))).collect()
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The backend's pool. The store matches it through [`on_pool!`], [`on_writer!`] and
/// [`in_tx!`]; the bench matches it to pick its SQL, and writes through
/// [`Store::unqueued_writers`].
#[derive(Clone)]
pub(crate) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Db,
    /// SQLite: the single connection every write transaction uses ([`in_tx!`]).
    pub(crate) sqlite_writer: Option<sqlx::SqlitePool>,
    /// Held until [`Store::close`] or the end of the process: a second `pooled` on the same
    /// SQLite file is refused.
    lock: Option<Arc<File>>,
    /// SQLite: keeps [`spawn_checkpointer`]'s task running while any handle is alive.
    _checkpointer: Option<Arc<oneshot::Sender<()>>>,
}

impl Store {
    /// Opens (creating if needed) the database named by `url`; does not migrate.
    pub async fn connect(url: &DatabaseUrl) -> StoreResult<Store> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            url: url.redacted(),
            message: e.to_string(),
        };
        match url {
            DatabaseUrl::Sqlite(path) => {
                let lock = lock_sqlite_file(path)?;
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    // SQLite's default, set so the checkpointer's frame counts are sizes.
                    .page_size(SQLITE_PAGE_SIZE)
                    .journal_mode(SqliteJournalMode::Wal)
                    // Money lives here: a committed charge must survive power loss.
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
                    // The writer overrides this below. Outside it only the bench writes
                    // ([`Store::unqueued_writers`]), with the threshold every earlier figure
                    // was measured with.
                    .pragma("wal_autocheckpoint", "10000");
                // The readers are query-only: every write of the service goes through the
                // one writer, and one that does not fails instead of contending for SQLite's
                // lock in its busy handler.
                let pool = SqlitePoolOptions::new()
                    .max_connections(SQLITE_READERS)
                    .connect_with(options.clone().pragma("query_only", "ON"))
                    .await
                    .map_err(|e| open_err(&e))?;
                // The writer's page cache holds the indexes batches write into (SQLite's
                // default is 2 MB): at 100,000 subscriptions a renewal otherwise spends half
                // its time reading pages back from the OS. Not more than 8 MB: a commit whose
                // statements split a B-tree page walks the whole cache (SQLite parks a page
                // at the page number past 1 GiB while it reorders siblings, and the commit's
                // truncate of pages past the end then scans every hash slot), which took a
                // tenth of the join writer's time at 64 MB. And its statement journals stay
                // in memory: a multi-row statement in a transaction journals the pages it
                // changes, and past 64 KiB SQLite spilled that journal to a temporary file,
                // a sixth of the join writer's time. Readers journal nothing, and keep
                // SQLite's default so a large sort still spills to disk. The writer does not
                // checkpoint as it commits: [`spawn_checkpointer`] does. When the writer starts
                // the WAL over after a checkpoint, it cuts the file back to 64 MiB: a burst (a
                // renewal, a big transaction) otherwise leaves its high-water mark on disk for
                // good, and 64 MiB is more than the stampede writes between two checkpoints
                // (about 50 MB), so the file is not cut and regrown at every checkpoint.
                let writer = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(
                        options
                            .pragma("cache_size", "-8192")
                            .pragma("temp_store", "memory")
                            .pragma("wal_autocheckpoint", "0")
                            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string()),
                    )
                    .await
                    .map_err(|e| open_err(&e))?;
                let checkpointer = spawn_checkpointer(pool.clone(), writer.clone());
                Ok(Store {
                    db: Db::Sqlite(pool),
                    sqlite_writer: Some(writer),
                    lock: Some(Arc::new(lock)),
                    _checkpointer: Some(checkpointer),
                })
            }
            DatabaseUrl::Postgres(raw) => {
                let options = PgConnectOptions::from_str(raw).map_err(|e| open_err(&e))?;
                let pool = match pg_pool(options.clone()).await {
                    Err(e) if is_missing_database(&e) => {
                        create_pg_database(&options)
                            .await
                            .map_err(|e| open_err(&e))?;
                        pg_pool(options).await
                    }
                    other => other,
                }
                .map_err(|e| open_err(&e))?;
                Ok(Store {
                    db: Db::Postgres(pool),
                    sqlite_writer: None,
                    lock: None,
                    _checkpointer: None,
                })
            }
        }
    }

    /// Applies the backend's migrations (`migrations/sqlite` or `migrations/postgres`).
    pub async fn migrate(&self) -> StoreResult<()> {
        match &self.db {
            Db::Sqlite(pool) => {
                let writer = self.sqlite_writer.as_ref().unwrap_or(pool);
                sqlx::migrate!("migrations/sqlite").run(writer).await?
            }
            Db::Postgres(pool) => sqlx::migrate!("migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    /// Connections that write beside the store's own writer, bypassing its queue, for the
    /// bench's generated data and floors, which measure the database itself. On SQLite a new
    /// pool (the store's readers are query-only), closed when dropped; on PostgreSQL the pool.
    /// The service never writes through it.
    pub(crate) async fn unqueued_writers(&self) -> StoreResult<Db> {
        Ok(match &self.db {
            Db::Sqlite(readers) => {
                let options = (*readers.connect_options())
                    .clone()
                    .pragma("query_only", "OFF");
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(SQLITE_READERS)
                        .connect_with(options)
                        .await?,
                )
            }
            Db::Postgres(pool) => Db::Postgres(pool.clone()),
        })
    }

    /// The rows of `table` whose `id` is one of `ids` (selecting `columns`), keyed by id: one
    /// query, none at all for no ids. The ids travel as one JSON array ([`json_rows`]), so a
    /// statement is the same for any number of them: with one `$N` per id, a chunk of 2,000
    /// was prepared afresh for each new count, at the square of its width.
    pub(crate) async fn rows_by_id<R>(
        &self,
        columns: &str,
        table: &str,
        ids: &[&str],
        id_of: fn(&R) -> &str,
    ) -> StoreResult<std::collections::HashMap<String, R>>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let json = json_array(ids.iter().map(|id| (id,)));
        let rows: Vec<R> = on_pool!(self, |pool| {
            let sql = format!(
                "SELECT {columns} FROM {table} WHERE id IN (SELECT value->>0 FROM {})",
                json_rows(pool, 1)
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&json)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|row| (id_of(&row).to_owned(), row))
            .collect())
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Whether the backend commits one write transaction at a time (SQLite's one writer), so
    /// that a second transaction sent meanwhile only waits, holding its rows.
    pub fn writes_one_at_a_time(&self) -> bool {
        self.sqlite_writer.is_some()
    }

    /// Round-trips a trivial query (readiness).
    pub async fn ping(&self) -> StoreResult<()> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Closes every connection and releases the SQLite file for another process; the store
    /// is unusable afterwards.
    pub async fn close(&self) {
        if let Some(writer) = &self.sqlite_writer {
            writer.close().await;
        }
        on_pool!(self, |pool| pool.close().await);
        // Released here rather than when the last clone drops: background tasks (the batch
        // workers) hold clones until they next run, which would keep a restart out.
        if let Some(lock) = &self.lock {
            let _ = lock.unlock();
        }
    }
}

/// SQLite reader connections, and the bench's writable ones beside them
/// ([`Store::unqueued_writers`]).
const SQLITE_READERS: u32 = 8;

/// How often the SQLite WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The size, in bytes, the SQLite writer cuts the WAL file back to when it starts it over.
pub const WAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// The database's page size, and so the size of one WAL frame: SQLite's default, 4 KiB. It
/// takes effect when a database file is created; every file this service creates has it.
const SQLITE_PAGE_SIZE: u32 = 4096;

/// WAL frames past which the checkpointer has the writer start the WAL over: half of
/// [`WAL_SIZE_LIMIT`] (8,192 frames, 32 MiB).
const WRITER_STEP_PAST_FRAMES: i64 = (WAL_SIZE_LIMIT / 2 / SQLITE_PAGE_SIZE as u64) as i64;

/// Checkpoints the SQLite WAL every [`CHECKPOINT_EVERY`], until the store is closed or its
/// last handle drops (the returned sender's last clone).
///
/// Why not SQLite's automatic checkpoint: it runs in the commit that crosses the threshold,
/// so every few thousand pages one write transaction stopped to copy them all to the database
/// file and flush it, and the callers of its batch waited (the 20 s join stampede's p99 was
/// 54–56 ms with it and 37–45 ms with this).
///
/// Why two steps: a passive checkpoint on a reader connection copies the bulk of the WAL
/// without blocking anyone, but under a steady stream of writes it never catches up: the
/// writer only starts the WAL over when, as its transaction begins, everything is already
/// copied, so the file grew for as long as the writes went on (1.4 GB after 8 s of a join
/// stampede; each new frame landed in fresh blocks the filesystem zeroed first, a fifth of the
/// writer thread's time). The second, short checkpoint runs on the writer's own connection,
/// between its transactions: it copies only what was written during the first, and the
/// writer's next transaction starts the WAL over, in blocks already on disk and in cache.
///
/// Why only past [`WRITER_STEP_PAST_FRAMES`]: the second step first waits for the writer's
/// transaction to end, and then copies all of it while the writer stands still. A renewal
/// commits 5,000 subscriptions (about 10 MB of pages) a transaction, so at every round the
/// writer stopped 10-90 ms, 3.4 s of a 19 s renewal at 100,000 (statement log). Letting the
/// WAL grow to half its size limit first (the reader's step keeps copying it meanwhile)
/// renewed 2-16 % faster in six pairs of runs in turns; a join stampede, which writes more
/// than that between two rounds, still starts the WAL over at every round.
fn spawn_checkpointer(readers: SqlitePool, writer: SqlitePool) -> Arc<oneshot::Sender<()>> {
    let (alive, mut gone) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECKPOINT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut gone => break,
                _ = every.tick() => {}
            }
            // The readers' step, then the writer's only once the WAL has grown past
            // [`WRITER_STEP_PAST_FRAMES`]. The result row is (busy, frames in the WAL, frames
            // copied).
            for pool in [&readers, &writer] {
                match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
                    .fetch_one(pool)
                    .await
                {
                    Ok((_, frames, _)) if frames < WRITER_STEP_PAST_FRAMES => break,
                    Ok(_) => {}
                    // `Store::close` closed a pool: the store is shutting down.
                    Err(sqlx::Error::PoolClosed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "SQLite WAL checkpoint failed");
                        break;
                    }
                }
            }
        }
    });
    Arc::new(alive)
}

/// Takes an exclusive lock on `<db>.lock`, released by the OS when the process ends (even on
/// SIGKILL), so a stale lock never needs cleaning up by hand.
fn lock_sqlite_file(path: &Path) -> StoreResult<File> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let open = |e: std::io::Error| StoreError::Open {
        url: format!("sqlite://{}", path.display()),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(open)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(open)?;
    file.try_lock().map_err(|_| {
        StoreError::Locked(
            format!("sqlite://{}", path.display()),
            lock_path.display().to_string(),
        )
    })?;
    Ok(file)
}

async fn pg_pool(options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    // Random reads cost about what sequential ones do here (the data is in memory or on an
    // SSD); at the default 4.0 the planner read a 100,000-row table whole, rather than look
    // up the 1,000 ids of a renewal chunk in its key, for each chunk.
    let options = options.options([("random_page_cost", "1.1")]);
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

fn is_missing_database(e: &sqlx::Error) -> bool {
    // 3D000 invalid_catalog_name: "database … does not exist".
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

/// Creates the database named in `options` from the server's maintenance database, so that
/// `DATABASE_URL=postgres://…/newdb cargo run` works as the SQLite default does.
async fn create_pg_database(options: &PgConnectOptions) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let name = options.get_database().unwrap_or("pooled").to_owned();
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    // An identifier can't be bound as a parameter; it is quoted above.
    let sql = sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}"));
    match sqlx::query(sql).execute(&mut admin).await {
        // 42P04 duplicate_database: another instance created it first.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// What a shared query needs to say differently on each backend.
pub(crate) trait Dialect: sqlx::Database {
    /// A table with one row per element of the JSON array bound at `$n`, the element as
    /// `value` (read with `value->>i` on both backends).
    fn json_rows(n: usize) -> String;

    /// Whether write transactions run side by side, so one that writes from what it read
    /// must first lock those rows (`FOR UPDATE`). PostgreSQL's do; SQLite's one writer runs
    /// them one at a time (`BEGIN IMMEDIATE`), so a row read there can't change before the
    /// commit.
    const INTERLEAVES_WRITES: bool;
}

impl Dialect for sqlx::Sqlite {
    // `jsonb_each`, not `json_each`, for the reason PostgreSQL reads `jsonb`: `json_each` hands
    // each row out as JSON text, which every `value->>i` parses again; `jsonb_each` hands it
    // out as a JSONB blob, which `->>` reads without parsing.
    fn json_rows(n: usize) -> String {
        format!("jsonb_each(${n})")
    }

    const INTERLEAVES_WRITES: bool = false;
}

impl Dialect for sqlx::Postgres {
    // `jsonb`, not `json`: `value->>i` on a `json` element parses its text again for every
    // column read, which made JSON parsing PostgreSQL's busiest work in a join batch;
    // `jsonb` is parsed once (renewal +29 %, settlement +17 % at 10,000 / 20,000).
    fn json_rows(n: usize) -> String {
        format!("jsonb_array_elements(${n}::jsonb)")
    }

    const INTERLEAVES_WRITES: bool = true;
}

/// Anything bound to one backend (a pool, a transaction), to pick its [`Dialect`].
pub(crate) trait OnBackend {
    type Db: Dialect;
}

impl<DB: Dialect> OnBackend for sqlx::Pool<DB> {
    type Db = DB;
}

impl<DB: Dialect> OnBackend for sqlx::Transaction<'_, DB> {
    type Db = DB;
}

/// [`Dialect::json_rows`] for the backend `_on` (a pool or a transaction) talks to.
///
/// Why rows travel as one JSON parameter: a multi-row `VALUES` list binds every value
/// separately, and SQLite looks each `$N` up by a linear search (when preparing, and again when
/// sqlx binds), so a statement costs the square of its width; its text also changes with the
/// number of rows, so it is prepared afresh each time. One JSON array keeps the statement's
/// text, and its cost per row, the same for any batch.
pub(crate) fn json_rows<B: OnBackend>(_on: &B, n: usize) -> String {
    B::Db::json_rows(n)
}

/// [`Dialect::INTERLEAVES_WRITES`] for the backend `_on` talks to.
pub(crate) fn interleaves_writes<B: OnBackend>(_on: &B) -> bool {
    B::Db::INTERLEAVES_WRITES
}

/// The JSON array of `rows` (each a tuple, which serializes as an array) for [`json_rows`].
pub(crate) fn json_array<T: serde::Serialize>(rows: impl Iterator<Item = T>) -> String {
    let rows: Vec<T> = rows.collect();
    serde_json::to_string(&rows).expect("tuples of strings and numbers serialize")
}

/// Bound parameters one multi-row `VALUES` statement carries at most (batches that carry bytes,
/// which a JSON array can't; the rest use [`json_rows`]). SQLite looks each `$N` up by a linear
/// search, so a statement costs the square of its parameter count: at 500 rows of 14 columns,
/// that search took a quarter of the renewal's time.
const STATEMENT_PARAMS: usize = 1000;

/// How many rows of `columns` bound values one multi-row statement takes (see
/// [`STATEMENT_PARAMS`]); callers chunk their batches by it.
pub(crate) fn rows_per_statement(columns: usize) -> usize {
    (STATEMENT_PARAMS / columns).max(1)
}

/// `$first, $first+1, …, $first+n-1`: the placeholders of an `IN (…)` list of `n` values
/// bound from position `first`. Batches are chunked by their callers, so `n` stays far below
/// either backend's limit on bound parameters.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rows of a multi-row `VALUES` list: `rows` rows of `columns` placeholders each,
/// numbered on from `first`, each row ending with `tail` (SQL every row shares, such as
/// `'pending', $1`; empty for none). Chunked by callers like [`placeholders`].
pub(crate) fn value_rows(first: usize, rows: usize, columns: usize, tail: &str) -> String {
    (0..rows)
        .map(|i| {
            let own = placeholders(first + i * columns, columns);
            if tail.is_empty() {
                format!("({own})")
            } else {
                format!("({own}, {tail})")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An instant as stored: microseconds since the Unix epoch.
pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A stored instant back as UTC.
pub fn instant(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated SQLite store in a directory of its own (removed when the guard drops).
    async fn migrated_sqlite() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(dir.path().join("store.db"));
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        (dir, store)
    }

    /// Every write of the service goes through the one SQLite writer, because the readers
    /// refuse writes: a store method that wrote on a reader would fail its own tests (the retry
    /// timers of email delivery and of balances did, until the readers were made query-only).
    /// Checkpoints still run there.
    #[tokio::test]
    async fn sqlite_readers_refuse_writes_and_the_writer_takes_them() {
        let (_dir, store) = migrated_sqlite().await;
        let Db::Sqlite(readers) = &store.db else {
            unreachable!("a SQLite store")
        };
        let create = "CREATE TABLE scratch (x INTEGER)";
        let refused = sqlx::query(create).execute(readers).await.unwrap_err();
        assert!(
            refused.to_string().contains("readonly"),
            "a reader wrote: {refused}"
        );
        on_writer!(store, |pool| sqlx::query(create)
            .execute(pool)
            .await
            .map(|_| ()))
        .unwrap();
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(readers)
            .await
            .unwrap();
        store.close().await;
    }

    /// The pollers' reads stay on the partial indexes that hold only their queues (migration
    /// 0009), and `balance_pending` starts from the pending intents. SQLite plans a database
    /// without statistics, as every new one is, and a plan that reads a whole table returns the
    /// same rows, so no other test would notice one. The plans are SQLite's own words for the
    /// version `Cargo.lock` builds. (PostgreSQL plans by its statistics; BENCHMARKS.md,
    /// "Twenty-first session", shows its plans.)
    #[tokio::test]
    async fn poll_plans() {
        let (_dir, store) = migrated_sqlite().await;
        let Db::Sqlite(readers) = &store.db else {
            unreachable!("a SQLite store")
        };
        // (query, how many parameters it takes, its plan)
        let polls: [(&str, usize, &[&str]); 8] = [
            (
                subscription::DUE_DELIVERY_IDS,
                1,
                // Ties on the cutoff are put in id order: one sort of the due ids, no table read.
                &[
                    "SEARCH deliveries USING INDEX deliveries_due (cutoff_at<?)",
                    "USE TEMP B-TREE FOR LAST TERM OF ORDER BY",
                ],
            ),
            (
                subscription::PAST_DUE_INVOICES,
                1,
                // The whole index is the invoices in dunning, sorted by age.
                &[
                    "SCAN invoices USING INDEX invoices_dunning",
                    "USE TEMP B-TREE FOR ORDER BY",
                ],
            ),
            (
                payments::PENDING_INTENTS,
                4,
                &["SEARCH payment_intents USING INDEX payment_intents_due (seq>?)"],
            ),
            (
                outbox::DUE_EMAILS,
                2,
                &["SEARCH outbox USING INDEX outbox_pending (next_attempt_at<?)"],
            ),
            // Every entry of the index is a pending email: the backlog, not the history.
            (
                outbox::PENDING_EMAILS,
                0,
                &["SCAN outbox USING INDEX outbox_pending"],
            ),
            (
                outbox::FAILED_EMAILS,
                0,
                &["SCAN outbox USING COVERING INDEX outbox_failed"],
            ),
            (
                outbox::LATEST_FAILED_EMAILS,
                1,
                &["SCAN outbox USING INDEX outbox_failed"],
            ),
            (
                presale::BALANCE_PENDING,
                1,
                &[
                    "SCAN CONSTANT ROW",
                    "SCALAR SUBQUERY 1",
                    "SCAN i USING INDEX payment_intents_due",
                    "SEARCH p USING INDEX sqlite_autoindex_pledges_1 (id=?)",
                ],
            ),
        ];
        // Not a poll, but run with every renewal: each row looks its subscription up by key.
        // (The scan of invoices is the deferred foreign key from invoices: SQLite runs it
        // only while a violation is outstanding, `OP_FkIfZero`.)
        let insert = subscription::insert_deliveries_sql("jsonb_each($1)", "");
        let writes: [(&str, usize, &[&str]); 1] = [(
            &insert,
            1,
            &[
                "SCAN jsonb_each VIRTUAL TABLE INDEX 1:",
                "SEARCH s USING INDEX sqlite_autoindex_subscriptions_1 (id=?)",
                "SCAN invoices",
            ],
        )];
        for (sql, params, expected) in polls.into_iter().chain(writes) {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let mut query =
                sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(explain));
            for _ in 0..params {
                query = query.bind(None::<i64>);
            }
            let plan: Vec<String> = query
                .fetch_all(readers)
                .await
                .unwrap()
                .into_iter()
                .map(|(_, _, _, step)| step)
                .collect();
            assert_eq!(plan, expected, "{sql}");
        }
        store.close().await;
    }
}
