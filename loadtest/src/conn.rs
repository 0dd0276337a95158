//! One client SMTP connection: plain or TLS stream, a fixed read buffer,
//! reply parsing (multi-line, bounded), EHLO capabilities, STARTTLS upgrade,
//! and every operation under a timeout. Misbehaving servers produce errors,
//! never panics.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// At most this many lines in one reply.
const MAX_REPLY_LINES: usize = 512;

/// What went wrong, as counted in the report's `errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect failed (refused, unreachable, no ports left, ...).
    Connect,
    /// Read or write failed, or the server closed the connection early.
    Io,
    /// No reply / no progress within `--timeout`.
    Timeout,
    /// Malformed reply (not `DDD[ -]text`, too long, too many lines) or
    /// bytes sent after the reply to STARTTLS.
    Protocol,
    /// The TLS handshake failed.
    Tls,
}

/// An error with its kind and a short description.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub detail: String,
}

impl Error {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Error {
        Error {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Error {}

/// Capabilities from the EHLO reply that the generator uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub pipelining: bool,
    pub size: bool,
    pub starttls: bool,
}

impl Caps {
    fn parse_line(&mut self, text: &[u8]) {
        let word_end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
        let word = &text[..word_end];
        if word.eq_ignore_ascii_case(b"PIPELINING") {
            self.pipelining = true;
        } else if word.eq_ignore_ascii_case(b"SIZE") {
            self.size = true;
        } else if word.eq_ignore_ascii_case(b"STARTTLS") {
            self.starttls = true;
        }
    }
}

/// A plain or TLS byte stream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// After a failed upgrade: every operation fails.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection lost during STARTTLS",
    )
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// A connected SMTP client session (greeting not yet read).
pub struct Conn {
    stream: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    timeout: Duration,
}

impl Conn {
    /// Connects (from `bind` when given) with `TCP_NODELAY`; `buf_size` is
    /// the read buffer (also the longest reply line accepted).
    pub async fn connect(
        target: SocketAddr,
        bind: Option<IpAddr>,
        io_timeout: Duration,
        buf_size: usize,
    ) -> Result<Conn, Error> {
        let stream = match timeout(io_timeout, crate::net::connect(target, bind)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Error::new(ErrorKind::Connect, e.to_string())),
            Err(_) => return Err(Error::new(ErrorKind::Timeout, "connect timed out")),
        };
        Ok(Conn {
            stream: Stream::Plain(stream),
            buf: vec![0u8; buf_size.max(512)].into_boxed_slice(),
            start: 0,
            end: 0,
            timeout: io_timeout,
        })
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Reads one complete reply and returns its code (of the last line).
    pub async fn read_reply(&mut self) -> Result<u16, Error> {
        match timeout(self.timeout, self.read_reply_inner(None)).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::Timeout, "no reply in time")),
        }
    }

    /// Reads the reply to EHLO, collecting the capabilities.
    pub async fn read_ehlo_reply(&mut self, caps: &mut Caps) -> Result<u16, Error> {
        match timeout(self.timeout, self.read_reply_inner(Some(caps))).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::Timeout, "no EHLO reply in time")),
        }
    }

    async fn read_reply_inner(&mut self, mut caps: Option<&mut Caps>) -> Result<u16, Error> {
        let mut lines = 0usize;
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                let mut line = &self.buf[self.start..self.start + pos];
                self.start += pos + 1;
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                let (code, last) = parse_reply_line(line)?;
                if let Some(c) = caps.as_deref_mut() {
                    if lines > 0 && line.len() > 4 {
                        c.parse_line(&line[4..]);
                    }
                }
                lines += 1;
                if last {
                    return Ok(code);
                }
                if lines >= MAX_REPLY_LINES {
                    return Err(Error::new(ErrorKind::Protocol, "reply has too many lines"));
                }
                continue;
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                if self.start == 0 {
                    return Err(Error::new(ErrorKind::Protocol, "reply line too long"));
                }
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self
                .stream
                .read(&mut self.buf[self.end..])
                .await
                .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
            if n == 0 {
                return Err(Error::new(ErrorKind::Io, "server closed the connection"));
            }
            self.end += n;
        }
    }

    /// Writes all of `data` (and flushes TLS), under the timeout.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), Error> {
        let fut = async {
            self.stream.write_all(data).await?;
            if let Stream::Tls(_) = self.stream {
                self.stream.flush().await?;
            }
            Ok::<(), io::Error>(())
        };
        match timeout(self.timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::new(ErrorKind::Io, e.to_string())),
            Err(_) => Err(Error::new(ErrorKind::Timeout, "write timed out")),
        }
    }

    /// Upgrades to TLS (after a 220 reply to STARTTLS). Bytes that arrived
    /// after that reply are a protocol error (they would be plaintext
    /// injected into the TLS session).
    pub async fn upgrade_tls(
        &mut self,
        connector: &TlsConnector,
        name: ServerName<'static>,
    ) -> Result<(), Error> {
        if self.buffered() > 0 {
            return Err(Error::new(
                ErrorKind::Protocol,
                "data after the reply to STARTTLS",
            ));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "STARTTLS on a TLS connection",
            ));
        };
        match timeout(self.timeout, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = Stream::Tls(Box::new(tls));
                Ok(())
            }
            Ok(Err(e)) => Err(Error::new(ErrorKind::Tls, e.to_string())),
            Err(_) => Err(Error::new(ErrorKind::Timeout, "TLS handshake timed out")),
        }
    }

    /// After a TLS upgrade: the handshake's kind and version, as
    /// `(resumed, tls13)`; `None` on a plain connection.
    pub fn tls_info(&self) -> Option<(bool, bool)> {
        let Stream::Tls(s) = &self.stream else {
            return None;
        };
        let c = s.get_ref().1;
        Some((
            c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            c.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
        ))
    }

    /// After QUIT: waits (at most `wait`) for the server to close, so that
    /// the server side, which closed first, keeps the TIME_WAIT.
    pub async fn wait_close(mut self, wait: Duration) {
        if wait.is_zero() {
            return;
        }
        let mut scratch = [0u8; 256];
        let _ = timeout(wait, async {
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    /// Waits until the server sends something or closes (for idle
    /// connections): `Ok(n)` bytes, `Ok(0)` on close.
    pub async fn read_some(&mut self) -> Result<usize, Error> {
        self.start = 0;
        self.end = 0;
        self.stream
            .read(&mut self.buf[..])
            .await
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))
    }
}

/// Parses `DDD text`, `DDD-text` or `DDD`; returns (code, is last line).
pub fn parse_reply_line(line: &[u8]) -> Result<(u16, bool), Error> {
    let bad = || {
        Error::new(
            ErrorKind::Protocol,
            format!(
                "malformed reply line {:?}",
                String::from_utf8_lossy(&line[..line.len().min(80)])
            ),
        )
    };
    if line.len() < 3
        || !line[..3].iter().all(u8::is_ascii_digit)
        || !(b'2'..=b'5').contains(&line[0])
    {
        return Err(bad());
    }
    let code =
        (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
    match line.get(3) {
        None | Some(b' ') => Ok((code, true)),
        Some(b'-') => Ok((code, false)),
        Some(_) => Err(bad()),
    }
}

/// The TLS connector and server name used for `--starttls`.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
}

impl TlsClient {
    pub fn new(
        cfg: Arc<rustls::ClientConfig>,
        sni: Option<&str>,
        target: SocketAddr,
    ) -> Result<TlsClient, String> {
        let name = match sni {
            Some(n) => {
                ServerName::try_from(n.to_string()).map_err(|e| format!("bad --sni {n:?}: {e}"))?
            }
            None => ServerName::IpAddress(target.ip().into()),
        };
        Ok(TlsClient {
            connector: TlsConnector::from(cfg),
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(parse_reply_line(b"250 ok").unwrap(), (250, true));
        assert_eq!(parse_reply_line(b"250-PIPELINING").unwrap(), (250, false));
        assert_eq!(parse_reply_line(b"354").unwrap(), (354, true));
        assert!(parse_reply_line(b"25").is_err());
        assert!(parse_reply_line(b"abc def").is_err());
        assert!(parse_reply_line(b"250x").is_err());
        assert!(parse_reply_line(b"999 x").is_err());
    }

    #[test]
    fn caps() {
        let mut c = Caps::default();
        for l in [&b"PIPELINING"[..], b"SIZE 1000", b"starttls", b"8BITMIME"] {
            c.parse_line(l);
        }
        assert_eq!(
            c,
            Caps {
                pipelining: true,
                size: true,
                starttls: true
            }
        );
    }
}
