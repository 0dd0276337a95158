//! Test messages: size distributions, the message content generated once per
//! size (headers + 76-character CRLF lines, no line starting with '.'), and the
//! pre-built SMTP command bytes for a transaction.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// The placeholder for a number unique per recipient across a whole run.
pub const SEQ: &str = "{seq}";

/// Address of recipient `i` (1-based) out of `n`: a `{n}` in the pattern is
/// replaced by the index; without one, and with more than one recipient, the
/// index goes before the '@' (`rcpt@example.org` → `rcpt1@example.org`, …),
/// unless the pattern has a `{seq}` (left in place, see [`with_seq`]): every
/// recipient is then distinct already.
pub fn recipient(pattern: &str, i: usize, n: usize) -> String {
    if pattern.contains("{n}") {
        return pattern.replace("{n}", &i.to_string());
    }
    if n <= 1 || pattern.contains(SEQ) {
        return pattern.to_string();
    }
    match pattern.rfind('@') {
        Some(at) => format!("{}{}{}", &pattern[..at], i, &pattern[at..]),
        None => format!("{pattern}{i}"),
    }
}

/// An address with its `{seq}` replaced by `seq`.
pub fn with_seq(address: &str, seq: u64) -> String {
    address.replace(SEQ, &seq.to_string())
}

/// The run's `{seq}` counter: every recipient that takes a number gets the
/// next one, whichever connection sends it, so no address repeats within a
/// run (a dictionary attack's fresh addresses).
#[derive(Debug)]
pub struct Seq(AtomicU64);

impl Seq {
    pub fn new(first: u64) -> Seq {
        Seq(AtomicU64::new(first))
    }

    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// One message's MAIL, RCPTs and DATA with fresh `{seq}` numbers, built
/// anew per message (with a `{seq}` recipient pattern only; otherwise the
/// template's bytes, built once, go out). The buffers are reused.
#[derive(Debug, Default)]
pub struct Envelope {
    /// MAIL + RCPTs + DATA, as pipelined.
    block: Vec<u8>,
    /// Where the MAIL line ends in `block`.
    mail_end: usize,
    /// One `RCPT TO:<..>\r\n` per recipient.
    rcpts: Vec<Vec<u8>>,
}

impl Envelope {
    /// Fills in `mail` (the MAIL line, with or without SIZE) and one RCPT
    /// per address of `addresses`, each `{seq}` from `seq`.
    pub fn fill(&mut self, mail: &[u8], addresses: &[String], seq: &Seq) {
        use std::io::Write;
        self.block.clear();
        self.block.extend_from_slice(mail);
        self.mail_end = mail.len();
        self.rcpts.resize_with(addresses.len(), Vec::new);
        for (r, a) in self.rcpts.iter_mut().zip(addresses) {
            r.clear();
            let _ = write!(r, "RCPT TO:<{}>\r\n", with_seq(a, seq.next()));
            self.block.extend_from_slice(r);
        }
        self.block.extend_from_slice(b"DATA\r\n");
    }

    pub fn mail(&self) -> &[u8] {
        &self.block[..self.mail_end]
    }

    pub fn rcpts(&self) -> &[Vec<u8>] {
        &self.rcpts
    }

    /// MAIL + RCPTs + DATA in one buffer.
    pub fn pipelined(&self) -> &[u8] {
        &self.block
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
    /// With a `{seq}` in the recipient pattern: the recipients' addresses,
    /// `{seq}` still in them, for an [`Envelope`] per message (the
    /// templates' RCPT bytes are then not sent).
    pub seq_rcpts: Option<Vec<String>>,
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
            seq_rcpts: to.contains(SEQ).then_some(rcpt_addrs),
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
        // {seq} stays for the send; no index is added next to it.
        assert_eq!(recipient("nouser{seq}@x.org", 2, 3), "nouser{seq}@x.org");
        assert_eq!(recipient("u{n}.{seq}@x.org", 2, 3), "u2.{seq}@x.org");
        assert_eq!(with_seq("u2.{seq}@x.org", 17), "u2.17@x.org");
    }

    #[test]
    fn seq_recipients_never_repeat() {
        let p = MessagePlan::new(SizeDist::fixed(1000), "s@x.org", "nouser{seq}@y.org", 3);
        let addrs = p.seq_rcpts.as_deref().unwrap();
        assert_eq!(addrs, ["nouser{seq}@y.org"; 3]);
        assert!(
            MessagePlan::new(SizeDist::fixed(1000), "s@x.org", "u{n}@y.org", 3)
                .seq_rcpts
                .is_none()
        );
        let seq = Seq::new(1);
        let mut e = Envelope::default();
        e.fill(b"MAIL FROM:<s@x.org>\r\n", addrs, &seq);
        assert_eq!(
            e.pipelined(),
            b"MAIL FROM:<s@x.org>\r\nRCPT TO:<nouser1@y.org>\r\nRCPT TO:<nouser2@y.org>\r\n\
              RCPT TO:<nouser3@y.org>\r\nDATA\r\n"
        );
        assert_eq!(e.mail(), b"MAIL FROM:<s@x.org>\r\n");
        assert_eq!(e.rcpts()[1], b"RCPT TO:<nouser2@y.org>\r\n");
        // The buffers are reused: the next message continues the count.
        e.fill(b"MAIL FROM:<s@x.org> SIZE=9\r\n", &addrs[..2], &seq);
        assert_eq!(e.rcpts().len(), 2);
        assert_eq!(e.rcpts()[0], b"RCPT TO:<nouser4@y.org>\r\n");
        assert!(e.pipelined().ends_with(b"<nouser5@y.org>\r\nDATA\r\n"));
        // Shared by concurrent senders: every number once.
        let seq = Arc::new(Seq::new(1));
        let got: Vec<u64> = (0..4)
            .map(|_| {
                let seq = seq.clone();
                std::thread::spawn(move || (0..1000).map(|_| seq.next()).collect::<Vec<_>>())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let distinct: std::collections::HashSet<u64> = got.iter().copied().collect();
        assert_eq!((got.len(), distinct.len()), (4000, 4000));
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
