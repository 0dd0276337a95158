//! The BDAT content checker's verdicts, and a byte-at-a-time reference
//! model of them, shared by the unit tests of src/smtp/bdat.rs and the
//! fuzz/ `bdat` target (each includes this file with `#[path]`; the
//! including module has `ChunkChecker`, `DataOptions` and
//! `BareLineEndings` in scope).
#![allow(dead_code)]

use super::{BareLineEndings, ChunkChecker, DataOptions};

/// What the checker says about the whole content.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub out: Vec<u8>,
    pub bare: bool,
    pub long: bool,
    pub refused: bool,
    pub size: u64,
}

/// `ChunkChecker` fed `pieces` in turn, then finished; `each` sees the
/// checker after every piece.
pub fn check_pieces(opts: DataOptions, pieces: &[&[u8]], each: impl Fn(&ChunkChecker)) -> Checked {
    let mut c = ChunkChecker::new(opts);
    let mut out = Vec::new();
    for p in pieces {
        c.feed(p, &mut out);
        each(&c);
    }
    c.finish(&mut out);
    Checked {
        out,
        bare: c.bare_line_ending_seen(),
        long: c.long_line_seen(),
        refused: c.refused(),
        size: c.size(),
    }
}

/// The checker, byte at a time, the obvious way.
pub fn model(opts: DataOptions, input: &[u8]) -> Checked {
    let limit = match opts.max_line {
        0 => usize::MAX,
        m => m.saturating_sub(2),
    };
    let reject = opts.bare_line_endings == BareLineEndings::Reject;
    let (mut out, mut bare, mut long, mut stopped, mut line) =
        (Vec::new(), false, false, false, 0usize);
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'\r' || b == b'\n' {
            let pair = b == b'\r' && input.get(i + 1) == Some(&b'\n');
            if pair {
                i += 1;
            } else {
                bare = true;
                stopped |= reject;
            }
            line = 0;
            if !stopped {
                out.extend_from_slice(b"\r\n");
            }
        } else {
            line += 1;
            long |= line > limit;
            if !stopped {
                out.push(b);
            }
        }
        i += 1;
    }
    Checked {
        out,
        bare,
        long,
        refused: stopped || long,
        size: input.len() as u64,
    }
}
