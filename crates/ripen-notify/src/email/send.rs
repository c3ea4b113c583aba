//! Sending a composed mail to the configured SMTP server, and telling the
//! dispatcher whether a failure is worth another attempt.
//!
//! One connection per mail (no pool: notices are few and far between),
//! over lettre's tokio transport on Ripen's rustls stack (`ring`).

use std::fmt;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::compose::Mail;
use super::config::{EmailConfig, Security};

/// A send that did not end with the server accepting the mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailError {
    /// Whether another attempt may succeed: connection failures, timeouts
    /// and 4xx replies are; 5xx replies, untrusted certificates and servers
    /// that lack what the configuration requires are not.
    pub retryable: bool,
    pub message: String,
}

impl fmt::Display for MailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MailError {}

/// Sends mail to the server of one `[notify.email]` table.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `smtp://host:port`, for messages.
    server: String,
    timeout: Duration,
}

impl fmt::Debug for Mailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailer")
            .field("server", &self.server)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// Checks the table, reads `ca_file` and the password's variable, and
    /// prepares the transport. Connects to nothing yet.
    pub fn new(cfg: &EmailConfig) -> Result<Mailer, String> {
        cfg.validate()?;
        let server = cfg.server()?;
        let timeout = cfg.timeout_duration()?;
        let tls = match server.security {
            Security::None => Tls::None,
            Security::Starttls => Tls::Required(tls_parameters(cfg, &server.host)?),
            Security::Implicit => Tls::Wrapper(tls_parameters(cfg, &server.host)?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&server.host)
            .port(server.port)
            .tls(tls)
            .timeout(Some(timeout));
        if let Some(name) = &cfg.hello_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        }
        if let (Some(user), Some(var)) = (&cfg.username, &cfg.password_env) {
            let password = std::env::var(var).map_err(|e| {
                format!(
                    "notify.email.password_env: the environment variable {var} {}; set it to the \
                     SMTP password of {user:?}",
                    match e {
                        std::env::VarError::NotPresent => "is not set",
                        std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
                    }
                )
            })?;
            builder = builder
                .credentials(Credentials::new(user.clone(), password))
                .authentication(vec![Mechanism::Plain, Mechanism::Login]);
        }
        Ok(Mailer {
            transport: builder.build(),
            server: server.display(),
            timeout,
        })
    }

    /// Sends one mail: connect, EHLO, TLS as configured, AUTH when a user
    /// is set, MAIL FROM, RCPT TO, DATA, QUIT. The whole exchange is bounded
    /// by the configured timeout.
    pub async fn send(&self, mail: &Mail) -> Result<(), MailError> {
        let sent = tokio::time::timeout(
            self.timeout,
            self.transport.send_raw(mail.envelope(), mail.formatted()),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(MailError {
                retryable: true,
                message: format!(
                    "{} did not finish the exchange within {} (notify.email.timeout)",
                    self.server,
                    humantime::format_duration(self.timeout)
                ),
            }),
        }
    }

    fn classify(&self, e: &lettre::transport::smtp::Error) -> MailError {
        let server = &self.server;
        let reply = || {
            let code = e.status().map(|c| c.to_string()).unwrap_or_default();
            match std::error::Error::source(e) {
                Some(text) => format!("{code} {text}"),
                None => code,
            }
        };
        if e.is_permanent() {
            return MailError {
                retryable: false,
                message: format!("{server} refused the mail: {}", reply()),
            };
        }
        if e.is_transient() {
            return MailError {
                retryable: true,
                message: format!("{server} deferred the mail: {}", reply()),
            };
        }
        if let Some(tls) = ripen_tls::find_tls_error(e) {
            let permanent = ripen_tls::is_permanent(tls);
            let hint = if permanent {
                " (if the server's certificate is right, trust its CA with notify.email.ca_file)"
            } else {
                ""
            };
            return MailError {
                retryable: !permanent,
                message: format!(
                    "TLS with {server} failed: {}{hint}",
                    ripen_tls::describe(tls)
                ),
            };
        }
        if e.is_client() {
            // The server lacks what the configuration requires (STARTTLS,
            // an authentication mechanism, SMTPUTF8): it will next time too.
            let detail = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string());
            let hint = if detail.contains("STARTTLS") {
                " (smtp:// requires STARTTLS; use smtps:// for a server that speaks TLS from \
                 the start)"
            } else {
                ""
            };
            return MailError {
                retryable: false,
                message: format!("{server} cannot take this mail: {detail}{hint}"),
            };
        }
        if e.is_timeout() {
            return MailError {
                retryable: true,
                message: format!(
                    "{server} did not answer within {} (notify.email.timeout)",
                    humantime::format_duration(self.timeout)
                ),
            };
        }
        MailError {
            retryable: true,
            message: format!("cannot talk to {server}: {}", chain(e)),
        }
    }
}

/// The TLS settings for `host`: `ca_file` replaces the system's roots.
fn tls_parameters(cfg: &EmailConfig, host: &str) -> Result<TlsParameters, String> {
    let mut params = TlsParameters::builder(host.to_owned());
    if let Some(path) = &cfg.ca_file {
        // validate() read it as trust anchors; lettre takes the DER.
        let certs = ripen_tls::read_cert_chain(path)
            .map_err(|problem| format!("notify.email.ca_file: {problem}"))?;
        params = params.certificate_store(CertificateStore::None);
        for cert in certs {
            let cert = Certificate::from_der(cert.to_vec())
                .map_err(|e| format!("notify.email.ca_file: {}: {e}", path.display()))?;
            params = params.add_root_certificate(cert);
        }
    }
    params
        .build_rustls()
        .map_err(|e| format!("notify.email: cannot set up TLS for {host}: {e}"))
}

/// An error and its sources, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
