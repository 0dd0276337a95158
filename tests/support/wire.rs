//! Wire-form helpers for tests of the DATA path, shared by the unit tests
//! of src/smtp/data.rs, tests/props.rs and the fuzz/ `data` and `bdat`
//! targets (each includes this file with `#[path]`): how a client
//! dot-stuffs, where a strict, a Postfix-like and a lenient reader see the
//! end of data, and whether bytes hold a bare CR or LF.
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

/// A strict reader (`<CRLF>.<CRLF>`, the data starting at a line start):
/// where the data ends.
pub fn strict_end(wire: &[u8]) -> Option<usize> {
    if wire.starts_with(b".\r\n") {
        return Some(3);
    }
    memchr::memmem::find(wire, b"\r\n.\r\n").map(|i| i + 5)
}

/// A lenient reader (a line ends at CR or at LF, as old Sendmail, Postfix
/// before 3.9 with bare LF, or a `\r.\r` reader): where it sees the first
/// line that is exactly `.`; the index just past that line's ending (CRs
/// and one LF).
pub fn lenient_end(wire: &[u8]) -> Option<usize> {
    let brk = |b: u8| b == b'\r' || b == b'\n';
    let i = (0..wire.len()).find(|&i| {
        (i == 0 || brk(wire[i - 1])) && wire[i] == b'.' && wire.get(i + 1).is_some_and(|&b| brk(b))
    })?;
    let mut e = i + 1;
    while wire.get(e) == Some(&b'\r') {
        e += 1;
    }
    if wire.get(e) == Some(&b'\n') {
        e += 1;
    }
    Some(e)
}

/// No CR without an LF after it, no LF without a CR before it.
pub fn no_bare(wire: &[u8]) -> bool {
    (0..wire.len()).all(|i| match wire[i] {
        b'\r' => wire.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && wire[i - 1] == b'\r',
        _ => true,
    })
}
