//! One client session: the inbound state machine that drives the sans-IO
//! `smtp` core over a plain or TLS stream, and backends transactions through
//! `relay::Txn` with pipelining. Admission (who may connect) is the
//! server's; this is what happens after.
//!
//! This file owns what every part shares: `Shared`, `Listener`, the
//! session's state (`State`, `Owed`, `Chunking`), `handle`, the run loop and
//! `resolve` (the backend replies owed to the client). Its parts add their
//! own `impl Session` blocks: `commands.rs` (the command lines and their
//! answers), `data.rs` (DATA and what message data shares with BDAT),
//! `bdat.rs` (CHUNKING), `tls.rs` (implicit TLS and STARTTLS's handshake),
//! `route.rs` (recipients routed by domain: the transaction begun at the
//! first RCPT), `span.rs` (the session and transaction spans).
//!
//! # Pipelining
//! MAIL and RCPT are queued on the `Txn` and, when the backend offers
//! PIPELINING, answered later (each an `Owed` entry); DATA rides in the same
//! batch as the RCPTs still owed a reply. Every other command first calls
//! `resolve`, which reads the owed backend replies and writes them to the
//! client in command order. When every RCPT is settled and one was
//! accepted, DATA gets its 354 at once (`Txn::send_data_command`,
//! `State.data_early`) and the DATA phase reads the backend's DATA reply
//! (`Txn::data_reply`) before sending a single message byte; a refusal
//! there becomes the reply after the client's final dot.
//!
//! # Per session, per HELO, per message
//! The `Received:` header's prefix is built once per HELO
//! (`State.received`), its date at most once per second per thread; the
//! backend's `ClientIdentity` at the first MAIL after each HELO. The TLS
//! path and the rarer or larger futures (BDAT, `Backends::begin`, policy
//! lookups) are boxed: an idle connection holds the task's future (the
//! command loop `run` inline in it) and the box it points to (`Begun`:
//! the session), which a unit test keeps small. The DATA phase and
//! `resolve`'s replies are awaited inline (a few hundred bytes per idle
//! connection against two allocations per message: loadtest/README.md,
//! "Performance notes for developers").

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{field, warn, Instrument, Span};

use crate::config::{Config, TlsMode};
use crate::policy::{ClientPolicy, Policy, Verdict};
use crate::relay::client::ClientIdentity;
use crate::relay::pool::PooledConn;
use crate::relay::{Backends, Txn};
use crate::smtp::reply::write_reply;
use crate::smtp::{self, Answered, BareLineEndings, ChunkChecker, Reply, Stuffer};
use crate::timer::{Limit, Pace};

mod bdat;
mod commands;
mod data;
mod inbuf;
mod route;
mod span;
mod tls;

use span::record_verdict;
pub use span::{record_refusal, session_span};

/// What every session shares: configuration, backends, TLS, shutdown signal.
pub struct Shared {
    pub cfg: Arc<Config>,
    /// The current backends: a reload of `[[backend]]` swaps it, and each
    /// new transaction takes the current one (a session keeps the rest of
    /// its `Shared`).
    pub backends: Arc<arc_swap::ArcSwap<Backends>>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub policy: Arc<Policy>,
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
    /// Who is sending (`/top`), kept across reloads.
    pub top: Arc<crate::telemetry::top::Top>,
    pub shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// The backends new transactions go to.
    pub fn backends(&self) -> Arc<Backends> {
        self.backends.load_full()
    }
}

/// The listener a session came in on.
#[derive(Debug, Clone, Copy)]
pub struct Listener {
    pub tls: TlsMode,
    pub require_tls: bool,
}

/// Serves one accepted connection to its end: the whole of its task.
/// `pol` is the client's admission state, from `Policy::admit`.
/// `peer` is the client; `destination` the address it connected to when a
/// PROXY header said so (else the socket's own address). `held` is
/// dropped when the session ends (the server's graceful stop waits until
/// every session's is).
///
/// The task's future is this one, not an `async` block of the server's
/// around it, and it holds one pointer: the session lives in a box of its
/// own (`Begun`). Each poll of a session walks down its nested futures,
/// and with 400 sessions each level's state is a cache line that other
/// sessions' work evicted since (loadtest/RESULTS.md sections 30-31 and
/// 33); with the session inline, this future's state byte sat 2 KiB past
/// tokio's task header, on a line of its own, and now sits beside it.
#[allow(clippy::too_many_arguments)]
pub fn handle<G: Send + 'static>(
    stream: TcpStream,
    peer: SocketAddr,
    destination: Option<SocketAddr>,
    shared: Arc<Shared>,
    listener: Listener,
    pol: ClientPolicy,
    span: Span,
    held: G,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let end = SessionEnd::begin(&shared, held);
    let client = Admitted {
        pol,
        top: shared.top.open(peer.ip()),
    };
    let _ = stream.set_nodelay(true);
    let local_addr = destination.map_or_else(|| stream.local_addr(), Ok);
    if let Ok(a) = &local_addr {
        span.record("server.address", field::display(a.ip()));
        span.record("server.port", i64::from(a.port()));
    }
    let local = local_addr
        .map(|a| a.ip())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let at = Endpoints { peer, local };
    let start = match (listener.tls, shared.tls.clone()) {
        (TlsMode::Implicit, Some(acceptor)) => Start::Tls {
            io: stream,
            acceptor,
            client,
            shared,
            at,
            listener,
        },
        _ => Start::Plain(Session::new(stream, at, shared, listener, None, client)),
    };
    let begun = Box::new(Begun { start, _end: end });
    begun.serve().instrument(span)
}

/// A session as its task holds it, in one allocation.
struct Begun<G> {
    start: Start,
    _end: SessionEnd<G>,
}

/// How the connection begins: SMTP at once, or a TLS handshake first.
/// The session inline on purpose: the whole lives in `Begun`'s box.
#[allow(clippy::large_enum_variant)]
enum Start {
    Plain(Session<TcpStream>),
    Tls {
        io: TcpStream,
        acceptor: tokio_rustls::TlsAcceptor,
        client: Admitted,
        shared: Arc<Shared>,
        at: Endpoints,
        listener: Listener,
    },
    Taken,
}

impl<G> Begun<G> {
    async fn serve(mut self: Box<Self>) {
        // Nothing but the box lives across an await here: the state byte
        // follows its pointer.
        if let Start::Plain(s) = &mut self.start {
            if !s.greet().await {
                return;
            }
            // Inline, not boxed: the command loop's state follows this
            // future's state byte, on the lines after tokio's header, with
            // no pointer to another allocation between them (RESULTS.md
            // section 34). It lives as long as the session anyway.
            match s.run().await {
                Outcome::StartTls => {}
                _ => return s.finish().await,
            }
        }
        if let Some(next) = self.hand_over() {
            next.await;
        }
    }

    /// The rest of a session that goes on over TLS (implicit TLS, or
    /// STARTTLS given), boxed and built here: none of it (the session
    /// moved out) is held in the task's future.
    fn hand_over(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        match std::mem::replace(&mut self.start, Start::Taken) {
            Start::Tls {
                io,
                acceptor,
                client,
                shared,
                at,
                listener,
            } => Some(Box::pin(
                shared.serve_tls(io, acceptor, at, listener, true, client),
            )),
            Start::Plain(s) => Some(Box::pin(s.start_tls())),
            Start::Taken => None,
        }
    }
}

impl Session<TcpStream> {
    /// After STARTTLS's 220: the handshake and a fresh session over TLS
    /// (the client must EHLO again, RFC 3207).
    async fn start_tls(self) {
        let Session {
            io,
            st,
            pol,
            top,
            shared,
            listener,
            peer,
            local,
            ..
        } = self;
        let at = Endpoints { peer, local };
        if let Some(c) = st.dedicated {
            Box::pin(c.quit()).await;
        }
        if let Some(acceptor) = shared.tls.clone() {
            let client = Admitted { pol, top };
            Box::pin(shared.serve_tls(io, acceptor, at, listener, false, client)).await;
        }
    }
}

/// A session's count in the metrics, from its start to its end however
/// it ends, and what the server asked it to hold till then.
struct SessionEnd<G> {
    metrics: Arc<crate::telemetry::metrics::Metrics>,
    t0: std::time::Instant,
    _held: G,
}

impl<G> SessionEnd<G> {
    fn begin(shared: &Shared, held: G) -> SessionEnd<G> {
        let m = shared.metrics.clone();
        m.connections_accepted.inc();
        m.sessions_active.inc();
        SessionEnd {
            metrics: m,
            t0: std::time::Instant::now(),
            _held: held,
        }
    }
}

impl<G> Drop for SessionEnd<G> {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.session_duration.observe(self.t0.elapsed().as_secs_f64());
        m.sessions_active.dec();
    }
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
    /// A MAIL the edge already answered (routes: the transaction begins at
    /// its first RCPT): its reply is not the client's; a refusal becomes
    /// the reply of the RCPTs sent with it (`route.rs`).
    DeferredMail,
    Rcpt,
    Data,
}

/// SMTP state; reset by STARTTLS.
#[derive(Default)]
struct State {
    /// The size the last MAIL declared (`SIZE=`), 0 without one: a message
    /// larger than a pooled buffer is read 64 KiB at a time from its start.
    size_declared: u64,
    helo: Option<String>,
    esmtp: bool,
    /// MAIL was given (accepted, or still owed a reply); SMTPUTF8 flag.
    mail: Option<bool>,
    from: String,
    /// The edge answered MAIL itself: the transaction (and its route)
    /// begins at the first RCPT (`[[route]]`s configured). Boxed: the
    /// session future stays small.
    routed: Option<Box<route::RoutedMail>>,
    /// RCPTs given (relayed, or refused by the edge's routes).
    rcpts_sent: usize,
    rcpts_ok: usize,
    txn: Option<Txn>,
    txn_span: Option<Span>,
    txn_started: Option<crate::timer::Stamp>,
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
    /// The set of backends of the last transaction (`Txn::end`), for the
    /// next one's `Backends::begin_now`: its reference count, which every
    /// core shares, is then written per session, not per message.
    held: Option<Arc<Backends>>,
    messages: u64,
    /// A BDAT transaction in progress (boxed: most sessions never use it).
    chunking: Option<Box<Chunking>>,
    /// DATA was given in this transaction: BDAT is refused (RFC 3030).
    data_seen: bool,
}

/// What admission gives a session: its view of the policy (slots held)
/// and its place in `/top`; both travel through STARTTLS.
pub struct Admitted {
    pub pol: ClientPolicy,
    pub top: crate::telemetry::top::Open,
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
    /// This session's entries in `/top`.
    top: crate::telemetry::top::Open,
    /// `timeouts.data_block` as a `Duration`, converted once per session
    /// (a session keeps the config it began with).
    data_block: std::time::Duration,
    /// A connect verdict owed as the reply to the first command
    /// (delay_reject off, the greeting had already begun).
    refuse: Option<Box<Verdict>>,
    /// An error budget went over (the address is banned): the 421 that
    /// ends the session after the current command. Boxed: the session
    /// future stays small.
    over_budget: Option<Box<Verdict>>,
    shared: Arc<Shared>,
    listener: Listener,
    tls: Option<TlsInfo>,
    inbuf: BytesMut,
    /// The command line being handled, copied out of `inbuf`.
    line: Vec<u8>,
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
    /// The wait for shutdown that idle reads race (`read_more`): made at
    /// the first one and kept, so the session stays in the shutdown
    /// signal's waiter list instead of joining and leaving it (and
    /// touching its neighbours in that list) at every message.
    shutdown_wait: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>,
    /// `shutdown_wait` was polled and is in the waiter list with this
    /// task's waker (a session never leaves its task): until the watch
    /// changes, polling it again would change nothing (`read_more`).
    shutdown_waiting: bool,
    /// The client hung up while the session waited for the backend.
    client_gone: bool,
    /// The command loop's own state, kept here rather than in its future
    /// so that future's state byte sits at its start (RESULTS.md section
    /// 33).
    cmd: CommandWait,
}

/// The wait for a command line (`Session::run`).
#[derive(Default)]
struct CommandWait {
    /// `timeouts.command`, converted once per session (`Session::new`).
    timeout: Duration,
    /// The command timeout bounds the wait for a whole command line, not
    /// each read: a client dribbling a byte at a time (slowloris) does
    /// not extend it. None: a new wait, whose deadline is set when its
    /// read first blocks (no clock read while commands are waiting in
    /// the socket already).
    deadline: Option<tokio::time::Instant>,
    /// Input buffered before the last lines were processed.
    before: usize,
}

/// A session ending action decided while handling a command.
enum Step {
    Continue,
    Quit,
    Close,
    StartTls,
}

/// One BDAT transaction, from the first chunk that passed the transaction
/// checks to RSET or the LAST chunk (boxed in `State.chunking`). Part of
/// the session's state, here; `bdat.rs` builds and drives it.
struct Chunking {
    checker: ChunkChecker,
    mode: BareLineEndings,
    /// The backend was told (DATA answered 354, or a BDAT sent): the
    /// transaction can no longer end with RSET on that connection.
    started: bool,
    /// Some when the backend takes DATA: the content is stuffed.
    stuffer: Option<Stuffer>,
    /// Replies the backend owes for chunks relayed as BDAT.
    owed: usize,
    /// The transaction failed: every later BDAT gets this reply.
    failed: Option<Reply>,
    /// Bytes on their way to the backend (BDAT line + content, or wire form).
    wire: Vec<u8>,
    /// The minimum data rate over the whole transaction's chunks.
    pace: Option<Pace>,
    /// Octets of chunks dropped after the transaction failed.
    skipped: u64,
}

impl Chunking {
    /// The backend is inside this transaction's content: dropping its
    /// connection is the only clean way out.
    fn started(&self) -> bool {
        self.started
    }

    /// How long the wait for the next command (the next BDAT) may last
    /// under the transaction's minimum data rate: the time between chunks
    /// counts too, or a client could send `BDAT 1` just inside every
    /// command timeout. `left` when no minimum applies; None when the
    /// allowance has run out.
    fn between_chunks(&self, left: Duration) -> Option<Duration> {
        data_wait(&self.pace, self.checker.size() + self.skipped, left)
    }

    /// Counts a wait for the client between chunks.
    fn waited(&mut self, d: Duration) {
        if let Some(p) = self.pace.as_mut() {
            p.waited(d);
        }
    }
}

/// How long the next read of message data may wait: `block`, or less when
/// the minimum data rate's allowance (`limits.min_data_rate`) runs out
/// first; None when it has.
fn data_wait(pace: &Option<Pace>, received: u64, block: Duration) -> Option<Duration> {
    match pace {
        Some(p) => p.wait(received, block),
        None => Some(block),
    }
}

const CMD_TIMEOUT_REPLY: (u16, &str, &str) = (421, "4.4.2", "Timeout exceeded, closing connection");

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

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(
        io: S,
        at: Endpoints,
        shared: Arc<Shared>,
        listener: Listener,
        tls: Option<TlsInfo>,
        client: Admitted,
    ) -> Self {
        let Admitted { pol, top } = client;
        let shutdown = shared.shutdown.clone();
        let data_block = std::time::Duration::from_secs_f64(shared.cfg.timeouts.data_block);
        let command_timeout = shared.cfg.timeouts.command;
        Session {
            io,
            peer: at.peer,
            local: at.local,
            pol,
            top,
            data_block,
            refuse: None,
            over_budget: None,
            shared,
            listener,
            tls,
            // Lent by the first read (inbuf.rs).
            inbuf: BytesMut::new(),
            line: Vec::with_capacity(64),
            out: Vec::with_capacity(512),
            fwd: smtp::Segments::default(),
            chunk_buf: Vec::new(),
            read_timer: crate::timer::ReadTimer::new(),
            replies: Vec::new(),
            st: State::default(),
            shutdown,
            shutdown_wait: None,
            shutdown_waiting: false,
            client_gone: false,
            cmd: CommandWait {
                timeout: Duration::from_secs_f64(command_timeout),
                ..CommandWait::default()
            },
        }
    }

    fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    /// Whether the server is shutting down. Asked once per message: the
    /// version check is one atomic load, and the value (behind the watch's
    /// lock, a line every core would write) is read only once the version
    /// moved; the sender only ever sends `true`.
    fn shutting_down(&self) -> bool {
        self.shutdown.has_changed().unwrap_or(false) && *self.shutdown.borrow()
    }

    fn reply(&mut self, code: u16, enh: &str, text: &str) {
        let text = crate::telemetry::own_text(code, text);
        write_reply(&mut self.out, code, enh, &text);
    }

    fn bad(&mut self, code: u16, enh: &str, text: &str) {
        self.count_bad();
        self.reply(code, enh, text);
    }

    /// An enforced verdict, now the client's reply: on the span (its
    /// trace kept) and in `/top` under its check's name.
    fn verdict_given(&self, code: u16, v: &Verdict) {
        record_verdict(&Span::current(), code, v);
        self.top.refusal(v.check.name());
    }

    /// A bad command: counted for `max_bad_commands` and against the
    /// `bad_commands` budget.
    fn count_bad(&mut self) {
        self.st.bad += 1;
        self.top.refusal("bad_command");
        if let Some(v) = self.pol.bad_command() {
            self.over_budget.get_or_insert(Box::new(v));
        }
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
            match tokio::time::timeout(
                pause,
                inbuf::read(&mut self.io, &mut self.inbuf, inbuf::room_for_commands),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => self.pol.pregreet_hit(),
                Err(_) => {}
            }
        }
        if !self.pol.delay_reject() && (started || self.pol.greeting_waits()) {
            if let Some(v) = Box::pin(self.pol.connect_verdict()).await {
                if started {
                    self.refuse = Some(Box::new(v));
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
        self.verdict_given(code, v);
        self.reply(code, enh, &v.text);
    }

    /// An enforced policy verdict as the reply to the current command
    /// (after the tarpit pause); it counts as an error.
    async fn policy_reply(&mut self, v: &Verdict) {
        self.tarpit().await;
        self.verdict_given(v.code, v);
        // An error for max_bad_commands, not a bad command for the budget.
        self.st.bad += 1;
        self.reply(v.code, v.enh, &v.text);
    }

    /// Ends the session: the transaction in progress (if any) is given up
    /// cleanly, a dedicated backend connection gets QUIT.
    async fn finish(&mut self) {
        // Its input buffer to the next session (a new connection per
        // message would otherwise allocate and grow one for each).
        self.inbuf.clear();
        inbuf::give_back(&mut self.inbuf);
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
            if let Some(c) = txn.end(&mut self.st.held) {
                self.st.dedicated = Some(c);
            }
        }
        self.st.mail = None;
        self.st.from.clear();
        self.st.routed = None;
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
        // Read into the session's own vector, taken out only after the
        // await: a local moved across it would put this future's state
        // byte behind the transaction's read (RESULTS.md section 33).
        txn.replies(&mut self.replies).await;
        let broken = txn.is_broken();
        let mut replies = std::mem::take(&mut self.replies);
        let mut mail_failed = false;
        let mut desync = false;
        // A deferred MAIL the backend refused, and whether a RCPT carried it.
        let mut refused_mail: Option<(Reply, bool)> = None;
        for mut reply in replies.drain(..) {
            let owed = self.st.owed.pop_front();
            // A backend's reply without an enhanced code gets one (a
            // check, no allocation: Postfix's replies carry theirs).
            reply.ensure_enhanced(match owed {
                Some(Owed::Mail | Owed::DeferredMail) => Answered::Mail,
                Some(Owed::Rcpt) => Answered::Rcpt,
                _ => Answered::Data,
            });
            match owed {
                Some(Owed::DeferredMail) => {
                    if !reply.is_positive() {
                        refused_mail = Some((reply, false));
                    }
                    continue;
                }
                Some(Owed::Rcpt) if refused_mail.is_some() => {
                    // The client had 250 for MAIL: each RCPT of the batch
                    // hears why the backend refused the transaction.
                    if let Some((r, carried)) = &mut refused_mail {
                        r.write_to(&mut self.out);
                        *carried = true;
                    }
                    continue;
                }
                Some(Owed::Mail) => mail_failed |= !reply.is_positive(),
                Some(Owed::Rcpt) if reply.is_positive() => self.st.rcpts_ok += 1,
                Some(Owed::Rcpt) => {
                    self.top.refusal("recipient_refused");
                    if let Some(v) = self.pol.rcpt_refused(&reply) {
                        self.over_budget.get_or_insert(Box::new(v));
                    }
                }
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
        if let Some((r, carried)) = refused_mail {
            return self.drop_refused_txn(r, carried, broken || desync);
        }
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

    async fn read_more(&mut self, limit: Limit, watch_shutdown: bool) -> Result<usize, ReadErr> {
        // The read goes first below (`biased`): a read that is ready at once
        // leaves the shutdown future (its box, the watch's waiter list)
        // untouched; `shutting_down` instead sees a shutdown signalled
        // meanwhile, so a client that always has more to send still hears it.
        if watch_shutdown && self.shutting_down() {
            self.shutdown_wait = None;
            self.shutdown_waiting = false;
            return Err(ReadErr::Shutdown);
        }
        let read = self.read_timer.within(
            limit,
            inbuf::read(&mut self.io, &mut self.inbuf, inbuf::room_for_commands),
        );
        if watch_shutdown {
            let shutdown = &self.shutdown;
            let sd = self.shutdown_wait.get_or_insert_with(|| {
                let mut rx = shutdown.clone();
                Box::pin(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
            });
            let waiting = &mut self.shutdown_waiting;
            let mut read = std::pin::pin!(read);
            let r = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(map_read(r));
                }
                // Left alone while it waits with this task's waker and the
                // watch is unchanged (one atomic load): a signal (or the
                // sender gone) wakes the task, and then it is polled.
                if !(*waiting && matches!(shutdown.has_changed(), Ok(false))) {
                    if sd.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(ReadErr::Shutdown));
                    }
                    *waiting = true;
                }
                Poll::Pending
            })
            .await;
            if let Err(ReadErr::Shutdown) = r {
                // Finished: never polled again.
                self.shutdown_wait = None;
                self.shutdown_waiting = false;
            }
            r
        } else {
            map_read(read.await)
        }
    }

    async fn run(&mut self) -> Outcome {
        loop {
            self.cmd.before = self.inbuf.len();
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
                    // The TLS session gets a buffer of its own.
                    inbuf::give_back(&mut self.inbuf);
                    return Outcome::StartTls;
                }
            }
            if self.st.data_go {
                self.st.data_go = false;
                if !self.flush().await {
                    return Outcome::Closed;
                }
                // The final reply is written before any other await: it
                // is not kept in this future (whose state byte would move
                // past it).
                let delivered = match self.data_phase().await {
                    Ok(reply) => {
                        reply.write_to(&mut self.out);
                        true
                    }
                    Err(()) => false,
                };
                if !delivered {
                    self.flush().await;
                    return Outcome::Closed;
                }
                self.cmd.deadline = None;
                self.st.messages += 1;
                self.top.message();
                self.end_txn();
                if self.shutting_down() {
                    self.reply(421, "4.3.2", "Service shutting down, closing connection");
                    self.flush().await;
                    return Outcome::Closed;
                }
                continue;
            }
            self.resolve().await;
            if self.st.data_go {
                continue;
            }
            if let Some(v) = self.over_budget.take() {
                // A budget went over in those replies: the address is
                // banned; this session ends now.
                self.verdict_given(v.code, &v);
                self.reply(v.code, v.enh, &v.text);
                self.flush().await;
                return Outcome::Closed;
            }
            if !self.flush().await {
                return Outcome::Closed;
            }
            let idle = self.st.mail.is_none();
            if !self.st.skipping_line
                && (self.inbuf.is_empty() || self.inbuf.len() < self.cmd.before)
            {
                // A command was taken, or none is begun: a new wait starts.
                self.cmd.deadline = None;
            }
            let mut limit = Limit::or_until(self.cmd.timeout, self.cmd.deadline);
            // Inside a BDAT transaction the minimum data rate bounds the
            // wait for the next chunk's command as well.
            let mut paced = false;
            if let Some(ch) = self.st.chunking.as_ref() {
                let left = limit.left();
                match ch.between_chunks(left) {
                    Some(w) => {
                        paced = w < left;
                        limit = Limit::For(w);
                    }
                    None => {
                        self.too_slow();
                        self.flush().await;
                        return Outcome::Closed;
                    }
                }
            }
            let read = self.read_more(limit, idle).await;
            let blocked = self.read_timer.blocked();
            if let (Some(ch), Some(b)) = (self.st.chunking.as_mut(), blocked) {
                ch.waited(b.since.elapsed());
            }
            if self.cmd.deadline.is_none() {
                // A new wait's deadline, from when its read first blocked.
                self.cmd.deadline = blocked.map(|b| b.since + self.cmd.timeout);
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
}

#[cfg(test)]
mod size_probe {
    /// Every idle connection holds one session: keep it small (the TLS
    /// path is boxed; the command loop is inline in the task's future).
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
            let metrics = std::sync::Arc::new(crate::telemetry::metrics::Metrics::new());
            let relay = crate::relay::Backends::new(&cfg, &metrics).unwrap();
            let backends = std::sync::Arc::new(arc_swap::ArcSwap::new(relay));
            let (_tx, rx) = tokio::sync::watch::channel(false);
            let policy = crate::policy::Policy::new(&cfg.policy, &cfg.hostname).unwrap();
            let pol = policy.admit(a.ip()).unwrap();
            let shared = std::sync::Arc::new(super::Shared {
                cfg: std::sync::Arc::new(cfg),
                backends,
                tls: None,
                policy,
                metrics,
                top: std::sync::Arc::new(crate::telemetry::top::Top::new(10, 24, 64)),
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
                (),
            );
            // What an idle connection holds: the task's future (with the
            // command loop in it) and the box it points to (`Begun`, the
            // session).
            let n = size(&f);
            let b = std::mem::size_of::<super::Begun<()>>();
            assert!(n + b <= 4096, "session grew to {n} + {b} bytes");
            // The task's own future holds the box, its state byte and
            // what it awaits (the greeting, then the command loop): no
            // session in it, so that state byte sits by tokio's header
            // (RESULTS.md sections 33 and 34). 1 160 bytes in a release
            // build, 1 200 in a debug one.
            assert!(n <= 1536, "the task's future grew to {n} bytes");
            // The box as the server makes it (holding the accept loop's
            // `done` sender): 1 272 bytes, in mimalloc's 1 280-byte class;
            // past it, the next class (1 536) costs every connection 256
            // bytes (a 16-byte field did once: RESULTS.md section 35).
            let boxed = std::mem::size_of::<super::Begun<tokio::sync::mpsc::Sender<()>>>();
            assert!(boxed <= 1280, "the session's box grew to {boxed} bytes");
        });
    }
}
