//! Micro-benchmark of the backend pool: checkout of an idle (greeted,
//! EHLO'd) connection and its return, against an in-process backend.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use smtp_edge::relay::pool::{Pool, PoolSettings, Wait};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A minimal backend: greets, answers EHLO with PIPELINING, then idles.
async fn backend() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let _ = w.write_all(b"220 bench ESMTP\r\n").await;
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if line.to_ascii_uppercase().starts_with("EHLO") {
                        b"250-bench\r\n250 PIPELINING\r\n"
                    } else if line.eq_ignore_ascii_case("QUIT") {
                        b"221 Bye\r\n"
                    } else {
                        b"250 2.0.0 Ok\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn pool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(backend());
    let pool = Pool::new(
        PoolSettings {
            addr,
            backend: 0,
            group: "default".into(),
            helo_name: "bench.test".into(),
            max_connections: 8,
            max_connecting: 16,
            max_idle: Duration::from_secs(600),
            max_lifetime: Duration::ZERO,
            max_transactions: u32::MAX,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            pool_wait: Duration::from_secs(5),
            down_after: 3,
            probe_interval: Duration::from_secs(2),
            probe_interval_max: Duration::from_secs(60),
            generation: 1,
            tls: None,
        },
        smtp_edge::telemetry::metrics::Metrics::new().backend("bench", "default"),
        1,
    );
    // Warm the pool with one ready connection.
    rt.block_on(async {
        let (conn, _) = pool.checkout(Wait::No).await.unwrap();
        pool.checkin(conn);
    });
    let mut g = c.benchmark_group("pool");
    g.throughput(Throughput::Elements(1));
    g.bench_function("checkout_checkin_idle", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (conn, reused) = pool.checkout(Wait::No).await.unwrap();
                    debug_assert!(reused);
                    pool.checkin(conn);
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, pool);
criterion_main!(benches);
