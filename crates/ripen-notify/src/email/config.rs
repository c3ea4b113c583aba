//! The `[notify.email]` table: its keys, their defaults, and the checks
//! that make a bad table fail at load with a message naming the key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lettre::message::Mailbox;
use serde::Deserialize;
use url::{Host, Url};

use super::template::Template;

/// The longest `timeout` accepted: a mail server that needs more is down.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// The `[notify.email]` table of `ripen.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The mail server: `smtp://host[:port]` (port 587 by default; STARTTLS
    /// unless `tls = "none"`) or `smtps://host[:port]` (port 465; implicit
    /// TLS).
    pub smtp: String,
    /// The sender, `ripen@example.com` or `Ripen <ripen@example.com>`.
    pub from: String,
    /// The payload field with the recipient's address: a top-level key, or a
    /// JSON pointer when it starts with `/`.
    pub to_field: String,
    /// The statuses that send a mail.
    #[serde(default = "default_on")]
    pub on: Vec<NoticeStatus>,
    /// How an `smtp://` connection is protected: `starttls` (the default)
    /// or `none`, for a relay on the loopback interface only. Not set for
    /// `smtps://`, which is always implicit TLS.
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// PEM certificates to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The user to authenticate as (AUTH PLAIN or LOGIN).
    #[serde(default)]
    pub username: Option<String>,
    /// The name of the environment variable that holds the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// How long one send may take, connection to the server's last answer
    /// (`"10s"`, `"500ms"`).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// The subject; `{type}`, `{id}`, `{status}`, `{version}` and `{at}` are
    /// replaced, `{{` and `}}` are literal braces.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// The dashboard's address; when set, the mail links to
    /// `{link_base}/#/entities/{id}`.
    #[serde(default)]
    pub link_base: Option<String>,
    /// The name Ripen gives in EHLO; by default the address literal
    /// `[127.0.0.1]`.
    #[serde(default)]
    pub hello_name: Option<String>,
}

/// A status that can send a mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeStatus {
    Ready,
    Failed,
    Cancelled,
    Degraded,
}

impl NoticeStatus {
    pub const ALL: [NoticeStatus; 4] = [
        NoticeStatus::Ready,
        NoticeStatus::Failed,
        NoticeStatus::Cancelled,
        NoticeStatus::Degraded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NoticeStatus::Ready => "ready",
            NoticeStatus::Failed => "failed",
            NoticeStatus::Cancelled => "cancelled",
            NoticeStatus::Degraded => "degraded",
        }
    }
}

impl FromStr for NoticeStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        NoticeStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a status that sends mail (ready, failed, cancelled, degraded)"
                )
            })
    }
}

/// How an `smtp://` connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS is required: a server that does not offer it gets no mail.
    Starttls,
    /// Plain text, for a relay on the loopback interface.
    None,
}

/// Where and how to connect, as the checked `smtp` and `tls` keys say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Server {
    pub host: String,
    pub port: u16,
    pub security: Security,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Security {
    Starttls,
    Implicit,
    None,
}

impl Server {
    /// `smtp://host:port` or `smtps://host:port`, for messages.
    pub fn display(&self) -> String {
        let scheme = match self.security {
            Security::Implicit => "smtps",
            Security::Starttls | Security::None => "smtp",
        };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

fn default_on() -> Vec<NoticeStatus> {
    vec![NoticeStatus::Ready, NoticeStatus::Failed]
}

fn default_timeout() -> String {
    "10s".to_owned()
}

fn default_subject() -> String {
    "{type} {id} is {status}".to_owned()
}

fn key_error(key: &str, problem: impl std::fmt::Display) -> String {
    format!("notify.email.{key}: {problem}")
}

impl EmailConfig {
    /// Checks every key; the error names the first bad one and says what is
    /// wrong with it. Reads `ca_file`, not the password's variable.
    pub fn validate(&self) -> Result<(), String> {
        let server = self.server()?;
        if server.security == Security::None {
            if !is_loopback(&server.host) {
                return Err(key_error(
                    "tls",
                    format!(
                        "\"none\" sends mail and passwords in plain text, so it is for a relay on \
                         the loopback interface only, and {:?} is not a loopback address; use \
                         STARTTLS (leave tls out) or smtps://",
                        server.host
                    ),
                ));
            }
            if self.ca_file.is_some() {
                return Err(key_error(
                    "ca_file",
                    "has no use with tls = \"none\"; remove one of them",
                ));
            }
        }
        if let Some(path) = &self.ca_file {
            ripen_tls::read_ca_file(path).map_err(|problem| key_error("ca_file", problem))?;
        }
        self.sender()?;
        self.check_to_field()?;
        if self.on.is_empty() {
            return Err(key_error(
                "on",
                "is empty; list at least one of \"ready\", \"failed\", \"cancelled\", \
                 \"degraded\", or remove [notify.email]",
            ));
        }
        self.check_credentials()?;
        self.timeout_duration()?;
        Template::parse(&self.subject).map_err(|problem| key_error("subject", problem))?;
        self.link_base_url()?;
        self.check_hello_name()?;
        Ok(())
    }

    /// Makes a relative `ca_file` relative to `dir`, the directory of the
    /// configuration file.
    pub fn resolve_paths(&mut self, dir: &Path) {
        if let Some(path) = &self.ca_file {
            if path.is_relative() {
                self.ca_file = Some(dir.join(path));
            }
        }
    }

    /// Whether an entity that became `status` gets a mail.
    pub fn sends_on(&self, status: NoticeStatus) -> bool {
        self.on.contains(&status)
    }

    /// The `timeout` key as a duration.
    pub fn timeout_duration(&self) -> Result<Duration, String> {
        let v = &self.timeout;
        let d = humantime::parse_duration(v).map_err(|e| {
            key_error(
                "timeout",
                format!("{v:?} is not a duration such as \"500ms\" or \"10s\": {e}"),
            )
        })?;
        if d.is_zero() {
            return Err(key_error(
                "timeout",
                format!("{v:?} must be more than zero"),
            ));
        }
        if d > MAX_TIMEOUT {
            return Err(key_error(
                "timeout",
                format!("{v:?} is longer than ten minutes"),
            ));
        }
        Ok(d)
    }

    pub(super) fn server(&self) -> Result<Server, String> {
        let v = &self.smtp;
        let not_smtp = || key_error("smtp", format!("{v:?} is not an smtp:// or smtps:// URL"));
        let url = Url::parse(v).map_err(|_| not_smtp())?;
        let implicit = match url.scheme() {
            "smtp" => false,
            "smtps" => true,
            _ => return Err(not_smtp()),
        };
        let host = match url.host() {
            Some(Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(not_smtp()),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(key_error(
                "smtp",
                format!(
                    "{v:?} holds credentials; put the user in notify.email.username and the \
                     password in the environment variable that notify.email.password_env names"
                ),
            ));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(key_error(
                "smtp",
                format!("{v:?} has a path, query or fragment; write only smtp://host:port"),
            ));
        }
        let security = match (implicit, self.tls) {
            (true, None) => Security::Implicit,
            (true, Some(_)) => {
                return Err(key_error(
                    "tls",
                    "smtps:// is always implicit TLS; remove tls, or use smtp:// for STARTTLS",
                ))
            }
            (false, None | Some(TlsMode::Starttls)) => Security::Starttls,
            (false, Some(TlsMode::None)) => Security::None,
        };
        let port = url.port().unwrap_or(if implicit { 465 } else { 587 });
        Ok(Server {
            host,
            port,
            security,
        })
    }

    pub(super) fn sender(&self) -> Result<Mailbox, String> {
        let v = &self.from;
        if v.chars().any(char::is_control) {
            return Err(key_error(
                "from",
                format!("{v:?} holds a control character"),
            ));
        }
        Mailbox::from_str(v).map_err(|e| {
            key_error(
                "from",
                format!(
                    "{v:?} is not an address such as \"ripen@example.com\" or \
                     \"Ripen <ripen@example.com>\": {e}"
                ),
            )
        })
    }

    fn check_to_field(&self) -> Result<(), String> {
        let v = &self.to_field;
        if v.is_empty() {
            return Err(key_error(
                "to_field",
                "is empty; name the payload field that holds the recipient's address",
            ));
        }
        if let Some(pointer) = v.strip_prefix('/') {
            let mut rest = pointer;
            while let Some(i) = rest.find('~') {
                if !matches!(rest.as_bytes().get(i + 1), Some(b'0' | b'1')) {
                    return Err(key_error(
                        "to_field",
                        format!(
                            "{v:?} is not a JSON pointer: \"~\" must be followed by 0 or 1 \
                             (\"~0\" is \"~\", \"~1\" is \"/\")"
                        ),
                    ));
                }
                rest = &rest[i + 2..];
            }
        }
        Ok(())
    }

    fn check_credentials(&self) -> Result<(), String> {
        match (&self.username, &self.password_env) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(key_error(
                "username",
                "is set without password_env; name the environment variable that holds the \
                 password in notify.email.password_env",
            )),
            (None, Some(_)) => Err(key_error(
                "password_env",
                "is set without username; set notify.email.username too",
            )),
            (Some(user), Some(var)) => {
                if user.is_empty() || user.chars().any(char::is_control) {
                    return Err(key_error(
                        "username",
                        format!("{user:?} is empty or holds a control character"),
                    ));
                }
                if !is_env_name(var) {
                    return Err(key_error(
                        "password_env",
                        format!(
                            "{var:?} is not an environment variable name such as \
                             \"RIPEN_SMTP_PASSWORD\"; it names the variable, it is not the \
                             password"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The checked `link_base`, without a trailing slash.
    pub(super) fn link_base_url(&self) -> Result<Option<String>, String> {
        let Some(v) = &self.link_base else {
            return Ok(None);
        };
        let bad = || {
            key_error(
                "link_base",
                format!(
                    "{v:?} is not an http:// or https:// URL such as \"https://ripen.example.com\""
                ),
            )
        };
        let url = Url::parse(v).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(bad());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(key_error(
                "link_base",
                format!("{v:?} has a query or fragment; the link adds #/entities/{{id}} itself"),
            ));
        }
        Ok(Some(url.as_str().trim_end_matches('/').to_owned()))
    }

    fn check_hello_name(&self) -> Result<(), String> {
        let Some(v) = &self.hello_name else {
            return Ok(());
        };
        let valid = !v.is_empty()
            && v.len() <= 253
            && v.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if valid {
            Ok(())
        } else {
            Err(key_error(
                "hello_name",
                format!("{v:?} is not a host name such as \"ripen.example.com\""),
            ))
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> EmailConfig {
        toml::from_str(&format!(
            "smtp = \"smtp://127.0.0.1:2525\"\nfrom = \"ripen@example.com\"\nto_field = \"contact_email\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn defaults() {
        let c = parse("");
        c.validate().unwrap();
        assert_eq!(c.on, vec![NoticeStatus::Ready, NoticeStatus::Failed]);
        assert!(c.sends_on(NoticeStatus::Failed));
        assert!(!c.sends_on(NoticeStatus::Degraded));
        assert_eq!(c.timeout_duration().unwrap(), Duration::from_secs(10));
        assert_eq!(c.subject, "{type} {id} is {status}");
        let server = c.server().unwrap();
        assert_eq!(server.security, Security::Starttls);
        assert_eq!(server.display(), "smtp://127.0.0.1:2525");
        assert_eq!(parse_url("smtps://mail.example.com").port, 465);
        assert_eq!(parse_url("smtp://mail.example.com").port, 587);
        assert_eq!(parse_url("smtp://[::1]:25").display(), "smtp://[::1]:25");
    }

    fn parse_url(url: &str) -> Server {
        let mut c = parse("");
        c.smtp = url.to_owned();
        c.server().unwrap()
    }

    #[test]
    fn unknown_keys_and_statuses_are_refused() {
        let text = "smtp = \"smtp://h\"\nfrom = \"a@b.c\"\nto_field = \"e\"\n";
        let e = toml::from_str::<EmailConfig>(&format!("{text}password = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field `password`"), "{e}");
        let e = toml::from_str::<EmailConfig>(&format!("{text}on = [\"done\"]\n")).unwrap_err();
        assert!(e.to_string().contains("unknown variant `done`"), "{e}");
        let e = toml::from_str::<EmailConfig>(&format!("{text}tls = \"ssl\"\n")).unwrap_err();
        assert!(e.to_string().contains("unknown variant `ssl`"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let junk = junk.display().to_string();
        let cases: Vec<(String, &str)> = vec![
            (
                "smtp = \"smtp:/x\"".into(),
                "notify.email.smtp: \"smtp:/x\" is not an smtp:// or smtps:// URL",
            ),
            (
                "smtp = \"http://mail.example.com\"".into(),
                "notify.email.smtp: \"http://mail.example.com\" is not an smtp://",
            ),
            (
                "smtp = \"smtp://u:p@mail.example.com\"".into(),
                "notify.email.smtp: \"smtp://u:p@mail.example.com\" holds credentials",
            ),
            (
                "smtp = \"smtp://mail.example.com/x?y\"".into(),
                "notify.email.smtp: \"smtp://mail.example.com/x?y\" has a path",
            ),
            (
                "smtp = \"smtp://mail.example.com\"\ntls = \"none\"".into(),
                "notify.email.tls: \"none\" sends mail and passwords in plain text",
            ),
            (
                "smtp = \"smtps://mail.example.com\"\ntls = \"starttls\"".into(),
                "notify.email.tls: smtps:// is always implicit TLS",
            ),
            (
                "smtp = \"smtp://localhost:25\"\ntls = \"none\"\nca_file = \"x.pem\"".into(),
                "notify.email.ca_file: has no use with tls = \"none\"",
            ),
            (format!("ca_file = {junk:?}"), "notify.email.ca_file: "),
            (
                "from = \"not an address\"".into(),
                "notify.email.from: \"not an address\" is not an address",
            ),
            (
                "from = \"a@b.c\\r\\nBcc: x@y.z\"".into(),
                "notify.email.from: \"a@b.c\\r\\nBcc: x@y.z\" holds a control character",
            ),
            ("to_field = \"\"".into(), "notify.email.to_field: is empty"),
            (
                "to_field = \"/a~2\"".into(),
                "notify.email.to_field: \"/a~2\" is not a JSON pointer",
            ),
            ("on = []".into(), "notify.email.on: is empty"),
            (
                "username = \"ripen\"".into(),
                "notify.email.username: is set without password_env",
            ),
            (
                "password_env = \"PW\"".into(),
                "notify.email.password_env: is set without username",
            ),
            (
                "username = \"ripen\"\npassword_env = \"hunter2!\"".into(),
                "notify.email.password_env: \"hunter2!\" is not an environment variable name",
            ),
            (
                "timeout = \"soon\"".into(),
                "notify.email.timeout: \"soon\" is not a duration",
            ),
            (
                "timeout = \"0s\"".into(),
                "notify.email.timeout: \"0s\" must be more than zero",
            ),
            (
                "timeout = \"1h\"".into(),
                "notify.email.timeout: \"1h\" is longer than ten minutes",
            ),
            (
                "subject = \"{name} done\"".into(),
                "notify.email.subject: {name} is not a placeholder",
            ),
            (
                "link_base = \"ftp://x\"".into(),
                "notify.email.link_base: \"ftp://x\" is not an http:// or https:// URL",
            ),
            (
                "link_base = \"https://x/#/y\"".into(),
                "notify.email.link_base: \"https://x/#/y\" has a query or fragment",
            ),
            (
                "hello_name = \"a b\"".into(),
                "notify.email.hello_name: \"a b\" is not a host name",
            ),
        ];
        for (toml_line, want) in cases {
            let text = format!(
                "{toml_line}\n{}",
                [
                    ("smtp", "smtp = \"smtp://127.0.0.1:2525\""),
                    ("from", "from = \"ripen@example.com\""),
                    ("to_field", "to_field = \"contact_email\""),
                ]
                .iter()
                .filter(|(key, _)| !toml_line.starts_with(&format!("{key} =")))
                .map(|(_, line)| *line)
                .collect::<Vec<_>>()
                .join("\n")
            );
            let c: EmailConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let e = c.validate().unwrap_err();
            assert!(
                e.starts_with(want),
                "{toml_line}: {e:?} should start with {want:?}"
            );
        }
    }

    #[test]
    fn accepted_variants() {
        for extra in [
            "tls = \"none\"",
            "smtp = \"smtp://localhost:25\"\ntls = \"none\"",
            "smtp = \"smtp://[::1]:25\"\ntls = \"none\"",
            "username = \"ripen\"\npassword_env = \"RIPEN_SMTP_PASSWORD\"",
            "to_field = \"/contact/email\"",
            "on = [\"ready\", \"failed\", \"cancelled\", \"degraded\"]",
            "subject = \"[ripen] {{{type}}} {id} v{version}: {status} at {at}\"",
            "link_base = \"https://ripen.example.com/\"",
            "hello_name = \"ripen-1.example.com\"",
            "from = \"Ripen <ripen@example.com>\"",
        ] {
            let mut text = extra.to_owned();
            for (key, line) in [
                ("smtp", "smtp = \"smtp://127.0.0.1:2525\""),
                ("from", "from = \"ripen@example.com\""),
                ("to_field", "to_field = \"contact_email\""),
            ] {
                if !extra.contains(&format!("{key} =")) {
                    text.push('\n');
                    text.push_str(line);
                }
            }
            let c: EmailConfig = toml::from_str(&text).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{extra}: {e}"));
        }
        let mut c = parse("link_base = \"https://ripen.example.com/\"");
        assert_eq!(
            c.link_base_url().unwrap().as_deref(),
            Some("https://ripen.example.com")
        );
        c.ca_file = Some("certs/ca.pem".into());
        c.resolve_paths(Path::new("/etc/ripen"));
        assert_eq!(
            c.ca_file.as_deref(),
            Some(Path::new("/etc/ripen/certs/ca.pem"))
        );
    }
}
