//! TLS for STARTTLS: a client configuration that accepts any server
//! certificate (load tests run against self-signed test certificates), and a
//! self-signed server configuration for the sink's `--tls`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts every server certificate, whoever issued it and whatever name it
/// carries. Handshake signatures are still checked against the certificate's
/// key, so the handshake does the same cryptographic work as a verified one
/// minus the chain walk.
#[derive(Debug)]
pub struct AcceptAnyCert {
    provider: Arc<CryptoProvider>,
    /// The signature schemes offered to the server.
    schemes: Vec<SignatureScheme>,
}

impl AcceptAnyCert {
    /// Offering every scheme `provider` verifies.
    pub fn new(provider: Arc<CryptoProvider>) -> AcceptAnyCert {
        Self::offering(provider, &[])
    }

    /// Offering only `schemes` (all the provider's when empty): a server
    /// with several certificates then has to pick the one they fit.
    pub fn offering(provider: Arc<CryptoProvider>, schemes: &[SignatureScheme]) -> AcceptAnyCert {
        let schemes = if schemes.is_empty() {
            provider
                .signature_verification_algorithms
                .supported_schemes()
        } else {
            schemes.to_vec()
        };
        AcceptAnyCert { provider, schemes }
    }
}

impl ServerCertVerifier for AcceptAnyCert {
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
        verify_tls12_signature(
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
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// Client configuration accepting any certificate. Session resumption is off
/// unless `resume` (so every connection pays a full handshake, as most
/// sending MTAs do). `tls12`: offer TLS 1.2 only (the handshake of an RSA
/// certificate with ECDHE, as many MTAs still negotiate it); otherwise TLS
/// 1.3 and 1.2.
pub fn client_config(resume: bool, tls12: bool) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = provider();
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert::new(provider)))
        .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

/// A server configuration with a fresh self-signed certificate for
/// `localhost` (the sink's `--tls`).
pub fn self_signed_server_config() -> Result<Arc<ServerConfig>, String> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| e.to_string())?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| e.to_string())?;
    server_config(vec![cert], key)
}

/// A server configuration from PEM files (certificate chain and key).
pub fn server_config_from_pem(cert: &str, key: &str) -> Result<Arc<ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    server_config(certs, key)
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(cfg))
}
