//! Hands rendered emails to a transport: SMTP when `POOLED_SMTP_URL` is set, `.eml` files in
//! `<data dir>/outbox` otherwise (the embedded default).

use crate::store::{NewAttachment, OutboxRow};
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::path::Path;
use std::time::Duration;

/// The sender of every email.
pub const FROM: &str = "pooled <noreply@pooled.invalid>";

/// The longest one SMTP conversation may take.
const SEND_DEADLINE: Duration = Duration::from_secs(20);

/// Where emails go.
#[derive(Clone)]
pub enum Mailer {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(AsyncFileTransport<Tokio1Executor>),
}

/// A failed delivery. Transient failures (connection refused, timeouts, 4xx) are retried;
/// permanent ones (bad address, 5xx) are not.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct MailError {
    pub transient: bool,
    pub message: String,
}

impl Mailer {
    /// SMTP for `smtp://host:port` (or `smtps://`, `?tls=required`), files in `outbox_dir`
    /// when `smtp_url` is `None`.
    pub fn new(smtp_url: Option<&str>, outbox_dir: &Path) -> Result<Mailer, String> {
        match smtp_url {
            Some(url) => {
                if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
                    return Err(format!(
                        "POOLED_SMTP_URL: unsupported scheme in '{url}' (expected smtp:// or smtps://)"
                    ));
                }
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| format!("POOLED_SMTP_URL: {e}"))?
                    .timeout(Some(Duration::from_secs(10)))
                    .build();
                Ok(Mailer::Smtp(transport))
            }
            None => {
                std::fs::create_dir_all(outbox_dir)
                    .map_err(|e| format!("cannot create {}: {e}", outbox_dir.display()))?;
                Ok(Mailer::Files(AsyncFileTransport::new(outbox_dir)))
            }
        }
    }

    /// Sends one outbox email with its attachments.
    pub async fn send(
        &self,
        email: &OutboxRow,
        attachments: &[NewAttachment],
    ) -> Result<(), MailError> {
        let message = build(email, attachments).map_err(|message| MailError {
            transient: false,
            message,
        })?;
        match self {
            // A whole-conversation deadline: a server that stops answering mid-session (seen
            // after a 4xx to DATA) must not hold the outbox forever.
            Mailer::Smtp(t) => match tokio::time::timeout(SEND_DEADLINE, t.send(message)).await {
                Ok(sent) => sent.map(|_| ()).map_err(|e| MailError {
                    transient: !e.is_permanent(),
                    message: format!("SMTP: {e}"),
                }),
                Err(_) => Err(MailError {
                    transient: true,
                    message: format!("SMTP: no answer within {}s", SEND_DEADLINE.as_secs()),
                }),
            },
            Mailer::Files(t) => t.send(message).await.map(|_| ()).map_err(|e| MailError {
                transient: true,
                message: format!("writing the .eml file: {e}"),
            }),
        }
    }
}

/// A Message-ID derived from the outbox key, so a resend after a crash is recognisably the
/// same message downstream.
pub fn message_id(email: &OutboxRow) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!(
        "<{}.{}.{}@pooled.invalid>",
        clean(&email.template),
        clean(&email.entity),
        clean(&email.event)
    )
}

fn build(email: &OutboxRow, attachments: &[NewAttachment]) -> Result<Message, String> {
    let to: Mailbox = email
        .to_addr
        .parse()
        .map_err(|e| format!("bad recipient '{}': {e}", email.to_addr))?;
    let body = MultiPart::alternative_plain_html(email.text_body.clone(), email.html_body.clone());
    let body = if attachments.is_empty() {
        body
    } else {
        attachments
            .iter()
            .try_fold(MultiPart::mixed().multipart(body), |mixed, a| {
                let ct = ContentType::parse(&a.content_type)
                    .map_err(|e| format!("attachment {}: {e}", a.filename))?;
                let part: SinglePart =
                    Attachment::new(a.filename.clone()).body(a.content.clone(), ct);
                Ok::<_, String>(mixed.singlepart(part))
            })?
    };
    Message::builder()
        .from(FROM.parse().map_err(|e| format!("{e}"))?)
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(message_id(email)))
        .multipart(body)
        .map_err(|e| e.to_string())
}
