//! The sandbox gateway, the embedded default: deterministic by payment token and durable in
//! the database, so exactly-once can be checked after the fact and across restarts.
//!
//! `pm_ok` succeeds; `pm_decline` is declined (`card_declined`); `pm_insufficient_funds` is
//! declined (`insufficient_funds`); `pm_flaky` fails once per idempotency key with a transient
//! error and then succeeds; any other token is declined (`invalid_payment_method`). A key that
//! succeeded answers with that success forever; a key that was declined or failed is decided
//! afresh on the next call (so a dunning retry after a card update can succeed under the
//! invoice's one key), and a key reused with another amount, currency or customer is rejected.

use super::gateway::{
    ChargeRequest, GatewayBatchFuture, GatewayError, GatewayFuture, GatewayOutcome, GatewayResult,
    PaymentGateway, RefundRequest,
};
use crate::clock::Clock;
use crate::ids::new_id;
use crate::store::{SandboxPaymentRow, SandboxRefund, Store, StoreError, micros};
use std::sync::Arc;

pub struct SandboxGateway {
    store: Store,
    clock: Arc<dyn Clock>,
}

/// The sandbox's decision for a token: `Ok(None)` succeeds, `Ok(Some(reason))` declines.
fn decide(method: &str, first_call_with_key: bool) -> Result<Option<&'static str>, GatewayError> {
    match method {
        "pm_ok" => Ok(None),
        "pm_decline" => Ok(Some("card_declined")),
        "pm_insufficient_funds" => Ok(Some("insufficient_funds")),
        "pm_flaky" if first_call_with_key => Err(GatewayError::Transient(
            "sandbox: pm_flaky fails the first call of every key".into(),
        )),
        "pm_flaky" => Ok(None),
        _ => Ok(Some("invalid_payment_method")),
    }
}

/// The stored status (and decline reason) of a decision; a transient failure is `failed`.
fn as_status(
    decision: Result<Option<&'static str>, GatewayError>,
) -> (&'static str, Option<&'static str>) {
    match decision {
        Ok(None) => ("succeeded", None),
        Ok(Some(reason)) => ("declined", Some(reason)),
        Err(_) => ("failed", None),
    }
}

fn store_error(e: StoreError) -> GatewayError {
    GatewayError::Transient(format!("sandbox storage: {e}"))
}

fn outcome_of(row: &SandboxPaymentRow) -> GatewayResult {
    match row.status.as_str() {
        "succeeded" => Ok(GatewayOutcome::Succeeded {
            reference: row.id.clone(),
        }),
        "declined" => Ok(GatewayOutcome::Declined {
            reference: row.id.clone(),
            reason: row.decline_reason.clone().unwrap_or_default(),
        }),
        _ => Err(GatewayError::Transient(
            "sandbox: pm_flaky fails the first call of every key".into(),
        )),
    }
}

/// The sandbox's record of the first call with a key, decided by the payment token.
fn first_call(req: &ChargeRequest, now: i64) -> SandboxPaymentRow {
    let (status, reason) = as_status(decide(&req.payment_method, true));
    SandboxPaymentRow {
        seq: 0,
        id: new_id("ch"),
        kind: "charge".into(),
        idempotency_key: req.idempotency_key.clone(),
        customer: req.customer.clone(),
        payment_method: Some(req.payment_method.clone()),
        charge_id: None,
        amount_minor: req.amount.minor(),
        currency: req.amount.currency().code().into(),
        status: status.into(),
        decline_reason: reason.map(str::to_owned),
        refunded_minor: 0,
        calls: 1,
        created_at: now,
        updated_at: now,
    }
}

impl SandboxGateway {
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> SandboxGateway {
        SandboxGateway { store, clock }
    }

    async fn do_charge(&self, req: &ChargeRequest) -> GatewayResult {
        let now = micros(self.clock.now());
        // Each pass either decides or loses a race on the key and reads it again.
        loop {
            let existing = self
                .store
                .sandbox_payment_by_key("charge", &req.idempotency_key)
                .await
                .map_err(store_error)?;
            let Some(row) = existing else {
                let row = first_call(req, now);
                if self
                    .store
                    .sandbox_insert(std::slice::from_ref(&row))
                    .await
                    .map_err(store_error)?[0]
                {
                    return outcome_of(&row);
                }
                continue;
            };
            if row.amount_minor != req.amount.minor()
                || row.currency != req.amount.currency().code()
                || row.customer != req.customer
            {
                return Err(GatewayError::Rejected(format!(
                    "idempotency key {} was used for another charge",
                    req.idempotency_key
                )));
            }
            if row.status == "succeeded" {
                self.store
                    .sandbox_replayed(&row.id, now)
                    .await
                    .map_err(store_error)?;
                return outcome_of(&row);
            }
            let (status, reason) = as_status(decide(&req.payment_method, false));
            let redecided = self
                .store
                .sandbox_redecide(&row.id, row.calls, status, &req.payment_method, reason, now)
                .await
                .map_err(store_error)?;
            if redecided {
                return outcome_of(&SandboxPaymentRow {
                    status: status.into(),
                    decline_reason: reason.map(str::to_owned),
                    ..row
                });
            }
        }
    }

    /// First calls are recorded with one multi-row insert; keys seen before (replays, retries
    /// after a decline) take the one-at-a-time path that handles them.
    async fn do_charge_many(&self, requests: &[ChargeRequest]) -> Vec<GatewayResult> {
        let now = micros(self.clock.now());
        let rows: Vec<SandboxPaymentRow> = requests.iter().map(|r| first_call(r, now)).collect();
        let inserted = match self.store.sandbox_insert(&rows).await {
            Ok(inserted) => inserted,
            Err(e) => {
                let error = store_error(e);
                return requests.iter().map(|_| Err(error.clone())).collect();
            }
        };
        let mut answers = Vec::with_capacity(requests.len());
        for ((request, row), new) in requests.iter().zip(&rows).zip(inserted) {
            answers.push(if new {
                outcome_of(row)
            } else {
                self.do_charge(request).await
            });
        }
        answers
    }

    async fn do_refund(&self, req: &RefundRequest) -> GatewayResult {
        let now = micros(self.clock.now());
        loop {
            let existing = self
                .store
                .sandbox_payment_by_key("refund", &req.idempotency_key)
                .await
                .map_err(store_error)?;
            if let Some(row) = existing {
                if row.charge_id.as_deref() != Some(req.charge_ref.as_str())
                    || row.amount_minor != req.amount.minor()
                {
                    return Err(GatewayError::Rejected(format!(
                        "idempotency key {} was used for another refund",
                        req.idempotency_key
                    )));
                }
                self.store
                    .sandbox_replayed(&row.id, now)
                    .await
                    .map_err(store_error)?;
                return outcome_of(&row);
            }
            let row = SandboxPaymentRow {
                seq: 0,
                id: new_id("re"),
                kind: "refund".into(),
                idempotency_key: req.idempotency_key.clone(),
                customer: String::new(),
                payment_method: None,
                charge_id: Some(req.charge_ref.clone()),
                amount_minor: req.amount.minor(),
                currency: req.amount.currency().code().into(),
                status: "succeeded".into(),
                decline_reason: None,
                refunded_minor: 0,
                calls: 1,
                created_at: now,
                updated_at: now,
            };
            match self.store.sandbox_refund(&row).await.map_err(store_error)? {
                SandboxRefund::Recorded => return outcome_of(&row),
                SandboxRefund::KeyTaken => continue,
                SandboxRefund::Refused => {
                    return Err(GatewayError::Rejected(format!(
                        "refund of {} {} exceeds what charge {} has left, or no such charge",
                        req.amount,
                        req.amount.currency(),
                        req.charge_ref
                    )));
                }
            }
        }
    }
}

impl PaymentGateway for SandboxGateway {
    fn charge<'a>(&'a self, request: &'a ChargeRequest) -> GatewayFuture<'a> {
        Box::pin(self.do_charge(request))
    }

    fn refund<'a>(&'a self, request: &'a RefundRequest) -> GatewayFuture<'a> {
        Box::pin(self.do_refund(request))
    }

    fn charge_many<'a>(&'a self, requests: &'a [ChargeRequest]) -> GatewayBatchFuture<'a> {
        Box::pin(self.do_charge_many(requests))
    }
}

#[cfg(test)]
mod tests {
    use super::decide;

    #[test]
    fn tokens_decide_deterministically() {
        assert_eq!(decide("pm_ok", true), Ok(None));
        assert_eq!(decide("pm_decline", true), Ok(Some("card_declined")));
        assert_eq!(
            decide("pm_insufficient_funds", false),
            Ok(Some("insufficient_funds"))
        );
        assert!(decide("pm_flaky", true).is_err());
        assert_eq!(decide("pm_flaky", false), Ok(None));
        assert_eq!(decide("pm_gold", true), Ok(Some("invalid_payment_method")));
    }
}
