//! Email delivery through a real SMTP conversation with an in-process server, on both
//! backends: sent once, retried when the server fails, never sent twice.

use crate::helpers::{ADMIN_TOKEN, TestApp};
use crate::on_both_backends;
use mailin_embedded::response::{INTERNAL_ERROR, OK};
use mailin_embedded::{Handler, Response, Server};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// An SMTP sink that refuses the first `failures` recipients with `refusal` and keeps the rest.
#[derive(Clone)]
struct Sink {
    received: Arc<Mutex<Vec<String>>>,
    failures: Arc<AtomicUsize>,
    refusal: Response,
    current: Vec<u8>,
}

impl Handler for Sink {
    fn rcpt(&mut self, _to: &str) -> Response {
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed { self.refusal.clone() } else { OK }
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

/// Starts a sink on a free port that refuses the first `failures` recipients with "try again
/// later" (451), as a greylisting relay answers; returns its URL and what it received.
fn smtp_sink(failures: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    smtp_sink_refusing(failures, INTERNAL_ERROR)
}

/// [`smtp_sink`] refusing with `refusal`.
fn smtp_sink_refusing(failures: usize, refusal: Response) -> (String, Arc<Mutex<Vec<String>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink {
        received: Arc::clone(&received),
        failures: Arc::new(AtomicUsize::new(failures)),
        refusal,
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

/// An app on the manual clock at 2026-06-01 that mails ops through `smtp_url` and whose
/// `maintenance-prune` fails for good at its first attempt (so each run writes an alert).
async fn alerting_app(backend: crate::helpers::Backend, smtp_url: String) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.clock = pooled::config::ClockMode::Manual;
        s.clock_start = Some("2026-06-01T00:00:00Z".parse().unwrap());
        s.smtp_url = Some(smtp_url);
        s.ops_email = Some("ops@pooled.example".into());
        s.job_overrides =
            Some("maintenance-prune.debug_fail=true;maintenance-prune.max_attempts=1".into());
    })
    .await
}

async fn failing_job_alerts_ops(backend: crate::helpers::Backend, failures: usize) {
    let (url, received) = smtp_sink(failures);
    let app = alerting_app(backend, url).await;
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

on_both_backends! {
    /// A permanent refusal (550) gives up at once: ops see the email on `/ops` and send it
    /// again once the mail server is mended, by the page's button or the API; it goes out
    /// once, and an email not `failed` is not sent again.
    async fn an_email_refused_for_good_is_sent_again_by_ops(backend) {
        use reqwest::header::{COOKIE, LOCATION};
        let (url, received) = smtp_sink_refusing(1, mailin_embedded::response::NO_MAILBOX);
        let app = alerting_app(backend, url).await;
        let (status, _) = app
            .post("/api/v1/ops/jobs/maintenance-prune/run", Some(ADMIN_TOKEN), json!({}))
            .await;
        assert_eq!(status, 202);
        app.advance("2026-06-01T00:01:00Z").await;
        let (_, outbox) = app.get("/api/v1/ops/outbox", Some(ADMIN_TOKEN)).await;
        let email = &outbox["items"][0];
        assert_eq!((&email["status"], &email["attempts"]), (&json!("failed"), &json!(1)), "{outbox}");
        assert!(email["last_error"].as_str().unwrap().contains("550"), "{email}");
        let id = email["id"].as_str().unwrap().to_owned();

        let (client, session, csrf) = app.ops_session().await;
        let ops = || async {
            let res = client.get(format!("{}/ops", app.base)).header(COOKIE, &session).send().await.unwrap();
            res.text().await.unwrap()
        };
        let html = ops().await;
        for expected in [
            "0 waiting to be sent; 1 gave up after their retries.",
            "[pooled] job maintenance-prune failed after 1 attempts",
            &format!("action=\"/ops/outbox/{id}/retry\""),
        ] {
            assert!(html.contains(expected), "the page lacks {expected}: {html}");
        }
        let retry = format!("{}/ops/outbox/{id}/retry", app.base);
        let res = client.post(&retry).header(COOKIE, &session).form(&[("csrf", "forged")]).send().await.unwrap();
        assert_eq!(res.status(), 403);
        let res = client.post(&retry).header(COOKIE, &session).form(&[("csrf", &csrf)]).send().await.unwrap();
        assert_eq!(res.status(), 303);
        assert_eq!(res.headers()[LOCATION], format!("/ops?retried={id}#outbox").as_str());
        // Sent again as the deliverer next runs.
        app.advance("2026-06-01T00:02:00Z").await;
        let (_, outbox) = app.get("/api/v1/ops/outbox", Some(ADMIN_TOKEN)).await;
        let email = &outbox["items"][0];
        assert_eq!((&email["status"], &email["attempts"]), (&json!("sent"), &json!(2)), "{outbox}");
        assert_eq!(received.lock().unwrap().len(), 1, "delivered once");
        assert!(ops().await.contains("0 waiting to be sent; 0 gave up after their retries."));

        // Only a failed email is sent again, and only one that exists.
        let path = format!("/api/v1/ops/outbox/{id}/retry");
        let (status, problem) = app.post(&path, Some(ADMIN_TOKEN), json!({})).await;
        assert_eq!((status.as_u16(), &problem["code"]), (409, &json!("conflict")), "{problem}");
        assert!(problem["detail"].as_str().unwrap().contains("is sent"), "{problem}");
        for missing in ["999999", "abc"] {
            let (status, _) = app.post(&format!("/api/v1/ops/outbox/{missing}/retry"), Some(ADMIN_TOKEN), json!({})).await;
            assert_eq!(status, 404);
        }
        let (status, _) = app.post(&path, None, json!({})).await;
        assert_eq!(status, 401);
        assert_eq!(received.lock().unwrap().len(), 1, "nothing more went out");
        app.stop().await;
    }
}
