//! One certificate/key pair from PEM files, checked (the key matches the
//! leaf certificate) and with the names it serves (configured, or the DNS
//! names of the leaf's subjectAltName), and the signature schemes its key
//! signs with, probed once at load so that choosing a certificate per
//! handshake allocates nothing. Imports nothing from the rest of the crate
//! (rustls and x509-parser only): `config` validates `[tls]` with it, `tls`
//! builds the resolver from it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

/// A loaded pair: the chain with its signing key, and the names (lowercase;
/// `*.example.net` wildcards) SNI selects it by.
#[derive(Debug, Clone)]
pub struct Pair {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    /// The signature schemes the key can sign with (probed once at load,
    /// so choosing a certificate per handshake allocates nothing).
    pub schemes: Vec<SignatureScheme>,
}

/// What is wrong with a pair; the variant says which file (key) is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairError {
    /// The certificate file: unreadable, not PEM, no certificate in it.
    Certificate(String),
    /// The key file: unreadable, no key in it, a key type rustls cannot use,
    /// or a key that is not the certificate's.
    Key(String),
    /// `names` given in the configuration: one is not a DNS name.
    Names(String),
}

/// Every scheme a server key could sign with.
const SCHEMES: [SignatureScheme; 11] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::ED25519,
    SignatureScheme::ED448,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
];

/// The certificates of PEM file `path`, at least one (a chain, or a CA
/// list such as `[[backend]] tls_ca`); the error names the file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate found in PEM file",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads and checks the pair `cert` / `key`. `names` overrides the names
/// of the certificate's subjectAltName.
pub fn load(cert: &Path, key: &Path, names: Option<&[String]>) -> Result<Pair, PairError> {
    let chain = load_certificates(cert).map_err(PairError::Certificate)?;
    let leaf = &chain[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        PairError::Certificate(format!("{}: not an X.509 certificate: {e}", cert.display()))
    })?;
    let names = match names {
        Some(n) => {
            if let Some(bad) = n.iter().find(|n| !valid_name(n)) {
                return Err(PairError::Names(format!(
                    "{bad:?} is not a DNS name (letters, digits, '-', '.'; \"*.\" first for a wildcard)"
                )));
            }
            n.iter().map(|n| n.to_ascii_lowercase()).collect()
        }
        None => san_names(&parsed),
    };
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| PairError::Key(format!("{}: {e}", key.display())))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| PairError::Key(format!("{}: {e}", key.display())))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(PairError::Key(format!(
                "{}: the key does not match the certificate {}",
                key.display(),
                cert.display()
            )))
        }
    }
    Ok(Pair::new(ck, names))
}

/// The DNS names of the certificate's subjectAltName, lowercase.
fn san_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
            _ => None,
        })
        .filter(|n| valid_name(n))
        .collect()
}

/// A DNS name, or `*.` followed by one.
fn valid_name(n: &str) -> bool {
    let n = n.strip_prefix("*.").unwrap_or(n);
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Pair {
    /// A pair of `key` serving `names`.
    pub fn new(key: CertifiedKey, names: Vec<String>) -> Pair {
        let schemes = SCHEMES
            .into_iter()
            .filter(|s| key.key.choose_scheme(&[*s]).is_some())
            .collect();
        Pair {
            key: Arc::new(key),
            names,
            schemes,
        }
    }

    /// Whether SNI `name` is one of this pair's names (a wildcard covers
    /// exactly one label). Case-insensitive.
    pub fn serves(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(suffix) => name.split_once('.').is_some_and(|(first, rest)| {
                !first.is_empty() && rest.eq_ignore_ascii_case(suffix)
            }),
            None => n.eq_ignore_ascii_case(name),
        })
    }

    /// Whether the key can sign with one of the client's `offered` schemes.
    pub fn fits(&self, offered: &[SignatureScheme]) -> bool {
        offered.iter().any(|s| self.schemes.contains(s))
    }

    /// The key's algorithm, for logs: "RSA", "ECDSA", "ED25519".
    pub fn algorithm(&self) -> String {
        format!("{:?}", self.key.key.algorithm())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> Pair {
        let ck = rcgen::generate_simple_self_signed(vec!["x.test".to_string()]).unwrap();
        let der = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).unwrap();
        Pair::new(
            CertifiedKey::new(vec![ck.cert.der().clone()], key),
            names.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn names_match_exactly_or_by_one_wildcard_label() {
        let p = pair(&["mx.example.net", "*.example.org"]);
        assert!(p.serves("mx.example.net"));
        assert!(p.serves("MX.Example.NET"));
        assert!(p.serves("mx.example.net."));
        assert!(p.serves("a.example.org"));
        assert!(!p.serves("example.org"));
        assert!(!p.serves("a.b.example.org"));
        assert!(!p.serves("mx2.example.net"));
        // rcgen's default key: ECDSA P-256.
        assert!(p.fits(&[SignatureScheme::ECDSA_NISTP256_SHA256]));
        assert!(!p.fits(&[SignatureScheme::RSA_PSS_SHA256]));
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("mx.example.net"));
        assert!(valid_name("*.example.net"));
        assert!(!valid_name(""));
        assert!(!valid_name("mx..example.net"));
        assert!(!valid_name("mx.*.net"));
        assert!(!valid_name("mx example.net"));
    }
}
