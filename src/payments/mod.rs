//! Moving money: payment intents sent to the gateway and their results recorded, exactly once.
//!
//! Every charge or refund is first committed as an intent with its idempotency key (by the
//! business transaction that causes it), then sent, then its result recorded together with
//! its ledger entry. A process that dies between sending and recording leaves the intent
//! pending; the sweep (at start-up and in the `payment-retry` job) resends it with the same
//! key, and the gateway answers with what it already did, so the money moves once. Transient
//! gateway errors are retried with backoff; declines are final until someone asks again.

pub mod gateway;
pub mod sandbox;

use crate::scheduler::schedule::retry_delay;
use crate::store::{IntentResult, IntentRow, Store, StoreError, micros};
use chrono::{DateTime, Duration, Utc};
use gateway::{ChargeRequest, GatewayError, GatewayOutcome, PaymentGateway, RefundRequest};
use std::sync::Arc;

/// The job that resends pending intents (woken by a timer at each intent's retry time).
pub const PAYMENT_RETRY_JOB: &str = "payment-retry";

/// After this many transient failures an intent is given up as `failed` for ops to look at.
const MAX_ATTEMPTS: i64 = 8;

/// How long a sender holds an intent before a sweep may resend it.
fn hold() -> Duration {
    Duration::seconds(60)
}

/// Errors of the payments layer.
#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    #[error("no payment intent {0}")]
    UnknownIntent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where an intent stands after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Declined {
        reason: String,
    },
    /// Not decided yet (a transient error); a sweep will resend it.
    Pending {
        error: String,
    },
    /// Given up: the gateway refused the request, or transient errors never stopped.
    Failed {
        error: String,
    },
}

impl Outcome {
    /// Where a stored intent stands.
    pub fn of(row: &IntentRow) -> Outcome {
        match row.status.as_str() {
            "succeeded" => Outcome::Succeeded,
            "declined" => Outcome::Declined {
                reason: row.decline_reason.clone().unwrap_or_default(),
            },
            "failed" => Outcome::Failed {
                error: row.last_error.clone().unwrap_or_default(),
            },
            _ => Outcome::Pending {
                error: row.last_error.clone().unwrap_or_default(),
            },
        }
    }
}

/// Sends intents and records their results. Cheap to clone.
#[derive(Clone)]
pub struct Payments {
    store: Store,
    gateway: Arc<dyn PaymentGateway>,
    /// Crash tests only: abort after the gateway answers, before recording.
    crash_after_gateway_call: bool,
}

impl Payments {
    pub fn new(
        store: Store,
        gateway: Arc<dyn PaymentGateway>,
        crash_after_gateway_call: bool,
    ) -> Payments {
        Payments {
            store,
            gateway,
            crash_after_gateway_call,
        }
    }

    /// Sends an intent the caller just committed, retrying transient errors a few times with a
    /// short backoff before leaving it to the sweep.
    pub async fn send_now(
        &self,
        intent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, PaymentsError> {
        let mut outcome = self.attempt(intent_id, now).await?;
        for pause_ms in [100, 400] {
            if !matches!(outcome, Outcome::Pending { .. }) {
                break;
            }
            // A network-level pause between immediate retries, not business time.
            tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
            outcome = self.attempt(intent_id, now).await?;
        }
        Ok(outcome)
    }

    /// Resends every pending intent that is due (or every pending one at start-up, when
    /// `include_held`). Returns how many were attempted.
    pub async fn sweep(
        &self,
        now: DateTime<Utc>,
        include_held: bool,
    ) -> Result<usize, PaymentsError> {
        let mut attempted = 0;
        let mut after = 0;
        loop {
            let due = self
                .store
                .pending_intents(micros(now), include_held, after, 100)
                .await?;
            let Some(last) = due.last() else {
                return Ok(attempted);
            };
            after = last.seq;
            for intent in due {
                self.attempt(&intent.id, now).await?;
                attempted += 1;
            }
        }
    }

    /// One gateway call for a pending intent; a resolved one answers with its outcome.
    pub async fn attempt(
        &self,
        intent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, PaymentsError> {
        let now_us = micros(now);
        let Some(intent) = self
            .store
            .begin_intent_attempt(intent_id, micros(now + hold()))
            .await?
        else {
            let row = self
                .store
                .intent(intent_id)
                .await?
                .ok_or_else(|| PaymentsError::UnknownIntent(intent_id.to_owned()))?;
            return Ok(Outcome::of(&row));
        };
        let (method, answer) = self.call_gateway(&intent).await?;
        if self.crash_after_gateway_call {
            tracing::error!(intent = %intent.id, "POOLED_DEBUG_CRASH: aborting before recording the gateway's answer");
            std::process::abort();
        }
        let result = match answer {
            Ok(GatewayOutcome::Succeeded { reference }) => IntentResult::Succeeded {
                gateway_ref: reference,
                payment_method: method,
            },
            Ok(GatewayOutcome::Declined { reference, reason }) => IntentResult::Declined {
                gateway_ref: Some(reference).filter(|r| !r.is_empty()),
                payment_method: method,
                reason,
            },
            Err(GatewayError::Rejected(error)) => IntentResult::Failed { error },
            Err(GatewayError::Transient(error)) if intent.attempts >= MAX_ATTEMPTS => {
                IntentResult::Failed {
                    error: format!("gave up after {} attempts: {error}", intent.attempts),
                }
            }
            Err(GatewayError::Transient(error)) => {
                let delay = retry_delay(
                    intent.attempts as u32,
                    Duration::seconds(30),
                    Duration::hours(1),
                    rand::random(),
                );
                let retry_at = micros(now + delay);
                self.store
                    .record_intent_retry(&intent.id, &error, retry_at, PAYMENT_RETRY_JOB, now_us)
                    .await?;
                metrics::counter!("pooled_gateway_calls_total", "kind" => intent.kind.clone(), "outcome" => "transient").increment(1);
                return Ok(Outcome::Pending { error });
            }
        };
        let label = match &result {
            IntentResult::Succeeded { .. } => "succeeded",
            IntentResult::Declined { .. } => "declined",
            IntentResult::Failed { .. } => "failed",
        };
        metrics::counter!("pooled_gateway_calls_total", "kind" => intent.kind.clone(), "outcome" => label).increment(1);
        self.store
            .record_intent_result(&intent.id, &result, now_us)
            .await?;
        // Whoever recorded first decided; read back what stands.
        let row = self
            .store
            .intent(&intent.id)
            .await?
            .ok_or_else(|| PaymentsError::UnknownIntent(intent.id.clone()))?;
        Ok(Outcome::of(&row))
    }

    /// Calls the gateway for `intent`; returns the payment method used (charges) and the
    /// gateway's answer.
    async fn call_gateway(
        &self,
        intent: &IntentRow,
    ) -> Result<(Option<String>, Result<GatewayOutcome, GatewayError>), PaymentsError> {
        let currency = crate::domain::money::Currency::parse(&intent.currency)
            .map_err(|e| StoreError::Inconsistent(e.to_string()))?;
        let amount = crate::domain::money::Money::from_minor(intent.amount_minor, currency);
        if intent.kind == "refund" {
            let charge = match &intent.refund_of {
                Some(id) => self.store.intent(id).await?,
                None => None,
            };
            let Some(charge_ref) = charge.and_then(|c| c.gateway_ref) else {
                return Ok((
                    None,
                    Err(GatewayError::Rejected(
                        "the refunded charge has no gateway reference".into(),
                    )),
                ));
            };
            let request = RefundRequest {
                charge_ref,
                amount,
                idempotency_key: intent.idempotency_key.clone(),
            };
            return Ok((None, self.gateway.refund(&request).await));
        }
        // The shopper's payment method as it is now: an updated card is used at the next try.
        let method = self.store.shopper(&intent.shopper_id).await?.payment_token;
        let Some(method) = method else {
            return Ok((
                None,
                Ok(GatewayOutcome::Declined {
                    reference: String::new(),
                    reason: "no_payment_method".into(),
                }),
            ));
        };
        let request = ChargeRequest {
            customer: intent.shopper_id.clone(),
            payment_method: method.clone(),
            amount,
            idempotency_key: intent.idempotency_key.clone(),
        };
        Ok((Some(method), self.gateway.charge(&request).await))
    }
}
