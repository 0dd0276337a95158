//! Test harness shared by the integration tests: free ports, real peers
//! (Postfix's smtp-sink, swaks) started on loopback, an in-process proxy,
//! a raw SMTP client, and a scripted recording backend for byte-exact and
//! fault assertions.
#![allow(dead_code)]
pub mod dns;
pub mod otlp;
pub mod redis;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use smtp_edge::config::Config;
use smtp_edge::server::Server;

/// True when running under CI (`CI=true`): missing tools are failures there.
pub fn ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Finds `tool` on PATH (and /usr/sbin). Under CI a missing tool panics;
/// elsewhere the caller skips with a message.
pub fn require_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/usr/bin", "/sbin"]) {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Some(p);
        }
    }
    if ci() {
        panic!("{tool} is required when CI=true (install it in .ci/run)");
    }
    eprintln!("SKIP: {tool} not installed");
    None
}

/// A loopback port nobody listens on right now, for a child process to bind.
///
/// Taken below the kernel's ephemeral range (32768-60999 on Linux), never
/// from it: a port the kernel handed out as free can be given to the very
/// next outgoing connection as its source port before the child binds it
/// (CI saw `Address already in use` that way). Ports are handed out in turn
/// from an offset that depends on the process, so parallel tests in one
/// binary never get the same one, and each is checked bindable.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000; // 20000..32000
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// Postfix's smtp-sink on a free loopback port, dumping each transaction
/// into its own file and logging the conversation (`-v`) to a file.
pub struct Sink {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    /// Where the transactions are dumped (`dir/dump` unless given).
    pub dump: PathBuf,
}

impl Sink {
    /// Starts smtp-sink with extra options (e.g. `["-r", "RCPT"]`). None when
    /// not installed (and not under CI).
    pub fn start(extra: &[&str]) -> Option<Sink> {
        Sink::start_on(&format!("127.0.0.1:{}", free_port()), extra)
    }

    /// The dumped transactions, oldest first (LF line endings, as smtp-sink
    /// writes them).
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dump)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files
            .iter()
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
            .collect()
    }

    /// Waits until `n` transactions were dumped (or the timeout passes).
    pub fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        loop {
            let m = self.messages();
            if m.len() >= n || Instant::now() > end {
                // Give a just-created dump file a moment to be completed.
                std::thread::sleep(Duration::from_millis(100));
                return self.messages();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The recipients of one dumped transaction (its `X-Rcpt-Args:` lines).
    pub fn rcpts(dump: &str) -> Vec<String> {
        dump.lines()
            .filter_map(|l| l.strip_prefix("X-Rcpt-Args: "))
            .map(|l| {
                l.trim()
                    .trim_start_matches("TO:")
                    .trim_matches(['<', '>'])
                    .to_string()
            })
            .collect()
    }

    /// The conversation log (`-v`): the commands smtp-sink received.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap_or_default()
    }

    /// The smtp-sink process id (to SIGSTOP it, say).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Blocks until something accepts on `addr` (5 s at most).
pub fn wait_port(addr: &str) {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr}");
}

/// The proxy running in-process on free loopback ports.
pub struct Proxy {
    /// First listener's address.
    pub addr: SocketAddr,
    pub addrs: Vec<SocketAddr>,
    pub backends: Arc<smtp_edge::relay::Backends>,
    pub policy: Arc<smtp_edge::policy::Policy>,
    pub metrics: Arc<smtp_edge::telemetry::metrics::Metrics>,
    /// What `/metrics` serves (the counters and the live values).
    pub stats: Arc<smtp_edge::server::live_stats::LiveStats>,
    /// The admin listener, when the config has `[admin]`.
    pub admin: Option<SocketAddr>,
    /// Reloads the policy as SIGHUP does (see `Proxy::reload`).
    pub reloader: smtp_edge::server::Reloader,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Scratch directory (Maildir backends, certificates) kept alive.
    pub dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the proxy on `toml`. In the text, `{DIR}` is replaced by a
    /// scratch directory; listeners should use port 0.
    pub async fn start(toml: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let text = toml.replace("{DIR}", &dir.path().display().to_string());
        let cfg =
            Config::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e:?}\n{text}"));
        let server = Server::bind(cfg).await.expect("bind");
        let addrs = server.local_addrs();
        let backends = server.backends();
        let policy = server.policy();
        let metrics = server.metrics();
        let stats = server.stats();
        let admin = server.admin_addr();
        let reloader = server.reload_handle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Proxy {
            addr: addrs[0],
            addrs,
            backends,
            policy,
            metrics,
            stats,
            admin,
            reloader,
            stop: Some(tx),
            task: Some(task),
            dir,
        }
    }

    /// A proxy with one plain listener relaying to `backend` (host:port),
    /// with extra TOML appended (e.g. a `[smtp]` table).
    pub async fn to_backend(backend: &str, extra: &str) -> Proxy {
        Proxy::start(&format!(
            "hostname = \"edge.test\"\n{extra}\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{backend}\"\n"
        ))
        .await
    }

    /// Reloads from `toml` (`{DIR}` replaced as in `start`), as SIGHUP does
    /// with a valid file; panics when the text is not a valid config.
    pub fn reload(&self, toml: &str) -> Result<(), String> {
        let text = toml.replace("{DIR}", &self.dir.path().display().to_string());
        let cfg =
            Config::parse(&text).unwrap_or_else(|e| panic!("reload config invalid: {e:?}\n{text}"));
        self.reloader.reload(&cfg)
    }

    /// Graceful stop (as SIGTERM does).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(40), t).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A raw SMTP client: send exact bytes, read whole replies.
pub struct Raw<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

/// One reply as the client saw it: code and the full text (all lines joined
/// with '\n', without codes).
#[derive(Debug, Clone)]
pub struct Seen {
    pub code: u16,
    pub text: String,
    pub raw: String,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects from a chosen loopback source address (127.0.0.0/8 gives
    /// the tests many distinct clients).
    pub async fn connect_from(src: std::net::IpAddr, addr: SocketAddr) -> Raw {
        let sock = match src {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .unwrap();
        sock.bind(SocketAddr::new(src, 0)).unwrap();
        let stream = sock.connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and reads the greeting.
    pub async fn greeted(addr: SocketAddr) -> Raw {
        let mut r = Raw::connect(addr).await;
        let g = r.reply().await;
        assert_eq!(g.code, 220, "{g:?}");
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    /// A client on an established stream (e.g. after a TLS handshake), with
    /// bytes already read from it.
    pub fn from_parts(stream: S, buf: Vec<u8>) -> Raw<S> {
        Raw { stream, buf }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        // A no-op on TCP; pushes the record out on TLS.
        self.stream.flush().await.unwrap();
    }

    /// Reads one whole reply (10 s at most). Panics on EOF.
    pub async fn reply(&mut self) -> Seen {
        self.try_reply(Duration::from_secs(10))
            .await
            .expect("reply")
    }

    /// One reply, or None on EOF / timeout.
    pub async fn try_reply(&mut self, t: Duration) -> Option<Seen> {
        let end = tokio::time::Instant::now() + t;
        loop {
            if let Some(s) = self.parse() {
                return Some(s);
            }
            let mut tmp = [0u8; 4096];
            let n = match tokio::time::timeout_at(end, self.stream.read(&mut tmp)).await {
                Ok(Ok(n)) => n,
                _ => return None,
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    fn parse(&mut self) -> Option<Seen> {
        let mut pos = 0;
        let mut text = Vec::new();
        loop {
            let nl = self.buf[pos..].iter().position(|&b| b == b'\n')? + pos;
            let line = String::from_utf8_lossy(&self.buf[pos..nl])
                .trim_end_matches('\r')
                .to_string();
            pos = nl + 1;
            let last = line.as_bytes().get(3) != Some(&b'-');
            text.push(line.get(4..).unwrap_or("").to_string());
            if last {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                let raw = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos);
                return Some(Seen {
                    code,
                    text: text.join("\n"),
                    raw,
                });
            }
        }
    }

    /// Sends one command line (CRLF added) and reads the reply.
    pub async fn cmd(&mut self, line: &str) -> Seen {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// True when the server closed the connection (EOF within `t`).
    pub async fn closed(&mut self, t: Duration) -> bool {
        let mut tmp = [0u8; 256];
        matches!(
            tokio::time::timeout(t, self.stream.read(&mut tmp)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Raw bytes received per connection.
pub type Conns = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// What a scripted backend does at one stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Act {
    /// Reply with this full line (without CRLF), e.g. "250 2.0.0 Ok".
    Reply(String),
    /// Close the connection without replying.
    Drop,
    /// Wait this long, then reply normally.
    Delay(Duration),
}

/// Behaviour of a scripted backend; `None` = the normal positive reply.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub greeting: Option<Act>,
    pub mail: Option<Act>,
    pub rcpt: Option<Act>,
    pub data: Option<Act>,
    /// At the final dot.
    pub dot: Option<Act>,
    /// At RSET.
    pub rset: Option<Act>,
    /// Close after receiving this many bytes of message data.
    pub drop_mid_data_after: Option<usize>,
    /// Advertise PIPELINING (default true via `Script::new`).
    pub no_pipelining: bool,
    /// EHLO keywords to add, e.g. "XFORWARD NAME ADDR PORT PROTO HELO SOURCE".
    pub ehlo_extra: Vec<String>,
    /// Per-recipient RCPT behaviour: (address, act); the first entry whose
    /// address appears (case-insensitively) in the RCPT line wins over `rcpt`.
    pub rcpt_for: Vec<(String, Act)>,
}

/// A backend written for the tests: speaks enough SMTP, records every byte
/// it receives on every connection, and misbehaves as scripted. It is the
/// place to assert exact wire bytes (what a real backend would read).
pub struct Recorder {
    pub addr: String,
    /// Raw bytes received, one entry per connection.
    pub conns: Conns,
    /// Complete messages (raw wire data between 354 and the final dot,
    /// terminator excluded), one per accepted transaction.
    pub messages: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub async fn start(script: Script) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns: Conns = Arc::default();
        let messages: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let (c2, m2) = (conns.clone(), messages.clone());
        let script = Arc::new(script);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let rec = Arc::new(Mutex::new(Vec::new()));
                c2.lock().unwrap().push(rec.clone());
                let (m, sc) = (m2.clone(), script.clone());
                tokio::spawn(async move {
                    let _ = recorder_conn(s, rec, m, sc).await;
                });
            }
        });
        Recorder {
            addr,
            conns,
            messages,
            task,
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// The bytes received so far, one entry per connection.
    pub fn all_conn_bytes(&self) -> Vec<Vec<u8>> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }

    /// Everything received on all connections, concatenated.
    pub fn all_bytes(&self) -> Vec<u8> {
        let c = self.conns.lock().unwrap();
        c.iter().flat_map(|r| r.lock().unwrap().clone()).collect()
    }

    pub fn all_text(&self) -> String {
        String::from_utf8_lossy(&self.all_bytes()).into_owned()
    }

    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.messages.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The line `a` answers with (after its delay), or None when it drops the
/// connection instead.
async fn scripted<'a>(a: &'a Option<Act>, normal: &'a str) -> Option<&'a str> {
    match a {
        None => Some(normal),
        Some(Act::Reply(r)) => Some(r),
        Some(Act::Drop) => None,
        Some(Act::Delay(d)) => {
            tokio::time::sleep(*d).await;
            Some(normal)
        }
    }
}

async fn act(s: &mut TcpStream, a: &Option<Act>, normal: &str) -> std::io::Result<bool> {
    match scripted(a, normal).await {
        Some(line) => s
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .map(|_| true),
        None => Ok(false),
    }
}

async fn recorder_conn(
    mut s: TcpStream,
    rec: Arc<Mutex<Vec<u8>>>,
    messages: Arc<Mutex<Vec<Vec<u8>>>>,
    sc: Arc<Script>,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    if !act(&mut s, &sc.greeting, "220 recorder ESMTP").await? {
        return Ok(());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 65536];
    let mut in_data = false;
    let mut data: Vec<u8> = Vec::new();
    let mut mail_failed = false;
    loop {
        // Handle everything buffered.
        loop {
            if in_data {
                if let Some(limit) = sc.drop_mid_data_after {
                    if data.len() + buf.len() >= limit {
                        return Ok(());
                    }
                }
                // End of data for a real backend: "\r\n.\r\n" (data starts
                // after a CRLF). Also stop at what Postfix would take as the
                // end (LF "." optional CRs LF) so smuggling shows up here.
                let mut probe = b"\r\n".to_vec();
                probe.extend_from_slice(&data);
                probe.extend_from_slice(&buf);
                let Some(end) = find_end(&probe) else {
                    data.extend_from_slice(&buf);
                    buf.clear();
                    break;
                };
                // probe[..end.0] is the message incl. the leading fake CRLF.
                let msg_len = end.0.saturating_sub(2);
                let total = data.len() + buf.len();
                let consumed_total = end.1 - 2;
                let mut all = std::mem::take(&mut data);
                all.extend_from_slice(&buf);
                buf = all.split_off(consumed_total.min(total));
                all.truncate(msg_len);
                in_data = false;
                let Some(line) = scripted(&sc.dot, "250 2.0.0 Ok: queued").await else {
                    return Ok(());
                };
                // Recorded before the reply is written: a client that has
                // seen the final reply finds the message here (recorded
                // after it, a test on another worker could look first).
                messages.lock().unwrap().push(all);
                s.write_all(format!("{line}\r\n").as_bytes()).await?;
                continue;
            }
            let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                break;
            };
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let upper = text.to_ascii_uppercase();
            let ok = if upper.starts_with("EHLO") {
                let mut r = String::from("250-recorder\r\n");
                if !sc.no_pipelining {
                    r.push_str("250-PIPELINING\r\n");
                }
                for e in &sc.ehlo_extra {
                    r.push_str(&format!("250-{e}\r\n"));
                }
                r.push_str("250 ENHANCEDSTATUSCODES");
                act(&mut s, &None, &r).await?
            } else if upper.starts_with("RSET") {
                act(&mut s, &sc.rset, "250 2.0.0 Ok").await?
            } else if upper.starts_with("HELO")
                || upper.starts_with("XFORWARD")
                || upper.starts_with("NOOP")
            {
                act(&mut s, &None, "250 2.0.0 Ok").await?
            } else if upper.starts_with("XCLIENT") {
                act(&mut s, &None, "220 recorder ESMTP").await?
            } else if upper.starts_with("MAIL") {
                mail_failed = matches!(&sc.mail, Some(Act::Reply(r)) if !r.starts_with('2'));
                act(&mut s, &sc.mail, "250 2.1.0 Ok").await?
            } else if upper.starts_with("RCPT") {
                if mail_failed {
                    act(&mut s, &None, "503 5.5.1 Error: need MAIL command").await?
                } else {
                    let per_rcpt = sc
                        .rcpt_for
                        .iter()
                        .find(|(addr, _)| upper.contains(&addr.to_ascii_uppercase()))
                        .map(|(_, a)| Some(a.clone()));
                    act(
                        &mut s,
                        per_rcpt.as_ref().unwrap_or(&sc.rcpt),
                        "250 2.1.5 Ok",
                    )
                    .await?
                }
            } else if upper.starts_with("DATA") {
                let positive = matches!(&sc.data, None | Some(Act::Delay(_)));
                let go = act(&mut s, &sc.data, "354 End data with <CR><LF>.<CR><LF>").await?;
                if go && positive {
                    in_data = true;
                    data.clear();
                }
                go
            } else if upper.starts_with("QUIT") {
                let _ = act(&mut s, &None, "221 2.0.0 Bye").await;
                return Ok(());
            } else {
                act(&mut s, &None, "502 5.5.1 Error: command not recognized").await?
            };
            if !ok {
                return Ok(());
            }
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        rec.lock().unwrap().extend_from_slice(&tmp[..n]);
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Finds the end of data in `p` (which starts with a CRLF): a "." line,
/// where (like Postfix) a line ends at LF and trailing CRs are stripped.
/// Returns (start of the "." line's preceding line break, index after the
/// end-of-data line).
fn find_end(p: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(off) = p[i..].iter().position(|&b| b == b'\n') {
        let lf = i + off;
        let start = lf + 1;
        // The line after this LF.
        let next_off = p[start..].iter().position(|&b| b == b'\n')?;
        let next_lf = start + next_off;
        let mut line = &p[start..next_lf];
        while let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        if line == b"." {
            let brk = if lf > 0 && p[lf - 1] == b'\r' {
                lf - 1
            } else {
                lf
            };
            return Some((brk, next_lf + 1));
        }
        i = start;
    }
    None
}

/// Writes a self-signed certificate and key for `name` into `dir`, returning
/// their paths.
pub fn write_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

// ---------------------------------------------------------------------------
// Added for tests/faults.rs: per-connection scripts, end-of-connection
// tracking, a sink on a chosen address, access to a Raw client's stream.

/// A `Recorder` whose n-th connection follows `scripts[n]` (the last script
/// for every later connection), and which notes when each connection's
/// conversation ended (peer closed or reset, QUIT, or the script dropped it).
pub struct SeqRecorder {
    pub rec: Recorder,
    /// One flag per accepted connection, in accept order.
    pub ended: Arc<Mutex<Vec<bool>>>,
}

impl SeqRecorder {
    pub async fn start(scripts: Vec<Script>) -> SeqRecorder {
        assert!(!scripts.is_empty(), "SeqRecorder needs at least one script");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns: Conns = Arc::default();
        let messages: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let ended: Arc<Mutex<Vec<bool>>> = Arc::default();
        let (c2, m2, e2) = (conns.clone(), messages.clone(), ended.clone());
        let scripts: Vec<Arc<Script>> = scripts.into_iter().map(Arc::new).collect();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let rec = Arc::new(Mutex::new(Vec::new()));
                let idx = {
                    let mut c = c2.lock().unwrap();
                    c.push(rec.clone());
                    c.len() - 1
                };
                e2.lock().unwrap().push(false);
                let sc = scripts[idx.min(scripts.len() - 1)].clone();
                let (m, e) = (m2.clone(), e2.clone());
                tokio::spawn(async move {
                    let _ = recorder_conn(s, rec, m, sc).await;
                    e.lock().unwrap()[idx] = true;
                });
            }
        });
        SeqRecorder {
            rec: Recorder {
                addr,
                conns,
                messages,
                task,
            },
            ended,
        }
    }

    /// Raw bytes received on connection `i`.
    pub fn conn_bytes(&self, i: usize) -> Vec<u8> {
        self.rec.conns.lock().unwrap()[i].lock().unwrap().clone()
    }

    pub fn is_ended(&self, i: usize) -> bool {
        self.ended.lock().unwrap().get(i).copied().unwrap_or(false)
    }

    /// Waits until connection `i` ended; false when it did not within `t`.
    pub async fn wait_ended(&self, i: usize, t: Duration) -> bool {
        let end = tokio::time::Instant::now() + t;
        loop {
            if self.is_ended(i) {
                return true;
            }
            if tokio::time::Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl std::ops::Deref for SeqRecorder {
    type Target = Recorder;
    fn deref(&self) -> &Recorder {
        &self.rec
    }
}

impl Sink {
    /// Like `Sink::start`, on a given address (e.g. the one of a sink that
    /// was just dropped, to simulate a backend restart).
    pub fn start_on(addr: &str, extra: &[&str]) -> Option<Sink> {
        Sink::start_dumping(addr, extra, None)
    }

    /// Like `Sink::start_on`, dumping into `dump` (created if missing) when
    /// given: a directory that outlives this sink, so that the messages of
    /// every incarnation of a restarted backend can be counted together.
    pub fn start_dumping(addr: &str, extra: &[&str], dump: Option<&Path>) -> Option<Sink> {
        let bin = require_tool("smtp-sink")?;
        let dir = tempfile::tempdir().unwrap();
        let dump = dump.map_or_else(|| dir.path().join("dump"), Path::to_path_buf);
        std::fs::create_dir_all(&dump).unwrap();
        // smtp-sink drops privileges to nobody when run as root.
        for d in [dir.path(), dump.as_path()] {
            let _ = Command::new("chmod").arg("-R").arg("777").arg(d).status();
        }
        let log = std::fs::File::create(dir.path().join("sink.log")).unwrap();
        let mut cmd = Command::new(bin);
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        cmd.arg("-v")
            .arg("-d")
            .arg(format!("{}/%H%M%S.", dump.display()))
            .args(extra)
            .arg(addr)
            .arg("100")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("spawn smtp-sink");
        wait_port(addr);
        Some(Sink {
            child,
            addr: addr.to_string(),
            dir,
            dump,
        })
    }
}

impl Raw<TcpStream> {
    /// The stream and any bytes already read but not yet returned as a reply
    /// (e.g. to check nothing followed a reply, or to start TLS).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }
}

/// A child process (the real binary) killed by its own handle if the test
/// ends early.
pub struct Running(pub std::process::Child);

impl Running {
    /// Spawns `cmd` (the real binary) with stdout and stderr into the file
    /// `log`, and waits until it listens on `addr`; panics with the log when
    /// it exits first or does not listen within 10 s.
    pub async fn listening(cmd: &mut Command, log: &Path, addr: SocketAddr) -> Running {
        let file = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn smtp-edge");
        let mut proc = Running(child);
        let log_text = || std::fs::read_to_string(log).unwrap_or_default();
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            if let Ok(Some(st)) = proc.0.try_wait() {
                panic!("smtp-edge exited early: {st}\n{}", log_text());
            }
            assert!(
                Instant::now() < end,
                "smtp-edge is not listening on {addr}:\n{}",
                log_text()
            );
            // Soon after it listens: a test may act at its first moment
            // (tests/cli.rs sends SIGTERM then).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        proc
    }

    /// Sends it SIGTERM and returns its exit status once it ends; panics
    /// with the log `log` when it still runs `within` later.
    pub async fn terminated(&mut self, within: Duration, log: &Path) -> std::process::ExitStatus {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        let sent = unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        assert_eq!(sent, 0, "kill -TERM {}", self.0.id());
        let end = Instant::now() + within;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "smtp-edge still runs {within:?} after SIGTERM:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The built smtp-edge on the config file `config` at `RUST_LOG =
    /// rust_log`, as `listening` starts it.
    pub async fn edge(config: &Path, rust_log: &str, log: &Path, addr: SocketAddr) -> Running {
        Running::listening(
            Command::new(env!("CARGO_BIN_EXE_smtp-edge"))
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", rust_log),
            log,
            addr,
        )
        .await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One transaction on a session past EHLO: MAIL, RCPT, DATA and `body`
/// (which must end with CRLF); the reply to the end of data, or the first
/// refusal on the way.
pub async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Raw<S>, body: &[u8]) -> Seen {
    let m = c.cmd("MAIL FROM:<a@example.org>").await;
    if m.code != 250 {
        return m;
    }
    let r = c.cmd("RCPT TO:<b@example.net>").await;
    if r.code != 250 {
        return r;
    }
    let d = c.cmd("DATA").await;
    assert_eq!(d.code, 354, "{d:?}");
    c.send(body).await;
    c.send(b".\r\n").await;
    c.reply().await
}

/// A TCP forwarder in front of a backend that counts the connections open
/// through it at once: what "the backend never sees more than N" means. A
/// connection counts from 10 ms after it was accepted (so a connection the
/// proxy closed just before opening the next one has been seen closed)
/// until the proxy's side ends.
pub struct Tap {
    pub addr: String,
    open: Arc<std::sync::atomic::AtomicUsize>,
    max: Arc<std::sync::atomic::AtomicUsize>,
    total: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    pub async fn start(upstream: &str) -> Tap {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let open = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let total = Arc::new(AtomicUsize::new(0));
        let (o, m, t, up) = (
            open.clone(),
            max.clone(),
            total.clone(),
            upstream.to_string(),
        );
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let (o, m, t, up) = (o.clone(), m.clone(), t.clone(), up.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&up).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    t.fetch_add(1, Ordering::SeqCst);
                    let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    });
                    // The proxy's side ending is the proxy closing it.
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                    let _ = sw.shutdown().await;
                    let _ = back.await;
                });
            }
        });
        Tap {
            addr,
            open,
            max,
            total,
            task,
        }
    }

    /// The most connections open at once so far.
    pub fn max_open(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections made through the tap so far.
    pub fn total(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET path` on `addr` over HTTP/1.1: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None, None).await
}

/// One HTTP/1.1 request (`body` sent as JSON), from the loopback address
/// `from` when given: the status code and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    from: Option<std::net::IpAddr>,
) -> (u16, String) {
    let mut s = match from {
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::new(ip, 0)).unwrap();
            sock.connect(addr).await.unwrap()
        }
        None => TcpStream::connect(addr).await.unwrap(),
    };
    let body = body.unwrap_or("");
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("admin answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    (status, body.to_string())
}

/// Parses Prometheus text exposition (panics with the text when it is not).
pub fn parse_metrics(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{body}"))
}

/// The sum of the samples of `name` whose labels include all of `labels`
/// (0 when absent); a histogram counts its observations.
pub fn metric_value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}
