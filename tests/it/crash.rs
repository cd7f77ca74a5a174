//! Crashes and several instances: a lost lease is fenced, a killed process's run is reaped and
//! retried, three processes on one PostgreSQL database run each slot once and lose none.

use crate::cli::{pooled, serve, sigterm};
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, TestDb, postgres_server, str_of};
use crate::on_both_backends;
use pooled::store::{RunFilter, Store};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

on_both_backends! {
    async fn a_worker_that_lost_its_lease_changes_nothing(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some("2026-06-01T00:00:00Z".parse().unwrap());
            s.job_overrides = Some("maintenance-prune.lease=1s".into());
        })
        .await;
        let store = &app.state.store;
        let now = app.state.clock.now().timestamp_micros();
        let id = store.insert_requested_run("maintenance-prune", now, "manual", now).await.unwrap();
        let first = store.claim_next("instance-that-dies", &["maintenance-prune"], now, now).await.unwrap().expect("claimed");
        assert_eq!((first.run.id, first.run.attempt), (id, 1));
        assert!(store.claim_next("another", &["maintenance-prune"], now, now).await.unwrap().is_none(), "one attempt at a time");

        // The first worker goes silent; its lease (1 s of database time) runs out.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        app.state.scheduler.reap().await.unwrap();
        let run = store.run(id).await.unwrap().unwrap();
        assert_eq!(run.state, "retrying");
        assert!(run.last_error.unwrap().contains("lease expired"));

        // Its late completion is fenced out by the attempt number.
        assert!(!store.succeed_run(id, 1, now, 5, "{}").await.unwrap());
        assert_eq!(store.run(id).await.unwrap().unwrap().state, "retrying");

        // The retry runs as attempt 2 once its backoff has passed.
        app.advance("2026-06-01T00:10:00Z").await;
        let run = store.run(id).await.unwrap().unwrap();
        assert_eq!((run.state.as_str(), run.attempt), ("succeeded", 2));
        assert!(!store.succeed_run(id, 1, now, 5, "{}").await.unwrap());
        assert!(!store.heartbeat_run(id, 1).await.unwrap());
        app.stop().await;
    }
}

on_both_backends! {
    async fn a_fenced_out_attempt_stops_its_body(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some("2026-06-01T00:00:00Z".parse().unwrap());
            s.job_overrides = Some("maintenance-prune.debug_delay=120s;maintenance-prune.lease=1s".into());
        })
        .await;
        let run_now = tokio::spawn({
            let (client, base) = (app.client.clone(), app.base.clone());
            async move {
                client.post(format!("{base}/api/v1/ops/jobs/maintenance-prune/run")).bearer_auth(ADMIN_TOKEN).send().await
            }
        });
        let store = &app.state.store;
        let running = async {
            loop {
                let runs = store.runs(&RunFilter { job: Some("maintenance-prune".into()), state: Some("running".into()), before_id: None, limit: 1 }).await.unwrap();
                if let Some(run) = runs.into_iter().next() {
                    return run;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let run = tokio::time::timeout(Duration::from_secs(30), running).await.expect("the run started");
        // Another instance's reaper takes the slot from this attempt (as when its lease ran
        // out while it was cut off from the database).
        let now = app.state.clock.now().timestamp_micros();
        let retry_at = now + 3_600_000_000;
        assert!(store.fail_run(run.id, run.attempt, "lease expired", Some(retry_at), now, None, None).await.unwrap());
        // Its next heartbeat finds it fenced out and stops the body, well before its 120 s.
        let answered = tokio::time::timeout(Duration::from_secs(30), run_now).await;
        assert!(answered.is_ok(), "the fenced-out body kept running");
        let after = store.run(run.id).await.unwrap().unwrap();
        assert_eq!((after.state.as_str(), after.attempt, after.last_error.as_deref()), ("retrying", run.attempt, Some("lease expired")), "the fenced attempt recorded nothing");
        app.stop().await;
    }
}

on_both_backends! {
    /// A client that hangs up on a keyed write: the request still runs to its end, and the
    /// client's retry under its key replays the answer. Before, the request stopped where it
    /// stood: here a manual "run now" left its run `running` (until the reaper took it back)
    /// and its key in flight, so every retry was 409 for five minutes and then ran it again.
    async fn a_run_whose_caller_hangs_up_runs_to_its_end_and_replays_under_its_key(backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.clock = pooled::config::ClockMode::Manual;
            s.clock_start = Some("2026-06-01T00:00:00Z".parse().unwrap());
            s.job_overrides = Some("maintenance-prune.debug_delay=2s;maintenance-prune.lease=1s".into());
        })
        .await;
        // On the manual clock "run now" runs inside the request; the client gives up first.
        let run_now = |timeout: Duration| {
            app.client.post(format!("{}/api/v1/ops/jobs/maintenance-prune/run", app.base))
                .bearer_auth(ADMIN_TOKEN).header("Idempotency-Key", "run-1").timeout(timeout).send()
        };
        let hung_up = run_now(Duration::from_millis(500)).await;
        assert!(hung_up.is_err(), "the run outlasted the client: {hung_up:?}");
        let store = &app.state.store;
        let filter = RunFilter { job: Some("maintenance-prune".into()), state: None, before_id: None, limit: 1 };
        let run = store.runs(&filter).await.unwrap().remove(0);
        // Its heartbeat keeps the lease while the body runs, and the reaper leaves it alone.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        app.state.scheduler.reap().await.unwrap();
        let mut after = store.run(run.id).await.unwrap().unwrap();
        for _ in 0..100 {
            if after.state != "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            after = store.run(run.id).await.unwrap().unwrap();
        }
        assert_eq!((after.state.as_str(), after.attempt), ("succeeded", 1), "{after:?}");
        let again = run_now(Duration::from_secs(10)).await.unwrap();
        assert_eq!(again.status(), StatusCode::ACCEPTED);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: serde_json::Value = again.json().await.unwrap();
        assert_eq!((again["id"].as_str(), again["state"].as_str()), (Some(run.id.to_string().as_str()), Some("succeeded")), "{again}");
        let runs = store.runs(&RunFilter { limit: 10, ..filter }).await.unwrap();
        assert_eq!(runs.len(), 1, "run once: {runs:?}");
        app.stop().await;
    }
}

on_both_backends! {
    /// SIGKILL during a run: the next process reaps the run and retries it.
    async fn a_run_killed_with_its_process_is_reaped_and_retried(backend) {
        let db = TestDb::new(backend);
        let start = |clock_start: &str, overrides: &str| {
            let mut cmd = pooled(db.dir.path());
            // SQLite: the embedded default in the data directory; PostgreSQL: the test database.
            if let pooled::config::DatabaseUrl::Postgres(url) = &db.url {
                cmd.env("DATABASE_URL", url);
            }
            cmd.env("POOLED_CLOCK", "manual")
                .env("POOLED_CLOCK_START", clock_start)
                .env("POOLED_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("POOLED_JOB_OVERRIDES", overrides);
            serve(cmd)
        };
        let client = reqwest::Client::new();
        let mut first = start(
            "2026-06-01T02:59:00Z",
            "maintenance-prune.debug_delay=120s;maintenance-prune.lease=1s",
        );
        let base = first.base.clone();
        let advance = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .post(format!("{base}/api/v1/ops/clock/advance"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"to": "2026-06-01T03:00:00Z"}))
                    .send()
                    .await
            }
        });
        // Wait until the prune run is running, then kill the process mid-run.
        let running = async {
            loop {
                let (_, res) = first
                    .get(
                        "/api/v1/ops/runs?job=maintenance-prune&state=running",
                        Some(ADMIN_TOKEN),
                    )
                    .await;
                if let Some(run) = res["items"].as_array().and_then(|a| a.first()) {
                    return str_of(&run["id"]);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let id = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .expect("the run started");
        first.child.kill().unwrap();
        first.child.wait().unwrap();
        assert!(
            advance.await.unwrap().is_err(),
            "the advance died with its process"
        );

        // Let the lease lapse in database time, then start again.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let second = start("2026-06-01T03:00:00Z", "maintenance-prune.lease=1s");
        let res = client
            .post(format!("{}/api/v1/ops/clock/advance", second.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"to": "2026-06-01T03:10:00Z"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let runs: serde_json::Value = client
            .get(format!(
                "{}/api/v1/ops/runs?job=maintenance-prune",
                second.base
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = runs["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{runs}");
        let run = &items[0];
        assert_eq!(str_of(&run["id"]), id);
        assert_eq!(run["state"], "succeeded", "{run}");
        assert_eq!(run["attempt"], 2, "{run}");
        assert!(
            str_of(&run["last_error"]).contains("lease expired"),
            "{run}"
        );
        drop(second);
    }
}

/// Three `pooled serve` processes on one PostgreSQL database for a stretch of real time, one
/// killed midway: every (job, slot) runs once and no slot is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_slots_of_one_database() {
    if postgres_server().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres);
    let pooled::config::DatabaseUrl::Postgres(url) = &db.url else {
        unreachable!()
    };
    let mut instances: Vec<_> = (0..3)
        .map(|i| {
            let mut cmd = pooled(db.dir.path());
            cmd.env("DATABASE_URL", url)
                .env("POOLED_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("POOLED_INSTANCE_ID", format!("instance-{i}"))
                .env(
                    "POOLED_JOB_OVERRIDES",
                    "maintenance-prune.schedule=every 1s;maintenance-prune.lease=2s",
                );
            serve(cmd)
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let killed = instances.remove(0);
    drop(killed); // SIGKILL
    tokio::time::sleep(Duration::from_secs(5)).await;
    for served in &instances {
        sigterm(&served.child);
    }
    for mut served in instances {
        assert!(served.child.wait().unwrap().success());
    }

    let store = Store::connect(&db.url).await.unwrap();
    let runs = store
        .runs(&RunFilter {
            job: Some("maintenance-prune".into()),
            state: None,
            before_id: None,
            limit: 1000,
        })
        .await
        .unwrap();
    let mut slots: Vec<i64> = runs.iter().map(|r| r.scheduled_for).collect();
    slots.sort();
    let n = slots.len();
    slots.dedup();
    assert_eq!(slots.len(), n, "one run per (job, slot)");
    assert!(n >= 5, "{n} runs");
    // Every one-second slot between the first and the last is a row or counted in one, and
    // none is both. A row counts the slots just before its own, so the first row's count
    // reaches back past it: slots missed while the instances were starting, which the first
    // plan counted on its first row (under load, about one run in twenty).
    let covered: i64 = runs.iter().map(|r| 1 + r.coalesced).sum();
    let first = runs.iter().find(|r| r.scheduled_for == slots[0]).unwrap();
    let span = (slots[n - 1] - slots[0]) / 1_000_000 + 1 + first.coalesced;
    let table: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{} +{} {} {} {:?}",
                (r.scheduled_for - slots[0]) / 1_000_000,
                r.coalesced,
                r.state,
                r.trigger,
                r.lease_owner
            )
        })
        .collect();
    assert_eq!(covered, span, "no slot lost or counted twice: {table:#?}");
    let instances: std::collections::BTreeSet<_> =
        runs.iter().filter_map(|r| r.lease_owner.clone()).collect();
    assert!(!instances.is_empty());
    for r in &runs {
        assert!(
            matches!(
                r.state.as_str(),
                // pending: planned just before the instances stopped; it runs at the next start.
                "succeeded" | "skipped" | "retrying" | "running" | "pending"
            ),
            "{r:?}"
        );
    }
    store.close().await;
}
