//! Joint presales as a service: joining and cancelling pledges, and the three jobs that move
//! campaigns through their life (`presale-close`, `presale-balances`, `presale-reminders`).
//!
//! The rules are in [`crate::domain::presale`]; this module reads the rows, asks the rules,
//! and writes each step as one guarded transaction with the intents, ledger entries and
//! emails it causes, then lets [`Payments`] send the intents. Every step can run again after a
//! crash and changes nothing twice: pledges move only from the status a step expects.

pub mod emails;

use crate::batch::{Batcher, InFlight};
use crate::domain::identity::Shopper;
use crate::domain::ledger::{Account, JournalEntry, Line};
use crate::domain::money::{Currency, Money, UnitPrice};
use crate::domain::presale::{self, JoinRefusal, Quote, Terms, Tier};
use crate::payments::{FollowUpsFuture, Outcome, Payments, PaymentsError, SweepFollowUps};
use crate::store::{
    CampaignRow, FollowUp, IdempotencyBegin, IdempotencyClaim, IntentRow, JoinAttempt,
    JoinDecision, KeyAnswer, NewEmail, NewIntent, NewPledge, PledgeContact, PledgeRow, PledgeStep,
    PurchaseOrderRow, QuoteRow, Settlement, Store, StoreError, StoredResponse,
    abandon_claims_after, instant, micros,
};
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::oneshot;

pub const CLOSE_JOB: &str = "presale-close";
pub const BALANCES_JOB: &str = "presale-balances";
pub const REMINDERS_JOB: &str = "presale-reminders";

/// How long before its deadline a campaign's pledgers are reminded.
fn reminder_lead() -> Duration {
    Duration::hours(24)
}

/// The timers a new campaign needs so that it opens, is reminded of and closes on time (job,
/// instant in µs): the hourly reminder poll alone would remind up to an hour late, or, on the
/// manual clock, which does not stop at hourly slots, at whatever stop comes next.
pub fn campaign_timers(c: &CampaignRow) -> Vec<(&'static str, i64)> {
    let remind_at = c.closes_at - reminder_lead().num_microseconds().unwrap_or(0);
    [
        (CLOSE_JOB, c.opens_at),
        (REMINDERS_JOB, remind_at),
        (CLOSE_JOB, c.closes_at),
    ]
    .into_iter()
    .filter(|&(_, at)| at > c.created_at)
    .collect()
}

/// Pledges moved per transaction when a campaign closes or settles. A pledge's rows land on
/// pages of their own in the indexes keyed by shopper or email address, and a transaction
/// writes each page it dirtied to the WAL once, however many rows it changed there: so the
/// more pledges share a commit, the fewer pages a pledge costs. At 200,000 pledges on SQLite,
/// 2,000 a chunk settled 8,167-8,815 pledges/s against 5,149 at 500, and 5,000 settled
/// 20-50 % more than 2,000 again (3,549-3,752 against 2,485-2,948 on a slow night), for
/// about 80 MB more peak RSS (198-201 MB against 116). PostgreSQL was the same at 500 and
/// 2,000, and within the noise at 5,000 (3,251 against 3,551 pledges/s, one run each).
const CHUNK: i64 = 5000;
/// Chunks of pledge steps applied (and their charges sent) at once ([`InFlight`]): each
/// chunk moves its own pledges with a guarded update, so two never touch the same pledge.
const STEPS_IN_FLIGHT: usize = 3;

/// Balance retries during the window are this far apart (each with a reminder).
fn retry_every() -> Duration {
    Duration::hours(24)
}

/// Errors of the presale service.
#[derive(Debug, thiserror::Error)]
pub enum PresaleError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotOpen(String),
    #[error("{0}")]
    SoldOut(String),
    #[error("the payment was declined: {0}")]
    Declined(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Payments(#[from] PaymentsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A request with the same `Idempotency-Key` is still running.
    #[error("a request with this Idempotency-Key is still being processed")]
    KeyInFlight,
    /// The request's `Idempotency-Key` was already used with a different request.
    #[error("this Idempotency-Key was already used with a different request")]
    KeyReused,
    /// The batch this request was part of failed; every request in it gets the same error.
    #[error("{0}")]
    Batch(Arc<PresaleError>),
    #[error(transparent)]
    Stopped(#[from] crate::batch::Stopped),
}

type Result<T> = std::result::Result<T, PresaleError>;

/// A price break as stored in `quotes.tiers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredTier {
    pub min_qty: i64,
    pub unit_price_scaled: i64,
}

/// The rules' view of a stored quote.
pub fn quote_of(row: &QuoteRow) -> Quote {
    // Written by us from validated tiers; an unreadable row would be a bug, shown as no breaks.
    let tiers: Vec<StoredTier> = serde_json::from_str(&row.tiers).unwrap_or_default();
    Quote {
        tiers: tiers
            .into_iter()
            .map(|t| Tier {
                min_qty: t.min_qty,
                unit_price: UnitPrice::from_scaled(t.unit_price_scaled),
            })
            .collect(),
        capacity: row.capacity,
        lead_time_days: row.lead_time_days,
    }
}

pub fn stored_tiers(tiers: &[Tier]) -> String {
    let stored: Vec<StoredTier> = tiers
        .iter()
        .map(|t| StoredTier {
            min_qty: t.min_qty,
            unit_price_scaled: t.unit_price.to_scaled(),
        })
        .collect();
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".into())
}

/// The campaign's currency (stored only after parsing).
pub fn currency_of(c: &CampaignRow) -> Result<Currency> {
    Currency::parse(&c.currency).map_err(|e| StoreError::Inconsistent(e.to_string()).into())
}

pub fn zone_of(c: &CampaignRow) -> Tz {
    c.time_zone.parse().unwrap_or(chrono_tz::UTC)
}

pub fn variants_of(c: &CampaignRow) -> Vec<String> {
    serde_json::from_str(&c.variants).unwrap_or_default()
}

/// A campaign with its quotes in the rules' terms.
#[derive(Debug)]
pub struct Loaded {
    pub campaign: CampaignRow,
    pub quotes: Vec<(QuoteRow, Quote)>,
    pub currency: Currency,
}

impl Loaded {
    pub fn rules(&self) -> Vec<Quote> {
        self.quotes.iter().map(|(_, q)| q.clone()).collect()
    }
}

pub async fn load(store: &Store, id: &str) -> Result<Loaded> {
    // Two reads at once: each is its own snapshot either way, and a join batch waits on both.
    let (campaign, quotes) = tokio::try_join!(store.campaign(id), store.quotes(id))?;
    let campaign = campaign.ok_or_else(|| PresaleError::NotFound(format!("no campaign {id}")))?;
    loaded(campaign, quotes)
}

/// A campaign already read, with its quotes (one read).
pub async fn load_quotes(store: &Store, campaign: CampaignRow) -> Result<Loaded> {
    let quotes = store.quotes(&campaign.id).await?;
    loaded(campaign, quotes)
}

fn loaded(campaign: CampaignRow, quotes: Vec<QuoteRow>) -> Result<Loaded> {
    let quotes = quotes
        .into_iter()
        .map(|row| {
            let q = quote_of(&row);
            (row, q)
        })
        .collect();
    let currency = currency_of(&campaign)?;
    Ok(Loaded {
        campaign,
        quotes,
        currency,
    })
}

/// What a campaign's stored quotes imply (capacity, ceiling), or why they are refused.
pub fn terms_of(rows: &[QuoteRow], currency: Currency) -> std::result::Result<Terms, String> {
    let rules: Vec<Quote> = rows.iter().map(quote_of).collect();
    presale::terms(&rules, currency)
}

fn intent_id(purpose: &str, pledge_id: &str) -> String {
    format!("pi_{purpose}_{pledge_id}")
}

/// A shopper's request to pledge `qty` units.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub campaign_id: String,
    pub shopper_id: String,
    pub qty: i64,
    pub variant: Option<String>,
    pub now: DateTime<Utc>,
    /// The `Idempotency-Key` the request runs under, if any.
    pub key: Option<JoinKey>,
}

/// A join's `Idempotency-Key` and the answers its request gives. The key is claimed in the
/// transaction that takes the units, and the answer remembered there (the pledge, its deposit
/// still pending) and again with the deposit's result: a retry, even after a crash between
/// the two, replays it instead of joining, and charging, a second time.
#[derive(Debug, Clone)]
pub struct JoinKey {
    pub claim: IdempotencyClaim,
    /// The answer for a pledge as it stands.
    pub respond: fn(&PledgeRow, &Loaded) -> StoredResponse,
    /// The answer to a declined deposit, from its reason.
    pub declined: fn(&str) -> StoredResponse,
}

/// What a join request comes to.
#[derive(Debug)]
pub enum Joined {
    /// The pledge with its campaign as it stood when the batch was taken: `active` once its
    /// deposit went through (or none was due), `pending` while the gateway has not answered
    /// (it holds its units until it does).
    Pledged(PledgeRow, Arc<Loaded>),
    /// The request's key already has an answer: this one, sent again.
    Replayed(StoredResponse),
}

pub type JoinAnswer = Result<Joined>;

/// A join batch's answer to one request: final, or still to come from the quick retries of
/// a deposit the gateway failed with a transient error.
///
/// Why the retries run beside the queue: they pause 100 and then 400 ms, and the one join
/// worker (every campaign's) would wait with them, so one flaky card stalled every join.
// Most answers are `Now`; the enum only lives in a batch's answer list, so its size is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum BatchAnswer {
    Now(JoinAnswer),
    Retrying(oneshot::Receiver<JoinAnswer>),
}

impl BatchAnswer {
    /// The request's answer, once its deposit's retries (if any) are recorded.
    pub async fn settled(self) -> JoinAnswer {
        match self {
            BatchAnswer::Now(answer) => answer,
            BatchAnswer::Retrying(later) => later
                .await
                .unwrap_or_else(|_| Err(crate::batch::Stopped("join retries").into())),
        }
    }
}

/// The join queue: every join goes through one group-commit worker, so a stampede on a
/// campaign costs a few commits per batch instead of several per join. Cheap to clone.
#[derive(Clone)]
pub struct Joins(Batcher<JoinRequest, BatchAnswer>);

impl Joins {
    /// Starts the worker on the current runtime.
    pub fn spawn(store: Store, payments: Payments) -> Joins {
        Joins(Batcher::spawn(
            "joins",
            512,
            move |requests: Vec<JoinRequest>| {
                let (store, payments) = (store.clone(), payments.clone());
                async move { join_many(&store, &payments, requests).await }
            },
        ))
    }

    /// Joins a campaign; answers once the pledge (and its deposit's result) is committed.
    pub async fn join(&self, request: JoinRequest) -> JoinAnswer {
        self.0.call(request).await?.settled().await
    }
}

/// Joins in batches, grouped by campaign. Per campaign: the keys claimed, the units taken and
/// the deposit intents committed in one guarded transaction, the deposits charged as one
/// gateway batch (recorded in one transaction with the confirmations and the keys' answers; a
/// decline releases its units). Deposits the gateway failed with a transient error are
/// retried on a task of their own ([`BatchAnswer::Retrying`]). Answers are in the order of
/// `requests`.
pub async fn join_many(
    store: &Store,
    payments: &Payments,
    requests: Vec<JoinRequest>,
) -> Vec<BatchAnswer> {
    let mut answers: Vec<Option<BatchAnswer>> = requests.iter().map(|_| None).collect();
    let mut by_campaign: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in requests.iter().enumerate() {
        by_campaign.entry(&r.campaign_id).or_default().push(i);
    }
    for (campaign_id, at) in by_campaign {
        let group: Vec<&JoinRequest> = at.iter().map(|&i| &requests[i]).collect();
        match join_campaign(store, payments, campaign_id, &group).await {
            Ok(done) => {
                for (i, answer) in at.into_iter().zip(done) {
                    answers[i] = Some(answer);
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for i in at {
                    answers[i] = Some(BatchAnswer::Now(Err(PresaleError::Batch(e.clone()))));
                }
            }
        }
    }
    answers.into_iter().flatten().collect()
}

/// Checks a request against its campaign: the variant, a quote to pledge on, a payment method.
fn check_join(l: &Loaded, r: &JoinRequest, shoppers: &HashMap<String, Shopper>) -> Result<()> {
    let variants = variants_of(&l.campaign);
    let wrong_variant = match (&r.variant, variants.is_empty()) {
        (Some(_), true) => Some("this campaign has no variants".to_owned()),
        (Some(v), false) if variants.contains(v) => None,
        (_, false) => Some(format!("must be one of {}", variants.join(", "))),
        (None, true) => None,
    };
    if let Some(message) = wrong_variant {
        return Err(PresaleError::Invalid {
            field: "variant",
            message,
        });
    }
    if l.campaign.price_ceiling_minor.is_none() {
        return Err(PresaleError::NotOpen(
            "no manufacturer has quoted on this campaign yet".into(),
        ));
    }
    match shoppers.get(&r.shopper_id) {
        None => Err(PresaleError::NotFound(format!(
            "no shopper {}",
            r.shopper_id
        ))),
        Some(s) if s.payment_token.is_none() => Err(PresaleError::Declined(
            "no_payment_method: save a payment method first".into(),
        )),
        Some(_) => Ok(()),
    }
}

/// One campaign's share of a join batch.
async fn join_campaign(
    store: &Store,
    payments: &Payments,
    campaign_id: &str,
    requests: &[&JoinRequest],
) -> Result<Vec<BatchAnswer>> {
    // The campaign and the shoppers are read at once (the batch waits on both).
    let shopper_ids: Vec<&str> = requests.iter().map(|r| r.shopper_id.as_str()).collect();
    let (l, shoppers) = tokio::join!(load(store, campaign_id), store.shoppers(&shopper_ids));
    let l = match l {
        Ok(l) => Arc::new(l),
        Err(PresaleError::NotFound(detail)) => {
            return Ok(requests
                .iter()
                .map(|_| BatchAnswer::Now(Err(PresaleError::NotFound(detail.clone()))))
                .collect());
        }
        Err(e) => return Err(e),
    };
    let c = &l.campaign;
    let shoppers = shoppers?;
    // Keys are claimed at the batch's latest instant; each join is judged at its own.
    let now = requests.iter().map(|r| r.now).max().unwrap_or_default();
    // Each request's check failure stays beside it: it is the answer only if the key lets
    // the request run at all (a replayed key answers with its first response instead).
    let mut unchecked: Vec<Option<PresaleError>> = Vec::with_capacity(requests.len());
    let attempts: Vec<JoinAttempt> = requests
        .iter()
        .map(|r| {
            let checked = check_join(&l, r, &shoppers).and_then(|()| {
                Money::from_minor(c.deposit_per_unit_minor, l.currency)
                    .times(r.qty)
                    .map_err(|_| PresaleError::Invalid {
                        field: "qty",
                        message: "is too large".into(),
                    })
            });
            let (join, failed) = match checked {
                Ok(deposit) => (Some(new_pledge(&l, r, deposit, &shoppers)), None),
                Err(e) => (None, Some(e)),
            };
            unchecked.push(failed);
            JoinAttempt {
                claim: r.key.as_ref().map(|k| k.claim.clone()),
                join,
            }
        })
        .collect();
    let (decisions, begun) = store
        .join_campaign(&c.id, &attempts, now, abandon_claims_after())
        .await?;
    let mut answers: Vec<Option<BatchAnswer>> = Vec::with_capacity(requests.len());
    let mut admitted = Vec::new();
    let mut follow_ups = HashMap::new();
    let requests = requests.iter().zip(unchecked).zip(attempts).zip(decisions);
    for (((r, failed), attempt), decision) in requests {
        let answer = match decision {
            JoinDecision::Admitted => {
                let join = attempt
                    .join
                    .expect("an admitted request asked for a pledge");
                if let Some(intent) = &join.deposit {
                    let answer = r.key.as_ref().map(|k| KeyAnswer {
                        scope: k.claim.scope.clone(),
                        key: k.claim.key.clone(),
                        succeeded: (k.respond)(&active(&join.pledge), &l),
                        declined: k.declined,
                    });
                    follow_ups.insert(
                        intent.id.clone(),
                        FollowUp {
                            email: join.confirmation,
                            answer,
                        },
                    );
                }
                admitted.push((answers.len(), join.pledge, join.deposit));
                None
            }
            JoinDecision::Refused(JoinRefusal::NotOpen) => Some(Err(PresaleError::NotOpen(
                format!("campaign {} is not open for pledges", c.id),
            ))),
            JoinDecision::Refused(JoinRefusal::SoldOut { left }) => Some(Err(
                PresaleError::SoldOut(format!("only {left} units are left")),
            )),
            JoinDecision::KeyUsed(IdempotencyBegin::Replay(answer)) => {
                Some(Ok(Joined::Replayed(answer)))
            }
            JoinDecision::KeyUsed(IdempotencyBegin::Mismatch) => Some(Err(PresaleError::KeyReused)),
            JoinDecision::KeyUsed(_) => Some(Err(PresaleError::KeyInFlight)),
            JoinDecision::NotAsked => Some(Err(
                failed.expect("a request asks for no pledge only when it failed its checks")
            )),
        };
        answers.push(answer.map(BatchAnswer::Now));
    }
    metrics::counter!("pooled_joins_total").increment(admitted.len() as u64);
    let outcomes = payments.attempt_begun(&begun, &follow_ups, now).await?;
    let mut outcomes: HashMap<String, Outcome> =
        begun.into_iter().map(|i| i.id).zip(outcomes).collect();
    let mut retries = Vec::new();
    let mut retry_follow_ups = HashMap::new();
    for (at, pledge, intent) in admitted {
        let outcome = match &intent {
            Some(i) => outcomes.remove(&i.id).unwrap_or(Outcome::Pending {
                error: "no answer".into(),
            }),
            None => Outcome::Succeeded,
        };
        answers[at] = Some(match (outcome, intent) {
            (outcome @ Outcome::Pending { .. }, Some(intent)) => {
                let (reply, later) = oneshot::channel();
                if let Some(follow_up) = follow_ups.remove(&intent.id) {
                    retry_follow_ups.insert(intent.id.clone(), follow_up);
                }
                retries.push(Retry {
                    intent_id: intent.id,
                    outcome,
                    pledge,
                    reply,
                });
                BatchAnswer::Retrying(later)
            }
            (outcome, _) => BatchAnswer::Now(joined(outcome, pledge, &l)),
        });
    }
    if !retries.is_empty() {
        let retrying = retry_deposits(payments.clone(), retries, retry_follow_ups, l, now);
        tokio::spawn(retrying);
    }
    Ok(answers.into_iter().flatten().collect())
}

/// What a join comes to once its deposit has `outcome`.
fn joined(outcome: Outcome, pledge: PledgeRow, l: &Arc<Loaded>) -> JoinAnswer {
    match outcome {
        Outcome::Succeeded => Ok(Joined::Pledged(active(&pledge), l.clone())),
        Outcome::Pending { .. } => Ok(Joined::Pledged(pledge, l.clone())),
        Outcome::Declined { reason } => Err(PresaleError::Declined(reason)),
        Outcome::Failed { error } => Err(PresaleError::Declined(error)),
    }
}

/// A join whose deposit met a transient gateway error, waiting for its quick retries.
struct Retry {
    intent_id: String,
    outcome: Outcome,
    pledge: PledgeRow,
    reply: oneshot::Sender<JoinAnswer>,
}

/// Retries a join batch's transiently failed deposits ([`Payments::retry_pending`], with
/// their `follow_ups`) and answers their joins; what is still pending after that is left to
/// the payment sweep, and its join answers with the pledge pending.
async fn retry_deposits(
    payments: Payments,
    retries: Vec<Retry>,
    follow_ups: HashMap<String, FollowUp>,
    l: Arc<Loaded>,
    now: DateTime<Utc>,
) {
    let ids: Vec<&str> = retries.iter().map(|r| r.intent_id.as_str()).collect();
    let pending: Vec<Outcome> = retries.iter().map(|r| r.outcome.clone()).collect();
    match payments
        .retry_pending(&ids, pending, &follow_ups, now)
        .await
    {
        Ok(outcomes) => {
            for (r, outcome) in retries.into_iter().zip(outcomes) {
                // A caller that went away no longer needs its answer.
                let _ = r.reply.send(joined(outcome, r.pledge, &l));
            }
        }
        Err(e) => {
            let e = Arc::new(PresaleError::from(e));
            for r in retries {
                let _ = r.reply.send(Err(PresaleError::Batch(e.clone())));
            }
        }
    }
}

/// The pledge a request asks for, with its deposit intent, the answer its key remembers with
/// it, and its confirmation.
fn new_pledge(
    l: &Loaded,
    r: &JoinRequest,
    deposit: Money,
    shoppers: &HashMap<String, Shopper>,
) -> NewPledge {
    let c = &l.campaign;
    // The request's own instant: the store judges the join at it.
    let now = r.now;
    let now_us = micros(now);
    let pledge_id = crate::ids::new_id("plg");
    let pledge = PledgeRow {
        seq: 0,
        id: pledge_id.clone(),
        campaign_id: c.id.clone(),
        shopper_id: r.shopper_id.clone(),
        qty: r.qty,
        variant: r.variant.clone(),
        status: if deposit.is_positive() {
            "pending".into()
        } else {
            "active".into()
        },
        deposit_minor: deposit.minor(),
        price_ceiling_minor: c.price_ceiling_minor.unwrap_or_default(),
        balance_minor: None,
        balance_paid_at: None,
        refunded_minor: 0,
        created_at: now_us,
        ended_at: None,
        updated_at: now_us,
    };
    let intent = deposit.is_positive().then(|| NewIntent {
        id: intent_id("deposit", &pledge_id),
        idempotency_key: format!("deposit:{pledge_id}"),
        kind: "charge",
        purpose: "deposit",
        subject_id: pledge_id.clone(),
        shopper_id: r.shopper_id.clone(),
        amount: deposit,
        account: Account::DepositsHeld,
        refund_of: None,
        memo: format!("deposit for {} × {}", r.qty, c.sku),
        first_sweep_at: micros(now + crate::payments::hold()),
    });
    let response = r.key.as_ref().map(|k| (k.respond)(&pledge, l));
    // The confirmation shows the pledge as it is once its deposit went through.
    let confirmation = shoppers
        .get(&r.shopper_id)
        .map(|s| emails::pledge_confirmed(l, &active(&pledge), &s.email, &s.name));
    NewPledge {
        pledge,
        deposit: intent,
        response,
        confirmation,
    }
}

/// `pledge` once its deposit went through.
fn active(pledge: &PledgeRow) -> PledgeRow {
    PledgeRow {
        status: "active".into(),
        ..pledge.clone()
    }
}

/// The confirmations of joins whose deposits a payment sweep resolves (the gateway had not
/// answered while the join waited): written with the deposit's success, as for a join
/// answered at once. Handed to [`Payments::with_sweep_follow_ups`].
pub struct LateDepositConfirmations(pub Store);

impl SweepFollowUps for LateDepositConfirmations {
    fn follow_ups<'a>(&'a self, intents: &'a [IntentRow]) -> FollowUpsFuture<'a> {
        Box::pin(async move {
            late_confirmations(&self.0, intents)
                .await
                .map_err(|e| match e {
                    PresaleError::Store(e) => PaymentsError::Store(e),
                    other => PaymentsError::Store(StoreError::Inconsistent(other.to_string())),
                })
        })
    }
}

async fn late_confirmations(
    store: &Store,
    intents: &[IntentRow],
) -> Result<HashMap<String, FollowUp>> {
    let mut follow_ups = HashMap::new();
    let mut campaigns: HashMap<String, Arc<Loaded>> = HashMap::new();
    let deposits: Vec<&IntentRow> = intents.iter().filter(|i| i.purpose == "deposit").collect();
    if deposits.is_empty() {
        return Ok(follow_ups);
    }
    let shoppers: Vec<&str> = deposits.iter().map(|i| i.shopper_id.as_str()).collect();
    let pledges: Vec<&str> = deposits.iter().map(|i| i.subject_id.as_str()).collect();
    // A sweep's chunk of late deposits is read with two queries, not one per pledge.
    let (shoppers, mut pledges) =
        tokio::try_join!(store.shoppers(&shoppers), store.pledges_by_id(&pledges))?;
    for intent in deposits {
        let (Some(pledge), Some(shopper)) = (
            pledges.remove(&intent.subject_id),
            shoppers.get(&intent.shopper_id),
        ) else {
            continue;
        };
        let l = match campaigns.get(&pledge.campaign_id) {
            Some(l) => l.clone(),
            None => {
                let l = Arc::new(load(store, &pledge.campaign_id).await?);
                campaigns.insert(pledge.campaign_id.clone(), l.clone());
                l
            }
        };
        let email = emails::pledge_confirmed(&l, &active(&pledge), &shopper.email, &shopper.name);
        follow_ups.insert(
            intent.id.clone(),
            FollowUp {
                email: Some(email),
                answer: None,
            },
        );
    }
    Ok(follow_ups)
}

/// Cancels an active pledge before the deadline: its deposit is refunded when refundable,
/// otherwise forfeited. Returns the refunded amount.
pub async fn cancel(
    store: &Store,
    payments: &Payments,
    pledge: &PledgeRow,
    now: DateTime<Utc>,
) -> Result<Money> {
    let l = load(store, &pledge.campaign_id).await?;
    let c = &l.campaign;
    let now_us = micros(now);
    if pledge.status != "active" || c.status != "open" || now_us >= c.closes_at {
        return Err(PresaleError::Conflict(format!(
            "pledge {} can no longer be cancelled (pledge {}, campaign {})",
            pledge.id, pledge.status, c.status
        )));
    }
    let deposit = Money::from_minor(pledge.deposit_minor, l.currency);
    let (step, refunded) = if c.deposit_refundable {
        let step = PledgeStep {
            pledge_id: pledge.id.clone(),
            from: "active",
            to: "cancelled",
            balance_minor: None,
            refunded_minor: deposit.minor(),
            charge: None,
            refund: deposit_refund(pledge, deposit, "cancelled by the shopper", now),
            entry: None,
            email: None,
        };
        (step, deposit)
    } else {
        let entry = forfeit_entry(pledge, deposit, "cancelled")?;
        let step = PledgeStep {
            pledge_id: pledge.id.clone(),
            from: "active",
            to: "cancelled",
            balance_minor: None,
            refunded_minor: 0,
            charge: None,
            refund: None,
            entry,
            email: None,
        };
        (step, Money::zero(l.currency))
    };
    if !store
        .cancel_pledge(&step, pledge.qty, &c.id, now_us)
        .await?
    {
        return Err(PresaleError::Conflict(format!(
            "pledge {} can no longer be cancelled",
            pledge.id
        )));
    }
    if let Some(refund) = &step.refund {
        payments.send_now(&refund.id, now).await?;
    }
    Ok(refunded)
}

/// The refund of (part of) a pledge's deposit, if there is anything to refund.
fn deposit_refund(
    pledge: &PledgeRow,
    amount: Money,
    why: &str,
    now: DateTime<Utc>,
) -> Option<NewIntent> {
    amount.is_positive().then(|| NewIntent {
        id: intent_id("refund", &pledge.id),
        idempotency_key: format!("refund:deposit:{}", pledge.id),
        kind: "refund",
        purpose: "refund",
        subject_id: pledge.id.clone(),
        shopper_id: pledge.shopper_id.clone(),
        amount,
        account: Account::DepositsHeld,
        refund_of: Some(intent_id("deposit", &pledge.id)),
        memo: format!("deposit refund: {why}"),
        first_sweep_at: micros(now),
    })
}

fn forfeit_entry(
    pledge: &PledgeRow,
    deposit: Money,
    event: &'static str,
) -> Result<Option<JournalEntry>> {
    if !deposit.is_positive() {
        return Ok(None);
    }
    JournalEntry::transfer(
        ("pledge", &pledge.id, event),
        "deposit forfeited",
        Account::DepositsHeld,
        Account::Forfeits,
        deposit,
        Some(&pledge.shopper_id),
    )
    .map(Some)
    .map_err(|e| StoreError::Inconsistent(e.to_string()).into())
}

/// A pledge row from its contact view (what steps need).
fn pledge_of(p: &PledgeContact, campaign_id: &str) -> PledgeRow {
    PledgeRow {
        seq: 0,
        id: p.id.clone(),
        campaign_id: campaign_id.to_owned(),
        shopper_id: p.shopper_id.clone(),
        qty: p.qty,
        variant: p.variant.clone(),
        status: String::new(),
        deposit_minor: p.deposit_minor,
        price_ceiling_minor: 0,
        balance_minor: p.balance_minor,
        balance_paid_at: None,
        refunded_minor: 0,
        created_at: 0,
        ended_at: None,
        updated_at: 0,
    }
}

/// `presale-close`: opens campaigns whose time has come, closes those past their deadline
/// (fail and refund, or lock the price and charge balances), and finishes any close a crash
/// interrupted.
pub async fn run_close(
    store: &Store,
    payments: &Payments,
    now: DateTime<Utc>,
) -> Result<serde_json::Value> {
    let now_us = micros(now);
    let opened = store.open_due_campaigns(now_us).await?;
    let (mut failed, mut tipped, mut waiting) = (0, 0, 0);
    // Deposits still being charged decide whether a pledge counts: resolve them first.
    payments.sweep(now, false).await?;
    for c in store.campaigns_in("open", "open").await? {
        if c.closes_at > now_us {
            continue;
        }
        if store.count_pledges(&c.id, "pending").await? > 0 {
            // Catarse's "waiting_funds": close once every deposit has an answer.
            waiting += 1;
            continue;
        }
        let l = load_quotes(store, c).await?;
        let c = &l.campaign;
        let rules = l.rules();
        let tips = presale::tipping_qty(&rules).is_some_and(|t| c.pooled_qty >= t);
        if tips {
            let price = presale::price_at(&rules, c.pooled_qty, l.currency).ok_or_else(|| {
                StoreError::Inconsistent(format!("campaign {} has no award", c.id))
            })?;
            // Nobody ever pays more than the ceiling shown at join.
            let locked = match c.price_ceiling_minor {
                Some(ceiling) if ceiling < price.minor() => Money::from_minor(ceiling, l.currency),
                _ => price,
            };
            // The window starts when this run closes the campaign, so a late run (after
            // downtime) still gives every shopper the full window.
            let due = now + Duration::hours(c.balance_window_hours);
            if store
                .move_campaign(
                    &c.id,
                    &["open"],
                    Some(c.pooled_qty),
                    "settling",
                    Some(locked.minor()),
                    Some(micros(due)),
                    Some((BALANCES_JOB, micros(due))),
                    now_us,
                )
                .await?
            {
                tipped += 1;
                let first_retry = now + retry_every();
                if first_retry < due {
                    store
                        .add_timer(BALANCES_JOB, micros(first_retry), now_us)
                        .await?;
                }
                continue;
            }
        } else if store
            .move_campaign(
                &c.id,
                &["open"],
                Some(c.pooled_qty),
                "failed",
                None,
                None,
                None,
                now_us,
            )
            .await?
        {
            failed += 1;
            continue;
        }
        // Not moved: a join or cancel that began before the deadline committed since the
        // pool was read (or ops moved the campaign). Decided again in a second, on the pool
        // as it is then; the guard, not this run's reading, decides.
        waiting += 1;
        store
            .add_timer(CLOSE_JOB, micros(now + Duration::seconds(1)), now_us)
            .await?;
    }
    // Refunds of failed or cancelled campaigns, and balances of settling ones, in chunks.
    let mut steps_applied = 0;
    for c in store.campaigns_in("failed", "cancelled").await? {
        steps_applied += refund_all(store, &load_quotes(store, c).await?, now).await?;
    }
    for c in store.campaigns_in("settling", "settling").await? {
        let l = load_quotes(store, c).await?;
        steps_applied += charge_balances(store, payments, &l, now).await?;
    }
    payments.sweep(now, false).await?;
    Ok(json!({"opened": opened, "failed": failed, "tipped": tipped,
              "waiting_for_deposits": waiting, "pledges_moved": steps_applied}))
}

/// Refunds every active pledge of a failed or cancelled campaign (each once).
async fn refund_all(store: &Store, l: &Loaded, now: DateTime<Utc>) -> Result<usize> {
    let c = &l.campaign;
    let (mut applied, mut after) = (0, 0);
    loop {
        let batch = store.pledge_contacts(&c.id, "active", after, CHUNK).await?;
        let Some(last) = batch.last() else {
            return Ok(applied);
        };
        after = last.seq;
        let steps: Vec<PledgeStep> = batch
            .iter()
            .map(|p| {
                let pledge = pledge_of(p, &c.id);
                let deposit = Money::from_minor(p.deposit_minor, l.currency);
                PledgeStep {
                    pledge_id: p.id.clone(),
                    from: "active",
                    to: "refunded",
                    balance_minor: None,
                    refunded_minor: deposit.minor(),
                    charge: None,
                    refund: deposit_refund(&pledge, deposit, &c.status, now),
                    entry: None,
                    email: Some(emails::campaign_ended(l, p)),
                }
            })
            .collect();
        // Refunds and forfeits only: no charges to send.
        applied += store.apply_pledge_steps(&steps, micros(now)).await?.0;
    }
}

/// Moves every active pledge of a settling campaign to its balance at the locked price.
async fn charge_balances(
    store: &Store,
    payments: &Payments,
    l: &Loaded,
    now: DateTime<Utc>,
) -> Result<usize> {
    let c = &l.campaign;
    let Some(locked) = c.locked_price_minor else {
        return Ok(0);
    };
    let locked = Money::from_minor(locked, l.currency);
    let due = instant(c.balance_due_at.unwrap_or(micros(now)));
    let (mut applied, mut after) = (0, 0);
    let mut applying = InFlight::new(STEPS_IN_FLIGHT);
    loop {
        let batch = store.pledge_contacts(&c.id, "active", after, CHUNK).await?;
        let Some(last) = batch.last() else {
            while let Some(done) = applying.next().await {
                applied += done?;
            }
            return Ok(applied);
        };
        after = last.seq;
        let mut steps = Vec::with_capacity(batch.len());
        for p in &batch {
            let pledge = pledge_of(p, &c.id);
            let deposit = Money::from_minor(p.deposit_minor, l.currency);
            let balance = presale::balance(p.qty, locked, deposit)
                .map_err(|e| StoreError::Inconsistent(e.to_string()))?;
            steps.push(if balance.is_positive() {
                PledgeStep {
                    pledge_id: p.id.clone(),
                    from: "active",
                    to: "awaiting_balance",
                    balance_minor: Some(balance.minor()),
                    refunded_minor: 0,
                    charge: Some(NewIntent {
                        id: intent_id("balance", &p.id),
                        idempotency_key: format!("balance:{}", p.id),
                        kind: "charge",
                        purpose: "balance",
                        subject_id: p.id.clone(),
                        shopper_id: p.shopper_id.clone(),
                        amount: balance,
                        account: Account::Balances,
                        refund_of: None,
                        memo: format!("balance for {} × {} at {locked}", p.qty, c.sku),
                        // Sent as soon as its chunk commits.
                        first_sweep_at: micros(now + crate::payments::hold()),
                    }),
                    refund: None,
                    entry: None,
                    email: Some(emails::balance_due(l, p, locked, balance, due)),
                }
            } else {
                // The deposit already covers the final price: nothing is due, the rest returns.
                PledgeStep {
                    pledge_id: p.id.clone(),
                    from: "active",
                    to: "paid",
                    balance_minor: Some(0),
                    refunded_minor: balance.negate().minor(),
                    charge: None,
                    refund: deposit_refund(
                        &pledge,
                        balance.negate(),
                        "deposit above the final price",
                        now,
                    ),
                    entry: None,
                    email: Some(emails::balance_paid(l, p, locked)),
                }
            });
        }
        let (store, payments) = (store.clone(), payments.clone());
        let apply_and_charge = async move {
            let (applied, charges) = store.apply_pledge_steps(&steps, micros(now)).await?;
            payments
                .attempt_begun(&charges, &HashMap::new(), now)
                .await?;
            Ok::<usize, PresaleError>(applied)
        };
        if let Some(done) = applying.start(apply_and_charge).await {
            applied += done?;
        }
    }
}

/// `presale-balances`: charges, retries and reminds during the balance window; at its end
/// defaults the unpaid, re-awards on the paid units, books the settlement and issues the
/// purchase orders.
pub async fn run_balances(
    store: &Store,
    payments: &Payments,
    now: DateTime<Utc>,
) -> Result<serde_json::Value> {
    let now_us = micros(now);
    let mut summary = Vec::new();
    for c in store.campaigns_in("settling", "settling").await? {
        let l = load_quotes(store, c).await?;
        let c = &l.campaign;
        // A close that a crash cut short is finished first.
        charge_balances(store, payments, &l, now).await?;
        payments.sweep(now, false).await?;
        let locked = Money::from_minor(c.locked_price_minor.unwrap_or(0), l.currency);
        let due = c.balance_due_at.unwrap_or(now_us);
        let retried = if now_us < due {
            retry_declined_balances(store, payments, c, now).await?
        } else {
            0
        };
        // Tell shoppers what the gateway said (each email once per attempt).
        let declined = ("awaiting_balance", "declined");
        email_by_balance(store, &c.id, declined, now_us, |p, attempts| {
            emails::balance_failed(&l, p, attempts, instant(due))
        })
        .await?;
        email_by_balance(store, &c.id, ("paid", "succeeded"), now_us, |p, _| {
            emails::balance_paid(&l, p, locked)
        })
        .await?;
        if now_us < due {
            summary.push(json!({"campaign": c.id, "retried": retried}));
            continue;
        }
        // The window is over. A balance still being charged decides its pledge: wait for it.
        if store.balance_pending(&c.id).await? {
            summary.push(json!({"campaign": c.id, "waiting_for_balances": true}));
            continue;
        }
        let defaulted = default_unpaid(store, &l, now).await?;
        payments.sweep(now, false).await?;
        let settled = settle(store, &l, now).await?;
        summary.push(json!({"campaign": c.id, "defaulted": defaulted, "settled": settled}));
    }
    Ok(json!({ "campaigns": summary }))
}

/// The pledges of a campaign in one status whose balance intent is in one status, read a
/// chunk of pledges at a time (chunks without a match are skipped).
struct ByBalance<'a> {
    store: &'a Store,
    campaign_id: &'a str,
    pledge_status: &'a str,
    intent_status: &'a str,
    after: i64,
}

impl<'a> ByBalance<'a> {
    fn new(store: &'a Store, campaign_id: &'a str, (pledge, intent): (&'a str, &'a str)) -> Self {
        ByBalance {
            store,
            campaign_id,
            pledge_status: pledge,
            intent_status: intent,
            after: 0,
        }
    }

    /// The next pledges that match, with their intent's attempts; `None` past the last.
    async fn next(&mut self) -> Result<Option<Vec<(PledgeContact, i64)>>> {
        loop {
            let chunk = self
                .store
                .pledges_with_intents(
                    self.campaign_id,
                    (self.pledge_status, "balance"),
                    self.after,
                    CHUNK,
                )
                .await?;
            let Some((last, _, _)) = chunk.last() else {
                return Ok(None);
            };
            self.after = last.seq;
            let matching: Vec<(PledgeContact, i64)> = chunk
                .into_iter()
                .filter(|(_, status, _)| status.as_deref() == Some(self.intent_status))
                .map(|(p, _, attempts)| (p, attempts))
                .collect();
            if !matching.is_empty() {
                return Ok(Some(matching));
            }
        }
    }
}

/// Writes `email` for each pledge of a campaign in `statuses` (pledge, balance intent).
async fn email_by_balance(
    store: &Store,
    campaign_id: &str,
    statuses: (&str, &str),
    now_us: i64,
    email: impl Fn(&PledgeContact, i64) -> NewEmail,
) -> Result<()> {
    let mut pledges = ByBalance::new(store, campaign_id, statuses);
    while let Some(batch) = pledges.next().await? {
        let emails: Vec<NewEmail> = batch.iter().map(|(p, n)| email(p, *n)).collect();
        store.enqueue_emails(&emails, now_us).await?;
    }
    Ok(())
}

/// Retries balances declined at least a day ago, with the key they had (an updated card is
/// used), and plans the next round.
async fn retry_declined_balances(
    store: &Store,
    payments: &Payments,
    c: &CampaignRow,
    now: DateTime<Utc>,
) -> Result<usize> {
    let now_us = micros(now);
    let cutoff = micros(now - retry_every());
    let mut retried = 0;
    let mut declined = ByBalance::new(store, &c.id, ("awaiting_balance", "declined"));
    while let Some(batch) = declined.next().await? {
        for (p, _) in &batch {
            let id = intent_id("balance", &p.id);
            let Some(intent) = store.intent(&id).await? else {
                continue;
            };
            if intent.resolved_at.is_none_or(|t| t > cutoff) {
                continue;
            }
            if store.reopen_unpaid_charge(&id, now_us).await? {
                payments.attempt(&id, now).await?;
                retried += 1;
            }
        }
    }
    let next = now + retry_every();
    if c.balance_due_at.is_some_and(|due| micros(next) < due) {
        store.add_timer(BALANCES_JOB, micros(next), now_us).await?;
    }
    Ok(retried)
}

/// Pledges still unpaid at the end of the window default: their deposit is refunded or
/// forfeited per the campaign's policy.
async fn default_unpaid(store: &Store, l: &Loaded, now: DateTime<Utc>) -> Result<usize> {
    let c = &l.campaign;
    let (mut applied, mut after) = (0, 0);
    loop {
        let batch = store
            .pledge_contacts(&c.id, "awaiting_balance", after, CHUNK)
            .await?;
        let Some(last) = batch.last() else {
            return Ok(applied);
        };
        after = last.seq;
        let mut steps = Vec::with_capacity(batch.len());
        for p in &batch {
            let pledge = pledge_of(p, &c.id);
            let deposit = Money::from_minor(p.deposit_minor, l.currency);
            let (refund, entry, refunded) = if c.deposit_refundable {
                (
                    deposit_refund(&pledge, deposit, "balance not paid", now),
                    None,
                    deposit.minor(),
                )
            } else {
                (None, forfeit_entry(&pledge, deposit, "defaulted")?, 0)
            };
            steps.push(PledgeStep {
                pledge_id: p.id.clone(),
                from: "awaiting_balance",
                to: "defaulted",
                balance_minor: None,
                refunded_minor: refunded,
                charge: None,
                refund,
                entry,
                email: Some(emails::defaulted(l, p, refunded > 0)),
            });
        }
        // Refunds and forfeits only: no charges to send.
        applied += store.apply_pledge_steps(&steps, micros(now)).await?.0;
    }
}

/// The end of a settlement: award on the paid units, purchase orders, the settlement entry.
async fn settle(store: &Store, l: &Loaded, now: DateTime<Utc>) -> Result<bool> {
    let c = &l.campaign;
    let now_us = micros(now);
    let demand = store.paid_demand(&c.id).await?;
    let paid_qty: i64 = demand.iter().map(|(_, q)| q).sum();
    let locked = c.locked_price_minor.unwrap_or(0);
    let (deposits, balances, forfeits) = store.campaign_money(&c.id).await?;
    let rules = l.rules();
    let award = if paid_qty > 0 {
        presale::award(&rules, paid_qty)
    } else {
        None
    };
    let Some(award) = award else {
        // Nobody paid: nothing to order. The campaign fails; forfeits stay forfeited.
        return Ok(store
            .move_campaign(
                &c.id,
                &["settling"],
                None,
                "failed",
                None,
                None,
                None,
                now_us,
            )
            .await?);
    };
    let zone = zone_of(c);
    let issue_day = now.with_timezone(&zone).date_naive();
    let lines = presale::purchase_order_lines(&award, &demand);
    let mut orders = Vec::new();
    let mut emails = Vec::new();
    for (line, variant_lines) in award.lines.iter().zip(lines) {
        let (row, quote) = &l.quotes[line.quote];
        // The break the ordered quantity actually reaches (never above the award's price).
        let unit_price = quote.price_at(line.qty).unwrap_or(line.unit_price);
        let total = unit_price
            .times(line.qty, l.currency)
            .map_err(|e| StoreError::Inconsistent(e.to_string()))?;
        let po = PurchaseOrderRow {
            seq: 0,
            id: crate::ids::new_id("po"),
            campaign_id: c.id.clone(),
            manufacturer_id: row.manufacturer_id.clone(),
            quote_id: row.id.clone(),
            currency: c.currency.clone(),
            qty: line.qty,
            unit_price_scaled: unit_price.to_scaled(),
            total_minor: total.minor(),
            lines: serde_json::to_string(
                &variant_lines
                    .iter()
                    .map(|(v, q)| json!({"variant": v, "qty": q}))
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_else(|_| "[]".into()),
            issued_at: now_us,
            ship_by: (issue_day + Duration::days(quote.lead_time_days)).to_string(),
        };
        let manufacturer = store.manufacturer(&row.manufacturer_id).await?;
        emails.push(emails::purchase_order(
            l,
            &po,
            &manufacturer.email,
            &manufacturer.name,
        ));
        orders.push(po);
    }
    let cost: i64 = orders.iter().map(|o| o.total_minor).sum();
    let shortfall = cost - deposits - balances;
    let forfeit_used = shortfall.clamp(0, forfeits);
    let platform = shortfall - forfeit_used;
    let line = |account, amount_minor| Line {
        account,
        shopper_id: None,
        amount_minor,
    };
    let entry = JournalEntry::new(
        l.currency,
        ("campaign", &c.id, "settled"),
        format!("settlement of {}: {} units ordered", c.sku, award.ordered),
        vec![
            line(Account::DepositsHeld, deposits),
            line(Account::Balances, balances),
            line(Account::Forfeits, forfeit_used),
            line(Account::PlatformShortfall, platform),
            line(Account::ManufacturerPayables, -cost),
        ],
    )
    .ok();
    let settlement = Settlement {
        final_unit_price_minor: locked,
        surplus_qty: award.ordered - paid_qty,
        shortfall_minor: platform,
        orders,
        entry,
        emails,
    };
    Ok(store.finish_settlement(&c.id, &settlement, now_us).await?)
}

/// `presale-reminders`: every pledger hears when the pool reaches a new price step ("tier
/// unlocked", once per step and pledge), and a day before each deadline how far the pool is
/// from the next one (once per pledge).
pub async fn run_reminders(store: &Store, now: DateTime<Utc>) -> Result<serde_json::Value> {
    let now_us = micros(now);
    let horizon = micros(now + reminder_lead());
    let (mut sent, mut unlocked) = (0, 0);
    for c in store.campaigns_in("open", "open").await? {
        if c.closes_at <= now_us {
            continue;
        }
        let l = load_quotes(store, c).await?;
        let c = &l.campaign;
        let rules = l.rules();
        let progress = presale::progress(&rules, c.pooled_qty, l.currency);
        // The last step reached, if not announced yet. Steps, not every change of the price:
        // with several quotes the blended price moves by cents with each join.
        let reached = presale::price_steps(&rules, l.currency)
            .into_iter()
            .rev()
            .find(|s| s.min_qty <= c.pooled_qty);
        if let (Some(step), Some(price)) = (reached, progress.current)
            && step.min_qty > store.announced_step(&c.id).await?
        {
            // Emails first (keyed per step and pledge, so a rerun after a crash adds none),
            // then the mark.
            unlocked += to_every_pledger(store, &c.id, now_us, |p| {
                emails::tier_unlocked(&l, p, step.min_qty, price)
            })
            .await?;
            store.mark_step_announced(&c.id, step.min_qty).await?;
        }
        if c.closes_at <= horizon {
            sent += to_every_pledger(store, &c.id, now_us, |p| {
                emails::deadline_reminder(&l, p, &progress)
            })
            .await?;
        }
    }
    Ok(json!({ "reminded": sent, "told_of_new_tier": unlocked }))
}

/// Enqueues `email` to every active pledger of campaign `id`, a chunk at a time; how many.
async fn to_every_pledger(
    store: &Store,
    id: &str,
    now_us: i64,
    email: impl Fn(&PledgeContact) -> NewEmail,
) -> Result<usize> {
    let (mut after, mut sent) = (0, 0);
    loop {
        let pledges = store.pledge_contacts(id, "active", after, CHUNK).await?;
        let Some(last) = pledges.last() else {
            return Ok(sent);
        };
        after = last.seq;
        let emails: Vec<_> = pledges.iter().map(&email).collect();
        sent += emails.len();
        store.enqueue_emails(&emails, now_us).await?;
    }
}

/// Ops cancel a scheduled or open campaign: every deposit is refunded in full.
pub async fn cancel_campaign(
    store: &Store,
    payments: &Payments,
    id: &str,
    now: DateTime<Utc>,
) -> Result<CampaignRow> {
    let c = store
        .campaign(id)
        .await?
        .ok_or_else(|| PresaleError::NotFound(format!("no campaign {id}")))?;
    const CANCELLABLE: [&str; 2] = ["scheduled", "open"];
    let too_late = |status: &str| {
        PresaleError::Conflict(format!(
            "campaign {id} is {status} and can no longer be cancelled"
        ))
    };
    // Refused before anything runs; the guarded move below still decides a race.
    if !CANCELLABLE.contains(&c.status.as_str()) {
        return Err(too_late(&c.status));
    }
    // Deposits still being charged must be answered before the refunds can cover them.
    payments.sweep(now, true).await?;
    if !store
        .move_campaign(
            id,
            &CANCELLABLE,
            None,
            "cancelled",
            None,
            None,
            None,
            micros(now),
        )
        .await?
    {
        let now_status = store.campaign(id).await?.map_or(c.status, |c| c.status);
        return Err(too_late(&now_status));
    }
    let c = store.campaign(id).await?.unwrap_or(c);
    let l = load_quotes(store, c).await?;
    refund_all(store, &l, now).await?;
    payments.sweep(now, false).await?;
    Ok(l.campaign)
}
