//! Test harness: a fresh database per test on either backend, the real server on a random
//! port, and an HTTP client.
//!
//! PostgreSQL tests need `POOLED_TEST_POSTGRES_URL` (a server URL whose database may be the
//! maintenance one); each test creates its own database and drops it afterwards. Without the
//! variable the PostgreSQL half is skipped locally; under `CI=true` it fails instead.

use chrono::{DateTime, Utc};
use pooled::app::App;
use pooled::config::{ClockMode, DatabaseUrl, Settings};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "pld_admin_test_token_0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Declares a test that runs once per backend, as `<name>::sqlite` and `<name>::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($(#[$meta:meta])* async fn $name:ident($backend:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn run($backend: $crate::helpers::Backend) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run($crate::helpers::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::helpers::postgres_server().is_some() {
                    run($crate::helpers::Backend::Postgres).await
                }
            }
        }
    };
}

/// The PostgreSQL server for tests, or `None` to skip (never under CI).
pub fn postgres_server() -> Option<String> {
    match std::env::var("POOLED_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("CI=true but POOLED_TEST_POSTGRES_URL is not set: the PostgreSQL half must run")
        }
        _ => {
            eprintln!("POOLED_TEST_POSTGRES_URL unset: skipping the PostgreSQL half");
            None
        }
    }
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: DatabaseUrl,
    pub dir: TempDir,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => TestDb {
                url: DatabaseUrl::Sqlite(dir.path().join("pooled.db")),
                dir,
                pg: None,
            },
            Backend::Postgres => {
                let server = postgres_server().expect("PostgreSQL tests need a server");
                let name = format!("pooled_test_{}", uuid::Uuid::new_v4().simple());
                let (prefix, _) = server.rsplit_once('/').expect("URL with a database path");
                TestDb {
                    // The store creates a missing database on connect.
                    url: DatabaseUrl::Postgres(format!("{prefix}/{name}")),
                    dir,
                    pg: Some((server, name)),
                }
            }
        }
    }
}

/// The backends to run on here: SQLite, and PostgreSQL when configured (always under CI).
pub fn backends() -> Vec<Backend> {
    let mut all = vec![Backend::Sqlite];
    if postgres_server().is_some() {
        all.push(Backend::Postgres);
    }
    all
}

impl TestDb {
    /// The database as a `DATABASE_URL` for a child process.
    pub fn url_string(&self) -> String {
        match &self.url {
            DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => url.clone(),
        }
    }

    /// A placeholder left behind when a database moves to a restarted service.
    fn detached() -> TestDb {
        TestDb {
            url: DatabaseUrl::Sqlite("/nonexistent".into()),
            dir: tempfile::tempdir().expect("temp dir"),
            pg: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server, name)) = self.pg.take() else {
            return;
        };
        // Drop runs outside async; a private runtime on its own thread does the cleanup.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&server).await {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Settings for a test service on `db`, bound to a random port, with a known admin token.
pub fn settings(db: &TestDb) -> Settings {
    Settings {
        database: db.url.clone(),
        data_dir: db.dir.path().to_owned(),
        bind: "127.0.0.1:0".into(),
        admin_token: Some(ADMIN_TOKEN.into()),
        clock: ClockMode::System,
        clock_start: None,
        time_zone: chrono_tz::UTC,
        smtp_url: None,
        instance_id: "test".into(),
        ops_email: None,
        job_overrides: None,
        crash_at: None,
        dunning_days: vec![1, 3, 5],
    }
}

/// The real service, serving HTTP on a random port for the length of a test.
pub struct TestApp {
    pub base: String,
    pub state: pooled::app::AppState,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    // Declared last: the database outlives the server using it.
    _db: TestDb,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    /// A service on the manual clock, starting at `start`.
    pub async fn spawn_manual(backend: Backend, start: DateTime<Utc>) -> TestApp {
        Self::spawn_with(backend, |s| {
            s.clock = ClockMode::Manual;
            s.clock_start = Some(start);
        })
        .await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        let db = TestDb::new(backend);
        Self::serve(db, adjust).await
    }

    /// Stops this service and starts a new one on the same database (a restart after
    /// downtime, when the manual clock starts later).
    pub async fn restart_with(mut self, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        self.shutdown_and_wait().await;
        let db = std::mem::replace(&mut self._db, TestDb::detached());
        // Every handle on the old store (and its SQLite lock) goes before the new one opens.
        drop(self);
        Self::serve(db, adjust).await
    }

    async fn serve(db: TestDb, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        let mut s = settings(&db);
        adjust(&mut s);
        pooled::telemetry::init();
        let app = App::build(s).await.expect("service starts");
        let state = app.state().clone();
        let base = format!("http://{}", app.addr);
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        TestApp {
            base,
            state,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            server: Some(server),
            _db: db,
        }
    }

    /// Stops the server gracefully and waits for it, once every email it wrote is checked
    /// ([`TestApp::assert_emails_read_well`]).
    pub async fn stop(mut self) {
        self.assert_emails_read_well().await;
        self.shutdown_and_wait().await;
    }

    /// Every email's subject and text read as prose: no run of spaces after a word (a string
    /// literal broken over lines without its `\`) and no "(s)" plurals. Checked at the end
    /// of every test that stops its app, so each such scenario's emails are read.
    async fn assert_emails_read_well(&self) {
        let emails = self
            .state
            .store
            .outbox(None, 1_000_000, None)
            .await
            .expect("outbox");
        for e in emails {
            for text in [&e.subject, &e.text_body] {
                let gap = text
                    .as_bytes()
                    .windows(3)
                    .any(|w| w[0].is_ascii_alphanumeric() && w[1..] == *b"  ");
                assert!(
                    !gap && !text.contains("(s)"),
                    "{} email reads badly: {text}",
                    e.template
                );
            }
        }
    }

    async fn shutdown_and_wait(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
        // Release the SQLite lock and pool before the database is reused.
        self.state.store.close().await;
    }

    /// The service's data directory (SQLite file, `.eml` outbox).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.state.settings.data_dir.clone()
    }

    /// Moves the manual clock to `to` (RFC 3339), running what is due; returns the runs.
    pub async fn advance(&self, to: &str) -> Vec<Value> {
        let (status, body) = self
            .post(
                "/api/v1/ops/clock/advance",
                Some(ADMIN_TOKEN),
                serde_json::json!({"to": to}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "advance to {to}: {body}");
        body["runs"].as_array().cloned().unwrap_or_default()
    }

    /// A client that shows redirects instead of following them, signed in to `/ops` as the
    /// admin: the client, its session cookie and the page's CSRF token.
    pub async fn ops_session(&self) -> (reqwest::Client, String, String) {
        use reqwest::header::{COOKIE, SET_COOKIE};
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let res = client
            .post(format!("{}/login", self.base))
            .form(&[("token", ADMIN_TOKEN)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        let cookie = res.headers()[SET_COOKIE].to_str().unwrap();
        let session = cookie.split(';').next().unwrap().to_owned();
        let html = client
            .get(format!("{}/ops", self.base))
            .header(COOKIE, &session)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = html.split("name=\"csrf\" value=\"").nth(1).unwrap();
        let csrf = csrf.split('"').next().unwrap().to_owned();
        (client, session, csrf)
    }

    /// Every run of `job` in the ledger, oldest slot first.
    pub async fn runs_of(&self, job: &str) -> Vec<Value> {
        let (status, body) = self
            .get(
                &format!("/api/v1/ops/runs?job={job}&limit=500"),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut runs = body["items"].as_array().cloned().unwrap_or_default();
        runs.sort_by_key(|r| str_of(&r["scheduled_for"]));
        runs
    }

    /// Sends a JSON request; `token` is the bearer, if any.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        call_json(&self.client, &self.base, method, path, token, body).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, token, Some(body)).await
    }

    /// Signs up a shopper with a payment method; returns (id, token).
    pub async fn shopper(&self, name: &str, payment_token: &str) -> (String, String) {
        let (status, body) = self
            .post(
                "/api/v1/shoppers",
                None,
                serde_json::json!({"name": name, "email": format!("{}@example.com", name.to_lowercase()), "payment_token": payment_token}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (str_of(&body["id"]), str_of(&body["token"]))
    }
}

/// Money helpers.
impl TestApp {
    /// POSTs with an `Idempotency-Key`.
    pub async fn post_keyed(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let res = self
            .client
            .request(Method::POST, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .expect("request sent");
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn ledger_check(&self) -> Value {
        let (status, body) = self
            .get("/api/v1/ops/ledger/check", Some(ADMIN_TOKEN))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// The balance of one ledger account in EUR, as the API's decimal string.
    pub async fn account_balance(&self, account: &str) -> String {
        let check = self.ledger_check().await;
        check["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == account)
            .map(|a| str_of(&a["balance"]))
            .unwrap_or_else(|| "0.00".into())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn str_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
        .to_owned()
}

/// Sends a JSON request to the service at `base`; `token` is the bearer, if any. Answers the
/// status and the body (as JSON, or as a string when it isn't).
pub async fn call_json(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request sent");
    let status = res.status();
    let text = res.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Runs raw statements in one transaction on a connection of our own, past the store's checks.
pub async fn raw_tx(url: &DatabaseUrl, statements: &[&str]) -> Result<(), sqlx::Error> {
    use sqlx::{Connection, Executor};
    async fn run<C>(conn: &mut C, statements: &[&str]) -> Result<(), sqlx::Error>
    where
        C: Connection,
        for<'c> &'c mut <C::Database as sqlx::Database>::Connection:
            Executor<'c, Database = C::Database>,
    {
        let mut tx = conn.begin().await?;
        for sql in statements {
            tx.execute(sqlx::AssertSqlSafe(sql.to_string())).await?;
        }
        tx.commit().await
    }
    match url {
        DatabaseUrl::Sqlite(path) => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .foreign_keys(true);
            run(
                &mut sqlx::SqliteConnection::connect_with(&options).await?,
                statements,
            )
            .await
        }
        DatabaseUrl::Postgres(url) => {
            run(&mut sqlx::PgConnection::connect(url).await?, statements).await
        }
    }
}

/// A keyless request to pledge `qty` units of variant M of `campaign_id`, made at `now`.
pub fn join_request(
    campaign_id: &str,
    shopper_id: &str,
    qty: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> pooled::presales::JoinRequest {
    pooled::presales::JoinRequest {
        campaign_id: campaign_id.to_owned(),
        shopper_id: shopper_id.to_owned(),
        qty,
        variant: Some("M".into()),
        now,
        key: None,
    }
}

/// [`pooled::presales::join_many`], each answer awaited through its deposit's retries.
pub async fn join_settled(
    store: &pooled::store::Store,
    payments: &pooled::payments::Payments,
    requests: Vec<pooled::presales::JoinRequest>,
) -> Vec<pooled::presales::JoinAnswer> {
    let mut answers = Vec::new();
    for answer in pooled::presales::join_many(store, payments, requests).await {
        answers.push(answer.settled().await);
    }
    answers
}

/// Returns once a session of `pg`'s database waits on a lock (a statement blocked by a
/// transaction the test holds open), so a test can order two writers without sleeping.
pub async fn until_a_lock_is_waited_on(pg: &sqlx::PgPool) {
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(pg)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
}
