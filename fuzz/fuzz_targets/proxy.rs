//! Fuzz target: the PROXY header judge (`proxy::scan`). No panic; a
//! `Complete { len }` never claims more bytes than it was given; and fed
//! growing prefixes, as `read_header` feeds it from the socket, the first
//! verdict that is not `Incomplete` is the whole input's verdict: a
//! complete header is judged complete exactly once its last byte is there
//! (never earlier, never a different length), so the bytes after it stay
//! the session's.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use smtp_edge::proxy_protocol::{scan, Scan, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let (seed, input) = common::take_seed(data, 2);
    let whole = scan(input);
    if let Scan::Complete { len, .. } = &whole {
        assert!(*len <= input.len() && *len <= MAX_HEADER, "{len}");
        // Every prefix that holds the header gives the same verdict, every
        // shorter one waits for more.
        for k in 0..=input.len() {
            let s = scan(&input[..k]);
            if k >= *len {
                assert_eq!(s, whole, "prefix {k}");
            } else {
                assert_eq!(s, Scan::Incomplete, "prefix {k}");
            }
        }
    }
    for cuts in common::cut_sets(seed, input.len()) {
        let first = cuts
            .iter()
            .chain(std::iter::once(&input.len()))
            .map(|&k| scan(&input[..k]))
            .find(|s| *s != Scan::Incomplete)
            .unwrap_or(Scan::Incomplete);
        match (&first, &whole) {
            // An invalid start may be seen before the reason the whole
            // input gives (e.g. too long vs. malformed): both close.
            (Scan::Invalid(_), Scan::Invalid(_)) => {}
            _ => assert_eq!(first, whole, "cuts {cuts:?}"),
        }
    }
});
