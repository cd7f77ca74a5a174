//! The catalog, plans, subscriptions, their deliveries and invoices, solved box profiles and
//! grower orders. Deliveries and invoices are unique per (subscription, date); every move is
//! a guarded update on status, so a re-run bills nothing twice.

use super::{
    IdempotencyBegin, IdempotencyClaim, IdempotencyDone, IntentRow, NewEmail, NewIntent, Store,
    StoreResult, StoredResponse, abandon_claims_after, micros,
};
use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct CatalogRow {
    pub sku: String,
    pub name: String,
    pub kind: String,
    pub ripening_days_min: i64,
    pub ripening_days_max: i64,
    pub ready_window_days: i64,
    pub ethylene_producer: String,
    pub ethylene_sensitive: bool,
    pub unit_cost_minor: i64,
    pub currency: String,
    pub available_months: String,
    pub grower: String,
    pub grower_email: String,
    pub lead_time_days: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct PlanRow {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub currency: String,
    pub price_minor: i64,
    pub cadence_weeks: i64,
    pub portions_per_day: i64,
    pub cutoff_hours: i64,
    pub delivery_weekdays: String,
    pub time_zone: String,
    pub variety_cap: i64,
    pub transit_days: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct SubscriptionRow {
    pub id: String,
    pub shopper_id: String,
    pub plan_id: String,
    pub delivery_weekday: String,
    pub start_date: String,
    pub exclusions: String,
    pub status: String,
    pub paused_until: Option<String>,
    pub created_at: i64,
    pub ended_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct DeliveryRow {
    pub id: String,
    pub subscription_id: String,
    pub delivery_date: String,
    pub cutoff_at: i64,
    pub status: String,
    pub skip_reason: Option<String>,
    pub amount_minor: Option<i64>,
    /// The box (JSON lines), once planned: NULL until then, and again once the delivery
    /// leaves `scheduled` for `skipped` (a box not sent is not kept for a later return; what
    /// its growers were already sent is spare that the next recomputation of the orders
    /// counts against other boxes of its day). Written once while scheduled (never replaced:
    /// its lines may be on their way to the growers), final when locked, kept when a locked
    /// box's invoice is void (it reads `skipped` then, but was packed).
    pub lines: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct InvoiceRow {
    pub id: String,
    pub subscription_id: String,
    pub delivery_id: String,
    pub delivery_date: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub attempts: i64,
    pub first_failed_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub created_at: i64,
    pub paid_at: Option<i64>,
}

/// How [`Store::put_grower_orders`] merges rows into the planned orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowerOrderMerge<'a> {
    /// The rows are every order whose ripening starts in `[from, until)` (ISO dates): each
    /// order's quantity becomes its row's, and a planned order there with no row is deleted
    /// (its boxes were skipped or cancelled). Only if no addition has been made since
    /// [`Store::grower_order_adds`] read `adds_seen`, before the rows' boxes were read: one made
    /// since came from boxes the rows do not count.
    Replace {
        from: &'a str,
        until: &'a str,
        adds_seen: i64,
    },
    /// Each row's quantity is added to the order of the same grower, item and ripening start.
    Add,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct GrowerOrderRow {
    pub id: String,
    pub week: String,
    pub supplier: String,
    pub supplier_email: String,
    pub sku: String,
    pub qty: i64,
    pub ripening_start: String,
    pub order_by: String,
    pub status: String,
    pub sent_at: Option<i64>,
}

macro_rules! catalog_columns {
    () => {
        "sku, name, kind, ripening_days_min, ripening_days_max, ready_window_days,
         ethylene_producer, ethylene_sensitive, unit_cost_minor, currency, available_months,
         grower, grower_email, lead_time_days, updated_at"
    };
}

macro_rules! plan_columns {
    () => {
        "id, name, kind, currency, price_minor, cadence_weeks, portions_per_day, cutoff_hours,
         delivery_weekdays, time_zone, variety_cap, transit_days, created_at"
    };
}

/// What a signup writes ([`Store::create_subscription`]).
pub struct NewSubscription<'a> {
    pub subscription: &'a SubscriptionRow,
    /// The key of its private calendar link, minted with it so its first answer can show it.
    pub calendar_key: Option<&'a str>,
    pub deliveries: &'a [DeliveryRow],
    pub welcome: Option<&'a NewEmail>,
    /// The request's `Idempotency-Key` and the answer to remember for it.
    pub key: Option<(&'a IdempotencyClaim, &'a StoredResponse)>,
}

macro_rules! subscription_columns {
    () => {
        "id, shopper_id, plan_id, delivery_weekday, start_date, exclusions, status,
         paused_until, created_at, ended_at"
    };
}

macro_rules! delivery_columns {
    () => {
        "id, subscription_id, delivery_date, cutoff_at, status, skip_reason, amount_minor, lines"
    };
}

macro_rules! invoice_columns {
    () => {
        "id, subscription_id, delivery_id, delivery_date, amount_minor, currency, status,
         attempts, first_failed_at, next_attempt_at, created_at, paid_at"
    };
}

/// The renewal's queue: scheduled deliveries whose cutoff has come, oldest first, read
/// through the partial `deliveries_due` index (the store's `poll_plans` test checks it).
pub(super) const DUE_DELIVERY_IDS: &str = "SELECT id FROM deliveries
     WHERE status = 'scheduled' AND cutoff_at <= $1 ORDER BY cutoff_at, id";

/// Dunning's queue: past-due invoices awaiting a decision or a due retry, read through the
/// partial `invoices_dunning` index.
pub(super) const PAST_DUE_INVOICES: &str = concat!(
    "SELECT ",
    invoice_columns!(),
    " FROM invoices WHERE status = 'past_due'
       AND (next_attempt_at IS NULL OR next_attempt_at <= $1)
     ORDER BY created_at, id"
);

/// Inserts a catalog item inside the caller's transaction, with `$conflict` deciding what an
/// existing sku does.
macro_rules! upsert_catalog {
    ($tx:ident, $c:expr, $conflict:literal) => {{
        let c: &CatalogRow = $c;
        sqlx::query(concat!(
            "INSERT INTO catalog_items (",
            catalog_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) ",
            $conflict
        ))
        .bind(&c.sku)
        .bind(&c.name)
        .bind(&c.kind)
        .bind(c.ripening_days_min)
        .bind(c.ripening_days_max)
        .bind(c.ready_window_days)
        .bind(&c.ethylene_producer)
        .bind(c.ethylene_sensitive)
        .bind(c.unit_cost_minor)
        .bind(&c.currency)
        .bind(&c.available_months)
        .bind(&c.grower)
        .bind(&c.grower_email)
        .bind(c.lead_time_days)
        .bind(c.updated_at)
        .execute(&mut *$tx)
        .await?;
    }};
}

/// Whether the subscription `s` holds the delivery row `value` (of [`insert_deliveries`]) in
/// a pause: paused without an end, or ending after its date.
macro_rules! held_by_pause {
    () => {
        "s.status = 'paused' AND (s.paused_until IS NULL OR value->>2 < s.paused_until)"
    };
}

/// The statement of [`insert_deliveries`], rows bound as `rows` (see [`super::json_rows`]),
/// locking its subscriptions with `lock` (`FOR SHARE OF s` on PostgreSQL, else empty).
///
/// `CROSS JOIN`: SQLite then keeps the rows outermost and looks each subscription up by its
/// key; with a plain join it scanned the subscriptions and read every row for each (a weekly
/// renewal of 100,000 ran for minutes instead of seconds; the store's `poll_plans` test
/// checks the plan).
pub(super) fn insert_deliveries_sql(rows: &str, lock: &str) -> String {
    format!(
        concat!(
            "INSERT INTO deliveries (",
            delivery_columns!(),
            ") SELECT value->>0, value->>1, value->>2, CAST(value->>3 AS BIGINT),
                 CASE WHEN value->>4 = 'skipped' THEN 'skipped'
                      WHEN ",
            held_by_pause!(),
            " THEN 'skipped' ELSE 'scheduled' END,
                 CASE WHEN value->>4 = 'skipped' THEN value->>5
                      WHEN ",
            held_by_pause!(),
            " THEN 'paused' END,
                 CAST(value->>6 AS BIGINT), value->>7
             FROM {} CROSS JOIN subscriptions s
             WHERE s.id = value->>1
               AND (s.status IN ('active', 'past_due', 'paused')
                    OR (s.status = 'suspended' AND value->>4 = 'skipped')) {}
             ON CONFLICT (subscription_id, delivery_date) DO NOTHING
             RETURNING cutoff_at"
        ),
        rows, lock
    )
}

/// Inserts deliveries (`$rows`: `&[DeliveryRow]`; an existing date is kept) with one
/// statement, and a timer at each new cutoff (one per distinct instant).
///
/// A row is `scheduled`, or `skipped` (reason `paused`) inside a pause, as its subscription
/// is when the row goes in, not as it was when the row was made: the renewal makes rows from
/// subscriptions read before, and a resume, pause or cancel committed in between would
/// otherwise leave a resumed delivery skipped (never billed) or a paused or cancelled one
/// scheduled (boxed and ordered from growers). Rows of a subscription that is no longer live
/// are not inserted, except a suspended one's rows skipped by its shopper (a reactivation
/// then leaves them skipped). A row made `skipped` (a shopper's skip) stays so. On PostgreSQL the
/// subscriptions are read `FOR SHARE`: a move in flight is waited for and its result read,
/// and a move after the read waits for this commit, so its deliveries update sees these rows.
macro_rules! insert_deliveries {
    ($tx:ident, $rows:expr, $job:expr, $now:expr) => {{
        let rows: &[DeliveryRow] = $rows;
        let lock = if super::interleaves_writes(&$tx) {
            "FOR SHARE OF s"
        } else {
            ""
        };
        let sql = insert_deliveries_sql(&super::json_rows(&$tx, 1), lock);
        let json = super::json_array(rows.iter().map(|d| {
            (
                &d.id,
                &d.subscription_id,
                &d.delivery_date,
                d.cutoff_at,
                &d.status,
                &d.skip_reason,
                d.amount_minor,
                &d.lines,
            )
        }));
        let new: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(json)
            .fetch_all(&mut *$tx)
            .await?;
        // In ascending order: chunks in flight share cutoffs and wait on each other's timer
        // rows, never in a cycle (test: chunks_of_new_deliveries_in_flight_share_…).
        let cutoffs: std::collections::BTreeSet<i64> =
            new.into_iter().filter(|at| *at > $now).collect();
        for at in cutoffs {
            schedule_timer!(&mut *$tx, $job, at, $now).await?;
        }
    }};
}

/// The read of the count of additions to the grower orders (see [`GrowerOrderMerge::Replace`]).
macro_rules! grower_order_adds {
    () => {
        "SELECT adds FROM grower_order_adds WHERE id = 1"
    };
}

/// Merges grower order rows into the planned orders, inside the transaction `$tx` (see
/// [`Store::put_grower_orders`]); `false` when a replacement was refused because an addition
/// was made since its boxes were read (nothing is written then).
macro_rules! merge_grower_orders {
    ($tx:ident, $rows:expr, $merge:expr) => {{
        let merge: GrowerOrderMerge = $merge;
        // Both merges take the count's row before any order row (an addition bumps it, a
        // replacement reads it, on PostgreSQL locked until its commit), so an addition waits
        // for a replacement and adds on top of it, and neither waits on the other's order rows.
        let unmoved = match merge {
            GrowerOrderMerge::Replace { adds_seen, .. } => {
                let sql = if super::interleaves_writes(&$tx) {
                    concat!(grower_order_adds!(), " FOR UPDATE")
                } else {
                    grower_order_adds!()
                };
                let adds: i64 = sqlx::query_scalar(sql).fetch_one(&mut *$tx).await?;
                adds == adds_seen
            }
            GrowerOrderMerge::Add => {
                sqlx::query("UPDATE grower_order_adds SET adds = adds + 1 WHERE id = 1")
                    .execute(&mut *$tx)
                    .await?;
                true
            }
        };
        if unmoved {
            merge_grower_rows!($tx, $rows, merge);
        }
        unmoved
    }};
}

/// The writes of [`merge_grower_orders`] once it has checked the count of additions.
macro_rules! merge_grower_rows {
    ($tx:ident, $rows:expr, $merge:expr) => {{
        let rows: &[GrowerOrderRow] = $rows;
        let json = super::json_array(rows.iter().map(|g| {
            (
                &g.id,
                &g.week,
                &g.supplier,
                &g.supplier_email,
                &g.sku,
                g.qty,
                &g.ripening_start,
                &g.order_by,
            )
        }));
        let (qty, on_conflict) = match $merge {
            GrowerOrderMerge::Replace { from, until, .. } => {
                // A planned line of the window is kept if a row is for its grower, item and
                // ripening start.
                let in_rows = format!(
                    "EXISTS (SELECT 1 FROM {} WHERE value->>2 = grower_orders.supplier
                         AND value->>4 = grower_orders.sku
                         AND value->>6 = grower_orders.ripening_start)",
                    super::json_rows(&$tx, 1)
                );
                let in_window =
                    "status = 'planned' AND ripening_start >= $2 AND ripening_start < $3";
                let mut statements = Vec::new();
                // Why lock first: the insert below subtracts what the sent lines ordered, read
                // at its start. A line marked sent meanwhile (a renewal or signup sending due
                // lines) would count as unsent, and its units be planned a second time.
                // Locked, a send either committed before (and is counted) or waits for this
                // commit (and sends the recomputed line).
                if super::interleaves_writes(&$tx) {
                    statements.push(format!(
                        "SELECT id FROM grower_orders
                         WHERE status = 'planned' AND ({in_window} OR {in_rows}) FOR UPDATE"
                    ));
                }
                statements.push(format!(
                    "DELETE FROM grower_orders WHERE {in_window} AND NOT {in_rows}"
                ));
                for sql in statements {
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&json)
                        .bind(from)
                        .bind(until)
                        .execute(&mut *$tx)
                        .await?;
                }
                // What is wanted less what the sent lines already ordered; a line left
                // with nothing to order is deleted below.
                (
                    "CAST(value->>5 AS BIGINT) - COALESCE((SELECT SUM(s.qty) FROM grower_orders s
                         WHERE s.status = 'sent' AND s.supplier = value->>2
                           AND s.sku = value->>4 AND s.ripening_start = value->>6), 0)",
                    "excluded.qty",
                )
            }
            GrowerOrderMerge::Add => (
                "CAST(value->>5 AS BIGINT)",
                "grower_orders.qty + excluded.qty",
            ),
        };
        let sql = format!(
            "INSERT INTO grower_orders (id, week, supplier, supplier_email, sku, qty,
                 ripening_start, order_by, status, sent_at)
             SELECT value->>0, value->>1, value->>2, value->>3, value->>4, {qty},
                 value->>6, value->>7, 'planned', NULL
             FROM {} WHERE true
             ON CONFLICT (supplier, sku, ripening_start) WHERE status = 'planned'
             DO UPDATE SET qty = {on_conflict}",
            super::json_rows(&$tx, 1)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&json)
            .execute(&mut *$tx)
            .await?;
        sqlx::query("DELETE FROM grower_orders WHERE status = 'planned' AND qty <= 0")
            .execute(&mut *$tx)
            .await?;
    }};
}

/// A due delivery locked with what it causes (see [`Store::lock_deliveries`]).
#[derive(Debug, Clone)]
pub struct DeliveryLock {
    pub delivery: DeliveryRow,
    pub invoice: InvoiceRow,
    pub charge: NewIntent,
    pub email: NewEmail,
    /// The box was planned by the lock itself (the delivery had none): it locks only if
    /// no plan wrote one meanwhile, which would be the box the growers were ordered for.
    pub boxed_at_lock: bool,
    /// The grower orders of a box planned by the lock itself, added in the lock's commit if
    /// it locks (a box planned ahead was counted when it was planned).
    pub orders: Vec<GrowerOrderRow>,
}

/// What [`Store::lock_deliveries`] took: how many locks, the charges they began, and the
/// grower orders added for boxes planned at those locks (summed per grower, item and
/// ripening start).
#[derive(Debug, Default)]
pub struct Locked {
    pub locked: usize,
    pub charges: Vec<IntentRow>,
    pub orders: Vec<GrowerOrderRow>,
}

impl Store {
    /// Adds catalog items that are not there yet (a fresh database gets the shipped catalog;
    /// ops' edits are kept).
    pub async fn seed_catalog(&self, items: &[CatalogRow]) -> StoreResult<()> {
        in_tx!(self, |tx| {
            for c in items {
                upsert_catalog!(tx, c, "ON CONFLICT (sku) DO NOTHING");
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn put_catalog_item(&self, c: &CatalogRow) -> StoreResult<()> {
        in_tx!(self, |tx| {
            upsert_catalog!(
                tx,
                c,
                "ON CONFLICT (sku) DO UPDATE SET name = excluded.name, kind = excluded.kind,
                 ripening_days_min = excluded.ripening_days_min,
                 ripening_days_max = excluded.ripening_days_max,
                 ready_window_days = excluded.ready_window_days,
                 ethylene_producer = excluded.ethylene_producer,
                 ethylene_sensitive = excluded.ethylene_sensitive,
                 unit_cost_minor = excluded.unit_cost_minor, currency = excluded.currency,
                 available_months = excluded.available_months, grower = excluded.grower,
                 grower_email = excluded.grower_email, lead_time_days = excluded.lead_time_days,
                 updated_at = excluded.updated_at"
            );
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn catalog(&self) -> StoreResult<Vec<CatalogRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                catalog_columns!(),
                " FROM catalog_items ORDER BY kind, sku"
            ))
            .fetch_all(pool)
            .await?
        }))
    }

    pub async fn create_plan(&self, p: &PlanRow) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(concat!(
                "INSERT INTO plans (",
                plan_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            ))
            .bind(&p.id)
            .bind(&p.name)
            .bind(&p.kind)
            .bind(&p.currency)
            .bind(p.price_minor)
            .bind(p.cadence_weeks)
            .bind(p.portions_per_day)
            .bind(p.cutoff_hours)
            .bind(&p.delivery_weekdays)
            .bind(&p.time_zone)
            .bind(p.variety_cap)
            .bind(p.transit_days)
            .bind(p.created_at)
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }

    pub async fn plans(&self) -> StoreResult<Vec<PlanRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                plan_columns!(),
                " FROM plans ORDER BY created_at, id"
            ))
            .fetch_all(pool)
            .await?
        }))
    }

    pub async fn plan(&self, id: &str) -> StoreResult<Option<PlanRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                plan_columns!(),
                " FROM plans WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Changes plan `id`'s price (for every delivery whose cutoff is still ahead) and announces
    /// it, in one transaction, to the subscriptions still billed on it (neither cancelled nor
    /// suspended):
    /// `announce(subscription id, shopper's email, shopper's name)` writes each one's email.
    /// The subscribers are read with their shoppers and their emails written a thousand at a
    /// time inside the transaction, so a plan of 100,000 holds one chunk of emails in memory,
    /// not all of them, and on SQLite no signup can slip in between the read and the price.
    pub async fn set_plan_price(
        &self,
        id: &str,
        price_minor: i64,
        announce: impl Fn(&str, &str, &str) -> NewEmail,
        now: i64,
    ) -> StoreResult<()> {
        const CHUNK: i64 = 1000;
        in_tx!(self, |tx| {
            // A delivery past its cutoff keeps the price it had then, even when the renewal
            // has not locked it yet (the job paused, or catching up): it is stamped with the
            // price before this change, unless an earlier change already stamped it.
            sqlx::query(
                "UPDATE deliveries SET amount_minor = (SELECT price_minor FROM plans WHERE id = $1)
                 WHERE status = 'scheduled' AND cutoff_at <= $2 AND amount_minor IS NULL
                   AND subscription_id IN (SELECT id FROM subscriptions
                       WHERE plan_id = $1 AND status NOT IN ('cancelled', 'suspended'))",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE plans SET price_minor = $2 WHERE id = $1")
                .bind(id)
                .bind(price_minor)
                .execute(&mut *tx)
                .await?;
            let mut after = String::new();
            loop {
                // Keyed on the subscription's id, so each chunk starts where the last ended.
                let chunk: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT s.id, sh.email, sh.name FROM subscriptions s
                     JOIN shoppers sh ON sh.id = s.shopper_id
                     WHERE s.id > $2 AND s.plan_id = $1
                       AND s.status NOT IN ('cancelled', 'suspended')
                     ORDER BY s.id LIMIT $3",
                )
                .bind(id)
                .bind(&after)
                .bind(CHUNK)
                .fetch_all(&mut *tx)
                .await?;
                let Some((last, _, _)) = chunk.last() else {
                    break;
                };
                after = last.clone();
                let emails: Vec<NewEmail> = chunk
                    .iter()
                    .map(|(sub, email, name)| announce(sub, email, name))
                    .collect();
                let emails: Vec<&NewEmail> = emails.iter().collect();
                enqueue_emails!(tx, &emails, now);
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Creates a subscription with its first deliveries (and their cutoff timers), its calendar
    /// key and its welcome email, in one commit. With a key to claim, the request's
    /// `Idempotency-Key` is claimed in that transaction and its answer remembered there, so
    /// nothing is written unless the claim runs (anything else is returned as it stands), and a
    /// crash or a dropped connection after the commit can't leave the key to subscribe again.
    pub async fn create_subscription(
        &self,
        signup: NewSubscription<'_>,
        job: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<IdempotencyBegin> {
        let NewSubscription {
            subscription: s,
            calendar_key,
            deliveries,
            welcome,
            key,
        } = signup;
        let now_us = micros(now);
        in_tx!(self, |tx| {
            if let Some((claim, answer)) = key {
                let claimed = claim_keys!(tx, &[claim], now, abandon_claims_after());
                match claimed.into_iter().next() {
                    Some(IdempotencyBegin::Run) => {}
                    // Dropping the transaction rolls it back: nothing else was written.
                    Some(other) => return Ok(other),
                    None => unreachable!("one outcome per claim"),
                }
                let done = IdempotencyDone {
                    scope: claim.scope.clone(),
                    key: claim.key.clone(),
                    response: answer.clone(),
                    provisional: false,
                };
                remember_responses!(&mut *tx, std::slice::from_ref(&done));
            }
            sqlx::query(concat!(
                "INSERT INTO subscriptions (",
                subscription_columns!(),
                ", calendar_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ))
            .bind(&s.id)
            .bind(&s.shopper_id)
            .bind(&s.plan_id)
            .bind(&s.delivery_weekday)
            .bind(&s.start_date)
            .bind(&s.exclusions)
            .bind(&s.status)
            .bind(&s.paused_until)
            .bind(s.created_at)
            .bind(s.ended_at)
            .bind(calendar_key)
            .execute(&mut *tx)
            .await?;
            insert_deliveries!(tx, deliveries, job, now_us);
            if let Some(email) = welcome {
                let _new = enqueue_email!(tx, email, now_us);
            }
            tx.commit().await?;
            Ok(IdempotencyBegin::Run)
        })
    }

    /// Adds deliveries that don't exist yet (a date already there is kept as it is), as their
    /// subscriptions are when they go in: skipped inside a pause, none once the subscription
    /// is suspended or cancelled (see [`insert_deliveries`]).
    pub async fn add_deliveries(
        &self,
        rows: &[DeliveryRow],
        job: &str,
        now: i64,
    ) -> StoreResult<()> {
        in_tx!(self, |tx| {
            insert_deliveries!(tx, rows, job, now);
            tx.commit().await?;
        });
        Ok(())
    }

    /// The key of subscription `id`'s private calendar link, if one was minted.
    pub async fn calendar_key(&self, id: &str) -> StoreResult<Option<String>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT calendar_key FROM subscriptions WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
                .flatten()
        }))
    }

    /// The key of subscription `id`'s private calendar link, minted as `fresh` when it has
    /// none yet (of two first uses at once, the guarded update keeps one). `None` when there
    /// is no such subscription.
    pub async fn mint_calendar_key(&self, id: &str, fresh: &str) -> StoreResult<Option<String>> {
        Ok(on_writer!(self, |pool| {
            sqlx::query_scalar(
                "UPDATE subscriptions SET calendar_key = COALESCE(calendar_key, $2)
                 WHERE id = $1 RETURNING calendar_key",
            )
            .bind(id)
            .bind(fresh)
            .fetch_optional(pool)
            .await?
            .flatten()
        }))
    }

    /// Gives subscription `id`'s private calendar link the new key `fresh`: the old key
    /// stops opening it.
    pub async fn replace_calendar_key(&self, id: &str, fresh: &str) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query("UPDATE subscriptions SET calendar_key = $2 WHERE id = $1")
                .bind(id)
                .bind(fresh)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    pub async fn subscription(&self, id: &str) -> StoreResult<Option<SubscriptionRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                subscription_columns!(),
                " FROM subscriptions WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// The subscriptions of `ids` that exist, by id (one query for a chunk).
    pub async fn subscriptions_by_id(
        &self,
        ids: &[&str],
    ) -> StoreResult<std::collections::HashMap<String, SubscriptionRow>> {
        self.rows_by_id(
            subscription_columns!(),
            "subscriptions",
            ids,
            |s: &SubscriptionRow| &s.id,
        )
        .await
    }

    /// The ids of subscriptions that still receive deliveries (everything but cancelled), in
    /// the order they were made; read as [`Store::due_delivery_ids`] is.
    pub async fn live_subscription_ids(&self) -> StoreResult<Vec<String>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT id FROM subscriptions WHERE status <> 'cancelled' ORDER BY created_at, id",
            )
            .fetch_all(pool)
            .await?
        }))
    }

    /// Moves a subscription between statuses, and its open deliveries with it: deliveries whose
    /// cutoff has not passed and that are in one of `deliveries_from` (with `reason_from`, if
    /// given) become `deliveries_to` with `reason_to`, from `from_date` (inclusive) to
    /// `until_date` (exclusive), and drop their boxes (see [`DeliveryRow::lines`]). `false`
    /// when the subscription was not in `from`.
    #[allow(clippy::too_many_arguments)]
    pub async fn move_subscription(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        paused_until: Option<&str>,
        deliveries: ([&str; 2], Option<&str>, &str, Option<&str>),
        dates: (&str, &str),
        now: i64,
    ) -> StoreResult<bool> {
        let (a, b) = match from {
            [a] => (*a, *a),
            [a, b, ..] => (*a, *b),
            [] => return Ok(false),
        };
        let (d_from, reason_from, d_to, reason_to) = deliveries;
        in_tx!(self, |tx| {
            let moved = sqlx::query(
                "UPDATE subscriptions SET status = $4, paused_until = $5,
                     ended_at = CASE WHEN $4 IN ('cancelled', 'suspended') THEN $6 END
                 WHERE id = $1 AND status IN ($2, $3)",
            )
            .bind(id)
            .bind(a)
            .bind(b)
            .bind(to)
            .bind(paused_until)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 0 {
                return Ok(false);
            }
            sqlx::query(
                "UPDATE deliveries SET status = $3, skip_reason = $5, lines = NULL
                 WHERE subscription_id = $1 AND status IN ($2, $9)
                   AND ($4 IS NULL OR skip_reason = $4)
                   AND cutoff_at > $6 AND delivery_date >= $7 AND delivery_date < $8",
            )
            .bind(id)
            .bind(d_from[0])
            .bind(d_to)
            .bind(reason_from)
            .bind(reason_to)
            .bind(now)
            .bind(dates.0)
            .bind(dates.1)
            .bind(d_from[1])
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// A subscription's deliveries by date. A locked delivery's status is its invoice's
    /// outcome: `paid` once the invoice is, `payment_failed` while it is past due or after it
    /// became uncollectible (the box stays held), `skipped` (reason `cancelled`) once void,
    /// `locked` until the first charge answers. The invoice is the one record of payment;
    /// renewals no longer copy it onto the delivery, and deliveries locked before that carry
    /// `paid` or `payment_failed`, read the same way.
    pub async fn deliveries_of(&self, subscription_id: &str) -> StoreResult<Vec<DeliveryRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT d.id, d.subscription_id, d.delivery_date, d.cutoff_at,
                     CASE WHEN d.status NOT IN ('locked', 'paid', 'payment_failed') THEN d.status
                          WHEN i.status = 'paid' THEN 'paid'
                          WHEN i.status IN ('past_due', 'uncollectible') THEN 'payment_failed'
                          WHEN i.status = 'void' THEN 'skipped'
                          ELSE 'locked' END AS status,
                     CASE WHEN i.status = 'void' THEN 'cancelled' ELSE d.skip_reason END
                         AS skip_reason,
                     CASE WHEN i.status = 'void' THEN NULL ELSE d.amount_minor END
                         AS amount_minor,
                     d.lines
                 FROM deliveries d
                 LEFT JOIN invoices i
                   ON i.subscription_id = d.subscription_id AND i.delivery_date = d.delivery_date
                 WHERE d.subscription_id = $1 ORDER BY d.delivery_date",
            )
            .bind(subscription_id)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Skips one delivery before its cutoff: a scheduled one, or one a pause holds (then it
    /// stays skipped when the pause ends); `false` when it is locked, gone or already
    /// skipped by the shopper.
    pub async fn skip_delivery(
        &self,
        subscription_id: &str,
        date: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let done = on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE deliveries SET status = 'skipped', skip_reason = 'skipped', lines = NULL
                 WHERE subscription_id = $1 AND delivery_date = $2 AND cutoff_at > $3
                   AND (status = 'scheduled'
                        OR (status = 'skipped' AND skip_reason IN ('paused', 'suspended')))",
            )
            .bind(subscription_id)
            .bind(date)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// The ids of scheduled deliveries whose cutoff has come, in cutoff order. Ids only: the
    /// renewal reads the rows a chunk at a time ([`Store::deliveries_by_id`]) while it writes
    /// the chunk before. Reading 100,000 whole rows at once took half a second, during which
    /// the writer had nothing to do, and held them all in memory.
    pub async fn due_delivery_ids(&self, now: i64) -> StoreResult<Vec<String>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(DUE_DELIVERY_IDS)
                .bind(now)
                .fetch_all(pool)
                .await?
        }))
    }

    /// The ids of deliveries with dates in `[from, until)` that will be (or were) boxed, for
    /// grower orders; read as [`Store::due_delivery_ids`] is.
    pub async fn delivery_ids_between(&self, from: &str, until: &str) -> StoreResult<Vec<String>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT id FROM deliveries WHERE delivery_date >= $1 AND delivery_date < $2
                   AND status IN ('scheduled', 'locked', 'paid', 'payment_failed', 'dispatched')
                 ORDER BY delivery_date, id",
            )
            .bind(from)
            .bind(until)
            .fetch_all(pool)
            .await?
        }))
    }

    /// The deliveries of `ids` that exist, by id (one query for a chunk).
    pub async fn deliveries_by_id(
        &self,
        ids: &[&str],
    ) -> StoreResult<std::collections::HashMap<String, DeliveryRow>> {
        self.rows_by_id(delivery_columns!(), "deliveries", ids, |d: &DeliveryRow| {
            &d.id
        })
        .await
    }

    /// Saves the boxes (`(delivery id, lines)`) of deliveries still scheduled and not yet
    /// planned, in one statement, and adds `orders_of` the ids it boxed to the grower orders
    /// in the same commit; returns those ids. A box once planned is never replaced: its lines
    /// may be on their way to the growers (of two plans at once, the first to write wins).
    /// One commit, so a full recomputation of the orders (which reads every box, then
    /// replaces the window's orders) counts a box either from its read or from this add, never
    /// from both: had this committed after its read, the recomputation planned the box itself,
    /// and its own write of it wins or loses to this one before it replaces the orders.
    pub async fn save_first_boxes(
        &self,
        boxes: &[(String, String)],
        orders_of: impl FnOnce(&[String]) -> Vec<GrowerOrderRow>,
    ) -> StoreResult<Vec<String>> {
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let boxed = in_tx!(self, |tx| {
            // `status || ''`: see `lock_deliveries`.
            let sql = format!(
                "UPDATE deliveries SET lines = v.lines
                 FROM (SELECT value->>0 AS id, value->>1 AS lines FROM {}) AS v
                 WHERE deliveries.id = v.id AND deliveries.status || '' = 'scheduled'
                   AND deliveries.lines IS NULL
                 RETURNING deliveries.id",
                super::json_rows(&tx, 1)
            );
            let boxed: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(super::json_array(boxes.iter()))
                .fetch_all(&mut *tx)
                .await?;
            let orders = orders_of(&boxed);
            if !orders.is_empty() {
                merge_grower_orders!(tx, &orders, GrowerOrderMerge::Add);
            }
            tx.commit().await?;
            boxed
        });
        Ok(boxed)
    }

    /// Skips a due delivery that will not be billed (its subscription is suspended or
    /// cancelled, or its box cannot be made in time), and forgets any price stamped on it.
    /// `unboxed`: only if it still has no box (one a plan wrote meanwhile is locked instead,
    /// on the next run: its growers may have been ordered for it).
    pub async fn skip_due_delivery(
        &self,
        delivery_id: &str,
        reason: &str,
        unboxed: bool,
    ) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE deliveries SET status = 'skipped', skip_reason = $2, amount_minor = NULL,
                     lines = NULL
                 WHERE id = $1 AND status = 'scheduled' AND ($3 = 0 OR lines IS NULL)",
            )
            .bind(delivery_id)
            .bind(reason)
            .bind(i64::from(unboxed))
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }

    /// Locks due deliveries with their final boxes and prices, creates their invoices and
    /// commits their renewal charges, with the "box planned" emails, in one transaction and
    /// set-based: a delivery no longer scheduled is left out (one guarded update per chunk
    /// decides which), and the rest is written with multi-row inserts. The charges are
    /// committed with their first attempt taken, for the caller to send right after. Returns
    /// what was taken ([`Locked`]).
    pub async fn lock_deliveries(&self, locks: &[DeliveryLock], now: i64) -> StoreResult<Locked> {
        if locks.is_empty() {
            return Ok(Locked::default());
        }
        in_tx!(self, |tx| {
            // `status || ''` keeps SQLite from reading every scheduled delivery through the
            // status index instead of looking each one up by id.
            let sql = format!(
                "UPDATE deliveries SET status = 'locked', lines = v.lines, amount_minor = v.amount
                 FROM (SELECT value->>0 AS id, value->>1 AS lines,
                           CAST(value->>2 AS BIGINT) AS amount,
                           CAST(value->>3 AS BIGINT) AS boxed_at_lock
                       FROM {}) AS v
                 WHERE deliveries.id = v.id AND deliveries.status || '' = 'scheduled'
                   AND (v.boxed_at_lock = 0 OR deliveries.lines IS NULL)
                 RETURNING deliveries.id",
                super::json_rows(&tx, 1)
            );
            let json = super::json_array(locks.iter().map(|l| {
                let d = &l.delivery;
                (&d.id, &d.lines, d.amount_minor, i64::from(l.boxed_at_lock))
            }));
            let taken: std::collections::HashSet<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(json)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
            let locked: Vec<&DeliveryLock> = locks
                .iter()
                .filter(|l| taken.contains(&l.delivery.id))
                .collect();
            // One row per order: a statement may not update one row twice.
            let mut orders: std::collections::BTreeMap<(&str, &str, &str), GrowerOrderRow> =
                Default::default();
            for o in locked.iter().flat_map(|l| &l.orders) {
                let key = (
                    o.supplier.as_str(),
                    o.sku.as_str(),
                    o.ripening_start.as_str(),
                );
                orders
                    .entry(key)
                    .and_modify(|sum| sum.qty += o.qty)
                    .or_insert_with(|| o.clone());
            }
            let orders: Vec<GrowerOrderRow> = orders.into_values().collect();
            if !orders.is_empty() {
                merge_grower_orders!(tx, &orders, GrowerOrderMerge::Add);
            }
            let mut begun = Vec::new();
            if !locked.is_empty() {
                let sql = format!(
                    concat!(
                        "INSERT INTO invoices (",
                        invoice_columns!(),
                        ") SELECT value->>0, value->>1, value->>2, value->>3,
                             CAST(value->>4 AS BIGINT), value->>5, value->>6,
                             CAST(value->>7 AS BIGINT), CAST(value->>8 AS BIGINT),
                             CAST(value->>9 AS BIGINT), CAST(value->>10 AS BIGINT),
                             CAST(value->>11 AS BIGINT)
                         FROM {}"
                    ),
                    super::json_rows(&tx, 1)
                );
                let json = super::json_array(locked.iter().map(|l| {
                    let i = &l.invoice;
                    (
                        &i.id,
                        &i.subscription_id,
                        &i.delivery_id,
                        &i.delivery_date,
                        i.amount_minor,
                        &i.currency,
                        &i.status,
                        i.attempts,
                        i.first_failed_at,
                        i.next_attempt_at,
                        i.created_at,
                        i.paid_at,
                    )
                }));
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(json)
                    .execute(&mut *tx)
                    .await?;
                let charges: Vec<&NewIntent> = locked.iter().map(|l| &l.charge).collect();
                begun = insert_begun_intents!(tx, &charges, now);
            }
            let emails: Vec<&NewEmail> = locked.iter().map(|l| &l.email).collect();
            enqueue_emails!(tx, &emails, now);
            tx.commit().await?;
            Ok(Locked {
                locked: locked.len(),
                charges: begun,
                orders,
            })
        })
    }

    pub async fn box_plan(&self, profile: &str) -> StoreResult<Option<String>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT lines FROM box_plans WHERE profile = $1")
                .bind(profile)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Stores a profile's box once: a box already stored stays (its deliveries were ordered
    /// with it), unless it is still the unusable text `replacing` (unreadable or empty), which
    /// the new box heals. A compare-and-set, so of two runs healing at once one writes.
    pub async fn save_box_plan(
        &self,
        profile: &str,
        lines: &str,
        cost: i64,
        now: i64,
        replacing: Option<&str>,
    ) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(
                "INSERT INTO box_plans (profile, lines, cost_minor, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (profile) DO UPDATE
                 SET lines = excluded.lines, cost_minor = excluded.cost_minor,
                     created_at = excluded.created_at
                 WHERE box_plans.lines = $5",
            )
            .bind(profile)
            .bind(lines)
            .bind(cost)
            .bind(now)
            .bind(replacing)
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }

    /// How many invoices are in `status` (all subscriptions).
    pub async fn count_invoices(&self, status: &str) -> StoreResult<i64> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM invoices WHERE status = $1")
                .bind(status)
                .fetch_one(pool)
                .await?
        }))
    }

    pub async fn invoices_of(&self, subscription_id: &str) -> StoreResult<Vec<InvoiceRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                invoice_columns!(),
                " FROM invoices WHERE subscription_id = $1 ORDER BY delivery_date"
            ))
            .bind(subscription_id)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Past-due invoices: those awaiting a dunning decision (`next_attempt_at` unset) and those
    /// whose retry is due by `now`.
    pub async fn past_due_invoices(&self, now: i64) -> StoreResult<Vec<InvoiceRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(PAST_DUE_INVOICES)
                .bind(now)
                .fetch_all(pool)
                .await?
        }))
    }

    /// Plans the next dunning retry of a past-due invoice (once per failure) with its email
    /// and a timer; `false` when already planned.
    pub async fn plan_dunning_retry(
        &self,
        invoice_id: &str,
        at: i64,
        email: &NewEmail,
        job: &str,
        now: i64,
    ) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            let planned = sqlx::query(
                "UPDATE invoices SET next_attempt_at = $2
                 WHERE id = $1 AND status = 'past_due' AND next_attempt_at IS NULL",
            )
            .bind(invoice_id)
            .bind(at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if planned == 0 {
                return Ok(false);
            }
            let _new = enqueue_email!(tx, email, now);
            schedule_timer!(&mut *tx, job, at, now).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Starts a due dunning retry: clears the retry from the invoice (so its result gets a
    /// fresh dunning decision) and reopens its charge `intent_id`, in one transaction. `None`
    /// when the retry is not due or another run took it; `Some(false)` when the charge was not
    /// left declined or failed (nothing to send again).
    ///
    /// Why one transaction: the invoice's row lock is what a void waits on
    /// ([`Store::void_invoice`]), so a void never sees the charge resting and the invoice
    /// past due between the two steps, and a charge is never reopened on a void invoice (a
    /// void committed first makes the invoice step match nothing, which undoes the reopen).
    /// The charge comes first, then the invoice: the order in which a charge's result is
    /// recorded, so the two never wait on each other in a cycle.
    pub async fn begin_dunning_retry(
        &self,
        invoice_id: &str,
        intent_id: &str,
        now: i64,
    ) -> StoreResult<Option<bool>> {
        in_tx!(self, |tx| {
            let reopened = sqlx::query(super::payments::REOPEN_UNPAID_CHARGE)
                .bind(intent_id)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let taken = sqlx::query(
                "UPDATE invoices SET next_attempt_at = NULL
                 WHERE id = $1 AND status = 'past_due' AND next_attempt_at <= $2",
            )
            .bind(invoice_id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if taken == 0 {
                // Rolls back the reopen.
                return Ok(None);
            }
            tx.commit().await?;
            Ok(Some(reopened == 1))
        })
    }

    /// Voids a past-due invoice of a cancelled subscription, with its email: the box is held
    /// for payment and will not be sent, so nothing is owed and dunning stops. `false` when
    /// the invoice is not past due, its subscription is not cancelled, or its charge is out
    /// at the gateway (a pending intent): the dunning decision after that charge's result
    /// voids it then, if it did not pay.
    pub async fn void_invoice(
        &self,
        invoice_id: &str,
        email: &NewEmail,
        now: i64,
    ) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            // The update comes first to take the invoice's row lock, which a dunning retry
            // holds while it reopens the charge; the check after it is a new statement, so on
            // PostgreSQL it reads with a new snapshot and sees a charge reopened before the
            // lock was granted (a condition inside the update would read the old one).
            let voided = sqlx::query(
                "UPDATE invoices SET status = 'void', next_attempt_at = NULL
                 WHERE id = $1 AND status = 'past_due'
                   AND subscription_id IN (SELECT id FROM subscriptions WHERE status = 'cancelled')",
            )
            .bind(invoice_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if voided == 0 {
                return Ok(false);
            }
            let (charging,): (bool,) = sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM payment_intents
                                WHERE subject_id = $1 AND status = 'pending')",
            )
            .bind(invoice_id)
            .fetch_one(&mut *tx)
            .await?;
            if charging {
                // Rolls back the void: the charge's result decides.
                return Ok(false);
            }
            let _new = enqueue_email!(tx, email, now);
            tx.commit().await?;
            Ok(true)
        })
    }

    /// The last dunning step failed: the invoice is uncollectible, the subscription suspended,
    /// its open deliveries skipped; the shopper is told. Its other past-due invoices are
    /// given up with it (dunning stops with the subscription), save one whose charge is out
    /// at the gateway: its answer decides, and if declined it comes back here. Called for an
    /// invoice of a subscription already suspended, this gives that invoice up and tells
    /// nobody again. `false` when the subscription was cancelled meanwhile (the next dunning
    /// run voids the invoice instead) or the invoice is no longer past due.
    pub async fn suspend_for_nonpayment(
        &self,
        invoice: &InvoiceRow,
        email: &NewEmail,
        now: i64,
    ) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            // The subscription first: its row lock orders this against a cancel, which moves
            // the same row, so a subscription cancelled meanwhile is never suspended, told so,
            // or left with an uncollectible invoice instead of a void one.
            let newly = sqlx::query(
                "UPDATE subscriptions SET status = 'suspended', ended_at = $2
                 WHERE id = $1 AND status NOT IN ('cancelled', 'suspended')",
            )
            .bind(&invoice.subscription_id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            // Else already suspended, or cancelled: a new statement, so on PostgreSQL a
            // suspension committed while the update waited is read here.
            let suspended = newly || {
                let (suspended,): (bool,) = sqlx::query_as(
                    "SELECT EXISTS (SELECT 1 FROM subscriptions
                                    WHERE id = $1 AND status = 'suspended')",
                )
                .bind(&invoice.subscription_id)
                .fetch_one(&mut *tx)
                .await?;
                suspended
            };
            if !suspended {
                return Ok(false);
            }
            let moved = sqlx::query(
                "UPDATE invoices SET status = 'uncollectible', next_attempt_at = NULL
                 WHERE id = $1 AND status = 'past_due'",
            )
            .bind(&invoice.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 0 {
                return Ok(false);
            }
            sqlx::query(
                "UPDATE invoices SET status = 'uncollectible', next_attempt_at = NULL
                 WHERE subscription_id = $1 AND status = 'past_due'
                   AND NOT EXISTS (SELECT 1 FROM payment_intents p
                                   WHERE p.subject_id = invoices.id AND p.status = 'pending')",
            )
            .bind(&invoice.subscription_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE deliveries SET status = 'skipped', skip_reason = 'suspended',
                     amount_minor = NULL, lines = NULL
                 WHERE subscription_id = $1 AND status = 'scheduled'",
            )
            .bind(&invoice.subscription_id)
            .execute(&mut *tx)
            .await?;
            if newly {
                let _new = enqueue_email!(tx, email, now);
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Writes planned grower orders in one transaction, as `merge` says (a full
    /// recomputation, or a new subscription's boxes; concurrent adds both count). Lines
    /// already sent never change: a recomputation plans only what they do not cover, and
    /// boxes added after a line was sent go out as a supplementary line, also when the line
    /// is sent while the recomputation runs.
    /// `false` when a replacement was refused (see [`GrowerOrderMerge::Replace`]): nothing was
    /// written, and the caller reads the boxes again.
    pub async fn put_grower_orders(
        &self,
        rows: &[GrowerOrderRow],
        merge: GrowerOrderMerge<'_>,
    ) -> StoreResult<bool> {
        Ok(in_tx!(self, |tx| {
            let written = merge_grower_orders!(tx, rows, merge);
            tx.commit().await?;
            written
        }))
    }

    /// How many additions to the planned grower orders have been made, ever (see
    /// [`GrowerOrderMerge::Replace`]).
    pub async fn grower_order_adds(&self) -> StoreResult<i64> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(grower_order_adds!())
                .fetch_one(pool)
                .await?
        }))
    }

    /// Grower orders of a week (all weeks when `None`).
    pub async fn grower_orders(&self, week: Option<&str>) -> StoreResult<Vec<GrowerOrderRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, week, supplier, supplier_email, sku, qty, ripening_start, order_by,
                        status, sent_at
                 FROM grower_orders WHERE ($1 IS NULL OR week = $1)
                 ORDER BY order_by, supplier, sku",
            )
            .bind(week)
            .fetch_all(pool)
            .await?
        }))
    }

    /// The planned grower order lines whose order-by date (ISO) is `today` or earlier: the
    /// ones to send (the table keeps every line ever sent; these are a few).
    pub async fn due_grower_orders(&self, today: &str) -> StoreResult<Vec<GrowerOrderRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, week, supplier, supplier_email, sku, qty, ripening_start, order_by,
                        status, sent_at
                 FROM grower_orders WHERE status = 'planned' AND order_by <= $1
                 ORDER BY order_by, supplier, sku",
            )
            .bind(today)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Marks the planned lines among `ids` sent and writes one email of exactly those
    /// lines (`email_of`, given them as they were sent), in one transaction. A line sent
    /// meanwhile is left out, so each line is mailed once and the email never claims
    /// more, or less, than it marked. Returns the lines sent.
    pub async fn send_grower_orders(
        &self,
        ids: &[String],
        email_of: impl FnOnce(&[GrowerOrderRow]) -> NewEmail,
        now: i64,
    ) -> StoreResult<Vec<GrowerOrderRow>> {
        in_tx!(self, |tx| {
            let mut sent: Vec<GrowerOrderRow> = Vec::new();
            for id in ids {
                let row = sqlx::query_as(
                    "UPDATE grower_orders SET status = 'sent', sent_at = $2
                     WHERE id = $1 AND status = 'planned'
                     RETURNING id, week, supplier, supplier_email, sku, qty, ripening_start,
                               order_by, status, sent_at",
                )
                .bind(id)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                sent.extend(row);
            }
            if !sent.is_empty() {
                let _new = enqueue_email!(tx, &email_of(&sent), now);
            }
            tx.commit().await?;
            Ok(sent)
        })
    }
}
