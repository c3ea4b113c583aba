//! Composing the mail about one settled entity: recipient from the
//! payload, subject from the template, a plain-text and an HTML part.
//!
//! Every value is untrusted: header values are kept on one line, HTML
//! values are escaped, and nothing of the payload but the recipient's
//! address goes into the mail.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use lettre::address::Envelope;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::{Address, Message};

use super::config::{EmailConfig, NoticeStatus};
use super::escape;
use super::template::{Field, Template};

/// The most characters of `detail` a mail shows.
const MAX_DETAIL_CHARS: usize = 2000;
/// The most characters of a subject.
const MAX_SUBJECT_CHARS: usize = 200;
/// The most characters of one interpolated identifier (type, id, time).
const MAX_VALUE_CHARS: usize = 200;
/// The longest address SMTP can carry (RFC 5321 path limit less brackets).
const MAX_ADDRESS_LEN: usize = 254;

/// An entity that settled, as the dispatcher read it from the outbox.
#[derive(Debug, Clone, Copy)]
pub struct Notice<'a> {
    pub entity_id: &'a str,
    pub type_name: &'a str,
    pub version: u32,
    /// `ready`, `failed`, `cancelled` or `degraded`.
    pub status: &'a str,
    /// When it happened, RFC 3339.
    pub at: &'a str,
    /// What went wrong, e.g. the failing step's error.
    pub detail: Option<&'a str>,
    /// The entity's payload; only the recipient is read from it.
    pub payload: &'a serde_json::Value,
}

/// A composed mail, ready for [`super::Mailer::send`].
#[derive(Debug, Clone)]
pub struct Mail {
    recipient: String,
    subject: String,
    text: String,
    html: String,
    message_id: String,
    envelope: Envelope,
    formatted: Vec<u8>,
}

impl Mail {
    /// The envelope and `To:` recipient.
    pub fn recipient(&self) -> &str {
        &self.recipient
    }

    /// The subject, before header encoding.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The plain-text part, before transfer encoding.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The HTML part, before transfer encoding.
    pub fn html(&self) -> &str {
        &self.html
    }

    /// The `Message-ID`, the same for every attempt at the same notice.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The whole message as it goes over the wire (RFC 5322, CRLF lines).
    pub fn formatted(&self) -> &[u8] {
        &self.formatted
    }

    pub(super) fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}

/// Why a notice cannot become a mail. Composing it again gives the same
/// error: it is not worth retrying.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ComposeError {
    /// The payload has no value at `to_field`.
    NoRecipient { field: String },
    /// The value at `to_field` is not a string.
    RecipientNotText { field: String, found: &'static str },
    /// The value at `to_field` is not a usable address.
    BadRecipient {
        field: String,
        value: String,
        reason: String,
    },
    /// The notice's status is none of those that send mail.
    UnknownStatus { status: String },
    /// The configuration was not validated (`from` or `subject` is bad).
    Config(String),
    /// The mail builder refused the message.
    Build(String),
}

impl fmt::Display for ComposeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComposeError::NoRecipient { field } => write!(
                f,
                "the payload has no {field:?} field (notify.email.to_field), so the mail has no \
                 recipient"
            ),
            ComposeError::RecipientNotText { field, found } => write!(
                f,
                "the payload's {field:?} field (notify.email.to_field) is {found}, not an email \
                 address string"
            ),
            ComposeError::BadRecipient {
                field,
                value,
                reason,
            } => write!(
                f,
                "the payload's {field:?} field (notify.email.to_field), {value:?}, is not an email \
                 address: {reason}"
            ),
            ComposeError::UnknownStatus { status } => write!(
                f,
                "a notice's status is {status:?}; mail is sent for ready, failed, cancelled or \
                 degraded only"
            ),
            ComposeError::Config(e) => write!(f, "{e}"),
            ComposeError::Build(e) => write!(f, "the mail cannot be built: {e}"),
        }
    }
}

impl std::error::Error for ComposeError {}

/// Composes the mail about `n` as `cfg` says.
pub fn compose(cfg: &EmailConfig, n: &Notice) -> Result<Mail, ComposeError> {
    let status = NoticeStatus::from_str(n.status).map_err(|_| ComposeError::UnknownStatus {
        status: escape::truncate(n.status, MAX_VALUE_CHARS),
    })?;
    let recipient = recipient(cfg, n.payload)?;
    let from = cfg.sender().map_err(ComposeError::Config)?;
    let template = Template::parse(&cfg.subject)
        .map_err(|e| ComposeError::Config(format!("notify.email.subject: {e}")))?;
    let link_base = cfg.link_base_url().map_err(ComposeError::Config)?;

    let values = Values::of(n, status);
    let subject = escape::truncate(
        &escape::one_line(&template.render(|f| values.get(f).to_owned())),
        MAX_SUBJECT_CHARS,
    );
    let link =
        link_base.map(|base| format!("{base}/#/entities/{}", escape::url_segment(n.entity_id)));
    let text = text_part(&values, link.as_deref());
    let html = html_part(&subject, &values, link.as_deref());
    let message_id = format!(
        "<ripen.{}.{}.{}.{}@{}>",
        escape::id_atom(n.entity_id),
        n.version,
        status.as_str(),
        n.at.chars()
            .filter(char::is_ascii_digit)
            .collect::<String>(),
        from.email.domain()
    );

    let to = Mailbox::new(None, recipient.clone());
    let date = humantime::parse_rfc3339_weak(n.at).unwrap_or_else(|_| SystemTime::now());
    let message = Message::builder()
        .from(from)
        .to(to)
        .subject(subject.clone())
        .date(date)
        .message_id(Some(message_id.clone()))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-generated".to_owned(),
        ))
        .multipart(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        ))
        .map_err(|e| ComposeError::Build(e.to_string()))?;
    Ok(Mail {
        recipient: recipient.to_string(),
        subject,
        text,
        html,
        message_id,
        envelope: message.envelope().clone(),
        formatted: message.formatted(),
    })
}

/// The address at `to_field` in the payload.
fn recipient(cfg: &EmailConfig, payload: &serde_json::Value) -> Result<Address, ComposeError> {
    let field = &cfg.to_field;
    let value = if field.starts_with('/') {
        payload.pointer(field)
    } else {
        payload.get(field)
    };
    let raw = match value {
        None | Some(serde_json::Value::Null) => {
            return Err(ComposeError::NoRecipient {
                field: field.clone(),
            })
        }
        Some(serde_json::Value::String(s)) => s,
        Some(other) => {
            return Err(ComposeError::RecipientNotText {
                field: field.clone(),
                found: match other {
                    serde_json::Value::Bool(_) => "a boolean",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Array(_) => "an array",
                    _ => "an object",
                },
            })
        }
    };
    let bad = |reason: &str| ComposeError::BadRecipient {
        field: field.clone(),
        value: escape::truncate(raw, 80),
        reason: reason.to_owned(),
    };
    let trimmed = raw.trim_matches(|c: char| c == ' ' || c == '\t');
    if trimmed.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("it holds a space or a control character"));
    }
    if trimmed.len() > MAX_ADDRESS_LEN {
        return Err(bad("it is longer than 254 bytes"));
    }
    Address::from_str(trimmed).map_err(|e| bad(&e.to_string()))
}

/// The notice's values, each on one line and of bounded length.
struct Values {
    id: String,
    type_name: String,
    version: String,
    status: &'static str,
    at: String,
    detail: Option<String>,
}

impl Values {
    fn of(n: &Notice, status: NoticeStatus) -> Values {
        let short = |s: &str| escape::truncate(&escape::one_line(s), MAX_VALUE_CHARS);
        Values {
            id: short(n.entity_id),
            type_name: short(n.type_name),
            version: n.version.to_string(),
            status: status.as_str(),
            at: short(n.at),
            detail: n
                .detail
                .map(|d| escape::truncate(&escape::lines(d), MAX_DETAIL_CHARS)),
        }
    }

    fn get(&self, field: Field) -> &str {
        match field {
            Field::Type => &self.type_name,
            Field::Id => &self.id,
            Field::Status => self.status,
            Field::Version => &self.version,
            Field::At => &self.at,
        }
    }
}

fn text_part(v: &Values, link: Option<&str>) -> String {
    let mut out = format!(
        "{} {} is {}.\n\nEntity:  {}\nType:    {} (version {})\nStatus:  {}\nAt:      {}\n",
        v.type_name, v.id, v.status, v.id, v.type_name, v.version, v.status, v.at
    );
    if let Some(detail) = &v.detail {
        out.push_str("\nDetail:\n");
        out.push_str(detail);
        if !detail.ends_with('\n') {
            out.push('\n');
        }
    }
    if let Some(link) = link {
        out.push_str(&format!("\n{link}\n"));
    }
    out.push_str(&format!(
        "\nRipen sends this mail because notify.email.on lists \"{}\".\n",
        v.status
    ));
    out
}

fn html_part(subject: &str, v: &Values, link: Option<&str>) -> String {
    let h = escape::html;
    let mut rows = format!(
        "<tr><th align=\"left\">Entity</th><td><code>{}</code></td></tr>\n\
         <tr><th align=\"left\">Type</th><td>{} (version {})</td></tr>\n\
         <tr><th align=\"left\">Status</th><td>{}</td></tr>\n\
         <tr><th align=\"left\">At</th><td>{}</td></tr>\n",
        h(&v.id),
        h(&v.type_name),
        h(&v.version),
        h(v.status),
        h(&v.at)
    );
    if let Some(detail) = &v.detail {
        rows.push_str(&format!(
            "<tr><th align=\"left\">Detail</th><td><pre>{}</pre></td></tr>\n",
            h(detail)
        ));
    }
    let link = link
        .map(|l| {
            format!(
                "<p><a href=\"{}\">Open {} in Ripen</a></p>\n",
                h(l),
                h(&v.id)
            )
        })
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head>\n<body>\n\
         <p>{} <code>{}</code> is <strong>{}</strong>.</p>\n<table>\n{rows}</table>\n{link}\
         <p><small>Ripen sends this mail because notify.email.on lists \"{}\".</small></p>\n\
         </body></html>\n",
        h(subject),
        h(&v.type_name),
        h(&v.id),
        h(v.status),
        h(v.status)
    )
}
