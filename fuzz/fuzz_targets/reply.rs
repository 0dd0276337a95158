//! Fuzz target: the backend reply parser (`Reply::parse`), fed the way the
//! relay feeds it: bytes arrive in pieces, complete replies are taken off
//! the front of the buffer. No panic; however the input is cut, the same
//! replies and the same verdict (error or not); the unparsed rest stays
//! bounded (`MAX_REPLY_LINE` x `MAX_REPLY_LINES`); and a reply written
//! with `write_to` parses back to itself.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use smtp_edge::smtp::reply::{MAX_REPLY_LINE, MAX_REPLY_LINES};
use smtp_edge::smtp::{Reply, ReplyError};

/// Most bytes an incomplete reply may hold before the parser refuses it.
const BOUND: usize = MAX_REPLY_LINE * MAX_REPLY_LINES;

#[derive(Debug, PartialEq)]
struct Outcome {
    replies: Vec<Reply>,
    error: Option<ReplyError>,
    /// Bytes left unparsed at the end (no error).
    rest: usize,
}

fn feed(pieces: &[&[u8]]) -> Outcome {
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match Reply::parse(&buf) {
                Ok(Some((r, used))) => {
                    assert!(used > 0 && used <= buf.len());
                    replies.push(r);
                    buf.drain(..used);
                }
                Ok(None) => {
                    assert!(buf.len() < BOUND, "{} bytes held", buf.len());
                    break;
                }
                Err(e) => {
                    return Outcome {
                        replies,
                        error: Some(e),
                        rest: 0,
                    }
                }
            }
        }
    }
    Outcome {
        replies,
        error: None,
        rest: buf.len(),
    }
}

fuzz_target!(|data: &[u8]| {
    let (seed, input) = common::take_seed(data, 2);
    let whole = feed(&[input]);
    for cuts in common::cut_sets(seed, input.len()) {
        let o = feed(&common::pieces(input, &cuts));
        assert_eq!(o.replies, whole.replies, "cuts {cuts:?}");
        assert_eq!(o.error.is_some(), whole.error.is_some(), "cuts {cuts:?}");
        assert_eq!(o.rest, whole.rest, "cuts {cuts:?}");
    }
    for r in &whole.replies {
        let mut wire = Vec::new();
        r.write_to(&mut wire);
        // Written lines carry the enhanced code on each line, so a line
        // near the limit may come out longer than the parser takes.
        if wire
            .split(|&b| b == b'\n')
            .all(|l| l.len() < MAX_REPLY_LINE)
        {
            let (again, used) = Reply::parse(&wire)
                .unwrap_or_else(|e| panic!("{r:?} -> {wire:?}: {e}"))
                .unwrap_or_else(|| panic!("{r:?} -> {wire:?}: incomplete"));
            assert_eq!(used, wire.len());
            assert_eq!(&again, r, "{wire:?}");
        }
    }
});
