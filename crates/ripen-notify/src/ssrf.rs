//! The SSRF guard: whether a user-supplied URL may be called.
//!
//! A webhook URL comes from a user, and Ripen calls it from inside the
//! operator's network. [`check`] reads the URL ([`parse`]), resolves its
//! host, and refuses it if any address it resolves to is forbidden
//! ([`classify`]) and outside the ranges the operator allowed
//! (`notify.allow_networks`, a [`Policy`]). The addresses it returns in a
//! [`Target`] are the only ones the caller may connect to: resolving again
//! at connect time would let a name answer differently the second time
//! (DNS rebinding). [`SafeClient`](crate::client::SafeClient) does exactly
//! that.
//!
//! A [`Refusal`] says what is wrong in words a user can act on, for a 422
//! problem detail, and has a short [`code`](Refusal::code).

mod addr;
mod url;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

pub use addr::{classify, Cidr, Forbidden, Policy};
pub use url::{parse, Host, Scheme, WebUrl, URL_BYTES_MAX};

/// The configuration key of the allowed ranges, as refusals name it.
pub const ALLOW_KEY: &str = "notify.allow_networks";

/// Why a URL may not be called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The URL is longer than [`URL_BYTES_MAX`].
    TooLong { bytes: usize },
    /// A whitespace or control character at byte `at`.
    Control { ch: char, at: usize },
    /// Not `http` or `https`; `None` when the URL has no scheme at all.
    Scheme(Option<String>),
    /// The URL's shape, in words.
    Syntax(String),
    /// `user@` or `user:password@` before the host.
    UserInfo,
    /// A `#fragment`.
    Fragment,
    /// No host between `//` and the path.
    EmptyHost,
    /// A host that is neither a valid name nor an IP address, in words.
    Host(String),
    /// A host with non-ASCII characters.
    NonAsciiHost,
    /// An IPv6 address with a zone id (`%eth0`).
    ZoneId,
    /// A port that is not a number from 1 to 65535, in words.
    Port(String),
    /// The host name could not be resolved, or resolves to no address.
    Unresolved { host: String, reason: String },
    /// The host is, or resolves to, a forbidden address. `host` is the
    /// name, `None` for an IP literal.
    Address {
        host: Option<String>,
        addr: IpAddr,
        class: Forbidden,
    },
}

impl Refusal {
    /// A short stable name of the refusal: the forbidden class for
    /// [`Refusal::Address`] (`loopback`, `link-local`, ...), else `too-long`,
    /// `control`, `scheme`, `syntax`, `userinfo`, `fragment`, `empty-host`,
    /// `host`, `non-ascii-host`, `zone-id`, `port` or `unresolved`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::TooLong { .. } => "too-long",
            Refusal::Control { .. } => "control",
            Refusal::Scheme(_) => "scheme",
            Refusal::Syntax(_) => "syntax",
            Refusal::UserInfo => "userinfo",
            Refusal::Fragment => "fragment",
            Refusal::EmptyHost => "empty-host",
            Refusal::Host(_) => "host",
            Refusal::NonAsciiHost => "non-ascii-host",
            Refusal::ZoneId => "zone-id",
            Refusal::Port(_) => "port",
            Refusal::Unresolved { .. } => "unresolved",
            Refusal::Address { class, .. } => class.code(),
        }
    }

    /// Whether the operator's policy refused the URL, as opposed to the
    /// URL being malformed or its host not resolving.
    pub fn is_policy(&self) -> bool {
        matches!(self, Refusal::Address { .. })
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooLong { bytes } => write!(
                f,
                "the URL is {bytes} bytes long; a webhook URL may have at most {URL_BYTES_MAX}"
            ),
            Refusal::Control { ch, at } => write!(
                f,
                "the URL contains the whitespace or control character U+{:04X} at byte {at}; \
                 remove it or percent-encode it",
                u32::from(*ch)
            ),
            Refusal::Scheme(Some(scheme)) => write!(
                f,
                "the scheme {scheme}: is not allowed; a webhook URL starts with https:// or http://"
            ),
            Refusal::Scheme(None) => {
                f.write_str("the URL has no scheme; a webhook URL starts with https:// or http://")
            }
            Refusal::Syntax(problem) => write!(f, "the URL is malformed: {problem}"),
            Refusal::UserInfo => f.write_str(
                "the URL has a user name or password before the host (user@host); \
                 webhook URLs may not carry credentials there: send them in a header",
            ),
            Refusal::Fragment => {
                f.write_str("the URL has a #fragment, which is never sent to the server; remove it")
            }
            Refusal::EmptyHost => f.write_str("the URL has no host"),
            Refusal::Host(problem) => write!(f, "the URL's host is not valid: {problem}"),
            Refusal::NonAsciiHost => f.write_str(
                "the URL's host has non-ASCII characters; write the host in its ASCII \
                 (punycode, xn--) form",
            ),
            Refusal::ZoneId => f.write_str(
                "the URL's IPv6 address has a zone id (%...); webhooks may not name a \
                 network interface",
            ),
            Refusal::Port(problem) => write!(f, "the URL's port is not valid: {problem}"),
            Refusal::Unresolved { host, reason } => {
                write!(f, "the host {host} cannot be resolved: {reason}")
            }
            Refusal::Address { host, addr, class } => {
                match host {
                    Some(host) => write!(f, "the host {host} resolves to {addr}, {class}")?,
                    None => write!(f, "the address {addr} is {class}")?,
                }
                write!(
                    f,
                    "; webhooks may not target private networks \
                     (allow the range with {ALLOW_KEY})"
                )
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// What a resolver's lookup returns.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// A name resolver: the addresses a host name stands for.
pub trait Resolve: Send + Sync {
    /// The addresses of `host` (a DNS name, never an IP literal), with
    /// `port`.
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a>;
}

/// The system's resolver (`getaddrinfo`, through tokio).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// A resolver that answers from a fixed table, for tests and for pinning
/// names. A trailing dot is ignored; a name not in the table is not found.
#[derive(Clone, Debug, Default)]
pub struct TableResolver {
    names: HashMap<String, Vec<IpAddr>>,
}

impl TableResolver {
    pub fn new() -> TableResolver {
        TableResolver::default()
    }

    /// Adds (or replaces) the addresses of `name`, which is matched
    /// without regard to case.
    pub fn with(mut self, name: &str, addrs: &[IpAddr]) -> TableResolver {
        self.names.insert(table_key(name), addrs.to_vec());
        self
    }
}

fn table_key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl Resolve for TableResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        let found = match self.names.get(&table_key(host)) {
            Some(addrs) => Ok(addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the name is not in the resolver's table",
            )),
        };
        Box::pin(std::future::ready(found))
    }
}

/// A URL that passed [`check`], and the addresses it may be called at, in
/// the resolver's order, each with the URL's port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: WebUrl,
    pub addrs: Vec<SocketAddr>,
}

/// Reads `url`, resolves its host (an IP literal needs no lookup), and
/// refuses it if any of its addresses is one `policy` forbids. Connect only
/// to the addresses of the [`Target`] it returns.
pub async fn check(url: &str, policy: &Policy, resolver: &dyn Resolve) -> Result<Target, Refusal> {
    let url = parse(url)?;
    let port = url.port();
    let addrs = match url.host() {
        Host::Ip(ip) => {
            if let Some(class) = policy.forbids(*ip) {
                return Err(Refusal::Address {
                    host: None,
                    addr: *ip,
                    class,
                });
            }
            vec![SocketAddr::new(*ip, port)]
        }
        Host::Name(name) => {
            let found = resolver
                .resolve(name, port)
                .await
                .map_err(|e| Refusal::Unresolved {
                    host: name.clone(),
                    reason: e.to_string(),
                })?;
            let mut addrs: Vec<SocketAddr> = Vec::with_capacity(found.len());
            for mut addr in found {
                if let Some(class) = policy.forbids(addr.ip()) {
                    return Err(Refusal::Address {
                        host: Some(name.clone()),
                        addr: addr.ip(),
                        class,
                    });
                }
                addr.set_port(port);
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            if addrs.is_empty() {
                return Err(Refusal::Unresolved {
                    host: name.clone(),
                    reason: "it has no address".into(),
                });
            }
            addrs
        }
    };
    Ok(Target { url, addrs })
}
