//! TLS to PostgreSQL: the `sslmode` and `sslrootcert` of a storage URL, and
//! a tokio-postgres connector on rustls (the stack of `ripen-tls`).
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and never checks a
//! certificate itself; the checks libpq users expect come from here:
//!
//! | `sslmode`     | encrypts                 | checks                                |
//! |---------------|--------------------------|---------------------------------------|
//! | `disable`     | no                       | -                                     |
//! | `prefer`      | if the server offers TLS | nothing (the chain with `sslrootcert`)|
//! | `require`     | yes                      | nothing (the chain with `sslrootcert`)|
//! | `verify-ca`   | yes                      | the chain                             |
//! | `verify-full` | yes                      | the chain and the host name           |
//!
//! The chain is checked against `sslrootcert` (a PEM file; `system` for the
//! system's roots), or the system's roots when it is not given.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ripen_tls::rustls::pki_types::ServerName;
use ripen_tls::rustls::ClientConfig;
use ripen_tls::Verify;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// The TLS setting of one storage URL.
#[derive(Clone)]
pub struct PgTls {
    /// The `sslmode` as written (`prefer` when absent), for messages.
    pub mode: String,
    connector: RustlsConnect,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).finish()
    }
}

impl PgTls {
    /// Reads `sslmode` and `sslrootcert` from a storage URL. Returns the URL
    /// for tokio-postgres (`verify-*` become `require`, `sslrootcert` is
    /// taken out) and the TLS setting. Errors name the parameter.
    pub fn from_url(url: &str) -> Result<(String, PgTls), String> {
        let mut mode: Option<String> = None;
        let mut root: Option<String> = None;
        let rewritten = rewrite_params(url, |key, value| match key {
            "sslmode" => {
                mode = Some(value.to_owned());
                match value {
                    "verify-ca" | "verify-full" => Some("require".to_owned()),
                    _ => Some(value.to_owned()),
                }
            }
            "sslrootcert" => {
                root = Some(value.to_owned());
                None
            }
            _ => Some(value.to_owned()),
        });
        let mode = mode.unwrap_or_else(|| "prefer".to_owned());
        let verify = match (mode.as_str(), root.is_some()) {
            ("disable", _) => Verify::Nothing,
            ("prefer" | "require", false) => Verify::Nothing,
            ("prefer" | "require" | "verify-ca", _) => Verify::Chain,
            ("verify-full", _) => Verify::ChainAndName,
            (other, _) => {
                return Err(format!(
                    "sslmode: {other:?} is not supported; use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        };
        let roots = match root.as_deref() {
            None | Some("system") => ripen_tls::system_roots(),
            Some(path) => Arc::new(
                ripen_tls::read_ca_file(&PathBuf::from(path))
                    .map_err(|p| format!("sslrootcert: {p}"))?,
            ),
        };
        let config = Arc::new(ripen_tls::client_config_verifying(verify, roots));
        Ok((
            rewritten,
            PgTls {
                mode,
                connector: RustlsConnect { config },
            },
        ))
    }

    /// The connector to hand to `Config::connect`.
    pub fn connector(&self) -> RustlsConnect {
        self.connector.clone()
    }
}

/// Calls `f(key, value)` on each parameter of a libpq URL's query string or
/// of a `key=value` connection string; `f` returns the value to keep, or
/// `None` to drop the parameter.
fn rewrite_params(url: &str, mut f: impl FnMut(&str, &str) -> Option<String>) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return url.to_owned();
        };
        let kept: Vec<String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter_map(|param| {
                let (key, value) = param.split_once('=').unwrap_or((param, ""));
                let decoded = percent_decode(value);
                match f(&percent_decode(key), &decoded) {
                    Some(v) if v == decoded => Some(param.to_owned()),
                    Some(v) => Some(format!("{key}={v}")),
                    None => None,
                }
            })
            .collect();
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        // Simple `key=value` words; quoted values are passed on as they are.
        url.split_whitespace()
            .filter_map(|word| match word.split_once('=') {
                Some((key, value)) if !value.starts_with('\'') => {
                    f(key, value).map(|v| format!("{key}={v}"))
                }
                _ => Some(word.to_owned()),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(high << 4 | low);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A tokio-postgres connector on rustls.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnectOne> {
        // A Unix socket has no name; tokio-postgres never asks it for TLS.
        let name = ServerName::try_from(domain.to_owned()).map_err(|e| e.to_string());
        Ok(RustlsConnectOne {
            config: self.config.clone(),
            name,
        })
    }
}

/// The handshake with one server.
pub struct RustlsConnectOne {
    config: Arc<ClientConfig>,
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("server name: {e}"))
            })?;
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM runs without channel binding (`channel_binding=prefer`).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(url: &str) -> (String, String) {
        let (url, tls) = PgTls::from_url(url).unwrap();
        (url, tls.mode)
    }

    #[test]
    fn verify_modes_become_require_and_sslrootcert_is_taken_out() {
        assert_eq!(
            rewrite("postgres://u@h:5432/db"),
            ("postgres://u@h:5432/db".to_owned(), "prefer".to_owned())
        );
        assert_eq!(
            rewrite("postgres://u@h/db?sslmode=verify-full&application_name=x&sslrootcert=system"),
            (
                "postgres://u@h/db?sslmode=require&application_name=x".to_owned(),
                "verify-full".to_owned()
            )
        );
        assert_eq!(
            rewrite("postgres://u@h/db?sslrootcert=system&sslmode=disable"),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                "disable".to_owned()
            )
        );
        assert_eq!(
            rewrite("host=h user=u sslmode=verify-ca sslrootcert=system"),
            (
                "host=h user=u sslmode=require".to_owned(),
                "verify-ca".to_owned()
            )
        );
        // The rewritten URL is one tokio-postgres accepts.
        let (url, _) = rewrite("postgresql://u@h/db?sslmode=verify-full");
        url.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn bad_settings_name_the_parameter() {
        let e = PgTls::from_url("postgres://u@h/db?sslmode=allow").unwrap_err();
        assert!(e.starts_with("sslmode: \"allow\" is not supported"), "{e}");
        let e =
            PgTls::from_url("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem")
                .unwrap_err();
        assert!(
            e.starts_with("sslrootcert: cannot read /no/such.pem"),
            "{e}"
        );
    }
}
