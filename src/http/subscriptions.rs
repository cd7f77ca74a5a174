//! Subscriptions over HTTP: the catalog, plans, subscriptions with their deliveries,
//! invoices and calendar, and grower orders.

use super::amount_string;
use super::error::ApiError;
use super::extract::{ApiJson, ApiQuery, Caller, OptionalJson, Validation};
use super::idempotency::{self, UnclaimedKey, remembered_json};
use super::ops::{Page, PageQuery, bad_cursor, cursor, page_limit, paginate};
use crate::app::AppState;
use crate::domain::identity::{parse_name, parse_payment_token, parse_time_zone};
use crate::domain::money::{Currency, Money};
use crate::domain::ripening::Ethylene;
use crate::domain::subscription::{first_delivery, parse_weekday, shown_status, weekday_name};
use crate::ids::new_id;
use crate::store::{
    CatalogRow, DeliveryRow, IdempotencyBegin, InvoiceRow, NewSubscription, PlanRow,
    SubscriptionRow, instant, micros,
};
use crate::subscriptions::{
    self, SubscriptionError, date_of, exclusions_of, lines_of, plan_of, upcoming_rows,
};
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::{Json, response::Response};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_catalog))
        .routes(routes!(put_catalog_item))
        .routes(routes!(create_plan, list_plans))
        .routes(routes!(change_plan))
        .routes(routes!(subscribe))
        .routes(routes!(get_subscription))
        .routes(routes!(replace_calendar_link))
        .routes(routes!(skip))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(cancel))
        .routes(routes!(set_payment_method))
        .routes(routes!(deliveries))
        .routes(routes!(invoices))
        .routes(routes!(calendar))
        .routes(routes!(grower_orders))
}

/// How far ahead a subscription may start or a pause end: a year covers any real plan, and
/// the dates computed from it stay far inside the calendar (an unbounded one overflowed it).
const MAX_DAYS_AHEAD: i64 = 366;

/// Pages a list read whole, in its order: each is short (the plans, one subscription's
/// deliveries or invoices). The cursor is the position of the previous page's last item, which
/// stays put as these lists only grow at their end.
fn page<T>(items: Vec<T>, q: &PageQuery) -> Result<Json<Page<T>>, ApiError> {
    let limit = page_limit(q.limit)?;
    let start = match cursor(q.after.as_deref())? {
        None => 0,
        Some(at) => usize::try_from(at).map_err(|_| bad_cursor())? + 1,
    };
    let rows: Vec<(usize, T)> = items
        .into_iter()
        .enumerate()
        .skip(start)
        .take(limit as usize + 1)
        .collect();
    Ok(Json(paginate(rows, limit, |(at, _)| *at, |(_, item)| item)))
}

/// Pages a short list read whole that can change in the middle (a catalog item added, a
/// week's grower orders replaced), ordered by `key` (unique): the cursor is the previous
/// page's last key, so a walk neither repeats nor skips what stayed.
fn page_by_key<T>(
    mut items: Vec<T>,
    q: &PageQuery,
    key: impl Fn(&T) -> String,
) -> Result<Json<Page<T>>, ApiError> {
    let limit = page_limit(q.limit)?;
    items.sort_by_cached_key(&key);
    let start = q.after.as_deref().map_or(0, |after| {
        items.partition_point(|i| key(i).as_str() <= after)
    });
    let rows: Vec<T> = items
        .into_iter()
        .skip(start)
        .take(limit as usize + 1)
        .collect();
    Ok(Json(paginate(rows, limit, &key, |item| item)))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CatalogItemOut {
    sku: String,
    name: String,
    /// `fruit` or `flower`.
    kind: String,
    ripening_days_min: i64,
    ripening_days_max: i64,
    ready_window_days: i64,
    unit_cost: String,
    currency: String,
    available_months: Vec<u32>,
    lead_time_days: i64,
    grower: String,
    ethylene_producer: String,
    ethylene_sensitive: bool,
}

impl From<CatalogRow> for CatalogItemOut {
    fn from(c: CatalogRow) -> Self {
        CatalogItemOut {
            unit_cost: amount_string(c.unit_cost_minor, &c.currency),
            available_months: c
                .available_months
                .split_whitespace()
                .filter_map(|m| m.parse().ok())
                .collect(),
            sku: c.sku,
            name: c.name,
            kind: c.kind,
            ripening_days_min: c.ripening_days_min,
            ripening_days_max: c.ripening_days_max,
            ready_window_days: c.ready_window_days,
            currency: c.currency,
            lead_time_days: c.lead_time_days,
            grower: c.grower,
            ethylene_producer: c.ethylene_producer,
            ethylene_sensitive: c.ethylene_sensitive,
        }
    }
}

/// The catalog (public): fruit and flowers with ripening data, cost, season and lead time.
#[utoipa::path(get, path = "/api/v1/catalog", tag = "subscriptions", params(PageQuery),
    responses((status = 200, body = Page<CatalogItemOut>)))]
async fn list_catalog(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<CatalogItemOut>>, ApiError> {
    page_by_key(
        state
            .store
            .catalog()
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
        &q,
        |c: &CatalogItemOut| format!("{}/{}", c.kind, c.sku),
    )
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogItemIn {
    name: String,
    kind: String,
    ripening_days_min: i64,
    ripening_days_max: i64,
    ready_window_days: i64,
    unit_cost: String,
    currency: String,
    available_months: Vec<u32>,
    lead_time_days: i64,
    grower: String,
    grower_email: String,
    #[serde(default)]
    ethylene_producer: Option<String>,
    #[serde(default)]
    ethylene_sensitive: bool,
}

/// Adds or replaces a catalog item (ops).
#[utoipa::path(put, path = "/api/v1/catalog/{sku}", tag = "subscriptions", request_body = CatalogItemIn,
    responses((status = 200, body = CatalogItemOut), (status = 422, body = super::error::Problem)))]
async fn put_catalog_item(
    State(state): State<AppState>,
    caller: Caller,
    Path(sku): Path<String>,
    ApiJson(input): ApiJson<CatalogItemIn>,
) -> Result<Json<CatalogItemOut>, ApiError> {
    caller.require_admin()?;
    let mut v = Validation::default();
    if sku.is_empty()
        || sku.len() > 64
        || !sku
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        v.error("sku", "must be 1–64 of a-z, 0-9 and -");
    }
    let name = v.check("name", parse_name(&input.name));
    if !["fruit", "flower"].contains(&input.kind.as_str()) {
        v.error("kind", "must be fruit or flower");
    }
    if input.ripening_days_min < 0
        || input.ripening_days_max < input.ripening_days_min
        || input.ripening_days_max > 60
    {
        v.error(
            "ripening_days_max",
            "must be ≥ ripening_days_min ≥ 0 and at most 60",
        );
    }
    if !(1..=120).contains(&input.ready_window_days) {
        v.error("ready_window_days", "must be 1–120");
    }
    let cost = v.check(
        "unit_cost",
        positive_amount(&input.unit_cost, &input.currency),
    );
    if input.available_months.is_empty()
        || input.available_months.iter().any(|m| !(1..=12).contains(m))
    {
        v.error("available_months", "must list months 1–12");
    }
    if !(0..=60).contains(&input.lead_time_days) {
        v.error("lead_time_days", "must be 0–60");
    }
    let ethylene = v.check(
        "ethylene_producer",
        input
            .ethylene_producer
            .as_deref()
            .map_or(Some(Ethylene::None), Ethylene::from_name)
            .ok_or("must be none, low, medium or high"),
    );
    let grower = v.check("grower", parse_name(&input.grower));
    let grower_email = v.check(
        "grower_email",
        crate::domain::identity::parse_email(&input.grower_email),
    );
    v.finish()?;
    let (Some(name), Some(cost), Some(ethylene), Some(grower), Some(grower_email)) =
        (name, cost, ethylene, grower, grower_email)
    else {
        unreachable!("validated")
    };
    let mut months = input.available_months.clone();
    months.sort_unstable();
    months.dedup();
    let row = CatalogRow {
        sku,
        name,
        kind: input.kind,
        ripening_days_min: input.ripening_days_min,
        ripening_days_max: input.ripening_days_max,
        ready_window_days: input.ready_window_days,
        ethylene_producer: ethylene.as_str().into(),
        ethylene_sensitive: input.ethylene_sensitive,
        unit_cost_minor: cost.minor(),
        currency: cost.currency().code().into(),
        available_months: months
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        grower,
        grower_email,
        lead_time_days: input.lead_time_days,
        updated_at: micros(state.clock.now()),
    };
    state.store.put_catalog_item(&row).await?;
    Ok(Json(row.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanIn {
    name: String,
    kind: String,
    currency: String,
    price_per_delivery: String,
    cadence_weeks: i64,
    portions_per_day: i64,
    cutoff_hours: Option<i64>,
    delivery_weekdays: Vec<String>,
    time_zone: String,
    variety_cap: Option<i64>,
    transit_days: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct PlanOut {
    id: String,
    name: String,
    kind: String,
    currency: String,
    price_per_delivery: String,
    cadence_weeks: i64,
    portions_per_day: i64,
    cutoff_hours: i64,
    delivery_weekdays: Vec<String>,
    time_zone: String,
    variety_cap: i64,
    transit_days: i64,
}

impl From<PlanRow> for PlanOut {
    fn from(p: PlanRow) -> Self {
        PlanOut {
            price_per_delivery: amount_string(p.price_minor, &p.currency),
            delivery_weekdays: p
                .delivery_weekdays
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            id: p.id,
            name: p.name,
            kind: p.kind,
            currency: p.currency,
            cadence_weeks: p.cadence_weeks,
            portions_per_day: p.portions_per_day,
            cutoff_hours: p.cutoff_hours,
            time_zone: p.time_zone,
            variety_cap: p.variety_cap,
            transit_days: p.transit_days,
        }
    }
}

/// A price or cost as the API takes it: a positive decimal amount in a `currency` code.
/// The largest price or unit cost a plan or catalog item takes, in major units: far above any
/// box, and far enough inside 64-bit minor units that box costs and ledger sums cannot
/// overflow.
const MAX_AMOUNT: i64 = 1_000_000;

/// A price or cost: above zero and at most [`MAX_AMOUNT`].
fn positive_amount(raw: &str, currency: &str) -> Result<Money, String> {
    let money = Currency::parse(currency)
        .and_then(|c| Money::parse_positive(raw, c))
        .map_err(|e| e.to_string())?;
    if money.to_decimal() > MAX_AMOUNT.into() {
        return Err(format!("must be at most {MAX_AMOUNT}"));
    }
    Ok(money)
}

/// Creates a plan (ops).
#[utoipa::path(post, path = "/api/v1/plans", tag = "subscriptions", request_body = PlanIn,
    responses((status = 201, body = PlanOut), (status = 422, body = super::error::Problem)))]
async fn create_plan(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<PlanIn>,
) -> Result<(StatusCode, Json<PlanOut>), ApiError> {
    caller.require_admin()?;
    let mut v = Validation::default();
    let name = v.check("name", parse_name(&input.name));
    if !["fruit", "flower"].contains(&input.kind.as_str()) {
        v.error("kind", "must be fruit or flower");
    }
    let price = v.check(
        "price_per_delivery",
        positive_amount(&input.price_per_delivery, &input.currency),
    );
    if ![1, 2].contains(&input.cadence_weeks) {
        v.error("cadence_weeks", "must be 1 or 2");
    }
    if !(1..=20).contains(&input.portions_per_day) {
        v.error("portions_per_day", "must be 1–20");
    }
    let cutoff = input.cutoff_hours.unwrap_or(48);
    if !(0..=336).contains(&cutoff) {
        v.error("cutoff_hours", "must be 0–336");
    }
    let mut weekdays = Vec::new();
    for (i, w) in input.delivery_weekdays.iter().enumerate() {
        match parse_weekday(w) {
            Some(d) if !weekdays.contains(&d) => weekdays.push(d),
            _ => v.error(
                &format!("delivery_weekdays[{i}]"),
                "must be a distinct mon…sun",
            ),
        }
    }
    if weekdays.is_empty() {
        v.error("delivery_weekdays", "must name at least one weekday");
    }
    let zone = v.check("time_zone", parse_time_zone(&input.time_zone));
    let cap = input.variety_cap.unwrap_or(6);
    if !(1..=20).contains(&cap) {
        v.error("variety_cap", "must be 1–20");
    }
    let transit = input.transit_days.unwrap_or(1);
    if !(0..=7).contains(&transit) {
        v.error("transit_days", "must be 0–7");
    }
    v.finish()?;
    let (Some(name), Some(price), Some(zone)) = (name, price, zone) else {
        unreachable!("validated")
    };
    let row = PlanRow {
        id: new_id("pln"),
        name,
        kind: input.kind,
        currency: price.currency().code().into(),
        price_minor: price.minor(),
        cadence_weeks: input.cadence_weeks,
        portions_per_day: input.portions_per_day,
        cutoff_hours: cutoff,
        delivery_weekdays: weekdays
            .iter()
            .map(|w| weekday_name(*w))
            .collect::<Vec<_>>()
            .join(" "),
        time_zone: zone.name().into(),
        variety_cap: cap,
        transit_days: transit,
        created_at: micros(state.clock.now()),
    };
    if !subscriptions::feasible(&row, &state.store.catalog().await?, &[]) {
        return Err(ApiError::field(
            "cadence_weeks",
            format!(
                "no {} box from the catalog keeps {} portion(s) surely ready every day for {} days",
                row.kind,
                row.portions_per_day,
                7 * row.cadence_weeks
            ),
        ));
    }
    state.store.create_plan(&row).await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// Plans (public).
#[utoipa::path(get, path = "/api/v1/plans", tag = "subscriptions", params(PageQuery),
    responses((status = 200, body = Page<PlanOut>)))]
async fn list_plans(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<PlanOut>>, ApiError> {
    page(
        state
            .store
            .plans()
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
        &q,
    )
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChangeIn {
    price_per_delivery: String,
}

/// Changes a plan's price (ops): applied from each subscriber's next unlocked delivery and
/// announced to them by email.
#[utoipa::path(put, path = "/api/v1/plans/{id}", tag = "subscriptions", request_body = PlanChangeIn,
    responses((status = 200, body = PlanOut)))]
async fn change_plan(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<PlanChangeIn>,
) -> Result<Json<PlanOut>, ApiError> {
    caller.require_admin()?;
    let plan = plan_of(&state.store, &id).await?;
    let price = positive_amount(&input.price_per_delivery, &plan.currency)
        .map_err(|m| ApiError::field("price_per_delivery", m))?;
    // The same price again (a retried request) changes and announces nothing.
    if price.minor() == plan.price_minor {
        return Ok(Json(plan.into()));
    }
    let changed = PlanRow {
        price_minor: price.minor(),
        ..plan.clone()
    };
    let now = micros(state.clock.now());
    let announce = |sub_id: &str, email: &str, name: &str| {
        subscriptions::emails::price_changed(&changed, plan.price_minor, now, sub_id, email, name)
    };
    state
        .store
        .set_plan_price(&id, price.minor(), announce, now)
        .await?;
    Ok(Json(changed.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeIn {
    plan_id: String,
    delivery_weekday: String,
    start_date: NaiveDate,
    #[serde(default)]
    exclusions: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SubscriptionOut {
    id: String,
    plan_id: String,
    shopper_id: String,
    /// `active`, `paused`, `past_due`, `suspended` or `cancelled`.
    status: String,
    delivery_weekday: String,
    start_date: String,
    exclusions: Vec<String>,
    paused_until: Option<String>,
    next_delivery_date: Option<String>,
    /// The private link to the subscription's calendar page: whoever holds it sees the
    /// calendar without signing in.
    calendar_page: String,
}

async fn subscription_out(
    state: &AppState,
    s: SubscriptionRow,
) -> Result<SubscriptionOut, ApiError> {
    let next = state
        .store
        .deliveries_of(&s.id)
        .await?
        .into_iter()
        .find(|d| d.status == "scheduled")
        .map(|d| d.delivery_date);
    let calendar_page = super::pages::calendar_link(state, &s.id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no subscription {}", s.id)))?;
    Ok(SubscriptionOut {
        calendar_page,
        exclusions: exclusions_of(&s),
        id: s.id,
        plan_id: s.plan_id,
        shopper_id: s.shopper_id,
        status: s.status,
        delivery_weekday: s.delivery_weekday,
        start_date: s.start_date,
        paused_until: s.paused_until,
        next_delivery_date: next,
    })
}

/// Subscribes (shopper): deliveries are scheduled from the first chosen weekday on or after
/// the start date.
#[utoipa::path(post, path = "/api/v1/subscriptions", tag = "subscriptions", request_body = SubscribeIn,
    responses((status = 201, body = SubscriptionOut), (status = 422, body = super::error::Problem)))]
async fn subscribe(
    State(state): State<AppState>,
    caller: Caller,
    key: Option<Extension<UnclaimedKey>>,
    ApiJson(input): ApiJson<SubscribeIn>,
) -> Result<Response, ApiError> {
    let shopper = caller.require_shopper()?.to_owned();
    let now = state.clock.now();
    let mut v = Validation::default();
    let plan = state.store.plan(&input.plan_id).await?;
    if plan.is_none() {
        v.error("plan_id", "no such plan");
    }
    let weekday = parse_weekday(&input.delivery_weekday);
    match (&plan, weekday) {
        (_, None) => v.error("delivery_weekday", "must be mon…sun"),
        (Some(p), Some(w))
            if !p
                .delivery_weekdays
                .split_whitespace()
                .any(|d| d == weekday_name(w)) =>
        {
            v.error(
                "delivery_weekday",
                format!("this plan delivers on {}", p.delivery_weekdays),
            )
        }
        _ => {}
    }
    if let Some(p) = &plan {
        let today = subscriptions::today(p, now);
        if input.start_date < today {
            v.error("start_date", "must not be in the past");
        } else if input.start_date > today + Duration::days(MAX_DAYS_AHEAD) {
            v.error(
                "start_date",
                format!("must be within {MAX_DAYS_AHEAD} days"),
            );
        }
    }
    let catalog = state.store.catalog().await?;
    let mut exclusions = Vec::new();
    for (i, sku) in input.exclusions.iter().enumerate() {
        if !catalog.iter().any(|c| &c.sku == sku) {
            v.error(
                &format!("exclusions[{i}]"),
                format!("{sku} is not in the catalog"),
            );
        } else if !exclusions.contains(sku) {
            exclusions.push(sku.clone());
        }
    }
    // Exclusions that leave no box in any month would skip every delivery, unbilled, for ever.
    if let Some(p) = &plan
        && !exclusions.is_empty()
        && !subscriptions::feasible(p, &catalog, &exclusions)
    {
        v.error(
            "exclusions",
            format!(
                "without {}, no {} box from the catalog keeps {} portion(s) surely ready every \
                 day in any month",
                exclusions.join(", "),
                p.kind,
                p.portions_per_day
            ),
        );
    }
    v.finish()?;
    let (Some(plan), Some(weekday)) = (plan, weekday) else {
        unreachable!("validated")
    };
    exclusions.sort();
    let row = SubscriptionRow {
        id: new_id("sub"),
        shopper_id: shopper,
        plan_id: plan.id.clone(),
        delivery_weekday: weekday_name(weekday).into(),
        start_date: input.start_date.to_string(),
        exclusions: serde_json::to_string(&exclusions).unwrap_or_else(|_| "[]".into()),
        status: "active".into(),
        paused_until: None,
        created_at: micros(now),
        ended_at: None,
    };
    let first = first_delivery(input.start_date, weekday);
    let rows = upcoming_rows(&row, &plan, first, now)?;
    let who = state.store.shopper(&row.shopper_id).await?;
    let first = subscriptions::first_open_date(&row, &plan, first, now)?;
    let welcome =
        subscriptions::emails::subscription_confirmed(&plan, &row.id, first, &who.email, &who.name);
    // The answer is made before the commit, to be remembered with it for the request's key.
    let calendar_key = crate::ids::new_token("cal");
    let out = SubscriptionOut {
        calendar_page: super::pages::calendar_path(&row.id, &calendar_key),
        exclusions: exclusions_of(&row),
        id: row.id.clone(),
        plan_id: row.plan_id.clone(),
        shopper_id: row.shopper_id.clone(),
        status: row.status.clone(),
        delivery_weekday: row.delivery_weekday.clone(),
        start_date: row.start_date.clone(),
        paused_until: row.paused_until.clone(),
        next_delivery_date: rows.first().map(|d| d.delivery_date.clone()),
    };
    let answer = key
        .as_ref()
        .map(|Extension(UnclaimedKey(claim))| (claim, remembered_json(StatusCode::CREATED, &out)));
    // The subscription, its deliveries, its welcome and the key's answer are one commit: once
    // it lands, a client's retry under the same key replays the answer and never subscribes
    // twice, even if this process dies before answering.
    let created = state
        .store
        .create_subscription(
            NewSubscription {
                subscription: &row,
                calendar_key: Some(&calendar_key),
                deliveries: &rows,
                welcome: Some(&welcome),
                key: answer.as_ref().map(|(claim, answer)| (*claim, answer)),
            },
            subscriptions::RENEW_JOB,
            now,
        )
        .await?;
    match created {
        IdempotencyBegin::Run => {}
        IdempotencyBegin::Replay(answer) => return Ok(idempotency::replayed(answer)),
        IdempotencyBegin::InFlight => return Err(ApiError::key_in_flight()),
        IdempotencyBegin::Mismatch => return Err(ApiError::key_reused()),
    }
    // Best effort: the subscription has landed, and the next morning's grower-orders run
    // boxes what this misses (from what can still be ordered by then) and recomputes every
    // order from the boxes.
    if let Err(e) =
        subscriptions::plan_upcoming(&state.store, &row, now, state.settings.time_zone).await
    {
        tracing::warn!(subscription = %row.id, error = %e, "planning the first boxes failed");
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// A subscription the caller may see (its shopper or ops), else 404 (403 for a manufacturer).
async fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<SubscriptionRow, ApiError> {
    caller.reads_shoppers()?;
    let sub = state
        .store
        .subscription(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no subscription {id}")))?;
    caller
        .may_see_shopper(&sub.shopper_id)
        .map_err(|_| ApiError::not_found(format!("no subscription {id}")))?;
    Ok(sub)
}

/// One subscription (its shopper, ops).
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}", tag = "subscriptions",
    responses((status = 200, body = SubscriptionOut)))]
async fn get_subscription(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionOut>, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    Ok(Json(subscription_out(&state, sub).await?))
}

/// Replaces the private link to the calendar page (its shopper, ops): the old link opens
/// nothing from now on, as when a calendar app's secret address is reset.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/calendar-link", tag = "subscriptions",
    responses((status = 200, body = SubscriptionOut)))]
async fn replace_calendar_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionOut>, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    let fresh = crate::ids::new_token("cal");
    state.store.replace_calendar_key(&sub.id, &fresh).await?;
    Ok(Json(subscription_out(&state, sub).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipIn {
    date: NaiveDate,
}

/// Skips one delivery before its cutoff (409 `delivery_locked` after it); never billed.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/skip", tag = "subscriptions", request_body = SkipIn,
    responses((status = 200, body = SubscriptionOut), (status = 409, body = super::error::Problem)))]
async fn skip(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<SkipIn>,
) -> Result<Json<SubscriptionOut>, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    let clock_now = state.clock.now();
    let now = micros(clock_now);
    let date = input.date.to_string();
    let of_date = |rows: Vec<DeliveryRow>| rows.into_iter().find(|d| d.delivery_date == date);
    let not_a_delivery =
        || ApiError::field("date", "is not one of this subscription's delivery dates");
    let delivery = match of_date(state.store.deliveries_of(&id).await?) {
        Some(d) => d,
        // Beyond the rows kept ahead: a delivery date of a live subscription, within the
        // bound every date has, is added as skipped. Were the renewal to add it first, it is
        // skipped below like any other.
        None => {
            let plan = plan_of(&state.store, &sub.plan_id).await?;
            let today = subscriptions::today(&plan, clock_now);
            // The bound first: a date near chrono's end would overflow the date arithmetic.
            // A suspended subscription's dates count: reactivated, it must not bring them back.
            if sub.status == "cancelled" || input.date > today + Duration::days(MAX_DAYS_AHEAD) {
                return Err(not_a_delivery());
            }
            let row = subscriptions::delivery_on(&sub, &plan, input.date, clock_now)?
                .ok_or_else(not_a_delivery)?;
            // Skipped by the shopper even inside a pause, so a resume does not bring it back.
            let skipped = DeliveryRow {
                status: "skipped".into(),
                skip_reason: Some("skipped".into()),
                ..row
            };
            state
                .store
                .add_deliveries(&[skipped], subscriptions::RENEW_JOB, now)
                .await?;
            of_date(state.store.deliveries_of(&id).await?).ok_or_else(not_a_delivery)?
        }
    };
    // Skipped by the shopper already: nothing to do. Held by a pause or a suspension: skipped
    // for good, so the resume or reactivation does not bring it back (and bill it).
    if delivery.status == "skipped"
        && !matches!(
            delivery.skip_reason.as_deref(),
            Some("paused" | "suspended")
        )
    {
        return Ok(Json(subscription_out(&state, sub).await?));
    }
    if !state.store.skip_delivery(&id, &date, now).await? {
        // Past its cutoff, or moved meanwhile (a resume, then the lock): the answer is what
        // the week is now. Still skipped (by a pause past its cutoff) is not billed either.
        let now_status =
            of_date(state.store.deliveries_of(&id).await?).map_or(delivery.status, |d| d.status);
        if now_status != "skipped" {
            return Err(SubscriptionError::Locked(format!(
                "the delivery of {date} is past its cutoff ({}) and is {now_status}",
                instant(delivery.cutoff_at).to_rfc3339(),
            ))
            .into());
        }
    }
    Ok(Json(subscription_out(&state, sub).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseIn {
    /// The first date deliveries resume (exclusive end of the pause); none = until resumed.
    until: Option<NaiveDate>,
}

/// Pauses deliveries whose cutoff has not passed (until a date, or until resumed); one past
/// it still comes and is billed.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/pause", tag = "subscriptions", request_body = PauseIn,
    responses((status = 200, body = SubscriptionOut), (status = 409, body = super::error::Problem)))]
async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<PauseIn>,
) -> Result<Json<SubscriptionOut>, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    let now = state.clock.now();
    // The body is optional: no body (or `{}`) pauses until resumed.
    let until = body.and_then(|b| b.until);
    // Dates are the plan's, like its deliveries.
    let plan = plan_of(&state.store, &sub.plan_id).await?;
    let today = subscriptions::today(&plan, now);
    if until.is_some_and(|u| u <= today) {
        return Err(ApiError::field("until", "must be in the future"));
    }
    if until.is_some_and(|u| u > today + Duration::days(MAX_DAYS_AHEAD)) {
        return Err(ApiError::field(
            "until",
            format!("must be within {MAX_DAYS_AHEAD} days"),
        ));
    }
    let until_s = until.map(|u| u.to_string());
    if !state
        .store
        .move_subscription(
            &id,
            &["active"],
            "paused",
            until_s.as_deref(),
            (["scheduled"; 2], None, "skipped", Some("paused")),
            ("0000-00-00", until_s.as_deref().unwrap_or("9999-99-99")),
            micros(now),
        )
        .await?
    {
        return Err(ApiError::conflict(
            "conflict",
            "only an active subscription can be paused",
        ));
    }
    let sub = visible(&state, &caller, &id).await?;
    Ok(Json(subscription_out(&state, sub).await?))
}

/// Resumes a paused subscription, or starts a suspended one again (its next delivery is
/// charged to the card on file: update it first).
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/resume", tag = "subscriptions",
    responses((status = 200, body = SubscriptionOut), (status = 409, body = super::error::Problem)))]
async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionOut>, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    let now = state.clock.now();
    match sub.status.as_str() {
        "suspended" => subscriptions::reactivate(&state.store, &sub, now).await?,
        _ => subscriptions::resume(&state.store, &sub, now).await?,
    }
    // Best effort, as at signup: the deliveries back are boxed now, or the next morning.
    if let Err(e) =
        subscriptions::plan_upcoming(&state.store, &sub, now, state.settings.time_zone).await
    {
        tracing::warn!(subscription = %id, error = %e, "boxing the resumed deliveries failed");
    }
    let sub = visible(&state, &caller, &id).await?;
    Ok(Json(subscription_out(&state, sub).await?))
}

/// Cancels (also a suspended subscription): deliveries whose cutoff has not passed are
/// dropped; those past it (locked, or locked by the next renewal run) still come once paid,
/// but a box held because its payment failed is not sent: its invoice is void.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/cancel", tag = "subscriptions",
    responses((status = 200, body = SubscriptionOut), (status = 409, body = super::error::Problem)))]
async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionOut>, ApiError> {
    visible(&state, &caller, &id).await?;
    let now = micros(state.clock.now());
    let mut moved = false;
    // A paused subscription also has deliveries still scheduled, after its pause ends; a
    // suspended one has only skipped ones (they become skipped for the cancel).
    let deliveries: [(&[&str], [&str; 2]); 3] = [
        (&["active", "past_due"], ["scheduled"; 2]),
        (&["paused"], ["scheduled", "skipped"]),
        (&["suspended"], ["skipped"; 2]),
    ];
    // Each move is guarded by the status it starts from, one transaction each. A pause that
    // ends (paused → active) between two of them leaves all three unmoved: then the status is
    // read again, and the moves run again unless it is already cancelled.
    let mut status = String::new();
    for _round in 0..3 {
        for (from_status, from) in deliveries {
            moved |= state
                .store
                .move_subscription(
                    &id,
                    from_status,
                    "cancelled",
                    None,
                    (from, None, "skipped", Some("cancelled")),
                    ("0000-00-00", "9999-99-99"),
                    now,
                )
                .await?;
        }
        if moved {
            break;
        }
        status = visible(&state, &caller, &id).await?.status;
        if status == "cancelled" {
            return Err(ApiError::conflict(
                "conflict",
                "the subscription is already cancelled",
            ));
        }
    }
    if !moved {
        return Err(ApiError::conflict(
            "conflict",
            format!(
                "the subscription kept changing while being cancelled (now {status}); try again"
            ),
        ));
    }
    let sub = visible(&state, &caller, &id).await?;
    subscriptions::void_held_boxes(&state.store, &sub, state.clock.now()).await?;
    Ok(Json(subscription_out(&state, sub).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentMethodIn {
    payment_token: String,
}

/// Updates the card used for this subscription (the shopper's saved method); the next dunning
/// retry uses it.
#[utoipa::path(put, path = "/api/v1/subscriptions/{id}/payment-method", tag = "subscriptions",
    request_body = PaymentMethodIn, responses((status = 200, body = SubscriptionOut)))]
async fn set_payment_method(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<PaymentMethodIn>,
) -> Result<Json<SubscriptionOut>, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    caller.require_shopper()?;
    let token = parse_payment_token(&input.payment_token)
        .map_err(|m| ApiError::field("payment_token", m))?;
    state
        .store
        .set_payment_token(&sub.shopper_id, &token)
        .await?;
    Ok(Json(subscription_out(&state, sub).await?))
}

#[derive(Serialize, ToSchema)]
pub struct LineOut {
    sku: String,
    name: String,
    qty: i64,
    ripened_days_at_dispatch: i64,
    /// First day (inclusive) it is surely ready to eat or in bloom.
    ready_from: NaiveDate,
    /// Last day (inclusive).
    ready_until: NaiveDate,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryOut {
    date: String,
    /// `scheduled`, `skipped`, `locked`, `paid`, `payment_failed` or `dispatched`.
    status: String,
    skip_reason: Option<String>,
    cutoff_at: DateTime<Utc>,
    amount: Option<String>,
    lines: Vec<LineOut>,
}

/// A delivery as shown on `today` (the plan zone's date).
fn delivery_out(d: DeliveryRow, plan: &PlanRow, today: NaiveDate) -> Result<DeliveryOut, ApiError> {
    let date = date_of(&d.delivery_date)?;
    let currency = Currency::parse(&plan.currency).map_err(|e| ApiError::internal(&e))?;
    let status = shown_status(&d.status, date, today, plan.transit_days).to_owned();
    Ok(DeliveryOut {
        lines: lines_of(&d)
            .into_iter()
            .map(|l| LineOut {
                ready_from: date + Duration::days(l.ready_from),
                ready_until: date + Duration::days(l.ready_until),
                sku: l.sku,
                name: l.name,
                qty: l.qty,
                ripened_days_at_dispatch: l.ripened_days,
            })
            .collect(),
        date: d.delivery_date,
        status,
        skip_reason: d.skip_reason,
        cutoff_at: instant(d.cutoff_at),
        amount: d
            .amount_minor
            .map(|m| Money::from_minor(m, currency).to_string()),
    })
}

/// Deliveries with their lines and ready windows (its shopper, ops).
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}/deliveries", tag = "subscriptions",
    params(PageQuery), responses((status = 200, body = Page<DeliveryOut>)))]
async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<DeliveryOut>>, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    let plan = plan_of(&state.store, &sub.plan_id).await?;
    let today = subscriptions::today(&plan, state.clock.now());
    let items = state
        .store
        .deliveries_of(&id)
        .await?
        .into_iter()
        .map(|d| delivery_out(d, &plan, today))
        .collect::<Result<_, _>>()?;
    page(items, &q)
}

#[derive(Serialize, ToSchema)]
pub struct InvoiceOut {
    id: String,
    delivery_date: String,
    amount: String,
    currency: String,
    /// `pending`, `paid`, `past_due`, `uncollectible` or `void`.
    status: String,
    attempts: i64,
    next_attempt_at: Option<DateTime<Utc>>,
}

impl From<InvoiceRow> for InvoiceOut {
    fn from(i: InvoiceRow) -> Self {
        InvoiceOut {
            amount: amount_string(i.amount_minor, &i.currency),
            id: i.id,
            delivery_date: i.delivery_date,
            currency: i.currency,
            status: i.status,
            attempts: i.attempts,
            next_attempt_at: i.next_attempt_at.map(instant),
        }
    }
}

/// Invoices, one per billed delivery (its shopper, ops).
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}/invoices", tag = "subscriptions",
    params(PageQuery), responses((status = 200, body = Page<InvoiceOut>)))]
async fn invoices(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<InvoiceOut>>, ApiError> {
    visible(&state, &caller, &id).await?;
    page(
        state
            .store
            .invoices_of(&id)
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
        &q,
    )
}

/// Escapes iCalendar text values (RFC 5545 §3.3.11).
fn ics_text(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace(';', "\\;")
        .replace(',', "\\,")
        .replace('\n', "\\n")
}

/// What becomes ready when, as iCalendar: one all-day event per box line.
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}/calendar.ics", tag = "subscriptions",
    responses((status = 200, content_type = "text/calendar")))]
async fn calendar(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let sub = visible(&state, &caller, &id).await?;
    let plan = plan_of(&state.store, &sub.plan_id).await?;
    let stamp = state.clock.now().format("%Y%m%dT%H%M%SZ").to_string();
    let ready = subscriptions::ready_word(&plan);
    let mut ics = vec![
        "BEGIN:VCALENDAR".to_owned(),
        "VERSION:2.0".into(),
        "PRODID:-//pooled//subscriptions//EN".into(),
        "CALSCALE:GREGORIAN".into(),
        format!("X-WR-CALNAME:{}", ics_text(&plan.name)),
    ];
    for d in state.store.deliveries_of(&id).await? {
        if d.status == "skipped" {
            continue;
        }
        let date = date_of(&d.delivery_date)?;
        for (n, l) in lines_of(&d).into_iter().enumerate() {
            let from = date + Duration::days(l.ready_from);
            let until = date + Duration::days(l.ready_until + 1);
            ics.extend([
                "BEGIN:VEVENT".to_owned(),
                format!("UID:{}-{n}@pooled", d.id),
                format!("DTSTAMP:{stamp}"),
                format!("DTSTART;VALUE=DATE:{}", from.format("%Y%m%d")),
                format!("DTEND;VALUE=DATE:{}", until.format("%Y%m%d")),
                format!(
                    "SUMMARY:{}",
                    ics_text(&format!("{} × {} {ready}", l.qty, l.name))
                ),
                format!(
                    "DESCRIPTION:{}",
                    ics_text(&format!("From the box delivered {date}"))
                ),
                "END:VEVENT".into(),
            ]);
        }
    }
    ics.push("END:VCALENDAR".into());
    let body = ics.join("\r\n") + "\r\n";
    Ok((
        [(header::CONTENT_TYPE, "text/calendar; charset=utf-8")],
        body,
    ))
}

#[derive(Deserialize, IntoParams)]
pub struct WeekQuery {
    /// ISO week such as 2026-W49.
    week: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GrowerOrderOut {
    /// Tells apart the lines of one grower, item and ripening day (a sent order and its
    /// supplement).
    id: String,
    supplier: String,
    sku: String,
    qty: i64,
    ripening_start: String,
    order_by: String,
    /// `planned` or `sent`.
    status: String,
    week: String,
}

/// Grower orders of a week (ops).
#[utoipa::path(get, path = "/api/v1/grower-orders", tag = "subscriptions", params(WeekQuery),
    responses((status = 200, body = Page<GrowerOrderOut>)))]
async fn grower_orders(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<WeekQuery>,
) -> Result<Json<Page<GrowerOrderOut>>, ApiError> {
    caller.require_admin()?;
    if let Some(w) = &q.week {
        let ok = w.len() == 8
            && w.as_bytes()[4] == b'-'
            && w.as_bytes()[5] == b'W'
            && w[..4].parse::<u32>().is_ok()
            && w[6..].parse::<u32>().is_ok_and(|n| (1..=53).contains(&n));
        if !ok {
            return Err(ApiError::field(
                "week",
                "must be an ISO week such as 2026-W49",
            ));
        }
    }
    let rows = state.store.grower_orders(q.week.as_deref()).await?;
    page_by_key(
        rows.into_iter()
            .map(|g| GrowerOrderOut {
                id: g.id,
                supplier: g.supplier,
                sku: g.sku,
                qty: g.qty,
                ripening_start: g.ripening_start,
                order_by: g.order_by,
                status: g.status,
                week: g.week,
            })
            .collect(),
        &PageQuery {
            limit: q.limit,
            after: q.after,
        },
        // Unique: a grower, item and ripening day can have several lines (a sent one and its
        // supplement), told apart by status and id, so a page never ends between twins.
        |g: &GrowerOrderOut| {
            format!(
                "{}/{}/{}/{}/{}/{}/{}",
                g.order_by, g.week, g.supplier, g.sku, g.ripening_start, g.status, g.id
            )
        },
    )
}
