//! Fruit and flower subscriptions as a service: the catalog seed, subscribing, deliveries
//! kept ahead of time, the weekly plan and grower orders, renewal at each cutoff, dunning.
//!
//! The rules are in [`crate::domain::ripening`] and [`crate::domain::subscription`]; this
//! module reads rows, asks the rules, and writes each step as one guarded transaction.

pub mod emails;

use crate::batch::{InFlight, ReadAhead};
use crate::domain::identity::Shopper;
use crate::domain::ledger::Account;
use crate::domain::money::{Currency, Money};
use crate::domain::ripening::{self, BoxRequest, Ethylene, Item};
use crate::domain::subscription::{
    Dunning, cutoff_at, deliveries_between, dunning_step, first_delivery, parse_weekday,
    start_of_day,
};
use crate::payments::{Payments, PaymentsError};
use crate::store::{
    CatalogRow, DeliveryLock, DeliveryRow, GrowerOrderMerge, GrowerOrderRow, InvoiceRow, Locked,
    NewIntent, PlanRow, Store, StoreError, SubscriptionRow, micros,
};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};

pub const RENEW_JOB: &str = "subscription-renew";
pub const DUNNING_JOB: &str = "billing-dunning";
pub const GROWER_ORDERS_JOB: &str = "grower-orders";

/// Deliveries are kept this far ahead (so skips and pauses have rows to act on).
const HORIZON_DAYS: i64 = 28;

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Locked(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Payments(#[from] PaymentsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, SubscriptionError>;

/// The shipped catalog (`data/ripening_catalog.csv`, with sources) and our documented
/// defaults for what it lacks (`data/catalog_defaults.csv`: sku, unit cost, months, grower,
/// lead time).
pub fn shipped_catalog(now: i64) -> Vec<CatalogRow> {
    #[derive(Deserialize)]
    struct Ripening {
        name: String,
        ripening_days_min: i64,
        ripening_days_max: i64,
        ready_window_days: i64,
        ethylene_producer: String,
        ethylene_sensitive: String,
        category: String,
    }
    #[derive(Deserialize)]
    struct Defaults {
        name: String,
        sku: String,
        unit_cost: String,
        available_months: String,
        grower: String,
        grower_email: String,
        lead_time_days: i64,
    }
    let defaults: BTreeMap<String, Defaults> =
        csv::Reader::from_reader(include_str!("../../data/catalog_defaults.csv").as_bytes())
            .deserialize::<Defaults>()
            .filter_map(|r| r.ok())
            .map(|d| (d.name.clone(), d))
            .collect();
    let eur = Currency::parse("EUR").expect("EUR");
    csv::Reader::from_reader(include_str!("../../data/ripening_catalog.csv").as_bytes())
        .deserialize::<Ripening>()
        .filter_map(|r| r.ok())
        .filter_map(|r| {
            let d = defaults.get(&r.name)?;
            Some(CatalogRow {
                sku: d.sku.clone(),
                name: r.name.clone(),
                kind: r.category.clone(),
                ripening_days_min: r.ripening_days_min,
                ripening_days_max: r.ripening_days_max,
                ready_window_days: r.ready_window_days,
                ethylene_producer: Ethylene::parse(&r.ethylene_producer).as_str().into(),
                ethylene_sensitive: r.ethylene_sensitive == "yes",
                unit_cost_minor: Money::parse(&d.unit_cost, eur).ok()?.minor(),
                currency: "EUR".into(),
                available_months: d.available_months.clone(),
                grower: d.grower.clone(),
                grower_email: d.grower_email.clone(),
                lead_time_days: d.lead_time_days,
                updated_at: now,
            })
        })
        .collect()
}

/// The planner's view of a catalog item.
pub fn item_of(c: &CatalogRow) -> Item {
    Item {
        sku: c.sku.clone(),
        ripening_days_min: c.ripening_days_min,
        ripening_days_max: c.ripening_days_max,
        ready_window_days: c.ready_window_days,
        unit_cost_minor: c.unit_cost_minor,
        ethylene_producer: Ethylene::parse(&c.ethylene_producer),
        ethylene_sensitive: c.ethylene_sensitive,
        available_months: c
            .available_months
            .split_whitespace()
            .filter_map(|m| m.parse().ok())
            .collect(),
        lead_time_days: c.lead_time_days,
    }
}

/// A box line as stored on a delivery (days relative to the delivery date).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredLine {
    pub sku: String,
    pub name: String,
    pub qty: i64,
    pub ripened_days: i64,
    pub ready_from: i64,
    pub ready_until: i64,
}

pub fn lines_of(d: &DeliveryRow) -> Vec<StoredLine> {
    d.lines
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default()
}

pub fn zone_of(p: &PlanRow) -> Tz {
    p.time_zone.parse().unwrap_or(chrono_tz::UTC)
}

pub fn exclusions_of(s: &SubscriptionRow) -> Vec<String> {
    serde_json::from_str(&s.exclusions).unwrap_or_default()
}

pub fn date_of(s: &str) -> Result<NaiveDate> {
    s.parse()
        .map_err(|_| StoreError::Inconsistent(format!("bad date {s}")).into())
}

/// What a plan's items are on the days they count: fruit is ready to eat, flowers in bloom.
pub fn ready_word(plan: &PlanRow) -> &'static str {
    if plan.kind == "flower" {
        "in bloom"
    } else {
        "ready to eat"
    }
}

/// The date in `plan`'s zone at `now`.
pub fn today(plan: &PlanRow, now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&zone_of(plan)).date_naive()
}

/// A new delivery row for `date`: `scheduled`, made `skipped` as it goes in if its
/// subscription is paused then (see [`Store::add_deliveries`]).
fn delivery_row(sub: &SubscriptionRow, plan: &PlanRow, date: NaiveDate) -> DeliveryRow {
    DeliveryRow {
        id: crate::ids::new_id("dlv"),
        subscription_id: sub.id.clone(),
        delivery_date: date.to_string(),
        cutoff_at: micros(cutoff_at(date, zone_of(plan), plan.cutoff_hours)),
        status: "scheduled".into(),
        skip_reason: None,
        amount_minor: None,
        lines: None,
    }
}

/// The deliveries of a subscription from `from` to the horizon whose cutoff is still ahead
/// at `now`: one past its cutoff can no longer be skipped, planned or billed in time, so it
/// is never added (a renewal run would otherwise lock and bill it at once).
pub fn upcoming_rows(
    sub: &SubscriptionRow,
    plan: &PlanRow,
    from: NaiveDate,
    now: DateTime<Utc>,
) -> Result<Vec<DeliveryRow>> {
    rows_between(sub, plan, (from, from + Duration::days(HORIZON_DAYS)), now)
}

/// The date of `sub`'s first delivery on or after `from` whose cutoff is after `now`: the
/// first one made, which a welcome names (a first date already past its cutoff is not).
pub fn first_open_date(
    sub: &SubscriptionRow,
    plan: &PlanRow,
    from: NaiveDate,
    now: DateTime<Utc>,
) -> Result<NaiveDate> {
    // A cutoff is at most 14 days before its delivery and deliveries are at most 14 days
    // apart, so this span holds one.
    let span = (from, from + Duration::days(2 * HORIZON_DAYS));
    let first = rows_between(sub, plan, span, now)?.into_iter().next();
    let first = first.ok_or_else(|| {
        StoreError::Inconsistent(format!("no delivery of {} ahead of {from}", sub.id))
    })?;
    date_of(&first.delivery_date)
}

/// The row of `date` if it is one of `sub`'s delivery dates with its cutoff still ahead:
/// how a delivery beyond the rows kept ahead ([`HORIZON_DAYS`]) is made so that it can be
/// skipped long in advance. `None` for any other date.
pub fn delivery_on(
    sub: &SubscriptionRow,
    plan: &PlanRow,
    date: NaiveDate,
    now: DateTime<Utc>,
) -> Result<Option<DeliveryRow>> {
    Ok(rows_between(sub, plan, (date, date + Duration::days(1)), now)?.pop())
}

/// `sub`'s delivery rows with dates in `[from, until)` and their cutoffs after `now`.
fn rows_between(
    sub: &SubscriptionRow,
    plan: &PlanRow,
    (from, until): (NaiveDate, NaiveDate),
    now: DateTime<Utc>,
) -> Result<Vec<DeliveryRow>> {
    let weekday = parse_weekday(&sub.delivery_weekday)
        .ok_or_else(|| StoreError::Inconsistent(format!("bad weekday {}", sub.delivery_weekday)))?;
    let first = first_delivery(date_of(&sub.start_date)?, weekday);
    let now = micros(now);
    Ok(deliveries_between(first, plan.cadence_weeks, from, until)
        .into_iter()
        .map(|d| delivery_row(sub, plan, d))
        .filter(|d| d.cutoff_at > now)
        .collect())
}

pub async fn plan_of(store: &Store, id: &str) -> Result<PlanRow> {
    store
        .plan(id)
        .await?
        .ok_or_else(|| SubscriptionError::NotFound(format!("no plan {id}")))
}

/// The plan `id`, read once per run into `plans`.
async fn plan_in<'a>(
    store: &Store,
    plans: &'a mut BTreeMap<String, PlanRow>,
    id: &str,
) -> Result<&'a PlanRow> {
    if !plans.contains_key(id) {
        plans.insert(id.to_owned(), plan_of(store, id).await?);
    }
    Ok(&plans[id])
}

/// What a box of `plan` must meet for a delivery in `month`, planned `days_ahead` days before.
fn box_request<'a>(
    plan: &PlanRow,
    items: &'a [Item],
    exclusions: &'a [String],
    month: u32,
    days_ahead: i64,
) -> BoxRequest<'a> {
    BoxRequest {
        items,
        period_days: 7 * plan.cadence_weeks,
        portions_per_day: plan.portions_per_day,
        exclusions,
        month,
        variety_cap: plan.variety_cap as usize,
        days_ahead,
        transit_days: plan.transit_days,
    }
}

/// Whether `plan`'s box, without `exclusions`, can be made from `catalog` in some month:
/// checked before a plan is created or a subscriber's exclusions accepted, since otherwise
/// every delivery would be skipped at its cutoff, unbilled, for ever.
pub fn feasible(plan: &PlanRow, catalog: &[CatalogRow], exclusions: &[String]) -> bool {
    let items: Vec<Item> = catalog
        .iter()
        .filter(|c| c.kind == plan.kind)
        .map(item_of)
        .collect();
    ripening::feasible_in_some_month(&box_request(plan, &items, exclusions, 1, 60))
}

/// Plans first boxes during one run, with what the run reads once: the catalog, and the
/// profiles' boxes it has already seen (within a run `today` is one day), so a run over many
/// subscriptions reads each profile's box once.
struct Boxer<'a> {
    store: &'a Store,
    catalog: &'a BTreeMap<String, CatalogRow>,
    now: DateTime<Utc>,
    memo: HashMap<String, Vec<StoredLine>>,
}

impl<'a> Boxer<'a> {
    fn new(
        store: &'a Store,
        catalog: &'a BTreeMap<String, CatalogRow>,
        now: DateTime<Utc>,
    ) -> Self {
        Boxer {
            store,
            catalog,
            now,
            memo: HashMap::new(),
        }
    }

    /// The box for a delivery planned for the first time (it has no lines yet): its (plan,
    /// exclusions, weekday, date) profile's box, solved once and stored, while every line can
    /// still be ordered from its grower. Past a line's order-by date (a signup close to the
    /// cutoff) the delivery gets a box of its own from what can still come in time, or none
    /// (`Conflict`); the profile's box stays what its earlier deliveries were ordered with.
    async fn box_for(
        &mut self,
        plan: &PlanRow,
        sub: &SubscriptionRow,
        date: NaiveDate,
    ) -> Result<Vec<StoredLine>> {
        let profile = format!(
            "{}|{}|{}|{}",
            plan.id, sub.exclusions, sub.delivery_weekday, date
        );
        if let Some(lines) = self.memo.get(&profile) {
            return Ok(lines.clone());
        }
        // An unreadable or empty stored box is no box: planned afresh, and healed below.
        let row = self.store.box_plan(&profile).await?;
        let stored: Option<Vec<StoredLine>> = row
            .as_deref()
            .and_then(|lines| serde_json::from_str::<Vec<StoredLine>>(lines).ok())
            .filter(|lines| !lines.is_empty());
        // In SKU byte order on both backends (PostgreSQL's `ORDER BY sku` would follow its
        // locale): the solver breaks ties between equal-cost items by their order.
        let items: Vec<Item> = self
            .catalog
            .values()
            .filter(|c| c.kind == plan.kind)
            .map(item_of)
            .collect();
        let exclusions = exclusions_of(sub);
        let days_ahead = (date - today(plan, self.now)).num_days();
        let req = box_request(plan, &items, &exclusions, date.month(), days_ahead);
        if let Some(lines) = stored.as_ref().filter(|lines| {
            ripening::still_orderable(&req, lines.iter().map(|l| (l.sku.as_str(), l.ripened_days)))
        }) {
            self.memo.insert(profile, lines.clone());
            return Ok(lines.clone());
        }
        let planned =
            ripening::plan_box(&req).map_err(|e| SubscriptionError::Conflict(e.to_string()))?;
        let lines: Vec<StoredLine> = planned
            .lines
            .iter()
            .map(|l| StoredLine {
                name: self
                    .catalog
                    .get(&l.sku)
                    .map_or_else(|| l.sku.clone(), |c| c.name.clone()),
                sku: l.sku.clone(),
                qty: l.qty,
                ripened_days: l.ripened_days,
                ready_from: l.ready_from,
                ready_until: l.ready_until,
            })
            .collect();
        // A late box is this delivery's (and this day's other late ones'); the profile's box
        // stays what its earlier deliveries were ordered with.
        if stored.is_none() {
            let (cost, at) = (planned.cost_minor, micros(self.now));
            self.store
                .save_box_plan(&profile, &box_json(&lines), cost, at, row.as_deref())
                .await?;
        }
        self.memo.insert(profile, lines.clone());
        Ok(lines)
    }

    /// [`Boxer::box_for`] for the plans ahead of the cutoff (weekly, morning, signup, resume):
    /// `None` when no box can be planned for the delivery (nothing in season, allowed and
    /// reachable in time); its cutoff then skips it, see `lock_and_bill`.
    async fn first_box(
        &mut self,
        plan: &PlanRow,
        sub: &SubscriptionRow,
        date: NaiveDate,
    ) -> Result<Option<Vec<StoredLine>>> {
        match self.box_for(plan, sub, date).await {
            Ok(lines) => Ok(Some(lines)),
            Err(SubscriptionError::Conflict(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A box's lines as stored on its delivery and profile. (Serialising plain strings and
/// numbers cannot fail; the fallback, no lines, is never taken.)
fn box_json(lines: &[StoredLine]) -> String {
    serde_json::to_string(lines).unwrap_or_else(|_| "[]".into())
}

/// Rows written per transaction by the renewal run and the plans (weekly and each morning's
/// `grower-orders`). A commit writes each
/// page it dirtied once, and a subscription's rows land on pages of their own in the indexes
/// keyed by shopper or email address, so more subscriptions per commit share them. At 100,000
/// on SQLite: 2,000 renewed 7,850-9,435 subscriptions/s against 7,060-8,287 at 1,000, and
/// 5,000 renewed 13 % more than 2,000 again (3,665-4,046 against 3,131-3,581 on a slow
/// night), for about 90 MB more peak RSS (215-233 MB with three chunks in flight, 170-179 with
/// one since [`writes_in_flight`]; the target is 300). PostgreSQL ran the
/// same at all three (1,000 had been 13-15 % faster than 500 there).
const CHUNK: usize = 5000;
/// Chunks the renewal and the plans write at once (see [`InFlight`]). On PostgreSQL a
/// third keeps both cores busy while this process plans the next chunk. SQLite commits one
/// transaction at a time, so a chunk queued behind its writer only holds memory: at 100,000
/// subscriptions one chunk in flight (written while the next is planned) renewed as fast as
/// three (six pairs in turns: 4,322-6,401 against 4,013-6,421 subscriptions/s) and faster
/// than two (three pairs), at 170-179 MB peak RSS instead of 193-209 (two) and 221-244
/// (three).
fn writes_in_flight(store: &Store) -> usize {
    if store.writes_one_at_a_time() { 1 } else { 3 }
}

/// `subscription-renew`: keeps deliveries ahead, resumes pauses that ended, and at each
/// cutoff locks the delivery with its box (planned then if it has none), invoices it once
/// and charges it.
///
/// `shop` is the zone `grower-orders` runs in: lines of boxes planned at the lock that are
/// due today go out at once, and once that day's `grower-orders` run has succeeded, so does
/// every other line due and still planned (one whose send after a lock, signup or resume
/// failed).
pub async fn run_renew(
    store: &Store,
    payments: &Payments,
    dunning_days: &[i64],
    shop: Tz,
    now: DateTime<Utc>,
) -> Result<serde_json::Value> {
    let now_us = micros(now);
    let mut plans: BTreeMap<String, PlanRow> = BTreeMap::new();
    // Writes go a chunk at a time: one transaction (one commit) per chunk, not per row, and
    // up to [`writes_in_flight`] at once ([`InFlight`]). Chunks hold other subscriptions'
    // deliveries, and each inserts its cutoff timers in ascending order, so two never wait
    // on each other in a cycle.
    let mut adding = InFlight::new(writes_in_flight(store));
    let mut upcoming = Vec::new();
    let mut live = ReadAhead::new(store.live_subscription_ids().await?, CHUNK, {
        let store = store.clone();
        move |ids| subscriptions_in_order(store.clone(), ids)
    });
    while let Some(subs) = live.next().await {
        for sub in subs? {
            let plan = plan_in(store, &mut plans, &sub.plan_id).await?;
            let today = today(plan, now);
            // A pause that has ended ends now (its rows go in as the subscription is then).
            if sub.status == "paused"
                && sub
                    .paused_until
                    .as_deref()
                    .is_some_and(|until| until <= today.to_string().as_str())
            {
                resume_ended_pause(store, &sub, now).await?;
            }
            if sub.status != "suspended" {
                upcoming.extend(upcoming_rows(&sub, plan, today, now)?);
            }
            if upcoming.len() >= CHUNK {
                let rows = std::mem::take(&mut upcoming);
                let store = store.clone();
                let add = async move { store.add_deliveries(&rows, RENEW_JOB, now_us).await };
                if let Some(done) = adding.start(add).await {
                    done?;
                }
            }
        }
    }
    store.add_deliveries(&upcoming, RENEW_JOB, now_us).await?;
    while let Some(done) = adding.next().await {
        done?;
    }
    let mut locked = 0;
    // Chunks are planned here one after another (they share the plans and the box memo) and
    // written up to [`writes_in_flight`] at a time: each lock is a guarded update of its own
    // deliveries, so concurrent writes never overlap, and on PostgreSQL the next chunk's
    // statements run on the second core while this one's commit. Each chunk's charges go to
    // the gateway as soon as its lock commits (taken in that commit, so no second one).
    let mut writing = InFlight::new(writes_in_flight(store));
    let mut resumed = HashMap::new();
    let mut ordered_at_lock = HashSet::new();
    let catalog = catalog_by_sku(store).await?;
    let mut boxer = Boxer::new(store, &catalog, now);
    let mut record_taken = |taken: Locked| {
        locked += taken.locked;
        ordered_at_lock.extend(taken.orders.iter().map(order_key));
    };
    let mut due = ReadAhead::new(store.due_delivery_ids(now_us).await?, CHUNK, {
        let store = store.clone();
        move |ids| deliveries_in_order(store.clone(), ids, true)
    });
    while let Some(chunk) = due.next().await {
        // One read each for the chunk's deliveries, subscriptions and shoppers (made while
        // the chunk before was planned), one write for its locks.
        let DeliveryChunk {
            deliveries,
            subs,
            shoppers,
        } = chunk?;
        let mut locks = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            // Skipped since its id was read. The lock would leave it out (it takes only
            // scheduled deliveries); this spares planning its box or resuming for it.
            if d.status != "scheduled" {
                continue;
            }
            // As this run left it, if it resumed it for an earlier delivery due.
            let Some(mut sub) = resumed
                .get(&d.subscription_id)
                .or_else(|| subs.get(&d.subscription_id))
                .cloned()
            else {
                continue;
            };
            // A pause that ends by this delivery's date ends now.
            if sub.status == "paused"
                && sub
                    .paused_until
                    .as_deref()
                    .is_some_and(|until| until <= d.delivery_date.as_str())
            {
                sub = resume_ended_pause(store, &sub, now).await?;
                resumed.insert(sub.id.clone(), sub.clone());
            }
            // Suspension skips every open delivery and adds none; one still scheduled was
            // added as the subscription was suspended, and is not billed. A paused or
            // cancelled subscription's delivery still scheduled was past its cutoff when the
            // pause or cancel came (both move only those before it, and rows added during a
            // pause go in skipped), so it is locked as it would have been at its cutoff:
            // pause, skip and cancel apply until the cutoff, whenever the renewal runs.
            if sub.status == "suspended" {
                store.skip_due_delivery(&d.id, &sub.status, false).await?;
                continue;
            }
            let shopper = shoppers.get(&sub.shopper_id).ok_or_else(|| {
                StoreError::Inconsistent(format!("subscription {} has no shopper", sub.id))
            })?;
            let plan = plan_in(store, &mut plans, &sub.plan_id).await?;
            locks.extend(lock_and_bill(&mut boxer, plan, &sub, shopper, d).await?);
        }
        let (store, payments) = (store.clone(), payments.clone());
        let lock_and_charge = async move {
            let taken = store.lock_deliveries(&locks, now_us).await?;
            payments
                .attempt_begun(&taken.charges, &HashMap::new(), now)
                .await?;
            Ok::<Locked, SubscriptionError>(taken)
        };
        if let Some(done) = writing.start(lock_and_charge).await {
            record_taken(done?);
        }
    }
    while let Some(done) = writing.next().await {
        record_taken(done?);
    }
    // Lines of boxes planned at the locks taken may be due today: they go out now, not a
    // day late. Once this morning's `grower-orders` run is over, so does every line due
    // and still planned, which missed it: one whose send after a lock, signup or resume
    // failed is tried again 15 minutes later, not the next morning. Best effort: the locks
    // have committed, and a failure here must not skip the payments and dunning below.
    let morning_run_over = morning_orders_sent(store, now, shop)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading today's grower-orders run failed");
            false
        });
    let keys = (!morning_run_over).then_some(&ordered_at_lock);
    let sent = send_due_or_warn(store, now, shop, keys).await;
    payments.sweep(now, false).await?;
    let dunned = dunning_decisions(store, dunning_days, now).await?;
    Ok(json!({"locked": locked, "dunning_planned": dunned, "grower_lines_sent": sent}))
}

/// What locking a due delivery writes (its final box, invoice, charge and email), or `None`
/// when it cannot be planned in time and was skipped.
async fn lock_and_bill(
    boxer: &mut Boxer<'_>,
    plan: &PlanRow,
    sub: &SubscriptionRow,
    shopper: &Shopper,
    mut d: DeliveryRow,
) -> Result<Option<DeliveryLock>> {
    let (store, now) = (boxer.store, boxer.now);
    let date = date_of(&d.delivery_date)?;
    // A box planned ahead is final as planned: its growers were ordered for it.
    // (Lines that cannot be read are no box either, but only a delivery without any can be
    // boxed by a plan meanwhile: see `DeliveryLock::boxed_at_lock`.)
    let boxed_at_lock = d.lines.is_none();
    let planned = lines_of(&d);
    let boxed_now = planned.is_empty();
    let lines = match boxed_now {
        false => Ok(planned),
        true => boxer.box_for(plan, sub, date).await,
    };
    let lines = match lines {
        Ok(lines) => lines,
        // Nothing can reach the warehouse in time any more (the box was never planned ahead):
        // the delivery is skipped, and never billed.
        Err(SubscriptionError::Conflict(why)) => {
            tracing::warn!(delivery = %d.id, %why, "delivery cannot be planned in time; skipped");
            store
                .skip_due_delivery(&d.id, "unplannable", boxed_at_lock)
                .await?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let currency =
        Currency::parse(&plan.currency).map_err(|e| StoreError::Inconsistent(e.to_string()))?;
    d.lines = Some(box_json(&lines));
    // The price in force at the delivery's cutoff: the plan's, unless it changed since the
    // cutoff (then the delivery was stamped with the price before the change).
    let price = *d.amount_minor.get_or_insert(plan.price_minor);
    let invoice = InvoiceRow {
        id: crate::ids::new_id("inv"),
        subscription_id: sub.id.clone(),
        delivery_id: d.id.clone(),
        delivery_date: d.delivery_date.clone(),
        amount_minor: price,
        currency: plan.currency.clone(),
        status: "pending".into(),
        attempts: 0,
        first_failed_at: None,
        next_attempt_at: None,
        created_at: micros(now),
        paid_at: None,
    };
    let charge = NewIntent {
        id: format!("pi_renewal_{}", invoice.id),
        idempotency_key: format!("renewal:{}:{}", sub.id, d.delivery_date),
        kind: "charge",
        purpose: "renewal",
        subject_id: invoice.id.clone(),
        shopper_id: sub.shopper_id.clone(),
        amount: Money::from_minor(price, currency),
        account: Account::SubscriptionRevenue,
        refund_of: None,
        memo: format!("{} delivery {}", plan.name, d.delivery_date),
        // The renewal run sends it as soon as its lock commits.
        first_sweep_at: micros(now + crate::payments::hold()),
    };
    let email = emails::box_planned(plan, &d, date, &lines, &shopper.email, &shopper.name);
    // A box planned now was never ordered: its lines go into the grower orders with the lock
    // (rare: every plan boxes two weeks ahead; this is a signup whose plan failed, say).
    let mut orders = Vec::new();
    if boxed_now {
        let mut planned = GrowerOrders::new(boxer.catalog);
        planned.add(plan, date, &lines);
        orders = planned.rows();
    }
    Ok(Some(DeliveryLock {
        delivery: d,
        invoice,
        charge,
        email,
        boxed_at_lock,
        orders,
    }))
}

/// Past-due invoices without a next step get one (retry at +1/+3/+5 days after the first
/// failure, with an email) or, after the last, suspension.
async fn dunning_decisions(
    store: &Store,
    dunning_days: &[i64],
    now: DateTime<Utc>,
) -> Result<usize> {
    let now_us = micros(now);
    let mut planned = 0;
    for inv in store.past_due_invoices(now_us).await? {
        if inv.next_attempt_at.is_some() {
            continue;
        }
        let sub = subscription_of(store, &inv).await?;
        if sub.status == "cancelled" {
            void_held_box(store, &sub, &inv, now).await?;
            continue;
        }
        let plan = plan_of(store, &sub.plan_id).await?;
        let shopper = store.shopper(&sub.shopper_id).await?;
        let first = crate::store::instant(inv.first_failed_at.unwrap_or(now_us));
        // Once suspended, a subscription's invoices are not chased: one declined since (its
        // charge was out when another suspended it) is given up without a retry or an email.
        let step = match sub.status.as_str() {
            "suspended" => Dunning::Suspend,
            _ => dunning_step(first, inv.attempts as usize, dunning_days),
        };
        match step {
            Dunning::RetryAt(at) => {
                let email = emails::payment_failed(&plan, &inv, at, &shopper);
                if store
                    .plan_dunning_retry(&inv.id, micros(at), &email, DUNNING_JOB, now_us)
                    .await?
                {
                    planned += 1;
                }
            }
            Dunning::Suspend => {
                let email = emails::suspended(&plan, &inv, &shopper.email, &shopper.name);
                store.suspend_for_nonpayment(&inv, &email, now_us).await?;
            }
        }
    }
    Ok(planned)
}

async fn subscription_of(store: &Store, inv: &InvoiceRow) -> Result<SubscriptionRow> {
    Ok(store
        .subscription(&inv.subscription_id)
        .await?
        .ok_or_else(|| {
            StoreError::Inconsistent(format!("invoice {} has no subscription", inv.id))
        })?)
}

/// Voids past-due invoice `inv` of cancelled subscription `sub`, telling the shopper: a box
/// held for payment is not sent once the subscription is cancelled, so it is not charged
/// either (dunning stops). `false` while its charge is out at the gateway (see
/// [`Store::void_invoice`]).
pub async fn void_held_box(
    store: &Store,
    sub: &SubscriptionRow,
    inv: &InvoiceRow,
    now: DateTime<Utc>,
) -> Result<bool> {
    let plan = plan_of(store, &sub.plan_id).await?;
    let shopper = store.shopper(&sub.shopper_id).await?;
    let email = emails::invoice_voided(&plan, inv, &shopper.email, &shopper.name);
    Ok(store.void_invoice(&inv.id, &email, micros(now)).await?)
}

/// Voids every past-due invoice of `sub`, just cancelled ([`void_held_box`]); returns how
/// many.
pub async fn void_held_boxes(
    store: &Store,
    sub: &SubscriptionRow,
    now: DateTime<Utc>,
) -> Result<usize> {
    let mut voided = 0;
    for inv in store.invoices_of(&sub.id).await? {
        if inv.status == "past_due" && void_held_box(store, sub, &inv, now).await? {
            voided += 1;
        }
    }
    Ok(voided)
}

/// `billing-dunning`: retries past-due invoices whose step has come (with the shopper's
/// current card and the invoice's one key), then plans the next step of those still failing.
pub async fn run_dunning(
    store: &Store,
    payments: &Payments,
    dunning_days: &[i64],
    now: DateTime<Utc>,
) -> Result<serde_json::Value> {
    let now_us = micros(now);
    let mut retried = 0;
    for inv in store.past_due_invoices(now_us).await? {
        if inv.next_attempt_at.is_none_or(|t| t > now_us) {
            continue;
        }
        let sub = subscription_of(store, &inv).await?;
        if sub.status == "cancelled" {
            // Cancelled while the retry waited: the held box is not chased.
            void_held_box(store, &sub, &inv, now).await?;
            continue;
        }
        let intent = format!("pi_renewal_{}", inv.id);
        if store.begin_dunning_retry(&inv.id, &intent, now_us).await? == Some(true) {
            payments.attempt(&intent, now).await?;
            retried += 1;
        }
    }
    let planned = dunning_decisions(store, dunning_days, now).await?;
    Ok(json!({"retried": retried, "planned": planned}))
}

fn iso_week(d: NaiveDate) -> String {
    let w = d.iso_week();
    format!("{}-W{:02}", w.year(), w.week())
}

/// Grower order lines summed by grower, item and ripening start: ripening starts
/// `transit + k` days before delivery, and the grower is ordered from `lead time` before that.
struct GrowerOrders<'a> {
    catalog: &'a BTreeMap<String, CatalogRow>,
    orders: BTreeMap<(String, String, NaiveDate), GrowerOrderRow>,
}

impl<'a> GrowerOrders<'a> {
    fn new(catalog: &'a BTreeMap<String, CatalogRow>) -> Self {
        GrowerOrders {
            catalog,
            orders: BTreeMap::new(),
        }
    }

    /// Adds the lines of one box delivered on `date` (items no longer in the catalog are left out).
    fn add(&mut self, plan: &PlanRow, date: NaiveDate, lines: &[StoredLine]) {
        for line in lines {
            let Some(item) = self.catalog.get(&line.sku) else {
                continue;
            };
            let (_, start, order_by) = ripening::backward_schedule(
                line.ripened_days,
                plan.transit_days,
                item.lead_time_days,
            );
            let ripening_start = date + Duration::days(start);
            let order = self
                .orders
                .entry((item.grower.clone(), item.sku.clone(), ripening_start))
                .or_insert_with(|| GrowerOrderRow {
                    id: crate::ids::new_id("gro"),
                    week: iso_week(date),
                    supplier: item.grower.clone(),
                    supplier_email: item.grower_email.clone(),
                    sku: item.sku.clone(),
                    qty: 0,
                    ripening_start: ripening_start.to_string(),
                    order_by: (date + Duration::days(order_by)).to_string(),
                    status: "planned".into(),
                    sent_at: None,
                });
            order.qty += line.qty;
        }
    }

    fn rows(self) -> Vec<GrowerOrderRow> {
        self.orders.into_values().collect()
    }
}

/// The catalog by SKU.
async fn catalog_by_sku(store: &Store) -> Result<BTreeMap<String, CatalogRow>> {
    Ok(store
        .catalog()
        .await?
        .into_iter()
        .map(|c| (c.sku.clone(), c))
        .collect())
}

/// The subscriptions of `ids` that exist, in the order of `ids` (a [`ReadAhead`] chunk).
async fn subscriptions_in_order(store: Store, ids: Vec<String>) -> Result<Vec<SubscriptionRow>> {
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut by_id = store.subscriptions_by_id(&refs).await?;
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

/// A chunk of deliveries with their subscriptions and (when asked for) their shoppers.
struct DeliveryChunk {
    deliveries: Vec<DeliveryRow>,
    subs: HashMap<String, SubscriptionRow>,
    shoppers: HashMap<String, Shopper>,
}

/// The deliveries of `ids` that exist, in the order of `ids`, with their subscriptions and,
/// `with_shoppers`, their shoppers: one read each (a [`ReadAhead`] chunk).
async fn deliveries_in_order(
    store: Store,
    ids: Vec<String>,
    with_shoppers: bool,
) -> Result<DeliveryChunk> {
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut by_id = store.deliveries_by_id(&refs).await?;
    let deliveries: Vec<DeliveryRow> = ids.iter().filter_map(|id| by_id.remove(id)).collect();
    let sub_ids: Vec<&str> = deliveries
        .iter()
        .map(|d| d.subscription_id.as_str())
        .collect();
    let subs = store.subscriptions_by_id(&sub_ids).await?;
    let shoppers = if with_shoppers {
        let shopper_ids: Vec<&str> = subs.values().map(|s| s.shopper_id.as_str()).collect();
        store.shoppers(&shopper_ids).await?
    } else {
        HashMap::new()
    };
    Ok(DeliveryChunk {
        deliveries,
        subs,
        shoppers,
    })
}

/// What [`plan_window`] did: deliveries it boxed for the first time, and grower order lines
/// written.
struct Planned {
    boxes: usize,
    grower_order_lines: usize,
}

/// How often [`plan_window`] reads the boxes before it gives up: each time, an addition to the
/// orders (a signup, resume or lock boxing deliveries) committed while it read them.
const PLAN_READS: usize = 3;

/// Sums the boxes of every delivery in `[from, until)` into the planned grower orders, which
/// then replace those ripening in the window. Deliveries still scheduled and never boxed get
/// their box first (saved, so the orders count them without reading the deliveries twice);
/// a box once planned stays as it is. A chunk at a time: one read for
/// its subscriptions, one write for its boxes, none kept past it.
///
/// A signup's boxes are added to the orders as it commits. One committed while the boxes are
/// read may not be among them, and replacing the orders would drop its units, so then the
/// boxes are read again; after [`PLAN_READS`] reads the run fails and the orders stay as
/// they were (every addition counted), for its retry.
async fn plan_window(
    store: &Store,
    window: (NaiveDate, NaiveDate),
    now: DateTime<Utc>,
) -> Result<Planned> {
    let (from, until) = (window.0.to_string(), window.1.to_string());
    // Boxes are saved as they are planned, so a read again finds those of the reads before.
    let mut boxes = 0;
    for _ in 0..PLAN_READS {
        let adds_seen = store.grower_order_adds().await?;
        let (boxed, rows) = count_window(store, window, now).await?;
        boxes += boxed;
        let replace = GrowerOrderMerge::Replace {
            from: &from,
            until: &until,
            adds_seen,
        };
        if store.put_grower_orders(&rows, replace).await? {
            return Ok(Planned {
                boxes,
                grower_order_lines: rows.len(),
            });
        }
        tracing::info!(
            "boxes were added to the grower orders while they were recomputed: reading them again"
        );
    }
    Err(SubscriptionError::Conflict(format!(
        "boxes were added to the grower orders during each of {PLAN_READS} recomputations; \
         the orders keep every addition until the next one"
    )))
}

/// The boxes of every delivery in `[from, until)` (boxing those never boxed, see
/// [`plan_window`]) summed into grower order rows; also how many it boxed.
async fn count_window(
    store: &Store,
    (from, until): (NaiveDate, NaiveDate),
    now: DateTime<Utc>,
) -> Result<(usize, Vec<GrowerOrderRow>)> {
    let catalog = catalog_by_sku(store).await?;
    let mut plans: BTreeMap<String, PlanRow> = BTreeMap::new();
    let mut boxer = Boxer::new(store, &catalog, now);
    let mut orders = GrowerOrders::new(&catalog);
    let mut boxed = 0;
    let ids = store
        .delivery_ids_between(&from.to_string(), &until.to_string())
        .await?;
    let mut upcoming = ReadAhead::new(ids, CHUNK, {
        let store = store.clone();
        move |ids| deliveries_in_order(store.clone(), ids, false)
    });
    // Each chunk's boxes are written while the next is planned (each chunk updates its own
    // deliveries, so the writes never overlap).
    let mut writing = InFlight::new(writes_in_flight(store));
    while let Some(chunk) = upcoming.next().await {
        let DeliveryChunk {
            deliveries, subs, ..
        } = chunk?;
        let mut boxes = Vec::new();
        for d in &deliveries {
            let Some(sub) = subs.get(&d.subscription_id) else {
                continue;
            };
            let plan = plan_in(store, &mut plans, &sub.plan_id).await?;
            let date = date_of(&d.delivery_date)?;
            // A box once planned stays: its lines may be on their way to the growers.
            let lines = if d.status == "scheduled" && d.lines.is_none() {
                let Some(lines) = boxer.first_box(plan, sub, date).await? else {
                    continue;
                };
                boxes.push((d.id.clone(), box_json(&lines)));
                lines
            } else {
                lines_of(d)
            };
            orders.add(plan, date, &lines);
        }
        if !boxes.is_empty() {
            let store = store.clone();
            // No add: the window's orders are replaced below from every box counted here.
            let write = async move { store.save_first_boxes(&boxes, |_| Vec::new()).await };
            if let Some(done) = writing.start(write).await {
                boxed += done?.len();
            }
        }
    }
    while let Some(done) = writing.next().await {
        boxed += done?.len();
    }
    // A box ripens before its delivery, so no delivery before the window has an order that
    // ripens from `from` on, and none after it is planned yet (plans and signups look as far
    // ahead): the planned orders ripening in the window are the window's to replace.
    Ok((boxed, orders.rows()))
}

/// Boxes a subscription's unboxed deliveries of the coming two weeks now (a new one's, or a
/// resumed one's: they can't wait for the next morning's plan, growers need their lead time)
/// and adds the boxes it wrote to the grower orders. Only this subscription's boxes are read
/// and added, so a signup costs the same with ten subscribers or a hundred thousand; the
/// next full refresh (`subscription-plan`, `grower-orders`) recomputes every total from the
/// boxes. Lines of these boxes already due (a late box ordered on its order-by day, after
/// that morning's `grower-orders` run) go to their growers at once: the next run would be a
/// day late. (Not while ops have paused `grower-orders`: that holds every grower email.)
/// `shop` is the zone `grower-orders` runs in.
pub async fn plan_upcoming(
    store: &Store,
    sub: &SubscriptionRow,
    now: DateTime<Utc>,
    shop: Tz,
) -> Result<()> {
    let plan = plan_of(store, &sub.plan_id).await?;
    let today = today(&plan, now);
    let until = today + Duration::days(15);
    let catalog = catalog_by_sku(store).await?;
    let mut orders = GrowerOrders::new(&catalog);
    let mut boxer = Boxer::new(store, &catalog, now);
    let mut planned = HashMap::new();
    for d in store.deliveries_of(&sub.id).await? {
        let date = date_of(&d.delivery_date)?;
        if d.status != "scheduled" || d.lines.is_some() || date >= until {
            continue;
        }
        // A delivery too close to plan is skipped at its cutoff (see `lock_and_bill`).
        if let Some(lines) = boxer.first_box(&plan, sub, date).await? {
            planned.insert(d.id, (date, lines));
        }
    }
    let boxes: Vec<(String, String)> = planned
        .iter()
        .map(|(id, (_, lines))| (id.clone(), box_json(lines)))
        .collect();
    // Only the boxes written count: a delivery boxed meanwhile by a plan was counted there.
    let mut added = Vec::new();
    let orders_of = |written: &[String]| {
        for id in written {
            if let Some((date, lines)) = planned.get(id) {
                orders.add(&plan, *date, lines);
            }
        }
        added = orders.rows();
        added.clone()
    };
    store.save_first_boxes(&boxes, orders_of).await?;
    send_due_or_warn(
        store,
        now,
        shop,
        Some(&added.iter().map(order_key).collect()),
    )
    .await;
    Ok(())
}

/// `subscription-plan`: boxes the deliveries of the coming two weeks that have no box yet
/// (each box is final once planned: its growers are ordered for it) and aggregates every box
/// into grower orders with their order-by dates. `boxes` in its result counts the boxes it
/// planned.
pub async fn run_plan(store: &Store, now: DateTime<Utc>, shop: Tz) -> Result<serde_json::Value> {
    let today = now.with_timezone(&shop).date_naive();
    let window = (today, today + Duration::days(15));
    let p = plan_window(store, window, now).await?;
    Ok(json!({
        "boxes": p.boxes,
        "grower_order_lines": p.grower_order_lines,
    }))
}

/// `grower-orders`: sends each grower the order lines whose order-by date has come (one
/// email with a CSV per grower), once. "Today" is the shop's (`shop`, the zone the job runs
/// in): east of UTC its 05:00 run falls on the day before in UTC, when that day's orders
/// would wait a day.
pub async fn run_grower_orders(
    store: &Store,
    now: DateTime<Utc>,
    shop: Tz,
) -> Result<serde_json::Value> {
    let today = now.with_timezone(&shop).date_naive();
    // Boxes first: a delivery that came into the window since the weekly plan, or came back
    // with a resume, is boxed by the next morning at the latest.
    plan_window(store, (today, today + Duration::days(15)), now).await?;
    let sent = send_due_grower_orders(store, now, shop, |_| true).await?;
    Ok(json!({"sent": sent}))
}

/// A planned grower order's identity: grower, item and ripening start.
type OrderKey = (String, String, String);

fn order_key(g: &GrowerOrderRow) -> OrderKey {
    (g.supplier.clone(), g.sku.clone(), g.ripening_start.clone())
}

/// Whether a `grower-orders` run has succeeded since the shop's day began: from then on, a
/// planned line due today or earlier has missed its batch.
async fn morning_orders_sent(store: &Store, now: DateTime<Utc>, shop: Tz) -> Result<bool> {
    let day_began = start_of_day(now.with_timezone(&shop).date_naive(), shop);
    Ok(store
        .succeeded_since(GROWER_ORDERS_JOB, micros(day_began))
        .await?)
}

/// Sends at once the due lines of `keys` (orders a signup, resume or lock has just added:
/// that morning's `grower-orders` run may be over, and the next would be a day late), or
/// with `None` every due line still planned. Not while ops have paused `grower-orders`,
/// which holds every grower email: these lines then wait for a run too.
async fn send_due_now(
    store: &Store,
    now: DateTime<Utc>,
    shop: Tz,
    keys: Option<&HashSet<OrderKey>>,
) -> Result<usize> {
    if keys.is_some_and(HashSet::is_empty) {
        return Ok(0);
    }
    let held = store
        .job_defs()
        .await?
        .iter()
        .any(|j| j.name == GROWER_ORDERS_JOB && j.paused_at.is_some());
    if held {
        return Ok(0);
    }
    send_due_grower_orders(store, now, shop, |g| {
        keys.is_none_or(|keys| keys.contains(&order_key(g)))
    })
    .await
}

/// [`send_due_now`] after the boxes and orders have committed: best effort, since the next
/// renewal run (once that morning's `grower-orders` run is over) or `grower-orders` run
/// sends whatever this misses, and a failure must not fail the signup, resume or renewal
/// that already stands. Returns how many lines went out.
async fn send_due_or_warn(
    store: &Store,
    now: DateTime<Utc>,
    shop: Tz,
    keys: Option<&HashSet<OrderKey>>,
) -> usize {
    send_due_now(store, now, shop, keys)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "sending grower lines due today failed; a later run sends them");
            0
        })
}

/// Sends each grower the planned lines (of those `which` picks) whose order-by date has come,
/// in one email per grower; returns how many lines went out.
async fn send_due_grower_orders(
    store: &Store,
    now: DateTime<Utc>,
    shop: Tz,
    which: impl Fn(&GrowerOrderRow) -> bool,
) -> Result<usize> {
    let today = now.with_timezone(&shop).date_naive();
    let mut by_supplier: BTreeMap<String, Vec<GrowerOrderRow>> = BTreeMap::new();
    for g in store.due_grower_orders(&today.to_string()).await? {
        if which(&g) {
            by_supplier.entry(g.supplier.clone()).or_default().push(g);
        }
    }
    let mut sent = 0;
    for (supplier, lines) in by_supplier {
        let ids: Vec<String> = lines.iter().map(|l| l.id.clone()).collect();
        let email_of = |sent: &[GrowerOrderRow]| emails::grower_order(&supplier, sent, today);
        sent += store
            .send_grower_orders(&ids, email_of, micros(now))
            .await?
            .len();
    }
    Ok(sent)
}

/// Resumes `sub`, read paused with a pause that has ended; the subscription as it is then: a
/// resume or cancel by the shopper meanwhile (the move is refused) leaves it as they made it.
async fn resume_ended_pause(
    store: &Store,
    sub: &SubscriptionRow,
    now: DateTime<Utc>,
) -> Result<SubscriptionRow> {
    match resume(store, sub, now).await {
        Ok(()) => Ok(SubscriptionRow {
            status: "active".into(),
            paused_until: None,
            ..sub.clone()
        }),
        Err(SubscriptionError::Conflict(_)) => Ok(store
            .subscription(&sub.id)
            .await?
            .ok_or_else(|| StoreError::Inconsistent(format!("no subscription {}", sub.id)))?),
        Err(e) => Err(e),
    }
}

/// Starts a suspended subscription again (its shopper's resume, typically after a card
/// update): the deliveries its suspension skipped whose cutoff is ahead come back, with the
/// rest up to the horizon (none were added while it was suspended), unboxed (the caller
/// boxes them with [`plan_upcoming`]). Its uncollectible invoices stay as they are: their
/// boxes were never sent. The next cutoff charges the card on file, and dunning starts over
/// if it is declined.
pub async fn reactivate(store: &Store, sub: &SubscriptionRow, now: DateTime<Utc>) -> Result<()> {
    make_active(store, sub, "suspended", now).await?;
    let plan = plan_of(store, &sub.plan_id).await?;
    let rows = upcoming_rows(sub, &plan, today(&plan, now), now)?;
    store.add_deliveries(&rows, RENEW_JOB, micros(now)).await?;
    Ok(())
}

/// Resumes a paused subscription: its paused deliveries before their cutoff come back,
/// without boxes (a shopper's resume boxes them at once with [`plan_upcoming`]; a pause
/// whose end the renewal reaches brings back none, those after it were never paused).
pub async fn resume(store: &Store, sub: &SubscriptionRow, now: DateTime<Utc>) -> Result<()> {
    make_active(store, sub, "paused", now).await
}

/// Moves `sub` from `held` (`paused` or `suspended`, which is also the skip reason it gave
/// its deliveries) back to active; those of its deliveries whose cutoff is ahead come back
/// scheduled, unboxed. A conflict when it is not `held` any more.
async fn make_active(
    store: &Store,
    sub: &SubscriptionRow,
    held: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    if !store
        .move_subscription(
            &sub.id,
            &[held],
            "active",
            None,
            (["skipped"; 2], Some(held), "scheduled", None),
            ("0000-00-00", "9999-99-99"),
            micros(now),
        )
        .await?
    {
        return Err(SubscriptionError::Conflict(format!(
            "subscription {} is {}, not {held}",
            sub.id, sub.status
        )));
    }
    Ok(())
}
