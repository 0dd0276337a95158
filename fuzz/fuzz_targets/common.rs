//! What the targets share: the ways an input is cut into the pieces a
//! streaming parser is fed (the network decides the cuts, so every target
//! that parses a stream checks that they do not matter).
#![allow(dead_code)]

/// Up to `n` cut positions in `0..=len`, sorted, drawn from `seed` (a few
/// bytes of the fuzz input, so libFuzzer steers where the cuts fall).
pub fn cuts(seed: u64, len: usize, n: usize) -> Vec<usize> {
    let mut s = seed | 1;
    let mut v: Vec<usize> = (0..n)
        .map(|_| {
            // xorshift64
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % (len as u64 + 1)) as usize
        })
        .collect();
    v.sort_unstable();
    v
}

/// The pieces `input` falls into at `cuts` (sorted positions).
pub fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts.iter().chain(std::iter::once(&input.len())) {
        out.push(&input[start..c]);
        start = c;
    }
    out
}

/// The cut sets a target tries: none (whole), every byte, the drawn ones,
/// and (for short inputs) every single cut.
pub fn cut_sets(seed: u64, len: usize) -> Vec<Vec<usize>> {
    let mut sets = vec![Vec::new(), (1..len).collect(), cuts(seed, len, 8)];
    if len <= 128 {
        sets.extend((0..=len).map(|k| vec![k]));
    }
    sets
}

/// Splits the fuzz input into a little-endian seed from its first bytes
/// (up to `n`) and the rest.
pub fn take_seed(data: &[u8], n: usize) -> (u64, &[u8]) {
    let n = n.min(data.len());
    let seed = data[..n]
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    (seed, &data[n..])
}

/// The DATA options a flags byte picks (bit 0: bare line endings rejected or
/// normalized; the rest: one of a few `max_line` limits, 0 = none), for the
/// targets that feed message content.
pub fn data_options(flags: u8) -> smtp_edge::smtp::DataOptions {
    use smtp_edge::smtp::{BareLineEndings, DataOptions};
    DataOptions {
        bare_line_endings: if flags & 1 == 0 {
            BareLineEndings::Reject
        } else {
            BareLineEndings::Normalize
        },
        max_line: [0, 1, 3, 4, 10, 1000][usize::from(flags >> 1) % 6],
    }
}

/// `Unstuffer` fed `pieces` in turn: the content, and whether it saw the
/// end of data.
pub fn unstuff(pieces: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut u = smtp_edge::smtp::Unstuffer::new();
    let mut out = Vec::new();
    for p in pieces {
        u.feed(p, &mut out);
    }
    (out, u.is_done())
}
