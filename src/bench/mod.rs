//! `pooled bench`: measures renewal, settlement and joins on a fresh database of each backend,
//! next to that database's own floors (bulk loading the rows the work wrote, [`floor`]; the
//! naive hot-row join), and prints every figure with its floor and their ratio
//! (`value / floor`).
//!
//! Data is generated in SQL (a recursive sequence), so generation is not measured; what is
//! measured is the service's own code path: the jobs' functions for renewal and settlement,
//! and real HTTP clients against the real server for joins.

use crate::app::{App, AppState};
use crate::config::{ClockMode, DatabaseUrl, Settings};
use crate::presales;
use crate::store::{Db, Store, micros};
use crate::subscriptions;
use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub mod floor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    Sqlite,
    Postgres,
    Both,
}

/// `pooled bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Which database to measure.
    #[arg(long, value_enum, default_value_t = BenchBackend::Both)]
    pub backend: BenchBackend,
    /// A PostgreSQL server; each run creates (and drops) its own database on it.
    #[arg(
        long,
        env = "POOLED_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Active subscriptions renewed in one weekly cycle.
    #[arg(long, default_value_t = 100_000)]
    pub subscriptions: i64,
    /// Pledges of the campaign closed and settled.
    #[arg(long, default_value_t = 1_000_000)]
    pub pledges: i64,
    /// How long the join stampede runs.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Concurrent HTTP clients joining.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// One JSON object per figure instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Tiny sizes (200 subscriptions, 1,000 pledges, 2 s): proves the benchmarks run.
    #[arg(long)]
    pub quick: bool,
    /// Run only these benchmarks (comma-separated); all three by default.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Bench::Renewal, Bench::Settlement, Bench::Joins])]
    pub only: Vec<Bench>,
}

/// The benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bench {
    Renewal,
    Settlement,
    Joins,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub bench: String,
    pub backend: String,
    pub value: f64,
    pub unit: String,
    pub floor: f64,
    /// `value / floor`.
    pub ratio: f64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Figure {
    fn new(bench: &str, backend: &str, value: f64, unit: &str, floor: f64) -> Figure {
        Figure {
            bench: bench.into(),
            backend: backend.into(),
            value,
            unit: unit.into(),
            floor,
            ratio: if floor > 0.0 { value / floor } else { 0.0 },
            extra: serde_json::Map::new(),
        }
    }

    fn with(mut self, key: &str, value: serde_json::Value) -> Figure {
        self.extra.insert(key.to_owned(), value);
        self
    }
}

/// Runs the benchmarks and prints the figures.
pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    if args.quick {
        // Three chunks each (renewal writes 1,000 per chunk, settlement 500), so the writes
        // in flight are exercised too.
        args.subscriptions = args.subscriptions.min(2_500);
        args.pledges = args.pledges.min(1_200);
        args.seconds = args.seconds.min(2);
        args.clients = args.clients.min(8);
    }
    let backends: &[&'static str] = match args.backend {
        BenchBackend::Sqlite => &["sqlite"],
        BenchBackend::Postgres => &["postgres"],
        BenchBackend::Both => &["sqlite", "postgres"],
    };
    if !args.json {
        println!(
            "{:<11} {:<9} {:>14} {:<16} {:>14} {:>8}  notes",
            "bench", "backend", "value", "unit", "floor", "ratio"
        );
    }
    let mut broken = Vec::new();
    let alone = backends.len() * args.only.len() == 1;
    for &backend in backends {
        for &bench in &args.only {
            let figure = if alone {
                let fresh = Fresh::new(backend, &args.postgres_url).await?;
                let figure = match bench {
                    Bench::Renewal => renewal(&fresh, &args).await,
                    Bench::Settlement => settlement(&fresh, &args).await,
                    Bench::Joins => joins(&fresh, &args).await,
                };
                fresh.drop_database().await;
                figure
            } else {
                in_own_process(&args, backend, bench).await
            };
            let figure = figure.with_context(|| format!("{bench:?} on {backend}"))?;
            print(&figure, args.json);
            broken.extend(broken_invariants(&figure));
        }
    }
    // A fast wrong answer is no answer: the run fails when an invariant did not hold.
    anyhow::ensure!(
        broken.is_empty(),
        "invariants broken: {}",
        broken.join("; ")
    );
    Ok(())
}

/// Runs one benchmark in a `pooled bench` process of its own and reads its figure back.
///
/// Why a process each: peak RSS can only be reset to what the process holds, and memory an
/// earlier benchmark freed but the allocator kept (a settlement's, a floor's page cache)
/// would count against the next one's peak. Each figure is then the same whatever ran
/// before it.
async fn in_own_process(args: &BenchArgs, backend: &str, bench: Bench) -> anyhow::Result<Figure> {
    let name = bench
        .to_possible_value()
        .context("every benchmark has a name")?;
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .args([
            "bench",
            "--json",
            "--backend",
            backend,
            "--only",
            name.get_name(),
        ])
        .args(["--subscriptions", &args.subscriptions.to_string()])
        .args(["--pledges", &args.pledges.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--clients", &args.clients.to_string()])
        .args(["--postgres-url", &args.postgres_url])
        .stderr(std::process::Stdio::inherit());
    if args.quick {
        command.arg("--quick");
    }
    let out = command.output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The child's log lines share its stdout; its figure is the one JSON object. A broken
    // invariant makes the child exit non-zero after printing it, and is judged here again.
    let figure = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("the benchmark's process printed no figure ({})", out.status))?;
    Ok(serde_json::from_str(figure)?)
}

/// The invariants a figure reports that did not hold, in words.
fn broken_invariants(f: &Figure) -> Vec<String> {
    let swollen = format!(
        "peak RSS reached the renewal's {RENEWAL_RSS_TARGET_MB} MB target: the renewal must stream"
    );
    let invariants = [
        (
            "ledger_balanced",
            json!(true),
            "the ledger is unbalanced or off the gateway",
        ),
        ("oversold", json!(0), "oversold"),
        (
            "accepted_is_min_capacity_attempts",
            json!(true),
            "accepted ≠ min(capacity, attempts) or ≠ the pooled quantity",
        ),
        ("status", json!("succeeded"), "the campaign did not settle"),
        (
            "all_paid",
            json!(true),
            "not every subscription or pledge was charged once and paid",
        ),
        ("errors", json!(0), "requests failed"),
        ("rss_under_target", json!(true), swollen.as_str()),
    ];
    // A figure that does not report an invariant does not break it.
    invariants
        .into_iter()
        .filter(|(key, holds, _)| f.extra.get(*key).is_some_and(|v| v != holds))
        .map(|(_, _, broken)| format!("{} on {}: {broken}", f.bench, f.backend))
        .collect()
}

fn print(f: &Figure, json: bool) {
    if json {
        println!("{}", serde_json::to_string(f).unwrap_or_default());
    } else {
        let notes: Vec<String> = f.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<11} {:<9} {:>14.1} {:<16} {:>14.1} {:>8.3}  {}",
            f.bench,
            f.backend,
            f.value,
            f.unit,
            f.floor,
            f.ratio,
            notes.join(" ")
        );
    }
}

/// A service on a fresh database, on the manual clock.
struct Fresh {
    app_state: AppState,
    base: String,
    admin: String,
    backend: &'static str,
    _dir: tempfile::TempDir,
    pg: Option<(String, String)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where the generators and floors write ([`Store::unqueued_writers`]).
    writers: Db,
}

const START: &str = "2026-01-05T00:00:00Z";

impl Fresh {
    async fn new(backend: &'static str, pg_server: &str) -> anyhow::Result<Fresh> {
        let dir = tempfile::tempdir()?;
        let (database, pg) = if backend == "sqlite" {
            (DatabaseUrl::Sqlite(dir.path().join("bench.db")), None)
        } else {
            let name = format!("pooled_bench_{}", uuid::Uuid::new_v4().simple());
            let (prefix, _) = pg_server
                .rsplit_once('/')
                .context("the PostgreSQL URL needs a database path")?;
            (
                DatabaseUrl::Postgres(format!("{prefix}/{name}")),
                Some((pg_server.to_owned(), name)),
            )
        };
        let admin = crate::ids::new_token("pld_admin");
        let settings = Settings {
            database,
            data_dir: dir.path().to_owned(),
            bind: "127.0.0.1:0".into(),
            admin_token: Some(admin.clone()),
            clock: ClockMode::Manual,
            clock_start: Some(START.parse()?),
            time_zone: chrono_tz::UTC,
            smtp_url: None,
            instance_id: "bench".into(),
            ops_email: None,
            job_overrides: None,
            crash_at: None,
            dunning_days: vec![1, 3, 5],
        };
        let app = App::build(settings).await?;
        let app_state = app.state().clone();
        let writers = app_state.store.unqueued_writers().await?;
        let base = format!("http://{}", app.addr);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Ok(Fresh {
            app_state,
            base,
            admin,
            backend,
            _dir: dir,
            pg,
            stop: Some(tx),
            writers,
        })
    }

    /// The bench's shoppers, generated.
    async fn generate_shoppers(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let (sqls, n) = (&[BENCH_SHOPPERS], BENCH_SHOPPER_COUNT);
        generate(&self.writers, sqls, n, micros(now)).await
    }

    fn store(&self) -> &Store {
        &self.app_state.store
    }

    fn now(&self) -> DateTime<Utc> {
        self.app_state.clock.now()
    }

    async fn drop_database(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Db::Sqlite(writers) = &self.writers {
            writers.close().await;
        }
        self.store().close().await;
        if let Some((server, name)) = self.pg.take() {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&server).await {
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await;
            }
        }
    }
}

/// Runs generator statements in one transaction (`$1` = row count, `$2` = now in µs).
async fn generate(db: &Db, sqls: &[&'static str], n: i64, now: i64) -> anyhow::Result<()> {
    match db {
        Db::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            for sql in sqls {
                sqlx::query(*sql)
                    .bind(n)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            for sql in sqls {
                sqlx::query(*sql)
                    .bind(n)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// The issue's bound on the renewal's peak RSS at 100,000 subscriptions. The renewal holds a
/// few chunks of rows (and the ids), not every subscription, so a run of any size that
/// reaches it has stopped streaming: each run checks it, `--quick` in CI included.
const RENEWAL_RSS_TARGET_MB: f64 = 300.0;

/// Peak resident memory of this process since the last reset, in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak_rss() {
    // "5" resets the peak RSS counter (Linux ≥ 4.0); harmless where unsupported.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Shoppers the generated subscriptions and pledges belong to (`shp_bench_1` …).
const BENCH_SHOPPER_COUNT: i64 = 1000;
const BENCH_SHOPPERS: &str =
    "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < $1)
     INSERT INTO shoppers (id, name, email, time_zone, payment_token, created_at)
     SELECT 'shp_bench_' || n, 'Bench ' || n, 'bench' || n || '@example.com', 'UTC', 'pm_ok', $2
     FROM seq";

async fn renewal(f: &Fresh, args: &BenchArgs) -> anyhow::Result<Figure> {
    let store = f.store();
    let now = f.now();
    let n = args.subscriptions;
    // Four plans (weekly fruit, weekly and fortnightly flowers) and four exclusion sets.
    let mut plans = Vec::new();
    for (i, (kind, cadence, portions)) in [
        ("fruit", 1, 2),
        ("fruit", 1, 1),
        ("flower", 1, 5),
        ("flower", 2, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let plan = crate::store::PlanRow {
            id: format!("pln_bench_{i}"),
            name: format!("Bench {kind} {cadence}w"),
            kind: kind.into(),
            currency: "EUR".into(),
            price_minor: 2490,
            cadence_weeks: cadence,
            portions_per_day: portions,
            cutoff_hours: 48,
            delivery_weekdays: "thu".into(),
            time_zone: "Europe/Berlin".into(),
            variety_cap: 6,
            transit_days: 1,
            created_at: micros(now),
        };
        store.create_plan(&plan).await?;
        plans.push(plan);
    }
    let delivery = chrono::NaiveDate::from_ymd_opt(2026, 1, 15).expect("date");
    let cutoff = micros(crate::domain::subscription::cutoff_at(
        delivery,
        "Europe/Berlin".parse().expect("zone"),
        48,
    ));
    f.generate_shoppers(now).await?;
    let subs_sql = match &store.db {
        Db::Sqlite(_) => {
            "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < $1)
             INSERT INTO subscriptions (id, shopper_id, plan_id, delivery_weekday, start_date,
                 exclusions, status, paused_until, created_at, ended_at)
             SELECT 'sub_bench_' || n, 'shp_bench_' || (n % 1000 + 1), 'pln_bench_' || (n % 4), 'thu',
                    '2026-01-15',
                    CASE n % 4 WHEN 0 THEN '[]' WHEN 1 THEN '[\"kiwifruit\"]'
                               WHEN 2 THEN '[\"apple\",\"banana\"]' ELSE '[\"mango\"]' END,
                    'active', NULL, $2, NULL
             FROM seq"
        }
        Db::Postgres(_) => {
            "INSERT INTO subscriptions (id, shopper_id, plan_id, delivery_weekday, start_date,
                 exclusions, status, paused_until, created_at, ended_at)
             SELECT 'sub_bench_' || n, 'shp_bench_' || (n % 1000 + 1), 'pln_bench_' || (n % 4), 'thu',
                    '2026-01-15',
                    CASE n % 4 WHEN 0 THEN '[]' WHEN 1 THEN '[\"kiwifruit\"]'
                               WHEN 2 THEN '[\"apple\",\"banana\"]' ELSE '[\"mango\"]' END,
                    'active', NULL, $2, NULL
             FROM generate_series(1, $1::BIGINT) AS n"
        }
    };
    generate(&f.writers, &[subs_sql], n, micros(now)).await?;
    generate(
        &f.writers,
        &[
            "INSERT INTO deliveries (id, subscription_id, delivery_date, cutoff_at, status,
             skip_reason, amount_minor, lines)
           SELECT 'dlv_' || id, id, '2026-01-15', $2, 'scheduled', NULL, NULL, NULL
           FROM subscriptions WHERE $1 > 0",
        ],
        n,
        cutoff,
    )
    .await?;
    let capture = floor::Capture::before(store).await?;
    // The cycle: the weekly plan ahead of the cutoff (growers need their lead time), then the
    // renewal at the cutoff. Both are timed.
    reset_peak_rss();
    let started = Instant::now();
    subscriptions::run_plan(store, now, chrono_tz::UTC).await?;
    let planned = started.elapsed().as_secs_f64();
    let at_cutoff = crate::store::instant(cutoff);
    let utc = chrono_tz::UTC;
    subscriptions::run_renew(store, &f.app_state.payments, &[1, 3, 5], utc, at_cutoff).await?;
    let wall = started.elapsed().as_secs_f64();
    let rss = peak_rss_mb();
    let paid = store.count_invoices("paid").await?;
    let floor = capture.load_written().await?;
    let check = store.ledger_check().await?;
    let signup_ms = signup(
        store,
        &plans[0],
        delivery + chrono::Duration::days(7),
        at_cutoff,
    )
    .await?;
    let rate = n as f64 / wall;
    Ok(Figure::new(
        "renewal",
        f.backend,
        rate,
        "subscriptions/s",
        n as f64 / floor.seconds,
    )
    .with("floor_rows", json!(floor.rows()))
    .with("floor_rows_by_table", json!(floor.rows_by_table))
    .with("wall_s", json!(round(wall)))
    .with("plan_s", json!(round(planned)))
    .with("peak_rss_mb", json!(round(rss)))
    .with("rss_under_target", json!(rss < RENEWAL_RSS_TARGET_MB))
    .with("signup_ms", json!(round(signup_ms)))
    .with("subscriptions", json!(n))
    .with("all_paid", json!(paid == n))
    .with(
        "ledger_balanced",
        json!(check.balanced && check.gateway_matches),
    ))
}

/// One more subscription among all the others, as the API creates it: its deliveries, its
/// boxes of the coming two weeks and their grower orders. Returns the milliseconds it took,
/// which should not grow with the number of subscribers.
async fn signup(
    store: &Store,
    plan: &crate::store::PlanRow,
    first: chrono::NaiveDate,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let sub = crate::store::SubscriptionRow {
        id: "sub_bench_signup".into(),
        shopper_id: "shp_bench_1".into(),
        plan_id: plan.id.clone(),
        delivery_weekday: "thu".into(),
        start_date: first.to_string(),
        exclusions: "[]".into(),
        status: "active".into(),
        paused_until: None,
        created_at: micros(now),
        ended_at: None,
    };
    let deliveries = subscriptions::upcoming_rows(&sub, plan, first, now)?;
    store
        .create_subscription(
            crate::store::NewSubscription {
                subscription: &sub,
                calendar_key: None,
                deliveries: &deliveries,
                welcome: None,
                key: None,
            },
            subscriptions::RENEW_JOB,
            now,
        )
        .await?;
    subscriptions::plan_upcoming(store, &sub, now, chrono_tz::UTC).await?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

async fn settlement(f: &Fresh, args: &BenchArgs) -> anyhow::Result<Figure> {
    let store = f.store();
    let now = f.now();
    let n = args.pledges;
    let manufacturer = crate::domain::identity::Manufacturer {
        id: "mfr_bench".into(),
        name: "Bench Factory".into(),
        email: "factory@example.com".into(),
        created_at: now,
    };
    store
        .create_manufacturer(&manufacturer, "bench-manufacturer-token")
        .await?;
    let closes = now + Duration::days(1);
    let campaign = crate::store::CampaignRow {
        id: "cmp_bench".into(),
        title: "Bench jacket".into(),
        sku: "BENCH".into(),
        currency: "EUR".into(),
        reference_price_minor: 20000,
        deposit_bps: 1000,
        deposit_per_unit_minor: 2000,
        deposit_refundable: true,
        opens_at: micros(now),
        closes_at: micros(closes),
        time_zone: "Europe/Berlin".into(),
        balance_window_hours: 72,
        variants: r#"["S","M","L"]"#.into(),
        status: "open".into(),
        pooled_qty: n,
        capacity: None,
        price_ceiling_minor: Some(18000),
        locked_price_minor: None,
        final_unit_price_minor: None,
        balance_due_at: None,
        surplus_qty: 0,
        shortfall_minor: 0,
        closed_at: None,
        settled_at: None,
        created_at: micros(now),
    };
    let quote = crate::store::QuoteRow {
        id: "quo_bench".into(),
        campaign_id: campaign.id.clone(),
        manufacturer_id: manufacturer.id.clone(),
        tiers: presales::stored_tiers(&[
            crate::domain::presale::Tier {
                min_qty: 1,
                unit_price: crate::domain::money::UnitPrice::parse("180").expect("price"),
            },
            crate::domain::presale::Tier {
                min_qty: 1000,
                unit_price: crate::domain::money::UnitPrice::parse("140").expect("price"),
            },
        ]),
        capacity: None,
        lead_time_days: 60,
        created_at: micros(now),
    };
    store
        .create_campaign(&campaign, &[quote], &presales::campaign_timers(&campaign))
        .await?;
    f.generate_shoppers(now).await?;
    // Pledges as joins leave them: active, each with its succeeded deposit, the gateway's
    // record of it and its ledger entry.
    generate(
        &f.writers,
        &settlement_generators(&store.db),
        n,
        micros(now),
    )
    .await?;
    let capture = floor::Capture::before(store).await?;
    reset_peak_rss();
    let started = Instant::now();
    presales::run_close(store, &f.app_state.payments, closes).await?;
    let window_end = closes + Duration::hours(72);
    presales::run_balances(store, &f.app_state.payments, window_end).await?;
    let wall = started.elapsed().as_secs_f64();
    let rss = peak_rss_mb();
    let settled = store
        .campaign("cmp_bench")
        .await?
        .map(|c| c.status)
        .unwrap_or_default();
    let paid = store.count_pledges("cmp_bench", "paid").await?;
    let floor = capture.load_written().await?;
    let check = store.ledger_check().await?;
    Ok(Figure::new(
        "settlement",
        f.backend,
        n as f64 / wall,
        "pledges/s",
        n as f64 / floor.seconds,
    )
    .with("floor_rows", json!(floor.rows()))
    .with("floor_rows_by_table", json!(floor.rows_by_table))
    .with("wall_s", json!(round(wall)))
    .with("peak_rss_mb", json!(round(rss)))
    .with("pledges", json!(n))
    .with("all_paid", json!(paid == n))
    .with("status", json!(settled))
    .with(
        "ledger_balanced",
        json!(check.balanced && check.gateway_matches),
    ))
}

/// SQL that generates `$1` active pledges with their deposits (intent, gateway row, ledger).
fn settlement_generators(db: &Db) -> [&'static str; 5] {
    match db {
        Db::Sqlite(_) => [
            "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < $1)
             INSERT INTO pledges (id, campaign_id, shopper_id, qty, variant, status, deposit_minor,
                 price_ceiling_minor, refunded_minor, created_at, updated_at)
             SELECT 'plg_' || n, 'cmp_bench', 'shp_bench_' || (n % 1000 + 1), 1,
                    CASE n % 3 WHEN 0 THEN 'S' WHEN 1 THEN 'M' ELSE 'L' END,
                    'active', 2000, 18000, 0, $2, $2
             FROM seq",
            PLEDGE_DEPOSITS,
            PLEDGE_SANDBOX,
            PLEDGE_LINES,
            PLEDGE_ENTRIES,
        ],
        Db::Postgres(_) => [
            "INSERT INTO pledges (id, campaign_id, shopper_id, qty, variant, status, deposit_minor,
                 price_ceiling_minor, refunded_minor, created_at, updated_at)
             SELECT 'plg_' || n, 'cmp_bench', 'shp_bench_' || (n % 1000 + 1), 1,
                    CASE n % 3 WHEN 0 THEN 'S' WHEN 1 THEN 'M' ELSE 'L' END,
                    'active', 2000, 18000, 0, $2, $2
             FROM generate_series(1, $1::BIGINT) AS n",
            PLEDGE_DEPOSITS,
            PLEDGE_SANDBOX,
            PLEDGE_LINES,
            PLEDGE_ENTRIES,
        ],
    }
}

const PLEDGE_DEPOSITS: &str = "INSERT INTO payment_intents (id, idempotency_key, kind, purpose,
        subject_id, shopper_id, amount_minor, currency, account, status, attempts, next_attempt_at,
        gateway_ref, memo, created_at, resolved_at)
     SELECT 'pi_deposit_' || id, 'deposit:' || id, 'charge', 'deposit', id, shopper_id, 2000, 'EUR',
            'deposits_held', 'succeeded', 1, $2, 'ch_' || id, 'deposit', $2, $2
     FROM pledges WHERE campaign_id = 'cmp_bench' AND $1 > 0";
const PLEDGE_SANDBOX: &str = "INSERT INTO sandbox_payments (id, kind, idempotency_key, customer,
        payment_method, amount_minor, currency, status, refunded_minor, calls, created_at, updated_at)
     SELECT 'ch_' || id, 'charge', 'deposit:' || id, shopper_id, 'pm_ok', 2000, 'EUR', 'succeeded',
            0, 1, $2, $2
     FROM pledges WHERE campaign_id = 'cmp_bench' AND $1 > 0";
const PLEDGE_LINES: &str =
    "INSERT INTO ledger_lines (entry_id, line_no, account, shopper_id, amount_minor)
     SELECT 'je_' || id, 0, 'gateway_clearing', shopper_id, 2000 FROM pledges
     WHERE campaign_id = 'cmp_bench' AND $1 > 0
     UNION ALL
     SELECT 'je_' || id, 1, 'deposits_held', shopper_id, -2000 FROM pledges
     WHERE campaign_id = 'cmp_bench' AND $2 > 0";
const PLEDGE_ENTRIES: &str =
    "INSERT INTO ledger_entries (id, currency, cause_type, cause_id, event,
        memo, created_at)
     SELECT 'je_' || id, 'EUR', 'payment_intent', 'pi_deposit_' || id, 'succeeded', 'deposit', $2
     FROM pledges WHERE campaign_id = 'cmp_bench' AND $1 > 0";

async fn joins(f: &Fresh, args: &BenchArgs) -> anyhow::Result<Figure> {
    let store = f.store();
    let now = f.now();
    let client = reqwest::Client::new();
    let manufacturer: serde_json::Value = client
        .post(format!("{}/api/v1/manufacturers", f.base))
        .bearer_auth(&f.admin)
        .json(&json!({"name": "Bench Factory", "email": "factory@example.com"}))
        .send()
        .await?
        .json()
        .await?;
    // Quick: capacity below what the stampede attempts, so sold-out answers are exercised.
    // Full: a capacity the run can't reach, so the rate measured is the rate of accepted joins.
    let capacity = if args.quick { 300 } else { 10_000_000 };
    let campaign: serde_json::Value = client
        .post(format!("{}/api/v1/campaigns", f.base))
        .bearer_auth(&f.admin)
        .json(&json!({
            "title": "Bench stampede", "sku": "RUSH", "currency": "EUR", "reference_price": "100.00",
            "deposit_percent": "10", "opens_at": now, "closes_at": now + Duration::days(7),
            "time_zone": "UTC", "quotes": [{"manufacturer_id": manufacturer["id"], "lead_time_days": 10,
            "capacity": capacity, "tiers": [{"min_qty": 1, "unit_price": "80.00"}]}]}))
        .send()
        .await?
        .json()
        .await?;
    let url = format!(
        "{}/api/v1/campaigns/{}/pledges",
        f.base,
        campaign["id"].as_str().context("campaign id")?
    );
    let mut tokens = Vec::new();
    for i in 0..args.clients {
        let shopper: serde_json::Value = client
            .post(format!("{}/api/v1/shoppers", f.base))
            .json(&json!({"name": format!("Rush {i}"), "email": format!("rush{i}@example.com"), "payment_token": "pm_ok"}))
            .send()
            .await?
            .json()
            .await?;
        tokens.push(shopper["token"].as_str().context("token")?.to_owned());
    }
    let accepted = Arc::new(AtomicU64::new(0));
    let sold_out = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // The stampede's own rows, loaded again in bulk: what a join could at best cost on this
    // database with everything it writes, whatever the batching.
    let capture = floor::Capture::before(store).await?;
    let batches_before = JoinBatches::scrape(&client, &f.base).await?;
    let deadline = Instant::now() + std::time::Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (client_no, token) in tokens.into_iter().enumerate() {
        let (client, url) = (client.clone(), url.clone());
        let (accepted, sold_out, errors) = (accepted.clone(), sold_out.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                // As the API asks of clients: every pledge carries its own Idempotency-Key.
                let res = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header(
                        "Idempotency-Key",
                        format!("rush-{client_no}-{}", latencies.len()),
                    )
                    .json(&json!({"qty": 1}))
                    .send()
                    .await;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                match res.map(|r| r.status().as_u16()) {
                    Ok(201) => accepted.fetch_add(1, Ordering::Relaxed),
                    Ok(409) => sold_out.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?);
    }
    let wall = started.elapsed().as_secs_f64();
    let batches = JoinBatches::scrape(&client, &f.base)
        .await?
        .since(&batches_before);
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let accepted = accepted.load(Ordering::Relaxed);
    let attempts = latencies.len() as u64;
    let pooled = store
        .campaign(campaign["id"].as_str().unwrap_or_default())
        .await?
        .map_or(0, |c| c.pooled_qty);
    let answered = attempts - errors.load(Ordering::Relaxed);
    let accepted_ok = accepted == (capacity as u64).min(answered) && accepted as i64 == pooled;
    let bulk = capture.load_written().await?;
    let floor = naive_hot_row(&f.writers, args).await?;
    let rate = accepted.min(attempts) as f64 / wall;
    let bulk_floor = accepted as f64 / bulk.seconds;
    Ok(Figure::new("joins", f.backend, rate, "joins/s", floor)
        .with("p50_ms", json!(round(pct(0.5))))
        .with("p99_ms", json!(round(pct(0.99))))
        .with("oversold", json!((pooled - capacity).max(0)))
        .with("accepted", json!(accepted))
        .with("attempts", json!(attempts))
        .with("sold_out", json!(sold_out.load(Ordering::Relaxed)))
        .with("errors", json!(errors.load(Ordering::Relaxed)))
        .with("accepted_is_min_capacity_attempts", json!(accepted_ok))
        .with("batches", json!(batches.count as u64))
        .with("mean_batch", json!(round(batches.mean_size())))
        .with("batch_ms", json!(round(batches.mean_ms())))
        .with("bulk_floor", json!(round(bulk_floor)))
        .with("bulk_ratio", json!(round(rate / bulk_floor)))
        .with("floor_rows", json!(bulk.rows()))
        .with("floor_rows_by_table", json!(bulk.rows_by_table)))
}

/// The join queue's batches as the service's own `/metrics` counts them. While the worker is
/// busy, it makes `mean_batch / batch_ms` joins per millisecond; a caller waits for the batch
/// running when it asked, then for its own, so the rate grows only with bigger batches or
/// shorter ones.
#[derive(Debug)]
struct JoinBatches {
    count: f64,
    joins: f64,
    seconds: f64,
}

impl JoinBatches {
    async fn scrape(client: &reqwest::Client, base: &str) -> anyhow::Result<JoinBatches> {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(JoinBatches::parse(&text))
    }

    /// Reads the `batch="joins"` series of `pooled_batch_size` and `pooled_batch_seconds`
    /// from Prometheus text; a series not yet recorded counts as zero.
    fn parse(text: &str) -> JoinBatches {
        let value = |series: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        JoinBatches {
            count: value("pooled_batch_size_count{batch=\"joins\"}"),
            joins: value("pooled_batch_size_sum{batch=\"joins\"}"),
            seconds: value("pooled_batch_seconds_sum{batch=\"joins\"}"),
        }
    }

    fn since(&self, before: &JoinBatches) -> JoinBatches {
        JoinBatches {
            count: self.count - before.count,
            joins: self.joins - before.joins,
            seconds: self.seconds - before.seconds,
        }
    }

    /// `total` shared over the batches; zero when there were none.
    fn per_batch(&self, total: f64) -> f64 {
        if self.count > 0.0 {
            total / self.count
        } else {
            0.0
        }
    }

    fn mean_size(&self) -> f64 {
        self.per_batch(self.joins)
    }

    fn mean_ms(&self) -> f64 {
        self.per_batch(self.seconds * 1000.0)
    }
}

/// The naive hot-row rate: `clients` tasks each committing one guarded `UPDATE` of one
/// counter plus one `INSERT` per join, for the same duration.
async fn naive_hot_row(db: &Db, args: &BenchArgs) -> anyhow::Result<f64> {
    match db {
        Db::Sqlite(pool) => {
            sqlx::query("CREATE TABLE IF NOT EXISTS bench_counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)").execute(pool).await?;
            sqlx::query("CREATE TABLE IF NOT EXISTS bench_joins (id INTEGER PRIMARY KEY, at INTEGER NOT NULL)").execute(pool).await?;
            sqlx::query(
                "INSERT INTO bench_counter (id, n) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
            )
            .execute(pool)
            .await?;
        }
        Db::Postgres(pool) => {
            sqlx::query("CREATE TABLE IF NOT EXISTS bench_counter (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)").execute(pool).await?;
            sqlx::query("CREATE TABLE IF NOT EXISTS bench_joins (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at BIGINT NOT NULL)").execute(pool).await?;
            sqlx::query(
                "INSERT INTO bench_counter (id, n) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
            )
            .execute(pool)
            .await?;
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + std::time::Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (db, done) = (db.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let ok: Result<(), sqlx::Error> = async {
                    match &db {
                        Db::Sqlite(pool) => {
                            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                            sqlx::query("UPDATE bench_counter SET n = n + 1 WHERE id = 1 AND n < 1000000000").execute(&mut *tx).await?;
                            sqlx::query("INSERT INTO bench_joins (at) VALUES (1)").execute(&mut *tx).await?;
                            tx.commit().await
                        }
                        Db::Postgres(pool) => {
                            let mut tx = pool.begin().await?;
                            sqlx::query("UPDATE bench_counter SET n = n + 1 WHERE id = 1 AND n < 1000000000").execute(&mut *tx).await?;
                            sqlx::query("INSERT INTO bench_joins (at) VALUES (1)").execute(&mut *tx).await?;
                            tx.commit().await
                        }
                    }
                }
                .await;
                if ok.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::{Figure, JoinBatches, broken_invariants};
    use serde_json::json;

    #[test]
    fn join_batches_are_read_from_the_services_own_metrics() {
        let text = "# TYPE pooled_batch_size summary
pooled_batch_size{batch=\"joins\",quantile=\"0.5\"} 31
pooled_batch_size_sum{batch=\"joins\"} 640
pooled_batch_size_count{batch=\"joins\"} 20
pooled_batch_size_sum{batch=\"idempotency-begin\"} 9
# TYPE pooled_batch_seconds histogram
pooled_batch_seconds_bucket{batch=\"joins\",le=\"0.01\"} 20
pooled_batch_seconds_sum{batch=\"joins\"} 0.25
pooled_batch_seconds_count{batch=\"joins\"} 20
";
        let now = JoinBatches::parse(text);
        let before = JoinBatches::parse(
            "pooled_batch_size_count{batch=\"joins\"} 4
pooled_batch_size_sum{batch=\"joins\"} 40
pooled_batch_seconds_sum{batch=\"joins\"} 0.05",
        );
        let run = now.since(&before);
        assert_eq!((run.count, run.mean_size()), (16.0, 37.5));
        assert!((run.mean_ms() - 12.5).abs() < 1e-9, "{}", run.mean_ms());
        assert_eq!(
            JoinBatches::parse("").mean_ms(),
            0.0,
            "nothing recorded yet"
        );
    }

    #[test]
    fn a_figure_breaks_exactly_the_invariants_it_reports_as_broken() {
        let holding = Figure::new("renewal", "sqlite", 1.0, "subscriptions/s", 1.0)
            .with("ledger_balanced", json!(true))
            .with("all_paid", json!(true))
            .with("rss_under_target", json!(true));
        assert!(broken_invariants(&holding).is_empty());
        let swollen = holding.with("rss_under_target", json!(false));
        assert_eq!(
            broken_invariants(&swollen),
            [
                "renewal on sqlite: peak RSS reached the renewal's 300 MB target: the renewal must stream"
            ]
        );
        let unreported = Figure::new("joins", "postgres", 1.0, "joins/s", 1.0);
        assert!(
            broken_invariants(&unreported).is_empty(),
            "unreported is not broken"
        );
        let broken = Figure::new("settlement", "postgres", 1.0, "pledges/s", 1.0)
            .with("ledger_balanced", json!(true))
            .with("all_paid", json!(false))
            .with("status", json!("failed"))
            .with("oversold", json!(3));
        assert_eq!(
            broken_invariants(&broken),
            [
                "settlement on postgres: oversold",
                "settlement on postgres: the campaign did not settle",
                "settlement on postgres: not every subscription or pledge was charged once and paid",
            ]
        );
    }
}
