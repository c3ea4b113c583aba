//! Email notifications over SMTP: how one mail about a settled entity is
//! composed and sent.
//!
//! The `[notify.email]` table of `ripen.toml` is an [`EmailConfig`]. When an
//! entity settles, the dispatcher builds a [`Notice`], turns it into a
//! [`Mail`] with [`compose`] and hands it to a [`Mailer`]. A
//! [`ComposeError`] means the notice can never become a mail (no usable
//! recipient in the payload); a [`MailError`] says whether sending it again
//! may succeed. When to send, and how often to try, is the dispatcher's
//! business, not this module's. The keys and the rules are in
//! `docs/email.md`.

mod compose;
mod config;
mod escape;
mod send;
mod template;

pub use compose::{compose, ComposeError, Mail, Notice};
pub use config::{EmailConfig, NoticeStatus, TlsMode};
pub use send::{MailError, Mailer};
