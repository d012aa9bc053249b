//! HTTPS for `postroom serve`: turns the `[tls]` certificate and key files into a rustls server
//! configuration. It exists so that a broker can be reached over TLS without a reverse proxy in
//! front of it, and so that every problem with the files is reported at start, naming the file,
//! instead of as failed handshakes later.
//!
//! The crypto provider is rustls's aws-lc-rs, the same one reqwest's rustls already compiles
//! for the push transport and the client subcommands, so the binary carries one TLS backend.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::error::StartError;

/// The protocols offered in the TLS handshake (ALPN): HTTP/2 first, then HTTP/1.1, the two the
/// server speaks.
const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Loads the rustls server configuration that `tls` describes: `Ok(None)` when neither file is
/// set (plain HTTP), an error when only one of them is set, when a file cannot be read, holds no
/// usable PEM item, or when the key does not match the certificate.
pub fn load(tls: &TlsConfig) -> Result<Option<Arc<rustls::ServerConfig>>, StartError> {
    let (cert_path, key_path) = match (&tls.cert_path, &tls.key_path) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => return Err(StartError::Config(TlsConfig::HALF_SET.into())),
    };
    let certs = read_certificates(cert_path)?;
    let key = read_private_key(key_path)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            StartError::Config(format!(
                "TLS: the certificate {} and the key {} cannot be used together: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(Some(Arc::new(config)))
}

/// Reads the certificate chain (leaf first) from a PEM file.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let bytes = read(path, "certificate")?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(path, "certificate", &e))?;
    if certs.is_empty() {
        return Err(StartError::Config(format!(
            "TLS certificate {}: no CERTIFICATE block in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, StartError> {
    let bytes = read(path, "key")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => StartError::Config(format!(
            "TLS key {}: no PRIVATE KEY block in the file",
            path.display()
        )),
        e => bad_pem(path, "key", &e),
    })
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, StartError> {
    std::fs::read(path)
        .map_err(|e| StartError::Config(format!("TLS {what} {}: cannot read: {e}", path.display())))
}

fn bad_pem(path: &Path, what: &str, e: &pem::Error) -> StartError {
    StartError::Config(format!("TLS {what} {}: not valid PEM: {e}", path.display()))
}
