//! Pages: `/ops` (sign-in, what it shows, its CSRF-guarded buttons) on both backends, and the
//! campaign page and sign-in as a real headless Chromium renders them.

use crate::helpers::{ADMIN_TOKEN, TestApp, str_of};
use crate::on_both_backends;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;

on_both_backends! {
    async fn the_ops_page_shows_jobs_and_runs_them(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some("2027-03-26T12:00:00Z".parse().unwrap());
            s.time_zone = chrono_tz::Europe::Berlin;
        })
        .await;
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let url = |p: &str| format!("{}{p}", app.base);

        let res = client.get(url("/ops")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        assert_eq!(res.headers()[LOCATION], "/login");
        let res = client.post(url("/login")).form(&[("token", "wrong")]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let res = client.post(url("/login")).form(&[("tokn", ADMIN_TOKEN)]).send().await.unwrap();
        assert_error_page(res, StatusCode::UNPROCESSABLE_ENTITY, "<code>token</code>: missing field `token`").await;
        let res = client.post(url("/login")).json(&json!({"token": ADMIN_TOKEN})).send().await.unwrap();
        assert_error_page(res, StatusCode::UNSUPPORTED_MEDIA_TYPE, "as application/x-www-form-urlencoded").await;
        let res = client.post(url("/login")).form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        let cookie = res.headers()[SET_COOKIE].to_str().unwrap().to_owned();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && !cookie.contains("Secure"), "{cookie}");
        // Behind a TLS proxy the cookie is never sent over plain HTTP.
        let res = client.post(url("/login")).header("X-Forwarded-Proto", "https").form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
        assert!(res.headers()[SET_COOKIE].to_str().unwrap().ends_with("; Secure"), "{:?}", res.headers());
        let session = cookie.split(';').next().unwrap().to_owned();

        // Within the session's 12 hours.
        app.advance("2027-03-26T23:00:00Z").await;
        let html = client.get(url("/ops")).header(COOKIE, &session).send().await.unwrap().text().await.unwrap();
        for expected in ["subscription-plan", "every 15 minutes (UTC)", "(DST)", "<svg", "Instances"] {
            assert!(html.contains(expected), "the page lacks {expected}");
        }
        let csrf = html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();

        let res = client.post(url("/ops/jobs/grower-orders/run")).form(&[("csrf", "forged")]).send().await.unwrap();
        assert_error_page(res, StatusCode::UNAUTHORIZED, "<a href=\"/login\">Sign in</a> with your token to see this page.").await;
        let res = client.post(url("/ops/jobs/grower-orders/run")).header(COOKIE, &session).form(&[("csrf", "forged")]).send().await.unwrap();
        assert_error_page(res, StatusCode::FORBIDDEN, "this form is not from your current session of /ops; nothing was changed").await;
        assert!(app.runs_of("grower-orders").await.iter().all(|r| r["trigger"] != "manual"), "a forged form changes nothing");
        let res = client.post(url("/ops/jobs/grower-orders/run")).header(COOKIE, &session).form(&[("csrf", csrf.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        assert!(app.runs_of("grower-orders").await.iter().any(|r| r["trigger"] == "manual" && r["state"] == "succeeded"));
        let res = client.post(url("/ops/jobs/grower-orders/pause")).header(COOKIE, &session).form(&[("csrf", csrf.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        let html = client.get(url("/ops")).header(COOKIE, &session).send().await.unwrap().text().await.unwrap();
        assert!(html.contains("paused from /ops"));
        // A timer due before a job's next slot is shown first.
        let now = app.state.clock.now();
        app.state.store.add_timer("billing-dunning", (now + chrono::Duration::minutes(20)).timestamp_micros(), now.timestamp_micros()).await.unwrap();
        let html = client.get(url("/ops")).header(COOKIE, &session).send().await.unwrap().text().await.unwrap();
        assert!(html.contains("2027-03-26T23:20:00+00:00</strong> <small>timer or retry"), "{html}");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_page_session_holds_no_token_and_ends_at_sign_out_or_after_twelve_hours(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some("2027-03-26T12:00:00Z".parse().unwrap());
        })
        .await;
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let url = |p: &str| format!("{}{p}", app.base);
        let sign_in = || async {
            let res = client.post(url("/login")).form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::SEE_OTHER);
            res.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned()
        };
        // What the ops page answers a cookie: its CSRF token, or where it sends the browser.
        let ops = |cookie: String| {
            let (client, page) = (client.clone(), url("/ops"));
            async move {
            let res = client.get(page).header(COOKIE, cookie).send().await.unwrap();
            match res.status() {
                StatusCode::OK => {
                    let html = res.text().await.unwrap();
                    assert!(html.contains("action=\"/logout\""), "a signed-in page offers sign-out");
                    Ok(html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned())
                }
                status => Err((status, res.headers()[LOCATION].to_str().unwrap().to_owned())),
            }
            }
        };
        let (a, b) = (sign_in().await, sign_in().await);
        assert!(a.starts_with("pooled_session=ses_") && !a.contains(ADMIN_TOKEN), "the cookie holds a session id, not the token: {a}");
        assert_ne!(a, b);
        let (csrf_a, csrf_b) = (ops(a.clone()).await.unwrap(), ops(b.clone()).await.unwrap());
        assert_ne!(csrf_a, csrf_b, "each session its own CSRF token");
        let res = client.post(url("/ops/jobs/grower-orders/pause")).header(COOKIE, &b).form(&[("csrf", csrf_a.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "one session's token does not pass for another's");
        let signed_out = Err((StatusCode::SEE_OTHER, "/login".to_owned()));
        assert_eq!(ops("pooled_session=ses_forged".into()).await, signed_out);
        // With the bearer header there is no session to end.
        let html = client.get(url("/ops")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
        assert!(!html.contains("action=\"/logout\""));

        // Another site cannot sign the browser out.
        let res = client.post(url("/logout")).header(COOKIE, &a).header("sec-fetch-site", "cross-site").send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(ops(a.clone()).await.is_ok());
        // A bearer header beside the cookie does not keep the cookie's session alive.
        let res = client.post(url("/logout")).header(COOKIE, &a).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!((res.status(), res.headers()[LOCATION].to_str().unwrap()), (StatusCode::SEE_OTHER, "/login?signed_out=true"));
        assert!(res.headers()[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"), "the browser forgets it");
        assert_eq!(ops(a.clone()).await, signed_out, "the old cookie, replayed, signs nobody in");
        let form = client.get(url("/login?signed_out=true")).send().await.unwrap().text().await.unwrap();
        assert!(form.contains("You are signed out."));
        assert!(ops(b.clone()).await.is_ok(), "another session goes on");
        // Signing in again from a browser with a session ends that session.
        let res = client.post(url("/login")).header(COOKIE, &b).form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
        let c = res.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();
        assert_eq!(ops(b.clone()).await, signed_out);
        let b = c;

        // Twelve hours on the clock end it.
        app.advance("2027-03-26T23:59:00Z").await;
        assert!(ops(b.clone()).await.is_ok());
        app.advance("2027-03-27T00:00:01Z").await;
        assert_eq!(ops(b.clone()).await, signed_out);
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_campaign_past_its_deadline_but_not_yet_closed_says_so(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:00:00Z".parse().unwrap()).await;
        let (factory, _) = app.manufacturer("Northwind").await;
        let c = app.campaign(json!({
            "title": "Down jacket", "sku": "DJ", "currency": "EUR", "reference_price": "200.00",
            "deposit_percent": "10", "opens_at": "2026-06-01T00:00:00Z", "closes_at": "2026-06-02T00:00:00Z",
            "time_zone": "Europe/Berlin",
            "quotes": [{"manufacturer_id": factory, "lead_time_days": 30,
                        "tiers": [{"min_qty": 2, "unit_price": "180.00"}]}]})).await;
        let page = format!("{}/campaigns/{}", app.base, str_of(&c["id"]));
        let html = app.client.get(&page).send().await.unwrap().text().await.unwrap();
        assert!(html.contains("Closes Tuesday 2 June 2026, 02:00 CEST (Europe/Berlin) — 1 days 0 hours left."), "{html}");
        // The close waits (here: paused by ops); the page no longer counts down below zero.
        let (status, _) = app.post("/api/v1/ops/jobs/presale-close/pause", Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        app.advance("2026-06-02T01:00:00Z").await;
        let html = app.client.get(&page).send().await.unwrap().text().await.unwrap();
        assert!(html.contains("Closed Tuesday 2 June 2026, 02:00 CEST (Europe/Berlin): the price locks once"), "{html}");
        assert!(!html.contains("left."), "{html}");
        // A page that is not there says so as a page, not as JSON.
        let res = app.client.get(format!("{}/campaigns/cmp_nope", app.base)).send().await.unwrap();
        assert_error_page(res, StatusCode::NOT_FOUND, "no campaign cmp_nope").await;
        app.stop().await;
    }
}

on_both_backends! {
    /// Ops pause a job with a note, resume it, and run the slots it missed from the page, as
    /// the API does; a bad range is a page naming the field, and nothing runs.
    async fn ops_pause_with_a_note_and_backfill_the_missed_slots_from_the_page(backend) {
        let app = TestApp::spawn_manual(backend, "2026-06-01T00:30:00Z".parse().unwrap()).await;
        let (client, session, csrf) = app.ops_session().await;
        let post = |path: &str, fields: Vec<(&str, String)>| {
            let mut fields = fields;
            fields.push(("csrf", csrf.clone()));
            client.post(format!("{}{path}", app.base)).header(COOKIE, &session).form(&fields).send()
        };
        let page = |path: &str| {
            let req = client.get(format!("{}{path}", app.base)).header(COOKIE, &session);
            async move { req.send().await.unwrap().text().await.unwrap() }
        };

        let long = "x".repeat(501);
        let res = post("/ops/jobs/billing-dunning/pause", vec![("note", long)]).await.unwrap();
        assert_error_page(res, StatusCode::UNPROCESSABLE_ENTITY, "<code>note</code>: must be at most 500 characters").await;
        let res = post("/ops/jobs/billing-dunning/pause", vec![("note", "gateway maintenance".into())]).await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        let html = page("/ops").await;
        assert!(html.contains("<em>paused</em>: gateway maintenance"), "{html}");
        assert!(html.contains("action=\"/ops/jobs/billing-dunning/resume\""), "a paused job offers resume");
        app.advance("2026-06-01T05:10:00Z").await;
        assert!(app.runs_of("billing-dunning").await.is_empty(), "a paused job runs nothing");
        let res = post("/ops/jobs/billing-dunning/resume", vec![]).await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        app.advance("2026-06-01T06:00:00Z").await;

        let backfill = "/ops/jobs/billing-dunning/backfill";
        for (fields, detail) in [
            (vec![("to", "2026-06-01T03:00")], "<code>from</code>: is required"),
            (vec![("from", "yesterday"), ("to", "2026-06-01T03:00")], "<code>from</code>: &#39;yesterday&#39; is not an instant: write 2026-12-01T09:00 (UTC)"),
            (vec![("from", "2026-06-01T03:00"), ("to", "2026-06-01T02:00")], "<code>to</code>: must not be before from"),
            (vec![("from", "2026-06-01T03:00"), ("to", "2030-01-01T00:00")], "<code>to</code>: must not be in the future"),
        ] {
            let fields = fields.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
            assert_error_page(post(backfill, fields).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY, detail).await;
        }
        assert_eq!(app.runs_of("billing-dunning").await.len(), 1, "a refused backfill runs nothing");
        // As a browser's datetime-local sends them, with and without seconds, read as UTC.
        let res = post(backfill, vec![("from", "2026-06-01T02:00".into()), ("to", "2026-06-01T03:00:00".into())]).await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        assert_eq!(res.headers()[LOCATION], "/ops?job=billing-dunning&backfilled=2#runs");
        let runs = app.runs_of("billing-dunning").await;
        let slots: Vec<&str> = runs.iter().map(|r| r["scheduled_for"].as_str().unwrap()).collect();
        assert_eq!(slots, ["2026-06-01T02:00:00Z", "2026-06-01T03:00:00Z", "2026-06-01T06:00:00Z"]);
        assert!(runs[..2].iter().all(|r| r["trigger"] == "backfill" && r["state"] == "succeeded"), "{runs:?}");

        let html = page("/ops?job=billing-dunning&backfilled=2").await;
        for expected in [
            "Backfill of billing-dunning: 2 slots that had not run will run.",
            "Recent runs of billing-dunning",
            "<td>2026-06-01T02:00:00+00:00</td><td>backfill</td><td class=\"succeeded\">succeeded</td>",
        ] {
            assert!(html.contains(expected), "the page lacks {expected}: {html}");
        }
        assert!(!html.contains("<td>maintenance-prune</td>"), "only that job's runs");
        let res = client.get(format!("{}/ops?job=nope", app.base)).header(COOKIE, &session).send().await.unwrap();
        assert_error_page(res, StatusCode::NOT_FOUND, "no job named nope").await;
        app.stop().await;
    }
}

/// A page's error answer: `status`, as an HTML page that shows `detail`.
async fn assert_error_page(res: reqwest::Response, status: StatusCode, detail: &str) {
    assert_eq!(res.status(), status);
    let kind = res.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let html = res.text().await.unwrap();
    assert!(kind.starts_with("text/html"), "{kind}: {html}");
    let title = status.canonical_reason().unwrap();
    assert!(
        html.contains(&format!("<h1>{title}</h1>")) && html.contains(detail),
        "{html}"
    );
}

/// A Berlin fruit box for one shopper, subscribed on 28 September for 8 October: the app, its
/// subscription's id and the shopper's token.
async fn fruit_subscriber(backend: crate::helpers::Backend) -> (TestApp, String, String) {
    let app = TestApp::spawn_with(backend, |s| {
        s.clock = pooled::config::ClockMode::Manual;
        s.clock_start = Some("2026-09-28T00:00:00Z".parse().unwrap());
        s.time_zone = chrono_tz::Europe::Berlin;
    })
    .await;
    let (status, plan) = app
        .post(
            "/api/v1/plans",
            Some(ADMIN_TOKEN),
            json!({"name": "Weekly fruit", "kind": "fruit",
        "currency": "EUR", "price_per_delivery": "24.90", "cadence_weeks": 1, "portions_per_day": 2,
        "delivery_weekdays": ["thu"], "time_zone": "Europe/Berlin"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    let (_, token) = app.shopper("Cal", "pm_ok").await;
    let (status, sub) = app
        .post(
            "/api/v1/subscriptions",
            Some(&token),
            json!({
        "plan_id": plan["id"], "delivery_weekday": "thu", "start_date": "2026-10-08"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    (app, str_of(&sub["id"]), token)
}

on_both_backends! {
    async fn a_subscription_calendar_shows_something_ready_every_day_to_its_shopper(backend) {
        let (app, id, token) = fruit_subscriber(backend).await;
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let url = |p: &str| format!("{}{p}", app.base);
        app.advance("2026-10-09T12:00:00Z").await;
        let page = format!("/subscriptions/{id}/calendar");
        // The private link from the API needs no sign-in.
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        let link = str_of(&sub["calendar_page"]);
        assert!(link.starts_with(&format!("{page}?key=")), "{sub}");
        let res = client.get(url(&link)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let html = res.text().await.unwrap();
        for expected in ["<h1>Weekly fruit</h1>", "Thu 8 Oct", "arrives", "dispatched", "Thu 15 Oct", "24.90 EUR", "ready to eat"] {
            assert!(html.contains(expected), "the calendar lacks {expected}: {html}");
        }
        assert!(!html.contains("class=\"failed\""), "every day from the first box has its portions: {html}");
        assert_eq!(client.get(url(&format!("{page}?key=forged"))).send().await.unwrap().status(), StatusCode::NOT_FOUND);
        // Without the link: sign in first, and come back.
        let res = client.get(url(&page)).send().await.unwrap();
        let encoded = page.replace('/', "%2F");
        assert_eq!((res.status(), res.headers()[LOCATION].to_str().unwrap()), (StatusCode::SEE_OTHER, format!("/login?next={encoded}").as_str()));
        let form = client.get(url(&format!("/login?next={encoded}"))).send().await.unwrap().text().await.unwrap();
        assert!(form.contains(&format!("name=\"next\" value=\"{page}\"")), "{form}");
        let res = client.post(url("/login")).form(&[("token", "pld_shp_forged"), ("next", page.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let res = client.post(url("/login")).form(&[("token", token.as_str()), ("next", page.as_str())]).send().await.unwrap();
        assert_eq!((res.status(), res.headers()[LOCATION].to_str().unwrap()), (StatusCode::SEE_OTHER, page.as_str()));
        let session = res.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();
        let res = client.get(url(&page)).header(COOKIE, &session).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // A sign-in never sends the browser to another site, nor comes from one.
        for evil in ["//evil.example/", "/\t/evil.example/", "/\\evil.example", "https://evil.example/"] {
            let res = client.post(url("/login")).form(&[("token", token.as_str()), ("next", evil)]).send().await.unwrap();
            assert_eq!(res.headers()[LOCATION], "/login?signed_in=true", "{evil:?}");
        }
        let res = client.post(url("/login")).header("origin", "https://evil.example").form(&[("token", token.as_str())]).send().await.unwrap();
        assert_error_page(res, StatusCode::FORBIDDEN, "this form was sent from another site; nothing was changed").await;
        // Browsers that say where a post comes from are believed over Origin and Host, which a
        // proxy in front may rewrite.
        for (site, origin, status) in [
            ("cross-site", "https://evil.example", StatusCode::FORBIDDEN),
            ("same-site", "https://other.shop.example", StatusCode::FORBIDDEN),
            ("same-origin", "https://shop.example", StatusCode::SEE_OTHER),
        ] {
            let res = client.post(url("/login")).header("sec-fetch-site", site).header("origin", origin).form(&[("token", token.as_str())]).send().await.unwrap();
            assert_eq!(res.status(), status, "{site}");
        }
        let host = app.base.trim_start_matches("http://").to_owned();
        let res = client.post(url("/login")).header("origin", format!("http://{host}")).form(&[("token", token.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        assert!(res.headers()[SET_COOKIE].to_str().unwrap().contains("Max-Age="), "a session ends");
        // Another subscription's key opens nothing here.
        let (status, other_sub) = app.post("/api/v1/subscriptions", Some(&token), json!({
            "plan_id": sub["plan_id"], "delivery_weekday": "thu", "start_date": "2026-10-22"})).await;
        assert_eq!(status, StatusCode::CREATED, "{other_sub}");
        let other_key = str_of(&other_sub["calendar_page"]).split("key=").nth(1).unwrap().to_owned();
        assert_ne!(other_key, link.split("key=").nth(1).unwrap(), "each subscription its own key");
        assert_eq!(client.get(url(&format!("{page}?key={other_key}"))).send().await.unwrap().status(), StatusCode::NOT_FOUND);
        let (_, again) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(again["calendar_page"], sub["calendar_page"], "the link stays the same");
        // Another shopper: not found; a manufacturer: the wrong role; ops: as the shopper sees it.
        let (_, other) = app.shopper("Other", "pm_ok").await;
        let (_, maker) = app.manufacturer("Orchard").await;
        for (bearer, status) in [(other, StatusCode::NOT_FOUND), (maker, StatusCode::FORBIDDEN), (ADMIN_TOKEN.to_owned(), StatusCode::OK)] {
            let res = client.get(url(&page)).bearer_auth(&bearer).send().await.unwrap();
            assert_eq!(res.status(), status);
        }
        let res = client.get(url("/subscriptions/sub_nope/calendar")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_error_page(res, StatusCode::NOT_FOUND, "no subscription sub_nope").await;
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_calendar_link_can_be_replaced_and_the_old_one_opens_nothing(backend) {
        let (app, id, token) = fruit_subscriber(backend).await;
        let client = reqwest::Client::new();
        let opens = |link: String| {
            let (client, url) = (client.clone(), format!("{}{link}", app.base));
            async move { client.get(url).send().await.unwrap().status() }
        };
        let (_, sub) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        let old = str_of(&sub["calendar_page"]);
        assert_eq!(opens(old.clone()).await, StatusCode::OK);
        let path = format!("/api/v1/subscriptions/{id}/calendar-link");
        // Only its shopper and ops: another shopper finds nothing, a manufacturer has the wrong role.
        let (_, other) = app.shopper("Nosy", "pm_ok").await;
        let (_, maker) = app.manufacturer("Grove").await;
        for (bearer, status) in [(other.as_str(), StatusCode::NOT_FOUND), (maker.as_str(), StatusCode::FORBIDDEN)] {
            let (got, body) = app.post(&path, Some(bearer), json!({})).await;
            assert_eq!(got, status, "{body}");
        }
        assert_eq!(opens(old.clone()).await, StatusCode::OK, "a refused replacement changes nothing");
        let (status, replaced) = app.post(&path, Some(&token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{replaced}");
        let new = str_of(&replaced["calendar_page"]);
        assert_ne!(new, old);
        assert_eq!((opens(old.clone()).await, opens(new.clone()).await), (StatusCode::NOT_FOUND, StatusCode::OK));
        let (_, again) = app.get(&format!("/api/v1/subscriptions/{id}"), Some(&token)).await;
        assert_eq!(again["calendar_page"], new.as_str(), "the new link stays");
        let (status, by_ops) = app.post(&path, Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(opens(new).await, StatusCode::NOT_FOUND);
        assert_eq!(opens(str_of(&by_ops["calendar_page"])).await, StatusCode::OK);
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_renders_a_subscription_calendar_from_its_private_link() {
    let (app, id, token) = fruit_subscriber(crate::helpers::Backend::Sqlite).await;
    let (_, sub) = app
        .get(&format!("/api/v1/subscriptions/{id}"), Some(&token))
        .await;
    let Some(dom) = browser_dom(&format!("{}{}", app.base, str_of(&sub["calendar_page"]))).await
    else {
        return;
    };
    for expected in [
        "<h1>Weekly fruit</h1>",
        "Thu 8 Oct",
        "arrives",
        "scheduled",
        "ready to eat",
    ] {
        assert!(
            dom.contains(expected),
            "the rendered calendar lacks {expected}: {dom}"
        );
    }
    app.stop().await;
}

/// The page as a real headless Chromium renders it (its DOM after parsing), or `None` to
/// skip locally when Chromium is not installed (never under CI, which installs it).
async fn browser_dom(url: &str) -> Option<String> {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(chromium) = chromium else {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
            "CI=true but Chromium is not installed: the browser tests must run"
        );
        eprintln!("Chromium not installed: skipping the browser test");
        return None;
    };
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(90), run)
        .await
        .expect("chromium finished")
        .expect("chromium ran");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_renders_the_campaign_page_and_the_sign_in() {
    let app = TestApp::spawn_manual(
        crate::helpers::Backend::Sqlite,
        "2026-06-01T00:00:00Z".parse().unwrap(),
    )
    .await;
    let (factory, _) = app.manufacturer("Northwind").await;
    let c = app.campaign(serde_json::json!({
        "title": "Down jacket", "sku": "DJ", "currency": "EUR", "reference_price": "200.00",
        "deposit_percent": "10", "opens_at": "2026-06-01T00:00:00Z", "closes_at": "2026-06-20T00:00:00Z",
        "time_zone": "Europe/Berlin", "variants": ["M"],
        "quotes": [{"manufacturer_id": factory, "lead_time_days": 30, "capacity": 100,
                    "tiers": [{"min_qty": 2, "unit_price": "180.00"}, {"min_qty": 5, "unit_price": "150.00"}]}]})).await;
    let id = crate::helpers::str_of(&c["id"]);
    for i in 0..3 {
        let (_, token) = app.shopper(&format!("Browser{i}"), "pm_ok").await;
        let (status, body) = app
            .pledge(&id, &token, serde_json::json!({"qty": 1, "variant": "M"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let Some(dom) = browser_dom(&format!("{}/campaigns/{id}", app.base)).await else {
        return;
    };
    for expected in [
        "<h1>Down jacket</h1>",
        "<svg",
        "<path d=\"M",
        "tier at 5 units",
        "2 more units unlock 150.00 EUR",
        "Closes Saturday 20 June 2026, 02:00 CEST",
        "<progress",
    ] {
        assert!(
            dom.contains(expected),
            "the rendered page lacks {expected}: {dom}"
        );
    }
    // /ops without a session lands on the sign-in form.
    let dom = browser_dom(&format!("{}/ops", app.base)).await.unwrap();
    assert!(
        dom.contains("<form") && dom.contains("name=\"token\""),
        "{dom}"
    );
    app.stop().await;
}
