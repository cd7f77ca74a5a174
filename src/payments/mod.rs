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

use crate::batch::InFlight;
use crate::config::CrashPoint;
use crate::domain::money::{Currency, Money};
use crate::scheduler::schedule::retry_delay;
use crate::store::{FollowUp, IntentResult, IntentRow, Store, StoreError, micros};
use chrono::{DateTime, Duration, Utc};
use gateway::{
    ChargeRequest, GatewayError, GatewayOutcome, GatewayResult, PaymentGateway, RefundRequest,
};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The job that resends pending intents (woken by a timer at each intent's retry time).
pub const PAYMENT_RETRY_JOB: &str = "payment-retry";

/// After this many transient failures an intent is given up as `failed` for ops to look at.
const MAX_ATTEMPTS: i64 = 8;

/// How many due intents a sweep sends as one batch.
const SWEEP_CHUNK: i64 = 500;
/// Chunks a sweep charges at once ([`InFlight`]). Each chunk takes its intents with a
/// guarded update, so two never charge the same intent; SQLite's one writer takes them in
/// turn.
const SWEEP_CHUNKS_IN_FLIGHT: usize = 2;

/// How long a sender holds an intent before a sweep may resend it: an intent its caller sends
/// right after committing it is first swept this long after (`NewIntent::first_sweep_at`).
pub fn hold() -> Duration {
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
    /// The outcome of a result this caller recorded.
    fn recorded(result: &IntentResult) -> Outcome {
        match result {
            IntentResult::Succeeded { .. } => Outcome::Succeeded,
            IntentResult::Declined { reason, .. } => Outcome::Declined {
                reason: reason.clone(),
            },
            IntentResult::Failed { error } => Outcome::Failed {
                error: error.clone(),
            },
        }
    }

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

/// What the module that caused some intents writes with their results when a sweep resolves
/// them (a join's confirmation, when the gateway answered its deposit late). Implemented by
/// the modules above payments and handed down, so payments needs no knowledge of them.
pub trait SweepFollowUps: Send + Sync {
    /// Follow-ups (by intent id) for `intents`, about to be resent.
    fn follow_ups<'a>(&'a self, intents: &'a [IntentRow]) -> FollowUpsFuture<'a>;
}

/// What [`SweepFollowUps::follow_ups`] returns.
pub type FollowUpsFuture<'a> =
    Pin<Box<dyn Future<Output = Result<HashMap<String, FollowUp>, PaymentsError>> + Send + 'a>>;

/// Sends intents and records their results. Cheap to clone.
#[derive(Clone)]
pub struct Payments {
    store: Store,
    gateway: Arc<dyn PaymentGateway>,
    /// Crash tests only: where to abort around a gateway call.
    crash_at: Option<CrashPoint>,
    sweep_follow_ups: Option<Arc<dyn SweepFollowUps>>,
}

impl Payments {
    pub fn new(
        store: Store,
        gateway: Arc<dyn PaymentGateway>,
        crash_at: Option<CrashPoint>,
    ) -> Payments {
        Payments {
            store,
            gateway,
            crash_at,
            sweep_follow_ups: None,
        }
    }

    /// Lets sweeps write `follow_ups`' emails with the results they record.
    pub fn with_sweep_follow_ups(self, follow_ups: Arc<dyn SweepFollowUps>) -> Payments {
        Payments {
            sweep_follow_ups: Some(follow_ups),
            ..self
        }
    }

    /// Sends an intent the caller just committed (see [`Payments::send_many_now`]).
    pub async fn send_now(
        &self,
        intent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, PaymentsError> {
        let outcomes = self
            .send_many_now(&[intent_id], &HashMap::new(), now)
            .await?;
        single(outcomes, intent_id)
    }

    /// Sends intents the caller just committed as one batch, retrying transient errors a few
    /// times with a short backoff before leaving them to the sweep. Outcomes in order of `ids`;
    /// `follow_ups` as for [`Payments::attempt_many`].
    pub async fn send_many_now(
        &self,
        ids: &[&str],
        follow_ups: &HashMap<String, FollowUp>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Outcome>, PaymentsError> {
        let outcomes = self.attempt_many(ids, follow_ups, now).await?;
        self.retry_pending(ids, outcomes, follow_ups, now).await
    }

    /// One gateway call for each intent the caller committed with its first attempt already
    /// taken (`insert_begun_intents!`), so no commit is spent taking them; results recorded
    /// as [`Payments::attempt_many`] records them, `follow_ups` with them. A transient error
    /// leaves its intent pending, for [`Payments::retry_pending`] or the retry timer.
    pub async fn attempt_begun(
        &self,
        begun: &[IntentRow],
        follow_ups: &HashMap<String, FollowUp>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Outcome>, PaymentsError> {
        if begun.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = begun.iter().map(|i| i.id.as_str()).collect();
        self.attempt_taken(&ids, begun, follow_ups, now).await
    }

    /// Sends again, after a short pause, the intents of `ids` whose `outcomes` are still
    /// pending (a transient error), twice at most.
    pub async fn retry_pending(
        &self,
        ids: &[&str],
        mut outcomes: Vec<Outcome>,
        follow_ups: &HashMap<String, FollowUp>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Outcome>, PaymentsError> {
        for pause_ms in [100, 400] {
            let pending: Vec<usize> = (0..ids.len())
                .filter(|&i| matches!(outcomes[i], Outcome::Pending { .. }))
                .collect();
            if pending.is_empty() {
                break;
            }
            // A network-level pause between immediate retries, not business time.
            tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
            let again: Vec<&str> = pending.iter().map(|&i| ids[i]).collect();
            for (i, outcome) in pending
                .into_iter()
                .zip(self.attempt_many(&again, follow_ups, now).await?)
            {
                outcomes[i] = outcome;
            }
        }
        Ok(outcomes)
    }

    /// Resends every pending intent that is due (or every pending one at start-up, when
    /// `include_held`), a chunk at a time. Returns how many were attempted.
    pub async fn sweep(
        &self,
        now: DateTime<Utc>,
        include_held: bool,
    ) -> Result<usize, PaymentsError> {
        let mut attempted = 0;
        let mut after = 0;
        let mut in_flight = InFlight::new(SWEEP_CHUNKS_IN_FLIGHT);
        loop {
            let due = self
                .store
                .pending_intents(micros(now), include_held, after, SWEEP_CHUNK)
                .await?;
            let Some(last) = due.last() else {
                break;
            };
            after = last.seq;
            attempted += due.len();
            let payments = self.clone();
            let charge = async move {
                let ids: Vec<&str> = due.iter().map(|i| i.id.as_str()).collect();
                let follow_ups = match &payments.sweep_follow_ups {
                    Some(f) => f.follow_ups(&due).await?,
                    None => HashMap::new(),
                };
                payments.attempt_many(&ids, &follow_ups, now).await
            };
            if let Some(done) = in_flight.start(charge).await {
                done?;
            }
        }
        while let Some(done) = in_flight.next().await {
            done?;
        }
        Ok(attempted)
    }

    /// One gateway call for a pending intent; a resolved one answers with its outcome.
    pub async fn attempt(
        &self,
        intent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, PaymentsError> {
        let outcomes = self
            .attempt_many(&[intent_id], &HashMap::new(), now)
            .await?;
        single(outcomes, intent_id)
    }

    /// One gateway call for each pending intent of `ids` (charges as one batch), with every
    /// result recorded in one transaction; resolved intents answer with their outcome.
    /// Outcomes are in the order of `ids`. `follow_ups` (by intent id) are written with the
    /// recording of that intent's result.
    pub async fn attempt_many(
        &self,
        ids: &[&str],
        follow_ups: &HashMap<String, FollowUp>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Outcome>, PaymentsError> {
        let taken = self
            .store
            .begin_intent_attempts(ids, micros(now + hold()))
            .await?;
        self.attempt_taken(ids, &taken, follow_ups, now).await
    }

    /// Aborts the process at `point` when a crash test asked for it there and `intents` are
    /// about to be sent or recorded.
    fn crash_if(&self, point: CrashPoint, intents: usize) {
        if self.crash_at == Some(point) && intents > 0 {
            tracing::error!(intents, ?point, "POOLED_DEBUG_CRASH: aborting");
            std::process::abort();
        }
    }

    /// The gateway calls and the recording of [`Payments::attempt_many`], for the intents of
    /// `ids` this caller has `taken` (the others answer with what stands).
    async fn attempt_taken(
        &self,
        ids: &[&str],
        taken: &[IntentRow],
        follow_ups: &HashMap<String, FollowUp>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Outcome>, PaymentsError> {
        let now_us = micros(now);
        self.crash_if(CrashPoint::BeforeGatewayCall, taken.len());
        let answers = self.call_gateway(taken).await?;
        self.crash_if(CrashPoint::AfterGatewayCall, taken.len());
        let mut outcomes: HashMap<&str, Outcome> = HashMap::new();
        let mut results = Vec::with_capacity(taken.len());
        for (intent, (method, answer)) in taken.iter().zip(answers) {
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
                        .record_intent_retry(
                            &intent.id,
                            &error,
                            retry_at,
                            PAYMENT_RETRY_JOB,
                            now_us,
                        )
                        .await?;
                    metrics::counter!("pooled_gateway_calls_total", "kind" => intent.kind.clone(), "outcome" => "transient").increment(1);
                    outcomes.insert(&intent.id, Outcome::Pending { error });
                    continue;
                }
            };
            let label = match &result {
                IntentResult::Succeeded { .. } => "succeeded",
                IntentResult::Declined { .. } => "declined",
                IntentResult::Failed { .. } => "failed",
            };
            metrics::counter!("pooled_gateway_calls_total", "kind" => intent.kind.clone(), "outcome" => label).increment(1);
            results.push((intent, result));
        }
        let recorded = self
            .store
            .record_intent_results(&results, follow_ups, now_us)
            .await?;
        for ((intent, result), first) in results.iter().zip(recorded) {
            // Whoever recorded first decided; a loser reads back what stands (below).
            if first {
                outcomes.insert(&intent.id, Outcome::recorded(result));
            }
        }
        let mut answered = Vec::with_capacity(ids.len());
        for id in ids {
            answered.push(match outcomes.remove(id) {
                Some(outcome) => outcome,
                None => {
                    let row = self
                        .store
                        .intent(id)
                        .await?
                        .ok_or_else(|| PaymentsError::UnknownIntent((*id).to_owned()))?;
                    Outcome::of(&row)
                }
            });
        }
        Ok(answered)
    }

    /// Calls the gateway for each intent (all charges in one batch); returns, in order, the
    /// payment method used (charges) and the gateway's answer.
    async fn call_gateway(
        &self,
        intents: &[IntentRow],
    ) -> Result<Vec<(Option<String>, GatewayResult)>, PaymentsError> {
        // The shoppers' payment methods as they are now: an updated card is used at the next try.
        let shoppers: Vec<&str> = intents
            .iter()
            .filter(|i| i.kind == "charge")
            .map(|i| i.shopper_id.as_str())
            .collect();
        let shoppers = self.store.shoppers(&shoppers).await?;
        let mut answers: Vec<Option<(Option<String>, GatewayResult)>> = Vec::new();
        let mut charges = Vec::new();
        let mut charged_at = Vec::new();
        for intent in intents {
            let amount = amount_of(intent)?;
            if intent.kind == "refund" {
                answers.push(Some((None, self.refund(intent, amount).await?)));
                continue;
            }
            match shoppers
                .get(&intent.shopper_id)
                .and_then(|s| s.payment_token.clone())
            {
                None => answers.push(Some((
                    None,
                    Ok(GatewayOutcome::Declined {
                        reference: String::new(),
                        reason: "no_payment_method".into(),
                    }),
                ))),
                Some(method) => {
                    charged_at.push(answers.len());
                    answers.push(None);
                    charges.push(ChargeRequest {
                        customer: intent.shopper_id.clone(),
                        payment_method: method,
                        amount,
                        idempotency_key: intent.idempotency_key.clone(),
                    });
                }
            }
        }
        let results = self.gateway.charge_many(&charges).await;
        for ((at, charge), result) in charged_at.into_iter().zip(charges).zip(results) {
            answers[at] = Some((Some(charge.payment_method), result));
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Sends a refund intent: its charge's gateway reference is looked up first.
    async fn refund(
        &self,
        intent: &IntentRow,
        amount: Money,
    ) -> Result<GatewayResult, PaymentsError> {
        let charge = match &intent.refund_of {
            Some(id) => self.store.intent(id).await?,
            None => None,
        };
        let Some(charge_ref) = charge.and_then(|c| c.gateway_ref) else {
            return Ok(Err(GatewayError::Rejected(
                "the refunded charge has no gateway reference".into(),
            )));
        };
        let request = RefundRequest {
            charge_ref,
            amount,
            idempotency_key: intent.idempotency_key.clone(),
        };
        Ok(self.gateway.refund(&request).await)
    }
}

/// The outcome of a batch of one.
fn single(mut outcomes: Vec<Outcome>, intent_id: &str) -> Result<Outcome, PaymentsError> {
    outcomes
        .pop()
        .ok_or_else(|| PaymentsError::UnknownIntent(intent_id.to_owned()))
}

fn amount_of(intent: &IntentRow) -> Result<Money, PaymentsError> {
    let currency =
        Currency::parse(&intent.currency).map_err(|e| StoreError::Inconsistent(e.to_string()))?;
    Ok(Money::from_minor(intent.amount_minor, currency))
}
