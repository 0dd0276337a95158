//! The DATA phase: the message read after 354, checked by
//! `smtp::DataScanner` and streamed to the backend, and its final reply.
//! Also what message data shares with BDAT (`bdat.rs`): the Received
//! header, reads under `data_block` and the minimum data rate, the content
//! refusals, and `message_done` (metrics, span and log of a message).

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn, Span};

use super::inbuf::{room_for_data, room_for_large_data};
use super::span::record_end;
use super::{data_wait, Session, CMD_TIMEOUT_REPLY};
use crate::smtp::{self, Answered, BareLineEndings, DataOptions, DataScanner, Reply, Scan};
use crate::timer::Pace;

/// 552 for a message (or a BDAT chunk) over `max_message_size`.
pub(super) fn too_big_reply() -> Reply {
    crate::telemetry::own(Reply::new(
        552,
        smtp::EnhancedCode(5, 3, 4),
        "Message size exceeds fixed maximum message size",
    ))
}

/// The refusal of content with a bare CR / LF (Reject mode) or a line
/// over `max_line`, if any.
pub(super) fn content_refusal(bare_refused: bool, long: bool, max_line: usize) -> Option<Reply> {
    if bare_refused {
        Some(crate::telemetry::own(Reply::new(
            550,
            smtp::EnhancedCode(5, 5, 2),
            "Message contains bare CR or LF line endings (SMTP smuggling defence); use CRLF",
        )))
    } else if long {
        Some(crate::telemetry::own(Reply::new(
            550,
            smtp::EnhancedCode(5, 6, 0),
            format!("Message contains a line longer than {max_line} octets"),
        )))
    } else {
        None
    }
}

/// How a read of message data ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataRead {
    More,
    /// The client closed or the read failed.
    Gone,
    /// Nothing within `data_block`.
    Timeout,
    /// The minimum data rate's allowance ran out.
    TooSlow,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The Received header: the part fixed for the session is built once
    /// per HELO, the date once per second per thread. The `with` protocol
    /// (RFC 3848, RFC 6531 section 3.7.3) is `ESMTP`, `ESMTPS` (TLS),
    /// `SMTP` or `SMTPS` (HELO), and `UTF8SMTP` / `UTF8SMTPS` for a
    /// transaction whose MAIL had SMTPUTF8 (the `A` forms never: the edge
    /// authenticates no one). The cached part holds the first form; the
    /// UTF8 one is patched in as it is written (found again, no
    /// allocation, no field in the session's state).
    pub(super) fn received_header(&mut self, out: &mut Vec<u8>) {
        let tls = self.tls.is_some();
        let proto = match (self.st.esmtp, tls) {
            (true, true) => "ESMTPS",
            (true, false) => "ESMTP",
            (false, true) => "SMTPS",
            (false, false) => "SMTP",
        };
        if self.st.received.is_empty() {
            let cfg = &self.shared.cfg;
            let helo = self.st.helo.as_deref().unwrap_or("unknown");
            let mut h = format!(
                "Received: from {} ({} [{}])\r\n\tby {}{WITH}{proto}",
                sanitize(helo),
                self.pol.rdns_name().unwrap_or("unknown"),
                self.peer.ip(),
                cfg.hostname,
            );
            // Where Postfix puts its queue id: the session's trace id, so
            // a delivered message leads to its trace.
            if let Some(id) = crate::telemetry::trace_id(&Span::current()) {
                h.push_str(" id ");
                h.push_str(&id);
            }
            if let Some(t) = &self.tls {
                h.push_str(&format!(
                    "\r\n\t(using {} with cipher {})",
                    t.version, t.cipher
                ));
            }
            h.push_str(";\r\n\t");
            self.st.received = h.into_bytes();
        }
        let cached = &self.st.received;
        // The last `WITH`: the HELO name (sanitized: no spaces) and the
        // host names before it cannot hold one, nor can what follows it.
        // Searched only for an SMTPUTF8 transaction: the others (nearly
        // all) write the cached part as it is.
        let word = if self.st.mail == Some(true) {
            memchr::memmem::rfind(cached, WITH.as_bytes())
                .map(|k| k + WITH.len())
                .and_then(|at| Some(at).zip(cached.get(at..)))
        } else {
            None
        };
        match word {
            Some((at, rest)) if rest.starts_with(proto.as_bytes()) => {
                out.extend_from_slice(&cached[..at]);
                out.extend_from_slice(if tls { b"UTF8SMTPS" } else { b"UTF8SMTP" });
                out.extend_from_slice(&rest[proto.len()..]);
            }
            _ => out.extend_from_slice(cached),
        }
        rfc5322_now(out);
        out.extend_from_slice(b"\r\n");
    }

    /// The minimum data rate's allowance for a message's data (DATA, a
    /// BDAT transaction, or a chunk dropped outside one).
    pub(super) fn new_pace(&self) -> Option<Pace> {
        Pace::new(self.data_block, self.shared.cfg.limits.min_data_rate as f64)
    }

    /// Reads more message data (DATA or BDAT content) into `inbuf`, within
    /// `data_block` and the minimum data rate's allowance for `received`
    /// bytes; the wait is counted in `pace`.
    pub(super) async fn read_data(&mut self, pace: &mut Option<Pace>, received: u64) -> DataRead {
        let Some(wait) = data_wait(pace, received, self.data_block) else {
            return DataRead::TooSlow;
        };
        let large = received.max(self.st.size_declared) >= super::inbuf::BUF as u64;
        // A message that fits a pooled buffer: the buffer goes back to the
        // pool while the read waits (the client's data is a round trip away
        // after the 354), and the read that finds data takes the buffer
        // given back last, still in the CPU's caches: the kernel's copy and
        // the scan then touch warm lines instead of a buffer 399 other
        // sessions' work has pushed out (RESULTS.md section 30). A large
        // message keeps its grown buffer between reads.
        let got = if large {
            let read =
                super::inbuf::read_holding(&mut self.io, &mut self.inbuf, room_for_large_data);
            self.read_timer.within(wait, read).await
        } else {
            let read = super::inbuf::read(&mut self.io, &mut self.inbuf, room_for_data);
            self.read_timer.within(wait, read).await
        };
        // Only a read that blocked took time (and read the clock).
        if let (Some(p), Some(b)) = (pace.as_mut(), self.read_timer.blocked()) {
            p.waited(b.since.elapsed());
        }
        match got {
            Some(Ok(n)) if n > 0 => DataRead::More,
            Some(_) => DataRead::Gone,
            None if wait < self.data_block => DataRead::TooSlow,
            None => DataRead::Timeout,
        }
    }

    /// The end of a session inside a message's data (`what`: DATA or
    /// BDAT), after `read_data` did not get more: logged, or answered with
    /// a 421 (the caller drops the transaction).
    pub(super) fn data_read_failed(&mut self, read: DataRead, what: &str) {
        match read {
            DataRead::More | DataRead::Gone => {
                info!("client disconnected during {what}; message discarded");
            }
            DataRead::Timeout => {
                let (c, e, t) = CMD_TIMEOUT_REPLY;
                self.reply(c, e, t);
            }
            DataRead::TooSlow => self.too_slow(),
        }
    }

    /// The client's message data came slower than `limits.min_data_rate`:
    /// 421 and close (the caller drops the transaction).
    pub(super) fn too_slow(&mut self) {
        info!("message data slower than the minimum rate; connection closed");
        self.reply(421, "4.4.2", "Message data too slow, closing connection");
    }

    /// Reads the message after 354, streaming it to the backend; returns
    /// the final reply for the client, or Err when the session must end
    /// (client gone, or timeout, with the 421 already queued).
    pub(super) async fn data_phase(&mut self) -> Result<Reply, ()> {
        // Copied out, not an `Arc` clone of the config: its reference
        // count is one cache line every core would write per message.
        let cfg = &self.shared.cfg;
        let mode: BareLineEndings = cfg.smtp.bare_line_endings.into();
        let max_line = cfg.limits.max_text_line;
        let max_size = cfg.limits.max_message_size;
        let mut scanner = DataScanner::new(DataOptions {
            bare_line_endings: mode,
            max_line,
        });
        let mut pace = self.new_pace();
        // The forward list stays in the session (taken out only for the
        // header, before any await): kept in this future, it would be
        // written back to a line the message's bytes have evicted.
        let mut fwd = std::mem::take(&mut self.fwd);
        fwd.clear();
        fwd.push_literal(|out| self.received_header(out));
        self.fwd = fwd;
        let mut too_big = false;
        let mut backend_ok = true;
        // The transaction stays in the session's state: moved out into this
        // future and back, its 224 bytes were seven cold lines written per
        // message (RESULTS.md section 30).
        let mut backend_refusal = None;
        if std::mem::take(&mut self.st.data_early) {
            if let Some(t) = self.st.txn.as_mut() {
                let r = t.data_reply().await;
                if r.code != 354 {
                    // The backend is in command mode: read the client's
                    // message to its end and send nothing.
                    scanner.set_discard();
                    self.fwd.clear();
                    backend_refusal = Some(r);
                }
            }
        }
        loop {
            if !self.inbuf.is_empty() {
                let scan = scanner.feed_into(&self.inbuf, &mut self.fwd);
                let consumed = match scan {
                    Scan::More => self.inbuf.len(),
                    Scan::End { consumed } => consumed,
                };
                if !too_big && scanner.size() > max_size {
                    too_big = true;
                    scanner.set_discard();
                }
                let refused = too_big
                    || (mode == BareLineEndings::Reject && scanner.bare_line_ending_seen())
                    || scanner.long_line_seen();
                if backend_ok && !refused && backend_refusal.is_none() && !self.fwd.is_empty() {
                    if let Some(t) = self.st.txn.as_mut() {
                        // Straight from the input buffer: the message's
                        // bytes are not copied on their way through.
                        let mut bufs = self.fwd.io_slices(&self.inbuf);
                        if let Err(e) = t.send_data_vectored(&mut bufs).await {
                            warn!("backend failed during DATA: {e}");
                            backend_ok = false;
                        }
                    }
                }
                self.fwd.clear();
                self.inbuf.advance(consumed);
                if let Scan::End { .. } = scan {
                    break;
                }
            }
            let read = self.read_data(&mut pace, scanner.size()).await;
            if read == DataRead::More {
                continue;
            }
            // The session ends: drop the backend connection without the
            // final dot, so nothing partial is delivered.
            if let Some(t) = self.st.txn.take() {
                t.abort();
            }
            self.end_txn();
            self.data_read_failed(read, "DATA");
            return Err(());
        }
        // No input buffer held while the backend takes the message in.
        super::inbuf::give_back(&mut self.inbuf);
        let size = scanner.size();
        let refusal = if let Some(r) = backend_refusal {
            // The backend refused DATA and stays in sync, unless it broke.
            if let Some(t) = self.st.txn.take() {
                if t.is_broken() {
                    t.abort();
                } else if let Some(c) = t.end(&mut self.st.held) {
                    self.st.dedicated = Some(c);
                }
            }
            Some(r)
        } else if too_big {
            Some(too_big_reply())
        } else if let Some(r) = content_refusal(
            mode == BareLineEndings::Reject && scanner.bare_line_ending_seen(),
            scanner.long_line_seen(),
            max_line,
        ) {
            Some(r)
        } else if !backend_ok {
            Some(crate::relay::backend_lost())
        } else {
            None
        };
        let mut reply = match (refusal, self.st.txn.as_mut()) {
            (Some(r), _) => {
                if let Some(t) = self.st.txn.take() {
                    t.abort();
                }
                r
            }
            (None, Some(t)) => t.finish_data().await,
            (None, None) => crate::relay::backend_lost(),
        };
        // The backend's refusal of DATA, or its reply after the dot.
        reply.ensure_enhanced(Answered::Message);
        self.message_done(&reply, size);
        Ok(reply)
    }

    /// Metrics, the transaction span and the log line for a message's
    /// final reply (DATA or BDAT LAST).
    pub(super) fn message_done(&mut self, reply: &Reply, size: u64) {
        let m = &self.shared.metrics;
        m.transaction(reply.code);
        if let Some(t0) = self.st.txn_started {
            m.transaction_duration.observe(t0.elapsed_secs());
        }
        if reply.is_positive() {
            m.messages_relayed.inc();
            m.bytes_relayed.inc_by(size);
            m.recipients.inc_by(self.st.rcpts_ok as u64);
        }
        if let Some(span) = &self.st.txn_span {
            record_end(span, Some((self.st.rcpts_ok, size)), reply);
            info!(parent: span, "message {} {}", reply.code, reply.first_line());
        }
    }
}

/// What stands before the `with` protocol in the Received header.
const WITH: &str = " (smtp-edge) with ";

/// The current time as an RFC 5322 date (`Mon, 30 Nov 2026 05:00:00
/// +0000`), formatted at most once per second per thread.
fn rfc5322_now(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let secs = crate::timer::unix_secs();
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            d.1 = httpdate::fmt_http_date(now).replace(" GMT", " +0000");
            d.0 = secs;
        }
        out.extend_from_slice(d.1.as_bytes());
    });
}

/// Keeps a client-supplied name printable in a header.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control()) {
                c
            } else {
                '?'
            }
        })
        .collect()
}
