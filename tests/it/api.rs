//! The HTTP conventions of API.md: health, metrics, OpenAPI, problem+json, identity and roles,
//! idempotency keys, the ops clock.

use crate::helpers::{ADMIN_TOKEN, TestApp, str_of};
use crate::on_both_backends;
use chrono::{TimeZone, Utc};
use reqwest::{Method, StatusCode, header};
use serde_json::json;

on_both_backends! {
    async fn health_readiness_metrics_and_openapi(backend) {
        let app = TestApp::spawn(backend).await;
        assert_eq!(app.get("/healthz", None).await.0, StatusCode::OK);
        let (status, ready) = app.get("/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
        let expected = match backend {
            crate::helpers::Backend::Sqlite => "sqlite",
            crate::helpers::Backend::Postgres => "postgres",
        };
        assert_eq!(ready["database"], expected);

        let (status, doc) = app.get("/api/openapi.json", None).await;
        assert_eq!(status, StatusCode::OK);
        for path in ["/api/v1/shoppers", "/api/v1/manufacturers", "/api/v1/ops/clock/advance"] {
            assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
        }

        let (_, metrics) = app.get("/metrics", None).await;
        let metrics = metrics.as_str().expect("text").to_owned();
        assert!(
            metrics.contains(r#"http_requests_total{method="GET",route="/readyz",status="200"}"#),
            "{metrics}"
        );
        assert!(metrics.contains("http_request_duration_seconds_bucket"), "{metrics}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn every_error_is_problem_json(backend) {
        let app = TestApp::spawn(backend).await;
        let url = |p: &str| format!("{}{p}", app.base);
        let cases = [
            ("unknown route", app.client.get(url("/api/v1/nope")).build().unwrap(), 404, "not_found"),
            ("wrong method", app.client.delete(url("/healthz")).build().unwrap(), 405, "method_not_allowed"),
            ("bad JSON", app.client.post(url("/api/v1/shoppers")).header(header::CONTENT_TYPE, "application/json").body("{\"name\":").build().unwrap(), 400, "malformed_json"),
            ("wrong content type", app.client.post(url("/api/v1/shoppers")).header(header::CONTENT_TYPE, "text/plain").body("{}").build().unwrap(), 415, "unsupported_media_type"),
            ("oversized body", app.client.post(url("/api/v1/shoppers")).header(header::CONTENT_TYPE, "application/json").body(format!("{{\"name\":\"{}\"}}", "x".repeat(2 << 20))).build().unwrap(), 413, "payload_too_large"),
            ("wrong shape", app.client.post(url("/api/v1/shoppers")).json(&json!({"name": 5, "email": "a@b.co"})).build().unwrap(), 422, "validation_failed"),
            ("oversized optional body", app.client.post(url("/api/v1/ops/jobs/billing-dunning/pause")).bearer_auth(ADMIN_TOKEN).body(format!("{{\"note\":\"{}\"}}", "x".repeat(2 << 20))).build().unwrap(), 413, "payload_too_large"),
            ("bad optional body", app.client.post(url("/api/v1/ops/jobs/billing-dunning/pause")).bearer_auth(ADMIN_TOKEN).body("{\"note\":").build().unwrap(), 400, "malformed_json"),
            ("no token", app.client.post(url("/api/v1/manufacturers")).json(&json!({"name": "F", "email": "f@x.co"})).build().unwrap(), 401, "unauthorized"),
        ];
        for (what, request, status, code) in cases {
            // A client still writing the oversized body when the server has answered and
            // closed can see a broken pipe instead of the answer; it sends again, as clients do.
            let mut res = app.client.execute(request.try_clone().unwrap()).await;
            for _ in 0..4 {
                if res.is_ok() {
                    break;
                }
                res = app.client.execute(request.try_clone().unwrap()).await;
            }
            let res = res.unwrap();
            assert_eq!(res.status().as_u16(), status, "{what}");
            assert_eq!(
                res.headers()[header::CONTENT_TYPE], "application/problem+json",
                "{what}"
            );
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body["code"], code, "{what}: {body}");
            assert_eq!(body["status"], status, "{what}");
            assert!(body["title"].is_string() && body["detail"].is_string() && body["type"].is_string(), "{what}: {body}");
        }

        // Validation names every bad field, and nothing is created.
        let (status, body) = app
            .post("/api/v1/shoppers", None, json!({"name": " ", "email": "nope", "time_zone": "Mars/Base", "payment_token": "visa"}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let fields: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert_eq!(fields, ["name", "email", "time_zone", "payment_token"]);
        // A missing field is named as itself (a nested one with its path), an unknown one too.
        for (body, field) in [(json!({"name": "A"}), "email"), (json!({"title": "x"}), "title")] {
            let (status, problem) = app.post("/api/v1/shoppers", None, body).await;
            assert_eq!((status, problem["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{problem}");
        }
        let (status, problem) = app.post("/api/v1/campaigns", Some(ADMIN_TOKEN), json!({
            "title": "Down jacket", "sku": "DJ-1", "currency": "EUR", "reference_price": "200.00",
            "deposit_percent": "10", "opens_at": "2026-07-01T00:00:00Z", "closes_at": "2026-08-01T00:00:00Z",
            "time_zone": "Europe/Berlin", "balance_window_hours": 72,
            "quotes": [{"manufacturer_id": "mfr_x", "lead_time_days": 60, "tiers": [{"min_qty": 100}]}]})).await;
        assert_eq!((status, problem["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("quotes[0].tiers[0].unit_price")), "{problem}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn parties_see_only_their_own(backend) {
        let app = TestApp::spawn(backend).await;
        let (ana, ana_token) = app.shopper("Ana", "pm_ok").await;
        let (bob, bob_token) = app.shopper("Bob", "pm_decline").await;

        let (status, me) = app.get(&format!("/api/v1/shoppers/{ana}"), Some(&ana_token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(me["email"], "ana@example.com");
        assert_eq!(me["has_payment_method"], true);
        // Another party's resource answers 404, an unknown token 401, ops see everything.
        assert_eq!(app.get(&format!("/api/v1/shoppers/{ana}"), Some(&bob_token)).await.0, StatusCode::NOT_FOUND);
        assert_eq!(app.get(&format!("/api/v1/shoppers/{ana}"), Some("pld_shp_forged")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(app.get(&format!("/api/v1/shoppers/{ana}"), Some(ADMIN_TOKEN)).await.0, StatusCode::OK);

        // Payment method: only the shopper themself; bad tokens change nothing.
        let path = format!("/api/v1/shoppers/{bob}/payment-method");
        let (status, _) = app.call(Method::PUT, &path, Some(&ana_token), Some(json!({"payment_token": "pm_ok"}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = app.call(Method::PUT, &path, Some(&bob_token), Some(json!({"payment_token": "4242"}))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["errors"][0]["field"], "payment_token");
        let (status, body) = app.call(Method::PUT, &path, Some(&bob_token), Some(json!({"payment_token": "pm_ok"}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["has_payment_method"], true);

        // Manufacturers are registered by ops only.
        let mfr = json!({"name": "Northwind Down", "email": "orders@northwind.example"});
        assert_eq!(app.post("/api/v1/manufacturers", Some(&ana_token), mfr.clone()).await.0, StatusCode::FORBIDDEN);
        let (status, created) = app.post("/api/v1/manufacturers", Some(ADMIN_TOKEN), mfr).await;
        assert_eq!(status, StatusCode::CREATED);
        let (id, token) = (str_of(&created["id"]), str_of(&created["token"]));
        assert_eq!(app.get(&format!("/api/v1/manufacturers/{id}"), Some(&token)).await.0, StatusCode::OK);
        // A role that never reads the other's resources gets 403 whatever the id, so nothing is
        // learned about ids; a party of the right role gets 404 for another's.
        assert_eq!(app.get(&format!("/api/v1/manufacturers/{id}"), Some(&ana_token)).await.0, StatusCode::FORBIDDEN);
        assert_eq!(app.get("/api/v1/manufacturers/mfr_nope", Some(&ana_token)).await.0, StatusCode::FORBIDDEN);
        assert_eq!(app.get(&format!("/api/v1/shoppers/{ana}"), Some(&token)).await.0, StatusCode::FORBIDDEN);
        let path = format!("/api/v1/shoppers/{ana}/payment-method");
        for other in [token.as_str(), ADMIN_TOKEN] {
            let (status, body) = app.call(Method::PUT, &path, Some(other), Some(json!({"payment_token": "pm_ok"}))).await;
            assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "only the shopper sets their card");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn idempotency_keys_replay_and_refuse_reuse(backend) {
        let app = TestApp::spawn(backend).await;
        let signup = |key: &str, body: serde_json::Value| {
            app.client
                .post(format!("{}/api/v1/shoppers", app.base))
                .header("Idempotency-Key", key)
                .json(&body)
        };
        let body = json!({"name": "Cleo", "email": "cleo@example.com"});
        let first = signup("k-1", body.clone()).send().await.unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        let first: serde_json::Value = first.json().await.unwrap();

        let again = signup("k-1", body.clone()).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::CREATED);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: serde_json::Value = again.json().await.unwrap();
        assert_eq!(again, first, "the first response, token and all");

        let other = signup("k-1", json!({"name": "Cleo", "email": "other@example.com"})).send().await.unwrap();
        assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let other: serde_json::Value = other.json().await.unwrap();
        assert_eq!(other["code"], "idempotency_key_reused");

        // Twenty concurrent requests with one fresh key create exactly one shopper.
        let attempts = (0..20).map(|_| signup("k-race", body.clone()).send());
        let results = join_spawned(attempts).await;
        let mut ids = std::collections::BTreeSet::new();
        for res in results {
            let res = res.unwrap();
            match res.status() {
                StatusCode::CREATED => {
                    let v: serde_json::Value = res.json().await.unwrap();
                    ids.insert(str_of(&v["id"]));
                }
                StatusCode::CONFLICT => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(ids.len(), 1, "one shopper for one key: {ids:?}");
        app.stop().await;
    }
}

async fn join_spawned<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

on_both_backends! {
    async fn the_clock_moves_only_when_manual_and_only_forward(backend) {
        let system = TestApp::spawn(backend).await;
        let (status, clock) = system.get("/api/v1/ops/clock", Some(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(clock["mode"], "system");
        let (status, body) = system
            .post("/api/v1/ops/clock/advance", Some(ADMIN_TOKEN), json!({"to": "2030-01-01T00:00:00Z"}))
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["code"], "clock_not_manual");
        // The instance registered when it started; on the system clock it agrees with the database.
        let instances = system.admin_get("/api/v1/ops/instances").await["items"].clone();
        assert_eq!((instances[0]["id"].as_str(), instances[0]["version"].as_str()), (Some("test"), Some(env!("CARGO_PKG_VERSION"))), "{instances}");
        assert!(instances[0]["clock_skew_ms"].as_i64().unwrap().abs() < 5_000, "{instances}");
        let page = system.admin_get("/api/v1/ops/instances?limit=1").await;
        assert_eq!((page["items"].as_array().unwrap().len(), &page["next"]), (1, &serde_json::Value::Null), "{page}");
        let (status, problem) = system.get("/api/v1/ops/instances?after=nobody", Some(ADMIN_TOKEN)).await;
        assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("after")), "{problem}");
        system.stop().await;

        let start = Utc.with_ymd_and_hms(2026, 6, 1, 9, 0, 0).unwrap();
        let app = TestApp::spawn_manual(backend, start).await;
        let (_, clock) = app.get("/api/v1/ops/clock", Some(ADMIN_TOKEN)).await;
        assert_eq!(clock["mode"], "manual");
        assert_eq!(clock["now"], "2026-06-01T09:00:00Z");
        let beat = |instances: &serde_json::Value| instances[0]["heartbeat_at"].as_str().unwrap().parse::<chrono::DateTime<Utc>>().unwrap();
        let started = beat(&app.admin_get("/api/v1/ops/instances").await["items"]);
        let (status, body) = app
            .post("/api/v1/ops/clock/advance", Some(ADMIN_TOKEN), json!({"to": "2026-07-01T09:00:00Z"}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["now"], "2026-07-01T09:00:00Z");
        // Its runs show their ids as strings, as `/ops/runs` shows the same runs.
        let run = body["runs"].as_array().unwrap().last().unwrap();
        let (_, listed) = app.get(&format!("/api/v1/ops/runs?job={}&limit=500", str_of(&run["job"])), Some(ADMIN_TOKEN)).await;
        assert!(run["id"].is_string(), "{run}");
        assert!(listed["items"].as_array().unwrap().iter().any(|r| r["id"] == run["id"]), "{listed}");
        let (status, body) = app
            .post("/api/v1/ops/clock/advance", Some(ADMIN_TOKEN), json!({"to": "2026-06-15T00:00:00Z"}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["errors"][0]["field"], "to");
        let (_, clock) = app.get("/api/v1/ops/clock", Some(ADMIN_TOKEN)).await;
        assert_eq!(clock["now"], "2026-07-01T09:00:00Z", "a refused move changes nothing");

        let (_, shopper_token) = app.shopper("Dora", "pm_ok").await;
        assert_eq!(app.get("/api/v1/ops/clock", Some(&shopper_token)).await.0, StatusCode::FORBIDDEN);
        assert_eq!(app.get("/api/v1/ops/clock", None).await.0, StatusCode::UNAUTHORIZED);
        // A manual clock set months back shows as skew against the database's own time.
        let instances = app.admin_get("/api/v1/ops/instances").await["items"].clone();
        assert!(instances[0]["clock_skew_ms"].as_i64().unwrap() < -86_400_000, "{instances}");
        assert!(beat(&instances) > started, "no ticker beats for a manual clock; each advance does: {instances}");
        assert_eq!(app.get("/api/v1/ops/instances", Some(&shopper_token)).await.0, StatusCode::FORBIDDEN);
        app.stop().await;
    }
}
