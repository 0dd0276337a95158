//! Fuzz target: BDAT content (`ChunkChecker`, `Stuffer`, `bdat_command`).
//! However the content is cut into chunks and reads: the same checker
//! output and verdicts (bare line ending, long line, refused, size), those
//! of a byte-at-a-time model. The relay path of the session, piece by
//! piece and stopped at the first refused piece: the dot-stuffed stream
//! for a DATA backend holds no bare CR / LF, no line that ends the data
//! before its end (read strictly, as Postfix reads it, or with CR or LF
//! ending a line) and un-stuffs (for any cut) to the content; the BDAT
//! stream for a CHUNKING backend parses back, command by command, to the
//! same content. The `Stuffer` on raw content (bare endings left in) never
//! ends the data early either. `command::parse` never panics on a BDAT
//! line, and parses back each line `bdat_command` writes.
#![no_main]

#[path = "../../tests/support/chunks.rs"]
mod chunks;
mod common;
#[path = "../../tests/support/wire.rs"]
mod wire;

use chunks::{check_pieces, model, Checked};
use libfuzzer_sys::fuzz_target;
use smtp_edge::smtp::command::parse;
use smtp_edge::smtp::{bdat_command, BareLineEndings, ChunkChecker, Command, DataOptions, Stuffer};

fn check(opts: DataOptions, pieces: &[&[u8]]) -> Checked {
    check_pieces(opts, pieces, |c| {
        assert_eq!(
            c.refused(),
            c.long_line_seen() || (reject(opts) && c.bare_line_ending_seen())
        );
    })
}

fn reject(opts: DataOptions) -> bool {
    opts.bare_line_endings == BareLineEndings::Reject
}

/// What the session relays for content read in `pieces` (each piece
/// checked, then relayed at once unless the content was refused, which
/// ends the relay: the session drops the backend connection): the DATA
/// wire form (stuffed) and the BDAT stream, and whether the relay got to
/// the end.
struct Relayed {
    stuffed: Vec<u8>,
    bdat: Vec<u8>,
    complete: bool,
}

fn relay(opts: DataOptions, pieces: &[&[u8]]) -> Relayed {
    let mut c = ChunkChecker::new(opts);
    let mut s = Stuffer::new();
    let (mut stuffed, mut bdat) = (Vec::new(), Vec::new());
    let mut content = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        content.clear();
        c.feed(p, &mut content);
        if last {
            c.finish(&mut content);
        }
        if c.refused() {
            return Relayed {
                stuffed,
                bdat,
                complete: false,
            };
        }
        if content.is_empty() && !last {
            continue;
        }
        s.feed(&content, &mut stuffed);
        if last {
            s.finish(&mut stuffed);
        }
        bdat_command(content.len(), last, &mut bdat);
        bdat.extend_from_slice(&content);
    }
    Relayed {
        stuffed,
        bdat,
        complete: true,
    }
}

/// A CHUNKING backend reading `stream`: BDAT lines, each followed by its
/// octets. The content, and whether a LAST chunk ended the stream exactly.
fn read_bdat(mut stream: &[u8]) -> (Vec<u8>, bool) {
    let mut content = Vec::new();
    while !stream.is_empty() {
        let nl = memchr::memchr(b'\n', stream).expect("a BDAT line");
        let line = &stream[..nl];
        assert!(line.ends_with(b"\r"), "{line:?}");
        let Ok(Command::Bdat { size, last }) = parse(line) else {
            panic!("not a BDAT line: {line:?}");
        };
        let size = usize::try_from(size).unwrap();
        let rest = &stream[nl + 1..];
        assert!(rest.len() >= size, "chunk of {size} cut short");
        content.extend_from_slice(&rest[..size]);
        stream = &rest[size..];
        if last {
            return (content, stream.is_empty());
        }
    }
    (content, false)
}

fn stuff(pieces: &[&[u8]]) -> Vec<u8> {
    let mut s = Stuffer::new();
    let mut wire = Vec::new();
    for p in pieces {
        s.feed(p, &mut wire);
    }
    s.finish(&mut wire);
    wire
}

/// The data ends at the wire's very end, in every reading.
fn ends_at_end(wire: &[u8]) {
    let n = Some(wire.len());
    assert_eq!(wire::strict_end(wire), n, "{wire:?}");
    assert_eq!(wire::postfix_end(wire), n, "{wire:?}");
    assert_eq!(wire::lenient_end(wire), n, "{wire:?}");
}

/// The data does not end anywhere, in any reading.
fn never_ends(wire: &[u8]) {
    assert_eq!(wire::strict_end(wire), None, "{wire:?}");
    assert_eq!(wire::postfix_end(wire), None, "{wire:?}");
    assert_eq!(wire::lenient_end(wire), None, "{wire:?}");
}

fn bdat_round_trip(size: usize, last: bool) {
    let mut line = b"x".to_vec();
    bdat_command(size, last, &mut line);
    let line = &line[1..];
    assert!(line.ends_with(b"\r\n") && memchr::memchr(b'\n', line) == Some(line.len() - 1));
    assert_eq!(
        parse(&line[..line.len() - 2]),
        Ok(Command::Bdat {
            size: size as u64,
            last
        }),
        "{line:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (seed, input) = common::take_seed(rest, 2);
    let opts = common::data_options(flags);

    // The checker: the model's verdicts and output, for every cut set.
    let whole = check(opts, &[input]);
    assert_eq!(whole, model(opts, input), "{input:?}");
    assert!(wire::no_bare(&whole.out), "{:?}", whole.out);
    if !whole.bare {
        assert_eq!(whole.out, input);
    } else if reject(opts) {
        assert!(whole.refused && input.starts_with(&whole.out));
    }
    let sets = common::cut_sets(seed, input.len());
    for cuts in &sets {
        let pieces = common::pieces(input, cuts);
        assert_eq!(check(opts, &pieces), whole, "cuts {cuts:?}");
    }

    // The relay path: what a DATA and a CHUNKING backend get.
    let stuffed_whole = stuff(&[&whole.out]);
    for cuts in &sets {
        let pieces = common::pieces(input, cuts);
        let r = relay(opts, &pieces);
        assert!(wire::no_bare(&r.stuffed), "{:?}", r.stuffed);
        let (content, ended) = read_bdat(&r.bdat);
        assert_eq!(ended, r.complete);
        if r.complete {
            assert!(!whole.refused);
            assert_eq!(r.stuffed, stuffed_whole, "cuts {cuts:?}");
            ends_at_end(&r.stuffed);
            assert_eq!(content, whole.out);
        } else {
            // Cut off at the refused piece: a prefix, never an end.
            assert!(whole.refused);
            never_ends(&r.stuffed);
            assert!(whole.out.starts_with(&content));
            assert!(stuffed_whole.starts_with(&r.stuffed));
        }
    }

    // Un-stuffing gives the content back (with a last CRLF when it had
    // none), however the wire is cut.
    let mut want = whole.out.clone();
    if !want.is_empty() && !want.ends_with(b"\n") {
        want.extend_from_slice(b"\r\n");
    }
    for cuts in [Vec::new(), common::cuts(seed >> 3, stuffed_whole.len(), 6)] {
        let (back, done) = common::unstuff(&common::pieces(&stuffed_whole, &cuts));
        assert!(done);
        assert_eq!(back, want, "cuts {cuts:?}");
    }

    // The Stuffer on raw content, bare endings and all: the same for
    // every cut set and never an early end; ready again after `finish`.
    let raw = stuff(&[input]);
    let n = Some(raw.len());
    // A strict reader may not see the end after a bare LF (never the
    // checker's output), but never sees it early.
    let strict = wire::strict_end(&raw);
    assert!(strict.is_none() || strict == n, "{raw:?}");
    assert_eq!(wire::postfix_end(&raw), n, "{raw:?}");
    assert_eq!(wire::lenient_end(&raw), n, "{raw:?}");
    for cuts in &sets {
        assert_eq!(stuff(&common::pieces(input, cuts)), raw, "cuts {cuts:?}");
    }
    let mut s = Stuffer::new();
    let mut two = Vec::new();
    s.feed(input, &mut two);
    s.finish(&mut two);
    s.feed(input, &mut two);
    s.finish(&mut two);
    assert_eq!(two, [&raw[..], &raw[..]].concat());

    // BDAT lines: the parser on any line, and what bdat_command writes.
    let line_end = memchr::memchr(b'\n', input).unwrap_or(input.len());
    for line in [
        [&b"BDAT "[..], &input[..line_end]].concat(),
        [&b"bdat\t"[..], &input[..line_end.min(24)], b" LAST\r"].concat(),
    ] {
        if let Ok(Command::Bdat { size, last }) = parse(&line) {
            bdat_round_trip(usize::try_from(size).unwrap(), last);
        }
    }
    let size = usize::try_from(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (seed % 64)).unwrap();
    bdat_round_trip(size, flags & 0x80 != 0);
    bdat_round_trip(input.len(), flags & 0x40 != 0);
    bdat_round_trip(usize::MAX, true);
});
