//! Money on both backends: the sandbox gateway's idempotency (across restarts and races),
//! intents with retries, ops charges and refunds over HTTP, the ledger's database checks, and a
//! process killed between the gateway's answer and its recording.

use crate::cli::{Served, pooled, serve};
use crate::helpers::{ADMIN_TOKEN, TestApp, TestDb, join_request, join_settled, raw_tx, str_of};
use crate::on_both_backends;
use crate::presales::jacket;
use pooled::domain::ledger::Account;
use pooled::domain::money::{Currency, Money};
use pooled::payments::gateway::{
    ChargeRequest, GatewayError, GatewayFuture, GatewayOutcome, PaymentGateway, RefundRequest,
};
use pooled::payments::sandbox::SandboxGateway;
use pooled::payments::{Outcome, Payments};
use pooled::presales::{Joined, LateDepositConfirmations};
use pooled::store::{IntentFilter, NewIntent, PledgeRow, Store, micros};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn eur(minor: i64) -> Money {
    Money::from_minor(minor, Currency::parse("EUR").unwrap())
}

fn charge(customer: &str, method: &str, minor: i64, key: &str) -> ChargeRequest {
    ChargeRequest {
        customer: customer.into(),
        payment_method: method.into(),
        amount: eur(minor),
        idempotency_key: key.into(),
    }
}

fn reference(outcome: Result<GatewayOutcome, GatewayError>) -> String {
    match outcome {
        Ok(GatewayOutcome::Succeeded { reference }) => reference,
        other => panic!("expected success, got {other:?}"),
    }
}

on_both_backends! {
    async fn the_sandbox_never_charges_a_key_twice(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let sandbox = SandboxGateway::new(app.state.store.clone(), Arc::clone(&app.state.clock));
        let first = reference(sandbox.charge(&charge("sh_1", "pm_ok", 1000, "k1")).await);
        let again = reference(sandbox.charge(&charge("sh_1", "pm_ok", 1000, "k1")).await);
        assert_eq!(first, again, "a repeat answers with the first charge");
        assert!(matches!(
            sandbox.charge(&charge("sh_1", "pm_ok", 999, "k1")).await,
            Err(GatewayError::Rejected(_))
        ), "the same key for another amount is refused");

        // Declines carry their reason; a declined key is decided afresh after a card update.
        assert!(matches!(
            sandbox.charge(&charge("sh_2", "pm_decline", 500, "k2")).await,
            Ok(GatewayOutcome::Declined { reason, .. }) if reason == "card_declined"
        ));
        assert!(matches!(
            sandbox.charge(&charge("sh_2", "pm_insufficient_funds", 500, "k2")).await,
            Ok(GatewayOutcome::Declined { reason, .. }) if reason == "insufficient_funds"
        ));
        reference(sandbox.charge(&charge("sh_2", "pm_ok", 500, "k2")).await);

        // pm_flaky fails once per key, then succeeds.
        assert!(matches!(
            sandbox.charge(&charge("sh_3", "pm_flaky", 700, "k3")).await,
            Err(GatewayError::Transient(_))
        ));
        let flaky = reference(sandbox.charge(&charge("sh_3", "pm_flaky", 700, "k3")).await);

        // Refunds never exceed what the charge has left; a refund key replays.
        let refund = |amount, key: &str| RefundRequest {
            charge_ref: first.clone(),
            amount: eur(amount),
            idempotency_key: key.into(),
        };
        let r1 = reference(sandbox.refund(&refund(300, "r1")).await);
        assert_eq!(r1, reference(sandbox.refund(&refund(300, "r1")).await));
        assert!(matches!(sandbox.refund(&refund(701, "r2")).await, Err(GatewayError::Rejected(_))));
        reference(sandbox.refund(&refund(700, "r3")).await);
        assert!(matches!(sandbox.refund(&refund(1, "r4")).await, Err(GatewayError::Rejected(_))));

        // Durable: a new process answers the old keys the same way.
        drop(sandbox);
        let app = app.restart_with(|_| {}).await;
        let sandbox = SandboxGateway::new(app.state.store.clone(), Arc::clone(&app.state.clock));
        assert_eq!(first, reference(sandbox.charge(&charge("sh_1", "pm_ok", 1000, "k1")).await));
        assert_eq!(flaky, reference(sandbox.charge(&charge("sh_3", "pm_flaky", 700, "k3")).await));
        let rows = app.state.store.sandbox_payments(None, None, 100).await.unwrap();
        let charges: Vec<_> = rows.iter().filter(|r| r.kind == "charge").collect();
        assert_eq!(charges.len(), 3, "{rows:?}");
        let k1 = charges.iter().find(|r| r.idempotency_key == "k1").unwrap();
        assert_eq!((k1.calls, k1.refunded_minor, k1.status.as_str()), (3, 1000, "succeeded"));
        app.stop().await;
    }
}

on_both_backends! {
    async fn racing_calls_with_one_key_charge_once(backend) {
        let app = TestApp::spawn(backend).await;
        let sandbox = Arc::new(SandboxGateway::new(app.state.store.clone(), Arc::clone(&app.state.clock)));
        let calls = (0..24).map(|_| {
            let sandbox = Arc::clone(&sandbox);
            tokio::spawn(async move { sandbox.charge(&charge("sh_1", "pm_ok", 2500, "race")).await })
        });
        let mut refs = std::collections::BTreeSet::new();
        for call in calls {
            refs.insert(reference(call.await.unwrap()));
        }
        assert_eq!(refs.len(), 1, "every caller sees the one charge");
        let rows = app.state.store.sandbox_payments(None, None, 100).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].calls, 24);

        // Racing refunds of one charge never return more than it took.
        let charge_ref = refs.into_iter().next().unwrap();
        let refunds = (0..10).map(|i| {
            let sandbox = Arc::clone(&sandbox);
            let charge_ref = charge_ref.clone();
            tokio::spawn(async move {
                sandbox.refund(&RefundRequest {
                    charge_ref,
                    amount: eur(1000),
                    idempotency_key: format!("refund-{i}"),
                }).await
            })
        });
        let mut succeeded = 0;
        for refund in refunds {
            if refund.await.unwrap().is_ok() {
                succeeded += 1;
            }
        }
        assert_eq!(succeeded, 2, "2 × 10.00 fit in 25.00, a third does not");
        app.stop().await;
    }
}

/// A gateway that is down for the first `failures` calls, then delegates to the sandbox.
struct Outage {
    failures: usize,
    calls: AtomicUsize,
    sandbox: SandboxGateway,
}

impl PaymentGateway for Outage {
    fn charge<'a>(&'a self, request: &'a ChargeRequest) -> GatewayFuture<'a> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(GatewayError::Transient("connection reset".into()));
            }
            self.sandbox.charge(request).await
        })
    }

    fn refund<'a>(&'a self, request: &'a RefundRequest) -> GatewayFuture<'a> {
        self.sandbox.refund(request)
    }
}

fn intent(id: &str, shopper: &str, minor: i64, now: i64) -> NewIntent {
    NewIntent {
        id: id.into(),
        idempotency_key: format!("test:{id}"),
        kind: "charge",
        purpose: "adjustment",
        subject_id: id.into(),
        shopper_id: shopper.into(),
        amount: eur(minor),
        account: Account::Adjustments,
        refund_of: None,
        memo: "test".into(),
        first_sweep_at: now + 60_000_000,
    }
}

on_both_backends! {
    async fn transient_errors_are_retried_with_backoff_and_declines_are_not(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let store: &Store = &app.state.store;
        let clock = Arc::clone(&app.state.clock);
        let (shopper, _) = app.shopper("Ana", "pm_ok").await;
        let outage = Arc::new(Outage {
            failures: 3,
            calls: AtomicUsize::new(0),
            sandbox: SandboxGateway::new(store.clone(), Arc::clone(&clock)),
        });
        let payments = Payments::new(store.clone(), outage.clone(), None);
        let now = clock.now();
        store.create_intent(&intent("pi_t1", &shopper, 1234, micros(now)), micros(now)).await.unwrap();

        // Two quick tries within the request, then it is left to the retry job.
        let first = payments.send_now("pi_t1", now).await.unwrap();
        assert!(matches!(first, Outcome::Pending { .. }), "{first:?}");
        let row = store.intent("pi_t1").await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.attempts), ("pending", 3));
        assert!(row.next_attempt_at > micros(now), "a backoff was set");
        assert_eq!(payments.sweep(now, false).await.unwrap(), 0, "not due yet");

        // The payment-retry timer fires at the retry time and the charge goes through once.
        let due = pooled::store::instant(row.next_attempt_at);
        assert_eq!(payments.sweep(due, false).await.unwrap(), 1);
        let row = store.intent("pi_t1").await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.attempts), ("succeeded", 4));
        assert_eq!(outage.calls.load(Ordering::SeqCst), 4);

        // A decline is final: no retry, no ledger entry.
        let (declined, _) = app.shopper("Bo", "pm_decline").await;
        store.create_intent(&intent("pi_t2", &declined, 500, micros(now)), micros(now)).await.unwrap();
        assert_eq!(
            payments.send_now("pi_t2", due).await.unwrap(),
            Outcome::Declined { reason: "card_declined".into() }
        );
        let later = due + chrono::Duration::days(1);
        assert_eq!(payments.sweep(later, false).await.unwrap(), 0);
        let pending = store
            .intents(&IntentFilter { status: Some("pending".into()), ..Default::default() }, None, 10)
            .await
            .unwrap();
        assert!(pending.is_empty());
        let check = store.ledger_check().await.unwrap();
        assert!(check.balanced && check.gateway_matches, "{check:?}");
        assert_eq!(check.entries, 1);
        app.stop().await;
    }
}

on_both_backends! {
    async fn ops_charges_and_refunds_reconcile_with_the_gateway(backend) {
        let app = TestApp::spawn(backend).await;
        let (ana, _) = app.shopper("Ana", "pm_ok").await;
        let (bo, _) = app.shopper("Bo", "pm_decline").await;
        let (cy, _) = app.shopper("Cy", "pm_flaky").await;
        let charge = |shopper: &str, amount: &str| json!({
            "shopper_id": shopper, "amount": amount, "currency": "EUR", "memo": "goodwill correction"
        });

        let (status, body) = app.post_keyed("/api/v1/ops/payments/charges", "c-ana", charge(&ana, "40.00")).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!((body["status"].as_str(), body["amount"].as_str()), (Some("succeeded"), Some("40.00")));
        let ana_charge = str_of(&body["id"]);
        // The same request again answers the same intent; nothing moves twice.
        let (status, again) = app.post_keyed("/api/v1/ops/payments/charges", "c-ana", charge(&ana, "40.00")).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(again["id"], body["id"]);

        let (status, body) = app.post_keyed("/api/v1/ops/payments/charges", "c-bo", charge(&bo, "5.00")).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
        assert_eq!(body["code"], "payment_declined");

        let (status, body) = app.post_keyed("/api/v1/ops/payments/charges", "c-cy", charge(&cy, "7.25")).await;
        assert_eq!(status, StatusCode::CREATED, "pm_flaky succeeds on the retry: {body}");
        assert_eq!(body["attempts"], 2);

        // Bad input changes nothing.
        for (i, (bad, field)) in [
            (charge(&ana, "1.001"), "amount"),
            (charge(&ana, "0"), "amount"),
            (json!({"shopper_id": ana, "amount": "1", "currency": "eur", "memo": "x"}), "currency"),
            (charge(&ana, "-3"), "amount"),
            (json!({"shopper_id": ana, "amount": "1", "currency": "EUR", "memo": " "}), "memo"),
        ].into_iter().enumerate() {
            let (status, body) = app.post_keyed("/api/v1/ops/payments/charges", &format!("bad-{i}"), bad).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(body["errors"][0]["field"], field, "{body}");
        }
        let (status, _) = app.post("/api/v1/ops/payments/charges", Some(ADMIN_TOKEN), charge(&ana, "1.00")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "money moves only with an Idempotency-Key");

        // Refunds: partial, then the rest, then nothing left.
        let refund = |amount: Option<&str>| match amount {
            Some(a) => json!({"amount": a, "memo": "returned item"}),
            None => json!({"memo": "returned item"}),
        };
        let path = format!("/api/v1/ops/payment-intents/{ana_charge}/refund");
        let (status, body) = app.post_keyed(&path, "r1", refund(Some("15.00"))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["kind"], "refund");
        let (status, body) = app.post_keyed(&path, "r2", refund(Some("25.01"))).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, body) = app.post_keyed(&path, "r3", refund(None)).await;
        assert_eq!((status, body["amount"].as_str()), (StatusCode::CREATED, Some("25.00")));
        let (status, _) = app.post_keyed(&path, "r4", refund(None)).await;
        assert_eq!(status, StatusCode::CONFLICT);

        let (_, payments) = app.get(&format!("/api/v1/ops/payments?shopper_id={ana}"), Some(ADMIN_TOKEN)).await;
        let items = payments["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "one charge, two refunds: {payments}");
        assert!(items.iter().all(|p| p["status"] == "succeeded"));
        let (_, payments) = app.get(&format!("/api/v1/ops/payments?shopper_id={bo}"), Some(ADMIN_TOKEN)).await;
        assert_eq!(payments["items"][0]["decline_reason"], "card_declined");

        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        // Ana: 40.00 in and out; Cy: 7.25 in.
        assert_eq!(app.account_balance("gateway_clearing").await, "7.25");
        assert_eq!(app.account_balance("refunds").await, "0.00");
        assert_eq!(app.account_balance("adjustments").await, "-7.25");
        assert_eq!(check["entries"], 2 + 2 * 2, "{check}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn the_database_refuses_unbalanced_or_edited_entries(backend) {
        let db = TestDb::new(backend);
        let store = Store::connect(&db.url).await.unwrap();
        store.migrate().await.unwrap();
        let lines = "INSERT INTO ledger_lines (entry_id, line_no, account, amount_minor)
                     VALUES ('je_x', 0, 'gateway_clearing', 100), ('je_x', 1, 'deposits_held', -99)";
        let entry = "INSERT INTO ledger_entries (id, currency, cause_type, cause_id, event, memo, created_at)
                     VALUES ('je_x', 'EUR', 'test', 'x', 'posted', 'x', 0)";
        let balanced = "INSERT INTO ledger_lines (entry_id, line_no, account, amount_minor)
                        VALUES ('je_y', 0, 'gateway_clearing', 100), ('je_y', 1, 'deposits_held', -100)";
        let entry_y = "INSERT INTO ledger_entries (id, currency, cause_type, cause_id, event, memo, created_at)
                       VALUES ('je_y', 'EUR', 'test', 'y', 'posted', 'y', 0)";
        assert!(raw_tx(&db.url, &[lines, entry]).await.is_err(), "an unbalanced entry is refused");
        let one_sided = "INSERT INTO ledger_lines (entry_id, line_no, account, amount_minor)
                         VALUES ('je_x', 0, 'gateway_clearing', 100)";
        assert!(raw_tx(&db.url, &[one_sided, entry]).await.is_err(), "a one-line entry is refused");
        // A batch is refused whole when one of its entries is off, wherever it stands in it.
        let batch_lines = "INSERT INTO ledger_lines (entry_id, line_no, account, amount_minor)
                           VALUES ('je_a', 0, 'gateway_clearing', 100), ('je_a', 1, 'deposits_held', -100),
                                  ('je_b', 0, 'gateway_clearing', 100), ('je_b', 1, 'deposits_held', -1)";
        let batch_entries = "INSERT INTO ledger_entries (id, currency, cause_type, cause_id, event, memo, created_at)
                             VALUES ('je_a', 'EUR', 'test', 'a', 'posted', 'a', 0), ('je_b', 'EUR', 'test', 'b', 'posted', 'b', 0)";
        assert!(raw_tx(&db.url, &[batch_lines, batch_entries]).await.is_err(), "a batch with an unbalanced entry is refused");
        raw_tx(&db.url, &[balanced, entry_y]).await.expect("a balanced entry is accepted");
        for sql in [
            "UPDATE ledger_lines SET amount_minor = 5 WHERE entry_id = 'je_y'",
            "DELETE FROM ledger_entries WHERE id = 'je_y'",
            "INSERT INTO ledger_lines (entry_id, line_no, account, amount_minor) VALUES ('je_y', 2, 'refunds', 1)",
        ] {
            assert!(raw_tx(&db.url, &[sql]).await.is_err(), "refused: {sql}");
        }
        let check = store.ledger_check().await.unwrap();
        assert_eq!((check.balanced, check.entries), (true, 1), "{check:?}");
        store.close().await;
    }
}

/// Signs up Ana (a card that pays) on `served`; her shopper as created.
async fn ana(served: &Served) -> Value {
    let (status, shopper) = served
        .post(
            "/api/v1/shoppers",
            None,
            json!({"name": "Ana", "email": "ana@example.com", "payment_token": "pm_ok"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{shopper}");
    shopper
}

/// The `POOLED_DEBUG_CRASH` points: charges committed, the gateway not called yet; the gateway
/// answered, its answer not recorded yet.
const BEFORE_GATEWAY_CALL: &str = "before-gateway-call";
const AFTER_GATEWAY_CALL: &str = "after-gateway-call";

/// Serves `db` on a manual clock from 2026-06-01, aborting at the `crash` point, if any.
fn serve_manual(db: &TestDb, crash: Option<&str>) -> Served {
    let mut cmd = pooled(db.dir.path());
    cmd.env("POOLED_CLOCK", "manual")
        .env("POOLED_CLOCK_START", "2026-06-01T00:00:00Z")
        .env("POOLED_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("DATABASE_URL", db.url_string());
    if let Some(point) = crash {
        cmd.env("POOLED_DEBUG_CRASH", point);
    }
    serve(cmd)
}

/// SIGKILL-equivalent between the gateway's answer and its recording: the restarted process
/// resends the same key and records the one charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_charge_and_record_charges_once() {
    for backend in crate::helpers::backends() {
        let db = TestDb::new(backend);
        let start = |crash| serve_manual(&db, crash);
        let client = reqwest::Client::new();
        let mut first = start(Some(AFTER_GATEWAY_CALL));
        let shopper = str_of(&ana(&first).await["id"]);
        let charge = |base: &str| {
            client
                .post(format!("{base}/api/v1/ops/payments/charges"))
                .bearer_auth(ADMIN_TOKEN)
                .header("Idempotency-Key", "crash-1")
                .json(&json!({"shopper_id": shopper, "amount": "19.90", "currency": "EUR", "memo": "crash test"}))
                .send()
        };
        assert!(
            charge(&first.base).await.is_err(),
            "the process died mid-request"
        );
        let status = first.child.wait().unwrap();
        assert!(!status.success(), "aborted: {status:?}");

        let second = start(None);
        let get = |path: &'static str| {
            let second = &second;
            async move { second.get(path, Some(ADMIN_TOKEN)).await.1 }
        };
        let payments = get("/api/v1/ops/payments").await;
        let items = payments["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "exactly one charge: {payments}");
        assert_eq!(
            (items[0]["status"].as_str(), items[0]["calls"].as_i64()),
            (Some("succeeded"), Some(2))
        );
        let intents = get("/api/v1/ops/payment-intents").await;
        assert_eq!(intents["items"][0]["status"], "succeeded", "{intents}");
        let check = get("/api/v1/ops/ledger/check").await;
        assert_eq!(
            (
                check["balanced"].as_bool(),
                check["entries"].as_i64(),
                check["gateway_matches"].as_bool()
            ),
            (Some(true), Some(1), Some(true)),
            "{check}"
        );
        // The client's retry with the same key, once the dead request's claim has lapsed,
        // finds the same charge.
        let (status, _) = second
            .post(
                "/api/v1/ops/clock/advance",
                Some(ADMIN_TOKEN),
                json!({"to": "2026-06-01T00:06:00Z"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let res = charge(&second.base).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["id"], intents["items"][0]["id"]);
        let payments = get("/api/v1/ops/payments").await;
        assert_eq!(payments["items"].as_array().unwrap().len(), 1);
    }
}

/// A join dies between its deposit's charge and the recording of the answer: the pledge and
/// its units are committed, the request's own answer never is. The client's retries with the
/// same `Idempotency-Key` are told the request is in flight for half a minute, then, before and
/// after the dead request's claim lapses, replay the pledge committed with the units; nothing
/// joins or charges twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_that_crashes_mid_way_is_replayed_not_joined_twice() {
    for backend in crate::helpers::backends() {
        let db = TestDb::new(backend);
        let client = reqwest::Client::new();
        let first = serve_manual(&db, Some(AFTER_GATEWAY_CALL));
        let admin = Some(ADMIN_TOKEN);
        let (_, factory) = first
            .post(
                "/api/v1/manufacturers",
                admin,
                json!({"name": "Northwind", "email": "northwind@factory.example"}),
            )
            .await;
        let (status, campaign) = first
            .post("/api/v1/campaigns", admin, json!({
                "title": "Rain jacket", "sku": "RJ-26", "currency": "EUR", "reference_price": "100.00",
                "deposit_percent": "10", "opens_at": "2026-06-01T00:00:00Z",
                "closes_at": "2026-06-08T00:00:00Z", "time_zone": "UTC",
                "quotes": [{"manufacturer_id": factory["id"], "lead_time_days": 30, "capacity": 100,
                            "tiers": [{"min_qty": 1, "unit_price": "80.00"}]}]}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{campaign}");
        let shopper = ana(&first).await;
        let token = str_of(&shopper["token"]);
        let join = |base: &str| {
            client
                .post(format!(
                    "{base}/api/v1/campaigns/{}/pledges",
                    str_of(&campaign["id"])
                ))
                .bearer_auth(&token)
                .header("Idempotency-Key", "join-1")
                .json(&json!({"qty": 2}))
                .send()
        };
        assert!(
            join(&first.base).await.is_err(),
            "the process died mid-request"
        );
        let mut first = first;
        assert!(!first.child.wait().unwrap().success());

        let second = serve_manual(&db, None);
        let replayed = |res: reqwest::Response| async move {
            assert_eq!(res.headers()["idempotent-replayed"], "true");
            (res.status(), res.json::<Value>().await.unwrap())
        };
        // At once: the key is in flight (a live request would still be charging the deposit).
        let res = join(&second.base).await.unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT);
        // Half a minute on: the answer committed with the pledge (its deposit was pending).
        let (status, _) = second
            .post(
                "/api/v1/ops/clock/advance",
                admin,
                json!({"to": "2026-06-01T00:00:30Z"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (status, pledge) = replayed(join(&second.base).await.unwrap()).await;
        assert_eq!(
            (status, pledge["status"].as_str(), pledge["qty"].as_i64()),
            (StatusCode::ACCEPTED, Some("pending"), Some(2)),
            "{pledge}"
        );
        // After the dead claim would have lapsed (5 minutes) and the deposit's retry ran.
        let (status, _) = second
            .post(
                "/api/v1/ops/clock/advance",
                admin,
                json!({"to": "2026-06-01T00:10:00Z"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (status, again) = replayed(join(&second.base).await.unwrap()).await;
        assert_eq!(
            (status, &again["id"]),
            (StatusCode::ACCEPTED, &pledge["id"])
        );

        let (_, mine) = second
            .get(
                &format!("/api/v1/shoppers/{}/pledges", str_of(&shopper["id"])),
                Some(&token),
            )
            .await;
        let items = mine["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "one pledge: {mine}");
        assert_eq!(
            (&items[0]["id"], items[0]["status"].as_str()),
            (&pledge["id"], Some("active"))
        );
        let (_, c) = second
            .get(
                &format!("/api/v1/campaigns/{}", str_of(&campaign["id"])),
                Some(&token),
            )
            .await;
        assert_eq!(c["pooled_qty"], 2, "{c}");
        let (_, payments) = second.get("/api/v1/ops/payments", admin).await;
        let charges = payments["items"].as_array().unwrap();
        assert_eq!(charges.len(), 1, "one deposit charged: {payments}");
        assert_eq!(
            (charges[0]["amount"].as_str(), charges[0]["status"].as_str()),
            (Some("20.00"), Some("succeeded"))
        );
        let (_, check) = second.get("/api/v1/ops/ledger/check", admin).await;
        assert_eq!(
            (
                check["balanced"].as_bool(),
                check["gateway_matches"].as_bool()
            ),
            (Some(true), Some(true)),
            "{check}"
        );
    }
}

/// A renewal dies around its charge: after the delivery's lock, invoice and charge were
/// committed and before the gateway call (the charge is held, then resent), or after the
/// gateway charged and before its answer is recorded (resent under the invoice's one key,
/// which the gateway answers with the payment it made). Either way the restarted process
/// records one payment: the box is paid and nothing is charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_crashes_around_its_charge_is_billed_once() {
    // The crash point, and the calls the gateway has seen with the invoice's key in the end.
    let crashes = [(BEFORE_GATEWAY_CALL, 1), (AFTER_GATEWAY_CALL, 2)];
    for ((crash, calls), backend) in crashes
        .into_iter()
        .flat_map(|c| crate::helpers::backends().into_iter().map(move |b| (c, b)))
    {
        let db = TestDb::new(backend);
        let admin = Some(ADMIN_TOKEN);
        let mut first = serve_manual(&db, Some(crash));
        let (status, plan) = first
            .post(
                "/api/v1/plans",
                admin,
                json!({
                "name": "Weekly fruit", "kind": "fruit", "currency": "EUR",
                "price_per_delivery": "19.00", "cadence_weeks": 1, "portions_per_day": 1,
                "cutoff_hours": 48, "delivery_weekdays": ["thu"], "time_zone": "UTC"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{plan}");
        let token = str_of(&ana(&first).await["token"]);
        let (status, sub) = first
            .post(
                "/api/v1/subscriptions",
                Some(&token),
                json!({
                "plan_id": plan["id"], "delivery_weekday": "thu", "start_date": "2026-06-11"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        let sub = str_of(&sub["id"]);
        // The first cutoff, 48 h before 11 June: the renewal charges, and the process dies.
        let advance = |served: &Served, to: &'static str| {
            reqwest::Client::new()
                .post(format!("{}/api/v1/ops/clock/advance", served.base))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"to": to}))
                .send()
        };
        assert!(
            advance(&first, "2026-06-09T00:00:00Z").await.is_err(),
            "the process died mid-renewal"
        );
        assert!(!first.child.wait().unwrap().success());

        let second = serve_manual(&db, None);
        let (_, payments) = second.get("/api/v1/ops/payments", admin).await;
        let charges = payments["items"].as_array().unwrap();
        assert_eq!(charges.len(), 1, "one renewal charged: {payments}");
        assert_eq!(
            (
                charges[0]["amount"].as_str(),
                charges[0]["status"].as_str(),
                charges[0]["calls"].as_i64()
            ),
            (Some("19.00"), Some("succeeded"), Some(calls)),
            "{crash}: charged once"
        );
        let of_sub = |what: &str| format!("/api/v1/subscriptions/{sub}/{what}");
        let (_, invoices) = second.get(&of_sub("invoices"), Some(&token)).await;
        let invoice = &invoices["items"][0];
        assert_eq!(
            (
                invoices["items"].as_array().map(Vec::len),
                invoice["status"].as_str()
            ),
            (Some(1), Some("paid")),
            "{invoices}"
        );
        let (_, deliveries) = second.get(&of_sub("deliveries"), Some(&token)).await;
        assert_eq!(deliveries["items"][0]["status"], "paid", "{deliveries}");
        // The rest of the week runs as usual on the restarted process, with no second charge.
        let (status, _) = second
            .post(
                "/api/v1/ops/clock/advance",
                admin,
                json!({"to": "2026-06-12T00:00:00Z"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (_, payments) = second.get("/api/v1/ops/payments", admin).await;
        assert_eq!(payments["items"].as_array().unwrap().len(), 1, "{payments}");
        let (_, check) = second.get("/api/v1/ops/ledger/check", admin).await;
        assert_eq!(
            (
                check["balanced"].as_bool(),
                check["gateway_matches"].as_bool()
            ),
            (Some(true), Some(true)),
            "{check}"
        );
    }
}

on_both_backends! {
    async fn a_batch_of_intents_is_charged_once_each_and_answered_in_order(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let store: &Store = &app.state.store;
        let payments = app.state.payments.clone();
        let now = app.state.clock.now();
        let mut ids = Vec::new();
        for (i, token) in ["pm_ok", "pm_decline", "pm_flaky", "pm_ok", "pm_insufficient_funds"].iter().enumerate() {
            let (shopper, _) = app.shopper(&format!("S{i}"), token).await;
            let id = format!("pi_b{i}");
            store.create_intent(&intent(&id, &shopper, 100 + i as i64, micros(now)), micros(now)).await.unwrap();
            ids.push(id);
        }
        // pi_b0 was sent and recorded before the batch: the batch answers with what stands.
        assert_eq!(payments.attempt("pi_b0", now).await.unwrap(), Outcome::Succeeded);
        let refs: Vec<&str> = ids.iter().map(String::as_str).chain(["pi_b3"]).collect();
        let outcomes = payments.attempt_many(&refs, &Default::default(), now).await.unwrap();
        assert_eq!(outcomes[0], Outcome::Succeeded);
        assert_eq!(outcomes[1], Outcome::Declined { reason: "card_declined".into() });
        assert!(matches!(outcomes[2], Outcome::Pending { .. }), "{:?}", outcomes[2]);
        assert_eq!(outcomes[3], Outcome::Succeeded);
        assert_eq!(outcomes[4], Outcome::Declined { reason: "insufficient_funds".into() });
        assert_eq!(outcomes[5], Outcome::Succeeded, "a repeated id answers with what stands");
        // The flaky card goes through on the sweep, under the same key.
        let later = now + chrono::Duration::hours(2);
        assert_eq!(payments.sweep(later, false).await.unwrap(), 1);
        let gateway = store.sandbox_payments(None, None, 100).await.unwrap();
        let mut keys: Vec<&str> = gateway.iter().map(|p| p.idempotency_key.as_str()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 5, "one gateway record per intent: {gateway:?}");
        assert_eq!(gateway.iter().filter(|p| p.status == "succeeded").count(), 3);
        let check = store.ledger_check().await.unwrap();
        assert!(check.balanced && check.gateway_matches, "{check:?}");
        assert_eq!(check.entries, 3);
        app.stop().await;
    }
}

on_both_backends! {
    async fn joins_whose_deposits_the_gateway_answers_late_are_confirmed_by_the_sweep(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let store: &Store = &app.state.store;
        let clock = Arc::clone(&app.state.clock);
        let (factory, _) = app.manufacturer("Northwind").await;
        let id = str_of(&app.campaign(jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z")).await["id"]);
        let (ana, _) = app.shopper("Ana", "pm_ok").await;
        let (bea, _) = app.shopper("Bea", "pm_ok").await;
        // The gateway is down for both joins' first three tries (the call and its two quick
        // retries), six calls in all.
        let outage = Arc::new(Outage {
            failures: 6,
            calls: AtomicUsize::new(0),
            sandbox: SandboxGateway::new(store.clone(), Arc::clone(&clock)),
        });
        let payments = Payments::new(store.clone(), outage, None)
            .with_sweep_follow_ups(Arc::new(LateDepositConfirmations(store.clone())));
        let now = clock.now();
        let join = |shopper: &str, qty: i64| join_request(&id, shopper, qty, now);
        let answers = join_settled(store, &payments, vec![join(&ana, 2), join(&bea, 1)]).await;
        let pledges: Vec<PledgeRow> = answers
            .iter()
            .map(|a| match a {
                Ok(Joined::Pledged(pledge, _)) => pledge.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        for pledge in &pledges {
            assert_eq!(pledge.status, "pending", "the deposit is not answered yet");
        }
        let confirmations = |to: &'static str, pledge: String| async move {
            let emails = store.outbox(Some(to), 50, None).await.unwrap();
            emails.into_iter().filter(|e| e.template == "pledge_confirmed" && e.entity == pledge).count()
        };
        let both = || async {
            (
                confirmations("ana@example.com", pledges[0].id.clone()).await,
                confirmations("bea@example.com", pledges[1].id.clone()).await,
            )
        };
        assert_eq!(both().await, (0, 0), "nothing is confirmed before the money moved");

        // The payment-retry sweep resolves both deposits at their retry time, and each
        // confirmation is written with that result: once, however often the sweep runs.
        let mut due = now;
        for pledge in &pledges {
            let intent = store.intent(&format!("pi_deposit_{}", pledge.id)).await.unwrap().unwrap();
            due = due.max(pooled::store::instant(intent.next_attempt_at));
        }
        assert_eq!(payments.sweep(due, false).await.unwrap(), 2, "one sweep takes both");
        assert_eq!(payments.sweep(due + chrono::Duration::hours(1), false).await.unwrap(), 0);
        for pledge in &pledges {
            assert_eq!(store.pledge(&pledge.id).await.unwrap().unwrap().status, "active");
        }
        assert_eq!(both().await, (1, 1));
        let check = store.ledger_check().await.unwrap();
        assert!(check.balanced && check.gateway_matches, "{check:?}");
        app.stop().await;
    }
}
