//! Test messages: size distributions, the message content generated once per
//! size (headers + 76-character CRLF lines, no line starting with '.'), and the
//! pre-built SMTP command bytes for a transaction.

use std::sync::Arc;

/// Length of a body line's text, before its CRLF.
pub const LINE_TEXT: usize = 76;

/// A weighted set of message sizes, e.g. `4096:70,102400:30`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeDist {
    /// (size in bytes, weight); weights are > 0.
    pub entries: Vec<(usize, u32)>,
    total_weight: u64,
}

impl SizeDist {
    /// One fixed size.
    pub fn fixed(size: usize) -> SizeDist {
        SizeDist {
            entries: vec![(size, 1)],
            total_weight: 1,
        }
    }

    /// Parses `SIZE:WEIGHT,SIZE:WEIGHT,...`; a bare `SIZE` has weight 1.
    /// Sizes accept a `k`/`K` (×1024) or `m`/`M` (×1048576) suffix.
    pub fn parse(s: &str) -> Result<SizeDist, String> {
        let mut entries = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (size, weight) = match part.split_once(':') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, "1"),
            };
            let size = parse_size(size)?;
            let weight: u32 = weight
                .parse()
                .map_err(|_| format!("bad weight {weight:?} in size distribution {s:?}"))?;
            if weight == 0 {
                continue;
            }
            entries.push((size, weight));
        }
        if entries.is_empty() {
            return Err(format!(
                "size distribution {s:?} has no entry with a weight > 0"
            ));
        }
        let total_weight = entries.iter().map(|e| e.1 as u64).sum();
        Ok(SizeDist {
            entries,
            total_weight,
        })
    }

    /// Index of the entry that a uniform random `r` picks.
    pub fn pick(&self, r: u64) -> usize {
        if self.entries.len() == 1 {
            return 0;
        }
        let mut x = r % self.total_weight;
        for (i, e) in self.entries.iter().enumerate() {
            if x < e.1 as u64 {
                return i;
            }
            x -= e.1 as u64;
        }
        self.entries.len() - 1
    }
}

/// Parses a byte count with an optional k/m suffix (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1024),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("bad size {s:?} (bytes, or with a k/m suffix)"))?;
    n.checked_mul(mult)
        .filter(|&n| n <= 1 << 30)
        .ok_or_else(|| format!("size {s:?} is too large (at most 1 GiB)"))
}

/// Generates message content of exactly `size` bytes (before the terminating
/// `.` line): a few headers, an empty line, then lines of 76 letters and CRLF,
/// the last one shorter. No line starts with '.', every line ends in CRLF.
/// Sizes below the minimum header block (about 100 bytes) come out at that
/// minimum instead.
pub fn generate_content(size: usize, from: &str, to: &str) -> Vec<u8> {
    let header = |pad: &str| {
        format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: smtp-load test message of {size} bytes{pad}\r\n\
             Message-ID: <smtp-load.{size}@smtp-load.invalid>\r\n\r\n"
        )
    };
    let mut out = Vec::with_capacity(size + 8);
    out.extend_from_slice(header("").as_bytes());
    let mut remaining = size.saturating_sub(out.len());
    if remaining == 1 {
        // A 1-byte line cannot end in CRLF: lengthen the Subject instead.
        out.clear();
        out.extend_from_slice(header(".").as_bytes());
        remaining = 0;
    }
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut k = 0usize;
    while remaining > 0 {
        // Full line: 76 + CRLF = 78. Never leave exactly 1 byte for the end.
        let mut line = remaining.min(LINE_TEXT + 2);
        if remaining - line == 1 {
            line -= 1;
        }
        for _ in 0..line - 2 {
            out.push(ALPHABET[k % ALPHABET.len()]);
            k += 1;
        }
        out.extend_from_slice(b"\r\n");
        remaining -= line;
    }
    out
}

/// Address of recipient `i` (1-based) out of `n`: a `{n}` in the pattern is
/// replaced by the index; without one, and with more than one recipient, the
/// index goes before the '@' (`rcpt@example.org` → `rcpt1@example.org`, …).
pub fn recipient(pattern: &str, i: usize, n: usize) -> String {
    if pattern.contains("{n}") {
        return pattern.replace("{n}", &i.to_string());
    }
    if n <= 1 {
        return pattern.to_string();
    }
    match pattern.rfind('@') {
        Some(at) => format!("{}{}{}", &pattern[..at], i, &pattern[at..]),
        None => format!("{pattern}{i}"),
    }
}

/// Everything that is sent for one message of one size, built once.
#[derive(Debug)]
pub struct MessageTemplate {
    /// Content size in bytes (without the final `.` line).
    pub size: usize,
    /// Content followed by `.\r\n`.
    pub data_dot: Arc<[u8]>,
    /// Content followed by `.\r\nQUIT\r\n` (last message on a pipelined connection).
    pub data_dot_quit: Arc<[u8]>,
    /// `MAIL FROM:<..>\r\n` without / with ` SIZE=n`.
    pub mail: Vec<u8>,
    pub mail_size: Vec<u8>,
    /// One `RCPT TO:<..>\r\n` per recipient.
    pub rcpts: Vec<Vec<u8>>,
    /// MAIL + RCPTs + DATA in one buffer (pipelined), without / with SIZE.
    pub pipelined: Vec<u8>,
    pub pipelined_size: Vec<u8>,
}

/// The messages a run sends: one template per size of the distribution.
#[derive(Debug)]
pub struct MessagePlan {
    pub dist: SizeDist,
    pub templates: Vec<MessageTemplate>,
    pub rcpts: usize,
}

impl MessagePlan {
    pub fn new(dist: SizeDist, from: &str, to: &str, rcpts: usize) -> MessagePlan {
        let rcpts = rcpts.max(1);
        let rcpt_addrs: Vec<String> = (1..=rcpts).map(|i| recipient(to, i, rcpts)).collect();
        let templates = dist
            .entries
            .iter()
            .map(|&(size, _)| {
                let content = generate_content(size, from, &rcpt_addrs[0]);
                let mut data_dot = content.clone();
                data_dot.extend_from_slice(b".\r\n");
                let mut data_dot_quit = data_dot.clone();
                data_dot_quit.extend_from_slice(b"QUIT\r\n");
                let mail = format!("MAIL FROM:<{from}>\r\n").into_bytes();
                let mail_size =
                    format!("MAIL FROM:<{from}> SIZE={}\r\n", content.len()).into_bytes();
                let rcpt_cmds: Vec<Vec<u8>> = rcpt_addrs
                    .iter()
                    .map(|a| format!("RCPT TO:<{a}>\r\n").into_bytes())
                    .collect();
                let block = |m: &[u8]| {
                    let mut v = m.to_vec();
                    for r in &rcpt_cmds {
                        v.extend_from_slice(r);
                    }
                    v.extend_from_slice(b"DATA\r\n");
                    v
                };
                MessageTemplate {
                    size: content.len(),
                    pipelined: block(&mail),
                    pipelined_size: block(&mail_size),
                    data_dot: data_dot.into(),
                    data_dot_quit: data_dot_quit.into(),
                    mail,
                    mail_size,
                    rcpts: rcpt_cmds,
                }
            })
            .collect();
        MessagePlan {
            dist,
            templates,
            rcpts,
        }
    }
}

/// A small fast PRNG (SplitMix64) for picking sizes; not for anything secret.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_has_exact_size_and_clean_lines() {
        for size in (0..400).chain([4096, 4097, 102_400, 1_000_001]) {
            let c = generate_content(size, "a@b.example", "c@d.example");
            if size >= 150 {
                assert_eq!(c.len(), size, "size {size}");
            } else {
                assert!(c.len() >= size);
            }
            assert!(c.ends_with(b"\r\n"));
            for line in c.split(|&b| b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                assert!(line.ends_with(b"\r"), "bare LF in size {size}");
                assert!(!line.starts_with(b"."), "dot line in size {size}");
                assert!(line.len() <= LINE_TEXT + 1);
                assert!(!line[..line.len() - 1].contains(&b'\r'));
            }
        }
    }

    #[test]
    fn size_dist_parses_and_picks_by_weight() {
        let d = SizeDist::parse("4096:70, 100k:30").unwrap();
        assert_eq!(d.entries, vec![(4096, 70), (102_400, 30)]);
        let mut counts = [0u32; 2];
        let mut rng = SplitMix64(1);
        for _ in 0..10_000 {
            counts[d.pick(rng.next_u64())] += 1;
        }
        assert!((6500..7500).contains(&counts[0]), "{counts:?}");
        assert!(SizeDist::parse("4096:x").is_err());
        assert!(SizeDist::parse("1:0").is_err());
        assert_eq!(SizeDist::parse("2m").unwrap().entries, vec![(2 << 20, 1)]);
    }

    #[test]
    fn recipients_get_an_index() {
        assert_eq!(recipient("rcpt@example.org", 1, 1), "rcpt@example.org");
        assert_eq!(recipient("rcpt@example.org", 2, 3), "rcpt2@example.org");
        assert_eq!(recipient("u{n}@x.org", 1, 1), "u1@x.org");
    }

    #[test]
    fn plan_builds_pipelined_blocks() {
        let p = MessagePlan::new(SizeDist::fixed(1000), "s@x.org", "r@y.org", 2);
        let t = &p.templates[0];
        assert_eq!(
            t.pipelined_size,
            b"MAIL FROM:<s@x.org> SIZE=1000\r\nRCPT TO:<r1@y.org>\r\nRCPT TO:<r2@y.org>\r\nDATA\r\n"
        );
        assert!(t.data_dot.ends_with(b"\r\n.\r\n"));
        assert!(t.data_dot_quit.ends_with(b"\r\n.\r\nQUIT\r\n"));
    }
}
