//! The fast sink backend (`smtp-load sink`): accepts SMTP, answers every
//! pipelined command of a read in one write, skims DATA for `\r\n.\r\n` with
//! memchr's memmem without storing it, and counts messages, bytes and
//! connections (also the most open at once). Optional STARTTLS with a
//! self-signed or given certificate.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The end of DATA.
const END: &[u8; 5] = b"\r\n.\r\n";
static END_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(END));

/// Longest command line accepted (longer ones get a 500 and are skipped).
const MAX_LINE: usize = 4096;

/// Listen backlog (the kernel caps it at net.core.somaxconn). Not std's and
/// tokio's 128: a proxy opening hundreds of backend connections at once must
/// not have its SYNs dropped by the sink.
const BACKLOG: u32 = 4096;

/// Sink settings (the `sink` subcommand's flags).
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub listen: SocketAddr,
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// Offer STARTTLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Also advertise XCLIENT (it is answered either way).
    pub xclient: bool,
    /// Stop after this many messages.
    pub max_messages: Option<u64>,
    /// Per-connection read buffer.
    pub read_buf: usize,
    /// Close connections idle this long.
    pub idle_timeout: Duration,
    /// Refuse recipients whose address starts with this (ASCII case
    /// ignored) as unknown users (`550 5.1.1`), as a backend that knows
    /// its users does.
    pub unknown_prefix: Option<String>,
}

impl SinkConfig {
    pub fn new(listen: SocketAddr) -> SinkConfig {
        SinkConfig {
            listen,
            hostname: "sink.smtp-load.invalid".into(),
            tls: None,
            xclient: false,
            max_messages: None,
            read_buf: 32 * 1024,
            idle_timeout: Duration::from_secs(300),
            unknown_prefix: None,
        }
    }
}

/// Live counters of a sink.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub connections: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// The most connections open at once.
    pub peak_active: AtomicU64,
    pub messages: AtomicU64,
    /// RCPT commands in a transaction, accepted or refused as unknown.
    pub rcpts: AtomicU64,
    /// Of `rcpts`, those refused as unknown users (`unknown_prefix`).
    pub rcpts_unknown: AtomicU64,
    pub bytes: AtomicU64,
    pub tls_handshakes: AtomicU64,
    /// Connections ended by an I/O error, a timeout or a failed handshake.
    pub errors: AtomicU64,
    base: OnceLock<Instant>,
    /// Nanoseconds after `base`: first connection, last message.
    first_conn_ns: AtomicU64,
    last_msg_ns: AtomicU64,
}

impl SinkStats {
    fn ns(&self) -> u64 {
        let base = *self.base.get_or_init(Instant::now);
        base.elapsed().as_nanos() as u64 + 1
    }
}

/// Counts printed when the sink stops (`--json` prints this object).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SinkReport {
    /// Always "smtp-load-sink".
    pub tool: String,
    pub listen: String,
    pub connections: u64,
    /// The most connections open at once.
    #[serde(default)]
    pub peak_connections: u64,
    pub messages: u64,
    /// RCPT commands in a transaction (after MAIL), accepted or refused.
    pub rcpts: u64,
    /// Of `rcpts`, those refused as unknown users (`--unknown-prefix`).
    #[serde(default)]
    pub rcpts_unknown: u64,
    /// DATA bytes received, without the final `.` line.
    pub bytes: u64,
    pub tls_handshakes: u64,
    pub errors: u64,
    /// First connection → last message.
    pub elapsed_s: f64,
    pub msgs_per_sec: f64,
    pub bytes_per_sec: f64,
}

impl SinkReport {
    pub fn to_table(&self) -> String {
        let unknown = if self.rcpts_unknown > 0 {
            format!(", {} refused as unknown", self.rcpts_unknown)
        } else {
            String::new()
        };
        format!(
            "smtp-load sink {}: {} messages ({} rcpts{unknown}, {} bytes) over {} connections (at most {} at once) in {:.3} s: {:.1} msg/s, {:.2} MB/s; {} TLS handshakes, {} errors\n",
            self.listen,
            self.messages,
            self.rcpts,
            self.bytes,
            self.connections,
            self.peak_connections,
            self.elapsed_s,
            self.msgs_per_sec,
            self.bytes_per_sec / 1e6,
            self.tls_handshakes,
            self.errors
        )
    }
}

struct Ctx {
    cfg: SinkConfig,
    stats: Arc<SinkStats>,
    reached: Arc<Notify>,
    greeting: Vec<u8>,
    ehlo_plain: Vec<u8>,
    ehlo_tls: Vec<u8>,
    helo: Vec<u8>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

/// A running sink.
pub struct SinkServer {
    addr: SocketAddr,
    stats: Arc<SinkStats>,
    reached: Arc<Notify>,
    accept: JoinHandle<()>,
}

impl SinkServer {
    /// Binds and starts accepting (inside a tokio runtime).
    pub async fn start(cfg: SinkConfig) -> io::Result<SinkServer> {
        let sock = if cfg.listen.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(cfg.listen)?;
        let listener = sock.listen(BACKLOG)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(SinkStats::default());
        stats.ns();
        let reached = Arc::new(Notify::new());
        let h = &cfg.hostname;
        let mut ehlo = format!(
            "250-{h}\r\n250-PIPELINING\r\n250-SIZE 0\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-XFORWARD NAME ADDR PORT PROTO HELO SOURCE\r\n"
        );
        if cfg.xclient {
            ehlo.push_str("250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n");
        }
        let ehlo_tls = format!("{ehlo}250 DSN\r\n").into_bytes();
        let ehlo_plain = if cfg.tls.is_some() {
            format!("{ehlo}250-STARTTLS\r\n250 DSN\r\n").into_bytes()
        } else {
            ehlo_tls.clone()
        };
        let ctx = Arc::new(Ctx {
            greeting: format!("220 {h} ESMTP smtp-load sink\r\n").into_bytes(),
            helo: format!("250 {h}\r\n").into_bytes(),
            ehlo_plain,
            ehlo_tls,
            acceptor: cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            stats: stats.clone(),
            reached: reached.clone(),
            cfg,
        });
        let accept = tokio::spawn(accept_loop(listener, ctx));
        Ok(SinkServer {
            addr,
            stats,
            reached,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    /// Resolves once `max_messages` have been received.
    pub async fn reached(&self) {
        self.reached.notified().await
    }

    /// Waits (at most `max`) until no connection is open.
    pub async fn drain(&self, max: Duration) {
        let until = Instant::now() + max;
        while self.stats.active.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn report(&self) -> SinkReport {
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let first = get(&s.first_conn_ns);
        let last = get(&s.last_msg_ns);
        let elapsed = if first > 0 && last > first {
            (last - first) as f64 / 1e9
        } else {
            0.0
        };
        let messages = get(&s.messages);
        let bytes = get(&s.bytes);
        let per = |n: u64| {
            if elapsed > 0.0 {
                n as f64 / elapsed
            } else {
                0.0
            }
        };
        SinkReport {
            tool: "smtp-load-sink".into(),
            listen: self.addr.to_string(),
            connections: get(&s.connections),
            peak_connections: get(&s.peak_active),
            messages,
            rcpts: get(&s.rcpts),
            rcpts_unknown: get(&s.rcpts_unknown),
            bytes,
            tls_handshakes: get(&s.tls_handshakes),
            errors: get(&s.errors),
            elapsed_s: elapsed,
            msgs_per_sec: per(messages),
            bytes_per_sec: per(bytes),
        }
    }

    /// Stops accepting (open connections finish on their own).
    pub fn stop(&self) {
        self.accept.abort();
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let _ = sock.set_nodelay(true);
                let s = &ctx.stats;
                s.connections.fetch_add(1, Ordering::Relaxed);
                let open = s.active.fetch_add(1, Ordering::Relaxed) + 1;
                s.peak_active.fetch_max(open, Ordering::Relaxed);
                let _ = s.first_conn_ns.compare_exchange(
                    0,
                    s.ns(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if connection(sock, &ctx).await.is_err() {
                        ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            // Out of fds and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn connection(sock: TcpStream, ctx: &Ctx) -> io::Result<()> {
    let mut buf = vec![0u8; ctx.cfg.read_buf.max(MAX_LINE * 2)];
    match session(sock, ctx, &mut buf, false).await? {
        End::Closed => Ok(()),
        End::StartTls(sock) => {
            let Some(acc) = &ctx.acceptor else {
                return Ok(());
            };
            let tls = match timeout(
                ctx.cfg.idle_timeout.min(Duration::from_secs(30)),
                acc.accept(sock),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            };
            ctx.stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
            match session(tls, ctx, &mut buf, true).await? {
                End::Closed | End::StartTls(_) => Ok(()),
            }
        }
    }
}

enum End<S> {
    Closed,
    StartTls(S),
}

/// What a command line asks the session to do after the replies are sent.
#[derive(PartialEq, Eq)]
enum After {
    Continue,
    Data,
    Quit,
    StartTls,
}

#[derive(Default)]
struct Txn {
    mail: bool,
    rcpts: u64,
}

/// One SMTP session on a plain or TLS stream. Replies to everything a read
/// brought are collected and written at once.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    ctx: &Ctx,
    buf: &mut [u8],
    tls: bool,
) -> io::Result<End<S>> {
    let stats = &ctx.stats;
    let mut out: Vec<u8> = Vec::with_capacity(512);
    if !tls {
        out.extend_from_slice(&ctx.greeting);
    }
    let (mut start, mut end) = (0usize, 0usize);
    let mut txn = Txn::default();
    let mut in_data = false;
    let mut scan_state = 0u8;
    let mut data_len = 0u64;
    let mut skipping = false;
    let mut after = After::Continue;
    loop {
        while start < end && after == After::Continue {
            let avail = &buf[start..end];
            if in_data {
                match scan_end(&mut scan_state, avail) {
                    Some(n) => {
                        data_len += n as u64;
                        start += n;
                        in_data = false;
                        stats
                            .bytes
                            .fetch_add(data_len.saturating_sub(3), Ordering::Relaxed);
                        let m = stats.messages.fetch_add(1, Ordering::Relaxed) + 1;
                        stats.last_msg_ns.store(stats.ns(), Ordering::Relaxed);
                        if ctx.cfg.max_messages == Some(m) {
                            ctx.reached.notify_one();
                        }
                        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                        txn = Txn::default();
                    }
                    None => {
                        data_len += avail.len() as u64;
                        start = end;
                    }
                }
                continue;
            }
            let Some(nl) = memchr::memchr(b'\n', avail) else {
                if skipping {
                    start = end;
                }
                break;
            };
            let mut line = &avail[..nl];
            start += nl + 1;
            if skipping {
                skipping = false;
                continue;
            }
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if line.len() > MAX_LINE {
                out.extend_from_slice(b"500 5.5.2 Error: line too long\r\n");
                continue;
            }
            after = command(line, ctx, tls, &mut txn, &mut out);
            if after == After::Data {
                after = After::Continue;
                in_data = true;
                scan_state = 2;
                data_len = 0;
            }
        }
        if !out.is_empty() {
            write(&mut s, &out, ctx).await?;
            out.clear();
        }
        match after {
            After::Continue | After::Data => {}
            After::Quit => {
                let _ = s.shutdown().await;
                return Ok(End::Closed);
            }
            // Whatever was pipelined after STARTTLS is dropped.
            After::StartTls => return Ok(End::StartTls(s)),
        }
        if start == end {
            start = 0;
            end = 0;
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        // A command line too long: refuse it and skip to its end.
        if !in_data && end - start > MAX_LINE {
            write(&mut s, b"500 5.5.2 Error: line too long\r\n", ctx).await?;
            skipping = true;
            start = 0;
            end = 0;
        }
        let n = match timeout(ctx.cfg.idle_timeout, s.read(&mut buf[end..])).await {
            Ok(r) => r?,
            Err(_) => {
                let _ = write(&mut s, b"421 4.4.2 Timeout\r\n", ctx).await;
                return Err(io::ErrorKind::TimedOut.into());
            }
        };
        if n == 0 {
            return Ok(End::Closed);
        }
        end += n;
    }
}

async fn write<S: AsyncWrite + Unpin>(s: &mut S, data: &[u8], ctx: &Ctx) -> io::Result<()> {
    match timeout(ctx.cfg.idle_timeout, async {
        s.write_all(data).await?;
        s.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

fn verb(line: &[u8]) -> [u8; 4] {
    let mut v = [b' '; 4];
    for (i, b) in line.iter().take(4).enumerate() {
        v[i] = b.to_ascii_uppercase();
    }
    v
}

/// Answers one command line (appending to `out`).
fn command(line: &[u8], ctx: &Ctx, tls: bool, txn: &mut Txn, out: &mut Vec<u8>) -> After {
    match &verb(line) {
        b"MAIL" => {
            if txn.mail {
                out.extend_from_slice(b"503 5.5.1 Error: nested MAIL command\r\n");
            } else {
                txn.mail = true;
                txn.rcpts = 0;
                out.extend_from_slice(b"250 2.1.0 Ok\r\n");
            }
        }
        b"RCPT" => {
            if txn.mail {
                ctx.stats.rcpts.fetch_add(1, Ordering::Relaxed);
                match ctx
                    .cfg
                    .unknown_prefix
                    .as_deref()
                    .and_then(|p| unknown(line, p))
                {
                    Some(addr) => {
                        ctx.stats.rcpts_unknown.fetch_add(1, Ordering::Relaxed);
                        out.extend_from_slice(b"550 5.1.1 <");
                        out.extend_from_slice(addr);
                        out.extend_from_slice(b">: Recipient address rejected: User unknown\r\n");
                    }
                    None => {
                        txn.rcpts += 1;
                        out.extend_from_slice(b"250 2.1.5 Ok\r\n");
                    }
                }
            } else {
                out.extend_from_slice(b"503 5.5.1 Error: need MAIL command\r\n");
            }
        }
        b"DATA" => {
            if !txn.mail {
                out.extend_from_slice(b"503 5.5.1 Error: need MAIL command\r\n");
            } else if txn.rcpts == 0 {
                out.extend_from_slice(b"554 5.5.1 Error: no valid recipients\r\n");
            } else {
                out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                return After::Data;
            }
        }
        b"EHLO" => {
            *txn = Txn::default();
            out.extend_from_slice(if tls { &ctx.ehlo_tls } else { &ctx.ehlo_plain });
        }
        b"HELO" => {
            *txn = Txn::default();
            out.extend_from_slice(&ctx.helo);
        }
        b"RSET" => {
            *txn = Txn::default();
            out.extend_from_slice(b"250 2.0.0 Ok\r\n");
        }
        b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
        b"QUIT" => {
            out.extend_from_slice(b"221 2.0.0 Bye\r\n");
            return After::Quit;
        }
        b"XFOR" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
        b"XCLI" => {
            *txn = Txn::default();
            out.extend_from_slice(&ctx.greeting);
        }
        b"STAR" if ctx.acceptor.is_some() && !tls => {
            out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
            return After::StartTls;
        }
        b"VRFY" => out.extend_from_slice(b"252 2.0.0 Send some mail, I'll try my best\r\n"),
        _ => out.extend_from_slice(b"502 5.5.2 Error: command not recognized\r\n"),
    }
    After::Continue
}

/// The address of a `RCPT TO:<addr>` line when it starts with `prefix`
/// (ASCII case ignored).
fn unknown<'a>(line: &'a [u8], prefix: &str) -> Option<&'a [u8]> {
    let open = memchr::memchr(b'<', line)?;
    let rest = &line[open + 1..];
    let addr = &rest[..memchr::memchr(b'>', rest).unwrap_or(rest.len())];
    let p = prefix.as_bytes();
    (addr.len() >= p.len() && addr[..p.len()].eq_ignore_ascii_case(p)).then_some(addr)
}

/// Finds the end of DATA across reads. `state` is how many bytes of
/// `\r\n.\r\n` the data seen so far ends with (2 at the start of DATA: the
/// CRLF ending the DATA command line counts). Returns the number of bytes of
/// `data` up to and including the terminator, or `None` (state updated).
pub fn scan_end(state: &mut u8, data: &[u8]) -> Option<usize> {
    let k = (*state as usize).min(4);
    if k > 0 {
        // A terminator that starts in the carried prefix ends within the
        // first four new bytes.
        let take = data.len().min(4);
        let mut tmp = [0u8; 8];
        tmp[..k].copy_from_slice(&END[..k]);
        tmp[k..k + take].copy_from_slice(&data[..take]);
        if let Some(p) = END_FINDER.find(&tmp[..k + take]) {
            *state = 0;
            return Some(p + END.len() - k);
        }
    }
    if let Some(p) = END_FINDER.find(data) {
        *state = 0;
        return Some(p + END.len());
    }
    // The longest suffix of (prefix + data) that is a proper prefix of END.
    let mut tail = [0u8; 8];
    let tail = if data.len() >= 4 {
        &data[data.len() - 4..]
    } else {
        tail[..k].copy_from_slice(&END[..k]);
        tail[k..k + data.len()].copy_from_slice(data);
        let n = k + data.len();
        &tail[n.saturating_sub(4)..n]
    };
    *state = (1..=tail.len().min(4))
        .rev()
        .find(|&l| tail[tail.len() - l..] == END[..l])
        .unwrap_or(0) as u8;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `msg` in pieces split at `cuts` and returns where the end was found.
    fn feed(msg: &[u8], cuts: &[usize]) -> Option<usize> {
        let mut state = 2u8;
        let mut pos = 0;
        let mut bounds = cuts.to_vec();
        bounds.push(msg.len());
        for &b in &bounds {
            if let Some(n) = scan_end(&mut state, &msg[pos..b]) {
                return Some(pos + n);
            }
            pos = b;
        }
        None
    }

    #[test]
    fn finds_end_across_every_split() {
        let msgs: [&[u8]; 5] = [
            b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
            b".\r\nQUIT\r\n",
            b"a\r\n..\r\n.x\r\n\r\r\n.\r\n",
            b"\r\n\r\n.\r\n",
            b"line\r\n.\r\r\n.\r\n",
        ];
        for m in msgs {
            let want = feed(m, &[]).expect("end found");
            assert_eq!(&m[want - 3..want], b".\r\n");
            for i in 0..=m.len() {
                assert_eq!(
                    feed(m, &[i]),
                    Some(want),
                    "{:?} cut {i}",
                    String::from_utf8_lossy(m)
                );
                for j in i..=m.len() {
                    assert_eq!(feed(m, &[i, j]), Some(want));
                }
            }
        }
        for m in [&b"no end\r\n.x\r\n"[..], b"\r\n..\r\n", b"x.\r\n"] {
            for i in 0..=m.len() {
                assert_eq!(feed(m, &[i]), None);
            }
        }
        // Byte by byte.
        let m = b"abc\r\n.\r\n";
        let cuts: Vec<usize> = (1..m.len()).collect();
        assert_eq!(feed(m, &cuts), Some(m.len()));
    }
}
