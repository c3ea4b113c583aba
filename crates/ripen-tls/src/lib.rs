//! TLS for Ripen's outgoing connections (the `https` steps of the HTTP
//! executor and the connections to PostgreSQL), and for the API when a
//! node serves HTTPS itself ([`server_config`]).
//!
//! One stack for both: rustls with the `ring` crypto provider. This crate
//! reads certificate files (with errors that name the file and the problem),
//! builds rustls client configurations, and tells what a TLS failure means
//! ([`describe`], [`is_permanent`]): a certificate the client does not trust
//! will not be trusted on the next attempt either.
//!
//! Trust: a client trusts the system's root certificates (`/etc/ssl/certs`,
//! read once per process) unless it is given a CA file, which then replaces
//! them for that client.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
};

pub use rustls;

/// The crypto provider of every TLS connection Ripen makes.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The system's root certificates, read once per process. A certificate the
/// system store holds but rustls cannot parse is left out.
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            Arc::new(roots)
        })
        .clone()
}

/// Which file of a client's TLS settings a problem is about: the name of its
/// configuration key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKey {
    CaFile,
    ClientCert,
    ClientKey,
}

impl FileKey {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKey::CaFile => "ca_file",
            FileKey::ClientCert => "client_cert",
            FileKey::ClientKey => "client_key",
        }
    }
}

/// A file of a client's TLS settings that cannot be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub key: FileKey,
    pub problem: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key.as_str(), self.problem)
    }
}

impl std::error::Error for FileError {}

/// What a client trusts and how it identifies itself: paths, not yet read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientFiles {
    /// PEM certificates to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate chain and its PEM private key, for servers that
    /// ask for a client certificate.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientFiles {
    /// Reads the files and builds a client configuration that verifies the
    /// server's chain and name.
    pub fn client_config(&self) -> Result<ClientConfig, FileError> {
        let roots = match &self.ca_file {
            Some(path) => Arc::new(read_ca_file(path).map_err(|problem| FileError {
                key: FileKey::CaFile,
                problem,
            })?),
            None => system_roots(),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_root_certificates(roots);
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = read_cert_chain(cert).map_err(|problem| FileError {
                    key: FileKey::ClientCert,
                    problem,
                })?;
                let private_key = read_private_key(key).map_err(|problem| FileError {
                    key: FileKey::ClientKey,
                    problem,
                })?;
                builder
                    .with_client_auth_cert(chain, private_key)
                    .map_err(|e| FileError {
                        key: FileKey::ClientKey,
                        problem: match e {
                            rustls::Error::InconsistentKeys(_) => format!(
                                "{} is not the key of the certificate in {}",
                                key.display(),
                                cert.display()
                            ),
                            other => format!("{} cannot be used: {other}", key.display()),
                        },
                    })
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM file, as trust anchors. A file without one, or
/// with one that is not a certificate, is an error.
pub fn read_ca_file(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in read_cert_chain(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            format!(
                "certificate {} of {} cannot be a trust anchor: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The certificates of a PEM file, in order.
pub fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{} holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
            path.display()
        ),
        other => format!("{} is not a PEM private key: {other}", path.display()),
    })
}

/// The configuration a node serves HTTPS with: the certificate chain of
/// `cert_file` and the key of `key_file` (PEM), TLS 1.2 and 1.3, HTTP/1.1.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, String> {
    let chain = read_cert_chain(cert_file)?;
    let key = read_private_key(key_file)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "{} and {} do not make a certificate and its key: {e}",
                cert_file.display(),
                key_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// How a client checks the server's certificate (PostgreSQL's `sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Encrypt, but accept any certificate.
    Nothing,
    /// The chain must lead to a trusted root; the name is not checked.
    Chain,
    /// The chain and the server's name.
    ChainAndName,
}

/// A client configuration that checks what `verify` says against `roots`,
/// without a client certificate.
pub fn client_config_verifying(verify: Verify, roots: Arc<RootCertStore>) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions");
    let builder = match verify {
        Verify::ChainAndName => builder.with_root_certificates(roots),
        Verify::Chain => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .expect("a verifier over a root store builds");
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
        }
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate {
                provider: provider(),
            })),
    };
    builder.with_no_client_auth()
}

/// Accepts any certificate; the handshake signatures are still checked, so
/// that the session is at least bound to the certificate presented.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks the chain, not the name.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked after the chain: a name error means the chain
        // was good.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls error somewhere in an error's chain, looking inside the
/// `io::Error`s that TLS streams wrap it in.
pub fn find_tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if let Some(inner) = io.get_ref() {
            if let Some(tls) = find_tls_error(inner) {
                return Some(tls);
            }
        }
    }
    e.source().and_then(find_tls_error)
}

/// Whether a TLS failure would happen again on the next attempt: the
/// client does not trust the server's certificate, the server refused the
/// client's (or wanted one), or the two share no protocol.
pub fn is_permanent(e: &rustls::Error) -> bool {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::UnsupportedNameType => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRequired
                | AlertDescription::AccessDenied
                | AlertDescription::HandshakeFailure
                | AlertDescription::ProtocolVersion
                | AlertDescription::InsufficientSecurity
        ),
        _ => false,
    }
}

/// A TLS failure in words, with a hint where the remedy is known.
pub fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            format!(
                "{e} (the server asks for a client certificate: set client_cert and client_key)"
            )
        }
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied,
        ) => format!("{e} (the server refused this client's certificate)"),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn file_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let ca_pem = write(dir.path(), "ca.pem", &ca.cert.pem());
        let key_pem = write(dir.path(), "key.pem", &ca.key_pair.serialize_pem());
        let other_key = write(dir.path(), "other.pem", &other.key_pair.serialize_pem());
        let junk = write(dir.path(), "junk.pem", "not pem at all\n");
        let missing = dir.path().join("missing.pem");

        let ok = ClientFiles {
            ca_file: Some(ca_pem.clone()),
            identity: Some((ca_pem.clone(), key_pem.clone())),
        };
        assert!(ok.client_config().is_ok());

        let cases = [
            (
                ClientFiles {
                    ca_file: Some(missing.clone()),
                    identity: None,
                },
                FileKey::CaFile,
                format!("cannot read {}", missing.display()),
            ),
            (
                ClientFiles {
                    ca_file: Some(junk.clone()),
                    identity: None,
                },
                FileKey::CaFile,
                format!("{} holds no PEM certificate", junk.display()),
            ),
            (
                ClientFiles {
                    ca_file: None,
                    identity: Some((key_pem.clone(), key_pem.clone())),
                },
                FileKey::ClientCert,
                format!("{} holds no PEM certificate", key_pem.display()),
            ),
            (
                ClientFiles {
                    ca_file: None,
                    identity: Some((ca_pem.clone(), ca_pem.clone())),
                },
                FileKey::ClientKey,
                format!("{} holds no PEM private key", ca_pem.display()),
            ),
            (
                ClientFiles {
                    ca_file: None,
                    identity: Some((ca_pem.clone(), other_key.clone())),
                },
                FileKey::ClientKey,
                format!("{} is not the key of the certificate", other_key.display()),
            ),
        ];
        for (files, key, want) in cases {
            let e = files.client_config().unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.problem.contains(&want), "{e} should contain {want:?}");
        }
    }

    #[test]
    fn certificate_failures_are_permanent_and_others_are_not() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert!(is_permanent(&unknown));
        assert_eq!(
            describe(&unknown),
            "invalid peer certificate: UnknownIssuer"
        );
        let required = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        assert!(is_permanent(&required));
        assert!(describe(&required).contains("set client_cert and client_key"));
        assert!(!is_permanent(&rustls::Error::DecryptError));
        assert!(!is_permanent(&rustls::Error::AlertReceived(
            AlertDescription::InternalError
        )));
        // Found through the io::Errors that TLS streams wrap it in.
        let wrapped = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            unknown.clone(),
        ));
        assert_eq!(find_tls_error(&wrapped), Some(&unknown));
        assert_eq!(find_tls_error(&std::io::Error::other("plain")), None);
    }
}
