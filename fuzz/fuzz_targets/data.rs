//! Fuzz target: the DATA scanner (`DataScanner`) and the `Unstuffer`.
//! However the input is cut: the same output, the same `Scan::End {
//! consumed }` and the same flags. Whatever goes to a DATA backend holds no
//! bare CR or LF and no line that ends the data before the final
//! terminator, read strictly (`<CRLF>.<CRLF>`) or as Postfix reads it (LF
//! ends a line, trailing CRs stripped), in both `BareLineEndings` modes.
//! Clean input passes through unchanged, and the `Unstuffer` gives the
//! same content however its input is cut.
#![no_main]

mod common;
#[path = "../../tests/support/wire.rs"]
mod wire;

use libfuzzer_sys::fuzz_target;
use smtp_edge::smtp::{BareLineEndings, DataOptions, DataScanner, Scan};

#[derive(Debug, PartialEq)]
struct Outcome {
    out: Vec<u8>,
    scan: Scan,
    bare: bool,
    long: bool,
    size: u64,
}

fn scan(opts: DataOptions, discard_at: Option<usize>, pieces: &[&[u8]]) -> Outcome {
    let mut s = DataScanner::new(opts);
    let mut out = Vec::new();
    let mut scan = Scan::More;
    let mut start = 0;
    for (i, piece) in pieces.iter().enumerate() {
        if discard_at == Some(i) {
            s.set_discard();
        }
        if let Scan::End { consumed } = s.feed(piece, &mut out) {
            assert!(consumed <= piece.len());
            scan = Scan::End {
                consumed: start + consumed,
            };
            // Fed again, it takes nothing more.
            assert_eq!(s.feed(b"x\r\n.\r\n", &mut out), Scan::End { consumed: 0 });
            break;
        }
        start += piece.len();
    }
    assert_eq!(s.is_done(), matches!(scan, Scan::End { .. }));
    Outcome {
        out,
        scan,
        bare: s.bare_line_ending_seen(),
        long: s.long_line_seen(),
        size: s.size(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (seed, input) = common::take_seed(rest, 2);
    let opts = common::data_options(flags);
    let mode = opts.bare_line_endings;
    let whole = scan(opts, None, &[input]);
    for cuts in common::cut_sets(seed, input.len()) {
        let pieces = common::pieces(input, &cuts);
        assert_eq!(scan(opts, None, &pieces), whole, "cuts {cuts:?}");
        // Discarding from some piece on: the same end and flags, and the
        // output a prefix of the full output.
        let at = (seed as usize >> 16) % pieces.len();
        let d = scan(opts, Some(at), &pieces);
        assert_eq!(
            (d.scan, d.bare, d.long, d.size),
            (whole.scan, whole.bare, whole.long, whole.size)
        );
        assert!(whole.out.starts_with(&d.out));
    }

    let out = &whole.out;
    assert!(wire::no_bare(out), "{out:?}");
    match whole.scan {
        Scan::End { consumed } => {
            assert!(consumed >= 3 && consumed <= input.len());
            assert_eq!(whole.size, consumed as u64 - 3);
            if whole.bare && mode == BareLineEndings::Reject {
                // Output stopped at the bare line ending: it never ends a
                // DATA (the session drops the backend connection).
                assert_eq!(wire::strict_end(out), None, "{out:?}");
                assert_eq!(wire::postfix_end(out), None, "{out:?}");
                assert!(input.starts_with(out));
            } else {
                assert_eq!(wire::strict_end(out), Some(out.len()), "{out:?}");
                assert_eq!(wire::postfix_end(out), Some(out.len()), "{out:?}");
                if !whole.bare {
                    assert_eq!(out[..], input[..consumed]);
                }
            }
            let (content, done) = common::unstuff(&[out]);
            assert!(done || (whole.bare && mode == BareLineEndings::Reject));
            assert!(content.len() <= out.len());
        }
        Scan::More => {
            assert_eq!(whole.size, input.len() as u64);
            assert_eq!(wire::strict_end(out), None, "{out:?}");
            assert_eq!(wire::postfix_end(out), None, "{out:?}");
            if !whole.bare {
                assert!(input.starts_with(out));
            }
        }
    }

    // The unstuffer on any wire input: cuts do not matter.
    let un = common::unstuff(&[input]);
    for cuts in [
        common::cuts(seed, input.len(), 6),
        (1..input.len()).collect(),
    ] {
        assert_eq!(
            common::unstuff(&common::pieces(input, &cuts)),
            un,
            "cuts {cuts:?}"
        );
    }
});
