//! The `pooled` binary as a newcomer meets it: bad configuration ends with one clear line and a
//! non-zero exit; `serve` answers on both backends and stops gracefully on SIGTERM.

use crate::helpers::{Backend, TestDb, call_json, postgres_server};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn pooled(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pooled"));
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POOLED_BIND", "127.0.0.1:0")
        .env("RUST_LOG", "warn");
    cmd
}

/// Runs to completion (with a deadline) and returns (success, stderr).
fn run(mut cmd: Command) -> (bool, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        assert!(std::time::Instant::now() < deadline, "pooled did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_one_clear_line(case: &str, mut cmd: Command, must_mention: &str) {
    let (ok, stderr) = run({
        cmd.arg("serve");
        cmd
    });
    assert!(!ok, "{case}: exited successfully");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{case}: expected one line on stderr, got {stderr:?}"
    );
    assert!(lines[0].starts_with("pooled: "), "{case}: {stderr}");
    assert!(
        lines[0].contains(must_mention),
        "{case}: {stderr} lacks {must_mention:?}"
    );
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
}

#[test]
fn bad_configuration_ends_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let with = |k: &str, v: &str| {
        let mut c = pooled(dir.path());
        c.env(k, v);
        c
    };
    assert_one_clear_line(
        "scheme",
        with("DATABASE_URL", "mysql://root@localhost/x"),
        "DATABASE_URL",
    );
    assert_one_clear_line(
        "zone",
        with("POOLED_TIME_ZONE", "Mars/Base"),
        "POOLED_TIME_ZONE",
    );
    assert_one_clear_line(
        "clock",
        with("POOLED_CLOCK", "sundial"),
        "POOLED_CLOCK: unknown clock 'sundial'",
    );
    let mut c = with("POOLED_CLOCK", "manual");
    c.env("POOLED_CLOCK_START", "next tuesday");
    assert_one_clear_line("clock start", c, "POOLED_CLOCK_START");
    assert_one_clear_line(
        "crash point",
        with("POOLED_DEBUG_CRASH", "sideways"),
        "unknown crash point 'sideways'",
    );
    assert_one_clear_line(
        "unreachable postgres",
        with("DATABASE_URL", "postgres://postgres@127.0.0.1:1/pooled"),
        "cannot open the database postgres://postgres@127.0.0.1:1/pooled",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_one_clear_line("taken port", with("POOLED_BIND", &addr), "cannot listen on");
}

/// A running `pooled serve`, killed on drop.
pub struct Served {
    pub child: Child,
    pub base: String,
}

impl Served {
    /// GET `path` of this process as JSON.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let client = reqwest::Client::new();
        call_json(&client, &self.base, Method::GET, path, token, None).await
    }

    /// POST `body` to `path` of this process as JSON.
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let client = reqwest::Client::new();
        call_json(&client, &self.base, Method::POST, path, token, Some(body)).await
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(mut cmd: Command) -> Served {
    let mut child = cmd
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let addr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_owned();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Served {
        child,
        base: format!("http://{addr}"),
    }
}

pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn healthz(base: &str) {
    let res = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn serve_on_the_embedded_default_then_stop_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(pooled(dir.path()));
    healthz(&served.base).await;
    assert!(
        dir.path().join("pooled-data/pooled.db").exists(),
        "default database created"
    );

    // A second process on the same data directory is refused with a clear message.
    let (ok, stderr) = run({
        let mut c = pooled(dir.path());
        c.arg("serve");
        c
    });
    assert!(!ok);
    assert!(
        stderr.contains("in use by another pooled process"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    sigterm(&served.child);
    let status = served.child.wait().unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status}");
}

#[tokio::test]
async fn serve_on_postgres_creates_its_database() {
    if postgres_server().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Postgres);
    let mut cmd = pooled(db.dir.path());
    let pooled::config::DatabaseUrl::Postgres(url) = &db.url else {
        unreachable!()
    };
    cmd.env("DATABASE_URL", url);
    let mut served = serve(cmd);
    healthz(&served.base).await;
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", served.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["database"], "postgres");
    sigterm(&served.child);
    assert!(served.child.wait().unwrap().success());
}

#[test]
fn version_and_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_pooled"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pooled "));
    let out = Command::new(env!("CARGO_BIN_EXE_pooled"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "migrate", "--database-url", "--clock"] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
}
