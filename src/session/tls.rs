//! TLS for a session: the handshake (implicit TLS at connect, or after
//! STARTTLS), what was negotiated, and the session on the encrypted stream.
//! Whether STARTTLS is offered and answered is `commands.rs`'s.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{debug, field, info, Instrument, Span};

use super::{Endpoints, Listener, Session, Shared, TlsInfo};

impl Shared {
    /// TLS handshake (implicit TLS, or after STARTTLS), then a session on
    /// the encrypted stream with fresh state; `greet` for implicit TLS only.
    pub(super) async fn serve_tls(
        self: Arc<Self>,
        io: TcpStream,
        acceptor: tokio_rustls::TlsAcceptor,
        at: Endpoints,
        listener: Listener,
        greet: bool,
        client: super::Admitted,
    ) {
        let handshake_timeout = Duration::from_secs_f64(self.cfg.timeouts.tls_handshake);
        let m = self.metrics.clone();
        let hs = crate::span!(
            crate::telemetry::in_traced(),
            "tls.handshake",
            "tls.resumed" = field::Empty,
            "error.type" = field::Empty
        );
        let accepted = tokio::time::timeout(handshake_timeout, acceptor.accept(io))
            .instrument(hs.clone())
            .await;
        let tls = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                m.tls("failed", "none");
                hs.record("error.type", "handshake_failed");
                return info!("TLS handshake failed: {e}");
            }
            Err(_) => {
                m.tls("timeout", "none");
                hs.record("error.type", "timeout");
                return info!("TLS handshake timed out");
            }
        };
        let info = tls_info(tls.get_ref().1);
        m.tls("ok", info.version);
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        if resumed {
            m.tls_resumed();
        }
        hs.record("tls.resumed", resumed);
        drop(hs);
        let cur = Span::current();
        cur.record(
            "tls.protocol.version",
            info.version.trim_start_matches("TLSv"),
        );
        cur.record("tls.cipher", field::display(&info.cipher));
        let mut s = Session::new(tls, at, self, listener, Some(info), client);
        if !greet || s.greet().await {
            // STARTTLS inside TLS is refused, so this run ends the session.
            s.run().await;
            s.finish().await;
        }
        s.close_tls().await;
    }
}

/// How long the end of a TLS session may take: its close_notify written
/// and the TCP connection shut down. A client that reads nothing (its
/// receive window full) is not waited for longer.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

impl Session<tokio_rustls::server::TlsStream<TcpStream>> {
    /// Ends the TLS session cleanly, whatever ended it (QUIT, a 421, a
    /// timeout, shutdown, the client's close): a close_notify alert after
    /// the last reply, then the TCP FIN, within `CLOSE_NOTIFY_WAIT`.
    /// Without it the client sees a truncation attack: Exim logs "TLS
    /// connection was non-properly terminated", OpenSSL and Python
    /// "unexpected eof".
    async fn close_tls(&mut self) {
        use tokio::io::AsyncWriteExt;
        if tokio::time::timeout(CLOSE_NOTIFY_WAIT, self.io.shutdown())
            .await
            .is_err()
        {
            debug!("TLS close_notify not sent within {CLOSE_NOTIFY_WAIT:?}");
        }
    }
}

fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = crate::tls::version_name(conn.protocol_version());
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_else(|| "unknown".into());
    TlsInfo { version, cipher }
}
