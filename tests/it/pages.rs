//! The `/ops` page: sign-in, what it shows, and its CSRF-guarded buttons, on both backends.

use crate::helpers::{ADMIN_TOKEN, TestApp};
use crate::on_both_backends;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

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
        let res = client.post(url("/login")).form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        let cookie = res.headers()[SET_COOKIE].to_str().unwrap().to_owned();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        let session = cookie.split(';').next().unwrap().to_owned();

        app.advance("2027-03-27T12:00:00Z").await;
        let html = client.get(url("/ops")).header(COOKIE, &session).send().await.unwrap().text().await.unwrap();
        for expected in ["subscription-plan", "every 15 minutes (UTC)", "(DST)", "<svg", "Instances"] {
            assert!(html.contains(expected), "the page lacks {expected}");
        }
        let csrf = html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();

        let res = client.post(url("/ops/jobs/grower-orders/run")).header(COOKIE, &session).form(&[("csrf", "forged")]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(app.runs_of("grower-orders").await.iter().all(|r| r["trigger"] != "manual"), "a forged form changes nothing");
        let res = client.post(url("/ops/jobs/grower-orders/run")).header(COOKIE, &session).form(&[("csrf", csrf.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        assert!(app.runs_of("grower-orders").await.iter().any(|r| r["trigger"] == "manual" && r["state"] == "succeeded"));
        let res = client.post(url("/ops/jobs/grower-orders/pause")).header(COOKIE, &session).form(&[("csrf", csrf.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        let html = client.get(url("/ops")).header(COOKIE, &session).send().await.unwrap().text().await.unwrap();
        assert!(html.contains("paused from /ops"));
        app.stop().await;
    }
}
