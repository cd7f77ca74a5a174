//! Subscriptions end to end over HTTP with the manual clock, on both backends: eight weeks of
//! a Berlin fruit box across the October DST change, dunning to suspension, a card that
//! recovers, grower orders on their order-by dates, and flowers in bloom every day.

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, str_of};
use crate::on_both_backends;
use chrono::{Duration, NaiveDate};
use pooled::config::DatabaseUrl;
use pooled::store::{DeliveryRow, RunFilter};
use pooled::subscriptions::{GROWER_ORDERS_JOB, RENEW_JOB};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// A manual clock in the shop zone Europe/Berlin.
async fn app_at(backend: Backend, start: &str) -> TestApp {
    app_in(backend, start, "Europe/Berlin").await
}

/// [`app_at`] for a shop in `zone`.
async fn app_in(backend: Backend, start: &str, zone: &str) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.clock = pooled::config::ClockMode::Manual;
        s.clock_start = Some(start.parse().unwrap());
        s.time_zone = zone.parse().unwrap();
    })
    .await
}

impl TestApp {
    pub async fn plan(&self, body: Value) -> String {
        let (status, p) = self.post("/api/v1/plans", Some(ADMIN_TOKEN), body).await;
        assert_eq!(status, StatusCode::CREATED, "{p}");
        str_of(&p["id"])
    }

    /// Subscribes the shopper of `token` to `plan` on `weekday` from `start`; the new id.
    pub async fn subscribe(&self, plan: &str, token: &str, weekday: &str, start: &str) -> String {
        let body = json!({"plan_id": plan, "delivery_weekday": weekday, "start_date": start});
        let (status, sub) = self.post("/api/v1/subscriptions", Some(token), body).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        str_of(&sub["id"])
    }

    pub async fn items_of(&self, path: &str, token: &str) -> Vec<Value> {
        let (status, body) = self.get(path, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Every item of a list walked `limit` at a time, and how many pages it took.
    pub async fn walk_pages(
        &self,
        path: &str,
        token: Option<&str>,
        limit: usize,
    ) -> (Vec<Value>, usize) {
        let (mut items, mut pages, mut after) = (Vec::new(), 0, String::new());
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let (status, body) = self
                .get(&format!("{path}{sep}limit={limit}{after}"), token)
                .await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            let page = body["items"].as_array().unwrap();
            assert!(page.len() <= limit);
            items.extend(page.iter().cloned());
            pages += 1;
            match body["next"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => return (items, pages),
            }
        }
    }
}

fn fruit_plan(price: &str, portions: i64) -> Value {
    json!({"name": "Weekly fruit", "kind": "fruit", "currency": "EUR", "price_per_delivery": price,
           "cadence_weeks": 1, "portions_per_day": portions, "cutoff_hours": 48,
           "delivery_weekdays": ["thu"], "time_zone": "Europe/Berlin"})
}

/// Every day from the delivery until the next has at least `need` surely-ready portions.
fn assert_covered(delivery: &Value, days: i64, need: i64) {
    let date: NaiveDate = str_of(&delivery["date"]).parse().unwrap();
    let lines = delivery["lines"].as_array().unwrap();
    assert!(!lines.is_empty(), "{delivery}");
    for d in 0..days {
        let day = date + Duration::days(d);
        let ready: i64 = lines
            .iter()
            .filter(|l| {
                str_of(&l["ready_from"]).parse::<NaiveDate>().unwrap() <= day
                    && day <= str_of(&l["ready_until"]).parse::<NaiveDate>().unwrap()
            })
            .map(|l| l["qty"].as_i64().unwrap())
            .sum();
        assert!(ready >= need, "{day}: {ready} ready in {delivery}");
    }
}

on_both_backends! {
    async fn a_delivery_past_its_cutoff_at_signup_is_never_added_or_billed(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let subscribe = |token: String, start: &'static str| {
            let app = &app;
            let plan = plan.clone();
            async move {
                let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
                    "plan_id": plan, "delivery_weekday": "thu", "start_date": start})).await;
                assert_eq!(status, StatusCode::CREATED, "{sub}");
                (str_of(&sub["id"]), token)
            }
        };
        // Ana's box for Thursday 1 October is planned in time (its cutoff: 29 Sep 22:00 UTC).
        let (_, ana) = app.shopper("Ana", "pm_ok").await;
        let (ana_sub, ana) = subscribe(ana, "2026-10-01").await;
        // Bo signs up after that cutoff, for the same plan and weekday: the box is there,
        // but his first delivery is the 8th, and the renewal runs do not add the 1st.
        app.advance("2026-09-30T00:00:00Z").await;
        let (_, bo) = app.shopper("Bo", "pm_ok").await;
        let (bo_sub, bo) = subscribe(bo, "2026-09-30").await;
        // His welcome names the first box he gets, not the Thursday his start date falls before.
        let emails = app.state.store.outbox(Some("bo@example.com"), 10, None).await.unwrap();
        let welcome = emails.iter().find(|e| e.template == "subscription_confirmed").expect("a welcome");
        assert!(welcome.text_body.contains("Your first box arrives on 2026-10-08,"), "{}", welcome.text_body);
        app.advance("2026-10-02T00:00:00Z").await;
        let dates = |items: Vec<Value>| items.iter().map(|d| str_of(&d["date"])).collect::<Vec<_>>();
        let bo_dates = dates(app.items_of(&format!("/api/v1/subscriptions/{bo_sub}/deliveries"), &bo).await);
        assert_eq!(bo_dates.first().map(String::as_str), Some("2026-10-08"), "{bo_dates:?}");
        assert_eq!(app.items_of(&format!("/api/v1/subscriptions/{bo_sub}/invoices"), &bo).await, Vec::<Value>::new());
        let ana_invoices = app.items_of(&format!("/api/v1/subscriptions/{ana_sub}/invoices"), &ana).await;
        assert_eq!(dates(ana_invoices.iter().map(|i| json!({"date": i["delivery_date"]})).collect()), ["2026-10-01"]);
        app.stop().await;
    }
}

on_both_backends! {
    async fn eight_weeks_of_fruit_across_the_dst_change(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (status, catalog) = app.get("/api/v1/catalog", None).await;
        assert_eq!(status, StatusCode::OK);
        let catalog = catalog["items"].as_array().unwrap();
        assert!(catalog.len() >= 30, "seeded from the shipped catalog");
        let (walked, pages) = app.walk_pages("/api/v1/catalog", None, 10).await;
        assert_eq!((&walked, pages), (catalog, catalog.len().div_ceil(10)), "pages of 10 tile the catalog");
        for bad in ["limit=0", "limit=501"] {
            assert_eq!(app.get(&format!("/api/v1/catalog?{bad}"), None).await.0, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let (shopper, token) = app.shopper("Lena", "pm_ok").await;
        let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-01", "exclusions": ["kiwifruit"]})).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        assert_eq!(sub["next_delivery_date"], "2026-10-01");
        let id = str_of(&sub["id"]);
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/skip"), Some(&token), json!({"date": "2026-10-15"})).await;
        assert_eq!(status, StatusCode::OK);

        for week in ["2026-10-05", "2026-10-12", "2026-10-20"] {
            app.advance(&format!("{week}T00:00:00Z")).await;
        }
        // Too late to skip the 22nd (its cutoff was 19 Oct 22:00 UTC, 48 h before the day in CEST).
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/skip"), Some(&token), json!({"date": "2026-10-22"})).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("delivery_locked")), "{body}");
        app.advance("2026-10-23T00:00:00Z").await;
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({"until": "2026-11-05"})).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("paused")), "{body}");
        for day in ["2026-10-30", "2026-11-06", "2026-11-13", "2026-11-20"] {
            app.advance(&format!("{day}T00:00:00Z")).await;
        }
        let sub_now = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        let (walked, _) = app.walk_pages(&format!("/api/v1/subscriptions/{id}/deliveries"), Some(&token), 3).await;
        assert_eq!(walked, sub_now, "pages of 3 tile the deliveries");
        for bad in ["after=-2", "after=x"] {
            let (status, problem) = app.get(&format!("/api/v1/subscriptions/{id}/deliveries?{bad}"), Some(&token)).await;
            assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("after")), "{bad}: {problem}");
        }
        let by_date = |date: &str| sub_now.iter().find(|d| d["date"] == date).cloned().unwrap_or_else(|| panic!("no {date}"));
        assert_eq!(by_date("2026-10-15")["status"], "skipped");
        assert_eq!(by_date("2026-10-29")["skip_reason"], "paused");
        // Cutoffs follow Berlin time: CEST before 25 Oct, CET after.
        assert_eq!(by_date("2026-10-22")["cutoff_at"], "2026-10-19T22:00:00Z");
        assert_eq!(by_date("2026-10-29")["cutoff_at"], "2026-10-26T23:00:00Z");
        let billed = ["2026-10-01", "2026-10-08", "2026-10-22", "2026-11-05", "2026-11-12", "2026-11-19"];
        for date in billed {
            let d = by_date(date);
            assert_eq!(d["status"], "dispatched", "paid, and out of the warehouse: {d}");
            assert_eq!(d["amount"], "24.90");
            assert_covered(&d, 7, 2);
            assert!(d["lines"].as_array().unwrap().iter().all(|l| l["sku"] != "kiwifruit"), "{d}");
        }
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
        let dates: Vec<String> = invoices.iter().map(|i| str_of(&i["delivery_date"])).collect();
        assert_eq!(dates, billed, "one invoice per delivered week; the skipped and paused weeks unbilled");
        assert!(invoices.iter().all(|i| i["status"] == "paid"));
        let totals = app.gateway_totals().await;
        assert_eq!(totals["charge"], (6, 6 * 2490));
        let check = app.ledger_check().await;
        assert_eq!((check["balanced"].as_bool(), check["gateway_matches"].as_bool()), (Some(true), Some(true)), "{check}");
        assert_eq!(app.account_balance("subscription_revenue").await, "-149.40");

        let ics = app.client.get(format!("{}/api/v1/subscriptions/{id}/calendar.ics", app.base))
            .bearer_auth(&token).send().await.unwrap().text().await.unwrap();
        assert!(ics.starts_with("BEGIN:VCALENDAR\r\nVERSION:2.0\r\n") && ics.ends_with("END:VCALENDAR\r\n"), "{ics}");
        assert!(ics.contains("BEGIN:VEVENT\r\n") && ics.contains("DTSTART;VALUE=DATE:20261001"), "{ics}");
        let outbox = app.admin_get("/api/v1/ops/outbox?to=lena@example.com&limit=100").await;
        assert_eq!(outbox["items"].as_array().unwrap().iter().filter(|e| e["template"] == "box_planned").count(), 6);
        assert!(outbox["items"].as_array().unwrap().iter().any(|e| e["template"] == "subscription_confirmed"));
        // Privacy: someone else's subscription is not found.
        let (_, other) = app.shopper("Max", "pm_ok").await;
        let (status, _) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&other)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let _ = shopper;
        app.stop().await;
    }
}

/// Subscribes a shopper in New York whose card is declined from the first renewal on.
async fn declined_subscriber(app: &TestApp, name: &str) -> (String, String) {
    let plan = app.plan(fruit_plan("19.00", 1)).await;
    let email = format!("{}@example.com", name.to_lowercase());
    let body = json!({"name": name, "email": email, "payment_token": "pm_ok", "time_zone": "America/New_York"});
    let (status, shopper) = app.post("/api/v1/shoppers", None, body).await;
    assert_eq!(status, StatusCode::CREATED, "{shopper}");
    let token = str_of(&shopper["token"]);
    let (status, sub) = app
        .post(
            "/api/v1/subscriptions",
            Some(&token),
            json!({
        "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    let id = str_of(&sub["id"]);
    let (status, _) = app
        .call(
            Method::PUT,
            &format!("/api/v1/subscriptions/{id}/payment-method"),
            Some(&token),
            Some(json!({"payment_token": "pm_decline"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    (id, token)
}

on_both_backends! {
    async fn a_declined_card_walks_through_dunning_to_suspension(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = declined_subscriber(&app, "Dora").await;
        // The first cutoff: 8 Oct starts 7 Oct 22:00 UTC; 48 h before is 5 Oct 22:00 UTC.
        app.advance("2026-10-05T22:00:00Z").await;
        let inv = &app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("past_due"), Some(1)), "{inv}");
        assert_eq!(inv["next_attempt_at"], "2026-10-06T22:00:00Z");
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(sub["status"], "past_due");
        let held = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert_eq!(held[0]["status"], "payment_failed", "the box is held");
        // The email says when the card is tried again on Dora's own clock.
        let emails = app.state.store.outbox(Some("dora@example.com"), 10, None).await.unwrap();
        let failed = emails.iter().find(|e| e.template == "payment_failed").expect("a payment_failed email");
        assert!(failed.text_body.contains("we will try again on 2026-10-06 18:00 EDT (2026-10-06 22:00 UTC)."), "{}", failed.text_body);
        // Retries at +1 d and +3 d fail; the last step is +5 d after the first failure.
        app.advance("2026-10-09T00:00:00Z").await;
        let inv = &app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await[0];
        assert_eq!((inv["attempts"].as_i64(), inv["next_attempt_at"].as_str()), (Some(3), Some("2026-10-10T22:00:00Z")), "{inv}");
        app.advance("2026-10-11T00:00:00Z").await;
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
        assert_eq!((invoices[0]["status"].as_str(), invoices[0]["attempts"].as_i64()), (Some("uncollectible"), Some(4)), "{invoices:?}");
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(sub["status"], "suspended");
        // The unpaid box stays held (read from its invoice); the ones after it are skipped.
        let held = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert_eq!(held[0]["status"], "payment_failed", "{held:?}");
        assert!(held.len() > 1 && held[1..].iter().all(|d| d["status"] == "skipped"), "{held:?}");
        // Nothing after suspension is billed.
        app.advance("2026-10-24T00:00:00Z").await;
        assert_eq!(app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await.len(), 1);
        let outbox = app.admin_get("/api/v1/ops/outbox?to=dora@example.com&limit=100").await;
        let templates: Vec<String> = outbox["items"].as_array().unwrap().iter().map(|e| str_of(&e["template"])).collect();
        assert_eq!(templates.iter().filter(|t| *t == "payment_failed").count(), 3, "{templates:?}");
        assert_eq!(templates.iter().filter(|t| *t == "subscription_suspended").count(), 1);
        assert!(!app.gateway_totals().await.contains_key("charge"), "nothing charged");
        app.stop().await;
    }
}

on_both_backends! {
    async fn suspension_stops_all_dunning_and_a_resume_after_a_card_update_starts_again(backend) {
        // A last step ten days after the first failure: the next week's invoice is in its own
        // dunning when the first one suspends the subscription.
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some("2026-09-28T00:00:00Z".parse().unwrap());
            s.time_zone = "Europe/Berlin".parse().unwrap();
            s.dunning_days = vec![1, 3, 10];
        })
        .await;
        let subscribers = [declined_subscriber(&app, "Uma").await, declined_subscriber(&app, "Udo").await];
        app.advance("2026-10-16T00:00:00Z").await;
        for ((id, token), who) in subscribers.iter().zip(["uma", "udo"]) {
            let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), token).await;
            let states: Vec<(String, String)> = invoices.iter().map(|i| (str_of(&i["delivery_date"]), str_of(&i["status"]))).collect();
            assert_eq!(states, [("2026-10-08".to_owned(), "uncollectible".to_owned()), ("2026-10-15".to_owned(), "uncollectible".to_owned())], "both given up at once: {invoices:?}");
            assert!(invoices.iter().all(|i| i["next_attempt_at"].is_null()), "{invoices:?}");
            let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(token)).await;
            assert_eq!(sub["status"], "suspended");
            // The second invoice's last step passes: no retry, no second suspension email.
            app.advance("2026-10-23T00:00:00Z").await;
            let attempts: Vec<i64> = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), token).await
                .iter().map(|i| i["attempts"].as_i64().unwrap()).collect();
            assert_eq!(attempts.len(), 2);
            assert!(attempts[1] < 4, "not retried after the suspension: {attempts:?}");
            let templates = templates_to(&app, &format!("{who}@example.com")).await;
            assert_eq!(templates.iter().filter(|t| *t == "subscription_suspended").count(), 1, "{templates:?}");
        }

        // Uma updates her card and resumes: the deliveries ahead come back and the next
        // cutoff charges the new card; the given-up invoices stay given up.
        let (uma, uma_token) = &subscribers[0];
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{uma}/cancel"), Some("not-a-token"), json!({})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = app.call(Method::PUT, &format!("/api/v1/subscriptions/{uma}/payment-method"), Some(uma_token),
            Some(json!({"payment_token": "pm_ok"}))).await;
        assert_eq!(status, StatusCode::OK);
        // While suspended she skips 5 and 12 November (a week kept ahead, one beyond): the
        // resume brings back the weeks that suspension held, not the ones she skipped.
        for date in ["2026-11-05", "2026-11-12"] {
            let (status, body) = app.post(&format!("/api/v1/subscriptions/{uma}/skip"), Some(uma_token), json!({"date": date})).await;
            assert_eq!(status, StatusCode::OK, "{date}: {body}");
        }
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{uma}/skip"), Some(uma_token), json!({"date": "+262142-12-31"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a date at chrono's end is refused, not a panic: {body}");
        let (status, sub) = app.post(&format!("/api/v1/subscriptions/{uma}/resume"), Some(uma_token), json!({})).await;
        assert_eq!((status, sub["status"].as_str(), sub["next_delivery_date"].as_str()), (StatusCode::OK, Some("active"), Some("2026-10-29")), "{sub}");
        let (status, again) = app.post(&format!("/api/v1/subscriptions/{uma}/resume"), Some(uma_token), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{again}");
        app.advance("2026-10-27T00:00:00Z").await;
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{uma}/invoices"), uma_token).await;
        let states: Vec<(String, String)> = invoices.iter().map(|i| (str_of(&i["delivery_date"]), str_of(&i["status"]))).collect();
        assert_eq!(states[2..], [("2026-10-29".to_owned(), "paid".to_owned())], "{invoices:?}");
        assert_eq!(states[..2].iter().filter(|(_, s)| s == "uncollectible").count(), 2, "{invoices:?}");
        let weeks = app.items_of(&format!("/api/v1/subscriptions/{uma}/deliveries"), uma_token).await;
        let oct29 = weeks.iter().find(|d| d["date"] == "2026-10-29").expect("29 October");
        assert!(!oct29["lines"].as_array().unwrap().is_empty(), "boxed: {oct29}");

        // Udo cancels while suspended: no longer refused; nothing more is billed or told.
        let (udo, udo_token) = &subscribers[1];
        let (status, sub) = app.post(&format!("/api/v1/subscriptions/{udo}/cancel"), Some(udo_token), json!({})).await;
        assert_eq!((status, sub["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{sub}");
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{udo}/resume"), Some(udo_token), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT);
        app.advance("2026-11-10T00:00:00Z").await;
        assert_eq!(app.items_of(&format!("/api/v1/subscriptions/{udo}/invoices"), udo_token).await.len(), 2);
        let weeks = app.items_of(&format!("/api/v1/subscriptions/{udo}/deliveries"), udo_token).await;
        assert!(weeks.iter().filter(|d| d["date"].as_str() > Some("2026-10-15")).all(|d| d["status"] == "skipped"), "{weeks:?}");
        // Uma's weeks skipped while suspended stay skipped.
        app.advance("2026-11-18T12:00:00Z").await;
        let weeks = app.items_of(&format!("/api/v1/subscriptions/{uma}/deliveries"), uma_token).await;
        for date in ["2026-11-05", "2026-11-12"] {
            let week = weeks.iter().find(|d| d["date"] == date).expect("the skipped week");
            assert_eq!(week["status"], "skipped", "{week}");
        }
        let billed: Vec<String> = app.items_of(&format!("/api/v1/subscriptions/{uma}/invoices"), uma_token).await
            .iter().map(|i| str_of(&i["delivery_date"])).collect();
        assert!(!billed.iter().any(|d| d == "2026-11-05" || d == "2026-11-12"), "skips never bill: {billed:?}");
        assert!(billed.iter().any(|d| d == "2026-11-19"), "the week after is billed: {billed:?}");
        app.stop().await;
    }
}

/// The emails sent to `to`, by template.
async fn templates_to(app: &TestApp, to: &str) -> Vec<String> {
    let outbox = app
        .admin_get(&format!("/api/v1/ops/outbox?to={to}&limit=100"))
        .await;
    outbox["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| str_of(&e["template"]))
        .collect()
}

on_both_backends! {
    async fn cancelling_voids_a_box_held_for_payment_and_stops_dunning(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = declined_subscriber(&app, "Vera").await;
        app.advance("2026-10-05T22:00:00Z").await;
        let invoices = format!("/api/v1/subscriptions/{id}/invoices");
        let inv = &app.items_of(&invoices, &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("past_due"), Some(1)), "{inv}");

        let (status, sub) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
        assert_eq!((status, sub["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{sub}");
        let inv = &app.items_of(&invoices, &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["next_attempt_at"].as_str()), (Some("void"), None), "{inv}");
        let boxes = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert_eq!((boxes[0]["status"].as_str(), boxes[0]["amount"].as_str()), (Some("skipped"), None), "the held box is not sent, nor owed: {boxes:?}");
        assert!(boxes.iter().all(|d| d["status"] == "skipped"), "{boxes:?}");

        // Every dunning step passes with nothing retried, no suspension, nothing charged.
        app.advance("2026-10-14T00:00:00Z").await;
        let inv = &app.items_of(&invoices, &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("void"), Some(1)), "{inv}");
        let templates = templates_to(&app, "vera@example.com").await;
        assert_eq!(templates.iter().filter(|t| *t == "invoice_voided").count(), 1, "{templates:?}");
        assert_eq!(templates.iter().filter(|t| *t == "payment_failed").count(), 1, "{templates:?}");
        assert!(!templates.iter().any(|t| t == "subscription_suspended"), "{templates:?}");
        assert!(!app.gateway_totals().await.contains_key("charge"), "nothing charged");
        // A second cancel is refused and changes nothing.
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(templates_to(&app, "vera@example.com").await.len(), templates.len());
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_held_box_whose_charge_is_out_is_voided_after_its_answer(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = declined_subscriber(&app, "Wim").await;
        app.advance("2026-10-05T22:00:00Z").await;
        // The charge is out at the gateway again (pending) when the shopper cancels: its
        // answer could still be a payment, so the invoice is not voided yet.
        crate::helpers::raw_tx(&app.state.settings.database, &[
            "UPDATE payment_intents SET status = 'pending', next_attempt_at = 0 WHERE purpose = 'renewal'",
        ]).await.unwrap();
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let invoices = format!("/api/v1/subscriptions/{id}/invoices");
        assert_eq!(app.items_of(&invoices, &token).await[0]["status"], "past_due");
        // The payment sweep sends it, the card declines, and the next dunning run voids it
        // instead of planning a retry.
        app.advance("2026-10-06T01:00:00Z").await;
        let inv = &app.items_of(&invoices, &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("void"), Some(2)), "{inv}");
        app.advance("2026-10-14T00:00:00Z").await;
        assert_eq!(app.items_of(&invoices, &token).await[0]["attempts"], 2, "never retried after");
        let templates = templates_to(&app, "wim@example.com").await;
        assert_eq!(templates.iter().filter(|t| *t == "invoice_voided").count(), 1, "{templates:?}");
        assert!(!templates.iter().any(|t| t == "subscription_suspended"), "{templates:?}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_held_box_whose_charge_is_out_at_cancel_and_then_pays_is_sent(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = declined_subscriber(&app, "Xia").await;
        app.advance("2026-10-05T22:00:00Z").await;
        // A new card, and the charge out at the gateway again when the shopper cancels.
        let (status, _) = app.call(Method::PUT, &format!("/api/v1/subscriptions/{id}/payment-method"),
            Some(&token), Some(json!({"payment_token": "pm_ok"}))).await;
        assert_eq!(status, StatusCode::OK);
        crate::helpers::raw_tx(&app.state.settings.database, &[
            "UPDATE payment_intents SET status = 'pending', next_attempt_at = 0 WHERE purpose = 'renewal'",
        ]).await.unwrap();
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        // It pays: the box was bought, so it goes out, and nothing is voided.
        app.advance("2026-10-08T00:00:00Z").await;
        let inv = &app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await[0];
        assert_eq!(inv["status"], "paid", "{inv}");
        let boxes = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert_eq!((boxes[0]["status"].as_str(), boxes[0]["amount"].as_str()), (Some("dispatched"), Some("19.00")), "{boxes:?}");
        assert!(!templates_to(&app, "xia@example.com").await.iter().any(|t| t == "invoice_voided"));
        assert_eq!(app.gateway_totals().await["charge"], (1, 1900));
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_subscription_cancelled_as_dunning_gives_up_is_voided_not_suspended(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = declined_subscriber(&app, "Yusuf").await;
        app.advance("2026-10-05T22:00:00Z").await;
        let store = &app.state.store;
        let inv = store.invoices_of(&id).await.unwrap().remove(0);
        let sub = store.subscription(&id).await.unwrap().unwrap();
        let plan = store.plan(&sub.plan_id).await.unwrap().unwrap();
        let email = pooled::subscriptions::emails::suspended(&plan, &inv, "yusuf@example.com", "Yusuf");
        // The cancel commits between the last dunning step's decision and its write.
        crate::helpers::raw_tx(&app.state.settings.database, &[
            &format!("UPDATE subscriptions SET status = 'cancelled' WHERE id = '{id}'"),
        ]).await.unwrap();
        let now = app.state.clock.now().timestamp_micros();
        assert!(!store.suspend_for_nonpayment(&inv, &email, now).await.unwrap(), "a cancelled subscription is not suspended");
        assert_eq!(store.invoices_of(&id).await.unwrap()[0].status, "past_due");
        assert_eq!(store.subscription(&id).await.unwrap().unwrap().status, "cancelled");
        // The dunning run its planned retry wakes voids it instead of charging.
        app.advance("2026-10-06T22:30:00Z").await;
        let inv = &app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("void"), Some(1)), "{inv}");
        let templates = templates_to(&app, "yusuf@example.com").await;
        assert!(templates.contains(&"invoice_voided".to_owned()) && !templates.contains(&"subscription_suspended".to_owned()), "{templates:?}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_void_and_a_dunning_retry_at_once_never_both_win(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let mut subs = Vec::new();
        for n in 0..12 {
            subs.push(declined_subscriber(&app, &format!("Racer{n}")).await.0);
        }
        app.advance("2026-10-05T22:00:00Z").await;
        // Every invoice past due with its retry due now, every subscription cancelled (as if
        // the cancel's own void had not run yet).
        crate::helpers::raw_tx(&app.state.settings.database, &[
            "UPDATE subscriptions SET status = 'cancelled'",
            "UPDATE invoices SET next_attempt_at = 0",
        ]).await.unwrap();
        let store = &app.state.store;
        let now = app.state.clock.now().timestamp_micros();
        for id in &subs {
            let inv = store.invoices_of(id).await.unwrap().remove(0);
            assert_eq!(inv.status, "past_due");
            let sub = store.subscription(id).await.unwrap().unwrap();
            let plan = store.plan(&sub.plan_id).await.unwrap().unwrap();
            let email = pooled::subscriptions::emails::invoice_voided(&plan, &inv, "racer@example.com", "Racer");
            let intent = format!("pi_renewal_{}", inv.id);
            let (voided, begun) = tokio::join!(
                store.void_invoice(&inv.id, &email, now),
                store.begin_dunning_retry(&inv.id, &intent, now),
            );
            let (voided, begun) = (voided.unwrap(), begun.unwrap());
            assert_ne!(voided, begun == Some(true), "exactly one wins: void {voided}, retry {begun:?}");
            let status = &store.invoices_of(id).await.unwrap()[0].status;
            let pending = store.intent(&intent).await.unwrap().unwrap().status == "pending";
            assert_eq!((status.as_str(), pending), if voided { ("void", false) } else { ("past_due", true) });
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_renewal_the_gateway_failed_is_retried_by_dunning(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = declined_subscriber(&app, "Fenna").await;
        app.advance("2026-10-05T22:00:00Z").await;
        // The gateway failed the charge (refused the call, or kept failing it) rather than
        // declining the card: the invoice is past due all the same.
        crate::helpers::raw_tx(&app.state.settings.database, &[
            "UPDATE payment_intents SET status = 'failed', last_error = 'gateway refused the call'
             WHERE purpose = 'renewal'",
        ]).await.unwrap();
        let (status, _) = app.call(Method::PUT, &format!("/api/v1/subscriptions/{id}/payment-method"),
            Some(&token), Some(json!({"payment_token": "pm_ok"}))).await;
        assert_eq!(status, StatusCode::OK);
        // The first dunning step (+1 d) charges it again, with the card now on file.
        app.advance("2026-10-07T00:00:00Z").await;
        let inv = &app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("paid"), Some(2)), "{inv}");
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(sub["status"], "active");
        assert_eq!(app.gateway_totals().await["charge"].0, 1);
        app.stop().await;
    }
}

on_both_backends! {
    async fn ops_put_catalog_items_and_bad_ones_change_nothing(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let item = json!({"name": "Pawpaw", "kind": "fruit", "ripening_days_min": 2, "ripening_days_max": 4,
            "ready_window_days": 2, "unit_cost": "1.35", "currency": "EUR", "available_months": [10, 9, 9],
            "lead_time_days": 3, "grower": "Ohio Orchards", "grower_email": "orders@ohio.example",
            "ethylene_producer": "high", "ethylene_sensitive": true});
        let put = |body: Value, token: Option<&'static str>| {
            let app = &app;
            async move { app.call(Method::PUT, "/api/v1/catalog/pawpaw", token, Some(body)).await }
        };
        let catalog = || async { app.get("/api/v1/catalog", None).await.1["items"].as_array().unwrap().clone() };
        let before = catalog().await;
        assert_eq!(put(item.clone(), None).await.0, StatusCode::UNAUTHORIZED);
        let (_, token) = app.shopper("Otto", "pm_ok").await;
        let shopper = app.call(Method::PUT, "/api/v1/catalog/pawpaw", Some(&token), Some(item.clone())).await;
        assert_eq!(shopper.0, StatusCode::FORBIDDEN, "{}", shopper.1);
        for (field, value) in [
            ("ethylene_producer", json!("hihg")),
            ("unit_cost", json!("0.00")),
            ("unit_cost", json!("1000000.01")),
            ("currency", json!("ZZZ")),
            ("available_months", json!([13])),
            ("ripening_days_max", json!(1)),
            ("lead_time_days", json!(61)),
            ("grower_email", json!("orders")),
            ("kind", json!("vegetable")),
        ] {
            let mut bad = item.clone();
            bad[field] = value;
            let (status, body) = put(bad, Some(ADMIN_TOKEN)).await;
            let named = if field == "currency" { "unit_cost" } else { field };
            assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(named)), "{field}: {body}");
        }
        let (status, body) = app.call(Method::PUT, "/api/v1/catalog/Paw_Paw", Some(ADMIN_TOKEN), Some(item.clone())).await;
        assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("sku")), "{body}");
        assert_eq!(catalog().await, before, "a refused item changes nothing");

        // A walk over the catalog's pages that an added item lands in the middle of still sees
        // every item that was there once: the cursor is the last item's key, not a position.
        // Pages of 30 end at peach; pawpaw sorts just before it, inside the first page.
        let (_, first) = app.get("/api/v1/catalog?limit=30", None).await;
        let mut seen: Vec<String> = first["items"].as_array().unwrap().iter().map(|c| str_of(&c["sku"])).collect();
        let (status, added) = put(item.clone(), Some(ADMIN_TOKEN)).await;
        let mut next = first["next"].as_str().map(str::to_owned);
        while let Some(after) = next {
            let (status, page) = app.get(&format!("/api/v1/catalog?limit=30&after={after}"), None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            seen.extend(page["items"].as_array().unwrap().iter().map(|c| str_of(&c["sku"])));
            next = page["next"].as_str().map(str::to_owned);
        }
        seen.retain(|sku| sku != "pawpaw");
        let skus: Vec<String> = before.iter().map(|c| str_of(&c["sku"])).collect();
        assert_eq!(seen, skus, "each item once, in order");
        assert_eq!(status, StatusCode::OK, "{added}");
        assert_eq!((added["unit_cost"].as_str(), added["available_months"].clone()), (Some("1.35"), json!([9, 10])));
        let mut cheaper = item.clone();
        cheaper["unit_cost"] = json!("1.10");
        cheaper.as_object_mut().unwrap().remove("ethylene_producer");
        let (status, replaced) = put(cheaper, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{replaced}");
        let listed = catalog().await;
        assert_eq!(listed.len(), before.len() + 1, "one item, replaced in place");
        let pawpaw = listed.iter().find(|i| i["sku"] == "pawpaw").unwrap();
        assert_eq!((pawpaw["unit_cost"].as_str(), pawpaw["ethylene_producer"].as_str()), (Some("1.10"), Some("none")), "{pawpaw}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_declined_card_recovers_after_an_update(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = declined_subscriber(&app, "Rita").await;
        app.advance("2026-10-07T00:00:00Z").await;
        let inv = &app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("past_due"), Some(2)));
        let (status, _) = app.call(Method::PUT, &format!("/api/v1/subscriptions/{id}/payment-method"), Some(&token), Some(json!({"payment_token": "pm_ok"}))).await;
        assert_eq!(status, StatusCode::OK);
        app.advance("2026-10-09T00:00:00Z").await;
        let inv = &app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await[0];
        assert_eq!((inv["status"].as_str(), inv["attempts"].as_i64()), (Some("paid"), Some(3)), "{inv}");
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(sub["status"], "active");
        let d = &app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await[0];
        assert_eq!(d["status"], "dispatched", "the held box goes out once paid");
        assert_eq!(app.gateway_totals().await["charge"], (1, 1900), "charged once, under the invoice's one key");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_box_is_planned_once_by_whichever_plan_comes_first(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 1)).await;
        let (_, token) = app.shopper("Uma", "pm_ok").await;
        let (status, body) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let plan_now = || async {
            let (status, run) = app.post("/api/v1/ops/jobs/subscription-plan/run", Some(ADMIN_TOKEN), json!({})).await;
            assert_eq!((status, run["state"].as_str()), (StatusCode::ACCEPTED, Some("succeeded")), "{run}");
            run["result"].clone()
        };
        let id = str_of(&body["id"]);
        let boxes = || async {
            let deliveries = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
            deliveries.iter().map(|d| (str_of(&d["date"]), d["lines"].as_array().unwrap().clone())).collect::<Vec<_>>()
        };
        // The signup planned its first box (of the two weeks ahead), which stays as planned.
        let first = plan_now().await;
        assert_eq!(first["boxes"].as_i64(), Some(0), "{first}");
        let at_signup = boxes().await;
        assert!(!at_signup[0].1.is_empty() && at_signup[1].1.is_empty(), "{at_signup:?}");
        // On 1 Oct the window takes in the delivery of 15 Oct: that morning's grower-orders run
        // boxes it, before the weekly plan (whose runs then find nothing to box).
        app.advance("2026-10-01T02:00:00Z").await;
        assert_eq!(boxes().await, at_signup, "not in the window yet");
        app.advance("2026-10-01T05:00:00Z").await;
        let boxed = boxes().await;
        assert!(!boxed[1].1.is_empty() && boxed[0] == at_signup[0], "{boxed:?}");
        app.advance("2026-10-07T12:00:00Z").await;
        let weekly = app.runs_of("subscription-plan").await;
        let scheduled = weekly.iter().rev().find(|r| r["trigger"] == "schedule").expect("the weekly run");
        assert_eq!(scheduled["scheduled_for"], "2026-10-07T04:00:00Z", "{weekly:?}");
        assert_eq!(scheduled["result"]["boxes"].as_i64(), Some(0), "{scheduled}");
        let again = plan_now().await;
        assert_eq!(again["boxes"].as_i64(), Some(0), "{again}");
        let deliveries = app.items_of(&format!("/api/v1/subscriptions/{}/deliveries", str_of(&body["id"])), &token).await;
        // Every box in the window (two weeks from 7 Oct) is planned, each as first planned
        // (the first locked with it), through a week of daily runs and the weekly plan.
        let in_window: Vec<_> = deliveries.iter().filter(|d| str_of(&d["date"]).as_str() < "2026-10-22").collect();
        assert_eq!(in_window.len(), 2, "{deliveries:?}");
        assert_eq!(in_window[0]["lines"].as_array().unwrap(), &boxed[0].1, "{deliveries:?}");
        assert_eq!(in_window[1]["lines"].as_array().unwrap(), &boxed[1].1, "{deliveries:?}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn cancelling_a_paused_subscription_drops_the_deliveries_after_its_pause_too(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let (_, token) = app.shopper("Pia", "pm_ok").await;
        let id = app.subscribe(&plan, &token, "thu", "2026-10-08").await;
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({"until": "2026-10-22"})).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("paused")), "{body}");
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{body}");
        assert_eq!(body["next_delivery_date"], Value::Null, "{body}");
        let deliveries = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert!(deliveries.len() >= 3, "{deliveries:?}");
        for d in &deliveries {
            assert_eq!((d["status"].as_str(), d["skip_reason"].as_str()), (Some("skipped"), Some("cancelled")), "{d}");
        }
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT, "cancelled once");
        // Nothing is billed, or ordered from growers, for it.
        app.advance("2026-10-30T00:00:00Z").await;
        assert_eq!(app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await, Vec::<Value>::new());
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        assert_eq!(orders["items"], json!([]), "{orders}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_signup_whose_box_planning_fails_is_still_one_subscription_and_replays(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let (shopper, token) = app.shopper("Ivo", "pm_ok").await;
        // Grower orders can't be written: planning the first boxes fails after the signup.
        let refuse: &[&str] = match &app.state.settings.database {
            DatabaseUrl::Sqlite(_) => &["CREATE TRIGGER refuse_orders BEFORE INSERT ON grower_orders \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
            DatabaseUrl::Postgres(_) => &[
                "CREATE FUNCTION refuse_orders() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                "CREATE TRIGGER refuse_orders BEFORE INSERT ON grower_orders FOR EACH ROW \
                 EXECUTE FUNCTION refuse_orders()",
            ],
        };
        crate::helpers::raw_tx(&app.state.settings.database, refuse).await.unwrap();
        let body = json!({"plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"});
        let subscribe = || async {
            let res = app.client.post(format!("{}/api/v1/subscriptions", app.base)).bearer_auth(&token)
                .header("Idempotency-Key", "signup-1").json(&body).send().await.unwrap();
            (res.status(), res.json::<Value>().await.unwrap())
        };
        let (status, first) = subscribe().await;
        assert_eq!(status, StatusCode::CREATED, "{first}");
        let (status, again) = subscribe().await;
        assert_eq!((status, &again["id"]), (StatusCode::CREATED, &first["id"]), "the retry replays: {again}");
        assert_eq!(first["shopper_id"].as_str(), Some(shopper.as_str()));
        let live = app.state.store.live_subscription_ids().await.unwrap();
        assert_eq!(live, [str_of(&first["id"])], "one subscription");
        let welcome = app.admin_get("/api/v1/ops/outbox?to=ivo@example.com").await;
        let welcomes = welcome["items"].as_array().unwrap().iter().filter(|e| e["template"] == "subscription_confirmed").count();
        assert_eq!(welcomes, 1, "{welcome}");
        app.stop().await;
    }
}

on_both_backends! {
    /// A signup claims its `Idempotency-Key` in the transaction that creates the subscription,
    /// and remembers its answer there: a retry replays it byte for byte, concurrent duplicates
    /// make one subscription, and a request refused before it commits leaves the key unused.
    async fn a_keyed_signup_claims_its_key_with_the_subscription(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let (_, token) = app.shopper("Ivo", "pm_ok").await;
        let subscribe = |key: &'static str, body: Value| {
            let request = app.client.post(format!("{}/api/v1/subscriptions", app.base)).bearer_auth(&token)
                .header("Idempotency-Key", key).json(&body);
            async move {
                let res = request.send().await.unwrap();
                let replayed = res.headers().contains_key("idempotent-replayed");
                (res.status(), replayed, res.json::<Value>().await.unwrap())
            }
        };
        let body = json!({"plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"});
        let (status, _, refused) = subscribe("s-1", json!({"plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-09-01"})).await;
        assert_eq!((status, refused["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")), "{refused}");
        let (status, replayed, first) = subscribe("s-1", body.clone()).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false), "the refusal left the key unused: {first}");
        // The answer made before the commit is the subscription as it reads afterwards.
        let (_, read) = app.get(&format!("/api/v1/subscriptions/{}", str_of(&first["id"])), Some(&token)).await;
        assert_eq!(read, first);
        assert_eq!(first["next_delivery_date"], "2026-10-08");
        let (status, replayed, again) = subscribe("s-1", body.clone()).await;
        assert_eq!((status, replayed, &again), (StatusCode::CREATED, true, &first));
        let (status, _, other) = subscribe("s-1", json!({"plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-15"})).await;
        assert_eq!((status, other["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused")), "{other}");
        // Eight at once under a new key: one subscription, the others replay it or wait.
        let racing = futures_util::future::join_all((0..8).map(|_| subscribe("s-2", body.clone()))).await;
        let ids: std::collections::BTreeSet<String> = racing.iter().filter(|(status, _, _)| *status == StatusCode::CREATED)
            .map(|(_, _, v)| str_of(&v["id"])).collect();
        assert!(racing.iter().all(|(status, _, _)| [StatusCode::CREATED, StatusCode::CONFLICT].contains(status)), "{racing:?}");
        assert_eq!(ids.len(), 1, "{racing:?}");
        assert_eq!(app.state.store.live_subscription_ids().await.unwrap().len(), 2);
        app.stop().await;
    }
}

on_both_backends! {
    async fn grower_orders_go_out_on_their_order_by_dates(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let mut subs = Vec::new();
        for name in ["Ann", "Ben", "Cid", "Dee"] {
            let (_, token) = app.shopper(name, "pm_ok").await;
            let (status, body) = app.post("/api/v1/subscriptions", Some(&token), json!({
                "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            subs.push((str_of(&body["id"]), token));
        }
        // Dee cancels: the next refresh takes her boxes out of the orders.
        let (dee, dee_token) = subs.pop().unwrap();
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{dee}/cancel"), Some(&dee_token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, week) = app.get("/api/v1/grower-orders?week=2026-W41", Some(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{week}");
        let orders = week["items"].as_array().unwrap().clone();
        assert!(!orders.is_empty(), "{week}");
        assert!(orders.iter().all(|o| o["status"] == "planned" && o["qty"].as_i64().unwrap() % 4 == 0), "four identical boxes, added by the signups: {week}");
        // A full refresh (the job, run by hand before any order is due) recomputes every
        // total from the boxes still wanted: three of four.
        let (status, run) = app.post("/api/v1/ops/jobs/grower-orders/run", Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!((status, run["state"].as_str()), (StatusCode::ACCEPTED, Some("succeeded")), "{run}");
        let (_, refreshed) = app.get("/api/v1/grower-orders?week=2026-W41", Some(ADMIN_TOKEN)).await;
        let qty = |orders: &[Value]| orders.iter().map(|o| (str_of(&o["sku"]), str_of(&o["ripening_start"]), o["qty"].as_i64().unwrap())).collect::<Vec<_>>();
        let three_quarters: Vec<_> = qty(&orders).into_iter().map(|(sku, start, q)| (sku, start, q / 4 * 3)).collect();
        assert_eq!(qty(refreshed["items"].as_array().unwrap()), three_quarters, "{refreshed}");
        // When every subscriber cancels, nothing is left to order.
        for (id, token) in &subs {
            let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(token), json!({})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        let (status, run) = app.post("/api/v1/ops/jobs/grower-orders/run", Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!((status, run["state"].as_str()), (StatusCode::ACCEPTED, Some("succeeded")), "{run}");
        let (_, empty) = app.get("/api/v1/grower-orders?week=2026-W41", Some(ADMIN_TOKEN)).await;
        assert_eq!(empty["items"], json!([]), "orders nobody wants are not kept: {empty}");
        // Three subscribers again, for the sending below.
        for name in ["Eve", "Fay", "Gus"] {
            let (_, token) = app.shopper(name, "pm_ok").await;
            let (status, body) = app.post("/api/v1/subscriptions", Some(&token), json!({
                "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        let first_order_by = orders.iter().map(|o| str_of(&o["order_by"])).min().unwrap();
        // grower-orders runs at 05:00 Berlin time (03:00 UTC in October).
        app.advance(&format!("{first_order_by}T02:00:00Z")).await;
        let (_, week) = app.get("/api/v1/grower-orders?week=2026-W41", Some(ADMIN_TOKEN)).await;
        assert!(week["items"].as_array().unwrap().iter().all(|o| o["status"] == "planned"), "not before 05:00: {week}");
        app.advance(&format!("{first_order_by}T03:30:00Z")).await;
        app.advance("2026-10-08T00:00:00Z").await;
        let (_, week) = app.get("/api/v1/grower-orders?week=2026-W41", Some(ADMIN_TOKEN)).await;
        for o in week["items"].as_array().unwrap() {
            assert_eq!(o["status"], "sent", "{o}");
        }
        let outbox = app.admin_get("/api/v1/ops/outbox?limit=200").await;
        assert!(outbox["items"].as_array().unwrap().iter().any(|e| e["template"] == "grower_order"), "{outbox}");
        let (status, _) = app.get("/api/v1/grower-orders?week=41", Some(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_week_far_ahead_can_be_skipped_and_is_never_billed(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let (_, token) = app.shopper("Vera", "pm_ok").await;
        let id = app.subscribe(&plan, &token, "thu", "2026-10-08").await;
        let skip = |date: &'static str| {
            let (app, id, token) = (&app, &id, &token);
            async move { app.post(&format!("/api/v1/subscriptions/{id}/skip"), Some(token), json!({"date": date})).await }
        };
        // Deliveries are kept four weeks ahead; 26 November is eight weeks out.
        let dates = |ds: &[Value]| ds.iter().map(|d| str_of(&d["date"])).collect::<Vec<_>>();
        let before = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert!(!dates(&before).contains(&"2026-11-26".to_owned()), "{before:?}");
        let (status, body) = skip("2026-11-26").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(skip("2026-11-26").await.0, StatusCode::OK, "skipping again changes nothing");
        // Not a delivery date, too far ahead: refused, and nothing is added.
        for bad in ["2026-11-25", "2027-12-02"] {
            let (status, body) = skip(bad).await;
            assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("date")), "{bad}: {body}");
        }
        let after = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        let skipped: Vec<&Value> = after.iter().filter(|d| d["date"] == "2026-11-26").collect();
        assert_eq!(skipped.len(), 1, "{after:?}");
        assert_eq!((&skipped[0]["status"], &skipped[0]["skip_reason"]), (&json!("skipped"), &json!("skipped")));
        assert_eq!(after.len(), before.len() + 1, "{after:?}");
        // Skipped inside a pause, a week stays skipped when the pause ends: one kept ahead
        // (held by the pause) as much as one far ahead.
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for date in ["2026-10-22", "2026-12-10"] {
            let (status, body) = skip(date).await;
            assert_eq!(status, StatusCode::OK, "{date}: {body}");
        }
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/resume"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let deliveries = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        for date in ["2026-10-22", "2026-11-26", "2026-12-10"] {
            let d = deliveries.iter().find(|d| d["date"] == date).unwrap();
            assert_eq!((&d["status"], &d["skip_reason"]), (&json!("skipped"), &json!("skipped")), "{d}");
        }
        // The renewal reaches that week and leaves it skipped; the weeks around it bill.
        app.advance("2026-12-04T00:00:00Z").await;
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
        let billed: Vec<String> = invoices.iter().map(|i| str_of(&i["delivery_date"])).collect();
        assert!(billed.contains(&"2026-11-19".to_owned()) && billed.contains(&"2026-12-03".to_owned()), "{billed:?}");
        assert!(!billed.contains(&"2026-11-26".to_owned()), "{billed:?}");
        app.advance("2026-12-11T00:00:00Z").await;
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
        assert!(!invoices.iter().any(|i| i["delivery_date"] == "2026-12-10"), "{invoices:?}");
        // A cancelled subscription has no weeks ahead to skip.
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = skip("2027-02-04").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_delivery_past_its_cutoff_keeps_its_price_while_the_renewal_is_paused(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let (_, token) = app.shopper("Ida", "pm_ok").await;
        let id = app.subscribe(&plan, &token, "thu", "2026-10-08").await;
        let (_, jon_token) = app.shopper("Jon", "pm_ok").await;
        let (status, jon) = app.post("/api/v1/subscriptions", Some(&jon_token), json!({
            "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
        assert_eq!(status, StatusCode::CREATED, "{jon}");
        let jon = str_of(&jon["id"]);
        // Ops pause the renewal; the cutoff of 8 October (48 h before, Berlin) passes.
        let (status, _) = app.post(&format!("/api/v1/ops/jobs/{RENEW_JOB}/pause"), Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        app.advance("2026-10-06T00:00:00Z").await;
        // Two price changes while 8 October waits unlocked: it keeps the price of its cutoff.
        for (second, price) in [(1, "31.00"), (2, "33.00")] {
            app.advance(&format!("2026-10-06T00:00:0{second}Z")).await;
            let (status, body) = app.call(Method::PUT, &format!("/api/v1/plans/{plan}"), Some(ADMIN_TOKEN), Some(json!({"price_per_delivery": price}))).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        // Jon cancels after the cutoff: his due week is committed (as it would have been had
        // the renewal locked it on time), so it is locked and billed at its cutoff's price;
        // only the weeks after it are dropped.
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{jon}/cancel"), Some(&jon_token), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = app.post(&format!("/api/v1/ops/jobs/{RENEW_JOB}/resume"), Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, run) = app.post(&format!("/api/v1/ops/jobs/{RENEW_JOB}/run"), Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!((status, run["state"].as_str()), (StatusCode::ACCEPTED, Some("succeeded")), "{run}");
        let jons = app.items_of(&format!("/api/v1/subscriptions/{jon}/deliveries"), &jon_token).await;
        assert_eq!((&jons[0]["date"], &jons[0]["status"], &jons[0]["amount"]), (&json!("2026-10-08"), &json!("paid"), &json!("24.90")), "{jons:?}");
        assert!(jons[1..].iter().all(|d| d["status"] == "skipped" && d["skip_reason"] == "cancelled"), "{jons:?}");
        // Paid, and dispatched from the warehouse on 7 October (one day of transit).
        let status_on = |at: &'static str| {
            let (app, id, token) = (&app, &id, &token);
            async move {
                app.advance(at).await;
                let deliveries = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), token).await;
                str_of(&deliveries[0]["status"])
            }
        };
        assert_eq!(status_on("2026-10-06T12:00:00Z").await, "paid");
        assert_eq!(status_on("2026-10-06T22:30:00Z").await, "dispatched", "7 October has begun in Berlin");
        // The next delivery's cutoff comes after the changes: it pays the new price.
        app.advance("2026-10-13T00:00:00Z").await;
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
        let billed: Vec<(String, String)> = invoices.iter().map(|i| (str_of(&i["delivery_date"]), str_of(&i["amount"]))).collect();
        assert_eq!(billed, [("2026-10-08".to_owned(), "24.90".to_owned()), ("2026-10-15".to_owned(), "33.00".to_owned())], "{invoices:?}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_pause_after_the_cutoff_leaves_that_week_to_be_locked_and_billed(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let (_, token) = app.shopper("Pia", "pm_ok").await;
        let id = app.subscribe(&plan, &token, "thu", "2026-10-08").await;
        // The renewal is late (ops paused it); the cutoff of 8 October passes, then Pia pauses.
        let (status, _) = app.post(&format!("/api/v1/ops/jobs/{RENEW_JOB}/pause"), Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        app.advance("2026-10-06T00:00:00Z").await;
        let (status, paused) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({})).await;
        assert_eq!((status, paused["status"].as_str()), (StatusCode::OK, Some("paused")), "{paused}");
        let (status, _) = app.post(&format!("/api/v1/ops/jobs/{RENEW_JOB}/resume"), Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, run) = app.post(&format!("/api/v1/ops/jobs/{RENEW_JOB}/run"), Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!((status, run["state"].as_str()), (StatusCode::ACCEPTED, Some("succeeded")), "{run}");
        // The week past its cutoff was committed: locked and billed as if locked on time.
        app.advance("2026-10-06T00:10:00Z").await;
        let weeks = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert_eq!((&weeks[0]["date"], &weeks[0]["status"], &weeks[0]["amount"]), (&json!("2026-10-08"), &json!("paid"), &json!("24.90")), "{weeks:?}");
        assert!(weeks.len() > 1 && weeks[1..].iter().all(|d| d["status"] == "skipped" && d["skip_reason"] == "paused"), "{weeks:?}");
        // The weeks after it are not billed while the pause lasts.
        app.advance("2026-10-27T00:00:00Z").await;
        let billed: Vec<String> = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await
            .iter().map(|i| str_of(&i["delivery_date"])).collect();
        assert_eq!(billed, ["2026-10-08"]);
        app.stop().await;
    }
}

on_both_backends! {
    /// The renewal ends a pause whose end has come; a shopper who cancels (or resumes) while
    /// it runs moves the subscription first, and the run goes on with the subscription as
    /// they left it instead of failing.
    async fn a_cancel_racing_the_end_of_a_pause_does_not_fail_the_renewal(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        // Cutoffs at the start of the delivery day: the run that ends the pause (its first
        // pass, as the pause's end day begins) is the one that would lock that day's box.
        let mut plan = fruit_plan("24.90", 2);
        plan["cutoff_hours"] = json!(0);
        let plan = app.plan(plan).await;
        let (_, token) = app.shopper("Ole", "pm_ok").await;
        let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        let id = str_of(&sub["id"]);
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({"until": "2026-10-22"})).await;
        assert_eq!(status, StatusCode::OK);
        // The pause ends when 22 October begins in Berlin: the run of 21 Oct 22:00 UTC ends it.
        app.advance("2026-10-21T21:50:00Z").await;
        let runs = match &app.state.settings.database {
            // Made deterministic: the cancel has moved the subscription but not committed
            // when the run reads it paused; the run's resume waits for it, then is refused.
            DatabaseUrl::Postgres(url) => {
                let pg = sqlx::PgPool::connect(url).await.unwrap();
                let mut cancel = pg.begin().await.unwrap();
                sqlx::query("UPDATE subscriptions SET status = 'cancelled', paused_until = NULL WHERE id = $1")
                    .bind(&id).execute(&mut *cancel).await.unwrap();
                let now = chrono::DateTime::parse_from_rfc3339("2026-10-21T21:50:00Z").unwrap().timestamp_micros();
                sqlx::query("UPDATE deliveries SET status = 'skipped', skip_reason = 'cancelled', lines = NULL
                             WHERE subscription_id = $1 AND cutoff_at > $2 AND status IN ('scheduled', 'skipped')")
                    .bind(&id).bind(now).execute(&mut *cancel).await.unwrap();
                let (runs, ()) = tokio::join!(app.advance("2026-10-21T22:00:00Z"), async {
                    crate::helpers::until_a_lock_is_waited_on(&pg).await;
                    cancel.commit().await.unwrap();
                });
                pg.close().await;
                runs
            }
            // One writer: the cancel lands before the run reads; nothing to resume.
            DatabaseUrl::Sqlite(_) => {
                let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/cancel"), Some(&token), json!({})).await;
                assert_eq!(status, StatusCode::OK);
                app.advance("2026-10-21T22:00:00Z").await
            }
        };
        let renewal = runs.iter().find(|r| r["job"] == RENEW_JOB).expect("a renewal run");
        assert_eq!(renewal["state"], "succeeded", "{runs:?}");
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(sub["status"], "cancelled", "{sub}");
        let weeks = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        assert!(weeks.iter().all(|d| d["status"] == "skipped"), "{weeks:?}");
        assert_eq!(app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await, Vec::<Value>::new());
        app.stop().await;
    }
}

on_both_backends! {
    async fn boxes_added_after_a_grower_order_went_out_are_ordered_in_a_supplement(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 2)).await;
        let subscribe = |name: &'static str| {
            let app = &app;
            let plan = plan.clone();
            async move {
                let (_, token) = app.shopper(name, "pm_ok").await;
                let (status, body) = app.post("/api/v1/subscriptions", Some(&token), json!({
                    "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
                assert_eq!(status, StatusCode::CREATED, "{body}");
            }
        };
        subscribe("Ann").await;
        let lines = |orders: &Value| orders["items"].as_array().unwrap().iter()
            .map(|o| (str_of(&o["sku"]), str_of(&o["ripening_start"]), str_of(&o["order_by"]), o["qty"].as_i64().unwrap(), str_of(&o["status"])))
            .collect::<Vec<_>>();
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        let one_box = lines(&orders);
        let first: NaiveDate = one_box.iter().map(|l| l.2.parse::<NaiveDate>().unwrap()).min().expect("orders planned");
        // The first order went out at 05:00 Berlin; the cutoff of 8 October is later that day.
        app.advance(&format!("{first}T03:30:00Z")).await;
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        let sent: Vec<_> = lines(&orders).into_iter().filter(|l| l.4 == "sent").collect();
        assert!(!sent.is_empty(), "{orders}");
        let grower_emails = || async {
            let rows = app.state.store.outbox(None, 500, None).await.unwrap();
            rows.into_iter().filter(|e| e.template == "grower_order").collect::<Vec<_>>()
        };
        let before = grower_emails().await;
        // A second subscriber for the same delivery: the sent lines stay as they went out, and
        // the new box's units of those items go in supplementary lines, at once since they
        // are due today (the next run, tomorrow, would be late), in an email of their own.
        subscribe("Ben").await;
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        for (sku, start, order_by, qty, _) in &sent {
            let same: Vec<_> = lines(&orders).into_iter().filter(|l| (&l.0, &l.1) == (sku, start)).collect();
            let line = |status: &str| (sku.clone(), start.clone(), order_by.clone(), *qty, status.to_owned());
            assert_eq!(same, [line("sent"), line("sent")], "the sent line and its supplement: {orders}");
        }
        // A walk one line a page lists every line once, twins included.
        let mut walked = Vec::new();
        let mut next = String::new();
        loop {
            let (status, page) = app.get(&format!("/api/v1/grower-orders?limit=1{next}"), Some(ADMIN_TOKEN)).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            walked.extend(page["items"].as_array().unwrap().iter().map(|o| str_of(&o["id"])));
            match page["next"].as_str() {
                Some(cursor) => {
                    let query = reqwest::Url::parse_with_params("http://x", [("after", cursor)]).unwrap();
                    next = format!("&{}", query.query().unwrap());
                }
                None => break,
            }
        }
        let mut all: Vec<String> = orders["items"].as_array().unwrap().iter().map(|o| str_of(&o["id"])).collect();
        assert_eq!(walked, all, "in the order of the whole list");
        all.dedup();
        assert_eq!(walked.len(), all.len());
        let after = grower_emails().await;
        assert_eq!(after.len(), before.len() + 1, "{after:?}");
        // Not yet due, the rest of the new box waits for its day.
        assert!(lines(&orders).iter().any(|l| l.4 == "planned"), "{orders}");
        // A full refresh leaves them as they are: it orders what the sent lines do not cover.
        let run_job = || async {
            let (status, run) = app.post("/api/v1/ops/jobs/grower-orders/run", Some(ADMIN_TOKEN), json!({})).await;
            assert_eq!((status, run["state"].as_str()), (StatusCode::ACCEPTED, Some("succeeded")), "{run}");
            run
        };
        let run = run_job().await;
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        let mut total: BTreeMap<(String, String), i64> = BTreeMap::new();
        for l in lines(&orders) {
            assert!(l.3 > 0, "{orders}");
            *total.entry((l.0, l.1)).or_default() += l.3;
        }
        for (sku, start, _, qty, _) in &one_box {
            assert_eq!(total[&(sku.clone(), start.clone())], 2 * qty, "two boxes' worth, no more: {orders}");
        }
        // The supplements went in an email of their own on the same day as the first order
        // (once, both were keyed by grower and day, so the second was dropped as a duplicate
        // while its lines were marked sent); the run had nothing due left to send.
        assert_eq!(run["result"]["sent"].as_u64(), Some(0), "{run}");
        assert_eq!(grower_emails().await.len(), after.len());
        assert!(lines(&app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await.1).iter()
            .filter(|l| l.2.parse::<NaiveDate>().unwrap() <= first).all(|l| l.4 == "sent"));
        // Running again sends nothing twice.
        let run = run_job().await;
        assert_eq!(run["result"]["sent"].as_u64(), Some(0), "{run}");
        assert_eq!(grower_emails().await.len(), after.len());
        // While ops hold the grower emails (the job paused), a signup's due lines wait too,
        // for a run ops ask for.
        let (status, body) = app.post("/api/v1/ops/jobs/grower-orders/pause", Some(ADMIN_TOKEN), json!({"note": "supplier audit"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        subscribe("Cy").await;
        assert_eq!(grower_emails().await.len(), after.len(), "held");
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        for (sku, start, order_by, qty, _) in &sent {
            let line = (sku.clone(), start.clone(), order_by.clone(), *qty, "planned".to_owned());
            assert!(lines(&orders).contains(&line), "{line:?} waits: {orders}");
        }
        let run = run_job().await;
        assert_eq!(run["result"]["sent"].as_u64(), Some(sent.len() as u64), "{run}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_signup_after_an_order_by_date_gets_a_box_that_can_still_be_ordered(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        // A cutoff 12 hours before the delivery leaves days between the first order-by date
        // and the cutoff.
        let mut body = fruit_plan("24.90", 2);
        body["cutoff_hours"] = json!(12);
        let plan = app.plan(body).await;
        let subscribe = |name: &'static str| {
            let app = &app;
            let plan = plan.clone();
            async move {
                let (_, token) = app.shopper(name, "pm_ok").await;
                let (status, body) = app.post("/api/v1/subscriptions", Some(&token), json!({
                    "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
                assert_eq!(status, StatusCode::CREATED, "{body}");
                let id = str_of(&body["id"]);
                let boxes = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
                (boxes[0]["lines"].clone(), id, token)
            }
        };
        let (ann, ann_id, ann_token) = subscribe("Ann").await;
        let orders = || async {
            let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
            orders["items"].as_array().unwrap().iter()
                .map(|o| (str_of(&o["sku"]), str_of(&o["order_by"]), o["qty"].as_i64().unwrap(), str_of(&o["status"])))
                .collect::<Vec<_>>()
        };
        let first: NaiveDate = orders().await.iter().map(|l| l.1.parse::<NaiveDate>().unwrap()).min().expect("orders planned");
        // The day after the first order-by date, before that day's orders go out (05:00 Berlin),
        // and days before the cutoff: the first box's earliest lines can no longer be ordered.
        let today = first + Duration::days(1);
        assert!(today <= NaiveDate::from_ymd_opt(2026, 10, 6).unwrap(), "the cutoff is 7 Oct 10:00 UTC: {first}");
        app.advance(&format!("{today}T02:00:00Z")).await;
        let before = orders().await;
        let (cleo, cleo_id, cleo_token) = subscribe("Cleo").await;
        assert_ne!(cleo, ann, "the first box has lines past their order-by date");
        // Nothing is ordered after its order-by date: the late box is made of what can still
        // come in time, and the first box's lines (sent or not) are left as they were.
        let after = orders().await;
        for line in &after {
            assert!(line.3 == "sent" || line.1.parse::<NaiveDate>().unwrap() >= today, "ordered late: {line:?} in {after:?}");
        }
        for line in before.iter().filter(|l| l.3 == "sent") {
            assert!(after.contains(line), "{line:?}");
        }
        // Two days ahead nothing can come in time: at the cutoff Cleo's first box is skipped, and
        // never billed; Ann's comes as planned.
        app.advance("2026-10-07T12:00:00Z").await;
        let cleo_boxes = app.items_of(&format!("/api/v1/subscriptions/{cleo_id}/deliveries"), &cleo_token).await;
        assert_eq!((cleo_boxes[0]["status"].as_str(), cleo_boxes[0]["date"].as_str()), (Some("skipped"), Some("2026-10-08")), "{cleo_boxes:?}");
        assert!(app.items_of(&format!("/api/v1/subscriptions/{cleo_id}/invoices"), &cleo_token).await.is_empty());
        let ann_boxes = app.items_of(&format!("/api/v1/subscriptions/{ann_id}/deliveries"), &ann_token).await;
        assert_eq!((ann_boxes[0]["status"].as_str(), &ann_boxes[0]["lines"]), (Some("dispatched"), &ann), "paid, on its way: {ann_boxes:?}");
        app.stop().await;
    }
}

impl TestApp {
    /// Adds a dear local apple the farm delivers the same day: never the cheapest box, but
    /// the only one that can still come a day or two before a delivery.
    async fn farm_apple(&self) {
        let local = json!({"name": "Farm apple", "kind": "fruit", "ripening_days_min": 0, "ripening_days_max": 0,
            "ready_window_days": 7, "unit_cost": "9.00", "currency": "EUR", "available_months": (1..=12).collect::<Vec<_>>(),
            "lead_time_days": 0, "grower": "Hof Linde", "grower_email": "hof@linde.example"});
        let (status, body) = self
            .call(
                Method::PUT,
                "/api/v1/catalog/farm-apple",
                Some(ADMIN_TOKEN),
                Some(local),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// A plan in `zone` with a 12-hour cutoff, with the farm's apple in the catalog.
    async fn late_box_plan(&self, zone: &str) -> String {
        self.farm_apple_plan(zone, 12).await
    }

    /// A plan in `zone` with a cutoff of `cutoff_hours`, with the farm's apple in the catalog.
    async fn farm_apple_plan(&self, zone: &str, cutoff_hours: i64) -> String {
        self.farm_apple().await;
        let mut body = fruit_plan("24.90", 1);
        body["cutoff_hours"] = json!(cutoff_hours);
        body["time_zone"] = json!(zone);
        self.plan(body).await
    }

    /// At `unbox_at`, takes the first delivery's box away and makes every grower send fail;
    /// at `lock_at`, after its lock, the farm's line is ordered but unsent. Its units.
    async fn lock_unboxed_with_sends_refused(
        &self,
        id: &str,
        token: &str,
        (unbox_at, lock_at): (&str, &str),
    ) -> i64 {
        self.advance(unbox_at).await;
        self.unbox_first_delivery(id).await;
        self.refuse_grower_sends(true).await;
        self.advance(lock_at).await;
        let qty = self.farm_box_units(id, token).await;
        self.assert_farm_line(qty, "planned", 0).await;
        qty
    }

    /// While `refuse`, grower order lines can't be marked sent (a trigger refuses it), so
    /// every send of them fails.
    async fn refuse_grower_sends(&self, refuse: bool) {
        let url = &self.state.settings.database;
        let statements: &[&str] = match (url, refuse) {
            (DatabaseUrl::Sqlite(_), true) => &[
                "CREATE TRIGGER refuse_sends BEFORE UPDATE ON grower_orders \
                 WHEN NEW.status = 'sent' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
            ],
            (DatabaseUrl::Postgres(_), true) => &[
                "CREATE OR REPLACE FUNCTION refuse_sends() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                "CREATE TRIGGER refuse_sends BEFORE UPDATE ON grower_orders FOR EACH ROW \
                 WHEN (NEW.status = 'sent') EXECUTE FUNCTION refuse_sends()",
            ],
            (DatabaseUrl::Sqlite(_), false) => &["DROP TRIGGER refuse_sends"],
            (DatabaseUrl::Postgres(_), false) => &["DROP TRIGGER refuse_sends ON grower_orders"],
        };
        crate::helpers::raw_tx(url, statements).await.unwrap();
    }

    /// A new shopper subscribed to `plan` from Thursday 8 October: (subscription, token).
    async fn subscribe_from_8_october(&self, plan: &str, name: &str) -> (String, String) {
        let (_, token) = self.shopper(name, "pm_ok").await;
        let body = json!({"plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"});
        let (status, sub) = self.post("/api/v1/subscriptions", Some(&token), body).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        (str_of(&sub["id"]), token)
    }

    /// [`TestApp::late_box_plan`] with one subscriber: (subscription, token).
    async fn late_box_subscription(&self, zone: &str, name: &str) -> (String, String) {
        let plan = self.late_box_plan(zone).await;
        self.subscribe_from_8_october(&plan, name).await
    }

    /// Takes the first delivery's box away, as when its signup's planning failed and no run
    /// came after: the lock will have to plan it.
    async fn unbox_first_delivery(&self, id: &str) {
        crate::helpers::raw_tx(&self.state.settings.database, &[
            &format!("UPDATE deliveries SET lines = NULL WHERE subscription_id = '{id}' AND delivery_date = '2026-10-08'"),
        ]).await.unwrap();
    }

    /// The first delivery's box, all of it the farm's apple (as the lock plans it): its units.
    async fn farm_box_units(&self, id: &str, token: &str) -> i64 {
        let d = self
            .items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), token)
            .await
            .remove(0);
        let lines = d["lines"].as_array().unwrap().clone();
        assert!(
            !lines.is_empty() && lines.iter().all(|l| l["sku"] == "farm-apple"),
            "{d}"
        );
        lines.iter().map(|l| l["qty"].as_i64().unwrap()).sum()
    }

    /// The farm apple's grower order lines: (units, order-by date, status).
    async fn farm_orders(&self) -> Vec<(i64, String, String)> {
        let (_, orders) = self.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        orders["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["sku"] == "farm-apple")
            .map(|o| {
                (
                    o["qty"].as_i64().unwrap(),
                    str_of(&o["order_by"]),
                    str_of(&o["status"]),
                )
            })
            .collect()
    }

    /// The farm apple has one order line, of `qty` units to order by 7 October, in `status`,
    /// and the farm has had `emails` order emails.
    async fn assert_farm_line(&self, qty: i64, status: &str, emails: usize) {
        let line = (qty, "2026-10-07".to_owned(), status.to_owned());
        assert_eq!(self.farm_orders().await, [line]);
        let outbox = self.state.store.outbox(None, 500, None).await.unwrap();
        let farm = |e: &&pooled::store::OutboxRow| {
            e.template == "grower_order" && e.to_addr == "hof@linde.example"
        };
        assert_eq!(outbox.iter().filter(farm).count(), emails);
    }
}

on_both_backends! {
    async fn a_box_planned_at_the_lock_is_ordered_with_it_and_its_due_lines_go_out_at_once(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = app.late_box_subscription("Europe/Berlin", "Eve").await;
        // The morning of the cutoff, after that day's runs, the delivery has no box.
        app.advance("2026-10-07T04:30:00Z").await;
        app.unbox_first_delivery(&id).await;
        assert!(app.farm_orders().await.is_empty());
        // At the cutoff (10:00 UTC) the lock boxes it with what can still come: the farm's apple,
        // to be ordered today. It is ordered with the lock and goes out at once, not tomorrow.
        app.advance("2026-10-07T12:00:00Z").await;
        let qty = app.farm_box_units(&id, &token).await;
        app.assert_farm_line(qty, "sent", 1).await;
        let renewals = app.runs_of(RENEW_JOB).await;
        let locking = renewals.iter().find(|r| r["result"]["locked"] == 1).expect("a renewal locked it");
        assert_eq!(locking["result"]["grower_lines_sent"], 1, "{locking}");
        // The next morning's recomputation counts it once.
        app.advance("2026-10-08T04:00:00Z").await;
        app.assert_farm_line(qty, "sent", 1).await;
        app.stop().await;
    }
}

on_both_backends! {
    async fn lines_a_lock_orders_go_out_on_the_shops_day_not_the_plans(backend) {
        // The shop keeps New York time; the plan delivers in Auckland, most of a day ahead.
        let app = app_in(backend, "2026-09-28T00:00:00Z", "America/New_York").await;
        let (id, token) = app.late_box_subscription("Pacific/Auckland", "Aroha").await;
        // After the shop's morning run of 6 October (05:00 in New York, 09:00 UTC).
        app.advance("2026-10-06T12:00:00Z").await;
        app.unbox_first_delivery(&id).await;
        // The cutoff is noon of the 7th in Auckland, 23:00 UTC on the 6th: still the 6th in
        // New York. The lock orders the farm's apple for the 7th, and the line waits for the
        // shop's 7th like every other line of that day.
        app.advance("2026-10-06T23:30:00Z").await;
        let qty = app.farm_box_units(&id, &token).await;
        app.assert_farm_line(qty, "planned", 0).await;
        app.advance("2026-10-07T09:30:00Z").await;
        app.assert_farm_line(qty, "sent", 1).await;
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_lock_whose_grower_email_fails_still_bills_and_the_next_renewal_sends_it(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let (id, token) = app.late_box_subscription("Europe/Berlin", "Ines").await;
        // The send after the lock fails, yet the lock stands and its run succeeded at once:
        // the box is ordered, the invoice paid.
        let qty = app.lock_unboxed_with_sends_refused(&id, &token, ("2026-10-07T04:30:00Z", "2026-10-07T12:00:00Z")).await;
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
        assert_eq!(invoices.iter().map(|i| str_of(&i["status"])).collect::<Vec<_>>(), ["paid"]);
        let renewals = app.runs_of(RENEW_JOB).await;
        let locking: Vec<&Value> = renewals.iter().filter(|r| r["result"]["locked"] == 1).collect();
        assert_eq!(locking.len(), 1, "{renewals:?}");
        assert_eq!(locking[0]["result"]["grower_lines_sent"], 0, "{renewals:?}");
        assert_eq!((&locking[0]["state"], &locking[0]["attempt"], &locking[0]["last_error"]),
            (&json!("succeeded"), &json!(1), &Value::Null), "{renewals:?}");
        // The line missed this morning's grower-orders run (05:00 in Berlin), so every
        // renewal run tries it again; once lines can be sent, the next one sends it, today.
        app.advance("2026-10-07T12:20:00Z").await;
        app.assert_farm_line(qty, "planned", 0).await;
        app.refuse_grower_sends(false).await;
        app.advance("2026-10-07T12:35:00Z").await;
        app.assert_farm_line(qty, "sent", 1).await;
        let renewals = app.runs_of(RENEW_JOB).await;
        let sending: Vec<&Value> = renewals.iter().filter(|r| r["result"]["grower_lines_sent"] == 1).collect();
        assert_eq!(sending.len(), 1, "{renewals:?}");
        assert_eq!(sending[0]["scheduled_for"], "2026-10-07T12:30:00Z", "{renewals:?}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_line_a_lock_failed_to_send_before_the_morning_run_goes_out_with_that_run(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        // Cutoff at 04:00 on the 7th in Berlin (02:00 UTC), before the 05:00 grower-orders run.
        let plan = app.farm_apple_plan("Europe/Berlin", 20).await;
        let (id, token) = app.subscribe_from_8_october(&plan, "Olga").await;
        let qty = app.lock_unboxed_with_sends_refused(&id, &token, ("2026-10-07T01:30:00Z", "2026-10-07T02:05:00Z")).await;
        // Sends work again, but before the morning run the renewals leave the line to it: one
        // email per grower and morning.
        app.refuse_grower_sends(false).await;
        app.advance("2026-10-07T02:50:00Z").await;
        app.assert_farm_line(qty, "planned", 0).await;
        app.advance("2026-10-07T03:10:00Z").await;
        app.assert_farm_line(qty, "sent", 1).await;
        let renewals = app.runs_of(RENEW_JOB).await;
        let ran = renewals.iter().filter(|r| r["state"] == "succeeded");
        assert!(ran.clone().count() > 20 && ran.clone().all(|r| r["result"]["grower_lines_sent"] == 0), "{renewals:?}");
        let orders = app.runs_of(GROWER_ORDERS_JOB).await;
        assert!(orders.iter().any(|r| r["scheduled_for"] == "2026-10-07T03:00:00Z" && r["result"]["sent"] == 1), "{orders:?}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_lock_racing_the_morning_recomputation_orders_each_box_once(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.late_box_plan("Europe/Berlin").await;
        let mut subs = Vec::new();
        for name in ["Ada", "Bea", "Cem", "Dov", "Eli", "Fay", "Gil", "Hal"] {
            subs.push(app.subscribe_from_8_october(&plan, name).await);
        }
        app.advance("2026-10-07T04:30:00Z").await;
        for (id, _) in &subs {
            app.unbox_first_delivery(id).await;
        }
        // At the cutoff the renewal and a late `grower-orders` run (ops' "run now", say) both
        // find the deliveries without boxes, and both box them, in whatever interleaving.
        let (state, berlin) = (&app.state, "Europe/Berlin".parse().unwrap());
        let at = |t: &str| t.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        let renew = |now| pooled::subscriptions::run_renew(&state.store, &state.payments, &[1, 3, 5], berlin, now);
        let (renewed, recomputed) = tokio::join!(
            renew(at("2026-10-07T10:00:00Z")),
            pooled::subscriptions::run_grower_orders(&state.store, at("2026-10-07T10:00:00Z"), berlin),
        );
        renewed.unwrap();
        recomputed.unwrap();
        // A lock that gave way to a plan's box locks with that box on the next run.
        renew(at("2026-10-07T10:15:00Z")).await.unwrap();
        let mut units = 0;
        for (id, token) in &subs {
            units += app.farm_box_units(id, token).await;
            let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), token).await;
            assert_eq!(invoices.iter().map(|i| str_of(&i["status"])).collect::<Vec<_>>(), ["paid"], "{id}");
        }
        // Every box is ordered exactly once, whichever writer boxed it.
        let ordered: i64 = app.farm_orders().await.iter().map(|o| o.0).sum();
        assert_eq!(ordered, units);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_damaged_stored_box_is_planned_afresh_and_healed(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 1)).await;
        app.subscribe_from_8_october(&plan, "Uma").await;
        let store = &app.state.store;
        let profile = format!("{plan}|[]|thu|2026-10-08");
        let good = store.box_plan(&profile).await.unwrap().expect("the signup stored its profile's box");
        // The stored box is damaged (an edit by hand, say): unreadable, then empty.
        for (bad, name) in [("not a box", "Vic"), ("[]", "Wes")] {
            crate::helpers::raw_tx(&app.state.settings.database, &[
                &format!("UPDATE box_plans SET lines = '{bad}' WHERE profile = '{profile}'"),
            ]).await.unwrap();
            let (id, token) = app.subscribe_from_8_october(&plan, name).await;
            let d = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await.remove(0);
            assert!(!d["lines"].as_array().unwrap().is_empty(), "{bad}: boxed all the same: {d}");
            let healed = store.box_plan(&profile).await.unwrap().unwrap();
            let lines: Vec<Value> = serde_json::from_str(&healed).unwrap_or_default();
            assert!(!lines.is_empty(), "{bad}: healed, not planned afresh on every run: {healed}");
            assert_eq!(healed, good, "the same profile, the same box");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn late_boxes_are_made_of_what_can_still_come_in_time_and_stay_as_planned(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.late_box_plan("Europe/Berlin").await;
        let subscribe = |name: &'static str| app.subscribe_from_8_october(&plan, name);
        let first_box = |id: String, token: String| {
            let app = &app;
            async move {
                let d = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await.remove(0);
                assert_eq!(d["date"], "2026-10-08", "{d}");
                (str_of(&d["status"]), d["lines"].clone())
            }
        };
        let (ann, ann_token) = subscribe("Ann").await;
        let (dana, dana_token) = subscribe("Dana").await;
        let (_, ann_box) = first_box(ann.clone(), ann_token.clone()).await;
        assert!(ann_box.as_array().unwrap().iter().all(|l| l["sku"] != "farm-apple"), "{ann_box}");
        assert_eq!(first_box(dana.clone(), dana_token.clone()).await.1, ann_box, "one profile, one box");
        // A pause drops Dana's box: it is not the box of any delivery any more.
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{dana}/pause"), Some(&dana_token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(first_box(dana.clone(), dana_token.clone()).await, ("skipped".into(), json!([])));

        // Tuesday, two days before the delivery: the first box's lines can no longer be ordered.
        app.advance("2026-10-06T02:00:00Z").await;
        let (cleo, cleo_token) = subscribe("Cleo").await;
        let (status, late) = first_box(cleo.clone(), cleo_token.clone()).await;
        assert_eq!(status, "scheduled");
        let late_lines = late.as_array().unwrap();
        assert!(!late_lines.is_empty() && late_lines.iter().all(|l| l["sku"] == "farm-apple"), "{late}");
        // Resumed now, Dana's delivery comes back with a box that can come in time too, not the
        // one her pause dropped.
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{dana}/resume"), Some(&dana_token), json!({})).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("active")), "{body}");
        assert_eq!(first_box(dana.clone(), dana_token.clone()).await, ("scheduled".into(), late.clone()));
        // Nothing not yet sent is ordered after its order-by date; the late boxes are ordered.
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        let orders = orders["items"].as_array().unwrap().clone();
        for o in &orders {
            assert!(o["status"] == "sent" || str_of(&o["order_by"]).as_str() >= "2026-10-06", "ordered late: {o}");
        }
        let farm: i64 = orders.iter().filter(|o| o["sku"] == "farm-apple").map(|o| o["qty"].as_i64().unwrap()).sum();
        let per_box: i64 = late_lines.iter().map(|l| l["qty"].as_i64().unwrap()).sum();
        assert_eq!(farm, 2 * per_box, "Cleo's and Dana's boxes: {orders:?}");

        // Through the morning's run, the weekly plan and the lock at the cutoff (10:00 UTC on
        // Wednesday), every box is locked as planned and paid for.
        app.advance("2026-10-07T12:00:00Z").await;
        for (id, token, planned) in [(ann, ann_token, &ann_box), (cleo, cleo_token, &late), (dana, dana_token, &late)] {
            assert_eq!(first_box(id.clone(), token.clone()).await, ("dispatched".into(), planned.clone()), "{id}");
            let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
            assert_eq!((invoices.len(), invoices[0]["status"].as_str()), (1, Some("paid")), "{invoices:?}");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_lock_that_planned_a_box_gives_way_to_a_box_planned_meanwhile(backend) {
        use pooled::domain::{ledger::Account, money::{Currency, Money}};
        use pooled::store::{DeliveryLock, InvoiceRow, NewEmail, NewIntent};
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("24.90", 1)).await;
        let (_, token) = app.shopper("Lena", "pm_ok").await;
        // A first delivery beyond the two weeks a signup boxes: it has no box yet.
        let (status, body) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-22"})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = str_of(&body["id"]);
        let store = &app.state.store;
        let first = || async { store.deliveries_of(&id).await.unwrap().remove(0) };
        let read = first().await;
        assert_eq!((read.delivery_date.as_str(), read.lines.as_deref()), ("2026-10-22", None));
        let a_box = |sku: &str| json!([{"sku": sku, "name": sku, "qty": 7, "ripened_days": 0,
            "ready_from": 0, "ready_until": 6}]).to_string();
        // The lock read it without a box and planned one; a plan boxed it meanwhile.
        assert_eq!(store.save_first_boxes(&[(read.id.clone(), a_box("apple"))], |_| Vec::new()).await.unwrap(), vec![read.id.clone()]);
        assert!(store.save_first_boxes(&[(read.id.clone(), a_box("pear"))], |_| Vec::new()).await.unwrap().is_empty(), "never replaced");
        let now = 1_790_000_000_000_000;
        let lock = |d: DeliveryRow, boxed_at_lock: bool| {
            let invoice = InvoiceRow {
                id: format!("inv_{boxed_at_lock}"), subscription_id: id.clone(), delivery_id: d.id.clone(),
                delivery_date: d.delivery_date.clone(), amount_minor: 2490, currency: "EUR".into(),
                status: "pending".into(), attempts: 0, first_failed_at: None, next_attempt_at: None,
                created_at: now, paid_at: None,
            };
            let charge = NewIntent {
                id: format!("pi_{}", invoice.id), idempotency_key: format!("renewal:{id}:{boxed_at_lock}"),
                kind: "charge", purpose: "renewal", subject_id: invoice.id.clone(), shopper_id: str_of(&body["shopper_id"]),
                amount: Money::from_minor(2490, Currency::parse("EUR").unwrap()), account: Account::SubscriptionRevenue,
                refund_of: None, memo: "test".into(), first_sweep_at: now,
            };
            let email = NewEmail {
                template: "box_planned".into(), entity: d.id.clone(), event: format!("locked:{boxed_at_lock}"),
                to: "lena@example.com".into(), subject: "box".into(), text: "box".into(), html: "box".into(),
                attachments: Vec::new(),
            };
            DeliveryLock { delivery: DeliveryRow { amount_minor: Some(2490), ..d }, invoice, charge, email, boxed_at_lock, orders: Vec::new() }
        };
        let planned_at_lock = DeliveryRow { lines: Some(a_box("pear")), ..read.clone() };
        let taken = store.lock_deliveries(&[lock(planned_at_lock, true)], now).await.unwrap();
        assert_eq!((taken.locked, taken.charges.len()), (0, 0), "the box planned meanwhile wins");
        let kept = first().await;
        assert_eq!((kept.status.as_str(), kept.lines), ("scheduled", Some(a_box("apple"))));
        assert!(store.invoices_of(&id).await.unwrap().is_empty(), "nothing billed");
        // The next run reads the box and locks with it.
        let taken = store.lock_deliveries(&[lock(first().await, false)], now).await.unwrap();
        assert_eq!((taken.locked, taken.charges.len()), (1, 1));
        let done = first().await;
        assert_eq!((done.status.as_str(), done.lines), ("locked", Some(a_box("apple"))));
        assert_eq!(store.invoices_of(&id).await.unwrap().len(), 1);
        app.stop().await;
    }
}

on_both_backends! {
    async fn grower_orders_go_out_on_the_shops_own_day_east_of_utc(backend) {
        let app = app_in(backend, "2026-09-28T00:00:00Z", "Asia/Tokyo").await;
        let mut body = fruit_plan("24.90", 2);
        body["time_zone"] = json!("Asia/Tokyo");
        let plan = app.plan(body).await;
        let (_, token) = app.shopper("Yui", "pm_ok").await;
        let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        let first: NaiveDate = orders["items"].as_array().unwrap().iter()
            .map(|o| str_of(&o["order_by"]).parse::<NaiveDate>().unwrap()).min().expect("orders planned");
        // 05:00 in Tokyo on the order-by date is 20:00 UTC the day before.
        let run_at = format!("{}T20:30:00Z", first - Duration::days(1));
        app.advance(&run_at).await;
        let (_, orders) = app.get("/api/v1/grower-orders", Some(ADMIN_TOKEN)).await;
        let due: Vec<&Value> = orders["items"].as_array().unwrap().iter()
            .filter(|o| str_of(&o["order_by"]) == first.to_string()).collect();
        assert!(!due.is_empty() && due.iter().all(|o| o["status"] == "sent"), "sent on the shop's day: {orders}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn flowers_bloom_every_day_until_the_next_delivery(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(json!({"name": "Fortnightly bouquet", "kind": "flower", "currency": "EUR",
            "price_per_delivery": "29.00", "cadence_weeks": 2, "portions_per_day": 5,
            "delivery_weekdays": ["fri"], "time_zone": "Europe/Berlin"})).await;
        let (_, token) = app.shopper("Flora", "pm_ok").await;
        let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "fri", "start_date": "2026-10-02"})).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        let id = str_of(&sub["id"]);
        // Bad input changes nothing.
        for (bad, field) in [
            (json!({"plan_id": plan, "delivery_weekday": "mon", "start_date": "2026-10-02"}), "delivery_weekday"),
            (json!({"plan_id": plan, "delivery_weekday": "fri", "start_date": "2026-09-01"}), "start_date"),
            (json!({"plan_id": plan, "delivery_weekday": "fri", "start_date": "+262142-12-28"}), "start_date"),
            (json!({"plan_id": plan, "delivery_weekday": "fri", "start_date": "2027-10-08"}), "start_date"),
            (json!({"plan_id": plan, "delivery_weekday": "fri", "start_date": "2026-10-02", "exclusions": ["durian"]}), "exclusions[0]"),
            (json!({"plan_id": "pln_nope", "delivery_weekday": "fri", "start_date": "2026-10-02"}), "plan_id"),
        ] {
            let (status, body) = app.post("/api/v1/subscriptions", Some(&token), bad).await;
            assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{body}");
        }
        // Exclusions that leave no bouquet in any month would skip every delivery unbilled.
        let (_, catalog) = app.get("/api/v1/catalog?limit=500", None).await;
        let flowers: Vec<Value> = catalog["items"].as_array().unwrap().iter()
            .filter(|c| c["kind"] == "flower").map(|c| c["sku"].clone()).collect();
        assert!(flowers.len() > 3, "{catalog}");
        let (status, body) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "fri", "start_date": "2026-10-09", "exclusions": flowers})).await;
        assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("exclusions")), "{body}");
        let (status, one_less) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "fri", "start_date": "2026-10-09", "exclusions": [flowers[0]]})).await;
        assert_eq!(status, StatusCode::CREATED, "one exclusion leaves enough: {one_less}");
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{}/cancel", str_of(&one_less["id"])), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = app.post(&format!("/api/v1/subscriptions/{id}/resume"), Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT, "not paused");
        for until in ["2026-01-01", "2027-12-31", "+262142-12-28"] {
            let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({"until": until})).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{until}: {body}");
        }
        // A date that is not one says how to write one.
        for until in ["next week", "2026-10", "2026-10-15T00:00:00Z"] {
            let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({"until": until})).await;
            assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("until")), "{until}: {body}");
            assert!(str_of(&body["errors"][0]["message"]).ends_with(": write a date as 2026-12-10 and an instant as 2026-12-01T09:00:00Z"), "{until}: {body}");
        }
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(sub["status"], "active", "a refused pause changes nothing");
        // A plan the catalog can't keep ready every day is refused, not silently unbillable:
        // no fruit in the data stays surely ready for a fortnight.
        let mut fortnight = fruit_plan("30.00", 1);
        fortnight["cadence_weeks"] = json!(2);
        let (status, body) = app.post("/api/v1/plans", Some(ADMIN_TOKEN), fortnight).await;
        assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("cadence_weeks")), "{body}");
        let (status, body) = app.post("/api/v1/plans", Some(ADMIN_TOKEN), fruit_plan("1000000.01", 1)).await;
        assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("price_per_delivery")), "{body}");
        let (status, body) = app.call(Method::PUT, &format!("/api/v1/plans/{plan}"), Some(ADMIN_TOKEN), Some(json!({"price_per_delivery": "99999999999999999.99"}))).await;
        assert_eq!((status, body["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("price_per_delivery")), "{body}");
        // A price change applies from the next unlocked delivery and is announced.
        app.advance("2026-10-05T00:00:00Z").await;
        let (status, changed) = app.call(Method::PUT, &format!("/api/v1/plans/{plan}"), Some(ADMIN_TOKEN), Some(json!({"price_per_delivery": "31.00"}))).await;
        assert_eq!((status, changed["price_per_delivery"].as_str()), (StatusCode::OK, Some("31.00")), "{changed}");
        // Back and forth: each change is announced, a repeat of the same price is not.
        for (second, price) in [(1, "29.00"), (2, "31.00"), (3, "31.00")] {
            app.advance(&format!("2026-10-05T00:00:0{second}Z")).await;
            let (status, body) = app.call(Method::PUT, &format!("/api/v1/plans/{plan}"), Some(ADMIN_TOKEN), Some(json!({"price_per_delivery": price}))).await;
            assert_eq!((status, body["price_per_delivery"].as_str()), (StatusCode::OK, Some(price)), "{body}");
        }
        let outbox = app.admin_get("/api/v1/ops/outbox?to=flora@example.com").await;
        let announced = outbox["items"].as_array().unwrap().iter().filter(|e| e["template"] == "price_changed").count();
        assert_eq!(announced, 3, "31.00, 29.00, 31.00: {outbox}");
        app.advance("2026-10-17T00:00:00Z").await;
        let deliveries = app.items_of(&format!("/api/v1/subscriptions/{id}/deliveries"), &token).await;
        let dates: Vec<String> = deliveries.iter().map(|d| str_of(&d["date"])).collect();
        assert_eq!(&dates[..2], ["2026-10-02", "2026-10-16"], "every second Friday");
        for d in deliveries.iter().filter(|d| d["status"] == "dispatched") {
            assert_covered(d, 14, 5);
        }
        assert_eq!(deliveries.iter().filter(|d| d["status"] == "dispatched").count(), 2);
        let amounts: Vec<&str> = deliveries[..2].iter().map(|d| d["amount"].as_str().unwrap()).collect();
        assert_eq!(amounts, ["29.00", "31.00"], "the locked delivery kept its price");
        app.stop().await;
    }
}

on_both_backends! {
    async fn chunks_of_new_deliveries_in_flight_share_their_cutoff_timers(backend) {
        // The renewal adds new deliveries a chunk at a time with several chunks in flight, each
        // in its own transaction, and each upserts a timer row per distinct cutoff. Chunks of
        // one cycle share their cutoffs, so on PostgreSQL they wait on each other's timer rows;
        // they take them in ascending order, so never in a cycle (a deadlock would fail a chunk
        // here). Eight chunks at once, their rows listed in eight different orders.
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let plan = app.plan(fruit_plan("19.00", 1)).await;
        let mut subs = Vec::new();
        for i in 0..8 {
            let (_, token) = app.shopper(&format!("Chunk{i}"), "pm_ok").await;
            let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
                "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
            assert_eq!(status, StatusCode::CREATED, "{sub}");
            subs.push(str_of(&sub["id"]));
        }
        let store = app.state.store.clone();
        let now = app.state.clock.now().timestamp_micros();
        let week = Duration::weeks(1).num_microseconds().unwrap();
        // Far past the subscriptions' own deliveries, so every row and every timer is new.
        // Four rounds: a deadlock needs the waits to interleave, which one round may not do.
        let mut all_cutoffs = Vec::new();
        for round in 0..4i64 {
            let cutoffs: Vec<i64> = (0..12).map(|w| now + (52 * (round + 1) + w) * week).collect();
            let chunks = subs.iter().enumerate().map(|(i, sub)| {
                let mut rows: Vec<DeliveryRow> = cutoffs
                    .iter()
                    .enumerate()
                    .map(|(w, &cutoff_at)| DeliveryRow {
                        id: format!("del_chunk_{round}_{i}_{w}"),
                        subscription_id: sub.clone(),
                        delivery_date: format!("{}-11-{:02}", 2027 + round, w + 1),
                        cutoff_at,
                        status: "scheduled".into(),
                        skip_reason: None,
                        amount_minor: None,
                        lines: None,
                    })
                    .collect();
                rows.rotate_left(i * 5 % 12);
                if i % 2 == 1 {
                    rows.reverse();
                }
                let store = store.clone();
                tokio::spawn(async move { store.add_deliveries(&rows, RENEW_JOB, now).await })
            });
            for added in futures_util::future::join_all(chunks).await {
                added.unwrap().expect("every chunk commits");
            }
            all_cutoffs.extend(cutoffs);
        }
        let filter = RunFilter { job: Some(RENEW_JOB.into()), state: None, before_id: None, limit: 1000 };
        let timers: Vec<i64> = store
            .runs(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.scheduled_for)
            .filter(|at| all_cutoffs.contains(at))
            .collect();
        assert_eq!(timers.len(), all_cutoffs.len(), "one timer per cutoff: {timers:?}");
        for sub in &subs {
            let listed = app.admin_get(&format!("/api/v1/subscriptions/{sub}/deliveries?limit=100")).await;
            let added = listed["items"].as_array().unwrap().iter().filter(|d| str_of(&d["date"]).as_str() >= "2027-11-01").count();
            assert_eq!(added, all_cutoffs.len(), "{sub}: {listed}");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_pause_that_ends_between_two_due_deliveries_bills_both_in_one_run(backend) {
        // With a cutoff ten days ahead, a renewal that did not run for a week finds two
        // deliveries of one weekly subscription due, both after a pause that has not ended
        // yet. The first resumes it; the second, read as paused, must bill too: the run must
        // not try to resume it twice, and fail as a whole.
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let mut plan = fruit_plan("20.00", 1);
        plan["cutoff_hours"] = json!(240);
        let plan = app.plan(plan).await;
        let (_, token) = app.shopper("Downtime", "pm_ok").await;
        let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-15"})).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        let id = str_of(&sub["id"]);
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{id}/pause"), Some(&token), json!({"until": "2026-10-15"})).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("paused")), "{body}");
        // The cutoffs of the 15th (4 Oct) and of the 22nd (11 Oct) have passed, nothing ran
        // since, and the pause ends on the 15th, after today.
        let now = "2026-10-12T00:00:00Z".parse().unwrap();
        let state = &app.state;
        pooled::subscriptions::run_renew(&state.store, &state.payments, &[1, 3, 5], chrono_tz::UTC, now)
            .await
            .expect("one run renews both");
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(sub["status"], "active", "{sub}");
        let invoices = app.items_of(&format!("/api/v1/subscriptions/{id}/invoices"), &token).await;
        let billed: Vec<(String, String)> = invoices.iter().map(|i| (str_of(&i["delivery_date"]), str_of(&i["status"]))).collect();
        assert_eq!(billed, [("2026-10-15".to_owned(), "paid".to_owned()), ("2026-10-22".into(), "paid".into())]);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_price_change_is_announced_only_to_the_plans_billed_subscribers(backend) {
        let app = app_at(backend, "2026-09-28T00:00:00Z").await;
        let changed = app.plan(fruit_plan("20.00", 1)).await;
        let other = app.plan(fruit_plan("25.00", 1)).await;
        let mut subs = Vec::new();
        for (name, plan) in [("Kept", &changed), ("Gone", &changed), ("Elsewhere", &other)] {
            let (_, token) = app.shopper(name, "pm_ok").await;
            let (status, sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
                "plan_id": plan, "delivery_weekday": "thu", "start_date": "2026-10-08"})).await;
            assert_eq!(status, StatusCode::CREATED, "{sub}");
            subs.push((str_of(&sub["id"]), token));
        }
        let (gone, token) = &subs[1];
        let (status, body) = app.post(&format!("/api/v1/subscriptions/{gone}/cancel"), Some(token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = app.call(Method::PUT, &format!("/api/v1/plans/{changed}"), Some(ADMIN_TOKEN), Some(json!({"price_per_delivery": "22.00"}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for (name, announced) in [("kept", 1), ("gone", 0), ("elsewhere", 0)] {
            let outbox = app.admin_get(&format!("/api/v1/ops/outbox?to={name}@example.com&limit=100")).await;
            let notices = outbox["items"].as_array().unwrap().iter().filter(|e| e["template"] == "price_changed").count();
            assert_eq!(notices, announced, "{name}: {outbox}");
        }
        app.stop().await;
    }
}
