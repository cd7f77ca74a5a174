//! Email: the templates (`templates/email/*.{txt,html}`) rendered into outbox rows, and the
//! transport that delivers them ([`mailer`]). Delivery itself is the `outbox-deliver` job.

pub mod mailer;

use crate::store::NewEmail;
use askama::Template;

#[derive(Template)]
#[template(path = "email/job_failed.txt")]
struct JobFailedText<'a> {
    job: &'a str,
    scheduled_for: &'a str,
    attempts: i64,
    error: &'a str,
}

#[derive(Template)]
#[template(path = "email/job_failed.html")]
struct JobFailedHtml<'a> {
    job: &'a str,
    scheduled_for: &'a str,
    attempts: i64,
    error: &'a str,
}

/// The alert ops get when a run fails for good.
pub fn job_failed(
    to: &str,
    job: &str,
    run_id: i64,
    scheduled_for: &str,
    attempts: i64,
    error: &str,
) -> NewEmail {
    let text = JobFailedText {
        job,
        scheduled_for,
        attempts,
        error,
    };
    let html = JobFailedHtml {
        job,
        scheduled_for,
        attempts,
        error,
    };
    NewEmail {
        template: "job_failed".into(),
        entity: job.into(),
        event: format!("run-{run_id}"),
        to: to.into(),
        subject: format!("[pooled] job {job} failed after {attempts} attempts"),
        text: render(&text),
        html: render(&html),
        attachments: Vec::new(),
    }
}

fn render(t: &impl Template) -> String {
    // Templates are checked at compile time; rendering only fails on a formatter error.
    t.render()
        .unwrap_or_else(|e| format!("(template error: {e})"))
}
