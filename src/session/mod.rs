//! One client session: the inbound state machine that drives the sans-IO
//! `smtp` core over a plain or TLS stream, answers EHLO/HELO/STARTTLS itself,
//! relays transactions through `relay::Txn` with pipelining, and streams DATA
//! (BDAT: `session/bdat.rs`).
//! Admission (who may connect) is the server's; this is what happens after.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{field, info, warn, Instrument, Span};

use crate::config::{Config, TlsMode};
use crate::policy::{ClientPolicy, Policy, Verdict};
use crate::relay::client::ClientIdentity;
use crate::relay::pool::PooledConn;
use crate::relay::{Relay, Txn};
use crate::smtp::reply::write_reply;
use crate::smtp::{self, BareLineEndings, Command, DataOptions, DataScanner, Reply, Scan};
use crate::timer::Pace;

mod bdat;

/// What every session shares: configuration, backends, TLS, shutdown signal.
pub struct Shared {
    pub cfg: Arc<Config>,
    /// The current backends: a reload of `[[backend]]` swaps it, and each
    /// new transaction takes the current one (a session keeps the rest of
    /// its `Shared`).
    pub relays: Arc<arc_swap::ArcSwap<Relay>>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub policy: Arc<Policy>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// The backends new transactions go to.
    pub fn relay(&self) -> Arc<Relay> {
        self.relays.load_full()
    }
}

/// The listener a session came in on.
#[derive(Debug, Clone, Copy)]
pub struct Listener {
    pub tls: TlsMode,
    pub require_tls: bool,
}

/// Serves one accepted connection to its end.
/// `pol` is the client's admission state, from `Policy::admit`.
/// The root span of one client connection (`smtp.session`), made at accept
/// so the admission's DNS lookups and a refusal belong to it.
/// `via` is the load balancer's address when the client's came in a PROXY
/// protocol header (`network.peer.*`, the socket's other end).
pub fn session_span(peer: SocketAddr, via: Option<SocketAddr>) -> Span {
    let span = crate::span!(
        crate::telemetry::sample_session(),
        "smtp.session",
        "otel.kind" = "server",
        "client.address" = %peer.ip(),
        // Integers as i64: tracing-opentelemetry formats a u64 (or u16)
        // into a string attribute, an allocation per field.
        "client.port" = i64::from(peer.port()),
        "server.address" = field::Empty,
        "server.port" = field::Empty,
        "network.transport" = "tcp",
        "network.peer.address" = field::Empty,
        "network.peer.port" = field::Empty,
        "smtp.helo" = field::Empty,
        "tls.protocol.version" = field::Empty,
        "tls.cipher" = field::Empty,
        "smtp.policy.check" = field::Empty,
        "smtp.policy.action" = field::Empty,
        "error.type" = field::Empty,
        "otel.status_code" = field::Empty,
        trace_id = field::Empty,
    );
    if let Some(v) = via {
        span.record("network.peer.address", field::display(v.ip()));
        span.record("network.peer.port", i64::from(v.port()));
    }
    // The trace id in every log line of the session (when traced).
    if let Some(id) = crate::telemetry::trace_id(&span) {
        span.record("trace_id", id);
    }
    span
}

/// Marks a session refused by the policy at accept (for tail sampling).
pub fn record_refusal(span: &Span, v: &Verdict) {
    record_verdict(span, v.at_connect().0, v);
}

/// An enforced policy verdict, answered with `code`, on the session span:
/// the check, the action (`reject` for a 5xx, `defer` for a 4xx) and an
/// error status, so that the collector's tail sampling keeps the session
/// (the last verdict wins).
fn record_verdict(span: &Span, code: u16, v: &Verdict) {
    let action = if code >= 500 { "reject" } else { "defer" };
    span.record("smtp.policy.check", v.check.name());
    span.record("smtp.policy.action", action);
    span.record("error.type", "refused");
    span.record("otel.status_code", "ERROR");
}

/// `peer` is the client; `destination` the address it connected to when a
/// PROXY header said so (else the socket's own address).
pub async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    destination: Option<SocketAddr>,
    shared: Arc<Shared>,
    listener: Listener,
    pol: ClientPolicy,
    span: Span,
) {
    async move {
        let _ = stream.set_nodelay(true);
        let local_addr = destination.map_or_else(|| stream.local_addr(), Ok);
        if let Ok(a) = &local_addr {
            Span::current().record("server.address", field::display(a.ip()));
            Span::current().record("server.port", i64::from(a.port()));
        }
        let local = local_addr
            .map(|a| a.ip())
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let at = Endpoints { peer, local };
        match (listener.tls, shared.tls.clone()) {
            (TlsMode::Implicit, Some(acceptor)) => {
                Box::pin(serve_tls(stream, acceptor, at, shared, listener, true, pol)).await;
            }
            _ => {
                let mut s = Session::new(stream, at, shared.clone(), listener, None, pol);
                if !s.greet().await {
                    return;
                }
                // Boxed: the session future is held by every idle
                // connection; the command loop's state lives on the heap.
                if let Outcome::StartTls = Box::pin(s.run()).await {
                    let Session { io, st, pol, .. } = s;
                    if let Some(c) = st.dedicated {
                        Box::pin(c.quit()).await;
                    }
                    if let Some(acceptor) = shared.tls.clone() {
                        // Fresh state: the client must EHLO again (RFC 3207).
                        Box::pin(serve_tls(io, acceptor, at, shared, listener, false, pol)).await;
                    }
                } else {
                    s.finish().await;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// TLS handshake (implicit TLS, or after STARTTLS), then a session on the
/// encrypted stream with fresh state; `greet` for implicit TLS only.
async fn serve_tls(
    io: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    at: Endpoints,
    shared: Arc<Shared>,
    listener: Listener,
    greet: bool,
    pol: ClientPolicy,
) {
    let handshake_timeout = Duration::from_secs_f64(shared.cfg.timeouts.tls_handshake);
    let m = shared.metrics.clone();
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
    let mut s = Session::new(tls, at, shared, listener, Some(info), pol);
    if greet && !s.greet().await {
        return;
    }
    // STARTTLS inside TLS is refused, so this run ends the session.
    s.run().await;
    s.finish().await;
}

fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_else(|| "unknown".into());
    TlsInfo { version, cipher }
}

/// What was negotiated, for the Received header and logs.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: &'static str,
    pub cipher: String,
}

impl std::fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.version, self.cipher)
    }
}

enum Outcome {
    Quit,
    Closed,
    StartTls,
}

/// A reply the backend owes the client, in order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owed {
    Mail,
    Rcpt,
    Data,
}

/// SMTP state; reset by STARTTLS.
#[derive(Default)]
struct State {
    helo: Option<String>,
    esmtp: bool,
    /// MAIL was given (accepted, or still owed a reply); SMTPUTF8 flag.
    mail: Option<bool>,
    from: String,
    rcpts_sent: usize,
    rcpts_ok: usize,
    txn: Option<Txn>,
    txn_span: Option<Span>,
    txn_started: Option<std::time::Instant>,
    owed: VecDeque<Owed>,
    /// DATA got its 354: read the message next.
    data_go: bool,
    /// The client got 354 before the backend answered DATA; the DATA
    /// phase reads that answer before sending any message byte.
    data_early: bool,
    /// The backend was lost after it accepted MAIL: until RSET, every RCPT
    /// and DATA gets 451 (never a 5xx the sender could bounce on).
    lost: bool,
    /// The last MAIL was refused: the RCPT and DATA a pipelining client
    /// sent with it get 503 without counting as errors (RFC 2920).
    mail_refused: bool,
    bad: u32,
    /// Junk commands (NOOP, RSET, VRFY, HELP, EHLO/HELO) since the last
    /// message, and `messages` when that count was started.
    junk: u32,
    junk_since: u64,
    skipping_line: bool,
    /// The client's identity for the backend, built at the first MAIL after
    /// each HELO (it caches its encoded XFORWARD lines).
    ident: Option<Box<ClientIdentity>>,
    /// The first part of the Received header (all but the date), built
    /// once per HELO.
    received: Vec<u8>,
    dedicated: Option<PooledConn>,
    messages: u64,
    /// A BDAT transaction in progress (boxed: most sessions never use it).
    chunking: Option<Box<bdat::Chunking>>,
    /// DATA was given in this transaction: BDAT is refused (RFC 3030).
    data_seen: bool,
}

/// The two ends of the client connection.
#[derive(Debug, Clone, Copy)]
struct Endpoints {
    peer: SocketAddr,
    local: std::net::IpAddr,
}

struct Session<S> {
    io: S,
    peer: SocketAddr,
    local: std::net::IpAddr,
    pol: ClientPolicy,
    /// A connect verdict owed as the reply to the first command
    /// (delay_reject off, the greeting had already begun).
    refuse: Option<Verdict>,
    shared: Arc<Shared>,
    listener: Listener,
    tls: Option<TlsInfo>,
    inbuf: BytesMut,
    out: Vec<u8>,
    /// Message bytes on their way to the backend; kept across messages.
    fwd: smtp::Segments,
    /// Checked BDAT content on its way to the backend; kept across chunks.
    chunk_buf: Vec<u8>,
    /// The deadline of the client's reads (commands and DATA).
    read_timer: crate::timer::ReadTimer,
    /// Backend replies being resolved; kept across messages.
    replies: Vec<crate::smtp::Reply>,
    st: State,
    shutdown: watch::Receiver<bool>,
    /// The client hung up while the session waited for the backend.
    client_gone: bool,
}

/// A session ending action decided while handling a command.
enum Step {
    Continue,
    Quit,
    Close,
    StartTls,
}

/// The end of a transaction on its span: recipients and size when the
/// message was sent, the final reply (an error status for 4xx and 5xx).
/// One `record_all` (one pass through every layer) instead of a `record`
/// per field: this runs once per message.
fn record_end(span: &Span, sent: Option<(usize, u64)>, reply: &Reply) {
    let Some(meta) = span.metadata() else {
        return;
    };
    let fields = meta.fields();
    let (Some(rcpts_f), Some(size_f), Some(code_f), Some(enh_f), Some(err_f), Some(status_f)) = (
        fields.field("smtp.rcpt.count"),
        fields.field("smtp.message.size"),
        fields.field("smtp.reply.code"),
        fields.field("smtp.reply.enhanced_code"),
        fields.field("error.type"),
        fields.field("otel.status_code"),
    ) else {
        return;
    };
    // Integers as i64 and texts as `str`: tracing-opentelemetry formats
    // a u64 or a `display` value into a new `String` (an allocation and
    // the formatting machinery per field, per message).
    let (rcpts, size) = sent.unzip();
    let rcpts = rcpts.map(|n| n as i64);
    let size = size.map(|n| n.min(i64::MAX as u64) as i64);
    let code = i64::from(reply.code);
    let mut enh_buf = [0u8; 17];
    let enhanced = reply.enhanced.map(|e| e.text(&mut enh_buf));
    let mut code_buf = [0u8; 5];
    let code_str = smtp::reply::code_text(reply.code, &mut code_buf);
    let failed = reply.code >= 400;
    let values: [(&field::Field, Option<&dyn field::Value>); 6] = [
        (&rcpts_f, rcpts.as_ref().map(|v| v as &dyn field::Value)),
        (&size_f, size.as_ref().map(|v| v as &dyn field::Value)),
        (&code_f, Some(&code as &dyn field::Value)),
        (&enh_f, enhanced.as_ref().map(|v| v as &dyn field::Value)),
        // error.type is a string (semantic conventions): the reply code.
        (&err_f, failed.then_some(&code_str as &dyn field::Value)),
        (&status_f, failed.then_some(&"ERROR" as &dyn field::Value)),
    ];
    span.record_all(&fields.value_set(&values));
}

/// 552 for a message (or a BDAT chunk) over `max_message_size`.
fn too_big_reply() -> Reply {
    crate::telemetry::own(Reply::new(
        552,
        smtp::EnhancedCode(5, 3, 4),
        "Message size exceeds fixed maximum message size",
    ))
}

/// The refusal of content with a bare CR / LF (Reject mode) or a line
/// over `max_line`, if any.
fn content_refusal(bare_refused: bool, long: bool, max_line: usize) -> Option<Reply> {
    if bare_refused {
        Some(crate::telemetry::own(Reply::new(
            550,
            smtp::EnhancedCode(5, 5, 2),
            "Message contains bare CR or LF line endings (SMTP smuggling defence); use CRLF",
        )))
    } else if long {
        Some(crate::telemetry::own(Reply::new(
            550,
            smtp::EnhancedCode(5, 6, 0),
            format!("Message contains a line longer than {max_line} octets"),
        )))
    } else {
        None
    }
}

/// Room to read more command input into: grown in 4 KiB steps only when
/// less than 512 octets are free.
fn room_for_commands(inbuf: &mut BytesMut) {
    if inbuf.capacity() - inbuf.len() < 512 {
        inbuf.reserve(4096);
    }
}

/// Most pipelined input kept while waiting for a backend connection.
const WAIT_INPUT_LIMIT: usize = 16 * 1024;

/// Awaits `fut` (a wait in line for a backend connection) while reading the
/// client: what it pipelines is kept in `inbuf` (up to a limit), and its
/// hanging up gives None, dropping `fut` and so its place in line.
async fn while_client_stays<S: AsyncRead + Unpin, T>(
    io: &mut S,
    inbuf: &mut BytesMut,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    loop {
        if inbuf.len() >= WAIT_INPUT_LIMIT {
            return Some(fut.await);
        }
        room_for_commands(inbuf);
        tokio::select! {
            biased;
            r = &mut fut => return Some(r),
            n = io.read_buf(inbuf) => match n {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
        }
    }
}

const CMD_TIMEOUT_REPLY: (u16, &str, &str) = (421, "4.4.2", "Timeout exceeded, closing connection");

/// How long the next read of message data may wait: `block`, or less when
/// the minimum data rate's allowance (`limits.min_data_rate`) runs out
/// first; None when it has.
fn data_wait(pace: &Option<Pace>, received: u64, block: Duration) -> Option<Duration> {
    match pace {
        Some(p) => p.wait(received, block),
        None => Some(block),
    }
}

/// How a read of message data ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataRead {
    More,
    /// The client closed or the read failed.
    Gone,
    /// Nothing within `data_block`.
    Timeout,
    /// The minimum data rate's allowance ran out.
    TooSlow,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(
        io: S,
        at: Endpoints,
        shared: Arc<Shared>,
        listener: Listener,
        tls: Option<TlsInfo>,
        pol: ClientPolicy,
    ) -> Self {
        let shutdown = shared.shutdown.clone();
        Session {
            io,
            peer: at.peer,
            local: at.local,
            pol,
            refuse: None,
            shared,
            listener,
            tls,
            inbuf: BytesMut::with_capacity(1024),
            out: Vec::with_capacity(512),
            fwd: smtp::Segments::default(),
            chunk_buf: Vec::new(),
            read_timer: crate::timer::ReadTimer::new(),
            replies: Vec::new(),
            st: State::default(),
            shutdown,
            client_gone: false,
        }
    }

    fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    fn reply(&mut self, code: u16, enh: &str, text: &str) {
        let text = crate::telemetry::own_text(code, text);
        write_reply(&mut self.out, code, enh, &text);
    }

    fn bad(&mut self, code: u16, enh: &str, text: &str) {
        self.st.bad += 1;
        self.reply(code, enh, text);
    }

    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let ok = self.io.write_all(&self.out).await.is_ok() && self.io.flush().await.is_ok();
        self.out.clear();
        ok
    }

    /// Sends the greeting, after the pregreet pause and (delay_reject off)
    /// the connect verdict; false when the session ends here.
    async fn greet(&mut self) -> bool {
        let mut started = false;
        if let Some(pause) = self.pol.pregreet_delay() {
            let line = format!("220-{} ESMTP\r\n", self.cfg().hostname);
            self.out.extend_from_slice(line.as_bytes());
            if !self.flush().await {
                return false;
            }
            started = true;
            match tokio::time::timeout(pause, self.io.read_buf(&mut self.inbuf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => self.pol.pregreet_hit(),
                Err(_) => {}
            }
        }
        if !self.pol.delay_reject() && (started || self.pol.greeting_waits()) {
            if let Some(v) = Box::pin(self.pol.connect_verdict()).await {
                if started {
                    self.refuse = Some(v);
                } else {
                    self.connect_refusal(&v).await;
                    self.flush().await;
                    return false;
                }
            }
        }
        let line = format!("220 {} ESMTP\r\n", self.cfg().hostname);
        self.out.extend_from_slice(line.as_bytes());
        self.flush().await
    }

    async fn tarpit(&self) {
        let pause = self.pol.policy().tarpit();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }

    /// A connect-phase verdict as the session's last reply (554 or 421),
    /// after the tarpit pause; the caller closes.
    async fn connect_refusal(&mut self, v: &Verdict) {
        self.tarpit().await;
        let (code, enh) = v.at_connect();
        // The current span is the session's: its future is instrumented.
        record_verdict(&Span::current(), code, v);
        self.reply(code, enh, &v.text);
    }

    /// An enforced policy verdict as the reply to the current command
    /// (after the tarpit pause); it counts as an error.
    async fn policy_reply(&mut self, v: &Verdict) {
        self.tarpit().await;
        record_verdict(&Span::current(), v.code, v);
        self.bad(v.code, v.enh, &v.text);
    }

    /// Ends the session: the transaction in progress (if any) is given up
    /// cleanly, a dedicated backend connection gets QUIT.
    async fn finish(&mut self) {
        self.end_txn();
        if let Some(c) = self.st.dedicated.take() {
            Box::pin(c.quit()).await;
        }
    }

    /// Forgets the transaction; its backend connection goes back to the
    /// pool (with RSET pending) or to the session when dedicated.
    fn end_txn(&mut self) {
        // A backend inside BDAT content (or the DATA it became) cannot
        // take RSET: drop its connection.
        if self.st.chunking.take().is_some_and(|c| c.started()) {
            if let Some(t) = self.st.txn.take() {
                t.abort();
            }
        }
        self.st.data_seen = false;
        if let Some(txn) = self.st.txn.take() {
            if let Some(c) = txn.end() {
                self.st.dedicated = Some(c);
            }
        }
        self.st.mail = None;
        self.st.from.clear();
        self.st.rcpts_sent = 0;
        self.st.rcpts_ok = 0;
        self.st.owed.clear();
        self.st.data_go = false;
        self.st.data_early = false;
        self.st.lost = false;
        self.st.txn_span = None;
        self.st.txn_started = None;
    }

    /// Collects the backend replies owed to the client, in order, and
    /// updates the state they decide.
    async fn resolve(&mut self) {
        if self.st.owed.is_empty() {
            return;
        }
        let Some(txn) = self.st.txn.as_mut() else {
            self.st.owed.clear();
            return;
        };
        let mut replies = std::mem::take(&mut self.replies);
        Box::pin(txn.replies(&mut replies)).await;
        let broken = txn.is_broken();
        let mut mail_failed = false;
        let mut desync = false;
        for reply in replies.drain(..) {
            match self.st.owed.pop_front() {
                Some(Owed::Mail) => mail_failed |= !reply.is_positive(),
                Some(Owed::Rcpt) if reply.is_positive() => self.st.rcpts_ok += 1,
                Some(Owed::Rcpt) => {}
                Some(Owed::Data) if reply.code == 354 && self.st.rcpts_ok == 0 => {
                    // A backend that opens DATA with no recipient accepted
                    // would deliver to nobody: refuse it here and drop the
                    // connection, which is now inside DATA.
                    desync = true;
                    write_reply(&mut self.out, 554, "5.5.1", "No valid recipients");
                    continue;
                }
                Some(Owed::Data) => self.st.data_go = reply.code == 354 && !broken,
                None => {}
            }
            reply.write_to(&mut self.out);
        }
        self.replies = replies;
        self.st.owed.clear();
        if desync && !broken {
            if let Some(t) = self.st.txn.take() {
                t.abort();
            }
            self.end_txn();
            return;
        }
        if broken {
            if let Some(t) = self.st.txn.take() {
                t.abort();
            }
        }
        if mail_failed {
            self.end_txn();
            self.st.mail_refused = true;
        } else if broken {
            self.st.lost = true;
            self.st.data_go = false;
        }
    }

    async fn read_more(
        &mut self,
        timeout: Duration,
        watch_shutdown: bool,
    ) -> Result<usize, ReadErr> {
        room_for_commands(&mut self.inbuf);
        let read = self
            .read_timer
            .within(timeout, self.io.read_buf(&mut self.inbuf));
        if watch_shutdown {
            let mut sd = self.shutdown.clone();
            tokio::select! {
                r = read => map_read(r),
                _ = async { let _ = sd.wait_for(|v| *v).await; } => Err(ReadErr::Shutdown),
            }
        } else {
            map_read(read.await)
        }
    }

    async fn run(&mut self) -> Outcome {
        let cmd_timeout = Duration::from_secs_f64(self.cfg().timeouts.command);
        // The command timeout bounds the wait for a whole command line, not
        // each read: a client dribbling a byte at a time (slowloris) does
        // not extend it.
        let mut cmd_deadline = tokio::time::Instant::now() + cmd_timeout;
        loop {
            let before = self.inbuf.len();
            match self.process_lines().await {
                Step::Continue => {}
                Step::Quit => {
                    self.flush().await;
                    return Outcome::Quit;
                }
                Step::Close => {
                    self.flush().await;
                    return Outcome::Closed;
                }
                Step::StartTls => {
                    self.flush().await;
                    if !self.inbuf.is_empty() {
                        warn!(
                            bytes = self.inbuf.len(),
                            "discarding plaintext sent after STARTTLS"
                        );
                    }
                    self.inbuf.clear();
                    return Outcome::StartTls;
                }
            }
            if self.st.data_go {
                self.st.data_go = false;
                if !self.flush().await {
                    return Outcome::Closed;
                }
                match Box::pin(self.data_phase()).await {
                    Ok(reply) => {
                        reply.write_to(&mut self.out);
                        cmd_deadline = tokio::time::Instant::now() + cmd_timeout;
                        self.st.messages += 1;
                        self.end_txn();
                        if *self.shutdown.borrow() {
                            self.reply(421, "4.3.2", "Service shutting down, closing connection");
                            self.flush().await;
                            return Outcome::Closed;
                        }
                    }
                    Err(()) => {
                        self.flush().await;
                        return Outcome::Closed;
                    }
                }
                continue;
            }
            self.resolve().await;
            if self.st.data_go {
                continue;
            }
            if !self.flush().await {
                return Outcome::Closed;
            }
            let idle = self.st.mail.is_none();
            let now = tokio::time::Instant::now();
            if !self.st.skipping_line && (self.inbuf.is_empty() || self.inbuf.len() < before) {
                // A command was taken, or none is begun: a new wait starts.
                cmd_deadline = now + cmd_timeout;
            }
            let mut left = cmd_deadline.saturating_duration_since(now);
            // Inside a BDAT transaction the minimum data rate bounds the
            // wait for the next chunk's command as well.
            let mut paced = false;
            if let Some(ch) = self.st.chunking.as_ref() {
                match ch.between_chunks(left) {
                    Some(w) => {
                        paced = w < left;
                        left = w;
                    }
                    None => {
                        self.too_slow();
                        self.flush().await;
                        return Outcome::Closed;
                    }
                }
            }
            let read = self.read_more(left, idle).await;
            if let Some(ch) = self.st.chunking.as_mut() {
                ch.waited(now.elapsed());
            }
            match read {
                Ok(0) | Err(ReadErr::Io) => return Outcome::Closed,
                Ok(_) => {}
                Err(ReadErr::Timeout) if paced => {
                    self.too_slow();
                    self.flush().await;
                    return Outcome::Closed;
                }
                Err(ReadErr::Timeout) => {
                    let (c, e, t) = CMD_TIMEOUT_REPLY;
                    self.reply(c, e, t);
                    self.flush().await;
                    return Outcome::Closed;
                }
                Err(ReadErr::Shutdown) => {
                    self.reply(421, "4.3.2", "Service shutting down, closing connection");
                    self.flush().await;
                    return Outcome::Closed;
                }
            }
        }
    }

    /// Handles every complete command line in the input buffer.
    async fn process_lines(&mut self) -> Step {
        let max_line = self.cfg().limits.max_command_line;
        loop {
            if self.st.data_go {
                return Step::Continue;
            }
            let Some(nl) = memchr::memchr(b'\n', &self.inbuf) else {
                if self.inbuf.len() > max_line {
                    // Too long and still no end: drop what we have, skip
                    // the rest of the line.
                    self.inbuf.clear();
                    if !self.st.skipping_line {
                        self.st.skipping_line = true;
                        self.resolve().await;
                        self.bad(500, "5.5.6", "Line too long");
                    }
                }
                return self.check_bad();
            };
            let line = self.inbuf.split_to(nl + 1);
            if std::mem::take(&mut self.st.skipping_line) {
                continue;
            }
            if line.len() > max_line {
                self.resolve().await;
                self.bad(500, "5.5.6", "Line too long");
            } else {
                let step = self.command(&line[..nl]).await;
                if self.client_gone {
                    return Step::Close;
                }
                if !matches!(step, Step::Continue) {
                    return step;
                }
            }
            if let Step::Close = self.check_bad() {
                return Step::Close;
            }
        }
    }

    fn check_bad(&mut self) -> Step {
        if self.st.bad > self.cfg().limits.max_bad_commands {
            self.reply(421, "4.7.0", "Too many errors, closing connection");
            return Step::Close;
        }
        Step::Continue
    }

    async fn command(&mut self, line: &[u8]) -> Step {
        let cmd = match smtp::command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                self.resolve().await;
                self.st.bad += 1;
                e.write_reply(&mut self.out);
                return Step::Continue;
            }
        };
        // Relayed commands queue without waiting; every other reply must
        // come after the backend replies still owed.
        if !matches!(
            cmd,
            Command::Mail { .. } | Command::Rcpt { .. } | Command::Data
        ) {
            self.resolve().await;
        }
        if let Some(v) = self.refuse.take() {
            self.resolve().await;
            self.connect_refusal(&v).await;
            return Step::Close;
        }
        if self.junk_over(&cmd) {
            self.reply(
                421,
                "4.7.0",
                "Too many commands without a message, closing connection",
            );
            return Step::Close;
        }
        match cmd {
            Command::Ehlo(name) | Command::Helo(name) => {
                let esmtp = matches!(cmd, Command::Ehlo(_));
                self.end_txn();
                // The name the client gave, accepted or refused.
                Span::current().record("smtp.helo", name);
                if let Some(v) = Box::pin(self.pol.helo(name, self.local)).await {
                    if self.pol.delay_reject() {
                        self.pol.hold_helo(v);
                    } else {
                        self.st.helo = None;
                        self.policy_reply(&v).await;
                        return Step::Continue;
                    }
                }
                // A dedicated (XCLIENT) backend connection carries the old
                // identity: let it go.
                if let Some(c) = self.st.dedicated.take() {
                    tokio::spawn(c.quit());
                }
                self.st.helo = Some(name.to_string());
                self.st.ident = None;
                self.st.received.clear();
                self.st.esmtp = esmtp;
                if esmtp {
                    self.ehlo_reply();
                } else {
                    let line = format!("250 {}\r\n", self.cfg().hostname);
                    self.out.extend_from_slice(line.as_bytes());
                }
            }
            Command::Mail { from, params } => self.mail(from, params).await,
            Command::Rcpt { to } => self.rcpt(to).await,
            Command::Data if self.st.chunking.is_some() => self.bad(
                503,
                "5.5.1",
                "DATA not allowed after BDAT in one transaction",
            ),
            Command::Data => {
                self.st.data_seen = self.st.mail.is_some();
                self.data_cmd().await
            }
            // Boxed: it reads and relays a whole chunk.
            Command::Bdat { size, last } => return Box::pin(self.bdat(size, last)).await,
            Command::Rset => {
                self.end_txn();
                self.st.mail_refused = false;
                self.reply(250, "2.0.0", "Ok");
            }
            Command::Noop => self.reply(250, "2.0.0", "Ok"),
            Command::Vrfy => self.reply(
                252,
                "2.0.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Command::Help => self.reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            ),
            Command::Quit => {
                self.end_txn();
                self.pol.release();
                self.reply(221, "2.0.0", "Bye");
                return Step::Quit;
            }
            Command::StartTls => {
                if self.tls.is_some() {
                    self.bad(503, "5.5.1", "TLS already active");
                } else if self.listener.tls != TlsMode::Starttls || self.shared.tls.is_none() {
                    self.bad(502, "5.5.1", "STARTTLS not available");
                } else if self.st.mail.is_some() {
                    self.bad(
                        503,
                        "5.5.1",
                        "STARTTLS not allowed during a mail transaction",
                    );
                } else {
                    self.reply(220, "2.0.0", "Ready to start TLS");
                    return Step::StartTls;
                }
            }
        }
        Step::Continue
    }

    /// Counts a junk command (one that moves no mail: NOOP, RSET, VRFY,
    /// HELP, EHLO/HELO); true past `max_junk_commands` since the last
    /// message, like Postfix's smtpd_junk_command_limit: a client looping
    /// on them holds a session (and a slot) without ever sending mail.
    fn junk_over(&mut self, cmd: &Command) -> bool {
        let max = self.cfg().limits.max_junk_commands;
        let junk = matches!(
            cmd,
            Command::Noop
                | Command::Rset
                | Command::Vrfy
                | Command::Help
                | Command::Ehlo(_)
                | Command::Helo(_)
        );
        if max == 0 || !junk {
            return false;
        }
        if self.st.junk_since != self.st.messages {
            self.st.junk_since = self.st.messages;
            self.st.junk = 0;
        }
        self.st.junk += 1;
        self.st.junk > max
    }

    fn ehlo_reply(&mut self) {
        let cfg = &self.shared.cfg;
        let starttls = self.tls.is_none()
            && self.listener.tls == TlsMode::Starttls
            && self.shared.tls.is_some();
        let mut s = format!(
            "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n",
            cfg.hostname, cfg.limits.max_message_size
        );
        if starttls {
            s.push_str("250-SMTPUTF8\r\n250 STARTTLS\r\n");
        } else {
            s.push_str("250 SMTPUTF8\r\n");
        }
        self.out.extend_from_slice(s.as_bytes());
    }

    /// 503 to RCPT or DATA without a MAIL; an error unless it follows a
    /// refused MAIL in the same pipeline.
    fn need_mail(&mut self) {
        if self.st.mail_refused {
            self.reply(503, "5.5.1", "Need MAIL command");
        } else {
            self.bad(503, "5.5.1", "Need MAIL command");
        }
    }

    async fn mail(&mut self, from: &str, params: smtp::MailParams) {
        self.st.mail_refused = true;
        if self.st.helo.is_none() {
            self.resolve().await;
            return self.bad(503, "5.5.1", "Send HELO/EHLO first");
        }
        if self.st.mail.is_some() {
            self.resolve().await;
            return self.bad(503, "5.5.1", "Nested MAIL command");
        }
        if self.listener.require_tls && self.tls.is_none() {
            return self.reply(530, "5.7.0", "Must issue a STARTTLS command first");
        }
        if self.pol.unsettled() {
            Box::pin(self.pol.connect_verdict()).await;
        }
        if let Some(v) = self.pol.mail() {
            self.resolve().await;
            return self.policy_reply(&v).await;
        }
        let max = self.cfg().limits.max_message_size;
        if params.size.is_some_and(|s| s > max) {
            return self.reply(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
        }
        let dedicated = self.st.dedicated.take();
        let (peer, pol, st) = (self.peer, &self.pol, &mut self.st);
        let id = st.ident.get_or_insert_with(|| {
            Box::new(ClientIdentity::new(
                peer,
                pol.rdns_name().map(str::to_string),
                st.helo.clone(),
                if st.esmtp { "ESMTP" } else { "SMTP" },
            ))
        });
        // MAIL to the final reply, the wait for a backend inside it.
        let span = crate::span!(
            crate::telemetry::in_traced(),
            "smtp.transaction",
            "smtp.mail_from.domain" = from.rsplit_once('@').map_or("", |(_, d)| d),
            "smtp.mail_from" = field::Empty,
            "smtp.rcpt.count" = field::Empty,
            "smtp.message.size" = field::Empty,
            "smtp.reply.code" = field::Empty,
            "smtp.reply.enhanced_code" = field::Empty,
            "smtp.chunking" = field::Empty,
            "server.address" = field::Empty,
            "error.type" = field::Empty,
            "otel.status_code" = field::Empty,
        );
        if self.shared.cfg.telemetry.record_addresses {
            span.record("smtp.mail_from", from);
        }
        // The wait for a backend connection may be long under a burst:
        // keep reading the client meanwhile, so one who hangs up gives up
        // its place in line at once. Boxed, as are the replies and the DATA
        // phase: inline, their futures made the command loop's future
        // (held by every idle connection) ~6 KB bigger in RSS (idle.sh:
        // 15.7 against 10.2 KB per idle connection); boxed, they cost
        // three allocations per message (tests/allocs.rs).
        let relay = self.shared.relay();
        let begin = relay.begin(id, dedicated).instrument(span.clone());
        let Some(begun) = Box::pin(while_client_stays(&mut self.io, &mut self.inbuf, begin)).await
        else {
            self.client_gone = true;
            return;
        };
        let mut txn = match begun {
            Ok(t) => t,
            Err(reply) => {
                record_end(&span, None, &reply);
                reply.write_to(&mut self.out);
                return;
            }
        };
        span.record("server.address", &*txn.name);
        txn.queue_mail(from, &params);
        self.st.txn_span = Some(span);
        self.st.txn_started = Some(std::time::Instant::now());
        self.st.mail = Some(params.smtputf8);
        self.st.mail_refused = false;
        self.st.from.clear();
        self.st.from.push_str(from);
        self.st.owed.push_back(Owed::Mail);
        let pipelining = txn.pipelining();
        self.st.txn = Some(txn);
        if !pipelining {
            self.resolve().await;
        }
    }

    async fn rcpt(&mut self, to: &str) {
        let Some(smtputf8) = self.st.mail else {
            self.resolve().await;
            return self.need_mail();
        };
        if self.st.lost {
            return crate::relay::backend_lost().write_to(&mut self.out);
        }
        if self.st.rcpts_sent >= self.cfg().limits.max_recipients {
            self.resolve().await;
            return self.reply(452, "4.5.3", "Too many recipients");
        }
        if !smtputf8 && !to.is_ascii() {
            self.resolve().await;
            return self.reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
        }
        if let Some(v) = self.pol.rcpt() {
            self.resolve().await;
            return self.policy_reply(&v).await;
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return self.reply(503, "5.5.1", "Need MAIL command");
        };
        txn.queue_rcpt(to);
        self.st.rcpts_sent += 1;
        self.st.owed.push_back(Owed::Rcpt);
        if !txn.pipelining() {
            self.resolve().await;
        }
    }

    /// DATA rides in the same batch as the RCPTs still owed a reply (the
    /// backend then judges whether any recipient was accepted).
    async fn data_cmd(&mut self) {
        if self.st.mail.is_none() {
            self.resolve().await;
            return self.need_mail();
        }
        if self.st.lost {
            return crate::relay::backend_lost().write_to(&mut self.out);
        }
        if self.st.rcpts_sent == 0 {
            self.resolve().await;
            return self.bad(503, "5.5.1", "Need RCPT command");
        }
        if self.st.owed.is_empty() && self.st.rcpts_ok == 0 {
            return self.reply(554, "5.5.1", "No valid recipients");
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return self.reply(503, "5.5.1", "Need MAIL command");
        };
        if self.st.owed.is_empty() && self.st.rcpts_ok > 0 {
            // Every recipient is settled and one was accepted: send DATA and
            // answer 354 without waiting for the backend, so the message
            // travels while the backend answers (one round trip less per
            // message). A backend refusal of DATA becomes the reply after
            // the final dot, and no byte of the message is sent to it.
            if !txn.send_data_command().await {
                self.st.lost = true;
                return crate::relay::backend_lost().write_to(&mut self.out);
            }
            self.reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>");
            self.st.data_go = true;
            self.st.data_early = true;
            return;
        }
        txn.queue_data();
        self.st.owed.push_back(Owed::Data);
        self.resolve().await;
    }

    /// The Received header: the part fixed for the session is built once
    /// per HELO, the date once per second per thread.
    fn received_header(&mut self, out: &mut Vec<u8>) {
        if self.st.received.is_empty() {
            let cfg = &self.shared.cfg;
            let helo = self.st.helo.as_deref().unwrap_or("unknown");
            let proto = match (self.st.esmtp, self.tls.is_some()) {
                (true, true) => "ESMTPS",
                (true, false) => "ESMTP",
                (false, true) => "SMTPS",
                (false, false) => "SMTP",
            };
            let mut h = format!(
                "Received: from {} ({} [{}])\r\n\tby {} (smtp-edge) with {}",
                sanitize(helo),
                self.pol.rdns_name().unwrap_or("unknown"),
                self.peer.ip(),
                cfg.hostname,
                proto
            );
            // Where Postfix puts its queue id: the session's trace id, so
            // a delivered message leads to its trace.
            if let Some(id) = crate::telemetry::trace_id(&Span::current()) {
                h.push_str(" id ");
                h.push_str(&id);
            }
            if let Some(t) = &self.tls {
                h.push_str(&format!(
                    "\r\n\t(using {} with cipher {})",
                    t.version, t.cipher
                ));
            }
            h.push_str(";\r\n\t");
            self.st.received = h.into_bytes();
        }
        out.extend_from_slice(&self.st.received);
        rfc5322_now(out);
        out.extend_from_slice(b"\r\n");
    }

    /// The minimum data rate's allowance for a message's data (DATA, a
    /// BDAT transaction, or a chunk dropped outside one).
    fn new_pace(&self) -> Option<Pace> {
        let cfg = &self.shared.cfg;
        Pace::new(
            Duration::from_secs_f64(cfg.timeouts.data_block),
            cfg.limits.min_data_rate as f64,
        )
    }

    /// Reads more message data (DATA or BDAT content) into `inbuf`, within
    /// `data_block` and the minimum data rate's allowance for `received`
    /// bytes; the wait is counted in `pace`.
    async fn read_data(&mut self, pace: &mut Option<Pace>, received: u64) -> DataRead {
        let block = Duration::from_secs_f64(self.shared.cfg.timeouts.data_block);
        let Some(wait) = data_wait(pace, received, block) else {
            return DataRead::TooSlow;
        };
        if self.inbuf.capacity() - self.inbuf.len() < 8192 {
            self.inbuf.reserve(64 * 1024);
        }
        let read = self.io.read_buf(&mut self.inbuf);
        // The clock only when a minimum rate needs it (every read of data).
        let t0 = pace.map(|_| tokio::time::Instant::now());
        let got = self.read_timer.within(wait, read).await;
        if let (Some(p), Some(t0)) = (pace.as_mut(), t0) {
            p.waited(t0.elapsed());
        }
        match got {
            Some(Ok(n)) if n > 0 => DataRead::More,
            Some(_) => DataRead::Gone,
            None if wait < block => DataRead::TooSlow,
            None => DataRead::Timeout,
        }
    }

    /// The end of a session inside a message's data (`what`: DATA or
    /// BDAT), after `read_data` did not get more: logged, or answered with
    /// a 421 (the caller drops the transaction).
    fn data_read_failed(&mut self, read: DataRead, what: &str) {
        match read {
            DataRead::More | DataRead::Gone => {
                info!("client disconnected during {what}; message discarded");
            }
            DataRead::Timeout => {
                let (c, e, t) = CMD_TIMEOUT_REPLY;
                self.reply(c, e, t);
            }
            DataRead::TooSlow => self.too_slow(),
        }
    }

    /// The client's message data came slower than `limits.min_data_rate`:
    /// 421 and close (the caller drops the transaction).
    fn too_slow(&mut self) {
        info!("message data slower than the minimum rate; connection closed");
        self.reply(421, "4.4.2", "Message data too slow, closing connection");
    }

    /// Reads the message after 354, streaming it to the backend; returns
    /// the final reply for the client, or Err when the session must end
    /// (client gone, or timeout, with the 421 already queued).
    async fn data_phase(&mut self) -> Result<Reply, ()> {
        let cfg = self.shared.cfg.clone();
        let mode: BareLineEndings = cfg.smtp.bare_line_endings.into();
        let mut scanner = DataScanner::new(DataOptions {
            bare_line_endings: mode,
            max_line: cfg.limits.max_text_line,
        });
        let mut pace = self.new_pace();
        let max_size = cfg.limits.max_message_size;
        let mut fwd = std::mem::take(&mut self.fwd);
        fwd.clear();
        fwd.push_literal(|out| self.received_header(out));
        let mut too_big = false;
        let mut backend_ok = true;
        let mut txn = self.st.txn.take();
        let mut backend_refusal = None;
        if std::mem::take(&mut self.st.data_early) {
            if let Some(t) = txn.as_mut() {
                let r = t.data_reply().await;
                if r.code != 354 {
                    // The backend is in command mode: read the client's
                    // message to its end and send nothing.
                    scanner.set_discard();
                    fwd.clear();
                    backend_refusal = Some(r);
                }
            }
        }
        loop {
            if !self.inbuf.is_empty() {
                let scan = scanner.feed_into(&self.inbuf, &mut fwd);
                let consumed = match scan {
                    Scan::More => self.inbuf.len(),
                    Scan::End { consumed } => consumed,
                };
                if !too_big && scanner.size() > max_size {
                    too_big = true;
                    scanner.set_discard();
                }
                let refused = too_big
                    || (mode == BareLineEndings::Reject && scanner.bare_line_ending_seen())
                    || scanner.long_line_seen();
                if backend_ok && !refused && backend_refusal.is_none() && !fwd.is_empty() {
                    if let Some(t) = txn.as_mut() {
                        // Straight from the input buffer: the message's
                        // bytes are not copied on their way through.
                        let mut bufs = fwd.io_slices(&self.inbuf);
                        if let Err(e) = t.send_data_vectored(&mut bufs).await {
                            warn!("backend failed during DATA: {e}");
                            backend_ok = false;
                        }
                    }
                }
                fwd.clear();
                self.inbuf.advance(consumed);
                if let Scan::End { .. } = scan {
                    break;
                }
            }
            let read = self.read_data(&mut pace, scanner.size()).await;
            if read == DataRead::More {
                continue;
            }
            // The session ends: drop the backend connection without the
            // final dot, so nothing partial is delivered.
            if let Some(t) = txn {
                t.abort();
            }
            self.end_txn();
            self.data_read_failed(read, "DATA");
            return Err(());
        }
        let size = scanner.size();
        let refusal = if let Some(r) = backend_refusal {
            // The backend refused DATA and stays in sync, unless it broke.
            if let Some(t) = txn.take() {
                if t.is_broken() {
                    t.abort();
                } else if let Some(c) = t.end() {
                    self.st.dedicated = Some(c);
                }
            }
            Some(r)
        } else if too_big {
            Some(too_big_reply())
        } else if let Some(r) = content_refusal(
            mode == BareLineEndings::Reject && scanner.bare_line_ending_seen(),
            scanner.long_line_seen(),
            cfg.limits.max_text_line,
        ) {
            Some(r)
        } else if !backend_ok {
            Some(crate::relay::backend_lost())
        } else {
            None
        };
        let reply = match (refusal, txn.as_mut()) {
            (Some(r), _) => {
                if let Some(t) = txn.take() {
                    t.abort();
                }
                r
            }
            (None, Some(t)) => t.finish_data().await,
            (None, None) => crate::relay::backend_lost(),
        };
        self.message_done(&reply, size);
        fwd.clear();
        self.fwd = fwd;
        self.st.txn = txn;
        Ok(reply)
    }
}

/// Keeps a client-supplied name printable in a header.
/// The current time as an RFC 5322 date (`Mon, 30 Nov 2026 05:00:00
/// +0000`), formatted at most once per second per thread.
fn rfc5322_now(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            d.1 = httpdate::fmt_http_date(now).replace(" GMT", " +0000");
            d.0 = secs;
        }
        out.extend_from_slice(d.1.as_bytes());
    });
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control()) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

enum ReadErr {
    Io,
    Timeout,
    Shutdown,
}

fn map_read(r: Option<std::io::Result<usize>>) -> Result<usize, ReadErr> {
    match r {
        Some(Ok(n)) => Ok(n),
        Some(Err(_)) => Err(ReadErr::Io),
        None => Err(ReadErr::Timeout),
    }
}

#[cfg(test)]
mod size_probe {
    /// Every idle connection holds one session future: keep it small (the
    /// TLS path and the command loop are boxed, once per session).
    #[test]
    fn session_future_stays_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            let s = tokio::net::TcpStream::connect(a).await.unwrap();
            let cfg = crate::config::Config::parse(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"127.0.0.1:9\"\n",
            )
            .unwrap();
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
            let relay = crate::relay::Relay::new(&cfg, &metrics).unwrap();
            let relays = std::sync::Arc::new(arc_swap::ArcSwap::new(relay));
            let (_tx, rx) = tokio::sync::watch::channel(false);
            let policy = crate::policy::Policy::new(&cfg.policy, &cfg.hostname).unwrap();
            let pol = policy.admit(a.ip()).unwrap();
            let shared = std::sync::Arc::new(super::Shared {
                cfg: std::sync::Arc::new(cfg),
                relays,
                tls: None,
                policy,
                metrics,
                shutdown: rx,
            });
            let listener = super::Listener {
                tls: crate::config::TlsMode::None,
                require_tls: false,
            };
            let f = super::handle(
                s,
                a,
                None,
                shared,
                listener,
                pol,
                super::session_span(a, None),
            );
            let n = size(&f);
            assert!(n <= 4096, "session future grew to {n} bytes");
        });
    }
}
