//! The store on both backends: migrations, token hashing, idempotency claims, the scheduler's
//! planning guard, the SQLite single-process lock, WAL checkpoints and how SQLite itself is
//! built.

use crate::helpers::{Backend, TestDb, raw_tx};
use crate::on_both_backends;
use chrono::{TimeZone, Utc};
use pooled::domain::identity::{Principal, Shopper};
use pooled::ids::hash_token;
use pooled::store::{
    DeliveryRow, GrowerOrderMerge, GrowerOrderRow, IdempotencyBegin, IdempotencyClaim,
    IdempotencyDone, JobDefRow, NewEmail, NewRun, PlanRow, Pruned, RunFilter, Store, StoreError,
    StoredResponse,
};
use pooled::subscriptions::emails::price_changed;
use std::collections::BTreeSet;

fn versions(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR")))
        .expect("migrations dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sql"))
        .collect()
}

#[test]
fn both_backends_have_the_same_migrations() {
    let sqlite = versions("sqlite");
    assert!(!sqlite.is_empty());
    assert_eq!(
        sqlite,
        versions("postgres"),
        "migrations/sqlite and migrations/postgres differ"
    );
}

/// A UTC job that catches up its latest slot within an hour, with no slot planned yet.
fn job_def(name: &str, schedule: &str) -> JobDefRow {
    JobDefRow {
        name: name.into(),
        schedule: schedule.into(),
        time_zone: "UTC".into(),
        catchup_policy: "latest".into(),
        catchup_window_secs: 3600,
        start_grace_secs: 0,
        overlap_policy: "skip".into(),
        max_attempts: 3,
        lease_secs: 60,
        paused_at: None,
        paused_note: None,
        known_since: 0,
        last_planned_slot: None,
    }
}

async fn open(db: &TestDb) -> Store {
    let store = Store::connect(&db.url).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

on_both_backends! {
    async fn migrations_apply_twice_and_tokens_are_stored_hashed(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        store.migrate().await.expect("migrating again is a no-op");
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let shopper = Shopper {
            id: "shp_1".into(),
            name: "Ana".into(),
            email: "ana@example.com".into(),
            time_zone: chrono_tz::Europe::Berlin,
            payment_token: None,
            created_at: now,
        };
        store.create_shopper(&shopper, &hash_token("secret-token")).await.unwrap();
        assert_eq!(store.shopper("shp_1").await.unwrap(), shopper);
        assert_eq!(
            store.token_subject(&hash_token("secret-token")).await.unwrap(),
            Some(Principal::Shopper("shp_1".into()))
        );
        assert_eq!(store.token_subject("secret-token").await.unwrap(), None, "raw tokens are not stored");
        assert!(matches!(store.shopper("shp_2").await, Err(StoreError::NotFound)));
        assert!(matches!(store.set_payment_token("shp_2", "pm_ok").await, Err(StoreError::NotFound)));
        store.close().await;
    }
}

on_both_backends! {
    async fn an_abandoned_idempotency_claim_can_be_taken_over_once(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        let t0 = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let five = chrono::Duration::minutes(5);
        let claim = |scope: &str, hash: &str| IdempotencyClaim {
            scope: scope.into(),
            key: "k".into(),
            request_hash: hash.into(),
        };
        let begin = |c: IdempotencyClaim, at| {
            let store = store.clone();
            async move { store.idempotency_begin(&[c], at, five).await.unwrap().remove(0) }
        };
        assert_eq!(begin(claim("s", "h"), t0).await, IdempotencyBegin::Run);
        assert_eq!(begin(claim("s", "h"), t0).await, IdempotencyBegin::InFlight);
        assert_eq!(begin(claim("s", "other"), t0).await, IdempotencyBegin::Mismatch);
        let later = t0 + chrono::Duration::minutes(6);
        assert_eq!(begin(claim("s", "h"), later).await, IdempotencyBegin::Run);
        assert_eq!(begin(claim("s", "h"), later).await, IdempotencyBegin::InFlight);
        let done = IdempotencyDone {
            scope: "s".into(),
            key: "k".into(),
            response: StoredResponse {
                status: 201,
                content_type: Some("application/json".into()),
                body: b"{}".to_vec(),
            },
            provisional: false,
        };
        store.idempotency_complete(std::slice::from_ref(&done)).await.unwrap();
        assert_eq!(
            begin(claim("s", "h"), later).await,
            IdempotencyBegin::Replay(done.response.clone())
        );
        // Another scope is another key; the same key twice in one batch runs once.
        assert_eq!(
            store.idempotency_begin(&[claim("t", "other"), claim("t", "other")], later, five).await.unwrap(),
            vec![IdempotencyBegin::Run, IdempotencyBegin::InFlight]
        );
        store.close().await;
    }
}

on_both_backends! {
    /// A provisional answer (a join's pending pledge, remembered before its deposit is
    /// charged) is not replayed while its request is likely still running: a retry is told
    /// the key is in flight, and sees the answer only once the claim is 30 s old (its request
    /// died) or the final answer replaced it.
    async fn a_provisional_answer_is_in_flight_until_its_request_has_surely_ended(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        let t0 = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let five = chrono::Duration::minutes(5);
        let claim = IdempotencyClaim { scope: "s".into(), key: "k".into(), request_hash: "h".into() };
        let begin = |at| {
            let (store, claim) = (store.clone(), claim.clone());
            async move { store.idempotency_begin(&[claim], at, five).await.unwrap().remove(0) }
        };
        assert_eq!(begin(t0).await, IdempotencyBegin::Run);
        let answer = |status: u16, provisional: bool| IdempotencyDone {
            scope: "s".into(),
            key: "k".into(),
            response: StoredResponse { status, content_type: None, body: status.to_string().into_bytes() },
            provisional,
        };
        let pending = answer(202, true);
        store.idempotency_complete(std::slice::from_ref(&pending)).await.unwrap();
        let seconds = chrono::Duration::seconds;
        assert_eq!(begin(t0 + seconds(29)).await, IdempotencyBegin::InFlight);
        assert_eq!(begin(t0 + seconds(30)).await, IdempotencyBegin::Replay(pending.response.clone()));
        assert_eq!(begin(t0 + seconds(600)).await, IdempotencyBegin::Replay(pending.response), "never taken over");
        let paid = answer(201, false);
        store.idempotency_complete(std::slice::from_ref(&paid)).await.unwrap();
        assert_eq!(begin(t0 + seconds(1)).await, IdempotencyBegin::Replay(paid.response));
        store.close().await;
    }
}

on_both_backends! {
    /// Two instances read one watermark and plan the same slots, one with each slot a row, the
    /// other (later, under a coalescing policy) with one row counting the older slots. Whoever
    /// commits second made its plan from a watermark that has moved: it changes nothing, and
    /// plans again from the new one. The watermark never moves back.
    async fn a_plan_made_from_a_watermark_that_moved_changes_nothing(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        store.sync_job_def(&job_def("every-second", "every 1s")).await.unwrap();
        let read = store.job_defs().await.unwrap()[0].last_planned_slot;
        assert_eq!(read, None);
        let s = |secs: i64| secs * 1_000_000;
        let run = |at: i64, coalesced: i64| NewRun {
            scheduled_for: s(at),
            trigger: "schedule",
            state: "pending",
            skip_reason: None,
            coalesced,
        };
        let plan = |runs: Vec<NewRun>, from: Option<i64>, to: i64| {
            let store = store.clone();
            async move { store.plan_runs("every-second", false, &runs, from, s(to), s(to)).await.unwrap() }
        };

        // B commits first: slot 3 counting slots 1 and 2.
        assert_eq!(plan(vec![run(3, 2)], read, 3).await, 1);
        // A's plan of slots 1 and 2, made from the same reading: nothing of it lands.
        assert_eq!(plan(vec![run(1, 0), run(2, 0)], read, 2).await, 0);
        let watermark = store.job_defs().await.unwrap()[0].last_planned_slot;
        assert_eq!(watermark, Some(s(3)), "the watermark B moved it to");
        // A plans again from what it now reads.
        assert_eq!(plan(vec![run(4, 0)], watermark, 4).await, 1);
        // A slot already recorded is left alone, and the watermark still moves.
        assert_eq!(plan(vec![run(4, 0), run(5, 0)], Some(s(4)), 5).await, 1);
        // A plan that would move the watermark back (an instance whose clock is behind)
        // changes nothing either.
        assert_eq!(plan(vec![run(2, 0)], Some(s(5)), 3).await, 0);

        let runs = store
            .runs(&RunFilter { job: Some("every-second".into()), state: None, before_id: None, limit: 100 })
            .await
            .unwrap();
        let mut slots: Vec<(i64, i64)> = runs.iter().map(|r| (r.scheduled_for / 1_000_000, r.coalesced)).collect();
        slots.sort();
        assert_eq!(slots, [(3, 2), (4, 0), (5, 0)], "every slot counted once");
        assert_eq!(store.job_defs().await.unwrap()[0].last_planned_slot, Some(s(5)));
        store.close().await;
    }
}

on_both_backends! {
    /// After downtime a job under the `all` policy has its missed slots planned at once; while
    /// the oldest runs, the others wait their turn. Only a slot that comes due after the
    /// running attempt started is an overlap.
    async fn catch_up_slots_wait_for_the_running_one_and_only_later_slots_overlap(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        store.sync_job_def(&job_def("hourly", "every 1s")).await.unwrap();
        let s = |secs: i64| secs * 1_000_000;
        let run = |at: i64, trigger: &'static str| NewRun {
            scheduled_for: s(at), trigger, state: "pending", skip_reason: None, coalesced: 0,
        };
        let missed = vec![run(1, "catchup"), run(2, "catchup"), run(3, "catchup")];
        assert_eq!(store.plan_runs("hourly", true, &missed, None, s(3), s(10)).await.unwrap(), 3);
        let claimed = store.claim_next("a", &["hourly"], s(10), s(10)).await.unwrap().expect("the oldest slot");
        assert_eq!(claimed.run.scheduled_for, s(1));
        assert_eq!(store.skip_overlapping(s(10)).await.unwrap(), 0, "the missed slots wait");
        assert_eq!(store.plan_runs("hourly", true, &[run(11, "schedule")], Some(s(3)), s(11), s(11)).await.unwrap(), 1);
        assert_eq!(store.skip_overlapping(s(11)).await.unwrap(), 1, "slot 11 came due while slot 1 ran");
        let runs = store
            .runs(&RunFilter { job: Some("hourly".into()), state: None, before_id: None, limit: 100 })
            .await
            .unwrap();
        let mut states: Vec<(i64, String)> = runs.iter().map(|r| (r.scheduled_for / 1_000_000, r.state.clone())).collect();
        states.sort();
        assert_eq!(states, [(1, "running".into()), (2, "pending".into()), (3, "pending".into()), (11, "skipped".into())]);
        store.close().await;
    }
}

on_both_backends! {
    /// An instance claims runs of the jobs it runs; a run of a job it doesn't know (a job
    /// added by a newer version, in a rolling deploy) is left to an instance that does, and
    /// taken (to be failed with its reason) only once no one has for ten minutes.
    async fn an_instance_leaves_runs_of_jobs_it_does_not_know_to_those_that_do(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        store.sync_job_def(&job_def("new-job", "every 1h")).await.unwrap();
        let s = |secs: i64| secs * 1_000_000;
        let run = NewRun { scheduled_for: s(10), trigger: "timer", state: "pending", skip_reason: None, coalesced: 0 };
        assert_eq!(store.plan_runs("new-job", true, &[run], None, s(10), s(10)).await.unwrap(), 1);
        let old_version = ["hourly", "other"];
        for at in [s(10), s(10 + 599)] {
            assert!(store.claim_next("old", &old_version, at, at).await.unwrap().is_none(), "at {at}");
        }
        let claimed = store.claim_next("new", &["new-job"], s(11), s(11)).await.unwrap().expect("the job's own instance");
        assert_eq!((claimed.run.job_name.as_str(), claimed.run.lease_owner.as_deref()), ("new-job", Some("new")));
        // A second run that nobody who knows the job takes: the old instance takes it at last.
        let late = NewRun { scheduled_for: s(20), trigger: "timer", state: "pending", skip_reason: None, coalesced: 0 };
        assert_eq!(store.plan_runs("new-job", false, &[late], Some(s(10)), s(20), s(20)).await.unwrap(), 1);
        assert!(store.claim_next("old", &old_version, s(619), s(619)).await.unwrap().is_none());
        let taken = store.claim_next("old", &old_version, s(620), s(620)).await.unwrap().expect("overdue by ten minutes");
        assert_eq!((taken.run.scheduled_for, taken.run.lease_owner.as_deref()), (s(20), Some("old")));
        store.close().await;
    }
}

on_both_backends! {
    /// A plan made from a reading taken before a pause lands nothing once the pause has
    /// committed (the pause found nothing of it to skip); a second pause keeps when the first
    /// began; resuming a job that is not paused leaves its watermark alone.
    async fn a_pause_wins_over_a_plan_read_before_it(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        store.sync_job_def(&job_def("hourly", "every 1s")).await.unwrap();
        let s = |secs: i64| secs * 1_000_000;
        let run = |at: i64| NewRun { scheduled_for: s(at), trigger: "schedule", state: "pending", skip_reason: None, coalesced: 0 };
        assert_eq!(store.plan_runs("hourly", true, &[run(1)], None, s(1), s(1)).await.unwrap(), 1);
        let read = store.job_defs().await.unwrap()[0].last_planned_slot;
        assert!(store.pause_job("hourly", Some("first"), s(2)).await.unwrap());
        assert_eq!(store.plan_runs("hourly", true, &[run(2)], read, s(2), s(2)).await.unwrap(), 0, "the plan lands nothing");
        assert!(store.pause_job("hourly", Some("second"), s(3)).await.unwrap());
        let def = &store.job_defs().await.unwrap()[0];
        assert_eq!((def.paused_at, def.paused_note.as_deref(), def.last_planned_slot), (Some(s(2)), Some("second"), Some(s(1))));
        assert!(store.resume_job("hourly", s(5)).await.unwrap());
        assert_eq!(store.job_defs().await.unwrap()[0].last_planned_slot, Some(s(5)), "the pause's slots are never planned");
        assert!(!store.resume_job("hourly", s(9)).await.unwrap(), "not paused");
        assert_eq!(store.job_defs().await.unwrap()[0].last_planned_slot, Some(s(5)), "the watermark stays");
        store.close().await;
    }
}

#[tokio::test]
async fn a_second_process_on_one_sqlite_file_is_refused() {
    let db = TestDb::new(Backend::Sqlite);
    let first = open(&db).await;
    match Store::connect(&db.url).await {
        Err(StoreError::Locked(..)) => {}
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("a second store opened the same SQLite file"),
    }
    first.close().await;
}

/// `.cargo/config.toml` builds the bundled SQLite without its process-wide page cache and
/// allocation counting (their global mutexes held the writer and the readers up; see
/// BENCHMARKS.md). SQLite reports the options it was compiled with, so a build that lost them
/// (the setting not applied, libsqlite3-sys reading another variable) fails here.
#[tokio::test]
async fn sqlite_is_built_without_its_shared_page_cache_and_allocation_counting() {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
        .await
        .unwrap();
    let options: Vec<String> =
        sqlx::query_scalar("SELECT compile_options FROM pragma_compile_options")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(
        !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
        "{options:?}"
    );
    assert!(
        options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
        "{options:?}"
    );
}

/// A migrated store on a fresh SQLite file, and the file's path (the database lives as long
/// as the returned `TestDb`).
async fn sqlite_store() -> (TestDb, Store, std::path::PathBuf) {
    let db = TestDb::new(Backend::Sqlite);
    let store = open(&db).await;
    let pooled::config::DatabaseUrl::Sqlite(path) = &db.url else {
        unreachable!("a SQLite test database")
    };
    let path = path.clone();
    (db, store, path)
}

#[tokio::test]
async fn the_sqlite_wal_reaches_the_database_file_on_its_own() {
    let (_db, store, path) = sqlite_store().await;
    // The migrations' pages are in the WAL. The writer does not checkpoint as it commits, so
    // only the checkpointer can copy them into the file, within about a second.
    let size = || std::fs::metadata(&path).map_or(0, |m| m.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() < 16 * 4096 {
        assert!(
            std::time::Instant::now() < deadline,
            "after 10 s the database file holds {} bytes",
            size()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    store.close().await;
}

/// The WAL's first salt, which SQLite changes each time it starts the WAL over.
fn wal_salt(path: &std::path::Path) -> Option<[u8; 4]> {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(format!("{}-wal", path.display()))
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    header[16..20].try_into().ok()
}

fn shopper(n: usize) -> Shopper {
    Shopper {
        id: format!("shp_{n}"),
        name: "Steady".into(),
        email: format!("steady{n}@example.com"),
        time_zone: chrono_tz::Europe::Berlin,
        payment_token: None,
        created_at: Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap(),
    }
}

#[tokio::test]
async fn under_a_steady_stream_of_writes_the_sqlite_wal_starts_over_within_its_limit() {
    let (_db, store, path) = sqlite_store().await;
    // Writes back to back, as in a stampede: the WAL is never fully copied as a transaction
    // begins unless the checkpointer makes it so, and without that it only grows.
    let writes = tokio::spawn({
        let store = store.clone();
        async move {
            for n in 0.. {
                let token = hash_token(&format!("t{n}"));
                if let Err(e) = store.create_shopper(&shopper(n), &token).await {
                    return e;
                }
            }
            unreachable!("the shoppers ran out of numbers")
        }
    });
    let mut salts = BTreeSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while salts.len() < 4 && std::time::Instant::now() < deadline {
        salts.extend(wal_salt(&path));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if writes.is_finished() {
        panic!("the writes stopped: {}", writes.await.unwrap());
    }
    writes.abort();
    assert!(
        salts.len() >= 4,
        "in 20 s of writes the WAL started over {} times",
        salts.len().saturating_sub(1)
    );
    // The file only shrinks when a reset finds it past the limit, so its size is the most
    // the WAL ever held (34 MiB here: the writer's checkpoint step runs past 32 MiB).
    let wal_bytes = std::fs::metadata(format!("{}-wal", path.display()))
        .unwrap()
        .len();
    assert!(
        wal_bytes < pooled::store::WAL_SIZE_LIMIT,
        "the WAL grew to {wal_bytes} bytes"
    );
    store.close().await;
}

#[tokio::test]
async fn after_a_burst_the_sqlite_wal_file_is_cut_back_to_its_limit() {
    use sqlx::{ConnectOptions, Connection};
    let (_db, store, path) = sqlite_store().await;
    let wal = || std::fs::metadata(format!("{}-wal", path.display())).map_or(0, |m| m.len());
    // The burst: 80 MiB of pages written on a connection of the test's own.
    let mut burst = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    for sql in [
        "CREATE TABLE burst (b BLOB)",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 80)
         INSERT INTO burst SELECT randomblob(1024 * 1024) FROM n",
    ] {
        sqlx::query(sql).execute(&mut burst).await.unwrap();
    }
    burst.close().await.unwrap();
    assert!(
        wal() > pooled::store::WAL_SIZE_LIMIT,
        "the burst grew the WAL"
    );
    // Once the burst is in the database file (copied by the checkpointer, or by the burst
    // connection's own automatic checkpoint), the writer's next commit starts the WAL over
    // and cuts the file back; without the writer's limit it keeps its 80 MiB.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut n = 0;
    while wal() > pooled::store::WAL_SIZE_LIMIT {
        assert!(
            std::time::Instant::now() < deadline,
            "after 20 s the WAL still holds {} bytes",
            wal()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        n += 1;
        store
            .create_shopper(&shopper(n), &hash_token(&format!("t{n}")))
            .await
            .unwrap();
    }
    store.close().await;
}

on_both_backends! {
    /// `maintenance-prune`: old finished runs (never a job's latest, never one still running),
    /// day-old idempotency records, and instances silent past the limit in database time.
    async fn pruning_forgets_old_runs_keys_and_long_silent_instances(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        store.sync_job_def(&job_def("old-and-new", "every 1h")).await.unwrap();
        store.sync_job_def(&job_def("only-old", "every 1h")).await.unwrap();
        let day = 86_400_000_000_i64;
        let now = 400 * day;
        // Inserted in slot order, so ids (the latest run of a job) follow the slots.
        let run = |slot: i64, job: &str, state: &str, finished_days_ago: Option<i64>| {
            let finished = finished_days_ago.map_or("NULL".to_owned(), |d| (now - d * day).to_string());
            format!(
                "INSERT INTO job_runs (job_name, scheduled_for, trigger, state, exclusive, due_at, finished_at, created_at)
                 VALUES ('{job}', {slot}, 'schedule', '{state}', FALSE, {slot}, {finished}, 0)"
            )
        };
        let db_now = store.db_now().await.unwrap();
        let statements = [
            run(1, "old-and-new", "succeeded", Some(100)),
            run(2, "old-and-new", "failed", Some(91)),
            run(3, "old-and-new", "skipped", Some(89)),
            run(4, "old-and-new", "running", None),
            run(5, "only-old", "succeeded", Some(200)),
            run(6, "old-and-new", "succeeded", Some(1)),
            format!("INSERT INTO idempotency_keys (scope, idem_key, request_hash, created_at) VALUES ('s', 'old', 'h', {})", now - day - 1),
            format!("INSERT INTO idempotency_keys (scope, idem_key, request_hash, created_at) VALUES ('s', 'new', 'h', {})", now - day / 2),
            format!("INSERT INTO scheduler_instances VALUES ('gone', '0.1', 0, {}, 0)", db_now - 8 * day),
            format!("INSERT INTO scheduler_instances VALUES ('quiet', '0.1', 0, {}, 0)", db_now - 6 * day),
        ];
        let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
        raw_tx(&db.url, &statements).await.unwrap();
        store.heartbeat_instance("live", "0.1", 0, db_now).await.unwrap();
        store.start_page_session("ended", "t", now - day, now).await.unwrap();
        store.start_page_session("open", "t", now - day, now + 1).await.unwrap();

        let pruned = store.prune(now - 90 * day, now - day, now, chrono::Duration::days(7)).await.unwrap();
        assert_eq!(pruned, Pruned { runs: 2, keys: 1, sessions: 1, instances: 1 });
        assert_eq!(store.page_session_token("open", now).await.unwrap().as_deref(), Some("t"));
        assert_eq!(store.page_session_token("open", now + 1).await.unwrap(), None, "expired, though not yet pruned");
        let filter = RunFilter { job: None, state: None, before_id: None, limit: 100 };
        let mut left: Vec<i64> = store.runs(&filter).await.unwrap().iter().map(|r| r.scheduled_for).collect();
        left.sort_unstable();
        assert_eq!(left, [3, 4, 5, 6], "the 89-day-old run, the running one and each job's latest stay");
        let instances: Vec<String> = store.instances().await.unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(instances, ["live", "quiet"], "newest heartbeat first; the week-silent one is forgotten");
        let again = store.prune(now - 90 * day, now - day, now, chrono::Duration::days(7)).await.unwrap();
        assert_eq!(again, Pruned { runs: 0, keys: 0, sessions: 0, instances: 0 }, "nothing twice");
    }
}

on_both_backends! {
    async fn the_bench_floor_loads_exactly_the_rows_the_work_wrote(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let shopper = |id: &str| Shopper {
            id: id.into(),
            name: id.into(),
            email: format!("{id}@example.com"),
            time_zone: chrono_tz::Europe::Berlin,
            payment_token: None,
            created_at: now,
        };
        store.create_shopper(&shopper("shp_before"), &hash_token("t0")).await.unwrap();
        store.create_shopper(&shopper("shp_untouched"), &hash_token("t1")).await.unwrap();
        let capture = pooled::bench::floor::Capture::before(&store).await.unwrap();
        // The work: two new shoppers (each with a token) and one changed.
        store.create_shopper(&shopper("shp_new1"), &hash_token("t2")).await.unwrap();
        store.create_shopper(&shopper("shp_new2"), &hash_token("t3")).await.unwrap();
        store.set_payment_token("shp_before", "pm_ok").await.unwrap();
        let floor = capture.load_written().await.unwrap();
        assert_eq!(
            serde_json::Value::Object(floor.rows_by_table.clone()),
            serde_json::json!({"shoppers": 3, "api_tokens": 2}),
            "inserted and updated rows, nothing untouched"
        );
        assert_eq!(floor.rows(), 5);
        assert!(floor.seconds > 0.0);
        store.close().await;
    }
}

on_both_backends! {
    async fn a_price_change_is_announced_to_every_billed_subscriber_a_chunk_at_a_time(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        // 2,500 subscribers, more than two of the thousand-row chunks the announcement is
        // read and written in: some cancelled or suspended (not billed, not told), some on
        // another plan.
        let (n, on_other, cancelled, suspended) =
            (2500, |i: i64| i % 9 == 4, |i: i64| i % 10 == 0, |i: i64| i % 25 == 1);
        let numbers = format!("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n})");
        raw_tx(&db.url, &[
            "INSERT INTO plans (id, name, kind, currency, price_minor, cadence_weeks, portions_per_day,
                 cutoff_hours, delivery_weekdays, time_zone, variety_cap, transit_days, created_at)
             VALUES ('p1', 'Fruit', 'fruit', 'EUR', 2000, 1, 2, 48, 'mon', 'UTC', 5, 1, 0),
                    ('p2', 'Flowers', 'flower', 'EUR', 3000, 1, 5, 48, 'mon', 'UTC', 5, 1, 0)",
            &format!("{numbers} INSERT INTO shoppers (id, name, email, time_zone, payment_token, created_at)
                 SELECT 'shp_t' || i, 'T' || i, 't' || i || '@example.com', 'UTC', 'pm_ok', 0 FROM n"),
            &format!("{numbers} INSERT INTO subscriptions (id, shopper_id, plan_id, delivery_weekday,
                     start_date, exclusions, status, paused_until, created_at, ended_at)
                 SELECT 'sub_t' || i, 'shp_t' || i, CASE WHEN i % 9 = 4 THEN 'p2' ELSE 'p1' END, 'mon',
                     '2026-06-01', '[]',
                     CASE WHEN i % 10 = 0 THEN 'cancelled' WHEN i % 25 = 1 THEN 'suspended'
                          WHEN i % 7 = 0 THEN 'paused' ELSE 'active' END,
                     NULL, i, NULL FROM n"),
        ]).await.expect("seed");
        let told: BTreeSet<String> = (1..=n)
            .filter(|&i| !on_other(i) && !cancelled(i) && !suspended(i))
            .map(|i| format!("sub_t{i}"))
            .collect();

        let old = store.plan("p1").await.unwrap().unwrap();
        let changed = PlanRow { price_minor: 2400, ..old.clone() };
        let announce = |sub: &str, to: &str, name: &str| price_changed(&changed, old.price_minor, 0, sub, to, name);
        store.set_plan_price("p1", 2400, announce, 0).await.unwrap();
        assert_eq!(store.plan("p1").await.unwrap().unwrap().price_minor, 2400);

        let mut announced = BTreeSet::new();
        let mut before = None;
        loop {
            let page = store.outbox(None, 1000, before).await.unwrap();
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            for email in page.iter().filter(|e| e.template == "price_changed") {
                let number: i64 = email.entity["sub_t".len()..].parse().unwrap();
                assert_eq!(email.to_addr, format!("t{number}@example.com"));
                assert!(announced.insert(email.entity.clone()), "told twice: {}", email.entity);
            }
        }
        assert_eq!(announced.len(), told.len());
        assert_eq!(announced, told);
        store.close().await;
    }
}

/// A planned order line of `qty` apples from the orchard, ripening from 2026-10-05.
fn apples(id: &str, qty: i64) -> GrowerOrderRow {
    GrowerOrderRow {
        id: id.into(),
        week: "2026-W41".into(),
        supplier: "Orchard".into(),
        supplier_email: "orchard@example.com".into(),
        sku: "apple".into(),
        qty,
        ripening_start: "2026-10-05".into(),
        order_by: "2026-10-01".into(),
        status: "planned".into(),
        sent_at: None,
    }
}

fn grower_email(lines: &[GrowerOrderRow]) -> NewEmail {
    NewEmail {
        template: "grower_order".into(),
        entity: lines[0].id.clone(),
        event: "sent".into(),
        to: lines[0].supplier_email.clone(),
        subject: "order".into(),
        text: "order".into(),
        html: "order".into(),
        attachments: Vec::new(),
    }
}

/// What the orchard has been sent and what is planned for it, in apples.
async fn apples_ordered(store: &Store) -> (i64, i64) {
    let rows = store.grower_orders(None).await.unwrap();
    let sum = |status: &str| {
        rows.iter()
            .filter(|g| g.status == status)
            .map(|g| g.qty)
            .sum()
    };
    (sum("sent"), sum("planned"))
}

on_both_backends! {
    /// A recomputation of the orders plans only what the lines already sent do not cover, also
    /// when a line is sent while it runs (a renewal or signup sending due lines during the
    /// weekly plan): the units are never ordered twice.
    async fn a_grower_line_sent_during_a_recomputation_is_not_ordered_again(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        let window = GrowerOrderMerge::Replace { from: "2026-10-01", until: "2026-10-15", adds_seen: 0 };
        assert!(store.put_grower_orders(&[apples("gro_1", 10)], window).await.unwrap());
        let sent = store.send_grower_orders(&["gro_1".into()], grower_email, 1).await.unwrap();
        assert_eq!(sent.len(), 1);
        assert!(store.put_grower_orders(&[apples("gro_2", 10)], window).await.unwrap());
        assert_eq!(apples_ordered(&store).await, (10, 0), "the sent line covers the boxes");
        assert!(store.put_grower_orders(&[apples("gro_3", 12)], window).await.unwrap());
        assert_eq!(apples_ordered(&store).await, (10, 2), "two more go in a supplementary line");

        // PostgreSQL, made deterministic: the supplementary line is marked sent by another
        // transaction that commits only once the recomputation waits on it.
        if let pooled::config::DatabaseUrl::Postgres(url) = &db.url {
            let pg = sqlx::PgPool::connect(url).await.unwrap();
            let mut sender = pg.begin().await.unwrap();
            sqlx::query("UPDATE grower_orders SET status = 'sent', sent_at = 2 WHERE id = 'gro_3'")
                .execute(&mut *sender).await.unwrap();
            let recompute = tokio::spawn({
                let store = store.clone();
                async move { store.put_grower_orders(&[apples("gro_4", 12)], window).await }
            });
            crate::helpers::until_a_lock_is_waited_on(&pg).await;
            sender.commit().await.unwrap();
            assert!(recompute.await.unwrap().unwrap());
            assert_eq!(apples_ordered(&store).await, (12, 0), "the 12 apples are ordered once");
            pg.close().await;
        }
        store.close().await;
    }
}

on_both_backends! {
    /// A recomputation replaces the orders with totals from the boxes it read; an addition
    /// (a signup's boxes) committed since it began reading is not in them, so the replacement
    /// is refused and the addition stays until the boxes are read again.
    async fn a_recomputation_never_drops_units_added_while_it_read_the_boxes(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        let (from, until) = ("2026-10-01", "2026-10-15");
        let seen = store.grower_order_adds().await.unwrap();
        let replace = |adds_seen| GrowerOrderMerge::Replace { from, until, adds_seen };
        assert!(store.put_grower_orders(&[apples("gro_1", 10)], replace(seen)).await.unwrap());
        assert_eq!(apples_ordered(&store).await, (0, 10));

        // The next recomputation reads the count, then the boxes (10 apples); a signup adds 3.
        let seen = store.grower_order_adds().await.unwrap();
        assert!(store.put_grower_orders(&[apples("gro_2", 3)], GrowerOrderMerge::Add).await.unwrap());
        assert_eq!(store.grower_order_adds().await.unwrap(), seen + 1);
        assert!(
            !store.put_grower_orders(&[apples("gro_3", 10)], replace(seen)).await.unwrap(),
            "refused: its boxes miss the signup's"
        );
        assert_eq!(apples_ordered(&store).await, (0, 13), "nothing was replaced");
        // Read again, the boxes count the signup's.
        let seen = store.grower_order_adds().await.unwrap();
        assert!(store.put_grower_orders(&[apples("gro_4", 13)], replace(seen)).await.unwrap());
        assert_eq!(apples_ordered(&store).await, (0, 13));
        store.close().await;
    }
}

/// A delivery row of `sub` on `date` as the renewal makes it from the subscription it read:
/// `scheduled`.
fn delivery(sub: &str, date: &str) -> DeliveryRow {
    DeliveryRow {
        id: format!("dlv_{sub}_{date}"),
        subscription_id: sub.into(),
        delivery_date: date.into(),
        cutoff_at: 1_000,
        status: "scheduled".into(),
        skip_reason: None,
        amount_minor: None,
        lines: None,
    }
}

/// The status and skip reason of `sub`'s delivery on `date`, if there is one.
async fn delivery_status(store: &Store, sub: &str, date: &str) -> Option<(String, Option<String>)> {
    let rows = store.deliveries_of(sub).await.unwrap();
    rows.into_iter()
        .find(|d| d.delivery_date == date)
        .map(|d| (d.status, d.skip_reason))
}

on_both_backends! {
    /// The renewal makes a subscription's new deliveries from a read made before: a pause,
    /// resume or cancel committed since must decide how they go in, or a resumed delivery is
    /// never billed and a paused or cancelled one is boxed and ordered from growers.
    async fn new_deliveries_go_in_as_their_subscription_is_when_written(backend) {
        let db = TestDb::new(backend);
        let store = open(&db).await;
        raw_tx(&db.url, &[
            "INSERT INTO plans (id, name, kind, currency, price_minor, cadence_weeks, portions_per_day,
                 cutoff_hours, delivery_weekdays, time_zone, variety_cap, transit_days, created_at)
             VALUES ('p1', 'Fruit', 'fruit', 'EUR', 2000, 1, 2, 48, 'mon', 'UTC', 5, 1, 0)",
            "INSERT INTO shoppers (id, name, email, time_zone, payment_token, created_at)
             VALUES ('shp_1', 'Ann', 'ann@example.com', 'UTC', 'pm_ok', 0)",
            "INSERT INTO subscriptions (id, shopper_id, plan_id, delivery_weekday, start_date,
                 exclusions, status, paused_until, created_at, ended_at)
             VALUES ('sub_paused', 'shp_1', 'p1', 'mon', '2026-06-01', '[]', 'paused', '2026-06-15', 0, NULL),
                    ('sub_cancelled', 'shp_1', 'p1', 'mon', '2026-06-01', '[]', 'cancelled', NULL, 0, 1),
                    ('sub_resumed', 'shp_1', 'p1', 'mon', '2026-06-01', '[]', 'paused', NULL, 0, NULL)",
        ]).await.expect("seed");
        // All three were read active; the rows go in as they are now.
        let rows = [
            delivery("sub_paused", "2026-06-08"),
            delivery("sub_paused", "2026-06-15"),
            delivery("sub_cancelled", "2026-06-08"),
            // A shopper's skip far ahead stays a skip.
            DeliveryRow { status: "skipped".into(), skip_reason: Some("skipped".into()), ..delivery("sub_resumed", "2026-07-06") },
        ];
        store.add_deliveries(&rows, "subscription-renew", 0).await.unwrap();
        let paused = Some(("skipped".to_owned(), Some("paused".to_owned())));
        assert_eq!(delivery_status(&store, "sub_paused", "2026-06-08").await, paused, "inside the pause");
        assert_eq!(delivery_status(&store, "sub_paused", "2026-06-15").await, Some(("scheduled".into(), None)), "the pause ends that day");
        assert_eq!(delivery_status(&store, "sub_cancelled", "2026-06-08").await, None, "a cancelled subscription gets none");
        assert_eq!(delivery_status(&store, "sub_resumed", "2026-07-06").await, Some(("skipped".into(), Some("skipped".into()))));

        // PostgreSQL, made deterministic: a resume has moved the subscription and its paused
        // deliveries but not committed when the renewal's insert runs. The insert waits for
        // it and reads it active; without that wait it would go in skipped, after the
        // resume's own update, and stay so.
        if let pooled::config::DatabaseUrl::Postgres(url) = &db.url {
            let pg = sqlx::PgPool::connect(url).await.unwrap();
            let mut resumer = pg.begin().await.unwrap();
            sqlx::query("UPDATE subscriptions SET status = 'active' WHERE id = 'sub_resumed'")
                .execute(&mut *resumer).await.unwrap();
            sqlx::query("UPDATE deliveries SET status = 'scheduled', skip_reason = NULL
                         WHERE subscription_id = 'sub_resumed' AND skip_reason = 'paused'")
                .execute(&mut *resumer).await.unwrap();
            let mut add = tokio::spawn({
                let store = store.clone();
                async move { store.add_deliveries(&[delivery("sub_resumed", "2026-06-08")], "subscription-renew", 0).await }
            });
            let added_first = tokio::select! {
                biased;
                () = crate::helpers::until_a_lock_is_waited_on(&pg) => None,
                added = &mut add => Some(added),
            };
            resumer.commit().await.unwrap();
            match added_first {
                Some(added) => added.unwrap().unwrap(),
                None => add.await.unwrap().unwrap(),
            }
            assert_eq!(delivery_status(&store, "sub_resumed", "2026-06-08").await, Some(("scheduled".into(), None)), "billed after the resume");
            pg.close().await;
        }
        store.close().await;
    }
}
