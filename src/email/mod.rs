//! Email: the templates (`templates/email/*.{txt,html}`) rendered into outbox rows, and the
//! transport that delivers them ([`mailer`]). Delivery itself is the `outbox-deliver` job.

pub mod mailer;

use crate::store::NewEmail;
use askama::Template;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;

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

#[derive(Template)]
#[template(path = "email/notice.txt")]
struct NoticeText<'a> {
    greeting: &'a str,
    paragraphs: &'a [String],
    facts: &'a [(String, String)],
}

#[derive(Template)]
#[template(path = "email/notice.html")]
struct NoticeHtml<'a> {
    heading: &'a str,
    greeting: &'a str,
    paragraphs: &'a [String],
    facts: &'a [(String, String)],
}

/// A notice to a shopper or a manufacturer: a heading (the subject), a greeting, paragraphs
/// and a table of facts, in text and HTML. One layout serves every business email; each
/// email's wording is written where it is sent.
pub struct Notice {
    /// Outbox key: which email, about what, at which moment (sent once per key).
    pub template: &'static str,
    pub entity: String,
    pub event: String,
    pub to: String,
    pub subject: String,
    pub greeting: String,
    pub paragraphs: Vec<String>,
    pub facts: Vec<(String, String)>,
    pub attachments: Vec<crate::store::NewAttachment>,
}

impl Notice {
    pub fn render(self) -> NewEmail {
        let text = NoticeText {
            greeting: &self.greeting,
            paragraphs: &self.paragraphs,
            facts: &self.facts,
        };
        let html = NoticeHtml {
            heading: &self.subject,
            greeting: &self.greeting,
            paragraphs: &self.paragraphs,
            facts: &self.facts,
        };
        NewEmail {
            template: self.template.into(),
            entity: self.entity,
            event: self.event,
            to: self.to,
            subject: format!("[pooled] {}", self.subject),
            text: render(&text),
            html: render(&html),
            attachments: self.attachments,
        }
    }
}

/// An instant as its reader's clock shows it, with UTC beside it (deadline bugs start when a
/// reader and the server read one instant differently): `2026-08-01 00:00 CEST (2026-07-31
/// 22:00 UTC)`, or `2026-07-31 22:00 UTC` for a reader on UTC.
pub fn local_time(t: DateTime<Utc>, zone: Tz) -> String {
    let utc = t.format("%Y-%m-%d %H:%M UTC").to_string();
    let local = t
        .with_timezone(&zone)
        .format("%Y-%m-%d %H:%M %Z")
        .to_string();
    // UTC under another name (`Etc/UTC`, `Zulu`) reads the same: said once.
    if local == utc {
        return utc;
    }
    format!("{local} ({utc})")
}

/// `n` of a thing, in English: `1 unit`, `3 units`, `0 hours`.
pub fn count(n: i64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn render(t: &impl Template) -> String {
    // Templates are checked at compile time; rendering only fails on a formatter error.
    t.render()
        .unwrap_or_else(|e| format!("(template error: {e})"))
}

#[cfg(test)]
mod tests {
    use super::local_time;

    #[test]
    fn an_instant_reads_on_its_readers_clock_with_utc_beside_it_once() {
        let t = "2026-07-31T22:00:00Z".parse().unwrap();
        let berlin = local_time(t, chrono_tz::Europe::Berlin);
        assert_eq!(berlin, "2026-08-01 00:00 CEST (2026-07-31 22:00 UTC)");
        assert_eq!(local_time(t, chrono_tz::UTC), "2026-07-31 22:00 UTC");
        assert_eq!(local_time(t, chrono_tz::Etc::UTC), "2026-07-31 22:00 UTC");
    }

    #[test]
    fn counts_read_in_the_singular_only_for_one() {
        assert_eq!(
            [0, 1, 2].map(|n| super::count(n, "unit")),
            ["0 units", "1 unit", "2 units"]
        );
    }
}
