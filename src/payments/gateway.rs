//! The payment gateway seen from our side: charge and refund, both keyed for idempotency.
//!
//! The trait is object-safe (boxed futures) so the service holds an `Arc<dyn PaymentGateway>`:
//! the sandbox today, a real processor's adapter later, the same calls either way.

use crate::domain::money::Money;
use std::future::Future;
use std::pin::Pin;

/// A charge of `amount` to `customer`'s `payment_method`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub customer: String,
    pub payment_method: String,
    pub amount: Money,
    /// The same key never charges twice: a repeat answers with the first call's result.
    pub idempotency_key: String,
}

/// A refund of `amount` from the charge the gateway knows as `charge_ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub charge_ref: String,
    pub amount: Money,
    pub idempotency_key: String,
}

/// What the gateway decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayOutcome {
    Succeeded {
        reference: String,
    },
    /// The card said no (`card_declined`, `insufficient_funds`, …). Not retried by us; a later
    /// call with the same key (after a card update) is decided afresh.
    Declined {
        reference: String,
        reason: String,
    },
}

/// The call did not reach a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Network trouble or a gateway hiccup: retry with the same key.
    #[error("gateway unavailable: {0}")]
    Transient(String),
    /// The request itself is wrong (over-refund, unknown charge, key reused with other
    /// parameters): retrying cannot help.
    #[error("gateway refused the request: {0}")]
    Rejected(String),
}

pub type GatewayResult = Result<GatewayOutcome, GatewayError>;
pub type GatewayFuture<'a> = Pin<Box<dyn Future<Output = GatewayResult> + Send + 'a>>;
pub type GatewayBatchFuture<'a> = Pin<Box<dyn Future<Output = Vec<GatewayResult>> + Send + 'a>>;

/// A payment processor.
pub trait PaymentGateway: Send + Sync {
    fn charge<'a>(&'a self, request: &'a ChargeRequest) -> GatewayFuture<'a>;
    fn refund<'a>(&'a self, request: &'a RefundRequest) -> GatewayFuture<'a>;

    /// Many charges, answered in order. The default sends them one at a time; a processor
    /// with a batch interface (or the sandbox, writing its record once per batch) does better.
    fn charge_many<'a>(&'a self, requests: &'a [ChargeRequest]) -> GatewayBatchFuture<'a> {
        Box::pin(async move {
            let mut answers = Vec::with_capacity(requests.len());
            for request in requests {
                answers.push(self.charge(request).await);
            }
            answers
        })
    }
}
