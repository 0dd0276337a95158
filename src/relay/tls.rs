//! TLS to a backend (`[[backend]] tls`): the client configuration built
//! once per backend (trust roots: the system's, plus `tls_ca`; the name
//! checked, `tls_server_name` or the host of `address`; a client
//! certificate for mTLS; `tls_verify = false` accepts any certificate but
//! still checks the handshake's signatures), the handshake with its failure
//! reasons, and `BackendStream`, the plain or TLS stream a `BackendConn`
//! talks over. TLS session resumption is rustls' in-memory cache of the
//! backend's `ClientConfig` (tickets and session ids), so a reconnect after
//! `max_idle` or a backend restart is cheap. Does not own when to say
//! STARTTLS (`client.rs`) or what a failure answers the client
//! (`select.rs`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use crate::config::{split_host_port, BackendConfig, BackendTlsMode};

/// Why TLS to a backend failed: `reason` is a metric label (not_offered,
/// refused, certificate, handshake, timeout). `client.rs` makes it a
/// `BackendError::Tls`.
#[derive(Debug)]
pub struct TlsFailure {
    pub reason: &'static str,
    pub detail: String,
}

/// One backend's TLS settings, ready to connect.
pub struct BackendTls {
    pub mode: BackendTlsMode,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// `server_name` as text, for spans and logs.
    name: String,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("mode", &self.mode)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl BackendTls {
    /// The TLS settings of backend `cfg`; None for `tls = "none"`. Errors
    /// name the file or value at fault (check-config reports them first,
    /// with key and line).
    pub fn new(cfg: &BackendConfig) -> Result<Option<Arc<BackendTls>>, String> {
        if cfg.tls == BackendTlsMode::None {
            return Ok(None);
        }
        let address = cfg.address.as_deref().unwrap_or_default();
        let name = cfg.tls_server_name.clone().unwrap_or_else(|| {
            split_host_port(address)
                .map_or(address, |(host, _)| host)
                .to_string()
        });
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| format!("tls_server_name {name:?}: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if cfg.tls_verify {
            builder.with_root_certificates(roots(cfg)?)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        };
        let config = match (&cfg.tls_certificate, &cfg.tls_private_key) {
            (Some(cert), Some(key)) => {
                let pair = crate::tls::certs::load(cert, key, Some(&[]))
                    .map_err(|e| format!("client certificate: {e:?}"))?;
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    pair.key,
                )))
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(BackendTls {
            mode: cfg.tls,
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            name,
        })))
    }

    /// Whether plaintext is refused (`starttls`, `implicit`).
    pub fn required(&self) -> bool {
        self.mode != BackendTlsMode::Opportunistic
    }

    /// The handshake over `tcp`, within `t`, in a `tls.handshake` span
    /// (a child of `smtp.backend` when a traced transaction made the
    /// connection).
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        t: Duration,
    ) -> Result<TlsStream<TcpStream>, TlsFailure> {
        let span = crate::span!(
            crate::telemetry::in_traced(),
            "tls.handshake",
            "otel.kind" = "client",
            "server.address" = self.name.as_str(),
            "tls.resumed" = tracing::field::Empty,
            "tls.protocol.version" = tracing::field::Empty,
            "error.type" = tracing::field::Empty
        );
        let hs = self.connector.connect(self.server_name.clone(), tcp);
        let r = match tokio::time::timeout(t, hs).instrument(span.clone()).await {
            Err(_) => Err(TlsFailure {
                reason: "timeout",
                detail: "handshake timed out".into(),
            }),
            Ok(Err(e)) => Err(handshake_error(e)),
            Ok(Ok(s)) => Ok(s),
        };
        match &r {
            Ok(s) => {
                let c = s.get_ref().1;
                span.record(
                    "tls.resumed",
                    c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                );
                // As the session span records it: "1.3", "1.2".
                let version = crate::tls::version_name(c.protocol_version());
                span.record("tls.protocol.version", version.trim_start_matches("TLSv"));
            }
            Err(f) => {
                span.record("error.type", f.reason);
            }
        }
        r
    }
}

/// A failed handshake, by reason: the backend's certificate (untrusted,
/// wrong name, expired) or anything else.
fn handshake_error(e: io::Error) -> TlsFailure {
    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => "certificate",
        _ => "handshake",
    };
    TlsFailure {
        reason,
        detail: format!("handshake failed: {e}"),
    }
}

/// The system's roots (rustls-native-certs) and the `tls_ca` file's.
fn roots(cfg: &BackendConfig) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = &cfg.tls_ca {
        for c in crate::tls::certs::load_certificates(ca)? {
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    Ok(roots)
}

/// `tls_verify = false`: any certificate and name, but the handshake's
/// signatures are still checked (the peer holds the key of what it sent).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a backend connection talks over.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Between the plain stream's end and the TLS stream's start (a
    /// STARTTLS in progress), or after a failed one: no I/O.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no backend stream")
}

impl BackendStream {
    /// Whether the session is TLS, and whether it was resumed.
    pub fn tls_resumed(&self) -> Option<bool> {
        match self {
            BackendStream::Tls(s) => {
                Some(s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
            }
            _ => None,
        }
    }

    /// True when an idle connection has nothing to say: no byte (a 421, a
    /// close) waiting. A TLS stream is polled once without waiting, so the
    /// session tickets a backend sends after the handshake are taken in
    /// rather than read as the backend talking.
    pub fn idle_ok(&mut self) -> bool {
        match self {
            BackendStream::Plain(s) => {
                let mut b = [0u8; 1];
                matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            BackendStream::Tls(s) => {
                let mut b = [0u8; 64];
                let mut rb = ReadBuf::new(&mut b);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                matches!(
                    Pin::new(&mut **s).poll_read(&mut cx, &mut rb),
                    Poll::Pending
                )
            }
            BackendStream::Detached => false,
        }
    }
}

// The plaintext arms are inlined, as a bare `TcpStream` would be; the TLS
// arms are calls, so a plaintext backend's reads and writes cost what they
// did before TLS existed (callgrind: the `ReadBuf` future of a reply read
// stopped being inlined when they were not).

#[inline(never)]
fn tls_read(
    s: &mut TlsStream<TcpStream>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    Pin::new(s).poll_read(cx, buf)
}

#[inline(never)]
fn tls_write(
    s: &mut TlsStream<TcpStream>,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    Pin::new(s).poll_write(cx, buf)
}

#[inline(never)]
fn tls_write_vectored(
    s: &mut TlsStream<TcpStream>,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    Pin::new(s).poll_write_vectored(cx, bufs)
}

impl AsyncRead for BackendStream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => tls_read(s, cx, buf),
            BackendStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for BackendStream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => tls_write(s, cx, buf),
            BackendStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendStream::Tls(s) => tls_write_vectored(s, cx, bufs),
            BackendStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.is_write_vectored(),
            BackendStream::Tls(s) => s.is_write_vectored(),
            BackendStream::Detached => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            BackendStream::Detached => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            BackendStream::Detached => Poll::Ready(Ok(())),
        }
    }
}
