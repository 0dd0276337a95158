//! TLS server configuration: rustls with TLS 1.2 and 1.3 only, certificates
//! from PEM files or a self-signed one generated at start (rcgen).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.certificate {path}: {err}")]
    Certificate { path: String, err: String },
    #[error("tls.private_key {path}: {err}")]
    Key { path: String, err: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls: generating self-signed certificate: {0}")]
    Generate(String),
}

/// Builds the acceptor from configured files, or a self-signed certificate
/// for `hostname` when none are configured.
pub fn acceptor(cfg: Option<&TlsConfig>, hostname: &str) -> Result<TlsAcceptor, TlsError> {
    let (certs, key) = match cfg {
        Some(c) => load(c)?,
        None => self_signed(hostname)?,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load(c: &TlsConfig) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cpath = c.certificate.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.certificate)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cpath.clone(),
            err: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cpath,
            err: "no certificate found in PEM file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&c.private_key).map_err(|e| TlsError::Key {
        path: c.private_key.display().to_string(),
        err: e.to_string(),
    })?;
    Ok((certs, key))
}

/// A fresh self-signed certificate and key for `hostname`.
pub fn self_signed(
    hostname: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((vec![cert], key))
}
