//! Per-message ids and the outcome log (`run --outcomes FILE`): each message
//! carries an `X-Load-Id: <id>` header and a last body line `load-end <id>`
//! (so a stored copy can be told complete), and the log says, per id, what
//! the client was told: the deciding reply code and the stage it came at, or
//! `none` and how far the message got. [`crate::account`] reads it back.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::message::MessageTemplate;
use crate::stats::{Stage, STAGE_NAMES};

/// The header line that names a message (`X-Load-Id: <id>`).
pub const ID_HEADER: &str = "X-Load-Id: ";
/// The last body line of a message (`load-end <id>`): a stored copy without
/// it is incomplete (a backend killed while writing it).
pub const END_LINE: &str = "load-end ";

/// Writes message `id` of `tmpl` in wire form into `out` (cleared first):
/// the id header, the template's content, the end line, `.`, and `QUIT`
/// when `quit`.
pub fn stamped(tmpl: &MessageTemplate, id: &str, quit: bool, out: &mut Vec<u8>) {
    out.clear();
    let content = &tmpl.data_dot[..tmpl.data_dot.len() - 3];
    let _ = write!(out, "{ID_HEADER}{id}\r\n");
    out.extend_from_slice(content);
    let _ = write!(out, "{END_LINE}{id}\r\n.\r\n");
    if quit {
        out.extend_from_slice(b"QUIT\r\n");
    }
}

/// What a client was told about one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub id: String,
    /// The deciding reply: the final reply, or the first refusal on the way
    /// (greeting, EHLO, MAIL, RCPT, DATA). `None`: no final reply (an
    /// error or timeout ended the message).
    pub code: Option<u16>,
    /// Where it was decided, or for `code == None` how far it got: `final`
    /// means the whole message and its dot were written.
    pub stage: String,
    /// Seconds from the start of the run to the end of the message.
    pub t: f64,
    /// Seconds the message took (from its start, or in the open loop from
    /// its scheduled time, including a connect for a new session).
    pub latency: f64,
}

impl Outcome {
    /// True when the whole message, dot included, went out: only such a
    /// message can have been stored by a backend.
    pub fn dot_sent(&self) -> bool {
        self.stage == STAGE_NAMES[Stage::Final as usize]
    }

    /// One line of the log: `id code|none stage t latency` (tab-separated,
    /// seconds).
    pub fn line(&self) -> String {
        let code = self.code.map_or("none".to_string(), |c| c.to_string());
        format!(
            "{}\t{code}\t{}\t{:.3}\t{:.4}\n",
            self.id, self.stage, self.t, self.latency
        )
    }

    /// Parses one log line; `None` for a malformed one.
    pub fn parse(line: &str) -> Option<Outcome> {
        let mut f = line.split('\t');
        let id = f.next()?.to_string();
        let code = match f.next()? {
            "none" => None,
            c => Some(c.parse().ok()?),
        };
        let stage = f.next()?.to_string();
        let t = f.next()?.trim().parse().ok()?;
        let latency = f.next()?.trim().parse().ok()?;
        (!id.is_empty()).then_some(Outcome {
            id,
            code,
            stage,
            t,
            latency,
        })
    }
}

/// Reads an outcome log; an error names the first malformed line.
pub fn read_log(path: &Path) -> Result<Vec<Outcome>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            Outcome::parse(l)
                .ok_or_else(|| format!("{}:{}: malformed: {l:?}", path.display(), i + 1))
        })
        .collect()
}

/// The ids a run hands out and the outcomes it collects (shared by the
/// workers; one lock per message, only when the log is asked for).
#[derive(Debug)]
pub struct Ids {
    prefix: String,
    next: AtomicU64,
    log: Mutex<Vec<Outcome>>,
}

impl Ids {
    pub fn new(prefix: &str) -> Ids {
        Ids {
            prefix: prefix.to_string(),
            next: AtomicU64::new(1),
            log: Mutex::new(Vec::new()),
        }
    }

    /// The next message's id: `<prefix>-<n>`, n from 1.
    pub fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub fn record(&self, o: Outcome) {
        if let Ok(mut v) = self.log.lock() {
            v.push(o);
        }
    }

    /// Writes the log, one line per message in the order they ended.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let v = self
            .log
            .lock()
            .map_err(|_| "outcome log poisoned".to_string())?;
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        for o in v.iter() {
            out.write_all(o.line().as_bytes())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        out.flush().map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// How one message was decided, tracked while it is sent.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    /// The deciding reply, once there is one.
    pub reply: Option<(Stage, u16)>,
    /// The last stage whose command went out (`Final`: the dot was written).
    pub reached: Stage,
}

impl Default for Decision {
    fn default() -> Decision {
        Decision {
            reply: None,
            reached: Stage::Greeting,
        }
    }
}

impl Decision {
    /// Notes a reply: the first refusal decides, else the final reply.
    pub fn reply(&mut self, stage: Stage, code: u16) {
        let refusal = !(200..400).contains(&code);
        let counts = matches!(
            stage,
            Stage::Greeting
                | Stage::Ehlo
                | Stage::Starttls
                | Stage::Mail
                | Stage::Rcpt
                | Stage::Data
        ) && refusal
            || stage == Stage::Final;
        if counts && self.reply.is_none() {
            self.reply = Some((stage, code));
        }
    }

    pub fn outcome(&self, id: String, t: f64, latency: f64) -> Outcome {
        let (stage, code) = match self.reply {
            Some((s, c)) => (s, Some(c)),
            None => (self.reached, None),
        };
        Outcome {
            id,
            code,
            stage: STAGE_NAMES[stage as usize].to_string(),
            t,
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessagePlan, SizeDist};

    #[test]
    fn stamped_message_has_id_header_and_end_line() {
        let p = MessagePlan::new(SizeDist::fixed(600), "s@x.org", "r@y.org", 1);
        let mut buf = Vec::new();
        stamped(&p.templates[0], "run-7", true, &mut buf);
        let text = String::from_utf8(buf).unwrap();
        assert!(text.starts_with("X-Load-Id: run-7\r\nFrom: <s@x.org>\r\n"));
        assert!(
            text.ends_with("\r\nload-end run-7\r\n.\r\nQUIT\r\n"),
            "{text}"
        );
    }

    #[test]
    fn log_lines_round_trip() {
        let mut d = Decision::default();
        d.reply(Stage::Mail, 250);
        d.reply(Stage::Rcpt, 451);
        d.reply(Stage::Data, 503);
        let o = d.outcome("a-1".into(), 1.5, 0.25);
        assert_eq!((o.code, o.stage.as_str()), (Some(451), "rcpt"));
        assert_eq!(Outcome::parse(&o.line()), Some(o));
        let mut d = Decision::default();
        d.reply(Stage::Data, 354);
        d.reached = Stage::Final;
        let o = d.outcome("a-2".into(), 2.0, 0.0);
        assert!(o.dot_sent() && o.code.is_none());
        assert_eq!(Outcome::parse(&o.line()), Some(o));
        let mut d = Decision::default();
        d.reply(Stage::Final, 250);
        assert_eq!(d.outcome("a-3".into(), 0.0, 1.0).code, Some(250));
        assert_eq!(Outcome::parse("x\t25z\tfinal\t1\t1"), None);
        assert_eq!(Outcome::parse("garbage"), None);
    }
}
