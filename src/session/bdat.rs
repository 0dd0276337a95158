//! BDAT (RFC 3030 CHUNKING) in the session: each chunk's octets are read
//! whatever becomes of them (so the command stream stays in sync), checked
//! by `smtp::ChunkChecker` with the DATA content rules, and relayed as they
//! arrive, never buffered whole: as BDAT chunks to a backend that offers
//! CHUNKING, as a dot-stuffed DATA stream (`smtp::Stuffer`) to one that
//! does not and to a Maildir. The reply to `BDAT n LAST` is the backend's
//! final reply; an earlier chunk gets the proxy's own 250 once its octets
//! were passed on. Once a chunk failed, every later BDAT of the transaction
//! gets the same reply, its octets read and dropped, until RSET or the LAST
//! chunk (RFC 3030 section 2: a pipelining receiver "MUST be prepared to
//! accept and discard additional BDAT chunks already in the pipeline after
//! the failed BDAT"; repeating the failure keeps a 4xx a 4xx for a client
//! that reads the LAST's reply as the message's). A BDAT after the LAST,
//! with no new MAIL, gets 503 5.5.1.
//!
//! The transaction's state is `State.chunking` (`Chunking`, boxed): its
//! `ChunkChecker`, and a `Stuffer` when the backend takes DATA. The first
//! chunk sends DATA (and reads the 354) to a backend without CHUNKING
//! (`Txn::chunking`) or to a Maildir, then the `Received:` header; each
//! piece read is checked and relayed at once (BDAT with the piece's size,
//! or stuffed through `Txn::send_data`). The chunk replies a pipelining
//! backend owes are read every `OWED_MAX` pieces and before the final
//! reply (`Txn::chunk_reply`); without PIPELINING, after each. A failure
//! (too big, content refused, a backend refusal or loss) drops the backend
//! connection, and `end_txn` drops one whose BDAT transaction was started
//! rather than RSET it. The final reply goes through `message_done`, as
//! DATA's does.

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::data::{content_refusal, too_big_reply, DataRead};
use super::{Chunking, Session, Step};
use crate::relay::backend_lost;
use crate::smtp::{
    bdat_command, Answered, BareLineEndings, ChunkChecker, DataOptions, EnhancedCode, Reply,
    Stuffer,
};
use crate::timer::Pace;

/// Replies to relayed chunks a pipelining backend may owe before they are
/// read (each is a line of some 40 octets in the socket's buffer).
const OWED_MAX: usize = 16;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// `BDAT size [LAST]`: reads the chunk's `size` octets whatever the
    /// answer (the client sends them anyway), then answers.
    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> Step {
        if self.st.chunking.is_none() && !self.bdat_may_begin() {
            let mut pace = self.new_pace();
            return self.skip_chunk(size, &mut pace, 0).await;
        }
        // Copied out, not an `Arc` clone of the config (one cache line
        // every core would write per chunk).
        let cfg = &self.shared.cfg;
        let mode: BareLineEndings = cfg.smtp.bare_line_endings.into();
        let (max_line, max_size) = (cfg.limits.max_text_line, cfg.limits.max_message_size);
        let mut ch = self.st.chunking.take().unwrap_or_else(|| {
            Box::new(Chunking {
                checker: ChunkChecker::new(DataOptions {
                    bare_line_endings: mode,
                    max_line,
                }),
                mode,
                started: false,
                stuffer: None,
                owed: 0,
                failed: None,
                wire: Vec::new(),
                pace: self.new_pace(),
                skipped: 0,
            })
        });
        if ch.failed.is_none() && ch.checker.size().saturating_add(size) > max_size {
            self.fail_chunking(&mut ch, too_big_reply());
        }
        if ch.failed.is_some() {
            // Answered like the chunk that failed, its octets dropped.
            let before = ch.checker.size() + ch.skipped;
            let step = self.skip_chunk(size, &mut ch.pace, before).await;
            ch.skipped = ch.skipped.saturating_add(size);
            if let Some(r) = ch.failed.clone() {
                self.chunking_reply(&ch, r, last);
            }
            if !last && matches!(step, Step::Continue) {
                self.st.chunking = Some(ch);
            }
            return step;
        }
        let step = self.relay_chunk(&mut ch, size, last).await;
        if !matches!(step, Step::Continue) {
            // The client is gone (or timed out) inside the chunk.
            if let Some(t) = self.st.txn.take() {
                t.abort();
            }
            return step;
        }
        let reply = match ch.failed.clone() {
            Some(r) => r,
            None if !last => Reply::new(
                250,
                EnhancedCode(2, 0, 0),
                format!("Ok: {size} octets received"),
            ),
            None => self.last_chunk_reply(&mut ch).await,
        };
        self.chunking_reply(&ch, reply, last);
        if !last {
            self.st.chunking = Some(ch);
        } else if self.shutting_down() {
            self.reply(421, "4.3.2", "Service shutting down, closing connection");
            return Step::Close;
        }
        Step::Continue
    }

    /// Whether a first BDAT may start relaying; if not, its reply is
    /// written (the caller drops the chunk).
    fn bdat_may_begin(&mut self) -> bool {
        if self.st.mail.is_none() {
            self.need_mail();
        } else if self.st.lost {
            backend_lost().write_to(&mut self.out);
        } else if self.st.data_seen {
            self.bad(
                503,
                "5.5.1",
                "BDAT not allowed after DATA in one transaction",
            );
        } else if self.st.rcpts_sent == 0 {
            self.bad(503, "5.5.1", "Need RCPT command");
        } else if self.st.rcpts_ok == 0 {
            // Routes may have refused every recipient: no transaction began.
            self.reply(554, "5.5.1", "No valid recipients");
        } else if self.st.txn.is_none() {
            backend_lost().write_to(&mut self.out);
        } else {
            return true;
        }
        false
    }

    /// The answer to a chunk of a transaction that got this far; after the
    /// LAST one the transaction is over (counted like a DATA message).
    fn chunking_reply(&mut self, ch: &Chunking, mut reply: Reply, last: bool) {
        // A backend's chunk or final reply (or its refusal of the DATA a
        // conversion sent) without an enhanced code gets one.
        reply.ensure_enhanced(Answered::Message);
        reply.write_to(&mut self.out);
        if last {
            self.message_done(&reply, ch.checker.size());
            self.st.messages += 1;
            self.top.message();
            self.end_txn();
        }
    }

    /// The transaction fails with `reply`: the backend connection is
    /// dropped (it may hold part of the content; nothing is delivered).
    fn fail_chunking(&mut self, ch: &mut Chunking, reply: Reply) {
        if ch.failed.is_none() {
            ch.failed = Some(reply);
        }
        if let Some(t) = self.st.txn.take() {
            t.abort();
        }
    }

    /// Reads the chunk, checking and relaying it piece by piece as it
    /// arrives. Not Continue when the session ends inside it.
    async fn relay_chunk(&mut self, ch: &mut Chunking, size: u64, last: bool) -> Step {
        let mut content = std::mem::take(&mut self.chunk_buf);
        content.clear();
        if !ch.started {
            self.begin_chunking(ch, &mut content).await;
        }
        let mut remaining = size;
        let step = loop {
            let k = remaining.min(self.inbuf.len() as u64) as usize;
            if k > 0 {
                ch.checker.feed(&self.inbuf[..k], &mut content);
                self.inbuf.advance(k);
                remaining -= k as u64;
            }
            if remaining == 0 {
                if last {
                    ch.checker.finish(&mut content);
                }
                // Also with nothing to send: the chunk's reply says
                // whether its content was refused.
                self.relay_piece(ch, &content, last).await;
                break Step::Continue;
            }
            if !content.is_empty() {
                self.relay_piece(ch, &content, false).await;
                content.clear();
            }
            if let Err(step) = self.read_chunk(&mut ch.pace, ch.checker.size()).await {
                break step;
            }
        };
        content.clear();
        self.chunk_buf = content;
        step
    }

    /// The first chunk: DATA for a backend without CHUNKING (its 354 read
    /// before any content is sent), then the Received header.
    async fn begin_chunking(&mut self, ch: &mut Chunking, content: &mut Vec<u8>) {
        let Some(txn) = self.st.txn.as_mut() else {
            return self.fail_chunking(ch, backend_lost());
        };
        ch.started = true;
        if !txn.chunking() {
            ch.stuffer = Some(Stuffer::new());
            if !txn.send_data_command().await {
                return self.fail_chunking(ch, backend_lost());
            }
            let r = txn.data_reply().await;
            if r.code != 354 {
                return self.fail_chunking(ch, r);
            }
        }
        if let Some(span) = &self.st.txn_span {
            span.record("smtp.chunking", true);
        }
        self.received_header(content);
    }

    /// Sends checked content on (the LAST piece ends the data), unless the
    /// transaction failed; content refused by the checker fails it.
    async fn relay_piece(&mut self, ch: &mut Chunking, content: &[u8], last: bool) {
        if ch.failed.is_none() && ch.checker.refused() {
            let bare = ch.mode == BareLineEndings::Reject && ch.checker.bare_line_ending_seen();
            let max_line = self.shared.cfg.limits.max_text_line;
            if let Some(r) = content_refusal(bare, ch.checker.long_line_seen(), max_line) {
                self.fail_chunking(ch, r);
            }
        }
        if ch.failed.is_some() || (content.is_empty() && !last) {
            return;
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return self.fail_chunking(ch, backend_lost());
        };
        ch.wire.clear();
        match ch.stuffer.as_mut() {
            Some(s) => {
                s.feed(content, &mut ch.wire);
                if last {
                    s.finish(&mut ch.wire);
                }
            }
            None => {
                bdat_command(content.len(), last, &mut ch.wire);
                ch.wire.extend_from_slice(content);
            }
        }
        if let Err(e) = txn.send_data(&ch.wire).await {
            warn!("backend failed during BDAT: {e}");
            return self.fail_chunking(ch, backend_lost());
        }
        if ch.stuffer.is_none() && !last {
            ch.owed += 1;
            if !txn.pipelining() || ch.owed >= OWED_MAX {
                self.chunk_replies(ch).await;
            }
        }
    }

    /// Reads the replies owed for relayed chunks; a refusal fails the
    /// transaction with the backend's reply.
    async fn chunk_replies(&mut self, ch: &mut Chunking) {
        while ch.owed > 0 {
            ch.owed -= 1;
            let Some(txn) = self.st.txn.as_mut() else {
                return;
            };
            let r = txn.chunk_reply().await;
            if !r.is_positive() {
                return self.fail_chunking(ch, r);
            }
        }
    }

    /// The backend's final reply after the LAST chunk was relayed (an
    /// earlier chunk's refusal when there was one).
    async fn last_chunk_reply(&mut self, ch: &mut Chunking) -> Reply {
        if ch.failed.is_none() {
            self.chunk_replies(ch).await;
        }
        if let Some(r) = ch.failed.clone() {
            return r;
        }
        match self.st.txn.as_mut() {
            Some(t) => t.finish_data().await,
            None => backend_lost(),
        }
    }

    /// Reads and drops a chunk's octets.
    async fn skip_chunk(&mut self, size: u64, pace: &mut Option<Pace>, before: u64) -> Step {
        let mut remaining = size;
        loop {
            let k = remaining.min(self.inbuf.len() as u64) as usize;
            self.inbuf.advance(k);
            remaining -= k as u64;
            if remaining == 0 {
                return Step::Continue;
            }
            let received = before.saturating_add(size - remaining);
            if let Err(step) = self.read_chunk(pace, received).await {
                return step;
            }
        }
    }

    /// Reads more of a chunk (the replies so far written first), within
    /// `data_block` and the minimum data rate's allowance for `received`
    /// bytes. Err when the session ends: the client is gone, or timed out
    /// or too slow (421 queued); the backend connection is dropped.
    async fn read_chunk(&mut self, pace: &mut Option<Pace>, received: u64) -> Result<(), Step> {
        let flushed = self.flush().await;
        let read = self.read_data(pace, received).await;
        if read == DataRead::More && flushed {
            return Ok(());
        }
        self.data_read_failed(read, "BDAT");
        if let Some(t) = self.st.txn.take() {
            t.abort();
        }
        self.end_txn();
        Err(Step::Close)
    }
}
