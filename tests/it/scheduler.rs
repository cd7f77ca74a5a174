//! The scheduler through the HTTP API with the manual clock, on both backends: DST, downtime and
//! catch-up policies, fencing, retries and alerts, pause/resume/backfill, run now.

use crate::helpers::{ADMIN_TOKEN, TestApp, str_of};
use crate::on_both_backends;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn slots(runs: &[Value]) -> Vec<String> {
    runs.iter().map(|r| str_of(&r["scheduled_for"])).collect()
}

fn with_state<'a>(runs: &'a [Value], state: &str) -> Vec<&'a Value> {
    runs.iter().filter(|r| r["state"] == state).collect()
}

on_both_backends! {
    async fn wall_clock_jobs_follow_berlin_across_dst(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some(at("2027-03-20T00:00:00Z"));
            s.time_zone = chrono_tz::Europe::Berlin;
            s.job_overrides = Some("grower-orders.schedule=30 2 * * *".into());
        })
        .await;
        app.advance("2027-04-01T00:00:00Z").await;
        let plan = app.runs_of("subscription-plan").await;
        assert_eq!(slots(&plan), ["2027-03-24T05:00:00Z", "2027-03-31T04:00:00Z"], "Wed 06:00 Berlin");
        assert!(plan.iter().all(|r| r["state"] == "succeeded" && r["trigger"] == "schedule"), "{plan:?}");
        let daily = app.runs_of("grower-orders").await;
        let on_change_day: Vec<_> = slots(&daily).into_iter().filter(|s| s.starts_with("2027-03-28")).collect();
        assert_eq!(on_change_day, ["2027-03-28T01:00:00Z"], "02:30 doesn't exist: once, right after the gap");
        assert_eq!(daily.len(), 12, "one run per day");

        app.stop().await;

        // Autumn: 02:30 happens twice; the job runs once.
        let app = TestApp::spawn_with(backend, |s| {
                s.clock = pooled::config::ClockMode::Manual;
                s.clock_start = Some(at("2026-10-24T12:00:00Z"));
                s.time_zone = chrono_tz::Europe::Berlin;
                s.job_overrides = Some("grower-orders.schedule=30 2 * * *".into());
            })
            .await;
        app.advance("2026-10-26T12:00:00Z").await;
        let autumn: Vec<_> = slots(&app.runs_of("grower-orders").await).into_iter().filter(|s| s.starts_with("2026-10")).collect();
        assert_eq!(autumn, ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]);
        app.stop().await;
    }
}

/// Hourly jobs under each catch-up policy: `grower-orders` all, `billing-dunning` latest,
/// `presale-reminders` skip; grace 5 minutes.
const POLICIES: &str = "grower-orders.schedule=0 * * * *;grower-orders.grace=5m;\
    billing-dunning.grace=5m;presale-reminders.grace=5m";

async fn downtime(backend: crate::helpers::Backend, hours: i64) {
    let t0 = at("2026-06-01T00:30:00Z");
    let manual = |start: DateTime<Utc>| {
        move |s: &mut pooled::config::Settings| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some(start);
            s.job_overrides = Some(POLICIES.into());
        }
    };
    let app = TestApp::spawn_with(backend, manual(t0)).await;
    app.advance("2026-06-01T01:00:00Z").await;
    for job in ["grower-orders", "billing-dunning", "presale-reminders"] {
        let runs = app.runs_of(job).await;
        // Known since 00:30: the 00:00 slot is never run.
        assert_eq!(slots(&runs), ["2026-06-01T01:00:00Z"], "{job}");
    }
    // Down from 01:00 for `hours`; back at the top of an hour.
    let back = at("2026-06-01T01:00:00Z") + chrono::Duration::hours(hours);
    let app = app.restart_with(manual(back)).await;
    // A resume of a job that is not paused changes nothing: its missed slots still run.
    let (status, job) = app
        .post(
            "/api/v1/ops/jobs/grower-orders/resume",
            Some(ADMIN_TOKEN),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(
        (status, &job["paused"]),
        (StatusCode::OK, &serde_json::json!(false)),
        "{job}"
    );
    app.advance(&back.to_rfc3339()).await;
    let n = hours as usize;

    let all = app.runs_of("grower-orders").await;
    assert_eq!(
        with_state(&all, "succeeded").len(),
        n + 1,
        "all: every missed slot runs"
    );
    assert_eq!(
        all.iter().filter(|r| r["trigger"] == "catchup").count(),
        n - 1,
        "late slots run as catch-up"
    );

    let latest = app.runs_of("billing-dunning").await;
    assert_eq!(
        with_state(&latest, "succeeded").len(),
        2,
        "latest: only the newest runs"
    );
    let coalesced = with_state(&latest, "skipped");
    assert_eq!(
        coalesced.len(),
        n - 1,
        "latest: the others are recorded as skipped"
    );
    assert!(coalesced.iter().all(|r| r["skip_reason"] == "coalesced"));

    let skip = app.runs_of("presale-reminders").await;
    assert_eq!(
        with_state(&skip, "succeeded").len(),
        2,
        "skip: only the on-time slot runs"
    );
    let missed = with_state(&skip, "skipped");
    assert_eq!(missed.len(), n - 1);
    assert!(missed.iter().all(|r| r["skip_reason"] == "missed_grace"));

    // A 15-minute poller folds its missed slots into a count on one run.
    let poller = app.runs_of("presale-close").await;
    let last = poller.last().unwrap();
    assert_eq!(
        last["scheduled_for"],
        back.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    assert_eq!(last["coalesced"], hours * 4 - 1, "{last}");

    for job in [
        "grower-orders",
        "billing-dunning",
        "presale-reminders",
        "presale-close",
    ] {
        for r in app.runs_of(job).await {
            assert!(
                at(r["scheduled_for"].as_str().unwrap()) >= t0,
                "{job}: a slot before known_since: {r}"
            );
            assert_ne!(r["state"], "pending", "{job}: left pending: {r}");
        }
    }
    app.stop().await;
}

on_both_backends! {
    async fn five_hours_down_then_each_policy_catches_up(backend) {
        downtime(backend, 5).await;
    }
}

on_both_backends! {
    async fn twenty_five_hours_down_then_each_policy_catches_up(backend) {
        downtime(backend, 25).await;
    }
}

on_both_backends! {
    async fn failures_retry_with_backoff_then_alert_ops_once(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some(at("2026-06-01T00:00:00Z"));
            s.ops_email = Some("ops@pooled.example".into());
            s.job_overrides = Some("maintenance-prune.debug_fail=true;maintenance-prune.max_attempts=3".into());
        })
        .await;
        let (status, run) = app.post("/api/v1/ops/jobs/maintenance-prune/run", Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        assert_eq!(run["trigger"], "manual");
        assert_eq!(run["state"], "retrying", "{run}");
        assert_eq!(run["attempt"], 1);
        // Retries come on the backoff schedule as the clock moves.
        app.advance("2026-06-01T02:00:00Z").await;
        let (_, runs) = app.get("/api/v1/ops/runs?job=maintenance-prune&state=failed", Some(ADMIN_TOKEN)).await;
        let failed = runs["items"].as_array().unwrap();
        assert_eq!(failed.len(), 1, "{runs}");
        assert_eq!(failed[0]["attempt"], 3);
        assert!(str_of(&failed[0]["last_error"]).contains("debug_fail"));
        let (_, outbox) = app.get("/api/v1/ops/outbox?to=ops@pooled.example", Some(ADMIN_TOKEN)).await;
        let alerts = outbox["items"].as_array().unwrap();
        assert_eq!(alerts.len(), 1, "one alert for one failed run: {outbox}");
        assert_eq!(alerts[0]["template"], "job_failed");
        assert_eq!(alerts[0]["status"], "sent", "delivered by outbox-deliver: {outbox}");
        // The embedded default writes .eml files.
        let eml = std::fs::read_dir(app.data_dir().join("outbox")).unwrap().count();
        assert_eq!(eml, 1);
        app.stop().await;
    }
}

on_both_backends! {
    async fn pause_resume_backfill_and_bad_input(backend) {
        let app = TestApp::spawn_manual(backend, at("2026-06-01T00:30:00Z")).await;
        let (status, job) = app.post("/api/v1/ops/jobs/billing-dunning/pause", Some(ADMIN_TOKEN), json!({"note": "gateway maintenance"})).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        assert_eq!(job["paused"], true);
        assert_eq!(job["paused_note"], "gateway maintenance");
        app.advance("2026-06-01T05:10:00Z").await;
        assert!(app.runs_of("billing-dunning").await.is_empty(), "a paused job runs nothing");
        let (_, job) = app.post("/api/v1/ops/jobs/billing-dunning/resume", Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(job["paused"], false);
        app.advance("2026-06-01T06:00:00Z").await;
        assert_eq!(slots(&app.runs_of("billing-dunning").await), ["2026-06-01T06:00:00Z"], "resume starts from now");

        let (status, body) = app
            .post("/api/v1/ops/jobs/billing-dunning/backfill", Some(ADMIN_TOKEN), json!({"from": "2026-06-01T02:00:00Z", "to": "2026-06-01T03:00:00Z"}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["scheduled"], 2);
        let runs = app.runs_of("billing-dunning").await;
        assert_eq!(slots(&runs), ["2026-06-01T02:00:00Z", "2026-06-01T03:00:00Z", "2026-06-01T06:00:00Z"]);
        assert!(runs[..2].iter().all(|r| r["trigger"] == "backfill" && r["state"] == "succeeded"), "{runs:?}");
        let (_, again) = app
            .post("/api/v1/ops/jobs/billing-dunning/backfill", Some(ADMIN_TOKEN), json!({"from": "2026-06-01T02:00:00Z", "to": "2026-06-01T03:00:00Z"}))
            .await;
        assert_eq!(again["scheduled"], 0, "slots that ran are not run again");

        // Bad input gets a clear error and changes nothing.
        for (path, body, status) in [
            ("/api/v1/ops/jobs/nope/run", json!({}), StatusCode::NOT_FOUND),
            ("/api/v1/ops/jobs/billing-dunning/backfill", json!({"from": "2026-06-01T03:00:00Z", "to": "2026-06-01T02:00:00Z"}), StatusCode::UNPROCESSABLE_ENTITY),
            ("/api/v1/ops/jobs/billing-dunning/backfill", json!({"from": "2026-06-01T03:00:00Z", "to": "2030-01-01T00:00:00Z"}), StatusCode::UNPROCESSABLE_ENTITY),
            ("/api/v1/ops/jobs/billing-dunning/backfill", json!({"from": "2026-03-01T00:00:00Z", "to": "2026-03-01T03:00:00Z"}), StatusCode::UNPROCESSABLE_ENTITY),
            ("/api/v1/ops/clock/advance", json!({"to": "2026-06-01T00:00:00Z"}), StatusCode::UNPROCESSABLE_ENTITY),
        ] {
            let (got, problem) = app.post(path, Some(ADMIN_TOKEN), body).await;
            assert_eq!(got, status, "{path}: {problem}");
        }
        assert_eq!(app.runs_of("billing-dunning").await.len(), 3);
        let (status, _) = app.get("/api/v1/ops/runs?state=bogus", Some(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        // A parameter of the wrong shape is a problem+json naming it, not a plain-text 400.
        let (status, problem) = app.get("/api/v1/ops/runs?limit=abc", Some(ADMIN_TOKEN)).await;
        assert_eq!((status, &problem["errors"][0]["field"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("limit")), "{problem}");

        let (_, jobs) = app.get("/api/v1/ops/jobs", Some(ADMIN_TOKEN)).await;
        let names: Vec<String> = jobs["items"].as_array().unwrap().iter().map(|j| str_of(&j["name"])).collect();
        assert_eq!(names.len(), 10, "{names:?}");
        // Paged, the same jobs in the same order.
        let (mut paged, mut after) = (Vec::new(), String::new());
        loop {
            let (status, page) = app.get(&format!("/api/v1/ops/jobs?limit=3{after}"), Some(ADMIN_TOKEN)).await;
            assert!(status == StatusCode::OK && page["items"].as_array().unwrap().len() <= 3, "{page}");
            paged.extend(page["items"].as_array().unwrap().iter().map(|j| str_of(&j["name"])));
            match page["next"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => break,
            }
        }
        assert_eq!(paged, names);
        for bad in ["limit=0", "limit=501", "after=no-such-job"] {
            let (status, problem) = app.get(&format!("/api/v1/ops/jobs?{bad}"), Some(ADMIN_TOKEN)).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {problem}");
        }
        for j in jobs["items"].as_array().unwrap() {
            assert_eq!(j["upcoming"].as_array().unwrap().len(), 5, "{j}");
        }
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_job_shows_its_last_run_begun_and_its_next_timer(backend) {
        let app = TestApp::spawn_manual(backend, at("2026-06-01T00:30:00Z")).await;
        app.advance("2026-06-01T01:00:30Z").await;
        // A timer between two hourly slots (a dunning retry's instant) waits in the runs.
        let timer = at("2026-06-01T01:20:00Z").timestamp_micros();
        app.state.store.add_timer("billing-dunning", timer, at("2026-06-01T01:00:30Z").timestamp_micros()).await.unwrap();
        let dunning = || async {
            let (_, jobs) = app.get("/api/v1/ops/jobs", Some(ADMIN_TOKEN)).await;
            jobs["items"].as_array().unwrap().iter().find(|j| j["name"] == "billing-dunning").unwrap().clone()
        };
        let job = dunning().await;
        assert_eq!(job["last_run"]["scheduled_for"], "2026-06-01T01:00:00Z", "not the timer still waiting: {job}");
        assert_eq!(job["last_run"]["state"], "succeeded", "{job}");
        assert_eq!(job["next_run_at"], "2026-06-01T01:20:00Z", "the timer comes before the next slot: {job}");
        app.advance("2026-06-01T01:25:00Z").await;
        let job = dunning().await;
        assert_eq!((&job["last_run"]["scheduled_for"], &job["last_run"]["trigger"]), (&json!("2026-06-01T01:20:00Z"), &json!("timer")), "{job}");
        assert_eq!(job["next_run_at"], "2026-06-01T02:00:00Z", "{job}");
        // A timer made now for after the next slot runs after the slot's run, though made
        // before it: the last run is the one that began last, not the one written last.
        let later = at("2026-06-01T02:20:00Z").timestamp_micros();
        app.state.store.add_timer("billing-dunning", later, at("2026-06-01T01:25:00Z").timestamp_micros()).await.unwrap();
        app.advance("2026-06-01T02:00:30Z").await;
        assert_eq!(dunning().await["last_run"]["scheduled_for"], "2026-06-01T02:00:00Z");
        app.advance("2026-06-01T02:25:00Z").await;
        let job = dunning().await;
        assert_eq!(job["last_run"]["scheduled_for"], "2026-06-01T02:20:00Z", "{job}");
        assert_eq!(job["next_run_at"], "2026-06-01T03:00:00Z", "{job}");
        // Paused: no slot and no timer runs, so none is shown as next; a run asked for by hand
        // still runs, and is.
        let (status, _) = app.post("/api/v1/ops/jobs/billing-dunning/pause", Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        app.state.store.add_timer("billing-dunning", at("2026-06-01T02:40:00Z").timestamp_micros(), at("2026-06-01T02:25:00Z").timestamp_micros()).await.unwrap();
        let job = dunning().await;
        assert_eq!((&job["next_run_at"], &job["upcoming"]), (&json!(null), &json!([])), "{job}");
        let backfill = at("2026-06-01T01:00:00Z").timestamp_micros();
        app.state.store.insert_requested_run("billing-dunning", backfill, "backfill", at("2026-06-01T02:25:00Z").timestamp_micros()).await.unwrap();
        assert_eq!(dunning().await["next_run_at"], "2026-06-01T02:25:00Z", "due as soon as asked for");
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_month_of_manual_clock_runs_quickly_and_once_per_slot(backend) {
        let app = TestApp::spawn_manual(backend, at("2026-06-01T00:00:00Z")).await;
        let runs = app.advance("2026-07-01T00:00:00Z").await;
        assert!(runs.len() > 100, "{}", runs.len());
        let (_, all) = app.get("/api/v1/ops/runs?limit=500", Some(ADMIN_TOKEN)).await;
        let mut keys: Vec<(String, String)> = Vec::new();
        let mut page = all;
        loop {
            for r in page["items"].as_array().unwrap() {
                keys.push((str_of(&r["job"]), str_of(&r["scheduled_for"])));
            }
            let Some(next) = page["next"].as_str() else { break };
            page = app.get(&format!("/api/v1/ops/runs?limit=500&after={next}"), Some(ADMIN_TOKEN)).await.1;
        }
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "one row per (job, slot)");
        assert_eq!(keys.iter().filter(|(j, _)| j == "maintenance-prune").count(), 30);
        app.stop().await;
    }
}

on_both_backends! {
    /// `catchup=all` runs every missed slot in the window, also beyond the 500 the planner
    /// takes at once: the rest are planned on its next pass, none folded into a count.
    async fn catch_up_all_runs_every_missed_slot_a_page_at_a_time(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some(at("2026-06-01T00:00:30Z"));
            s.job_overrides = Some(
                "presale-reminders.schedule=every 1m;presale-reminders.catchup=all;\
                 presale-reminders.window=1d"
                    .into(),
            );
        })
        .await;
        // Nothing stops the manual clock at a minute's slot: the 660 slots up to 11:00 are
        // all missed, and planned when it gets there.
        app.advance("2026-06-01T11:00:00Z").await;
        let (runs, pages) = app.walk_pages("/api/v1/ops/runs?job=presale-reminders", Some(ADMIN_TOKEN), 500).await;
        assert_eq!(runs.len(), 660, "one run per minute from 00:01");
        assert!(pages > 1);
        assert!(runs.iter().all(|r| r["state"] == "succeeded" && r["coalesced"] == 0), "{:?}", runs.iter().find(|r| r["state"] != "succeeded"));
        let mut minutes = slots(&runs);
        minutes.sort();
        minutes.dedup();
        assert_eq!(minutes.len(), 660);
        assert_eq!((minutes[0].as_str(), minutes[659].as_str()), ("2026-06-01T00:01:00Z", "2026-06-01T11:00:00Z"));
        app.stop().await;
    }
}
