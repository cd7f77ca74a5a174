//! Campaigns, quotes, pledges and purchase orders. Every transition is a guarded update on
//! the row's status (so a re-run or a race changes nothing twice), and the joins' capacity
//! guard is one conditional `UPDATE` of the campaign's pooled quantity backed by a `CHECK`.

use super::{
    IdempotencyBegin, IdempotencyClaim, IdempotencyDone, IntentRow, NewEmail, NewIntent, Store,
    StoreResult, StoredResponse,
};
use crate::domain::ledger::JournalEntry;
use crate::domain::presale::{JoinRefusal, Terms, admit};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// [`Store::balance_pending`]'s query: from the pending intents (the partial
/// `payment_intents_due` index) to their pledges by key, as the store's `poll_plans` test checks.
pub(super) const BALANCE_PENDING: &str = "SELECT EXISTS (
     SELECT 1 FROM payment_intents i CROSS JOIN pledges p
     WHERE p.id = i.subject_id AND i.status = 'pending' AND i.purpose = 'balance'
       AND p.campaign_id = $1 AND p.status = 'awaiting_balance')";

/// Inserts one quote inside the caller's transaction.
macro_rules! insert_quote {
    ($tx:ident, $q:expr) => {{
        let q: &QuoteRow = $q;
        sqlx::query(
            "INSERT INTO quotes (id, campaign_id, manufacturer_id, tiers, capacity, lead_time_days,
                 created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&q.id)
        .bind(&q.campaign_id)
        .bind(&q.manufacturer_id)
        .bind(&q.tiers)
        .bind(q.capacity)
        .bind(q.lead_time_days)
        .bind(q.created_at)
        .execute(&mut *$tx)
        .await?;
    }};
}

/// A campaign's quotes, oldest first.
const QUOTES_OF: &str =
    "SELECT id, campaign_id, manufacturer_id, tiers, capacity, lead_time_days, created_at
     FROM quotes WHERE campaign_id = $1 ORDER BY created_at, id";

/// What [`Store::put_quote`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotePut {
    Stored,
    /// The campaign has opened (or is no longer scheduled).
    TooLate,
    /// The terms refused the campaign's quotes with this one; nothing was written.
    Refused(String),
}

/// Applies one [`PledgeStep`] inside the caller's transaction: the guarded status move, then
/// (only if it moved) its intents, ledger entry and email. Evaluates to whether it moved.
macro_rules! apply_step {
    ($tx:ident, $step:expr, $now:expr) => {{
        let step: &PledgeStep = $step;
        let now: i64 = $now;
        let moved = sqlx::query(
            "UPDATE pledges
             SET status = $3, balance_minor = COALESCE($4, balance_minor),
                 refunded_minor = refunded_minor + $5,
                 balance_paid_at = CASE WHEN $3 = 'paid' THEN $6 ELSE balance_paid_at END,
                 ended_at = CASE WHEN $3 IN ('cancelled', 'refunded', 'defaulted') THEN $6
                                 ELSE ended_at END,
                 updated_at = $6
             WHERE id = $1 AND status = $2",
        )
        .bind(&step.pledge_id)
        .bind(step.from)
        .bind(step.to)
        .bind(step.balance_minor)
        .bind(step.refunded_minor)
        .bind(now)
        .execute(&mut *$tx)
        .await?
        .rows_affected()
            == 1;
        if moved {
            if let Some(charge) = &step.charge {
                let _new = insert_intent!($tx, charge, now);
            }
            if let Some(refund) = &step.refund {
                // The deposit succeeded (the pledge was active), so there is room to refund.
                let _taken = decide_refund!($tx, refund, now);
            }
            if let Some(entry) = &step.entry {
                post_entry!($tx, entry, now);
            }
            if let Some(email) = &step.email {
                let _new = enqueue_email!($tx, email, now);
            }
        }
        moved
    }};
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct CampaignRow {
    pub id: String,
    pub title: String,
    pub sku: String,
    pub currency: String,
    pub reference_price_minor: i64,
    pub deposit_bps: i64,
    pub deposit_per_unit_minor: i64,
    pub deposit_refundable: bool,
    pub opens_at: i64,
    pub closes_at: i64,
    pub time_zone: String,
    pub balance_window_hours: i64,
    pub variants: String,
    pub status: String,
    pub pooled_qty: i64,
    pub capacity: Option<i64>,
    pub price_ceiling_minor: Option<i64>,
    pub locked_price_minor: Option<i64>,
    pub final_unit_price_minor: Option<i64>,
    pub balance_due_at: Option<i64>,
    pub surplus_qty: i64,
    pub shortfall_minor: i64,
    pub closed_at: Option<i64>,
    pub settled_at: Option<i64>,
    pub created_at: i64,
}

/// Inserts pledges (`$rows`: `&[&(PledgeRow, _)]`) with one multi-row statement inside the
/// caller's transaction.
macro_rules! insert_pledges {
    ($tx:ident, $rows:expr, $now:expr) => {{
        let rows: &[&NewPledge] = $rows;
        let sql = format!(
            "INSERT INTO pledges (id, campaign_id, shopper_id, qty, variant, status,
                 deposit_minor, price_ceiling_minor, created_at, balance_minor, balance_paid_at,
                 refunded_minor, ended_at, updated_at)
             SELECT value->>0, value->>1, value->>2, CAST(value->>3 AS BIGINT), value->>4,
                 value->>5, CAST(value->>6 AS BIGINT), CAST(value->>7 AS BIGINT), $2, NULL, NULL,
                 0, NULL, $2
             FROM {}",
            super::json_rows(&$tx, 1)
        );
        let json = super::json_array(rows.iter().map(|NewPledge { pledge: p, .. }| {
            (
                &p.id,
                &p.campaign_id,
                &p.shopper_id,
                p.qty,
                &p.variant,
                &p.status,
                p.deposit_minor,
                p.price_ceiling_minor,
            )
        }));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(json)
            .bind($now)
            .execute(&mut *$tx)
            .await?;
    }};
}

macro_rules! campaign_columns {
    () => {
        "id, title, sku, currency, reference_price_minor, deposit_bps, deposit_per_unit_minor,
         deposit_refundable, opens_at, closes_at, time_zone, balance_window_hours, variants,
         status, pooled_qty, capacity, price_ceiling_minor, locked_price_minor,
         final_unit_price_minor, balance_due_at, surplus_qty, shortfall_minor, closed_at,
         settled_at, created_at"
    };
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct QuoteRow {
    pub id: String,
    pub campaign_id: String,
    pub manufacturer_id: String,
    /// JSON `[{"min_qty", "unit_price_scaled"}]`.
    pub tiers: String,
    pub capacity: Option<i64>,
    pub lead_time_days: i64,
    pub created_at: i64,
}

/// A request in a join batch ([`Store::join_campaign`]).
#[derive(Debug, Clone)]
pub struct JoinAttempt {
    /// The request's `Idempotency-Key`, claimed in the transaction that takes the units.
    pub claim: Option<IdempotencyClaim>,
    /// The pledge asked for; none when the request failed its checks (its key is let go).
    pub join: Option<NewPledge>,
}

/// What a join batch decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinDecision {
    /// The units are taken and the pledge written.
    Admitted,
    /// Nothing taken: the campaign is not open or too few units are left.
    Refused(JoinRefusal),
    /// The request's key was used before (replay, in flight, another request): nothing judged.
    KeyUsed(IdempotencyBegin),
    /// The request failed its checks and asked for no pledge.
    NotAsked,
}

/// A pledge to write in a join batch ([`Store::join_campaign`]).
#[derive(Debug, Clone)]
pub struct NewPledge {
    pub pledge: PledgeRow,
    /// The deposit to charge; none when nothing is due.
    pub deposit: Option<NewIntent>,
    /// The answer to remember for the attempt's `Idempotency-Key` (its `claim`), written with
    /// the pledge: a retry after a crash then replays it instead of joining a second time.
    pub response: Option<StoredResponse>,
    /// The confirmation email: written with the pledge when nothing is due, otherwise with
    /// its deposit's success.
    pub confirmation: Option<NewEmail>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct PledgeRow {
    pub seq: i64,
    pub id: String,
    pub campaign_id: String,
    pub shopper_id: String,
    pub qty: i64,
    pub variant: Option<String>,
    pub status: String,
    pub deposit_minor: i64,
    pub price_ceiling_minor: i64,
    pub balance_minor: Option<i64>,
    pub balance_paid_at: Option<i64>,
    pub refunded_minor: i64,
    pub created_at: i64,
    pub ended_at: Option<i64>,
    pub updated_at: i64,
}

macro_rules! pledge_columns {
    () => {
        "seq, id, campaign_id, shopper_id, qty, variant, status, deposit_minor,
         price_ceiling_minor, balance_minor, balance_paid_at, refunded_minor, created_at,
         ended_at, updated_at"
    };
}

/// A [`PledgeContact`] as selected, with its intent's status and attempt count last.
type PledgeIntentTuple = (
    i64,
    String,
    String,
    i64,
    Option<String>,
    i64,
    Option<i64>,
    String,
    String,
    Option<String>,
    i64,
);

/// A pledge with what its emails need.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PledgeContact {
    pub seq: i64,
    pub id: String,
    pub shopper_id: String,
    pub qty: i64,
    pub variant: Option<String>,
    pub deposit_minor: i64,
    pub balance_minor: Option<i64>,
    pub email: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct PurchaseOrderRow {
    pub seq: i64,
    pub id: String,
    pub campaign_id: String,
    pub manufacturer_id: String,
    pub quote_id: String,
    pub currency: String,
    pub qty: i64,
    pub unit_price_scaled: i64,
    pub total_minor: i64,
    /// JSON `[{"variant", "qty"}]`.
    pub lines: String,
    pub issued_at: i64,
    pub ship_by: String,
}

/// One pledge's move at close or at the end of the balance window, with what it books.
#[derive(Debug, Clone)]
pub struct PledgeStep {
    pub pledge_id: String,
    /// The status it must have now.
    pub from: &'static str,
    pub to: &'static str,
    pub balance_minor: Option<i64>,
    pub refunded_minor: i64,
    /// Charges and refunds to commit with the move.
    pub charge: Option<NewIntent>,
    pub refund: Option<NewIntent>,
    pub entry: Option<JournalEntry>,
    pub email: Option<NewEmail>,
}

/// The end of a settlement: the campaign's final numbers, its purchase orders and what they
/// book and tell.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub final_unit_price_minor: i64,
    pub surplus_qty: i64,
    pub shortfall_minor: i64,
    pub orders: Vec<PurchaseOrderRow>,
    pub entry: Option<JournalEntry>,
    pub emails: Vec<NewEmail>,
}

impl Store {
    /// Creates a campaign with its quotes and its `timers` (job, instant in µs).
    pub async fn create_campaign(
        &self,
        c: &CampaignRow,
        quotes: &[QuoteRow],
        timers: &[(&str, i64)],
    ) -> StoreResult<()> {
        in_tx!(self, |tx| {
            sqlx::query(concat!(
                "INSERT INTO campaigns (",
                campaign_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                           $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)"
            ))
            .bind(&c.id)
            .bind(&c.title)
            .bind(&c.sku)
            .bind(&c.currency)
            .bind(c.reference_price_minor)
            .bind(c.deposit_bps)
            .bind(c.deposit_per_unit_minor)
            .bind(c.deposit_refundable)
            .bind(c.opens_at)
            .bind(c.closes_at)
            .bind(&c.time_zone)
            .bind(c.balance_window_hours)
            .bind(&c.variants)
            .bind(&c.status)
            .bind(c.pooled_qty)
            .bind(c.capacity)
            .bind(c.price_ceiling_minor)
            .bind(c.locked_price_minor)
            .bind(c.final_unit_price_minor)
            .bind(c.balance_due_at)
            .bind(c.surplus_qty)
            .bind(c.shortfall_minor)
            .bind(c.closed_at)
            .bind(c.settled_at)
            .bind(c.created_at)
            .execute(&mut *tx)
            .await?;
            for q in quotes {
                insert_quote!(tx, q);
            }
            for &(job, at) in timers {
                schedule_timer!(&mut *tx, job, at, c.created_at).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn campaign(&self, id: &str) -> StoreResult<Option<CampaignRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                campaign_columns!(),
                " FROM campaigns WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// The campaigns shoppers can see (open and scheduled), soonest deadline first: up to
    /// `limit` of them after the one at `after` (`(closes_at, id)`, the listing's order).
    pub async fn listed_campaigns(
        &self,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> StoreResult<Vec<CampaignRow>> {
        let (closes_at, id) = after.unwrap_or((i64::MIN, ""));
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                campaign_columns!(),
                " FROM campaigns WHERE status IN ('open', 'scheduled')
                   AND (closes_at > $1 OR (closes_at = $1 AND id > $2))
                 ORDER BY closes_at, id LIMIT $3"
            ))
            .bind(closes_at)
            .bind(id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }

    /// The quantity of the last price step announced to campaign `id`'s pledgers (0: none).
    pub async fn announced_step(&self, id: &str) -> StoreResult<i64> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT announced_step_qty FROM campaigns WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
                .unwrap_or(0)
        }))
    }

    /// Records that the step at `min_qty` was announced (never moving back to a lower one).
    pub async fn mark_step_announced(&self, id: &str, min_qty: i64) -> StoreResult<()> {
        on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE campaigns SET announced_step_qty = $2
                 WHERE id = $1 AND announced_step_qty < $2",
            )
            .bind(id)
            .bind(min_qty)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Campaigns in one of two statuses, by deadline.
    pub async fn campaigns_in(&self, a: &str, b: &str) -> StoreResult<Vec<CampaignRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                campaign_columns!(),
                " FROM campaigns WHERE status IN ($1, $2) ORDER BY closes_at, id"
            ))
            .bind(a)
            .bind(b)
            .fetch_all(pool)
            .await?
        }))
    }

    pub async fn quotes(&self, campaign_id: &str) -> StoreResult<Vec<QuoteRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(QUOTES_OF)
                .bind(campaign_id)
                .fetch_all(pool)
                .await?
        }))
    }

    /// Adds or replaces a manufacturer's quote while the campaign is still scheduled and before
    /// it opens at `now`, with the terms `terms` derives from the campaign's quotes as they
    /// then stand (capacity, ceiling), or nothing when it refuses them.
    ///
    /// One transaction: the opening (and every reader) sees a quote only with its terms, and
    /// two manufacturers quoting at once are judged one after the other (the guarded update
    /// holds the campaign's row), so together they cannot pass a limit each passes alone.
    pub async fn put_quote(
        &self,
        q: &QuoteRow,
        now: i64,
        terms: impl FnOnce(&[QuoteRow]) -> Result<Terms, String>,
    ) -> StoreResult<QuotePut> {
        in_tx!(self, |tx| {
            let open = sqlx::query(
                "UPDATE campaigns SET status = status
                 WHERE id = $1 AND status = 'scheduled' AND opens_at > $2",
            )
            .bind(&q.campaign_id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if open == 0 {
                return Ok(QuotePut::TooLate);
            }
            sqlx::query("DELETE FROM quotes WHERE campaign_id = $1 AND manufacturer_id = $2")
                .bind(&q.campaign_id)
                .bind(&q.manufacturer_id)
                .execute(&mut *tx)
                .await?;
            insert_quote!(tx, q);
            let quotes: Vec<QuoteRow> = sqlx::query_as(QUOTES_OF)
                .bind(&q.campaign_id)
                .fetch_all(&mut *tx)
                .await?;
            let terms = match terms(&quotes) {
                Ok(terms) => terms,
                // Dropping the transaction rolls the quote back.
                Err(reason) => return Ok(QuotePut::Refused(reason)),
            };
            sqlx::query(
                "UPDATE campaigns SET capacity = $2, price_ceiling_minor = $3 WHERE id = $1",
            )
            .bind(&q.campaign_id)
            .bind(terms.capacity)
            .bind(terms.ceiling.map(|m| m.minor()))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(QuotePut::Stored)
        })
    }

    /// Opens scheduled campaigns whose time has come, including one whose deadline passed
    /// while the service was down: the close that follows in the same run then settles it,
    /// where skipping it would leave it `scheduled` for ever.
    pub async fn open_due_campaigns(&self, now: i64) -> StoreResult<u64> {
        Ok(on_writer!(self, |pool| {
            sqlx::query(
                "UPDATE campaigns SET status = 'open' WHERE status = 'scheduled' AND opens_at <= $1",
            )
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// Takes the units of a batch of joins of one campaign (group commit), all in one
    /// transaction:
    /// - each request's `Idempotency-Key` is claimed first (`claim_keys!`): a key used before
    ///   (to replay, still in flight, or with another request) decides that request, which
    ///   takes nothing;
    /// - the pledges asked for are admitted in order while units are left, then one guarded
    ///   update adds their total and multi-row inserts write the pledges and their deposit
    ///   intents (with their first attempt taken, returned for the caller to send at once);
    /// - an admitted pledge's `response` is remembered for its key, and a pledge with nothing
    ///   to pay has its confirmation written;
    /// - the keys of requests that took nothing (refused, or failed their checks) are let go,
    ///   so a retry runs afresh.
    ///
    /// The update is guarded on the quantity read, so a concurrent writer (another instance)
    /// makes the batch start over, never oversell.
    pub async fn join_campaign(
        &self,
        campaign_id: &str,
        attempts: &[JoinAttempt],
        now: DateTime<Utc>,
        abandon_after: chrono::Duration,
    ) -> StoreResult<(Vec<JoinDecision>, Vec<IntentRow>)> {
        let now_us = super::micros(now);
        loop {
            let decided = in_tx!(self, |tx| 'batch: {
                let claims: Vec<&IdempotencyClaim> =
                    attempts.iter().filter_map(|a| a.claim.as_ref()).collect();
                let mut claimed = claim_keys!(tx, &claims, now, abandon_after).into_iter();
                let mut decisions: Vec<Option<JoinDecision>> = attempts
                    .iter()
                    .map(|a| match a.claim.as_ref().map(|_| claimed.next()) {
                        Some(Some(IdempotencyBegin::Run)) | None => None,
                        Some(Some(used)) => Some(JoinDecision::KeyUsed(used)),
                        Some(None) => unreachable!("one outcome per claim"),
                    })
                    .collect();
                for (d, a) in decisions.iter_mut().zip(attempts) {
                    if d.is_none() && a.join.is_none() {
                        *d = Some(JoinDecision::NotAsked);
                    }
                }
                let asked: Vec<usize> = (0..attempts.len())
                    .filter(|&i| decisions[i].is_none())
                    .collect();
                let state: Option<(i64, Option<i64>, bool, i64, i64)> = sqlx::query_as(
                    "SELECT pooled_qty, capacity, status = 'open', opens_at, closes_at
                     FROM campaigns WHERE id = $1",
                )
                .bind(campaign_id)
                .fetch_optional(&mut *tx)
                .await?;
                let (admitted, total) = match state {
                    Some((pooled, capacity, true, opens_at, closes_at)) => {
                        // Each join is judged at its own request's instant (its pledge's
                        // `created_at`), not the batch's: one sent just before the deadline
                        // stays in when a later request shares its batch.
                        let (in_time, late): (Vec<usize>, Vec<usize>) =
                            asked.into_iter().partition(|&i| {
                                attempts[i].join.as_ref().is_some_and(|j| {
                                    (opens_at..closes_at).contains(&j.pledge.created_at)
                                })
                            });
                        for &i in &late {
                            decisions[i] = Some(JoinDecision::Refused(JoinRefusal::NotOpen));
                        }
                        let quantities = in_time
                            .iter()
                            .filter_map(|&i| Some(attempts[i].join.as_ref()?.pledge.qty));
                        let (answers, total) = admit(quantities, pooled, capacity);
                        for (&i, answer) in in_time.iter().zip(answers) {
                            decisions[i] = Some(match answer {
                                Ok(()) => JoinDecision::Admitted,
                                Err(refusal) => JoinDecision::Refused(refusal),
                            });
                        }
                        let taken = total == 0
                            || sqlx::query(
                                "UPDATE campaigns SET pooled_qty = pooled_qty + $2
                                 WHERE id = $1 AND pooled_qty = $3 AND status = 'open'",
                            )
                            .bind(campaign_id)
                            .bind(total)
                            .bind(pooled)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected()
                                == 1;
                        if !taken {
                            // Another writer moved the count: start over (this rolls back).
                            break 'batch None;
                        }
                        (in_time, total)
                    }
                    _ => {
                        for &i in &asked {
                            decisions[i] = Some(JoinDecision::Refused(JoinRefusal::NotOpen));
                        }
                        (Vec::new(), 0)
                    }
                };
                let decisions: Vec<JoinDecision> = decisions.into_iter().flatten().collect();
                let admitted: Vec<&JoinAttempt> = admitted
                    .iter()
                    .filter(|&&i| matches!(decisions[i], JoinDecision::Admitted))
                    .map(|&i| &attempts[i])
                    .collect();
                let responses: Vec<IdempotencyDone> = admitted
                    .iter()
                    .filter_map(|a| {
                        let claim = a.claim.as_ref()?;
                        let join = a.join.as_ref()?;
                        Some(IdempotencyDone {
                            scope: claim.scope.clone(),
                            key: claim.key.clone(),
                            response: join.response.clone()?,
                            // With a deposit to charge, the answer is the pledge pending.
                            provisional: join.deposit.is_some(),
                        })
                    })
                    .collect();
                let admitted: Vec<&NewPledge> =
                    admitted.iter().filter_map(|a| a.join.as_ref()).collect();
                let mut begun = Vec::new();
                if total > 0 {
                    insert_pledges!(tx, &admitted, now_us);
                    let intents: Vec<&NewIntent> =
                        admitted.iter().filter_map(|j| j.deposit.as_ref()).collect();
                    if !intents.is_empty() {
                        begun = insert_begun_intents!(tx, &intents, now_us);
                    }
                    remember_responses!(&mut *tx, &responses);
                    let confirmed: Vec<&NewEmail> = admitted
                        .iter()
                        .filter(|j| j.deposit.is_none())
                        .filter_map(|j| j.confirmation.as_ref())
                        .collect();
                    if !confirmed.is_empty() {
                        enqueue_emails!(tx, &confirmed, now_us);
                    }
                }
                let let_go: Vec<(&str, &str)> = attempts
                    .iter()
                    .zip(&decisions)
                    .filter(|(_, d)| matches!(d, JoinDecision::Refused(_) | JoinDecision::NotAsked))
                    .filter_map(|(a, _)| a.claim.as_ref())
                    .map(|c| (c.scope.as_str(), c.key.as_str()))
                    .collect();
                release_keys!(tx, &let_go);
                tx.commit().await?;
                Some((decisions, begun))
            });
            if let Some(decided) = decided {
                return Ok(decided);
            }
        }
    }

    pub async fn pledge(&self, id: &str) -> StoreResult<Option<PledgeRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                pledge_columns!(),
                " FROM pledges WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// The pledges of `ids` that exist, by id, read with one query.
    pub async fn pledges_by_id(
        &self,
        ids: &[&str],
    ) -> StoreResult<std::collections::HashMap<String, PledgeRow>> {
        self.rows_by_id(pledge_columns!(), "pledges", ids, |p: &PledgeRow| &p.id)
            .await
    }

    /// A shopper's pledges (never the declined ones), newest first; `after` is a `seq`.
    pub async fn pledges_of_shopper(
        &self,
        shopper_id: &str,
        after: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<PledgeRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                pledge_columns!(),
                " FROM pledges WHERE shopper_id = $1 AND status <> 'declined'
                   AND ($2 IS NULL OR seq < $2)
                 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(shopper_id)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Up to `limit` pledges of a campaign in `status` after `after_seq`, in `seq` order, with
    /// their shoppers' contact details. Callers page through with the last `seq`, so a
    /// campaign of any size is read a chunk at a time.
    pub async fn pledge_contacts(
        &self,
        campaign_id: &str,
        status: &str,
        after_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<PledgeContact>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT p.seq, p.id, p.shopper_id, p.qty, p.variant, p.deposit_minor,
                        p.balance_minor, s.email, s.name
                 FROM pledges p JOIN shoppers s ON s.id = p.shopper_id
                 WHERE p.campaign_id = $1 AND p.status = $2 AND p.seq > $3
                 ORDER BY p.seq LIMIT $4",
            )
            .bind(campaign_id)
            .bind(status)
            .bind(after_seq)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Whether a pledge of the campaign still awaits a balance the gateway has not answered.
    /// Read from the pending intents' side: there are few of them, whatever the campaign's size.
    /// `CROSS JOIN` is how SQLite is told that order (PostgreSQL plans it as any join):
    /// otherwise it starts from the campaign's pledges awaiting their balance, all of them.
    pub async fn balance_pending(&self, campaign_id: &str) -> StoreResult<bool> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(BALANCE_PENDING)
                .bind(campaign_id)
                .fetch_one(pool)
                .await?
        }))
    }

    /// Up to `limit` pledges of a campaign in `pledge_status` after `after_seq`, in `seq`
    /// order, with contacts and their `purpose` intent's status and attempts (`None` for a
    /// pledge without one), for the emails and retries that follow gateway results. Callers
    /// page with the last `seq` and filter on the intent: the chunk is taken from the pledges'
    /// index first, so each read costs one chunk whatever the planner makes of the join.
    /// Intents are found by their deterministic id (`pi_{purpose}_{pledge}`).
    pub async fn pledges_with_intents(
        &self,
        campaign_id: &str,
        (pledge_status, purpose): (&str, &str),
        after_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<(PledgeContact, Option<String>, i64)>> {
        let rows: Vec<PledgeIntentTuple> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT p.seq, p.id, p.shopper_id, p.qty, p.variant, p.deposit_minor,
                        p.balance_minor, s.email, s.name, i.status, COALESCE(i.attempts, 0)
                 FROM (SELECT * FROM pledges
                       WHERE campaign_id = $1 AND status = $2 AND seq > $4
                       ORDER BY seq LIMIT $5) AS p
                 JOIN shoppers s ON s.id = p.shopper_id
                 LEFT JOIN payment_intents i ON i.id = 'pi_' || $3 || '_' || p.id
                 ORDER BY p.seq",
            )
            .bind(campaign_id)
            .bind(pledge_status)
            .bind(purpose)
            .bind(after_seq)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    PledgeContact {
                        seq: r.0,
                        id: r.1,
                        shopper_id: r.2,
                        qty: r.3,
                        variant: r.4,
                        deposit_minor: r.5,
                        balance_minor: r.6,
                        email: r.7,
                        name: r.8,
                    },
                    r.9,
                    r.10,
                )
            })
            .collect())
    }

    /// Cancels an active pledge before the deadline: releases its units and commits its
    /// refund (or books its forfeit). `false` when it is not active or the campaign has closed.
    pub async fn cancel_pledge(
        &self,
        step: &PledgeStep,
        qty: i64,
        campaign_id: &str,
        now: i64,
    ) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            let released = sqlx::query(
                "UPDATE campaigns SET pooled_qty = pooled_qty - $2
                 WHERE id = $1 AND status = 'open' AND closes_at > $3",
            )
            .bind(campaign_id)
            .bind(qty)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if released == 0 {
                return Ok(false);
            }
            if !apply_step!(tx, step, now) {
                // Dropping the transaction gives the units back.
                return Ok(false);
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Moves a campaign from `from` to `to` (with the close-time numbers), and schedules `job`
    /// at `timer_at` if given. `false` when it was not in `from`, or, with `as_pooled`, when its
    /// pooled quantity is no longer the one the move was decided on (a join or a cancel
    /// committed since it was read: the close must decide again).
    #[allow(clippy::too_many_arguments)]
    pub async fn move_campaign(
        &self,
        id: &str,
        from: &[&str],
        as_pooled: Option<i64>,
        to: &str,
        locked_price_minor: Option<i64>,
        balance_due_at: Option<i64>,
        timer: Option<(&str, i64)>,
        now: i64,
    ) -> StoreResult<bool> {
        let (a, b) = match from {
            [a] => (*a, *a),
            [a, b, ..] => (*a, *b),
            [] => return Ok(false),
        };
        in_tx!(self, |tx| {
            let moved = sqlx::query(
                "UPDATE campaigns
                 SET status = $4, locked_price_minor = COALESCE($5, locked_price_minor),
                     balance_due_at = COALESCE($6, balance_due_at),
                     closed_at = COALESCE(closed_at, $7)
                 WHERE id = $1 AND status IN ($2, $3)
                   AND ($8 IS NULL OR pooled_qty = $8)",
            )
            .bind(id)
            .bind(a)
            .bind(b)
            .bind(to)
            .bind(locked_price_minor)
            .bind(balance_due_at)
            .bind(now)
            .bind(as_pooled)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 0 {
                return Ok(false);
            }
            if let Some((job, at)) = timer {
                schedule_timer!(&mut *tx, job, at, now).await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Applies pledge steps (one per pledge) in one transaction, set-based: one guarded update
    /// moves every pledge still in its step's `from` status, and what the moved ones book is
    /// written with one statement per kind (refunds, which take from their charge, one by
    /// one). Charges are committed with their first attempt taken, for the caller to send
    /// right after. Returns how many applied, and those charges; a step whose pledge moved on
    /// changes nothing.
    pub async fn apply_pledge_steps(
        &self,
        steps: &[PledgeStep],
        now: i64,
    ) -> StoreResult<(usize, Vec<IntentRow>)> {
        if steps.is_empty() {
            return Ok((0, Vec::new()));
        }
        in_tx!(self, |tx| {
            let sql = format!(
                "UPDATE pledges
                 SET status = v.to_status,
                     balance_minor = COALESCE(v.balance, pledges.balance_minor),
                     refunded_minor = pledges.refunded_minor + v.refunded,
                     balance_paid_at = CASE WHEN v.to_status = 'paid' THEN $2
                                            ELSE pledges.balance_paid_at END,
                     ended_at = CASE WHEN v.to_status IN ('cancelled', 'refunded', 'defaulted')
                                     THEN $2 ELSE pledges.ended_at END,
                     updated_at = $2
                 FROM (SELECT value->>0 AS id, value->>1 AS from_status, value->>2 AS to_status,
                           CAST(value->>3 AS BIGINT) AS balance,
                           CAST(value->>4 AS BIGINT) AS refunded
                       FROM {}) AS v
                 WHERE pledges.id = v.id AND pledges.status = v.from_status
                 RETURNING pledges.id",
                super::json_rows(&tx, 1)
            );
            let json = super::json_array(steps.iter().map(|s| {
                (
                    &s.pledge_id,
                    s.from,
                    s.to,
                    s.balance_minor,
                    s.refunded_minor,
                )
            }));
            let moved: std::collections::HashSet<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(json)
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
            let applied: Vec<&PledgeStep> = steps
                .iter()
                .filter(|s| moved.contains(&s.pledge_id))
                .collect();
            let charges: Vec<&NewIntent> =
                applied.iter().filter_map(|s| s.charge.as_ref()).collect();
            let mut begun = Vec::new();
            if !charges.is_empty() {
                begun = insert_begun_intents!(tx, &charges, now);
            }
            for refund in applied.iter().filter_map(|s| s.refund.as_ref()) {
                // The deposit succeeded (the pledge was active), so there is room to refund.
                let _taken = decide_refund!(tx, refund, now);
            }
            // Each entry's cause is its pledge's move, which the guarded update let through
            // once, so none can have been booked before.
            let entries: Vec<JournalEntry> =
                applied.iter().filter_map(|s| s.entry.clone()).collect();
            post_entries!(tx, &entries, now);
            let emails: Vec<&NewEmail> = applied.iter().filter_map(|s| s.email.as_ref()).collect();
            enqueue_emails!(tx, &emails, now);
            tx.commit().await?;
            Ok((applied.len(), begun))
        })
    }

    /// Paid units by variant (`""` for none) and the money shoppers paid, for the final award.
    pub async fn paid_demand(&self, campaign_id: &str) -> StoreResult<Vec<(String, i64)>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT COALESCE(variant, ''), CAST(SUM(qty) AS BIGINT) FROM pledges
                 WHERE campaign_id = $1 AND status = 'paid'
                 GROUP BY COALESCE(variant, '') ORDER BY 1",
            )
            .bind(campaign_id)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Live demand by variant (pending and active pledges count, as they hold units).
    pub async fn live_demand(&self, campaign_id: &str) -> StoreResult<Vec<(String, i64)>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT COALESCE(variant, ''), CAST(SUM(qty) AS BIGINT) FROM pledges
                 WHERE campaign_id = $1
                   AND status IN ('pending', 'active', 'awaiting_balance', 'paid', 'defaulted')
                 GROUP BY COALESCE(variant, '') ORDER BY 1",
            )
            .bind(campaign_id)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Every change to the pooled quantity: `(at, +qty)` when a pledge started counting and
    /// `(at, −qty)` when it was cancelled.
    pub async fn demand_changes(&self, campaign_id: &str) -> StoreResult<Vec<(i64, i64)>> {
        let rows: Vec<(i64, i64, Option<i64>, String)> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT created_at, qty, ended_at, status FROM pledges
                 WHERE campaign_id = $1 AND status NOT IN ('pending', 'declined')",
            )
            .bind(campaign_id)
            .fetch_all(pool)
            .await?
        });
        let mut changes = Vec::with_capacity(rows.len());
        for (created, qty, ended, status) in rows {
            changes.push((created, qty));
            // Only cancellations before the deadline took units out of the pool.
            if status == "cancelled"
                && let Some(ended) = ended
            {
                changes.push((ended, -qty));
            }
        }
        changes.sort_unstable();
        Ok(changes)
    }

    /// Money the campaign's ledger holds for it: Σ deposits applied and Σ balances of paid
    /// pledges, and Σ deposits forfeited.
    pub async fn campaign_money(&self, campaign_id: &str) -> StoreResult<(i64, i64, i64)> {
        let row: (Option<i64>, Option<i64>, Option<i64>) = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT
                   CAST(SUM(CASE WHEN status = 'paid' THEN deposit_minor - refunded_minor ELSE 0 END) AS BIGINT),
                   CAST(SUM(CASE WHEN status = 'paid' AND balance_minor > 0 THEN balance_minor ELSE 0 END) AS BIGINT),
                   CAST(SUM(CASE WHEN status = 'defaulted' THEN deposit_minor - refunded_minor ELSE 0 END) AS BIGINT)
                 FROM pledges WHERE campaign_id = $1",
            )
            .bind(campaign_id)
            .fetch_one(pool)
            .await?
        });
        Ok((row.0.unwrap_or(0), row.1.unwrap_or(0), row.2.unwrap_or(0)))
    }

    /// Pledges of the campaign still in `status` (a settlement may not finish before none
    /// are left in transitional states).
    pub async fn count_pledges(&self, campaign_id: &str, status: &str) -> StoreResult<i64> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM pledges WHERE campaign_id = $1 AND status = $2",
            )
            .bind(campaign_id)
            .bind(status)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Finishes a settling campaign: final numbers, purchase orders, the settlement entry and
    /// emails, once.
    pub async fn finish_settlement(
        &self,
        campaign_id: &str,
        s: &Settlement,
        now: i64,
    ) -> StoreResult<bool> {
        in_tx!(self, |tx| {
            let moved = sqlx::query(
                "UPDATE campaigns SET status = 'succeeded', final_unit_price_minor = $2,
                     surplus_qty = $3, shortfall_minor = $4, settled_at = $5
                 WHERE id = $1 AND status = 'settling'",
            )
            .bind(campaign_id)
            .bind(s.final_unit_price_minor)
            .bind(s.surplus_qty)
            .bind(s.shortfall_minor)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 0 {
                return Ok(false);
            }
            for po in &s.orders {
                sqlx::query(
                    "INSERT INTO purchase_orders (id, campaign_id, manufacturer_id, quote_id,
                         currency, qty, unit_price_scaled, total_minor, lines, issued_at, ship_by)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(&po.id)
                .bind(&po.campaign_id)
                .bind(&po.manufacturer_id)
                .bind(&po.quote_id)
                .bind(&po.currency)
                .bind(po.qty)
                .bind(po.unit_price_scaled)
                .bind(po.total_minor)
                .bind(&po.lines)
                .bind(po.issued_at)
                .bind(&po.ship_by)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(entry) = &s.entry {
                post_entry!(tx, entry, now);
            }
            for email in &s.emails {
                let _new = enqueue_email!(tx, email, now);
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Purchase orders, newest first, optionally of one manufacturer; `after` is a `seq`.
    pub async fn purchase_orders(
        &self,
        manufacturer_id: Option<&str>,
        after: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<PurchaseOrderRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT seq, id, campaign_id, manufacturer_id, quote_id, currency, qty,
                        unit_price_scaled, total_minor, lines, issued_at, ship_by
                 FROM purchase_orders
                 WHERE ($1 IS NULL OR manufacturer_id = $1) AND ($2 IS NULL OR seq < $2)
                 ORDER BY seq DESC LIMIT $3",
            )
            .bind(manufacturer_id)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }

    pub async fn purchase_order(&self, id: &str) -> StoreResult<Option<PurchaseOrderRow>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT seq, id, campaign_id, manufacturer_id, quote_id, currency, qty,
                        unit_price_scaled, total_minor, lines, issued_at, ship_by
                 FROM purchase_orders WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Enqueues emails on their own transaction (each once by its key).
    pub async fn enqueue_emails(&self, emails: &[NewEmail], now: i64) -> StoreResult<()> {
        let emails: Vec<&NewEmail> = emails.iter().collect();
        in_tx!(self, |tx| {
            enqueue_emails!(tx, &emails, now);
            tx.commit().await?;
        });
        Ok(())
    }
}
