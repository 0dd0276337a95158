//! TLS server configuration: rustls (aws-lc-rs) with TLS 1.2 and 1.3 only.
//! Certificates come from PEM files (one pair, or several chosen per
//! handshake by `Resolver`: the client's SNI, then its signature
//! algorithms, RSA and ECDSA side by side) or a self-signed one generated at
//! start (rcgen) for `hostname` when `[tls]` is absent. The pairs come from
//! `TlsConfig::entries` (the short form or `[[tls.certificates]]`).
//! `certs` loads and checks one pair; `config` validates `[tls]` with it,
//! so check-config and a reload report a bad file with key and line.
//!
//! Session resumption: TLS 1.3 / 1.2 tickets (aws-lc-rs `Ticketer`, keys
//! rotated by rustls every 6 h) when `session_tickets`, and a
//! `ServerSessionMemoryCache` of `session_cache_size` entries (0:
//! `NoServerSessionStorage`). A reload passes the running acceptor's
//! `ServerConfig` as `keep` when `keeps_sessions` (session settings
//! unchanged): the new acceptor shares its ticketer and cache, so sessions
//! from before the reload still resume. The session counts resumed
//! handshakes (`Metrics::tls_resumed`, `tls.resumed` on the `tls.handshake`
//! span).

pub mod certs;
pub mod settings;

use std::sync::Arc;

use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use certs::{Pair, PairError};
use settings::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A pair that does not load; `key` names the setting (as check-config).
    #[error("{key}: {err}")]
    Pair { key: String, err: String },
    #[error("tls: no certificate configured")]
    NoCertificate,
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls: generating self-signed certificate: {0}")]
    Generate(String),
}

/// Builds the acceptor from configured files, or a self-signed certificate
/// for `hostname` when none are configured. `keep`: the running acceptor's
/// configuration, whose ticketer and session cache the new one takes over
/// (a reload with unchanged session settings: tickets issued and sessions
/// cached before it still resume).
pub fn acceptor(
    cfg: Option<&TlsConfig>,
    hostname: &str,
    keep: Option<&rustls::ServerConfig>,
) -> Result<TlsAcceptor, TlsError> {
    let pairs = match cfg {
        Some(c) => load(c)?,
        None => vec![self_signed_pair(hostname)?],
    };
    for p in &pairs {
        tracing::debug!(algorithm = %p.algorithm(), names = ?p.names, "tls certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { pairs }));
    match keep {
        Some(old) => {
            config.ticketer = old.ticketer.clone();
            config.session_storage = old.session_storage.clone();
        }
        None => {
            let (tickets, cache) = cfg.map_or((true, 10_240), |c| {
                (c.session_tickets, c.session_cache_size)
            });
            if tickets {
                config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
            }
            config.session_storage = if cache == 0 {
                Arc::new(rustls::server::NoServerSessionStorage {})
            } else {
                rustls::server::ServerSessionMemoryCache::new(cache)
            };
        }
    }
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A negotiated TLS version as the metrics and logs name it (`TLSv1.3`,
/// `TLSv1.2`; `TLS` for anything else): inbound sessions and backend
/// connections alike (spans use it without the `TLSv`).
pub fn version_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    }
}

/// Whether a reload from `old` to `new` keeps the session state (ticket
/// keys and cache): when the session settings did not change.
pub fn keeps_sessions(old: Option<&TlsConfig>, new: Option<&TlsConfig>) -> bool {
    let settings = |c: Option<&TlsConfig>| c.map(|c| (c.session_tickets, c.session_cache_size));
    settings(old) == settings(new)
}

fn load(c: &TlsConfig) -> Result<Vec<Pair>, TlsError> {
    let entries = c.entries();
    if entries.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    entries
        .iter()
        .map(|e| {
            certs::load(e.certificate, e.private_key, e.names).map_err(|err| {
                let (what, err) = match err {
                    PairError::Certificate(m) => ("certificate", m),
                    PairError::Key(m) => ("private_key", m),
                    PairError::Names(m) => ("names", m),
                };
                TlsError::Pair {
                    key: format!("{}.{what}", e.key),
                    err,
                }
            })
        })
        .collect()
}

/// Picks the certificate for a handshake. Among the pairs whose names
/// match the client's SNI, the first (in the order of the file) whose key
/// can sign with one of the client's signature schemes; when SNI is absent
/// or no such pair exists, the first pair whose key can. rustls has already
/// narrowed the schemes to those of cipher suites both sides have (TLS
/// 1.2: an ECDSA key needs an ECDHE_ECDSA suite). None (no key fits): the
/// handshake fails.
#[derive(Debug)]
struct Resolver {
    pairs: Vec<Pair>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        let by_name = hello
            .server_name()
            .and_then(|sni| self.pairs.iter().find(|p| p.serves(sni) && p.fits(offered)));
        by_name
            .or_else(|| self.pairs.iter().find(|p| p.fits(offered)))
            .map(|p| p.key.clone())
    }
}

fn self_signed_pair(hostname: &str) -> Result<Pair, TlsError> {
    let (certs, key) = self_signed(hostname)?;
    let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)?;
    Ok(Pair::new(
        CertifiedKey::new(certs, key),
        vec![hostname.to_ascii_lowercase()],
    ))
}

/// A fresh self-signed certificate and key for `hostname`.
pub fn self_signed(
    hostname: &str,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ),
    TlsError,
> {
    let ck = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((vec![cert], key))
}
