//! Outgoing TCP connections: source-address rotation (`--bind
//! 127.0.0.2-127.0.0.20`), `IP_BIND_ADDRESS_NO_PORT`, `TCP_NODELAY`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// Source addresses to rotate through, one per new connection.
#[derive(Debug, Default)]
pub struct BindPool {
    addrs: Vec<IpAddr>,
    next: AtomicUsize,
}

impl BindPool {
    /// No binding: the kernel picks the source address.
    pub fn none() -> BindPool {
        BindPool::default()
    }

    /// Parses `A`, `A-B` (IPv4, inclusive, at most 65 536 addresses) or a
    /// comma-separated list of those.
    pub fn parse(spec: &str) -> Result<BindPool, String> {
        let mut addrs = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let a: Ipv4Addr = a
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad address {a:?} in --bind"))?;
                    let b: Ipv4Addr = b
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad address {b:?} in --bind"))?;
                    let (a, b) = (u32::from(a), u32::from(b));
                    if b < a || b - a >= 65_536 {
                        return Err(format!("bad range {part:?} in --bind"));
                    }
                    addrs.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
                }
                None => addrs.push(
                    part.parse()
                        .map_err(|_| format!("bad address {part:?} in --bind"))?,
                ),
            }
        }
        if addrs.is_empty() {
            return Err("--bind names no address".into());
        }
        Ok(BindPool {
            addrs,
            next: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The next source address, round robin; `None` when not binding.
    pub fn next(&self) -> Option<IpAddr> {
        if self.addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.addrs[i % self.addrs.len()])
    }
}

/// Connects to `target` (from `bind` when given) and sets `TCP_NODELAY`.
pub async fn connect(target: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = bind {
        // Let connect() choose the port, so that the 4-tuple, not the source
        // address alone, has to be unique: many more connections per address.
        set_bind_no_port(&sock);
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(target_os = "linux")]
fn set_bind_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn set_bind_no_port(_sock: &TcpSocket) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_rotates() {
        let p = BindPool::parse("127.0.0.2-127.0.0.4,127.0.0.9").unwrap();
        assert_eq!(p.len(), 4);
        let got: Vec<String> = (0..5).map(|_| p.next().unwrap().to_string()).collect();
        assert_eq!(
            got,
            [
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.4",
                "127.0.0.9",
                "127.0.0.2"
            ]
        );
        assert!(BindPool::parse("127.0.0.5-127.0.0.4").is_err());
        assert!(BindPool::parse("nope").is_err());
        assert!(BindPool::none().next().is_none());
    }
}
