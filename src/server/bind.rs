//! Sockets and the TLS acceptor as the configuration asks for them: the
//! client listeners (with their `backlog`; one `SO_REUSEPORT` socket per
//! core in the thread-per-core layout), a socket bound at once (the
//! admin listener), and the TLS acceptor built from `[tls]`. Used by
//! `Server::bind` and by a reload.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tracing::warn;

use crate::config::{Config, TlsMode};

/// A listening socket with a listen queue of `backlog` (std's and tokio's
/// 128 drops the SYNs, or with SYN cookies the handshake's last ACK, of a
/// burst of clients connecting at once).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    socket(addr, false)?.listen(backlog)
}

/// `cores` listening sockets on one address, each with `SO_REUSEPORT` so
/// the kernel spreads new connections over them (one per core's accept
/// loop); with one core, `listen`'s plain socket. Port 0: the first
/// socket's port is taken by the others.
pub(super) fn listen_shares(
    addr: SocketAddr,
    backlog: u32,
    cores: usize,
) -> std::io::Result<Vec<TcpListener>> {
    if cores <= 1 {
        return Ok(vec![listen(addr, backlog)?]);
    }
    let first = socket(addr, true)?.listen(backlog)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..cores {
        all.push(socket(bound, true)?.listen(backlog)?);
    }
    Ok(all)
}

fn socket(addr: SocketAddr, reuseport: bool) -> std::io::Result<tokio::net::TcpSocket> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if reuseport {
        sock.set_reuseport(true)?;
    }
    sock.bind(addr)?;
    Ok(sock)
}

/// A listening socket bound at once (from any thread inside the runtime).
pub(super) fn bind_now(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// The TLS acceptor for `cfg` (certificate files read now), when a
/// listener needs one; `keep`: the running one, whose session state
/// (ticket keys, session cache) the new one takes over.
pub(super) fn tls_acceptor(
    cfg: &Config,
    keep: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<Option<tokio_rustls::TlsAcceptor>, crate::tls::TlsError> {
    if !cfg.listeners.iter().any(|l| l.tls != TlsMode::None) {
        return Ok(None);
    }
    if cfg.tls.is_none() {
        warn!(
            "no [tls] configured: using a self-signed certificate for {}",
            cfg.hostname
        );
    }
    let keep = keep.map(|a| a.config().as_ref());
    crate::tls::acceptor(cfg.tls.as_ref(), &cfg.hostname, keep).map(Some)
}
