//! The server side of TLS, for a fake downstream that serves `https`: a
//! rustls server configuration from PEM text, optionally asking every client
//! for a certificate signed by a given CA (mutual TLS).

use std::sync::Arc;

use ripen_tls::rustls::pki_types::pem::PemObject;
use ripen_tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use ripen_tls::rustls::server::WebPkiClientVerifier;
use ripen_tls::rustls::{RootCertStore, ServerConfig};

pub use ripen_tls::rustls;

/// A server configuration presenting `cert_chain_pem` (the server's
/// certificate first) with `key_pem`. With `client_ca_pem`, a client must
/// present a certificate that CA signed. Panics on bad PEM: the test wrote it.
pub fn server_config(
    cert_chain_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> Arc<ServerConfig> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("the server's certificate chain is PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("the server's key is PEM");
    let builder = ServerConfig::builder_with_provider(ripen_tls::provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions");
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots
                    .add(cert.expect("the client CA is PEM"))
                    .expect("the client CA is a CA certificate");
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ripen_tls::provider())
                    .build()
                    .expect("a client verifier over the client CA");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .expect("the server's key matches its certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}
