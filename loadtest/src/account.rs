//! No-loss accounting (`smtp-load account`): what every client was told
//! (the outcome log of `run --outcomes`) against what every backend stored
//! (every file under the given directories: smtp-sink `-d` dumps, Maildir
//! files). A stored copy counts when it has both the `X-Load-Id` header and
//! the `load-end` line of its id; one with the header only is a partial
//! dump (a backend killed while writing it) and does not count, nor does
//! a file in a Maildir's `tmp/` (a delivery cut short, never renamed into
//! `new/`: not delivered; counted as `maildir_tmp`). Each copy
//! is put down to the backend transaction that stored it: its store
//! directory and the `id` of its first `Received:` header (the backend's
//! own: smtp-sink's random id, Postfix's queue id).
//!
//! Rules: a message told 250 is stored exactly once (else `lost` or
//! `duplicated`); a message told anything else, or nothing, is not stored,
//! except when its dot went out and the reply to it never came back as a
//! 250 (`explained`: the backend stored it and its 250 was lost on the way
//! back, inherent to SMTP: the sender retries and the recipient may get it
//! twice). A stored message whose dot never went out, or stored in two
//! backend transactions, is a bug (`unexplained` / `duplicated`: relayed
//! twice). Two copies from one backend transaction (`redelivered`) are the
//! backend's doing: Postfix killed between writing a Maildir file and
//! marking the recipient done delivers it again (at-least-once delivery);
//! they are counted and shown, not failed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::outcome::{Outcome, END_LINE, ID_HEADER};

/// Stored copies per id, read from the store directories.
#[derive(Debug, Default)]
pub struct Store {
    /// Complete copies per id.
    pub copies: HashMap<String, u32>,
    /// The files holding each id's copies.
    pub paths: HashMap<String, Vec<PathBuf>>,
    /// The backend transactions (`store#transaction id`) that stored each id.
    pub txns: HashMap<String, HashSet<String>>,
    /// Files with an id header but no end line.
    pub partial: u64,
    /// Files read.
    pub files: u64,
    /// Files left in a Maildir's tmp/ (not counted: not delivered).
    pub maildir_tmp: u64,
}

fn is_maildir(dir: &Path) -> bool {
    ["new", "cur", "tmp"].iter().all(|d| dir.join(d).is_dir())
}

impl Store {
    /// Reads every file under `dirs` (recursively).
    pub fn scan(dirs: &[PathBuf]) -> Result<Store, String> {
        let mut s = Store::default();
        for (root, dir) in dirs.iter().enumerate() {
            let mut todo = vec![dir.clone()];
            while let Some(p) = todo.pop() {
                let meta = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                if meta.is_dir() {
                    for e in std::fs::read_dir(&p).map_err(|e| format!("{}: {e}", p.display()))? {
                        let e = e.map_err(|e| format!("{}: {e}", p.display()))?.path();
                        // A Maildir's tmp/ holds deliveries in progress (or
                        // cut short): not delivered until renamed into new/.
                        if is_maildir(&p) && e.file_name().is_some_and(|n| n == "tmp") {
                            s.maildir_tmp += std::fs::read_dir(&e).map_or(0, |d| d.count() as u64);
                            continue;
                        }
                        todo.push(e);
                    }
                } else if meta.is_file() {
                    s.add_file(root, &p)?;
                }
            }
        }
        Ok(s)
    }

    fn add_file(&mut self, root: usize, p: &Path) -> Result<(), String> {
        // A file that vanished meanwhile (smtp-sink removes an aborted
        // transaction's dump) was never stored.
        let bytes = match std::fs::read(p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", p.display())),
        };
        self.files += 1;
        let file = p.display().to_string();
        for id in self.add(&bytes, &root.to_string(), &file) {
            self.paths.entry(id).or_default().push(p.to_path_buf());
        }
        Ok(())
    }

    /// Counts one stored file's message(s) (an `-D`-style file with several
    /// messages counts each) of store `root`; returns the ids of the
    /// complete ones. A message whose backend transaction id cannot be
    /// found counts as a transaction of its own (`file`).
    pub fn add(&mut self, bytes: &[u8], root: &str, file: &str) -> Vec<String> {
        let mut ids = Vec::new();
        let text = String::from_utf8_lossy(bytes);
        let mut open: Option<&str> = None;
        // The first Received: header of the message at hand (with its
        // continuation lines), and the transaction id found in it.
        let mut received: Option<String> = None;
        let mut txn: Option<String> = None;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(r) = received.as_mut() {
                if line.starts_with([' ', '\t']) {
                    r.push(' ');
                    r.push_str(line);
                    continue;
                }
                txn = Some(transaction_id(r).unwrap_or(file).to_string());
                received = None;
            }
            if txn.is_none() && line.len() >= 9 && line[..9].eq_ignore_ascii_case("received:") {
                received = Some(line.to_string());
            } else if let Some(id) = line.strip_prefix(ID_HEADER) {
                if open.is_some() {
                    self.partial += 1;
                }
                open = Some(id.trim());
            } else if let Some(id) = line.strip_prefix(END_LINE) {
                if open == Some(id.trim()) {
                    let id = id.trim().to_string();
                    *self.copies.entry(id.clone()).or_default() += 1;
                    let t = txn.take().unwrap_or_else(|| file.to_string());
                    self.txns
                        .entry(id.clone())
                        .or_default()
                        .insert(format!("{root}#{t}"));
                    ids.push(id);
                    open = None;
                }
            }
        }
        if open.is_some() {
            self.partial += 1;
        }
        ids
    }
}

/// The word after ` id ` in a Received header (`... with ESMTP id
/// 4dQ7xY2kz9;` gives `4dQ7xY2kz9`).
fn transaction_id(received: &str) -> Option<&str> {
    let mut words = received.split_whitespace();
    while let Some(w) = words.next() {
        if w == "id" {
            return words
                .next()
                .map(|id| id.trim_end_matches(';'))
                .filter(|id| !id.is_empty());
        }
    }
    None
}

/// One message that breaks a rule, or an explained case.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub id: String,
    /// What the client was told: the code, or "none".
    pub told: String,
    pub stage: String,
    pub stored: u32,
    /// Seconds from the start of the run.
    pub t: f64,
    /// The files holding its copies.
    pub files: Vec<PathBuf>,
}

/// The accounting of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Accounting {
    pub sent: u64,
    /// Told 2xx at the end of data.
    pub ok: u64,
    pub temp: u64,
    pub perm: u64,
    /// No final reply (an error or timeout ended the message).
    pub no_reply: u64,
    /// Messages of the log with at least one complete stored copy.
    pub stored: u64,
    /// Told 250, stored nowhere.
    pub lost: u64,
    /// Stored by more than one backend transaction: relayed twice
    /// (whatever the client was told).
    pub duplicated: u64,
    /// Stored twice by one backend transaction (the backend delivered its
    /// queue file again after a crash): the backend's doing, not failed.
    pub redelivered: u64,
    /// Told 4xx/5xx or nothing after the dot went out, stored once: the
    /// backend's 250 was lost on the way back (inherent to SMTP).
    pub explained: u64,
    /// Stored though the client was refused before the dot went out: a bug.
    pub unexplained: u64,
    /// Partial dumps (id header, no end line): not counted as stored.
    pub partial: u64,
    /// Complete stored copies whose id the log does not have.
    pub unknown: u64,
    /// Files left in a Maildir's tmp/: deliveries cut short, not counted.
    pub maildir_tmp: u64,
    pub files: u64,
    /// The messages behind lost, duplicated, explained and unexplained
    /// (at most 50 of each; the table shows 5).
    pub cases: Vec<(String, Case)>,
    /// Zero lost, zero duplicated, zero unexplained.
    pub pass: bool,
}

const MAX_CASES: usize = 50;
/// Cases of each kind the table shows.
const TABLE_CASES: usize = 5;

impl Accounting {
    pub fn compute(log: &[Outcome], store: &Store) -> Accounting {
        let mut a = Accounting {
            partial: store.partial,
            files: store.files,
            maildir_tmp: store.maildir_tmp,
            ..Accounting::default()
        };
        let mut seen = std::collections::HashSet::with_capacity(log.len());
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for o in log {
            seen.insert(o.id.as_str());
            a.sent += 1;
            let n = store.copies.get(&o.id).copied().unwrap_or(0);
            let txns = store.txns.get(&o.id).map_or(0, |t| t.len() as u32);
            let ok = o.code.is_some_and(|c| (200..300).contains(&c));
            match o.code {
                _ if ok => a.ok += 1,
                Some(c) if (400..500).contains(&c) => a.temp += 1,
                Some(_) => a.perm += 1,
                None => a.no_reply += 1,
            }
            a.stored += (n > 0) as u64;
            let kind = if txns > 1 {
                a.duplicated += 1;
                Some("duplicated")
            } else if n > 1 {
                a.redelivered += 1;
                Some("redelivered")
            } else if ok && n == 0 {
                a.lost += 1;
                Some("lost")
            } else if !ok && n >= 1 && o.dot_sent() {
                a.explained += 1;
                Some("explained")
            } else if !ok && n >= 1 {
                a.unexplained += 1;
                Some("unexplained")
            } else {
                None
            };
            if let Some(kind) = kind {
                let c = counts.entry(kind).or_default();
                *c += 1;
                if *c <= MAX_CASES {
                    a.cases.push((
                        kind.to_string(),
                        Case {
                            id: o.id.clone(),
                            told: o.code.map_or("none".into(), |c| c.to_string()),
                            stage: o.stage.clone(),
                            stored: n,
                            t: o.t,
                            files: store.paths.get(&o.id).cloned().unwrap_or_default(),
                        },
                    ));
                }
            }
        }
        a.unknown = store
            .copies
            .iter()
            .filter(|(id, _)| !seen.contains(id.as_str()))
            .map(|(_, n)| *n as u64)
            .sum();
        a.pass = a.lost == 0 && a.duplicated == 0 && a.unexplained == 0;
        a
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The counts as a Markdown table, then the cases one per line.
    pub fn to_table(&self) -> String {
        let mut s = String::from(
            "| sent | 250 | 4xx | 5xx | no reply | stored | lost | duplicated | explained | unexplained | redelivered by a backend | partial dumps |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            self.sent,
            self.ok,
            self.temp,
            self.perm,
            self.no_reply,
            self.stored,
            self.lost,
            self.duplicated,
            self.explained,
            self.unexplained,
            self.redelivered,
            self.partial
        ));
        if self.maildir_tmp > 0 {
            s.push_str(&format!(
                "\n{} files left in a Maildir's tmp/ (deliveries cut short, not delivered) are not counted\n",
                self.maildir_tmp
            ));
        }
        if self.unknown > 0 {
            s.push_str(&format!(
                "\n{} stored copies have an id the log does not have\n",
                self.unknown
            ));
        }
        // The first few of each kind (all of them are in the JSON).
        let mut shown: HashMap<&str, usize> = HashMap::new();
        for (kind, c) in &self.cases {
            let n = shown.entry(kind.as_str()).or_default();
            *n += 1;
            if *n <= TABLE_CASES {
                s.push_str(&format!(
                    "{kind}: {} told {} at {} (t = {:.3} s), stored {}\n",
                    c.id, c.told, c.stage, c.t, c.stored
                ));
                if c.stored > 1 || kind == "duplicated" {
                    for f in &c.files {
                        s.push_str(&format!("  in {}\n", f.display()));
                    }
                }
            }
        }
        for (kind, n) in [
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("explained", self.explained),
            ("unexplained", self.unexplained),
            ("redelivered", self.redelivered),
        ] {
            if n > TABLE_CASES as u64 {
                s.push_str(&format!("{kind}: {} more\n", n - TABLE_CASES as u64));
            }
        }
        s.push_str(if self.pass {
            "PASS: zero lost, zero duplicated, nothing stored unexplained\n"
        } else {
            "FAIL: see the cases above\n"
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(id: &str, code: Option<u16>, stage: &str) -> Outcome {
        Outcome {
            id: id.into(),
            code,
            stage: stage.into(),
            t: 1.0,
            latency: 0.01,
        }
    }

    /// An smtp-sink dump: its own Received header (transaction `txn`),
    /// then the message with the proxy's Received header.
    fn dump(id: &str, txn: &str, complete: bool) -> Vec<u8> {
        let mut s = format!(
            "X-Client-Addr: 127.0.0.1\nReceived: from x ([127.0.0.1])\n\tby sink (smtp-sink) with ESMTP id {txn};\n\tTue,  1 Dec 2026\nReceived: from c by edge.test with ESMTP id zz;\nX-Load-Id: {id}\nFrom: <a@b>\n\nbody\n"
        );
        if complete {
            s.push_str(&format!("load-end {id}\n\n"));
        }
        s.into_bytes()
    }

    #[test]
    fn every_rule_is_counted() {
        let log = vec![
            o("m-1", Some(250), "final"),
            o("m-2", Some(250), "final"),
            o("m-3", Some(250), "final"),
            o("m-4", Some(451), "final"),
            o("m-5", None, "final"),
            o("m-6", Some(451), "rcpt"),
            o("m-7", Some(554), "mail"),
            o("m-8", None, "mail"),
        ];
        let mut s = Store::default();
        for (i, (b, root)) in [
            (dump("m-1", "t1", true), "0"),
            (dump("m-2", "t2", true), "0"),
            (dump("m-2", "t3", true), "1"),  // relayed twice
            (dump("m-3", "t4", false), "0"), // killed while writing
            (dump("m-4", "t5", true), "0"),
            (dump("m-5", "t6", true), "0"),
            (dump("m-6", "t7", true), "0"),
            (dump("other-1", "t8", true), "0"),
        ]
        .into_iter()
        .enumerate()
        {
            s.add(&b, root, &format!("f{i}"));
        }
        s.paths
            .insert("m-2".into(), vec!["a/1".into(), "b/2".into()]);
        let a = Accounting::compute(&log, &s);
        assert_eq!((a.sent, a.ok, a.temp, a.perm, a.no_reply), (8, 3, 2, 1, 2));
        assert_eq!(
            (a.stored, a.lost, a.duplicated, a.redelivered),
            (5, 1, 1, 0)
        );
        assert_eq!(
            (a.explained, a.unexplained, a.partial, a.unknown),
            (2, 1, 1, 1)
        );
        assert!(!a.pass);
        let t = a.to_table();
        assert!(t.contains("lost: m-3 told 250"), "{t}");
        assert!(t.contains("unexplained: m-6 told 451 at rcpt"), "{t}");
        assert!(
            t.contains(
                "duplicated: m-2 told 250 at final (t = 1.000 s), stored 2\n  in a/1\n  in b/2\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn a_maildir_tmp_file_is_not_delivered() {
        let dir = std::env::temp_dir().join(format!("smtp-load-acct-{}", std::process::id()));
        for d in ["box/new", "box/cur", "box/tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        // Postfix's virtual(8) killed after writing tmp/, before the rename;
        // delivered again after the restart.
        std::fs::write(dir.join("box/tmp/1.P1.vm"), dump("m-1", "Q1", true)).unwrap();
        std::fs::write(dir.join("box/new/2.V1.vm"), dump("m-1", "Q1", true)).unwrap();
        let s = Store::scan(&[dir.join("box")]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let a = Accounting::compute(&[o("m-1", Some(250), "final")], &s);
        assert!(a.pass && a.stored == 1 && a.redelivered == 0, "{a:?}");
        assert_eq!((s.files, s.maildir_tmp), (1, 1));
    }

    #[test]
    fn a_clean_run_passes() {
        let log = vec![
            o("m-1", Some(250), "final"),
            o("m-2", Some(451), "mail"),
            o("m-7", Some(250), "final"),
        ];
        let mut s = Store::default();
        s.add(&dump("m-1", "t1", true), "0", "f1");
        // Postfix killed mid-delivery delivers the same queue file again.
        s.add(&dump("m-7", "Q7", true), "1", "f2");
        s.add(&dump("m-7", "Q7", true), "1", "f3");
        let a = Accounting::compute(&log, &s);
        assert!(a.pass && a.lost == 0 && a.stored == 2, "{a:?}");
        assert_eq!((a.duplicated, a.redelivered), (0, 1));
        assert_eq!(
            transaction_id("Received: from x\tby y with ESMTP id 4dQ7;"),
            Some("4dQ7")
        );
        assert_eq!(transaction_id("Received: from x by y"), None);
    }
}
