//! Fuzz target: a whole client session driven by arbitrary bytes.
//!
//! `session::handle` takes the accepted `TcpStream` itself (it sets
//! TCP_NODELAY, reads the local address, and hands the socket to the TLS
//! acceptor at STARTTLS), and `Session<S>` is private, so the session is
//! not driven over `tokio::io::duplex`: this target runs the real `Server`
//! (two, one per `BareLineEndings` mode) in-process on loopback with a
//! Maildir backend in a temporary directory (on /dev/shm when there is
//! one), and for each input connects, writes the bytes in pieces the input
//! chooses, half-closes and reads until the server closes. The accept loop,
//! admission, the command loop, pipelining, DATA, the Maildir relay and a
//! STARTTLS handshake on garbage all run as in production.
//!
//! Checked: no panic anywhere (libfuzzer-sys aborts on a panic in any
//! thread); the session ends within 10 s of the client's EOF; until a
//! STARTTLS the server's output is well-formed replies (no line over
//! 512 bytes, RFC 5321 4.5.3.1.5); and every message stored in the Maildir
//! was answered `250 ... queued as`, one stored per such reply.
#![no_main]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use smtp_edge::config::Config;
use smtp_edge::server::Server;
use smtp_edge::smtp::Reply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Edge {
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

struct World {
    rt: tokio::runtime::Runtime,
    edges: Vec<Edge>,
}

fn config(maildir: &std::path::Path, bare: &str) -> Config {
    let toml = format!(
        r#"
hostname = "mx.fuzz.example"
[[listener]]
address = "127.0.0.1:0"
tls = "starttls"
[limits]
max_message_size = 4000
max_recipients = 5
max_command_line = 512
max_text_line = 1000
max_bad_commands = 10
[timeouts]
command = 10
data_block = 10
tls_handshake = 2
[smtp]
bare_line_endings = "{bare}"
[[backend]]
maildir = "{}"
[policy.limits.concurrency]
action = "off"
[policy.limits.connection_rate]
action = "off"
[policy.limits.message_rate]
action = "off"
[policy.limits.recipient_rate]
action = "off"
[policy.helo]
fqdn = "reject"
bare_ip = "reject"
"#,
        maildir.display()
    );
    Config::parse(&toml).unwrap_or_else(|e| panic!("fuzz config: {e:?}"))
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let shm = std::path::Path::new("/dev/shm");
        let edges = ["reject", "normalize"]
            .into_iter()
            .map(|bare| {
                let dir = if shm.is_dir() {
                    tempfile::tempdir_in(shm)
                } else {
                    tempfile::tempdir()
                }
                .expect("tempdir");
                let server = rt
                    .block_on(Server::bind(config(dir.path(), bare)))
                    .expect("bind");
                let addr = server.local_addrs()[0];
                rt.spawn(server.serve(std::future::pending()));
                Edge { addr, dir }
            })
            .collect();
        World { rt, edges }
    })
}

/// A fresh loopback source address per connection (127.0.0.2-251), so the
/// TIME_WAITs of thousands of short connections do not run out of ports.
async fn connect(to: SocketAddr) -> tokio::net::TcpStream {
    static N: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let src = Ipv4Addr::new(127, 0, 0, 2 + (n % 250) as u8);
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        if sock.bind(SocketAddr::from((src, 0))).is_err() {
            continue;
        }
        match sock.connect(to).await {
            Ok(s) => return s,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

fn stored(dir: &std::path::Path) -> usize {
    let new = dir.join("new");
    let n = std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0);
    for e in std::fs::read_dir(&new).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    n
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (seed, input) = common::take_seed(rest, 2);
    let w = world();
    let edge = &w.edges[usize::from(flags & 1)];
    stored(edge.dir.path());
    let cuts = common::cuts(seed, input.len(), usize::from(flags >> 1) % 8);
    let pieces = common::pieces(input, &cuts);
    let output = w.rt.block_on(async {
        let stream = connect(edge.addr).await;
        let (mut rd, mut wr) = stream.into_split();
        let write = async {
            for p in &pieces {
                if wr.write_all(p).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let both = async { tokio::join!(write, read).1 };
        tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the session ends after the client's EOF")
    });

    // The replies, up to a STARTTLS (then TLS, or nothing, follows).
    let starttls = memchr::memmem::find(&input.to_ascii_uppercase(), b"STARTTLS").is_some();
    let mut buf = &output[..];
    let mut queued = 0;
    while !buf.is_empty() {
        match Reply::parse(buf) {
            Ok(Some((r, used))) => {
                for line in buf[..used].split_inclusive(|&b| b == b'\n') {
                    assert!(line.len() <= 512, "reply line of {}", line.len());
                }
                if r.code == 250 && r.first_line().starts_with("Ok: queued as") {
                    queued += 1;
                }
                if r.code == 220 && starttls && r.first_line().contains("TLS") {
                    break;
                }
                buf = &buf[used..];
            }
            _ if starttls => break,
            other => panic!(
                "server output {other:?} at {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
    assert_eq!(
        stored(edge.dir.path()),
        queued,
        "messages stored vs. 250 queued"
    );
});
