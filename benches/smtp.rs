//! Micro-benchmarks of the sans-IO SMTP core: command parsing, reply
//! formatting and the DATA scanner / un-stuffer.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use smtp_edge::smtp::command;
use smtp_edge::smtp::reply::{write_reply, Answered, EnhancedCode, Reply};
use smtp_edge::smtp::{
    BareLineEndings, ChunkChecker, DataOptions, DataScanner, Scan, Stuffer, Unstuffer,
};

fn command_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("command_parse");
    g.throughput(Throughput::Elements(1));
    let lines: [(&str, &[u8]); 4] = [
        ("ehlo", b"EHLO mail-yw1-f170.google.example.com"),
        (
            "mail_from_size_body",
            b"MAIL FROM:<bounce+31a2f.ab12cd@mail.sender.example.org> SIZE=123456 BODY=8BITMIME",
        ),
        ("rcpt_to", b"RCPT TO:<first.last@recipient.example.net>"),
        ("data", b"DATA"),
    ];
    for (name, line) in lines {
        g.bench_function(name, |b| b.iter(|| command::parse(black_box(line)).is_ok()));
    }
    g.finish();
}

fn reply_format(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply_format");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1024);
    g.bench_function("write_reply", |b| {
        b.iter(|| {
            out.clear();
            write_reply(&mut out, black_box(250), "2.0.0", "Ok");
            black_box(out.len())
        })
    });
    let ehlo = Reply::from_lines(
        250,
        None,
        [
            "mx.edge.example",
            "PIPELINING",
            "SIZE 52428800",
            "STARTTLS",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "SMTPUTF8",
            "CHUNKING",
        ],
    );
    g.bench_function("write_to_multiline_ehlo", |b| {
        b.iter(|| {
            out.clear();
            black_box(&ehlo).write_to(&mut out);
            black_box(out.len())
        })
    });
    let rejected = Reply::from_lines(
        550,
        Some(EnhancedCode(5, 7, 1)),
        [
            "Message rejected as spam by content filter",
            "see https://postmaster.example/why",
        ],
    );
    g.bench_function("write_to_enhanced_2_lines", |b| {
        b.iter(|| {
            out.clear();
            black_box(&rejected).write_to(&mut out);
            black_box(out.len())
        })
    });
    g.finish();

    // A backend's replies to one relayed message, read and written out
    // again as the relay does (parse, ensure_enhanced, write_to).
    let mut g = c.benchmark_group("relay_reply");
    g.throughput(Throughput::Elements(4));
    let backend: &[&[u8]] = &[
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
        b"250 2.0.0 Ok: queued as 4XyZ1A2b3C\r\n",
    ];
    g.bench_function("message_replies", |b| {
        b.iter(|| {
            out.clear();
            for raw in backend {
                let (mut r, _) = Reply::parse(black_box(raw)).unwrap().unwrap();
                r.ensure_enhanced(Answered::Mail);
                r.write_to(&mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();
}

/// About 1 MiB of 76-character lines (78 with CRLF), ending with `.\r\n`.
/// Every `stuffed_every`-th line starts with a (stuffed) dot.
fn body(stuffed_every: usize) -> Vec<u8> {
    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod temp";
    let mut v = Vec::with_capacity((1 << 20) + 1024);
    let mut i = 0usize;
    while v.len() < 1 << 20 {
        if stuffed_every != 0 && i.is_multiple_of(stuffed_every) {
            v.extend_from_slice(b".");
            v.extend_from_slice(&text[1..]);
        } else {
            v.extend_from_slice(&text[..]);
        }
        v.extend_from_slice(b"\r\n");
        i += 1;
    }
    v.extend_from_slice(b".\r\n");
    v
}

/// Scans `input` in 64 KiB chunks, as it would arrive from a socket.
fn scan(opts: DataOptions, input: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut s = DataScanner::new(opts);
    for chunk in input.chunks(64 * 1024) {
        if let Scan::End { consumed } = s.feed(chunk, out) {
            black_box(consumed);
        }
    }
    out.len()
}

fn data_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_scan");
    let clean = body(0);
    let stuffed = body(4);
    let reject = DataOptions {
        bare_line_endings: BareLineEndings::Reject,
        max_line: 1000,
    };
    let normalize = DataOptions {
        bare_line_endings: BareLineEndings::Normalize,
        max_line: 1000,
    };
    let mut out = Vec::with_capacity(4 << 20);
    g.throughput(Throughput::Bytes(clean.len() as u64));
    g.bench_function("reject_clean_1MiB", |b| {
        b.iter(|| scan(reject, black_box(&clean), &mut out))
    });
    g.bench_function("normalize_clean_1MiB", |b| {
        b.iter(|| scan(normalize, black_box(&clean), &mut out))
    });
    g.throughput(Throughput::Bytes(stuffed.len() as u64));
    g.bench_function("reject_dot_stuffed_1MiB", |b| {
        b.iter(|| scan(reject, black_box(&stuffed), &mut out))
    });
    g.bench_function("normalize_dot_stuffed_1MiB", |b| {
        b.iter(|| scan(normalize, black_box(&stuffed), &mut out))
    });
    g.bench_function("unstuffer_dot_stuffed_1MiB", |b| {
        b.iter(|| {
            out.clear();
            let mut u = Unstuffer::new();
            for chunk in black_box(&stuffed).chunks(64 * 1024) {
                u.feed(chunk, &mut out);
            }
            out.len()
        })
    });
    g.finish();
}

/// BDAT content (the body without stuffing and terminator) in 64 KiB
/// pieces: checked only (relayed as BDAT), and checked then stuffed into
/// DATA wire form (relayed to a backend without CHUNKING).
fn bdat_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("bdat_check");
    let content = body(0);
    let content = &content[..content.len() - 3];
    let reject = DataOptions {
        bare_line_endings: BareLineEndings::Reject,
        max_line: 1000,
    };
    let mut out = Vec::with_capacity(4 << 20);
    let mut wire = Vec::with_capacity(4 << 20);
    g.throughput(Throughput::Bytes(content.len() as u64));
    g.bench_function("reject_clean_1MiB", |b| {
        b.iter(|| {
            out.clear();
            let mut ch = ChunkChecker::new(reject);
            for piece in black_box(content).chunks(64 * 1024) {
                ch.feed(piece, &mut out);
            }
            ch.finish(&mut out);
            out.len()
        })
    });
    g.bench_function("reject_clean_stuffed_1MiB", |b| {
        b.iter(|| {
            wire.clear();
            let mut ch = ChunkChecker::new(reject);
            let mut st = Stuffer::new();
            for piece in black_box(content).chunks(64 * 1024) {
                out.clear();
                ch.feed(piece, &mut out);
                st.feed(&out, &mut wire);
            }
            st.finish(&mut wire);
            wire.len()
        })
    });
    g.finish();
}

criterion_group!(benches, command_parse, reply_format, data_scan, bdat_check);
criterion_main!(benches);
