//! Presales over HTTP: campaigns and their quotes, pledges, demand, purchase orders.

use super::error::ApiError;
use super::extract::{ApiJson, ApiQuery, Caller, Validation};
use super::idempotency::{self, UnclaimedKey};
use super::ops::{Page, PageQuery, bad_cursor, cursor, page_limit, paginate};
use crate::app::AppState;
use crate::domain::identity::{Principal, parse_name, parse_time_zone};
use crate::domain::money::{Currency, Money, UnitPrice};
use crate::domain::presale::{self, MAX_QTY, Tier, check_tiers};
use crate::ids::new_id;
use crate::presales::{
    self, JoinKey, JoinRequest, Joined, Loaded, PresaleError, emails::purchase_order_csv,
};
use crate::store::{
    CampaignRow, PledgeRow, PurchaseOrderRow, QuotePut, QuoteRow, StoredResponse, instant, micros,
};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_campaign, list_campaigns))
        .routes(routes!(get_campaign))
        .routes(routes!(add_quote))
        .routes(routes!(join))
        .routes(routes!(cancel_campaign))
        .routes(routes!(demand))
        .routes(routes!(get_pledge))
        .routes(routes!(cancel_pledge))
        .routes(routes!(shopper_pledges))
        .routes(routes!(list_purchase_orders))
        .routes(routes!(get_purchase_order))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierIn {
    min_qty: i64,
    /// Decimal string, up to 4 decimals.
    unit_price: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuoteIn {
    /// Set by ops when creating a campaign; a manufacturer quoting later is the caller.
    manufacturer_id: Option<String>,
    lead_time_days: i64,
    capacity: Option<i64>,
    tiers: Vec<TierIn>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignIn {
    title: String,
    sku: String,
    currency: String,
    reference_price: String,
    /// Percent of the reference price, in (0, 50] (at most 20 when not refundable).
    #[schema(value_type = String)]
    deposit_percent: serde_json::Value,
    opens_at: DateTime<Utc>,
    closes_at: DateTime<Utc>,
    time_zone: String,
    balance_window_hours: Option<i64>,
    deposit_refundable: Option<bool>,
    #[serde(default)]
    variants: Vec<String>,
    #[serde(default)]
    quotes: Vec<QuoteIn>,
}

#[derive(Serialize, ToSchema)]
pub struct TierOut {
    min_qty: i64,
    unit_price: String,
}

#[derive(Serialize, ToSchema)]
pub struct CampaignOut {
    id: String,
    title: String,
    sku: String,
    status: String,
    currency: String,
    reference_price: String,
    deposit_percent: String,
    deposit_per_unit: String,
    deposit_refundable: bool,
    /// Nobody ever pays more per unit (null until a manufacturer has quoted).
    price_ceiling: Option<String>,
    tiers: Vec<TierOut>,
    pooled_qty: i64,
    /// Units that can still be pledged in total (null: unbounded).
    capacity: Option<i64>,
    /// Null below the minimum order.
    current_unit_price: Option<String>,
    /// Null at the top tier.
    next_tier: Option<TierOut>,
    units_to_next_tier: Option<i64>,
    opens_at: DateTime<Utc>,
    closes_at: DateTime<Utc>,
    /// The deadline in the campaign's zone (the end is exclusive).
    closes_at_local: String,
    time_zone: String,
    balance_window_hours: i64,
    balance_due_at: Option<DateTime<Utc>>,
    variants: Vec<String>,
    /// The price everyone paid (after close).
    final_unit_price: Option<String>,
    /// Units ordered beyond paid demand (platform stock).
    surplus_qty: i64,
}

fn money(minor: i64, currency: Currency) -> String {
    Money::from_minor(minor, currency).to_string()
}

impl CampaignOut {
    fn of(l: &Loaded) -> CampaignOut {
        let c = &l.campaign;
        let cur = l.currency;
        let rules = l.rules();
        let progress = presale::progress(&rules, c.pooled_qty, cur);
        let zone = presales::zone_of(c);
        CampaignOut {
            id: c.id.clone(),
            title: c.title.clone(),
            sku: c.sku.clone(),
            status: c.status.clone(),
            currency: c.currency.clone(),
            reference_price: money(c.reference_price_minor, cur),
            deposit_percent: Decimal::new(c.deposit_bps, 2).normalize().to_string(),
            deposit_per_unit: money(c.deposit_per_unit_minor, cur),
            deposit_refundable: c.deposit_refundable,
            price_ceiling: c.price_ceiling_minor.map(|m| money(m, cur)),
            tiers: presale::price_steps(&rules, cur)
                .into_iter()
                .map(|s| TierOut {
                    min_qty: s.min_qty,
                    unit_price: s.unit_price.to_string(),
                })
                .collect(),
            pooled_qty: c.pooled_qty,
            capacity: c.capacity,
            current_unit_price: match c.locked_price_minor {
                Some(locked) => Some(money(locked, cur)),
                None => progress.current.map(|m| m.to_string()),
            },
            next_tier: progress.next.map(|s| TierOut {
                min_qty: s.min_qty,
                unit_price: s.unit_price.to_string(),
            }),
            units_to_next_tier: progress.units_to_next,
            opens_at: instant(c.opens_at),
            closes_at: instant(c.closes_at),
            closes_at_local: instant(c.closes_at)
                .with_timezone(&zone)
                .format("%Y-%m-%dT%H:%M:%S%:z %Z")
                .to_string(),
            time_zone: c.time_zone.clone(),
            balance_window_hours: c.balance_window_hours,
            balance_due_at: c.balance_due_at.map(instant),
            variants: presales::variants_of(c),
            // From the close on: the price locked then is the one the settlement records.
            final_unit_price: c.locked_price_minor.map(|m| money(m, cur)),
            surplus_qty: c.surplus_qty,
        }
    }
}

/// Checks a quote's breaks; the checked tiers or the problems under `field`.
fn parse_quote(v: &mut Validation, field: &str, q: &QuoteIn) -> Option<Vec<Tier>> {
    let mut tiers = Vec::new();
    let mut ok = true;
    for (i, t) in q.tiers.iter().enumerate() {
        match UnitPrice::parse(&t.unit_price) {
            Ok(unit_price) => tiers.push(Tier {
                min_qty: t.min_qty,
                unit_price,
            }),
            Err(e) => {
                v.error(&format!("{field}.tiers[{i}].unit_price"), e.to_string());
                ok = false;
            }
        }
    }
    if !(0..=3650).contains(&q.lead_time_days) {
        v.error(&format!("{field}.lead_time_days"), "must be 0–3650");
        ok = false;
    }
    if let Some(cap) = q.capacity
        && !(1..=MAX_QTY).contains(&cap)
    {
        v.error(&format!("{field}.capacity"), format!("must be 1–{MAX_QTY}"));
        ok = false;
    }
    if ok && let Err(e) = check_tiers(&tiers, q.capacity) {
        v.error(&format!("{field}.tiers"), e);
        ok = false;
    }
    ok.then_some(tiers)
}

/// A deposit percentage (string or number) in basis points.
fn parse_percent(raw: &serde_json::Value) -> Result<i64, &'static str> {
    let d: Decimal = match raw {
        serde_json::Value::String(s) => s.parse().map_err(|_| "must be a number such as 10")?,
        serde_json::Value::Number(n) => n
            .to_string()
            .parse()
            .map_err(|_| "must be a number such as 10")?,
        _ => return Err("must be a number such as 10"),
    };
    let bps = d * Decimal::ONE_HUNDRED;
    if bps.fract() != Decimal::ZERO {
        return Err("has at most 2 decimal places");
    }
    let bps: i64 = bps.try_into().map_err(|_| "is out of range")?;
    if bps <= 0 || bps > 5000 {
        return Err("must be greater than 0 and at most 50");
    }
    Ok(bps)
}

/// Creates a campaign (ops), with any quotes known already.
#[utoipa::path(post, path = "/api/v1/campaigns", tag = "presales", request_body = CampaignIn,
    responses((status = 201, body = CampaignOut), (status = 422, body = super::error::Problem)))]
async fn create_campaign(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<CampaignIn>,
) -> Result<(StatusCode, Json<CampaignOut>), ApiError> {
    caller.require_admin()?;
    let now = state.clock.now();
    let mut v = Validation::default();
    let title = v.check("title", parse_name(&input.title));
    let sku = input.sku.trim();
    if sku.is_empty() || sku.len() > 64 || sku.chars().any(char::is_control) {
        v.error("sku", "must be 1–64 characters");
    }
    let currency = v.check(
        "currency",
        Currency::parse(&input.currency).map_err(|e| e.to_string()),
    );
    let reference = currency.and_then(|c| {
        v.check(
            "reference_price",
            Money::parse_positive(&input.reference_price, c),
        )
    });
    let bps = v.check("deposit_percent", parse_percent(&input.deposit_percent));
    let refundable = input.deposit_refundable.unwrap_or(true);
    if let Some(bps) = bps
        && !refundable
        && bps > 2000
    {
        v.error(
            "deposit_percent",
            "a non-refundable deposit may be at most 20 percent of the price",
        );
    }
    if input.closes_at <= input.opens_at {
        v.error("closes_at", "must be after opens_at");
    }
    if input.closes_at <= now {
        v.error("closes_at", "must be in the future");
    }
    let zone = v.check("time_zone", parse_time_zone(&input.time_zone));
    let window = input.balance_window_hours.unwrap_or(72);
    if !(1..=720).contains(&window) {
        v.error("balance_window_hours", "must be 1–720");
    }
    let mut variants = Vec::new();
    for (i, name) in input.variants.iter().enumerate() {
        let name = name.trim();
        if name.is_empty()
            || name.len() > 50
            || name.chars().any(char::is_control)
            || variants.iter().any(|v: &String| v == name)
        {
            v.error(
                &format!("variants[{i}]"),
                "must be unique, 1–50 characters, no control characters",
            );
        } else {
            variants.push(name.to_owned());
        }
    }
    if variants.len() > 100 {
        v.error("variants", "at most 100");
    }
    let mut quotes = Vec::new();
    for (i, q) in input.quotes.iter().enumerate() {
        let field = format!("quotes[{i}]");
        let tiers = parse_quote(&mut v, &field, q);
        match &q.manufacturer_id {
            None => v.error(&format!("{field}.manufacturer_id"), "is required"),
            Some(m) if quotes.iter().any(|(id, _, _): &(String, _, _)| id == m) => v.error(
                &format!("{field}.manufacturer_id"),
                "quotes once per manufacturer",
            ),
            Some(m) if state.store.manufacturer(m).await.is_err() => {
                v.error(&format!("{field}.manufacturer_id"), "no such manufacturer")
            }
            Some(m) => {
                if let Some(tiers) = tiers {
                    quotes.push((m.clone(), tiers, q));
                }
            }
        }
    }
    // Quotes can be added until the campaign opens; one open from the start without any
    // could take no join and could only fail.
    if input.quotes.is_empty() && input.opens_at <= now {
        v.error(
            "quotes",
            "a campaign that opens at once needs at least one quote",
        );
    }
    v.finish()?;
    let (Some(title), Some(currency), Some(reference), Some(bps), Some(zone)) =
        (title, currency, reference, bps, zone)
    else {
        unreachable!("validation passed")
    };
    let deposit_per_unit = presale::deposit_per_unit(reference, Decimal::new(bps, 2))
        .map_err(|e| ApiError::field("deposit_percent", e.to_string()))?;
    let id = new_id("cmp");
    let now_us = micros(now);
    let quote_rows: Vec<QuoteRow> = quotes
        .iter()
        .map(|(m, tiers, q)| QuoteRow {
            id: new_id("quo"),
            campaign_id: id.clone(),
            manufacturer_id: m.clone(),
            tiers: presales::stored_tiers(tiers),
            capacity: q.capacity,
            lead_time_days: q.lead_time_days,
            created_at: now_us,
        })
        .collect();
    let terms = presales::terms_of(&quote_rows, currency)
        .map_err(|reason| ApiError::field("quotes", reason))?;
    let row = CampaignRow {
        id: id.clone(),
        title,
        sku: sku.to_owned(),
        currency: currency.code().to_owned(),
        reference_price_minor: reference.minor(),
        deposit_bps: bps,
        deposit_per_unit_minor: deposit_per_unit.minor(),
        deposit_refundable: refundable,
        opens_at: micros(input.opens_at),
        closes_at: micros(input.closes_at),
        time_zone: zone.name().to_owned(),
        balance_window_hours: window,
        variants: serde_json::to_string(&variants).unwrap_or_else(|_| "[]".into()),
        status: if input.opens_at <= now {
            "open".into()
        } else {
            "scheduled".into()
        },
        pooled_qty: 0,
        capacity: terms.capacity,
        price_ceiling_minor: terms.ceiling.map(|m| m.minor()),
        locked_price_minor: None,
        final_unit_price_minor: None,
        balance_due_at: None,
        surplus_qty: 0,
        shortfall_minor: 0,
        closed_at: None,
        settled_at: None,
        created_at: now_us,
    };
    state
        .store
        .create_campaign(&row, &quote_rows, &presales::campaign_timers(&row))
        .await?;
    let l = presales::load(&state.store, &id).await?;
    Ok((StatusCode::CREATED, Json(CampaignOut::of(&l))))
}

/// Open and scheduled campaigns (public), soonest deadline first. The cursor is the last
/// campaign's deadline (µs) and id, `closes_at.id`, the listing's order.
#[utoipa::path(get, path = "/api/v1/campaigns", tag = "presales", params(PageQuery),
    responses((status = 200, body = Page<CampaignOut>), (status = 422, body = super::error::Problem)))]
async fn list_campaigns(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<CampaignOut>>, ApiError> {
    let limit = page_limit(q.limit)?;
    let after = q
        .after
        .as_deref()
        .map(|a| {
            a.split_once('.')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id)))
                .ok_or_else(bad_cursor)
        })
        .transpose()?;
    let mut items = Vec::new();
    for c in state.store.listed_campaigns(after, limit + 1).await? {
        items.push(presales::load_quotes(&state.store, c).await?);
    }
    Ok(Json(paginate(
        items,
        limit,
        |l| format!("{}.{}", l.campaign.closes_at, l.campaign.id),
        |l| CampaignOut::of(&l),
    )))
}

/// One campaign (public): tiers, progress, deadline.
#[utoipa::path(get, path = "/api/v1/campaigns/{id}", tag = "presales",
    responses((status = 200, body = CampaignOut), (status = 404, body = super::error::Problem)))]
async fn get_campaign(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<CampaignOut>, ApiError> {
    Ok(Json(CampaignOut::of(
        &presales::load(&state.store, &id).await?,
    )))
}

/// A manufacturer quotes (or re-quotes) on a campaign before it opens.
#[utoipa::path(post, path = "/api/v1/campaigns/{id}/quotes", tag = "presales", request_body = QuoteIn,
    responses((status = 201, body = CampaignOut), (status = 409, body = super::error::Problem)))]
async fn add_quote(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<QuoteIn>,
) -> Result<(StatusCode, Json<CampaignOut>), ApiError> {
    let manufacturer = caller.require_manufacturer()?.to_owned();
    let c = presales::load(&state.store, &id).await?.campaign;
    let mut v = Validation::default();
    if input
        .manufacturer_id
        .as_ref()
        .is_some_and(|m| *m != manufacturer)
    {
        v.error("manufacturer_id", "a manufacturer quotes for itself");
    }
    let tiers = parse_quote(&mut v, "quote", &input);
    v.finish()?;
    let tiers = tiers.expect("validated");
    let now = micros(state.clock.now());
    let row = QuoteRow {
        id: new_id("quo"),
        campaign_id: c.id.clone(),
        manufacturer_id: manufacturer,
        tiers: presales::stored_tiers(&tiers),
        capacity: input.capacity,
        lead_time_days: input.lead_time_days,
        created_at: now,
    };
    let currency = presales::currency_of(&c)?;
    match state
        .store
        .put_quote(&row, now, |rows| presales::terms_of(rows, currency))
        .await?
    {
        QuotePut::Stored => {}
        QuotePut::TooLate => {
            return Err(ApiError::conflict(
                "campaign_not_open",
                "quotes are taken only before the campaign opens",
            ));
        }
        QuotePut::Refused(reason) => return Err(ApiError::field("quote", reason)),
    }
    let l = presales::load(&state.store, &c.id).await?;
    Ok((StatusCode::CREATED, Json(CampaignOut::of(&l))))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PledgeIn {
    qty: i64,
    variant: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PledgeOut {
    id: String,
    campaign_id: String,
    shopper_id: String,
    qty: i64,
    variant: Option<String>,
    /// `pending` (deposit being charged), `active`, `awaiting_balance`, `paid`, `defaulted`,
    /// `cancelled`, `refunded`.
    status: String,
    currency: String,
    deposit_amount: String,
    price_ceiling: String,
    created_at: DateTime<Utc>,
    final_unit_price: Option<String>,
    balance_amount: Option<String>,
    balance_paid_at: Option<DateTime<Utc>>,
    refunded_amount: String,
}

impl PledgeOut {
    fn of(p: PledgeRow, c: &CampaignRow, currency: Currency) -> PledgeOut {
        PledgeOut {
            currency: currency.code().to_owned(),
            deposit_amount: money(p.deposit_minor, currency),
            price_ceiling: money(p.price_ceiling_minor, currency),
            created_at: instant(p.created_at),
            final_unit_price: c.locked_price_minor.map(|m| money(m, currency)),
            balance_amount: p.balance_minor.map(|m| money(m, currency)),
            balance_paid_at: p.balance_paid_at.map(instant),
            refunded_amount: money(p.refunded_minor, currency),
            id: p.id,
            campaign_id: p.campaign_id,
            shopper_id: p.shopper_id,
            qty: p.qty,
            variant: p.variant,
            status: p.status,
        }
    }
}

/// Pledge units (shopper): the deposit is charged at once; declined → 402, nothing counted.
#[utoipa::path(post, path = "/api/v1/campaigns/{id}/pledges", tag = "presales", request_body = PledgeIn,
    responses((status = 201, body = PledgeOut), (status = 202, body = PledgeOut),
              (status = 402, body = super::error::Problem), (status = 409, body = super::error::Problem)))]
async fn join(
    State(state): State<AppState>,
    caller: Caller,
    key: Option<Extension<UnclaimedKey>>,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<PledgeIn>,
) -> Result<Response, ApiError> {
    let shopper = caller.require_shopper()?.to_owned();
    if !(1..=10_000).contains(&input.qty) {
        return Err(ApiError::field("qty", "must be 1–10000"));
    }
    let joined = state
        .joins
        .join(JoinRequest {
            campaign_id: id,
            shopper_id: shopper,
            qty: input.qty,
            variant: input.variant.map(|v| v.trim().to_owned()),
            now: state.clock.now(),
            key: key.map(|Extension(UnclaimedKey(claim))| JoinKey {
                claim,
                respond: remembered_join,
                declined: remembered_decline,
            }),
        })
        .await?;
    Ok(match joined {
        Joined::Pledged(pledge, l) => join_answer(pledge, &l).into_response(),
        Joined::Replayed(answer) => idempotency::replayed(answer),
    })
}

/// A join's answer for its pledge: 201 once the deposit went through (or none was due), 202
/// while it is pending.
fn join_answer(p: PledgeRow, l: &Loaded) -> (StatusCode, Json<PledgeOut>) {
    let status = if p.status == "pending" {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    (status, Json(PledgeOut::of(p, &l.campaign, l.currency)))
}

/// [`join_answer`] as remembered for the join's `Idempotency-Key` with the pledge.
fn remembered_join(p: &PledgeRow, l: &Loaded) -> StoredResponse {
    let (status, Json(body)) = join_answer(p.clone(), l);
    idempotency::remembered_json(status, &body)
}

/// A declined deposit's answer as remembered for the join's `Idempotency-Key`.
fn remembered_decline(reason: &str) -> StoredResponse {
    ApiError::from(PresaleError::Declined(reason.to_owned())).remembered()
}

/// A pledge the caller may see (its shopper or ops), else 404 (403 for a manufacturer).
async fn visible_pledge(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(PledgeRow, Loaded), ApiError> {
    caller.reads_shoppers()?;
    let pledge = state
        .store
        .pledge(id)
        .await?
        .filter(|p| p.status != "declined")
        .ok_or_else(|| ApiError::not_found(format!("no pledge {id}")))?;
    caller
        .may_see_shopper(&pledge.shopper_id)
        .map_err(|_| ApiError::not_found(format!("no pledge {id}")))?;
    let l = presales::load(&state.store, &pledge.campaign_id).await?;
    Ok((pledge, l))
}

/// One pledge (its shopper, ops).
#[utoipa::path(get, path = "/api/v1/pledges/{id}", tag = "presales",
    responses((status = 200, body = PledgeOut), (status = 404, body = super::error::Problem)))]
async fn get_pledge(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PledgeOut>, ApiError> {
    let (pledge, l) = visible_pledge(&state, &caller, &id).await?;
    Ok(Json(PledgeOut::of(pledge, &l.campaign, l.currency)))
}

#[derive(Serialize, ToSchema)]
pub struct CancelledOut {
    status: String,
    refunded_amount: String,
}

/// Cancels a pledge before the deadline (its shopper): refundable deposits come back.
#[utoipa::path(post, path = "/api/v1/pledges/{id}/cancel", tag = "presales",
    responses((status = 200, body = CancelledOut), (status = 409, body = super::error::Problem)))]
async fn cancel_pledge(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CancelledOut>, ApiError> {
    let (pledge, _) = visible_pledge(&state, &caller, &id).await?;
    if caller.0 != Principal::Shopper(pledge.shopper_id.clone()) {
        return Err(ApiError::forbidden());
    }
    let refunded =
        presales::cancel(&state.store, &state.payments, &pledge, state.clock.now()).await?;
    Ok(Json(CancelledOut {
        status: "cancelled".into(),
        refunded_amount: refunded.to_string(),
    }))
}

/// A shopper's pledges, newest first (that shopper, ops).
#[utoipa::path(get, path = "/api/v1/shoppers/{id}/pledges", tag = "presales", params(PageQuery),
    responses((status = 200, body = Page<PledgeOut>)))]
async fn shopper_pledges(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<PledgeOut>>, ApiError> {
    caller.may_see_shopper(&id)?;
    let limit = page_limit(q.limit)?;
    let after = cursor(q.after.as_deref())?;
    let rows = state
        .store
        .pledges_of_shopper(&id, after, limit + 1)
        .await?;
    let mut campaigns: BTreeMap<String, Loaded> = BTreeMap::new();
    for r in &rows {
        if !campaigns.contains_key(&r.campaign_id) {
            let l = presales::load(&state.store, &r.campaign_id).await?;
            campaigns.insert(r.campaign_id.clone(), l);
        }
    }
    Ok(Json(paginate(
        rows,
        limit,
        |r| r.seq,
        |r| {
            let l = &campaigns[&r.campaign_id];
            PledgeOut::of(r, &l.campaign, l.currency)
        },
    )))
}

/// Ops cancel a scheduled or open campaign: every deposit is refunded.
#[utoipa::path(post, path = "/api/v1/campaigns/{id}/cancel", tag = "presales",
    responses((status = 200, body = CampaignOut), (status = 409, body = super::error::Problem)))]
async fn cancel_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CampaignOut>, ApiError> {
    caller.require_admin()?;
    presales::cancel_campaign(&state.store, &state.payments, &id, state.clock.now()).await?;
    Ok(Json(CampaignOut::of(
        &presales::load(&state.store, &id).await?,
    )))
}

#[derive(Serialize, ToSchema)]
pub struct DemandPoint {
    at: DateTime<Utc>,
    pooled_qty: i64,
}

#[derive(Serialize, ToSchema)]
pub struct DemandOut {
    pooled_qty: i64,
    by_variant: BTreeMap<String, i64>,
    /// The pooled quantity after each change (at most 500 points; older ones thinned).
    history: Vec<DemandPoint>,
}

/// The pooled quantity over time, as points after each change (thinned to at most `max`).
pub(super) fn demand_history(changes: &[(i64, i64)], max: usize) -> Vec<(i64, i64)> {
    let mut points: Vec<(i64, i64)> = Vec::new();
    let mut total = 0;
    for &(at, delta) in changes {
        total += delta;
        match points.last_mut() {
            Some(last) if last.0 == at => last.1 = total,
            _ => points.push((at, total)),
        }
    }
    if points.len() > max {
        let step = points.len().div_ceil(max);
        let last = *points.last().expect("non-empty");
        points = points.into_iter().step_by(step).collect();
        if points.last() != Some(&last) {
            points.push(last);
        }
    }
    points
}

/// Live demand by variant with its history (ops, and manufacturers quoting on it).
#[utoipa::path(get, path = "/api/v1/campaigns/{id}/demand", tag = "presales",
    responses((status = 200, body = DemandOut), (status = 404, body = super::error::Problem)))]
async fn demand(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DemandOut>, ApiError> {
    caller.reads_manufacturers()?;
    let l = presales::load(&state.store, &id).await?;
    if let Principal::Manufacturer(m) = &caller.0
        && !l.quotes.iter().any(|(q, _)| q.manufacturer_id == *m)
    {
        return Err(ApiError::not_found(format!("no campaign {id}")));
    }
    let by_variant = state.store.live_demand(&id).await?.into_iter().collect();
    let changes = state.store.demand_changes(&id).await?;
    Ok(Json(DemandOut {
        pooled_qty: l.campaign.pooled_qty,
        by_variant,
        history: demand_history(&changes, 500)
            .into_iter()
            .map(|(at, pooled_qty)| DemandPoint {
                at: instant(at),
                pooled_qty,
            })
            .collect(),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct PoLineOut {
    variant: String,
    qty: i64,
}

#[derive(Serialize, ToSchema)]
pub struct PurchaseOrderOut {
    id: String,
    campaign_id: String,
    manufacturer_id: String,
    currency: String,
    qty: i64,
    unit_price: String,
    total: String,
    lines: Vec<PoLineOut>,
    issued_at: DateTime<Utc>,
    ship_by: String,
}

impl From<PurchaseOrderRow> for PurchaseOrderOut {
    fn from(po: PurchaseOrderRow) -> Self {
        let lines: Vec<serde_json::Value> = serde_json::from_str(&po.lines).unwrap_or_default();
        let total = Currency::parse(&po.currency)
            .map(|c| money(po.total_minor, c))
            .unwrap_or_default();
        PurchaseOrderOut {
            unit_price: UnitPrice::from_scaled(po.unit_price_scaled).to_string(),
            total,
            lines: lines
                .iter()
                .map(|l| PoLineOut {
                    variant: l["variant"].as_str().unwrap_or_default().to_owned(),
                    qty: l["qty"].as_i64().unwrap_or(0),
                })
                .collect(),
            issued_at: instant(po.issued_at),
            id: po.id,
            campaign_id: po.campaign_id,
            manufacturer_id: po.manufacturer_id,
            currency: po.currency,
            qty: po.qty,
            ship_by: po.ship_by,
        }
    }
}

/// Purchase orders: a manufacturer's own, or all for ops.
#[utoipa::path(get, path = "/api/v1/purchase-orders", tag = "presales", params(PageQuery),
    responses((status = 200, body = Page<PurchaseOrderOut>)))]
async fn list_purchase_orders(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<PurchaseOrderOut>>, ApiError> {
    let manufacturer = match &caller.0 {
        Principal::Admin => None,
        Principal::Manufacturer(m) => Some(m.as_str()),
        Principal::Shopper(_) => return Err(ApiError::forbidden()),
    };
    let limit = page_limit(q.limit)?;
    let after = cursor(q.after.as_deref())?;
    let rows = state
        .store
        .purchase_orders(manufacturer, after, limit + 1)
        .await?;
    Ok(Json(paginate(
        rows,
        limit,
        |r| r.seq,
        PurchaseOrderOut::from,
    )))
}

/// One purchase order as JSON, or as CSV when the id ends in `.csv`.
#[utoipa::path(get, path = "/api/v1/purchase-orders/{id}", tag = "presales",
    responses((status = 200, body = PurchaseOrderOut), (status = 404, body = super::error::Problem)))]
async fn get_purchase_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (id, csv) = match id.strip_suffix(".csv") {
        Some(id) => (id.to_owned(), true),
        None => (id, false),
    };
    caller.reads_manufacturers()?;
    let po = state
        .store
        .purchase_order(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no purchase order {id}")))?;
    caller
        .may_see_manufacturer(&po.manufacturer_id)
        .map_err(|_| ApiError::not_found(format!("no purchase order {id}")))?;
    if csv {
        let l = presales::load(&state.store, &po.campaign_id).await?;
        let body = purchase_order_csv(&l.campaign.sku, l.currency, &po);
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{id}.csv\""),
                ),
            ],
            body,
        )
            .into_response());
    }
    Ok(Json(PurchaseOrderOut::from(po)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_accumulates_and_thins() {
        let changes = [(1, 5), (1, 2), (3, -1), (4, 10)];
        assert_eq!(demand_history(&changes, 10), [(1, 7), (3, 6), (4, 16)]);
        let many: Vec<(i64, i64)> = (0..1000).map(|i| (i, 1)).collect();
        let thinned = demand_history(&many, 100);
        assert!(thinned.len() <= 101);
        assert_eq!(thinned.last(), Some(&(999, 1000)));
    }
}
