//! Ops API for money: the gateway's record, payment intents, one-off charges and refunds by
//! ops, and the ledger's reconciliation check. Admin only.

use super::amount_string;
use super::error::ApiError;
use super::extract::{ApiJson, ApiQuery, Caller, Validation};
use super::ops::{Page, cursor, page_limit, paginate};
use crate::app::AppState;
use crate::domain::ledger::Account;
use crate::domain::money::{Currency, Money};
use crate::ids::new_id;
use crate::payments::Outcome;
use crate::store::{IntentFilter, IntentRow, LedgerCheck, NewIntent, SandboxPaymentRow, instant};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_payments))
        .routes(routes!(list_intents))
        .routes(routes!(create_charge))
        .routes(routes!(refund_intent))
        .routes(routes!(ledger_check))
}

/// One movement in the gateway's record.
#[derive(Serialize, ToSchema)]
pub struct PaymentOut {
    id: String,
    /// `charge` or `refund`.
    kind: String,
    amount: String,
    currency: String,
    idempotency_key: String,
    /// `succeeded`, `declined` or `failed` (a transient failure awaiting its retry).
    status: String,
    decline_reason: Option<String>,
    created_at: DateTime<Utc>,
    customer: String,
    payment_method: Option<String>,
    /// Refund: the charge it returns money from.
    charge_id: Option<String>,
    /// Charge: how much has been refunded.
    refunded_amount: String,
    /// Calls made with this key (replays included).
    calls: i64,
}

impl From<SandboxPaymentRow> for PaymentOut {
    fn from(r: SandboxPaymentRow) -> Self {
        PaymentOut {
            amount: amount_string(r.amount_minor, &r.currency),
            refunded_amount: amount_string(r.refunded_minor, &r.currency),
            id: r.id,
            kind: r.kind,
            currency: r.currency,
            idempotency_key: r.idempotency_key,
            status: r.status,
            decline_reason: r.decline_reason,
            created_at: instant(r.created_at),
            customer: r.customer,
            payment_method: r.payment_method,
            charge_id: r.charge_id,
            calls: r.calls,
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub struct PaymentsQuery {
    shopper_id: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

/// The gateway's record of charges and refunds, newest first.
#[utoipa::path(get, path = "/api/v1/ops/payments", tag = "payments", params(PaymentsQuery),
    responses((status = 200, body = Page<PaymentOut>)))]
async fn list_payments(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PaymentsQuery>,
) -> Result<Json<Page<PaymentOut>>, ApiError> {
    caller.require_admin()?;
    let limit = page_limit(q.limit)?;
    let after = cursor(q.after.as_deref())?;
    let rows = state
        .store
        .sandbox_payments(q.shopper_id.as_deref(), after, limit + 1)
        .await?;
    Ok(Json(paginate(rows, limit, |r| r.seq, PaymentOut::from)))
}

/// A charge or refund as we committed, sent and recorded it.
#[derive(Serialize, ToSchema)]
pub struct IntentOut {
    id: String,
    kind: String,
    purpose: String,
    subject_id: String,
    shopper_id: String,
    amount: String,
    currency: String,
    idempotency_key: String,
    /// `pending`, `succeeded`, `declined` or `failed`.
    status: String,
    attempts: i64,
    next_attempt_at: Option<DateTime<Utc>>,
    decline_reason: Option<String>,
    last_error: Option<String>,
    gateway_ref: Option<String>,
    refund_of: Option<String>,
    /// Charge: refunds decided so far.
    refunded_amount: String,
    memo: String,
    created_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
}

impl From<IntentRow> for IntentOut {
    fn from(r: IntentRow) -> Self {
        IntentOut {
            amount: amount_string(r.amount_minor, &r.currency),
            refunded_amount: amount_string(r.refunded_minor, &r.currency),
            next_attempt_at: (r.status == "pending").then(|| instant(r.next_attempt_at)),
            id: r.id,
            kind: r.kind,
            purpose: r.purpose,
            subject_id: r.subject_id,
            shopper_id: r.shopper_id,
            currency: r.currency,
            idempotency_key: r.idempotency_key,
            status: r.status,
            attempts: r.attempts,
            decline_reason: r.decline_reason,
            last_error: r.last_error,
            gateway_ref: r.gateway_ref,
            refund_of: r.refund_of,
            memo: r.memo,
            created_at: instant(r.created_at),
            resolved_at: r.resolved_at.map(instant),
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub struct IntentsQuery {
    shopper_id: Option<String>,
    /// `pending`, `succeeded`, `declined` or `failed`.
    status: Option<String>,
    /// The pledge, invoice, … an intent is for.
    subject_id: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

/// Payment intents, newest first.
#[utoipa::path(get, path = "/api/v1/ops/payment-intents", tag = "payments", params(IntentsQuery),
    responses((status = 200, body = Page<IntentOut>)))]
async fn list_intents(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<IntentsQuery>,
) -> Result<Json<Page<IntentOut>>, ApiError> {
    caller.require_admin()?;
    let limit = page_limit(q.limit)?;
    let after = cursor(q.after.as_deref())?;
    if let Some(s) = &q.status
        && !["pending", "succeeded", "declined", "failed"].contains(&s.as_str())
    {
        return Err(ApiError::field(
            "status",
            "must be pending, succeeded, declined or failed",
        ));
    }
    let filter = IntentFilter {
        shopper_id: q.shopper_id,
        status: q.status,
        subject_id: q.subject_id,
    };
    let rows = state.store.intents(&filter, after, limit + 1).await?;
    Ok(Json(paginate(rows, limit, |r| r.seq, IntentOut::from)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChargeIn {
    shopper_id: String,
    /// Decimal string in the currency's minor unit, e.g. `"12.50"`.
    amount: String,
    /// ISO 4217.
    currency: String,
    /// Why ops charges this (shown in the ledger).
    memo: String,
}

/// A memo for the ledger: 1–500 characters.
fn parse_memo(raw: &str) -> Result<String, String> {
    let memo = raw.trim();
    if memo.is_empty() || memo.chars().count() > 500 {
        return Err("must be 1–500 characters".into());
    }
    Ok(memo.to_owned())
}

/// The answer to a charge or refund: the intent, and how it ended.
fn settled(row: IntentRow) -> Result<(StatusCode, Json<IntentOut>), ApiError> {
    match Outcome::of(&row) {
        Outcome::Succeeded => Ok((StatusCode::CREATED, Json(row.into()))),
        // Still trying (transient gateway trouble): accepted, the sweep finishes it.
        Outcome::Pending { .. } => Ok((StatusCode::ACCEPTED, Json(row.into()))),
        Outcome::Declined { reason } => Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "payment_declined",
            format!("the payment was declined: {reason}"),
        )),
        Outcome::Failed { error } => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "payment_failed",
            format!("the gateway could not process the payment: {error}"),
        )),
    }
}

/// The `Idempotency-Key` a money-moving request must carry: it also keys the gateway call, so
/// a client retry after a crash resumes the same intent instead of charging again.
fn required_key(headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::field("Idempotency-Key", "is required on requests that move money")
        })
}

/// Charges a shopper once, by ops (e.g. a goodwill correction); `Idempotency-Key` required.
#[utoipa::path(post, path = "/api/v1/ops/payments/charges", tag = "payments", request_body = ChargeIn,
    responses((status = 201, body = IntentOut), (status = 202, body = IntentOut),
              (status = 402, description = "declined")))]
async fn create_charge(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChargeIn>,
) -> Result<(StatusCode, Json<IntentOut>), ApiError> {
    caller.require_admin()?;
    let key = required_key(&headers)?;
    let mut v = Validation::default();
    let currency = v.check(
        "currency",
        Currency::parse(&body.currency).map_err(|_| "must be an ISO 4217 code such as EUR"),
    );
    let amount = currency.and_then(|c| v.check("amount", Money::parse_positive(&body.amount, c)));
    let memo = v.check("memo", parse_memo(&body.memo));
    v.finish()?;
    let (Some(amount), Some(memo)) = (amount, memo) else {
        unreachable!("validation passed")
    };
    state
        .store
        .shopper(&body.shopper_id)
        .await
        .map_err(|_| ApiError::field("shopper_id", "no such shopper"))?;
    let now = state.clock.now();
    let id = new_id("pi");
    let intent = NewIntent {
        idempotency_key: format!("adjustment:{key}"),
        kind: "charge",
        purpose: "adjustment",
        subject_id: id.clone(),
        id,
        shopper_id: body.shopper_id,
        amount,
        account: Account::Adjustments,
        refund_of: None,
        memo,
        first_sweep_at: crate::store::micros(now + crate::payments::hold()),
    };
    let row = state
        .store
        .create_intent(&intent, crate::store::micros(now))
        .await?;
    if row.shopper_id != intent.shopper_id || row.amount_minor != amount.minor() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for another charge",
        ));
    }
    state.payments.send_now(&row.id, now).await?;
    settled(
        state
            .store
            .intent(&row.id)
            .await?
            .ok_or_else(|| ApiError::internal(&"a committed intent disappeared"))?,
    )
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundIn {
    /// Defaults to everything the charge has left.
    amount: Option<String>,
    memo: String,
}

/// Refunds part or all of a succeeded charge; never more than it has left.
/// `Idempotency-Key` required.
#[utoipa::path(post, path = "/api/v1/ops/payment-intents/{id}/refund", tag = "payments",
    request_body = RefundIn,
    responses((status = 201, body = IntentOut), (status = 409, description = "nothing left to refund")))]
async fn refund_intent(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RefundIn>,
) -> Result<(StatusCode, Json<IntentOut>), ApiError> {
    caller.require_admin()?;
    let key = required_key(&headers)?;
    let charge = state
        .store
        .intent(&id)
        .await?
        .filter(|c| c.kind == "charge")
        .ok_or_else(|| ApiError::not_found(format!("no charge intent {id}")))?;
    let currency = Currency::parse(&charge.currency).map_err(|e| ApiError::internal(&e))?;
    let mut v = Validation::default();
    let amount = match &body.amount {
        None => Some(Money::from_minor(
            charge.amount_minor - charge.refunded_minor,
            currency,
        )),
        Some(raw) => v.check("amount", Money::parse_positive(raw, currency)),
    };
    let memo = v.check("memo", parse_memo(&body.memo));
    v.finish()?;
    let (Some(amount), Some(memo)) = (amount, memo) else {
        unreachable!("validation passed")
    };
    // A deposit is refunded by its pledge (a cancel, a failed or cancelled campaign, a
    // default, the excess over the final price), always in full: a partial refund here would
    // leave that refund no room, and the shopper short.
    if charge.purpose == "deposit" {
        return Err(ApiError::conflict(
            "conflict",
            format!(
                "charge {id} is a pledge's deposit: it is refunded by cancelling the pledge or \
                 the campaign"
            ),
        ));
    }
    if charge.status != "succeeded" || !amount.is_positive() {
        return Err(ApiError::conflict(
            "conflict",
            format!(
                "charge {id} has nothing to refund (status {})",
                charge.status
            ),
        ));
    }
    let now = state.clock.now();
    let refund_id = new_id("pi");
    let intent = NewIntent {
        idempotency_key: format!("refund:{id}:{key}"),
        kind: "refund",
        purpose: "refund",
        subject_id: charge.subject_id.clone(),
        id: refund_id,
        shopper_id: charge.shopper_id.clone(),
        amount,
        account: Account::parse(&charge.account).unwrap_or(Account::Adjustments),
        refund_of: Some(charge.id.clone()),
        memo,
        first_sweep_at: crate::store::micros(now + crate::payments::hold()),
    };
    let Some(row) = state
        .store
        .create_refund_intent(&intent, crate::store::micros(now))
        .await?
    else {
        let left = Money::from_minor(charge.amount_minor - charge.refunded_minor, currency);
        return Err(ApiError::conflict(
            "conflict",
            format!(
                "refund of {amount} {currency} exceeds the {left} {currency} charge {id} has left"
            ),
        ));
    };
    state.payments.send_now(&row.id, now).await?;
    settled(
        state
            .store
            .intent(&row.id)
            .await?
            .ok_or_else(|| ApiError::internal(&"a committed intent disappeared"))?,
    )
}

/// Checks the ledger: every entry balanced, and gateway clearing equal to the gateway's record
/// per shopper, with every succeeded movement matched to its intent.
#[utoipa::path(get, path = "/api/v1/ops/ledger/check", tag = "payments",
    responses((status = 200, body = LedgerCheckOut)))]
async fn ledger_check(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<LedgerCheckOut>, ApiError> {
    caller.require_admin()?;
    Ok(Json(state.store.ledger_check().await?.into()))
}

#[derive(Serialize, ToSchema)]
pub struct AccountOut {
    account: String,
    currency: String,
    /// Debits minus credits, as a decimal string.
    balance: String,
}

#[derive(Serialize, ToSchema)]
pub struct LedgerCheckOut {
    balanced: bool,
    entries: i64,
    gateway_matches: bool,
    accounts: Vec<AccountOut>,
    mismatches: Vec<String>,
}

impl From<LedgerCheck> for LedgerCheckOut {
    fn from(c: LedgerCheck) -> Self {
        LedgerCheckOut {
            balanced: c.balanced,
            entries: c.entries,
            gateway_matches: c.gateway_matches,
            accounts: c
                .accounts
                .into_iter()
                .map(|a| AccountOut {
                    balance: amount_string(a.balance_minor, &a.currency),
                    account: a.account,
                    currency: a.currency,
                })
                .collect(),
            mismatches: c.mismatches,
        }
    }
}
