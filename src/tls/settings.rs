//! `[tls]`: the certificate pairs and session resumption settings, as the
//! configuration file gives them (validated by `config` with `certs`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `[tls]`: the certificates (one pair, or a list of pairs chosen per
/// handshake by the client's signature algorithms and SNI) and session
/// resumption.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The short form: one pair. Exclusive with `certificates`.
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// `[[tls.certificates]]`: several pairs (RSA and ECDSA side by side,
    /// other names); the first that fits is the default.
    pub certificates: Option<Vec<CertificateConfig>>,
    /// TLS 1.3 and 1.2 session tickets, keys rotated by rustls.
    #[serde(default = "default_true")]
    pub session_tickets: bool,
    /// Sessions kept in memory for resumption by session id (TLS 1.2) or
    /// stateful ticket (TLS 1.3 without tickets); 0: none.
    #[serde(default = "default_session_cache_size")]
    pub session_cache_size: usize,
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// Names SNI selects it by; absent: the certificate's subjectAltName.
    pub names: Option<Vec<String>>,
}

/// A certificate pair of `[tls]` with the key its settings are under
/// (`tls` or `tls.certificates[i]`), for error messages.
pub struct CertificateEntry<'a> {
    pub key: String,
    pub certificate: &'a Path,
    pub private_key: &'a Path,
    pub names: Option<&'a [String]>,
}

/// Most sessions `session_cache_size` may keep (a few hundred bytes each).
pub const MAX_SESSION_CACHE: usize = 1_000_000;

fn default_true() -> bool {
    true
}

fn default_session_cache_size() -> usize {
    10_240
}

impl TlsConfig {
    /// The pairs, in the order of the file (one for the short form).
    pub fn entries(&self) -> Vec<CertificateEntry<'_>> {
        match (&self.certificates, &self.certificate, &self.private_key) {
            (Some(list), _, _) => list
                .iter()
                .enumerate()
                .map(|(i, c)| CertificateEntry {
                    key: format!("tls.certificates[{i}]"),
                    certificate: &c.certificate,
                    private_key: &c.private_key,
                    names: c.names.as_deref(),
                })
                .collect(),
            (None, Some(c), Some(k)) => vec![CertificateEntry {
                key: "tls".into(),
                certificate: c,
                private_key: k,
                names: None,
            }],
            _ => Vec::new(),
        }
    }
}
