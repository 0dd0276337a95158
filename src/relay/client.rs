//! Backend SMTP client connection: connect, TLS (implicit, or STARTTLS
//! after the greeting as `[[backend]] tls` says), greeting, EHLO and
//! capabilities, reply reading with timeouts, XFORWARD / XCLIENT command
//! building. One `BackendConn` is one TCP connection to one backend;
//! pooling is elsewhere. A connection that must be TLS is never used in
//! plaintext: `open` fails before any mail command.
//!
//! `BackendConn::open` connects (`TCP_NODELAY`), takes a 220 greeting
//! within the connect timeout and says EHLO, falling back to HELO; `Caps`
//! is what that EHLO offered. `ClientIdentity` is the client as the backend
//! should learn it, caching its encoded XFORWARD lines; `identity_commands`
//! writes XFORWARD or XCLIENT lines with only the offered attributes,
//! xtext-encoded, each under 512 octets.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::tls::{BackendStream, BackendTls, TlsFailure};
use crate::config::BackendTlsMode;
use crate::smtp::{Reply, ReplyError};
use crate::timer::Limit;

/// Why a backend conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connect to {addr}: {err}")]
    Connect { addr: String, err: std::io::Error },
    #[error("backend i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend timed out")]
    Timeout,
    #[error("backend closed the connection")]
    Closed,
    #[error("backend sent a malformed reply: {0}")]
    Protocol(#[from] ReplyError),
    #[error("backend refused: {} {}", .0.code, .0.text())]
    Refused(Reply),
    #[error("no backend connection available")]
    Exhausted,
    /// A connect not made, the pool's own signal (never seen outside
    /// `relay::pool`): refused while `Pool::idle_now` tries a checkout in
    /// place, or a wait to connect (`max_connecting`) ended by a
    /// connection given back meanwhile.
    #[error("no connect now: an idle connection is to be taken instead")]
    NotNow,
    /// TLS required and not had: `reason` is a metric label
    /// (not_offered, refused, certificate, handshake, timeout).
    #[error("TLS to the backend: {detail}")]
    Tls {
        reason: &'static str,
        detail: String,
    },
}

impl From<TlsFailure> for BackendError {
    fn from(f: TlsFailure) -> BackendError {
        BackendError::Tls {
            reason: f.reason,
            detail: f.detail,
        }
    }
}

/// What the backend said it supports in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Caps {
    pub esmtp: bool,
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    /// CHUNKING (RFC 3030): BDAT is relayed as BDAT.
    pub chunking: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// The XFORWARD attributes offered that smtp-edge knows; empty when
    /// not offered.
    pub xforward: Attrs,
    /// The XCLIENT attributes offered that smtp-edge knows; empty when not
    /// offered.
    pub xclient: Attrs,
}

/// The client attributes smtp-edge sends by XFORWARD / XCLIENT, in the
/// order it sends them.
const ATTRS: [&str; 6] = ["NAME", "ADDR", "PORT", "PROTO", "HELO", "SOURCE"];

/// A set of `ATTRS` (a backend's offer): one bit each, so a session's
/// cached XFORWARD lines are matched to a connection's offer by one
/// comparison. Names it does not know are left out (nothing would be sent
/// for them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs(u8);

impl Attrs {
    /// The known attributes among `words` (any case).
    pub fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Attrs {
        let mut bits = 0;
        for w in words {
            if let Some(k) = ATTRS.iter().position(|a| a.eq_ignore_ascii_case(w)) {
                bits |= 1 << k;
            }
        }
        Attrs(bits)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    fn has(self, k: usize) -> bool {
        self.0 & (1 << k) != 0
    }
}

impl Caps {
    pub fn from_ehlo(reply: &Reply) -> Caps {
        let mut caps = Caps {
            esmtp: true,
            ..Caps::default()
        };
        for line in reply.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = words.next().and_then(|w| w.parse().ok()).or(Some(0)),
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "CHUNKING" => caps.chunking = true,
                "STARTTLS" => caps.starttls = true,
                "XFORWARD" => caps.xforward = Attrs::from_words(words),
                "XCLIENT" => caps.xclient = Attrs::from_words(words),
                _ => {}
            }
        }
        caps
    }
}

/// One connection to a backend, greeted and EHLO'd.
pub struct BackendConn {
    pub(crate) stream: BackendStream,
    /// Bytes read and not yet parsed start at `rpos`; both go back to
    /// empty once every reply read is parsed, so `rbuf.is_empty()` means
    /// nothing is pending.
    rbuf: Vec<u8>,
    rpos: usize,
    pub caps: Caps,
    /// Transactions started on this connection.
    pub txns: u32,
    /// The connection is between transactions but needs RSET first.
    pub needs_rset: bool,
    /// Index of the backend this connection belongs to.
    pub backend: usize,
    /// Generation of the `Backends` whose pool it belongs to.
    pub generation: u64,
    pub peer: std::sync::Arc<str>,
    /// A number of its own, unique in the process (for traces).
    pub id: u64,
    /// The buffers of the last transaction, for the next one.
    pub(crate) spare: crate::relay::TxnBufs,
    pub(crate) _permit: Option<OwnedSemaphorePermit>,
    /// When it was last given back (`ticks`; `max_idle`).
    pub(crate) idle_since: u32,
    /// When it was opened (`ticks`; `max_lifetime`).
    pub(crate) created: u32,
    /// The deadline of reads of replies.
    read_timer: crate::timer::ReadTimer,
    /// When the last `read_reply` first had to wait (None: its reply was
    /// in the buffer already).
    waited_since: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("peer", &self.peer)
            .field("txns", &self.txns)
            .finish()
    }
}

async fn timed<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout),
    }
}

/// The pool's coarse clock: tenths of a second of the monotonic clock, in
/// 4 bytes (a connection is held inline in the session future, which must
/// stay small), wrapping after 13 years (ages are wrapping differences).
pub(crate) fn ticks() -> u32 {
    crate::timer::Stamp::now().ticks()
}

/// The next backend connection's `id`.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl BackendConn {
    /// Connects, reads the greeting and says EHLO (HELO if EHLO is refused);
    /// with `tls`, the TLS handshake first (implicit) or STARTTLS after the
    /// EHLO and EHLO again. Everything but the EHLOs within
    /// `connect_timeout`.
    pub async fn open(
        addr: &str,
        backend: usize,
        helo_name: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
        tls: Option<&BackendTls>,
    ) -> Result<BackendConn, BackendError> {
        let tcp = timed(connect_timeout, async {
            TcpStream::connect(addr)
                .await
                .map_err(|err| BackendError::Connect {
                    addr: addr.to_string(),
                    err,
                })
        })
        .await?;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            Some(t) if t.mode == BackendTlsMode::Implicit => {
                BackendStream::Tls(Box::new(t.handshake(tcp, connect_timeout).await?))
            }
            _ => BackendStream::Plain(tcp),
        };
        let mut conn = BackendConn {
            stream,
            rbuf: Vec::with_capacity(512),
            rpos: 0,
            caps: Caps::default(),
            txns: 0,
            needs_rset: false,
            backend,
            generation: 0,
            peer: addr.into(),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            spare: Default::default(),
            _permit: None,
            idle_since: ticks(),
            created: ticks(),
            read_timer: crate::timer::ReadTimer::new(),
            waited_since: None,
        };
        // The greeting is part of connecting: a backend that accepts but
        // never greets must not hold the client longer than that.
        let greeting = conn.read_reply(connect_timeout).await?;
        if greeting.code != 220 {
            return Err(BackendError::Refused(greeting));
        }
        conn.ehlo(helo_name, command_timeout).await?;
        if let Some(t) = tls.filter(|t| t.mode != BackendTlsMode::Implicit) {
            conn.starttls(t, helo_name, connect_timeout, command_timeout)
                .await?;
        }
        Ok(conn)
    }

    /// STARTTLS on a greeted plaintext connection, then EHLO again. Not
    /// offered: an error when TLS is required, plaintext otherwise
    /// (`opportunistic`).
    async fn starttls(
        &mut self,
        tls: &BackendTls,
        helo_name: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<(), BackendError> {
        if !self.caps.starttls {
            if !tls.required() {
                return Ok(());
            }
            return Err(BackendError::Tls {
                reason: "not_offered",
                detail: "the backend does not offer STARTTLS".into(),
            });
        }
        self.send(b"STARTTLS\r\n").await?;
        let r = self.read_reply(command_timeout).await?;
        if r.code != 220 {
            return Err(BackendError::Tls {
                reason: "refused",
                detail: format!("STARTTLS refused: {} {}", r.code, r.text()),
            });
        }
        // Bytes after the 220 and before the handshake would be read as
        // if they came over TLS: refuse them, as a server must.
        if !self.rbuf.is_empty() {
            return Err(BackendError::Tls {
                reason: "handshake",
                detail: "bytes after the 220 to STARTTLS".into(),
            });
        }
        let BackendStream::Plain(tcp) =
            std::mem::replace(&mut self.stream, BackendStream::Detached)
        else {
            return Err(BackendError::Closed);
        };
        self.stream = BackendStream::Tls(Box::new(tls.handshake(tcp, connect_timeout).await?));
        self.caps = Caps::default();
        self.ehlo(helo_name, command_timeout).await
    }

    /// Whether this connection is TLS, and whether its session was resumed.
    pub fn tls_resumed(&self) -> Option<bool> {
        self.stream.tls_resumed()
    }

    /// EHLO (falling back to HELO); records capabilities.
    pub async fn ehlo(&mut self, helo_name: &str, t: Duration) -> Result<(), BackendError> {
        self.send(format!("EHLO {helo_name}\r\n").as_bytes())
            .await?;
        let r = self.read_reply(t).await?;
        if r.code == 250 {
            self.caps = Caps::from_ehlo(&r);
            return Ok(());
        }
        self.send(format!("HELO {helo_name}\r\n").as_bytes())
            .await?;
        let r = self.read_reply(t).await?;
        if r.code != 250 {
            return Err(BackendError::Refused(r));
        }
        self.caps = Caps::default();
        Ok(())
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends `bufs` with vectored writes (the message bytes straight from
    /// the session's input buffer).
    pub async fn send_vectored(
        &mut self,
        mut bufs: &mut [std::io::IoSlice<'_>],
    ) -> Result<(), BackendError> {
        while !bufs.is_empty() {
            let n = self.stream.write_vectored(bufs).await?;
            if n == 0 {
                return Err(BackendError::Closed);
            }
            std::io::IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    /// Reads one whole reply, waiting at most `t` from when a read first
    /// blocks. The clock is read only when a read must wait (a pipelined
    /// batch's replies are mostly in the buffer already), once per wait;
    /// `waited_since` then tells when the first wait began.
    pub async fn read_reply(&mut self, t: Duration) -> Result<Reply, BackendError> {
        let mut first: Option<crate::timer::Blocked> = None;
        self.waited_since = None;
        loop {
            match self.buffered_reply() {
                Some(Ok(reply)) => {
                    self.waited_since = first.map(|b| b.since);
                    return Ok(reply);
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
            if self.rpos > 0 {
                // Part of a reply after whole ones (rare): to the front.
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
            }
            self.rbuf.reserve(512);
            let limit = Limit::or_until(t, first.map(|b| b.until));
            let read = self.stream.read_buf(&mut self.rbuf);
            let got = self.read_timer.within(limit, read).await;
            first = first.or(self.read_timer.blocked());
            let n = match got {
                Some(r) => r?,
                None => return Err(BackendError::Timeout),
            };
            if n == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// A whole reply already read, taken without a future or a clock read
    /// (a pipelined batch's second and later replies came with the
    /// first): None when the buffer holds none yet. `waited_since` is then
    /// None, as after a `read_reply` that did not wait.
    #[inline]
    pub fn buffered_reply(&mut self) -> Option<Result<Reply, BackendError>> {
        match Reply::parse(&self.rbuf[self.rpos..]) {
            Ok(Some((reply, used))) => {
                // Parsed where they lie: no move of the rest per reply,
                // one clear after the last.
                self.rpos += used;
                if self.rpos == self.rbuf.len() {
                    self.rbuf.clear();
                    self.rpos = 0;
                }
                self.waited_since = None;
                Some(Ok(reply))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// When the last `read_reply` first had to wait for the backend;
    /// None when its reply was already buffered (no time passed).
    pub fn waited_since(&self) -> Option<tokio::time::Instant> {
        self.waited_since
    }

    /// True when the idle connection still looks usable: nothing to read
    /// (a backend that said 421 or closed has something pending).
    pub fn idle_ok(&mut self) -> bool {
        self.rbuf.is_empty() && self.stream.idle_ok()
    }

    /// Sends QUIT and waits briefly for the reply, then closes (a TLS
    /// session with its close_notify); errors are ignored, all within 2 s.
    pub async fn quit(mut self) {
        let _ = timed(Duration::from_secs(2), async {
            self.send(b"QUIT\r\n").await?;
            self.read_reply(Duration::from_secs(2)).await?;
            self.stream.shutdown().await?;
            Ok(())
        })
        .await;
    }
}

/// The client as the backend should learn it. A session keeps one until
/// its HELO changes, so the encoded XFORWARD lines (cached here, per set of
/// offered attributes) are built once per session, not per message.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub addr: SocketAddr,
    /// Reverse DNS name when known.
    pub name: Option<String>,
    pub helo: Option<String>,
    /// `SMTP` or `ESMTP`.
    pub proto: &'static str,
    /// The attributes they were built for, the lines, how many.
    xforward: std::sync::OnceLock<(Attrs, Vec<u8>, usize)>,
}

impl ClientIdentity {
    pub fn new(
        addr: SocketAddr,
        name: Option<String>,
        helo: Option<String>,
        proto: &'static str,
    ) -> ClientIdentity {
        ClientIdentity {
            addr,
            name,
            helo,
            proto,
            xforward: std::sync::OnceLock::new(),
        }
    }

    /// Appends the XFORWARD lines for a backend offering `offered`, from
    /// the cache when it was built for the same attributes; returns how
    /// many lines (a reply is owed for each).
    pub fn xforward_lines(&self, offered: Attrs, out: &mut Vec<u8>) -> usize {
        let count = |lines: &[u8]| memchr::memchr_iter(b'\n', lines).count();
        let (for_offered, lines, n) = self.xforward.get_or_init(|| {
            let mut lines = Vec::with_capacity(128);
            identity_commands("XFORWARD", offered, self, &mut lines);
            let n = count(&lines);
            (offered, lines, n)
        });
        if *for_offered == offered {
            out.extend_from_slice(lines);
            *n
        } else {
            let start = out.len();
            identity_commands("XFORWARD", offered, self, out);
            count(&out[start..])
        }
    }
}

/// xtext (RFC 3461) encoding, as XFORWARD and XCLIENT values require; runs
/// of bytes that need no encoding are copied whole.
pub fn xtext(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !((33..=126).contains(&b) && b != b'+' && b != b'=') {
            out.extend_from_slice(&bytes[start..i]);
            out.extend_from_slice(&[b'+', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Writes one attribute's value (before xtext encoding) into `out`.
fn attribute_value(id: &ClientIdentity, attr: &str, out: &mut Vec<u8>) -> bool {
    use std::io::Write;
    match attr {
        "NAME" => out.extend_from_slice(id.name.as_deref().unwrap_or("[UNAVAILABLE]").as_bytes()),
        "ADDR" => {
            let _ = match id.addr.ip() {
                std::net::IpAddr::V4(ip) => write!(out, "{ip}"),
                std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                    Some(v4) => write!(out, "{v4}"),
                    None => write!(out, "IPV6:{ip}"),
                },
            };
        }
        "PORT" => {
            let _ = write!(out, "{}", id.addr.port());
        }
        "HELO" => out.extend_from_slice(id.helo.as_deref().unwrap_or("[UNAVAILABLE]").as_bytes()),
        "PROTO" => out.extend_from_slice(id.proto.as_bytes()),
        "SOURCE" => out.extend_from_slice(b"REMOTE"),
        _ => return false,
    }
    true
}

/// The XFORWARD / XCLIENT command lines (`verb` is either) carrying the
/// attributes the backend offered, each line kept under 512 octets.
pub fn identity_commands(verb: &str, offered: Attrs, id: &ClientIdentity, out: &mut Vec<u8>) {
    let mut line = Vec::with_capacity(128);
    line.extend_from_slice(verb.as_bytes());
    let mut raw = Vec::new();
    let mut item = Vec::new();
    for (k, attr) in ATTRS.into_iter().enumerate() {
        if !offered.has(k) {
            continue;
        }
        if verb == "XCLIENT" && attr == "SOURCE" {
            continue;
        }
        raw.clear();
        if !attribute_value(id, attr, &mut raw) {
            continue;
        }
        item.clear();
        item.push(b' ');
        item.extend_from_slice(attr.as_bytes());
        item.push(b'=');
        xtext(&raw, &mut item);
        if line.len() + item.len() > 500 && line.len() > verb.len() {
            out.extend_from_slice(&line);
            out.extend_from_slice(b"\r\n");
            line.truncate(verb.len());
        }
        line.extend_from_slice(&item);
    }
    if line.len() > verb.len() {
        out.extend_from_slice(&line);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ClientIdentity {
        ClientIdentity::new(
            "192.0.2.7:4321".parse().unwrap(),
            None,
            Some("client+x.example".into()),
            "ESMTP",
        )
    }

    /// Replies parsed where they lie: whole ones taken from the buffer,
    /// a part after them kept and completed by the next read.
    #[tokio::test]
    async fn replies_whole_and_split_across_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 hi\r\n").await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await.unwrap(); // EHLO
            s.write_all(b"250 ok\r\n").await.unwrap();
            let _ = s.read(&mut buf).await.unwrap(); // the batch
            s.write_all(b"250 2.1.0 a\r\n250 2.1.5 b\r\n35")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(b"4 go\r\n").await.unwrap();
            let _ = s.read(&mut buf).await.unwrap();
        });
        let t = Duration::from_secs(5);
        let mut c = BackendConn::open(&addr, 0, "edge.test", t, t, None)
            .await
            .unwrap();
        assert!(c.buffered_reply().is_none());
        c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
            .await
            .unwrap();
        let a = c.read_reply(t).await.unwrap();
        assert_eq!((a.code, a.text()), (250, "a".to_string()));
        let b = c.buffered_reply().unwrap().unwrap();
        assert_eq!((b.code, b.text()), (250, "b".to_string()));
        // `35` is in the buffer: not a whole reply yet.
        assert!(c.buffered_reply().is_none());
        let d = c.read_reply(t).await.unwrap();
        assert_eq!((d.code, d.text()), (354, "go".to_string()));
        assert!(c.rbuf.is_empty() && c.rpos == 0);
        drop(c);
        server.await.unwrap();
    }

    #[test]
    fn xforward_only_offered_attributes() {
        let mut out = Vec::new();
        let offered = Attrs::from_words(["NAME", "addr", "HELO", "FUTURE"]);
        identity_commands("XFORWARD", offered, &id(), &mut out);
        assert_eq!(
            out,
            b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 HELO=client+2Bx.example\r\n"
        );
    }

    #[test]
    fn xforward_ipv6_and_split() {
        let mut i = id();
        i.addr = "[2001:db8::1]:25".parse().unwrap();
        i.helo = Some("h".repeat(450));
        let offered = Attrs::from_words(ATTRS);
        let mut out = Vec::new();
        identity_commands("XFORWARD", offered, &i, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ADDR=IPV6:2001:db8::1"));
        assert!(text.lines().count() >= 2);
        assert!(text
            .lines()
            .all(|l| l.len() < 512 && l.starts_with("XFORWARD ")));
    }

    #[test]
    fn caps_parse() {
        let r = Reply::from_lines(
            250,
            None,
            [
                "sink",
                "PIPELINING",
                "SIZE 1000",
                "XFORWARD NAME ADDR PROTO HELO",
                "CHUNKING",
            ],
        );
        let c = Caps::from_ehlo(&r);
        assert!(c.chunking);
        assert!(c.pipelining);
        assert_eq!(c.size, Some(1000));
        assert_eq!(c.xforward.len(), 4);
    }
}
