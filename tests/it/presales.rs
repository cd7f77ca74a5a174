//! Presales end to end over HTTP with the manual clock, on both backends: the down jacket that
//! reaches 30% off, a campaign below its minimum, defaults in the balance window, a split
//! award, a deadline at local midnight across DST, a stampede of concurrent joins, and the
//! contract's edges: refused campaigns and quotes, privacy of pledges and orders, paging.

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, join_request, join_settled, raw_tx, str_of};
use crate::on_both_backends;
use pooled::config::DatabaseUrl;
use pooled::domain::ledger::Account;
use pooled::domain::money::{Currency, Money};
use pooled::domain::presale::JoinRefusal;
use pooled::http::extract::idempotency_scope;
use pooled::http::idempotency::request_hash;
use pooled::presales::{BatchAnswer, JoinKey, JoinRequest, Joined, PresaleError, join_many};
use pooled::store::{
    IdempotencyBegin, IdempotencyClaim, JoinAttempt, JoinDecision, NewIntent, NewPledge, PledgeRow,
    Store, StoredResponse, abandon_claims_after, micros,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;

impl TestApp {
    /// Creates a manufacturer; returns (id, token).
    pub async fn manufacturer(&self, name: &str) -> (String, String) {
        let (status, body) = self
            .post(
                "/api/v1/manufacturers",
                Some(ADMIN_TOKEN),
                json!({"name": name, "email": format!("{}@factory.example", name.to_lowercase())}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (str_of(&body["id"]), str_of(&body["token"]))
    }

    pub async fn campaign(&self, body: Value) -> Value {
        let (status, c) = self
            .post("/api/v1/campaigns", Some(ADMIN_TOKEN), body)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{c}");
        c
    }

    pub async fn pledge(&self, campaign: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.post(
            &format!("/api/v1/campaigns/{campaign}/pledges"),
            Some(token),
            body,
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Value {
        let (status, body) = self.get(path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }

    /// Every gateway movement, by kind: (count, total in minor units of 2-digit currencies).
    pub async fn gateway_totals(&self) -> BTreeMap<String, (usize, i64)> {
        let mut totals: BTreeMap<String, (usize, i64)> = BTreeMap::new();
        let mut after = String::new();
        loop {
            let page = self
                .admin_get(&format!("/api/v1/ops/payments?limit=500{after}"))
                .await;
            for p in page["items"].as_array().unwrap() {
                if p["status"] == "succeeded" {
                    let e = totals.entry(str_of(&p["kind"])).or_default();
                    e.0 += 1;
                    e.1 += cents(&p["amount"]);
                }
            }
            match page["next"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => return totals,
            }
        }
    }
}

/// "12.34" → 1234.
pub fn cents(v: &Value) -> i64 {
    let s = str_of(v);
    let (int, frac) = s.split_once('.').unwrap_or((&s, "00"));
    let sign = if int.starts_with('-') { -1 } else { 1 };
    sign * (int.trim_start_matches('-').parse::<i64>().unwrap() * 100
        + frac.parse::<i64>().unwrap())
}

pub fn jacket(manufacturer: &str, opens_at: &str, closes_at: &str) -> Value {
    json!({
        "title": "Down jacket, winter 2026", "sku": "DJ-26", "currency": "EUR",
        "reference_price": "200.00", "deposit_percent": "10",
        "opens_at": opens_at, "closes_at": closes_at,
        "time_zone": "Europe/Berlin", "balance_window_hours": 72, "deposit_refundable": true,
        "variants": ["S", "M", "L"],
        "quotes": [{"manufacturer_id": manufacturer, "lead_time_days": 60, "capacity": 5000,
                    "tiers": [{"min_qty": 100, "unit_price": "180.00"},
                              {"min_qty": 500, "unit_price": "160.00"},
                              {"min_qty": 1000, "unit_price": "140.00"}]}]
    })
}

/// A service on the manual clock at 1 June 2026 with Northwind's jacket on sale until 10 June;
/// the app and the campaign's id.
async fn jacket_on_sale(backend: Backend) -> (TestApp, String) {
    let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
    let (factory, _) = app.manufacturer("Northwind").await;
    let id = str_of(
        &app.campaign(jacket(
            &factory,
            "2026-06-01T00:00:00Z",
            "2026-06-10T00:00:00Z",
        ))
        .await["id"],
    );
    (app, id)
}

on_both_backends! {
    async fn the_down_jacket_settles_at_one_price_for_everyone(backend) {
        let app = TestApp::spawn_manual(backend, "2026-07-25T00:00:00Z".parse().unwrap()).await;
        let (factory, factory_token) = app.manufacturer("Northwind").await;
        let c = app.campaign(jacket(&factory, "2026-07-26T00:00:00Z", "2026-08-01T00:00:00Z")).await;
        let id = str_of(&c["id"]);
        assert_eq!((c["status"].as_str(), c["deposit_per_unit"].as_str()), (Some("scheduled"), Some("20.00")));
        assert_eq!(c["price_ceiling"], "180.00");
        assert_eq!(c["current_unit_price"], Value::Null);

        let (early, early_token) = app.shopper("Early", "pm_ok").await;
        let (status, body) = app.pledge(&id, &early_token, json!({"qty": 1, "variant": "M"})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("campaign_not_open")));
        app.advance("2026-07-26T00:00:00Z").await;
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!(c["status"], "open", "the opening timer fired: {c}");

        // Bad input changes nothing.
        for (bad, field) in [(json!({"qty": 0, "variant": "M"}), "qty"), (json!({"qty": 1, "variant": "XXL"}), "variant"), (json!({"qty": 1}), "variant")] {
            let (status, body) = app.pledge(&id, &early_token, bad).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(body["errors"][0]["field"], field);
        }
        // A declined deposit counts nothing.
        let (_, declined_token) = app.shopper("Declined", "pm_decline").await;
        let (status, body) = app.pledge(&id, &declined_token, json!({"qty": 3, "variant": "S"})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("payment_declined")));
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["pooled_qty"], 0);

        // 300 shoppers pledge 1–7 units of three sizes through the summer.
        let mut shoppers = vec![(early.clone(), early_token.clone())];
        for i in 1..300 {
            shoppers.push(app.shopper(&format!("Shopper{i}"), if i % 50 == 7 { "pm_flaky" } else { "pm_ok" }).await);
        }
        let sizes = ["S", "M", "L"];
        let mut pledges = Vec::new();
        let mut total = 0;
        for (i, (_, token)) in shoppers.iter().enumerate() {
            let qty = (i % 7) as i64 + 1;
            let (status, body) = app.pledge(&id, token, json!({"qty": qty, "variant": sizes[i % 3]})).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            assert_eq!((body["status"].as_str(), body["price_ceiling"].as_str()), (Some("active"), Some("180.00")));
            assert_eq!(cents(&body["deposit_amount"]), qty * 2000);
            pledges.push((str_of(&body["id"]), token.clone(), qty));
            total += qty;
        }
        assert!(total >= 1000, "{total}");
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!((c["pooled_qty"].as_i64(), c["current_unit_price"].as_str()), (Some(total), Some("140.00")));
        assert_eq!(c["next_tier"], Value::Null);
        let (status, demand) = app.get(&format!("/api/v1/campaigns/{id}/demand"), Some(&factory_token)).await;
        assert_eq!(status, StatusCode::OK, "{demand}");
        assert_eq!(demand["by_variant"].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).sum::<i64>(), total);
        assert_eq!(demand["history"].as_array().unwrap().last().unwrap()["pooled_qty"], total);
        let (status, _) = app.get(&format!("/api/v1/campaigns/{id}/demand"), Some(&early_token)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "shoppers don't see demand: the wrong role");
        // Privacy: another shopper's pledge is not found; a manufacturer never reads pledges.
        let (status, _) = app.get(&format!("/api/v1/pledges/{}", pledges[1].0), Some(&early_token)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = app.get(&format!("/api/v1/pledges/{}", pledges[1].0), Some(&factory_token)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // A day before the deadline every pledger is reminded, on time: a timer, not the hourly
        // poll (the manual clock does not stop at hourly slots).
        app.advance("2026-07-31T00:00:00Z").await;
        let outbox = app.admin_get("/api/v1/ops/outbox?to=early@example.com").await;
        let reminders: Vec<&Value> = outbox["items"].as_array().unwrap().iter().filter(|e| e["template"] == "deadline_reminder").collect();
        assert_eq!(reminders.len(), 1, "{outbox}");
        assert_eq!(reminders[0]["created_at"], "2026-07-31T00:00:00Z", "{outbox}");

        // The deadline: the price locks at 140.00 and balances are charged at once.
        app.advance("2026-08-01T00:00:00Z").await;
        let (status, late) = app.pledge(&id, &early_token, json!({"qty": 1, "variant": "M"})).await;
        assert_eq!((status, late["code"].as_str()), (StatusCode::CONFLICT, Some("campaign_not_open")));
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!(c["status"], "settling", "{c}");
        assert_eq!(c["final_unit_price"], "140.00", "shown from the close on: {c}");
        // Balances are charged at once; a flaky card's retry comes half a minute later.
        app.advance("2026-08-01T00:05:00Z").await;
        for (pledge, token, qty) in &pledges {
            let (status, p) = app.get(&format!("/api/v1/pledges/{pledge}"), Some(token)).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(p["status"], "paid", "{p}");
            assert_eq!(p["final_unit_price"], "140.00");
            assert_eq!(cents(&p["balance_amount"]), qty * 14000 - qty * 2000, "qty × final − deposit");
        }
        app.advance("2026-08-04T00:00:00Z").await;
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!((c["status"].as_str(), c["final_unit_price"].as_str()), (Some("succeeded"), Some("140.00")), "{c}");

        // One purchase order with the per-variant breakdown, by API, CSV and email.
        let (status, orders) = app.get("/api/v1/purchase-orders", Some(&factory_token)).await;
        assert_eq!(status, StatusCode::OK);
        let orders = orders["items"].as_array().unwrap();
        assert_eq!(orders.len(), 1);
        let po = &orders[0];
        assert_eq!((po["qty"].as_i64(), po["unit_price"].as_str(), po["ship_by"].as_str()), (Some(total), Some("140.00"), Some("2026-10-03")));
        assert_eq!(cents(&po["total"]), total * 14000);
        let lines = po["lines"].as_array().unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines.iter().map(|l| l["qty"].as_i64().unwrap()).sum::<i64>(), total);
        let csv = app.client.get(format!("{}/api/v1/purchase-orders/{}.csv", app.base, str_of(&po["id"])))
            .bearer_auth(&factory_token).send().await.unwrap().text().await.unwrap();
        assert_eq!(csv.lines().count(), 4, "{csv}");
        assert!(csv.starts_with("purchase_order,campaign,sku,variant,qty"), "{csv}");
        let outbox = app.admin_get("/api/v1/ops/outbox?to=northwind@factory.example").await;
        assert_eq!(outbox["items"][0]["template"], "purchase_order", "{outbox}");

        // Money reconciles to the cent.
        let totals = app.gateway_totals().await;
        assert_eq!(totals["charge"].1, total * 14000, "deposits + balances = units × final price");
        assert!(!totals.contains_key("refund"));
        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        assert_eq!(app.account_balance("deposits_held").await, "0.00");
        assert_eq!(app.account_balance("balances").await, "0.00");
        assert_eq!(cents(&Value::String(app.account_balance("manufacturer_payables").await)), -total * 14000);
        app.stop().await;
    }
}

on_both_backends! {
    async fn ops_cancel_a_campaign_and_every_deposit_comes_back(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        // Non-refundable deposits: a shopper who withdraws forfeits one, but the shop calling the
        // campaign off returns every one.
        let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
        body["deposit_refundable"] = json!(false);
        let id = str_of(&app.campaign(body).await["id"]);
        let ended = str_of(&app.campaign(jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-05T00:00:00Z")).await["id"]);
        let mut pledges = Vec::new();
        for i in 0..3 {
            let (_, token) = app.shopper(&format!("Called{i}"), "pm_ok").await;
            let (status, body) = app.pledge(&id, &token, json!({"qty": 2, "variant": "L"})).await;
            assert_eq!((status, body["deposit_amount"].as_str()), (StatusCode::CREATED, Some("40.00")), "{body}");
            pledges.push((str_of(&body["id"]), token));
        }
        let cancel = |campaign: &str, token: Option<&str>| {
            let path = format!("/api/v1/campaigns/{campaign}/cancel");
            let token = token.map(str::to_owned);
            let app = &app;
            async move { app.post(&path, token.as_deref(), json!({})).await }
        };
        assert_eq!(cancel(&id, None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(cancel(&id, Some(&pledges[0].1)).await.0, StatusCode::FORBIDDEN, "shoppers cannot");
        assert_eq!(cancel("cmp_nope", Some(ADMIN_TOKEN)).await.0, StatusCode::NOT_FOUND);
        assert_eq!(app.gateway_totals().await.get("refund"), None, "a refused cancel refunds nothing");

        let (status, c) = cancel(&id, Some(ADMIN_TOKEN)).await;
        assert_eq!((status, c["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{c}");
        for (pledge, token) in &pledges {
            let (_, p) = app.get(&format!("/api/v1/pledges/{pledge}"), Some(token)).await;
            assert_eq!((p["status"].as_str(), p["refunded_amount"].as_str()), (Some("refunded"), Some("40.00")), "{p}");
        }
        let (status, again) = cancel(&id, Some(ADMIN_TOKEN)).await;
        assert_eq!((status, again["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "cancelled once: {again}");
        let (status, late) = app.pledge(&id, &pledges[0].1, json!({"qty": 1, "variant": "L"})).await;
        assert_eq!((status, late["code"].as_str()), (StatusCode::CONFLICT, Some("campaign_not_open")), "{late}");

        // The deadline passes: a cancelled campaign is neither closed nor charged, and a campaign
        // already ended cannot be cancelled.
        app.advance("2026-06-10T01:00:00Z").await;
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["status"], "cancelled");
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{ended}")).await["status"], "failed");
        assert_eq!(cancel(&ended, Some(ADMIN_TOKEN)).await.0, StatusCode::CONFLICT);
        let totals = app.gateway_totals().await;
        assert_eq!((totals["charge"], totals["refund"]), ((3, 3 * 4000), (3, 3 * 4000)), "each deposit charged once and refunded once");
        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        assert_eq!(app.account_balance("deposits_held").await, "0.00");
        assert_eq!(app.account_balance("gateway_clearing").await, "0.00");
        for i in 0..3 {
            let outbox = app.admin_get(&format!("/api/v1/ops/outbox?to=called{i}@example.com")).await;
            let cancelled = outbox["items"].as_array().unwrap().iter().filter(|e| e["template"] == "campaign_cancelled").count();
            assert_eq!(cancelled, 1, "{outbox}");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_campaign_below_its_minimum_refunds_every_deposit_once(backend) {
        let (app, id) = jacket_on_sale(backend).await;
        let mut tokens = Vec::new();
        for i in 0..3 {
            let (_, token) = app.shopper(&format!("Few{i}"), "pm_ok").await;
            let (status, body) = app.pledge(&id, &token, json!({"qty": 3, "variant": "M"})).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            tokens.push((str_of(&body["id"]), token));
        }
        // One cancels before the deadline: refundable, so the deposit comes back.
        let (status, body) = app.post(&format!("/api/v1/pledges/{}/cancel", tokens[0].0), Some(&tokens[0].1), json!({})).await;
        assert_eq!((status, body["refunded_amount"].as_str()), (StatusCode::OK, Some("60.00")), "{body}");
        let (status, _) = app.post(&format!("/api/v1/pledges/{}/cancel", tokens[0].0), Some(&tokens[0].1), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT, "cancelled once");

        app.advance("2026-06-10T00:00:00Z").await;
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!(c["status"], "failed", "{c}");
        for (pledge, token) in &tokens[1..] {
            let (_, p) = app.get(&format!("/api/v1/pledges/{pledge}"), Some(token)).await;
            assert_eq!((p["status"].as_str(), p["refunded_amount"].as_str()), (Some("refunded"), Some("60.00")));
        }
        // The close job running again refunds nothing twice.
        let (status, _) = app.post("/api/v1/ops/jobs/presale-close/run", Some(ADMIN_TOKEN), json!({})).await;
        assert!(status.is_success());
        app.advance("2026-06-10T01:00:00Z").await;
        let totals = app.gateway_totals().await;
        assert_eq!(totals["refund"], (3, 3 * 6000));
        assert_eq!(totals["charge"], (3, 3 * 6000));
        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        assert_eq!(app.account_balance("deposits_held").await, "0.00");
        assert_eq!(app.account_balance("gateway_clearing").await, "0.00");
        let outbox = app.admin_get("/api/v1/ops/outbox?to=few1@example.com").await;
        assert!(outbox["items"].as_array().unwrap().iter().any(|e| e["template"] == "campaign_failed"), "{outbox}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn unpaid_balances_are_retried_then_default_and_forfeits_cover_the_shortfall(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
        body["deposit_refundable"] = json!(false);
        body["deposit_percent"] = json!("20");
        body["quotes"][0]["tiers"] = json!([{"min_qty": 10, "unit_price": "150.00"}]);
        let id = str_of(&app.campaign(body).await["id"]);
        let mut who = Vec::new();
        for name in ["Pays", "Recovers", "Lapses"] {
            let (shopper, token) = app.shopper(name, "pm_ok").await;
            let (status, p) = app.pledge(&id, &token, json!({"qty": 4, "variant": "L"})).await;
            assert_eq!(status, StatusCode::CREATED, "{p}");
            who.push((shopper, token, str_of(&p["id"])));
        }
        for (shopper, token, _) in &who[1..] {
            let (status, _) = app.call(Method::PUT, &format!("/api/v1/shoppers/{shopper}/payment-method"), Some(token), Some(json!({"payment_token": "pm_insufficient_funds"}))).await;
            assert_eq!(status, StatusCode::OK);
        }
        app.advance("2026-06-10T00:00:00Z").await;
        let status_of = |i: usize| {
            let (_, token, pledge) = who[i].clone();
            let app = &app;
            async move { app.get(&format!("/api/v1/pledges/{pledge}"), Some(&token)).await.1["status"].clone() }
        };
        assert_eq!(status_of(0).await, "paid");
        assert_eq!(status_of(1).await, "awaiting_balance");
        // A day later the retry fails again and reminds; then the card is fixed.
        app.advance("2026-06-11T00:00:00Z").await;
        let outbox = app.admin_get("/api/v1/ops/outbox?to=recovers@example.com").await;
        let failed = outbox["items"].as_array().unwrap().iter().filter(|e| e["template"] == "balance_failed").count();
        assert_eq!(failed, 2, "one email per failed attempt: {outbox}");
        let (shopper, token, _) = &who[1];
        app.call(Method::PUT, &format!("/api/v1/shoppers/{shopper}/payment-method"), Some(token), Some(json!({"payment_token": "pm_ok"}))).await;
        app.advance("2026-06-12T00:00:00Z").await;
        assert_eq!(status_of(1).await, "paid", "the updated card is used at the next retry");
        app.advance("2026-06-13T00:00:00Z").await;
        assert_eq!(status_of(2).await, "defaulted");
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!(c["status"], "succeeded", "{c}");
        // 8 paid units, minimum order 10: 10 × 150 ordered; shoppers paid 8 × 150; the lapsed
        // deposit (4 × 40) covers 160 of the 300 shortfall, the platform the other 140.
        assert_eq!(c["surplus_qty"], 2);
        assert_eq!(app.account_balance("forfeits").await, "0.00");
        assert_eq!(app.account_balance("platform_shortfall").await, "140.00");
        assert_eq!(app.account_balance("manufacturer_payables").await, "-1500.00");
        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn capacity_splits_the_award_across_two_manufacturers(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (a, a_token) = app.manufacturer("Alpha").await;
        let (b, b_token) = app.manufacturer("Beta").await;
        let c = app.campaign(json!({
            "title": "Mugs", "sku": "MUG", "currency": "EUR", "reference_price": "15.00",
            "deposit_percent": 10, "opens_at": "2026-06-02T00:00:00Z", "closes_at": "2026-06-10T00:00:00Z",
            "time_zone": "UTC", "quotes": [{"manufacturer_id": a, "lead_time_days": 10, "capacity": 300,
                                            "tiers": [{"min_qty": 100, "unit_price": "10.00"}]}]
        })).await;
        let id = str_of(&c["id"]);
        let (status, body) = app.post(&format!("/api/v1/campaigns/{id}/quotes"), Some(&b_token),
            json!({"lead_time_days": 20, "capacity": 1000, "tiers": [{"min_qty": 200, "unit_price": "12.00"}]})).await;
        assert_eq!((status, body["capacity"].as_i64()), (StatusCode::CREATED, Some(1300)), "{body}");
        app.advance("2026-06-02T00:00:00Z").await;
        let (status, _) = app.post(&format!("/api/v1/campaigns/{id}/quotes"), Some(&a_token),
            json!({"lead_time_days": 5, "tiers": [{"min_qty": 1, "unit_price": "1.00"}]})).await;
        assert_eq!(status, StatusCode::CONFLICT, "no re-quoting once open");
        for i in 0..9 {
            let (_, token) = app.shopper(&format!("Mug{i}"), "pm_ok").await;
            let (status, body) = app.pledge(&id, &token, json!({"qty": 50})).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        app.advance("2026-06-13T00:00:00Z").await;
        let orders = app.admin_get("/api/v1/purchase-orders").await;
        let mut got: Vec<(String, i64, String)> = orders["items"].as_array().unwrap().iter()
            .map(|o| (str_of(&o["manufacturer_id"]), o["qty"].as_i64().unwrap(), str_of(&o["total"]))).collect();
        got.sort();
        let mut want = vec![(a.clone(), 250, "2500.00".to_string()), (b.clone(), 200, "2400.00".to_string())];
        want.sort();
        assert_eq!(got, want);
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!(c["final_unit_price"], "10.89", "4900 / 450, rounded half-even: {c}");
        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn quotes_the_campaign_cannot_price_are_refused_and_change_nothing(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let mut makers = Vec::new();
        for i in 0..7 {
            makers.push(app.manufacturer(&format!("Maker{i}")).await);
        }
        let one_break = |m: &str| json!({"manufacturer_id": m, "lead_time_days": 10, "capacity": 100,
                                         "tiers": [{"min_qty": 10, "unit_price": "1.00"}]});
        let mut body = json!({
            "title": "Mugs", "sku": "MUG", "currency": "EUR", "reference_price": "15.00",
            "deposit_percent": 10, "opens_at": "2026-06-02T00:00:00Z", "closes_at": "2026-06-10T00:00:00Z",
            "time_zone": "UTC", "quotes": makers.iter().map(|(m, _)| one_break(m)).collect::<Vec<_>>()
        });
        let (status, problem) = app.post("/api/v1/campaigns", Some(ADMIN_TOKEN), body.clone()).await;
        assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("quotes")), "{problem}");
        let (_, list) = app.get("/api/v1/campaigns", None).await;
        assert_eq!(list["items"].as_array().unwrap().len(), 0, "nothing was created: {list}");

        // A capped quote at 1.00 beside an unbounded one at 5.00: past the first 100 units the
        // price climbs towards 5.00, so that is the ceiling.
        body["quotes"] = json!([one_break(&makers[0].0)]);
        let id = str_of(&app.campaign(body).await["id"]);
        let path = format!("/api/v1/campaigns/{id}/quotes");
        let (status, c) = app.post(&path, Some(&makers[1].1),
            json!({"lead_time_days": 10, "tiers": [{"min_qty": 10, "unit_price": "5.00"}]})).await;
        assert_eq!(status, StatusCode::CREATED, "{c}");
        assert_eq!((&c["price_ceiling"], &c["capacity"]), (&json!("5.00"), &Value::Null), "{c}");

        let (_, shopper) = app.shopper("Sam", "pm_ok").await;
        let (status, _) = app.post(&path, Some(&shopper),
            json!({"lead_time_days": 10, "tiers": [{"min_qty": 10, "unit_price": "1.00"}]})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "only manufacturers quote");
        let refused = [
            (json!({"manufacturer_id": makers[0].0, "lead_time_days": 10,
                    "tiers": [{"min_qty": 10, "unit_price": "1.00"}]}), "manufacturer_id"),
            (json!({"lead_time_days": 10, "tiers": [{"min_qty": 10, "unit_price": "2.00"},
                    {"min_qty": 1_000_000_000_000_i64, "unit_price": "1.00"}]}), "quote.tiers"),
            (json!({"lead_time_days": 10, "capacity": 1_000_000_000, "tiers": [{"min_qty": 10, "unit_price": "1.00"}]}),
             "quote.capacity"),
        ];
        for (quote, field) in refused {
            let (status, problem) = app.post(&path, Some(&makers[2].1), quote).await;
            assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!(field)), "{problem}");
        }
        // Six quotes are the most; the seventh is refused and not stored.
        for (m, token) in &makers[2..6] {
            let (status, c) = app.post(&path, Some(token),
                json!({"lead_time_days": 10, "capacity": 50, "tiers": [{"min_qty": 10, "unit_price": "3.00"}]})).await;
            assert_eq!(status, StatusCode::CREATED, "{m}: {c}");
        }
        let before = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        let (status, problem) = app.post(&path, Some(&makers[6].1),
            json!({"lead_time_days": 10, "capacity": 50, "tiers": [{"min_qty": 10, "unit_price": "0.50"}]})).await;
        assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("quote")), "{problem}");
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await, before);
        app.stop().await;
    }
}

on_both_backends! {
    async fn each_join_in_a_batch_is_judged_at_its_own_instant(backend) {
        let (app, id) = jacket_on_sale(backend).await;
        let (ana, _) = app.shopper("Ana", "pm_ok").await;
        let (bo, _) = app.shopper("Bo", "pm_ok").await;
        let deadline: chrono::DateTime<chrono::Utc> = "2026-06-10T00:00:00Z".parse().unwrap();
        let ms = chrono::Duration::milliseconds(1);
        // Ana's request came in just before the deadline, Bo's just after, and they share a batch.
        let answers = join_settled(&app.state.store, &app.state.payments, vec![
            join_request(&id, &ana, 2, deadline - ms),
            join_request(&id, &bo, 3, deadline),
        ]).await;
        let Ok(Joined::Pledged(pledge, _)) = &answers[0] else { panic!("{answers:?}") };
        assert_eq!((pledge.qty, pledge.status.as_str()), (2, "active"));
        assert!(matches!(answers[1], Err(PresaleError::NotOpen(_))), "{answers:?}");
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["pooled_qty"], 2);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_campaign_whose_whole_window_fell_in_downtime_still_closes(backend) {
        let start: chrono::DateTime<chrono::Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
        let app = TestApp::spawn_manual(backend, start).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let with_quote = str_of(&app.campaign(jacket(&factory, "2026-06-02T00:00:00Z", "2026-06-03T00:00:00Z")).await["id"]);
        let mut body = jacket(&factory, "2026-06-02T00:00:00Z", "2026-06-03T00:00:00Z");
        body["quotes"] = json!([]);
        let without_quote = str_of(&app.campaign(body).await["id"]);
        // Down from before the campaigns open until after they close.
        let back = "2026-06-05T00:00:00Z";
        let app = app.restart_with(|s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some(back.parse().unwrap());
        }).await;
        app.advance(back).await;
        for id in [&with_quote, &without_quote] {
            let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
            assert_eq!(c["status"], "failed", "no pledges, below the minimum: {c}");
        }
        let (_, list) = app.get("/api/v1/campaigns", None).await;
        assert_eq!(list["items"], json!([]), "nothing is left scheduled: {list}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn the_campaign_list_pages_by_deadline(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let mut ids = Vec::new();
        // Two share a deadline: the id breaks the tie, so no page repeats or drops one.
        for closes in ["2026-06-12T00:00:00Z", "2026-06-10T00:00:00Z", "2026-06-12T00:00:00Z", "2026-06-11T00:00:00Z"] {
            ids.push((closes, str_of(&app.campaign(jacket(&factory, "2026-06-02T00:00:00Z", closes)).await["id"])));
        }
        ids.sort();
        let want: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
        let mut got = Vec::new();
        let mut path = "/api/v1/campaigns?limit=3".to_string();
        let mut pages = 0;
        loop {
            let (status, page) = app.get(&path, None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            pages += 1;
            got.extend(page["items"].as_array().unwrap().iter().map(|c| str_of(&c["id"])));
            match page["next"].as_str() {
                Some(next) => path = format!("/api/v1/campaigns?limit=3&after={next}"),
                None => break,
            }
        }
        assert_eq!((got, pages), (want, 2));
        for bad in ["limit=0", "limit=501", "after=nonsense", "after=x.y", "limit=abc"] {
            let (status, problem) = app.get(&format!("/api/v1/campaigns?{bad}"), None).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {problem}");
            assert_eq!(problem["code"], "validation_failed", "{bad}: {problem}");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_deposit_above_the_final_price_comes_back_and_orders_stay_private(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, factory_token) = app.manufacturer("Northwind").await;
        let (_, rival_token) = app.manufacturer("Rival").await;
        // A 50% deposit of the 200.00 reference is 100.00 a unit; the price settles at 80.00.
        let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
        body["deposit_percent"] = json!("50");
        body["quotes"][0]["tiers"] = json!([{"min_qty": 1, "unit_price": "80.00"}]);
        let id = str_of(&app.campaign(body).await["id"]);
        let (_, ana) = app.shopper("Ana", "pm_ok").await;
        let (_, bo) = app.shopper("Bo", "pm_ok").await;
        let (status, pledge) = app.pledge(&id, &ana, json!({"qty": 2, "variant": "S"})).await;
        assert_eq!((status, pledge["deposit_amount"].as_str()), (StatusCode::CREATED, Some("200.00")), "{pledge}");
        let pledge_id = str_of(&pledge["id"]);
        let (status, _) = app.pledge(&id, &bo, json!({"qty": 1, "variant": "L"})).await;
        assert_eq!(status, StatusCode::CREATED);

        // Ops cannot refund a deposit outside its pledge: the pledge's own refunds need it whole.
        let (status, body) = app.post_keyed(&format!("/api/v1/ops/payment-intents/pi_deposit_{pledge_id}/refund"),
            "goodwill", json!({"amount": "5.00", "memo": "goodwill"})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{body}");
        assert!(!app.gateway_totals().await.contains_key("refund"), "nothing refunded");
        // Another shopper neither sees nor cancels Ana's pledge.
        let path = format!("/api/v1/pledges/{pledge_id}");
        assert_eq!(app.get(&path, Some(&bo)).await.0, StatusCode::NOT_FOUND);
        assert_eq!(app.post(&format!("{path}/cancel"), Some(&bo), json!({})).await.0, StatusCode::NOT_FOUND);

        app.advance("2026-06-10T00:05:00Z").await;
        let (status, body) = app.post(&format!("{path}/cancel"), Some(&ana), json!({})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "no cancelling after the deadline: {body}");
        let (_, p) = app.get(&path, Some(&ana)).await;
        // Nothing is owed and the 40.00 over 2 × 80.00 comes back at close.
        assert_eq!((p["status"].as_str(), p["final_unit_price"].as_str(), p["balance_amount"].as_str(), p["refunded_amount"].as_str()),
            (Some("paid"), Some("80.00"), Some("0.00"), Some("40.00")), "{p}");
        let totals = app.gateway_totals().await;
        assert_eq!((totals["charge"], totals["refund"]), ((2, 30000), (2, 6000)), "{totals:?}");

        // The purchase order, issued when the balance window ends, is its manufacturer's and
        // ops' only.
        app.advance("2026-06-13T00:05:00Z").await;
        let (_, orders) = app.get("/api/v1/purchase-orders", Some(&factory_token)).await;
        let po = &orders["items"][0];
        let po_path = format!("/api/v1/purchase-orders/{}", str_of(&po["id"]));
        let (status, one) = app.get(&po_path, Some(&factory_token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&one, po);
        assert_eq!((one["campaign_id"].as_str(), one["qty"].as_i64(), one["unit_price"].as_str(), one["total"].as_str(), one["currency"].as_str()),
            (Some(id.as_str()), Some(3), Some("80.00"), Some("240.00"), Some("EUR")), "{one}");
        assert_eq!(one["lines"], json!([{"variant": "L", "qty": 1}, {"variant": "S", "qty": 2}]), "{one}");
        assert_eq!(app.get(&po_path, Some(&rival_token)).await.0, StatusCode::NOT_FOUND);
        assert_eq!(app.get(&format!("{po_path}.csv"), Some(&rival_token)).await.0, StatusCode::NOT_FOUND);
        assert_eq!(app.get(&po_path, Some(&ana)).await.0, StatusCode::FORBIDDEN, "a shopper: the wrong role");
        assert_eq!(app.get("/api/v1/purchase-orders/po_nope", Some(&ana)).await.0, StatusCode::FORBIDDEN, "whatever the id");
        let (_, theirs) = app.get("/api/v1/purchase-orders", Some(&rival_token)).await;
        assert_eq!(theirs["items"], json!([]), "{theirs}");
        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_bad_campaign_is_refused_field_by_field_and_nothing_is_created(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, factory_token) = app.manufacturer("Northwind").await;
        let good = jacket(&factory, "2026-06-02T00:00:00Z", "2026-06-10T00:00:00Z");
        let (status, _) = app.post("/api/v1/campaigns", Some(&factory_token), good.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "ops create campaigns");
        let mut bad = good.clone();
        for (field, value) in [
            ("title", json!("")), ("sku", json!("")),
            ("reference_price", json!("-1")), ("deposit_percent", json!("51")),
            ("closes_at", json!("2026-06-01T12:00:00Z")), ("time_zone", json!("Mars/Base")),
            ("balance_window_hours", json!(0)), ("variants", json!(["S", "S\u{7}"])),
        ] {
            bad[field] = value;
        }
        bad["quotes"][0]["tiers"] = json!([{"min_qty": 10, "unit_price": "5.00"}, {"min_qty": 20, "unit_price": "6.00"}]);
        let (status, problem) = app.post("/api/v1/campaigns", Some(ADMIN_TOKEN), bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        let fields: Vec<&str> = problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert_eq!(fields, ["title", "sku", "reference_price", "deposit_percent", "closes_at", "time_zone",
            "balance_window_hours", "variants[1]", "quotes[0].tiers"], "{problem}");
        let mut euro = good.clone();
        euro["currency"] = json!("EURO");
        let (status, problem) = app.post("/api/v1/campaigns", Some(ADMIN_TOKEN), euro).await;
        assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("currency")), "{problem}");
        let mut refundless = good.clone();
        refundless["deposit_refundable"] = json!(false);
        refundless["deposit_percent"] = json!("25");
        let (status, problem) = app.post("/api/v1/campaigns", Some(ADMIN_TOKEN), refundless).await;
        assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("deposit_percent")), "{problem}");
        // A campaign open at once with no quote to join under.
        let mut unquoted = good.clone();
        unquoted["opens_at"] = json!("2026-06-01T00:00:00Z");
        unquoted["quotes"] = json!([]);
        let (status, problem) = app.post("/api/v1/campaigns", Some(ADMIN_TOKEN), unquoted).await;
        assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("quotes")), "{problem}");
        let (_, list) = app.get("/api/v1/campaigns", None).await;
        assert_eq!(list["items"], json!([]), "{list}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_deadline_at_local_midnight_on_the_dst_change_is_exact(backend) {
        // New York leaves DST at 02:00 on 1 November; its midnight that day is 04:00 UTC.
        let app = TestApp::spawn_manual(backend, "2026-10-30T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let mut body = jacket(&factory, "2026-10-30T00:00:00Z", "2026-11-01T04:00:00Z");
        body["time_zone"] = json!("America/New_York");
        body["quotes"][0]["tiers"] = json!([{"min_qty": 1, "unit_price": "150.00"}]);
        let c = app.campaign(body).await;
        let id = str_of(&c["id"]);
        assert_eq!(c["closes_at_local"], "2026-11-01T00:00:00-04:00 EDT");
        let (_, token) = app.shopper("Owl", "pm_ok").await;
        app.advance("2026-11-01T03:59:59Z").await;
        let (status, body) = app.pledge(&id, &token, json!({"qty": 1, "variant": "S"})).await;
        assert_eq!(status, StatusCode::CREATED, "a second before midnight: {body}");
        let page = app.client.get(format!("{}/campaigns/{id}", app.base)).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        let html = page.text().await.unwrap();
        assert!(html.contains("Closes Sunday 1 November 2026, 00:00 EDT (America/New_York) — 0 hours 0 minutes left."), "{html}");
        assert!(html.contains("<svg") && html.contains("tier at 1 units") && html.contains("150.00 EUR"), "{html}");
        app.advance("2026-11-01T04:00:00Z").await;
        let (status, body) = app.pledge(&id, &token, json!({"qty": 1, "variant": "S"})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("campaign_not_open")), "midnight is late");
        let closes = app.runs_of("presale-close").await;
        assert!(closes.iter().any(|r| r["scheduled_for"] == "2026-11-01T04:00:00Z" && r["state"] == "succeeded"), "{closes:?}");
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["status"], "settling");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_stampede_of_joins_never_oversells(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
        body["quotes"][0]["capacity"] = json!(150);
        body["quotes"][0]["tiers"] = json!([{"min_qty": 100, "unit_price": "150.00"}]);
        let id = str_of(&app.campaign(body).await["id"]);
        let mut tokens = Vec::new();
        for i in 0..220 {
            tokens.push(app.shopper(&format!("Rush{i}"), "pm_ok").await.1);
        }
        let joins = tokens.into_iter().map(|token| {
            let (client, url) = (app.client.clone(), format!("{}/api/v1/campaigns/{id}/pledges", app.base));
            tokio::spawn(async move {
                let res = client.post(url).bearer_auth(token).json(&json!({"qty": 1, "variant": "M"})).send().await.unwrap();
                let status = res.status();
                (status, res.json::<Value>().await.unwrap())
            })
        }).collect::<Vec<_>>();
        let (mut accepted, mut sold_out) = (0, 0);
        for join in joins {
            let (status, body) = join.await.unwrap();
            match status {
                StatusCode::CREATED => accepted += 1,
                StatusCode::CONFLICT if body["code"] == "sold_out" => sold_out += 1,
                other => panic!("{other}: {body}"),
            }
        }
        assert_eq!((accepted, sold_out), (150, 70));
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!(c["pooled_qty"], 150);
        assert_eq!(app.gateway_totals().await["charge"], (150, 150 * 2000));
        app.stop().await;
    }
}

on_both_backends! {
    async fn the_window_ends_only_once_no_balance_is_still_being_charged(backend) {
        let app = TestApp::spawn_manual(backend, "2026-07-25T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let mut body = jacket(&factory, "2026-07-26T00:00:00Z", "2026-08-01T00:00:00Z");
        body["quotes"][0]["tiers"] = json!([{"min_qty": 1, "unit_price": "180.00"}]);
        let id = str_of(&app.campaign(body).await["id"]);
        app.advance("2026-07-26T00:00:00Z").await;
        let mut pledges = Vec::new();
        for name in ["Ana", "Bo"] {
            let (_, token) = app.shopper(name, "pm_ok").await;
            let (status, p) = app.pledge(&id, &token, json!({"qty": 2, "variant": "M"})).await;
            assert_eq!(status, StatusCode::CREATED, "{p}");
            pledges.push(str_of(&p["id"]));
        }
        app.advance("2026-08-01T00:05:00Z").await;
        let store = &app.state.store;
        assert!(!store.balance_pending(&id).await.unwrap(), "both balances are paid");
        // Bo's balance is still with the gateway, its retry planned after the window's end.
        let bo = &pledges[1];
        let stuck = [
            format!("UPDATE pledges SET status = 'awaiting_balance' WHERE id = '{bo}'"),
            format!("UPDATE payment_intents SET status = 'pending', next_attempt_at = 9000000000000000
                     WHERE id = 'pi_balance_{bo}'"),
        ];
        let stuck: Vec<&str> = stuck.iter().map(String::as_str).collect();
        raw_tx(&app.state.settings.database, &stuck).await.unwrap();
        assert!(store.balance_pending(&id).await.unwrap());
        app.advance("2026-08-04T00:00:00Z").await;
        let c = app.admin_get(&format!("/api/v1/campaigns/{id}")).await;
        assert_eq!(c["status"], "settling", "the window waits for Bo's answer: {c}");
        let (_, orders) = app.get("/api/v1/purchase-orders", Some(ADMIN_TOKEN)).await;
        assert_eq!(orders["items"], json!([]), "no purchase order yet");
    }
}

/// Five paid-for pledges of one unit each, as a join batch (no deposit to charge).
fn five_pledges(prefix: &str, campaign: &str, shopper: &str, now: i64) -> Vec<JoinAttempt> {
    (0..5)
        .map(|i| {
            let pledge = PledgeRow {
                seq: 0,
                id: format!("{prefix}_{i}"),
                campaign_id: campaign.into(),
                shopper_id: shopper.into(),
                qty: 1,
                variant: Some("M".into()),
                status: "active".into(),
                deposit_minor: 0,
                price_ceiling_minor: 18000,
                balance_minor: None,
                balance_paid_at: None,
                refunded_minor: 0,
                created_at: now,
                ended_at: None,
                updated_at: now,
            };
            JoinAttempt {
                claim: None,
                join: Some(NewPledge {
                    pledge,
                    deposit: None,
                    response: None,
                    confirmation: None,
                }),
            }
        })
        .collect()
}

on_both_backends! {
    async fn concurrent_join_batches_from_two_instances_never_oversell(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
        body["quotes"][0]["capacity"] = json!(150);
        let id = str_of(&app.campaign(body).await["id"]);
        let (shopper, _) = app.shopper("Rush", "pm_ok").await;
        // PostgreSQL: a second instance on the same database writes half the batches, so the
        // guard on the pooled quantity decides between them. SQLite allows one process.
        let other = match backend {
            crate::helpers::Backend::Postgres => Store::connect(&app.state.settings.database).await.unwrap(),
            crate::helpers::Backend::Sqlite => app.state.store.clone(),
        };
        let at = app.state.clock.now();
        let now = micros(at);
        let batches = (0..200).map(|b| {
            let store = if b % 2 == 0 { app.state.store.clone() } else { other.clone() };
            let (id, shopper) = (id.clone(), shopper.clone());
            tokio::spawn(async move {
                let joins = five_pledges(&format!("plg_{b}"), &id, &shopper, now);
                store.join_campaign(&id, &joins, at, abandon_claims_after()).await.unwrap()
            })
        }).collect::<Vec<_>>();
        let (mut accepted, mut sold_out) = (0, 0);
        for batch in batches {
            for answer in batch.await.unwrap().0 {
                match answer {
                    JoinDecision::Admitted => accepted += 1,
                    JoinDecision::Refused(JoinRefusal::SoldOut { .. }) => sold_out += 1,
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!((accepted, sold_out), (150, 850), "accepted = min(capacity, attempts)");
        assert_eq!(app.state.store.campaign(&id).await.unwrap().unwrap().pooled_qty, 150);
        assert_eq!(app.state.store.count_pledges(&id, "active").await.unwrap(), 150, "refused joins wrote nothing");

        // PostgreSQL, made deterministic: another writer takes 148 units after this batch read
        // the campaign and before its update. The guard sends the batch round again, and it
        // admits the 2 units left instead of overselling.
        if let pooled::config::DatabaseUrl::Postgres(url) = &app.state.settings.database {
            let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
            body["quotes"][0]["capacity"] = json!(150);
            let id = str_of(&app.campaign(body).await["id"]);
            let pg = sqlx::PgPool::connect(url).await.unwrap();
            let mut rival = pg.begin().await.unwrap();
            sqlx::query("UPDATE campaigns SET pooled_qty = pooled_qty + 148 WHERE id = $1")
                .bind(&id).execute(&mut *rival).await.unwrap();
            let store = app.state.store.clone();
            let joins = five_pledges("plg_late", &id, &shopper, now);
            let batch_id = id.clone();
            let batch = tokio::spawn(async move { store.join_campaign(&batch_id, &joins, at, abandon_claims_after()).await.unwrap() });
            // Wait until the batch's update is blocked on the rival's row lock.
            crate::helpers::until_a_lock_is_waited_on(&pg).await;
            rival.commit().await.unwrap();
            let (answers, _) = batch.await.unwrap();
            assert_eq!(answers.iter().filter(|a| **a == JoinDecision::Admitted).count(), 2, "{answers:?}");
            assert_eq!(app.state.store.campaign(&id).await.unwrap().unwrap().pooled_qty, 150);
            pg.close().await;
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_join_batch_hands_back_its_deposit_intents_exactly_as_stored(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let store = &app.state.store;
        let (factory, _) = app.manufacturer("Northwind").await;
        let id = str_of(&app.campaign(jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z")).await["id"]);
        let (shopper, _) = app.shopper("Ana", "pm_ok").await;
        let at = app.state.clock.now();
        let now = micros(at);
        let deposit = |i: usize, key: String| NewIntent {
            id: format!("pi_dep_{i}"),
            idempotency_key: key,
            kind: "charge",
            purpose: "deposit",
            subject_id: format!("plg_dep_{i}"),
            shopper_id: shopper.clone(),
            amount: Money::from_minor(1800 + i as i64, Currency::parse("EUR").unwrap()),
            account: Account::DepositsHeld,
            refund_of: None,
            memo: format!("deposit {i}"),
            first_sweep_at: now + 30_000_000,
        };
        // The last deposit's key is already taken by an earlier intent: it is not inserted,
        // so it is not handed back.
        store.create_intent(&deposit(9, "deposit:taken".into()), now).await.unwrap();
        let mut joins = five_pledges("plg_dep", &id, &shopper, now);
        for (i, attempt) in joins.iter_mut().enumerate() {
            let key = if i == 4 { "deposit:taken".to_owned() } else { format!("deposit:plg_dep_{i}") };
            attempt.join.as_mut().unwrap().deposit = Some(deposit(i, key));
        }
        let (answers, begun) = store.join_campaign(&id, &joins, at, abandon_claims_after()).await.unwrap();
        assert!(answers.iter().all(|a| *a == JoinDecision::Admitted), "{answers:?}");
        assert_eq!(begun.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["pi_dep_0", "pi_dep_1", "pi_dep_2", "pi_dep_3"]);
        for row in &begun {
            let stored = store.intent(&row.id).await.unwrap().unwrap();
            assert_eq!(row, &stored, "the row handed back is the row stored");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_join_claims_and_answers_its_idempotency_key_in_its_own_batch(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
        body["quotes"][0]["capacity"] = json!(3);
        body["quotes"][0]["tiers"] = json!([{"min_qty": 1, "unit_price": "180.00"}]);
        let id = str_of(&app.campaign(body).await["id"]);
        let path = format!("/api/v1/campaigns/{id}/pledges");
        let pooled = || async { app.admin_get(&format!("/api/v1/campaigns/{id}")).await["pooled_qty"].clone() };
        let join = |token: String, key: &'static str, body: Value| {
            let req = app.client.post(format!("{}{path}", app.base)).bearer_auth(token).header("Idempotency-Key", key).json(&body);
            async move {
                let res = req.send().await.unwrap();
                let replayed = res.headers().contains_key("idempotent-replayed");
                (res.status(), replayed, res.json::<Value>().await.unwrap())
            }
        };
        let (ana_id, ana) = app.shopper("Ana", "pm_ok").await;

        // The first answer, then the same answer again; another body under the key is refused.
        let (status, replayed, first) = join(ana.clone(), "j-1", json!({"qty": 2, "variant": "M"})).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false), "{first}");
        let (status, replayed, again) = join(ana.clone(), "j-1", json!({"qty": 2, "variant": "M"})).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(again, first, "the same pledge, answered again");
        let (status, _, other) = join(ana.clone(), "j-1", json!({"qty": 1, "variant": "M"})).await;
        assert_eq!((status, other["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused")));
        assert_eq!(pooled().await, 2, "neither the replay nor the reuse took units");

        // A refusal that may clear (sold out) is not remembered: once units are free again, the
        // same request under the same key runs afresh.
        let (status, replayed, sold_out) = join(ana.clone(), "j-2", json!({"qty": 2, "variant": "S"})).await;
        assert_eq!((status, replayed, sold_out["code"].as_str()), (StatusCode::CONFLICT, false, Some("sold_out")));
        let (status, _) = app.post(&format!("/api/v1/pledges/{}/cancel", str_of(&first["id"])), Some(&ana), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, replayed, second) = join(ana.clone(), "j-2", json!({"qty": 2, "variant": "S"})).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false), "{second}");

        // A request that fails the batch's checks leaves its key unused.
        let (status, _, bad) = join(ana.clone(), "j-3", json!({"qty": 1, "variant": "XXL"})).await;
        assert_eq!((status, bad["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("variant")));
        let (status, replayed, _) = join(ana.clone(), "j-3", json!({"qty": 1, "variant": "L"})).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        assert_eq!(pooled().await, 3);

        // A declined deposit's answer is remembered with the decline, and replayed.
        app.advance("2026-06-02T00:00:00Z").await;
        let (_, dee) = app.shopper("Dee", "pm_decline").await;
        let (status, _) = app.post(&format!("/api/v1/pledges/{}/cancel", str_of(&second["id"])), Some(&ana), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, declined) = join(dee.clone(), "j-4", json!({"qty": 1, "variant": "M"})).await;
        assert_eq!((status, declined["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("payment_declined")));
        let (status, replayed, again) = join(dee.clone(), "j-4", json!({"qty": 1, "variant": "M"})).await;
        assert_eq!((status, replayed), (StatusCode::PAYMENT_REQUIRED, true));
        assert_eq!(again, declined);
        assert_eq!(pooled().await, 1, "the declined pledge holds nothing");

        // A key still claimed by a running request: the join waits its turn (409), takes nothing.
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {ana}").parse().unwrap());
        let body = serde_json::to_vec(&json!({"qty": 1, "variant": "M"})).unwrap();
        let claim = IdempotencyClaim {
            scope: idempotency_scope(&headers),
            key: "j-5".into(),
            request_hash: request_hash(&axum::http::Method::POST, &path, &body),
        };
        let now = app.state.clock.now();
        let begun = app.state.store.idempotency_begin(&[claim], now, abandon_claims_after()).await.unwrap();
        assert_eq!(begun, vec![IdempotencyBegin::Run]);
        let res = app.client.post(format!("{}{path}", app.base)).bearer_auth(&ana)
            .header("Idempotency-Key", "j-5").header("content-type", "application/json").body(body.clone())
            .send().await.unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT);
        assert_eq!(res.json::<Value>().await.unwrap()["code"], "conflict");
        assert_eq!(pooled().await, 1);
        // Once the claim is abandoned (its request died), a retry takes it over and joins.
        app.advance("2026-06-02T00:06:00Z").await;
        let res = app.client.post(format!("{}{path}", app.base)).bearer_auth(&ana)
            .header("Idempotency-Key", "j-5").header("content-type", "application/json").body(body)
            .send().await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(pooled().await, 2);

        // In one batch, each request keeps its own answer: a replayed key answers with its first
        // response even where the request would now fail its checks (Noa has no payment
        // method), and the other request's failed check is its own (the variant), not the
        // first one's.
        let (status, noa) = app.post("/api/v1/shoppers", None, json!({"name": "Noa", "email": "noa@example.com"})).await;
        assert_eq!(status, StatusCode::CREATED, "{noa}");
        let request = |shopper: &str, key: &str, variant: &str| JoinRequest {
            campaign_id: id.clone(),
            shopper_id: shopper.to_owned(),
            qty: 1,
            variant: Some(variant.to_owned()),
            now: app.state.clock.now(),
            key: Some(JoinKey {
                claim: IdempotencyClaim { scope: "batch".into(), key: key.into(), request_hash: "same".into() },
                respond: |p, _| StoredResponse { status: 201, content_type: None, body: p.id.clone().into_bytes() },
                declined: |_| StoredResponse { status: 402, content_type: None, body: Vec::new() },
            }),
        };
        let (store, payments) = (&app.state.store, &app.state.payments);
        let first = join_settled(store, payments, vec![request(&ana_id, "k-6", "M")]).await;
        let Ok(Joined::Pledged(pledge, _)) = &first[0] else { panic!("{first:?}") };
        let noa = str_of(&noa["id"]);
        let answers = join_settled(store, payments, vec![request(&noa, "k-6", "M"), request(&noa, "k-7", "XXL")]).await;
        match &answers[..] {
            [Ok(Joined::Replayed(first)), Err(PresaleError::Invalid { field: "variant", .. })] => {
                assert_eq!((first.status, first.body.clone()), (201, pledge.id.clone().into_bytes()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(pooled().await, 3);
        assert_eq!(app.ledger_check().await["balanced"], true);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_join_with_nothing_to_pay_is_confirmed_with_its_pledge(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        // 1 % of 0.10 rounds to no deposit at all.
        let mut body = jacket(&factory, "2026-06-01T00:00:00Z", "2026-06-10T00:00:00Z");
        body["reference_price"] = json!("0.10");
        body["deposit_percent"] = json!("1");
        body["quotes"][0]["tiers"] = json!([{"min_qty": 1, "unit_price": "0.10"}]);
        let c = app.campaign(body).await;
        assert_eq!(c["deposit_per_unit"], "0.00", "{c}");
        let id = str_of(&c["id"]);
        let (_, token) = app.shopper("Ana", "pm_ok").await;
        let path = format!("{}/api/v1/campaigns/{id}/pledges", app.base);
        let join = || app.client.post(&path).bearer_auth(&token).header("Idempotency-Key", "free-1").json(&json!({"qty": 2, "variant": "S"})).send();
        let first = join().await.unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        let first: Value = first.json().await.unwrap();
        assert_eq!((first["status"].as_str(), first["deposit_amount"].as_str()), (Some("active"), Some("0.00")));
        // Its key's answer and its confirmation were written with the pledge; nothing was charged.
        let again = join().await.unwrap();
        assert_eq!((again.status(), again.headers().contains_key("idempotent-replayed")), (StatusCode::CREATED, true));
        assert_eq!(again.json::<Value>().await.unwrap(), first);
        let emails = app.state.store.outbox(Some("ana@example.com"), 50, None).await.unwrap();
        let confirmations = emails.iter().filter(|e| e.template == "pledge_confirmed" && e.entity == str_of(&first["id"])).count();
        assert_eq!(confirmations, 1);
        assert!(app.gateway_totals().await.is_empty(), "no money moved");
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["pooled_qty"], 2);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_flaky_deposit_is_retried_beside_the_join_queue(backend) {
        let (app, id) = jacket_on_sale(backend).await;
        let (flaky, _) = app.shopper("Fay", "pm_flaky").await;
        let (steady, _) = app.shopper("Sam", "pm_ok").await;
        let join = |shopper: &str| join_request(&id, shopper, 1, app.state.clock.now());
        let (store, payments) = (&app.state.store, &app.state.payments);
        // pm_flaky fails its first call. The batch answers the steady join at once and
        // leaves the flaky one to its retries, which the batch does not wait for: the one
        // join worker serves every campaign, and used to pause 100 ms and more with them.
        let mut answers = join_many(store, payments, vec![join(&flaky), join(&steady)]).await.into_iter();
        let (retrying, now) = (answers.next().unwrap(), answers.next().unwrap());
        let BatchAnswer::Now(Ok(Joined::Pledged(pledge, _))) = now else { panic!("{now:?}") };
        assert_eq!(pledge.status, "active");
        assert!(matches!(retrying, BatchAnswer::Retrying(_)), "{retrying:?}");
        // Its answer comes from the retry: the deposit taken on the second call, confirmed once.
        let Ok(Joined::Pledged(pledge, _)) = retrying.settled().await else { panic!("the retry answers the join") };
        assert_eq!(pledge.status, "active");
        let intent = store.intent(&format!("pi_deposit_{}", pledge.id)).await.unwrap().unwrap();
        assert_eq!((intent.status.as_str(), intent.attempts), ("succeeded", 2));
        let emails = store.outbox(Some("fay@example.com"), 50, None).await.unwrap();
        let confirmations = emails.iter().filter(|e| e.template == "pledge_confirmed" && e.entity == pledge.id).count();
        assert_eq!(confirmations, 1);
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["pooled_qty"], 2);
        assert_eq!(app.ledger_check().await["balanced"], true);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_deposit_charged_on_its_retry_but_not_recorded_is_settled_by_the_sweep_and_charged_once(backend) {
        let (app, id) = jacket_on_sale(backend).await;
        let (flaky, _) = app.shopper("Fay", "pm_flaky").await;
        let request = join_request(&id, &flaky, 3, app.state.clock.now());
        // The database refuses to record a deposit's success: pm_flaky fails its first call,
        // the quick retry charges the card, and its result can't be written.
        let url = &app.state.settings.database;
        let refuse: &[&str] = match url {
            DatabaseUrl::Sqlite(_) => &["CREATE TRIGGER refuse_results BEFORE UPDATE ON payment_intents \
                 WHEN NEW.status <> 'pending' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
            DatabaseUrl::Postgres(_) => &[
                "CREATE FUNCTION refuse_results() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                "CREATE TRIGGER refuse_results BEFORE UPDATE ON payment_intents FOR EACH ROW \
                 WHEN (NEW.status <> 'pending') EXECUTE FUNCTION refuse_results()",
            ],
        };
        raw_tx(url, refuse).await.unwrap();
        let (store, payments) = (&app.state.store, &app.state.payments);
        let answers = join_settled(store, payments, vec![request]).await;
        assert!(matches!(&answers[0], Err(PresaleError::Batch(_))), "{:?}", answers[0]);
        // The pledge stands, pending, and holds its units; the charge is at the gateway only.
        let pledges = app.admin_get(&format!("/api/v1/shoppers/{flaky}/pledges")).await;
        let pledge = &pledges["items"][0];
        assert_eq!((pledge["status"].as_str(), pledges["items"].as_array().unwrap().len()), (Some("pending"), 1));
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["pooled_qty"], 3);
        let intent = store.intent(&format!("pi_deposit_{}", str_of(&pledge["id"]))).await.unwrap().unwrap();
        assert_eq!((intent.status.as_str(), intent.attempts), ("pending", 2));
        assert_eq!(app.gateway_totals().await.get("charge").map(|t| t.0), Some(1));
        // Once the database takes writes again, the sweep sends it again under its key: the
        // gateway answers with the charge it made, so the card is charged once, not twice.
        let drop_it: &[&str] = match url {
            DatabaseUrl::Sqlite(_) => &["DROP TRIGGER refuse_results"],
            DatabaseUrl::Postgres(_) => &["DROP TRIGGER refuse_results ON payment_intents"],
        };
        raw_tx(url, drop_it).await.unwrap();
        let later = app.state.clock.now() + chrono::Duration::hours(2);
        assert_eq!(payments.sweep(later, false).await.unwrap(), 1);
        let pledge = app.admin_get(&format!("/api/v1/pledges/{}", str_of(&pledge["id"]))).await;
        assert_eq!(pledge["status"], "active", "{pledge}");
        assert_eq!(app.gateway_totals().await.get("charge"), Some(&(1, 3 * 2_000)));
        let emails = store.outbox(Some("fay@example.com"), 50, None).await.unwrap();
        assert_eq!(emails.iter().filter(|e| e.template == "pledge_confirmed").count(), 1);
        assert_eq!(app.ledger_check().await["balanced"], true);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_close_decided_on_a_pool_that_changed_since_is_not_applied(backend) {
        let (app, id) = jacket_on_sale(backend).await;
        let store = &app.state.store;
        let now = "2026-06-10T00:00:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp_micros();
        let pooled = app.admin_get(&format!("/api/v1/campaigns/{id}")).await["pooled_qty"].as_i64().unwrap();
        // A close that read the pool before a join (or a cancel) committed: not applied.
        assert!(!store.move_campaign(&id, &["open"], Some(pooled + 5), "failed", None, None, None, now).await.unwrap());
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["status"], "open");
        // Decided on the pool as it is: applied once.
        assert!(store.move_campaign(&id, &["open"], Some(pooled), "failed", None, None, None, now).await.unwrap());
        assert!(!store.move_campaign(&id, &["open"], Some(pooled), "failed", None, None, None, now).await.unwrap());
        assert_eq!(app.admin_get(&format!("/api/v1/campaigns/{id}")).await["status"], "failed");
        app.stop().await;
    }
}

on_both_backends! {
    async fn every_pledger_hears_once_of_each_price_step_the_pool_reaches(backend) {
        let (app, id) = jacket_on_sale(backend).await;
        let (_, ann) = app.shopper("Ann", "pm_ok").await;
        let (_, bob) = app.shopper("Bob", "pm_ok").await;
        let (status, body) = app.pledge(&id, &ann, json!({"qty": 60, "variant": "S"})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        app.advance("2026-06-01T02:00:00Z").await;
        let told = |who: &'static str| {
            let app = &app;
            async move {
                let outbox = app.admin_get(&format!("/api/v1/ops/outbox?to={who}@example.com&limit=100")).await;
                outbox["items"].as_array().unwrap().iter()
                    .filter(|e| e["template"] == "tier_unlocked").map(|e| str_of(&e["subject"])).collect::<Vec<_>>()
            }
        };
        assert!(told("ann").await.is_empty(), "below the minimum, nothing is unlocked");
        // Bob's 40 reach the minimum of 100 (180.00); both hear it within the hour, once.
        let (status, body) = app.pledge(&id, &bob, json!({"qty": 40, "variant": "M"})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        app.advance("2026-06-01T05:00:00Z").await;
        for who in ["ann", "bob"] {
            assert_eq!(told(who).await, ["[pooled] Down jacket, winter 2026 unlocked 180.00 EUR per unit"], "{who}");
        }
        // 400 more reach the next step (160.00): one more email each, never the first again.
        let (status, body) = app.pledge(&id, &bob, json!({"qty": 400, "variant": "L"})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        app.advance("2026-06-01T08:00:00Z").await;
        let mut ann_told = told("ann").await;
        ann_told.sort();
        assert_eq!(ann_told, ["[pooled] Down jacket, winter 2026 unlocked 160.00 EUR per unit", "[pooled] Down jacket, winter 2026 unlocked 180.00 EUR per unit"]);
        assert_eq!(told("bob").await.len(), 3, "one per pledge of his and step reached");
        app.stop().await;
    }
}
