//! Wire-form helpers for tests of the DATA path, shared by the unit tests
//! of src/smtp/data.rs, tests/props.rs and the fuzz/ `data` target (each
//! includes this file with `#[path]`): how a client dot-stuffs, where a
//! Postfix-like reader sees the end of data, and whether bytes hold a bare
//! CR or LF.
#![allow(dead_code)]

/// Dot-stuffs content the way a client does.
pub fn stuff(content: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(content.len() + 8);
    let mut at_start = true;
    for &b in content {
        if at_start && b == b'.' {
            wire.push(b'.');
        }
        wire.push(b);
        at_start = b == b'\n';
    }
    wire
}

/// A reader like Postfix's: a line ends at LF, trailing CRs are stripped,
/// a line that is then "." ends the data. Returns where the data ends.
pub fn postfix_end(wire: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(off) = wire[start..].iter().position(|&b| b == b'\n') {
        let mut line = &wire[start..start + off];
        while let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        start += off + 1;
        if line == b"." {
            return Some(start);
        }
    }
    None
}

/// No CR without an LF after it, no LF without a CR before it.
pub fn no_bare(wire: &[u8]) -> bool {
    (0..wire.len()).all(|i| match wire[i] {
        b'\r' => wire.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && wire[i - 1] == b'\r',
        _ => true,
    })
}
