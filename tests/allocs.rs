//! Heap allocations per relayed message on the steady-state path (a
//! persistent client session, a pooled backend connection, no policy
//! refusal), counted by a counting global allocator on the proxy's own
//! runtime threads only (the client and the backend run on another
//! runtime). A ratchet: the test fails when the count goes above
//! `CEILING`, so it cannot creep back; lower `CEILING` with every change
//! that lowers the count. Issue 16's target is 4. No tracing subscriber is
//! installed here: the binary's log line per message and spans (with
//! `RUST_LOG=info`) allocate on top of this.
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use smtp_edge::config::Config;
use smtp_edge::server::Server;

/// Allocations per message above which the test fails. Measured
/// 2026-12-06 (evening): 0.02 per message, since a transaction that finds
/// a connection in the pool's hot list begins at once
/// (`Backends::begin_now`) instead of through the boxed `Backends::begin`;
/// 1.02 before (that box, in `while_client_stays`); 3.01 from 2026-12-01 while `Txn::replies` and
/// `data_phase` were boxed too (inline they cost 412 bytes of RSS per
/// idle connection: see session/mod.rs), 9.01 before the transaction's buffers stayed with the
/// backend connection, 17.02 before replies kept their text inline, 19.02
/// before the transaction counters were made once; debug and release alike,
/// with no tracing subscriber installed (spans and log lines off: what the
/// relay path itself allocates). Issue 16's target is 4; the ceiling, 0.5,
/// is room for a buffer growing now and then.
const CEILING: f64 = 0.5;

struct Counting;

thread_local! {
    /// Set on the proxy runtime's threads: only their allocations count.
    static PROXY_THREAD: Cell<bool> = const { Cell::new(false) };
}

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    if PROXY_THREAD.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One transaction on a persistent session, pipelined as a real sender
/// does (MAIL, RCPT, DATA in one write; then the body and the dot).
async fn one_message(c: &mut Raw, body: &[u8]) {
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .await;
    for want in [250, 250, 354] {
        let r = c.reply().await;
        assert_eq!(r.code, want, "{r:?}");
    }
    c.send(body).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
}

#[test]
fn allocations_per_relayed_message() {
    // One after the other: the counter is global. A plain backend, then one
    // offering XFORWARD (as Postfix does to hosts it authorizes): the
    // proxy then sends the client's identity with every transaction.
    for extra in [
        vec![],
        vec!["XFORWARD NAME ADDR PORT PROTO HELO SOURCE".to_string()],
    ] {
        let what = if extra.is_empty() {
            "plain"
        } else {
            "XFORWARD"
        };
        let (allocs, bytes) = measure(extra);
        eprintln!(
            "allocations per relayed message ({what} backend): {allocs:.2} ({bytes:.0} bytes)"
        );
        assert!(
            allocs <= CEILING,
            "{what} backend: {allocs:.2} allocations ({bytes:.0} bytes) per relayed message, above the ceiling {CEILING} (issue 16's target: 4)"
        );
    }
}

/// Allocations and bytes per relayed message through a backend offering
/// the EHLO keywords `ehlo_extra`.
fn measure(ehlo_extra: Vec<String>) -> (f64, f64) {
    let offers_xforward = !ehlo_extra.is_empty();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| PROXY_THREAD.with(|c| c.set(true)))
        .build()
        .unwrap();
    // A 4 KiB message, as the load tests send.
    let mut body = b"Subject: allocation count\r\n\r\n".to_vec();
    while body.len() < 4096 {
        body.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    body.extend_from_slice(b".\r\n");

    client_rt.block_on(async {
        let backend = Recorder::start(Script {
            ehlo_extra,
            ..Script::default()
        })
        .await;
        let text = format!(
            "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\n",
            backend.addr
        );
        let cfg = Config::parse(&text).unwrap();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        proxy_rt.spawn(async move {
            let server = Server::bind(cfg).await.expect("bind");
            let _ = addr_tx.send(server.local_addrs()[0]);
            server.serve(std::future::pending()).await;
        });
        let addr = addr_rx.await.unwrap();
        let mut c = Raw::greeted(addr).await;
        assert_eq!(c.cmd("EHLO client.example").await.code, 250);
        // Warm up: the pooled connection, buffers grown to their size.
        for _ in 0..300 {
            one_message(&mut c, &body).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = 2000u64;
        let (a0, b0) = (
            ALLOCS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        for _ in 0..n {
            one_message(&mut c, &body).await;
        }
        let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / n as f64;
        let bytes = (BYTES.load(Ordering::Relaxed) - b0) as f64 / n as f64;
        assert_eq!(c.cmd("QUIT").await.code, 221);
        assert_eq!(backend.messages().len(), 2300);
        // With XFORWARD offered, every transaction carried it.
        let xforwards = backend.all_text().matches("XFORWARD NAME=").count();
        let want = if offers_xforward { 2300 } else { 0 };
        assert!(xforwards >= want && (offers_xforward || xforwards == 0), "{xforwards} XFORWARD commands");
        (allocs, bytes)
    })
}
