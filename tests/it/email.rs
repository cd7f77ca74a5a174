//! Email delivery through a real SMTP conversation with an in-process server, on both
//! backends: sent once, retried when the server fails, never sent twice.

use crate::helpers::{ADMIN_TOKEN, TestApp};
use crate::on_both_backends;
use mailin_embedded::response::{INTERNAL_ERROR, OK};
use mailin_embedded::{Handler, Response, Server};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// An SMTP sink that refuses the first `failures` recipients with a 451 and keeps the rest.
#[derive(Clone)]
struct Sink {
    received: Arc<Mutex<Vec<String>>>,
    failures: Arc<AtomicUsize>,
    current: Vec<u8>,
}

impl Handler for Sink {
    fn rcpt(&mut self, _to: &str) -> Response {
        // "Try again later", as a greylisting relay answers.
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed { INTERNAL_ERROR } else { OK }
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let message = String::from_utf8_lossy(&std::mem::take(&mut self.current)).into_owned();
        self.received.lock().unwrap().push(message);
        OK
    }
}

/// Starts a sink on a free port; returns its URL and what it received.
fn smtp_sink(failures: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink {
        received: Arc::clone(&received),
        failures: Arc::new(AtomicUsize::new(failures)),
        current: Vec::new(),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut server = Server::new(sink);
    server.with_name("sink.test").with_tcp_listener(listener);
    // serve() returns a non-Send error, so it stays on its own thread.
    std::thread::spawn(move || {
        let _ = server.serve();
    });
    (format!("smtp://127.0.0.1:{port}"), received)
}

async fn failing_job_alerts_ops(backend: crate::helpers::Backend, failures: usize) {
    let (url, received) = smtp_sink(failures);
    let app = TestApp::spawn_with(backend, |s| {
        s.clock = pooled::config::ClockMode::Manual;
        s.clock_start = Some("2026-06-01T00:00:00Z".parse().unwrap());
        s.smtp_url = Some(url);
        s.ops_email = Some("ops@pooled.example".into());
        s.job_overrides =
            Some("maintenance-prune.debug_fail=true;maintenance-prune.max_attempts=1".into());
    })
    .await;
    let (status, run) = app
        .post(
            "/api/v1/ops/jobs/maintenance-prune/run",
            Some(ADMIN_TOKEN),
            json!({}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(run["state"], "failed", "{run}");
    // Each failed delivery is retried on its backoff as the clock moves on.
    app.advance("2026-06-01T01:00:00Z").await;
    app.advance("2026-06-01T02:00:00Z").await;

    let messages = received.lock().unwrap().clone();
    assert_eq!(messages.len(), 1, "sent exactly once");
    let message = &messages[0];
    assert!(
        message.contains("Subject: [pooled] job maintenance-prune failed after 1 attempts"),
        "{message}"
    );
    assert!(message.contains("To: ops@pooled.example"), "{message}");
    assert!(
        message.contains("text/plain") && message.contains("text/html"),
        "{message}"
    );
    assert!(
        message.contains("Message-ID: <job_failed.maintenance-prune.run-"),
        "{message}"
    );

    let (_, outbox) = app.get("/api/v1/ops/outbox", Some(ADMIN_TOKEN)).await;
    let email = &outbox["items"][0];
    assert_eq!(email["status"], "sent", "{outbox}");
    assert_eq!(email["attempts"], failures as i64 + 1, "{outbox}");
    app.stop().await;
}

on_both_backends! {
    async fn an_alert_goes_out_over_smtp(backend) {
        failing_job_alerts_ops(backend, 0).await;
    }
}

on_both_backends! {
    async fn a_failing_smtp_server_is_retried_and_nothing_is_sent_twice(backend) {
        failing_job_alerts_ops(backend, 2).await;
    }
}
