//! One mail transaction at one backend (`Txn`): MAIL/RCPT/DATA queued and
//! pipelined when the backend offers PIPELINING, replayed once on a fresh
//! connection when a reused one proves dead before its first reply or
//! refuses the RSET queued before its commands, the
//! message streamed (vectored, from the session's input buffer), the final
//! reply read; `end` gives the connection back only after a clean end,
//! `abort` drops it without ending the data.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::client::{BackendError, ClientIdentity};
use super::pool::PooledConn;
use super::route::GroupId;
use super::{backend_lost, closing_to_451, Backends, Inner, Pend, Txn, TxnBufs};
use crate::smtp::{Body, EnhancedCode, MailParams, Reply};

impl Txn {
    pub(super) fn smtp(
        backends: Arc<Backends>,
        mut conn: PooledConn,
        reused: bool,
        dedicated: bool,
    ) -> Txn {
        let name = conn.peer.clone();
        let TxnBufs {
            mut wbuf,
            mut replay,
            mut pending,
        } = std::mem::take(&mut conn.spare);
        wbuf.clear();
        wbuf.reserve(256);
        replay.clear();
        pending.clear();
        let mut txn = Txn {
            backends,
            group: GroupId(0),
            inner: Inner::Smtp {
                conn: None,
                wbuf,
                replay,
                replaying: true,
                reused,
                dedicated,
                completed: false,
            },
            pending,
            span: tracing::Span::none(),
            name,
        };
        conn.txns += 1;
        if std::mem::take(&mut conn.needs_rset) {
            txn.queue_raw(b"RSET\r\n", Pend::Internal("RSET"));
        }
        if let Inner::Smtp { conn: c, .. } = &mut txn.inner {
            *c = Some(conn);
        }
        txn
    }

    fn queue_raw(&mut self, bytes: &[u8], p: Pend) {
        if let Inner::Smtp { wbuf, .. } = &mut self.inner {
            wbuf.extend_from_slice(bytes);
        }
        self.pending.push_back(p);
    }

    /// Queues the XFORWARD lines for `id`; false when the backend does not
    /// offer XFORWARD (nothing queued).
    pub(super) fn queue_xforward(&mut self, id: &ClientIdentity) -> bool {
        let Inner::Smtp {
            conn: Some(conn),
            wbuf,
            ..
        } = &mut self.inner
        else {
            return true;
        };
        if conn.caps.xforward.is_empty() {
            return false;
        }
        // Straight into the batch, a reply owed per line (counted once
        // per session, with the cached lines).
        for _ in 0..id.xforward_lines(conn.caps.xforward, wbuf) {
            self.pending.push_back(Pend::Internal("XFORWARD"));
        }
        true
    }

    /// The group this transaction was begun on.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The set of backends it was begun from: its recipients are routed by
    /// that set's table (a reload may have swapped in another).
    pub fn backends(&self) -> &Arc<Backends> {
        &self.backends
    }

    /// Whether commands may be queued several at a time.
    pub fn pipelining(&self) -> bool {
        match &self.inner {
            Inner::Smtp { conn, .. } => conn.as_ref().is_some_and(|c| c.caps.pipelining),
            Inner::Maildir { .. } => true,
        }
    }

    pub fn queue_mail(&mut self, from: &str, params: &MailParams) {
        if let Inner::Maildir { replies, .. } = &mut self.inner {
            replies.push_back(Reply::new(250, EnhancedCode(2, 1, 0), "Ok"));
            return;
        }
        let Inner::Smtp { wbuf, .. } = &mut self.inner else {
            return;
        };
        // Written straight into the batch: no allocation per command.
        wbuf.extend_from_slice(b"MAIL FROM:<");
        wbuf.extend_from_slice(from.as_bytes());
        wbuf.push(b'>');
        if let Some(size) = params.size {
            // itoa: `write!` cost ~300 instructions per message here.
            wbuf.extend_from_slice(b" SIZE=");
            wbuf.extend_from_slice(itoa::Buffer::new().format(size).as_bytes());
        }
        match params.body {
            Some(Body::SevenBit) => wbuf.extend_from_slice(b" BODY=7BIT"),
            Some(Body::EightBitMime) => wbuf.extend_from_slice(b" BODY=8BITMIME"),
            None => {}
        }
        if params.smtputf8 {
            wbuf.extend_from_slice(b" SMTPUTF8");
        }
        wbuf.extend_from_slice(b"\r\n");
        self.pending.push_back(Pend::Client);
    }

    pub fn queue_rcpt(&mut self, to: &str) {
        if let Inner::Maildir { replies, rcpts, .. } = &mut self.inner {
            *rcpts += 1;
            replies.push_back(Reply::new(250, EnhancedCode(2, 1, 5), "Ok"));
            return;
        }
        if let Inner::Smtp { wbuf, .. } = &mut self.inner {
            wbuf.extend_from_slice(b"RCPT TO:<");
            wbuf.extend_from_slice(to.as_bytes());
            wbuf.extend_from_slice(b">\r\n");
        }
        self.pending.push_back(Pend::Rcpt);
    }

    pub fn queue_data(&mut self) {
        if let Inner::Maildir { replies, rcpts, .. } = &mut self.inner {
            replies.push_back(if *rcpts == 0 {
                Reply::new(554, EnhancedCode(5, 5, 1), "No valid recipients")
            } else {
                Reply::new(
                    354,
                    EnhancedCode(2, 0, 0),
                    "End data with <CR><LF>.<CR><LF>",
                )
            });
            return;
        }
        self.queue_raw(b"DATA\r\n", Pend::Client);
    }

    /// Sends what is queued and collects, in order, the replies owed to the
    /// client. A reused connection that proves dead before its first reply
    /// is replaced by a fresh one and the commands replayed; any other
    /// failure turns every owed reply into a 451.
    pub async fn replies(&mut self, out: &mut Vec<Reply>) {
        let queued = match &mut self.inner {
            Inner::Maildir { replies, .. } => {
                out.extend(replies.drain(..));
                return;
            }
            Inner::Smtp { wbuf, .. } => wbuf.len(),
        };
        // The batch stays in `wbuf` and goes by its range: no buffer is
        // moved across the awaits (RESULTS.md section 33's layout rule).
        // Pipelined: all of it at once (even nothing: replies may be owed);
        // else, without PIPELINING at the backend, one line per round trip.
        let failed = if self.pipelining() {
            let owed = self.pending.len();
            !self.exchange(0..queued, owed, out).await
        } else {
            let mut at = 0;
            let mut failed = false;
            while at < queued {
                let Inner::Smtp { wbuf, .. } = &self.inner else {
                    break;
                };
                let end = memchr::memchr(b'\n', &wbuf[at..queued]).map_or(queued, |i| at + i + 1);
                if failed || !self.exchange(at..end, 1, out).await {
                    failed = true;
                }
                at = end;
            }
            failed
        };
        if failed {
            if let Inner::Smtp { conn, .. } = &mut self.inner {
                *conn = None;
            }
            for p in self.pending.drain(..) {
                if let Pend::Client | Pend::Rcpt = p {
                    out.push(backend_lost());
                }
            }
        }
        if let Inner::Smtp {
            wbuf,
            replay,
            replaying,
            ..
        } = &mut self.inner
        {
            // Sent with no reply read yet (nothing was owed): kept for a
            // replay, as the batch in `wbuf` goes.
            if *replaying {
                replay.extend_from_slice(&wbuf[..queued]);
            }
            wbuf.clear();
        }
    }

    /// Sends `wbuf[sent]` and reads `owed` replies into `out`. A reused
    /// connection that proves dead before its first reply (or refuses the
    /// RSET queued first) is replaced by a fresh one and everything since
    /// checkout replayed. False when the backend failed.
    ///
    /// Only the read loop is here; what a reply means is `take_reply`'s, so
    /// that this future keeps a few words across its awaits.
    async fn exchange(&mut self, sent: Range<usize>, owed: usize, out: &mut Vec<Reply>) -> bool {
        // The fields apart, not a clone of `backends`: its reference count
        // is one cache line every core would write per message.
        let t = self.backends.command_timeout;
        let Inner::Smtp {
            conn: Some(c),
            wbuf,
            ..
        } = &mut self.inner
        else {
            return false;
        };
        // Not copied for a replay: until the first reply, what was sent
        // since checkout is still in `wbuf` (`reconnect`).
        if let Err(e) = c.send(&wbuf[sent.clone()]).await {
            tracing::debug!("backend write failed: {e}");
        }
        let mut got = 0;
        // Where the next RCPT's address is looked for in the batch, and the
        // RCPT replies since, whose addresses were not needed.
        let mut rcpts = RcptCursor {
            at: sent.start,
            end: sent.end,
            skip: 0,
        };
        while got < owed && !self.pending.is_empty() {
            // In a block of its own: the reply's storage ends before the
            // reconnect's await below (else kept beside it in this future).
            let next = {
                let read = match &mut self.inner {
                    // A batch's later replies are in the buffer already.
                    Inner::Smtp { conn: Some(c), .. } => match c.buffered_reply() {
                        Some(read) => read,
                        None => c.read_reply(t).await,
                    },
                    _ => return false,
                };
                got += usize::from(read.is_ok());
                self.take_reply(read, &mut rcpts, out)
            };
            match next {
                Next::Read => {}
                Next::Fail => return false,
                Next::Replace { after_rset } => {
                    if !self.reconnect(after_rset, sent.end).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// What one reply (or a failed read) means for the transaction: passed
    /// on to `out`, consumed (RSET, XFORWARD), or the connection replaced
    /// or given up.
    fn take_reply(
        &mut self,
        read: Result<Reply, BackendError>,
        rcpts: &mut RcptCursor,
        out: &mut Vec<Reply>,
    ) -> Next {
        let Txn {
            backends,
            group,
            inner,
            pending,
            ..
        } = self;
        let Inner::Smtp {
            conn: Some(c),
            wbuf,
            replaying,
            reused,
            ..
        } = inner
        else {
            return Next::Fail;
        };
        let reply = match read {
            Ok(reply) => reply,
            Err(e) => {
                if !(*reused && std::mem::take(replaying)) {
                    tracing::warn!(backend = %c.peer, "backend failed: {e}");
                    return Next::Fail;
                }
                tracing::debug!(backend = %c.peer, "reused connection dead ({e}), reconnecting");
                *reused = false;
                return Next::Replace { after_rset: false };
            }
        };
        let first = std::mem::take(replaying);
        let pend = pending.pop_front();
        // A refused RSET (queued first on a reused connection) leaves the
        // backend's state unknown: what follows could be refused for it,
        // and the client must never hear a refusal the backend did not mean
        // for its message. The connection is dropped; on a reused one the
        // rest is replayed on a fresh one, as for a dead one.
        if matches!(pend, Some(Pend::Internal("RSET"))) && reply.code / 100 != 2 {
            tracing::warn!(
                backend = %c.peer,
                "RSET refused: {} {}; dropping the connection",
                reply.code,
                reply.text()
            );
            if !(first && *reused) {
                return Next::Fail;
            }
            *reused = false;
            return Next::Replace { after_rset: true };
        }
        // 421: the backend is closing; the client gets a 451 (its own
        // session goes on) and the connection is not reused.
        let closing = reply.code == 421;
        let reply = if closing {
            closing_to_451(&reply)
        } else {
            reply
        };
        match pend {
            Some(Pend::Client) => out.push(reply),
            Some(Pend::Rcpt) => {
                // The address is read back only for a refusal.
                match &backends.unknown {
                    Some(u) if reply.code / 100 == 5 => {
                        let bytes = &wbuf[..rcpts.end];
                        let to = (0..=rcpts.skip)
                            .map(|_| next_rcpt(bytes, &mut rcpts.at))
                            .last()
                            .flatten();
                        rcpts.skip = 0;
                        if let Some(to) = to {
                            u.note(*group, to, &reply);
                        }
                    }
                    _ => rcpts.skip += 1,
                }
                out.push(reply);
            }
            Some(Pend::Internal(what)) if !reply.is_positive() => {
                tracing::warn!(backend = %c.peer, "{what} refused: {} {}", reply.code, reply.text());
            }
            Some(Pend::Internal(_)) => {}
            None => {}
        }
        if closing {
            tracing::warn!(backend = %c.peer, "backend said 421; dropping the connection");
            return Next::Fail;
        }
        Next::Read
    }

    /// `Next::Replace`: the reused connection replaced by a fresh one in the
    /// same slot, which is sent everything since checkout (after a refused
    /// RSET, the RSET left out): `replay` (earlier batches, seldom any) and
    /// `wbuf[..upto]`, this batch as far as it was sent. False (the
    /// connection dropped) when that fails.
    async fn reconnect(&mut self, after_rset: bool, upto: usize) -> bool {
        let Txn {
            backends, inner, ..
        } = self;
        let Inner::Smtp {
            conn, replay, wbuf, ..
        } = inner
        else {
            return false;
        };
        let Some(c) = conn.as_mut() else {
            return false;
        };
        let all = if replay.is_empty() {
            &wbuf[..upto]
        } else {
            replay.extend_from_slice(&wbuf[..upto]);
            &replay[..]
        };
        let sent = if after_rset {
            all.strip_prefix(b"RSET\r\n").unwrap_or(all)
        } else {
            all
        };
        if replace(backends, c, sent).await.is_err() {
            *conn = None;
            return false;
        }
        true
    }
}

/// Where `take_reply` looks for the next refused RCPT's address in the
/// batch (`wbuf[at..end]`), and the RCPT replies since, whose addresses
/// were not needed.
struct RcptCursor {
    at: usize,
    end: usize,
    skip: usize,
}

/// What `exchange` does after `take_reply`.
enum Next {
    /// Read the next reply owed.
    Read,
    /// Give the connection up: every reply still owed becomes a 451.
    Fail,
    /// Replace the reused connection and replay (`Txn::reconnect`).
    Replace { after_rset: bool },
}

/// Replaces a reused connection (dead, or its RSET refused) by a fresh one
/// in the same slot and sends it `sent`, the commands since checkout.
async fn replace(backends: &Backends, c: &mut PooledConn, sent: &[u8]) -> Result<(), BackendError> {
    let replaced = match backends.pool(c.backend) {
        Some(pool) => pool.reconnect(c).await,
        None => Err(BackendError::Closed),
    };
    if let Err(e) = replaced {
        tracing::warn!("backend reconnect failed: {e}");
        return Err(e);
    }
    c.txns += 1;
    c.send(sent).await
}

impl Txn {
    /// Sends DATA at once (nothing else may be owed); its reply is read by
    /// `data_reply` before any message byte is sent. False when the backend
    /// is gone.
    pub async fn send_data_command(&mut self) -> bool {
        match &mut self.inner {
            Inner::Maildir { .. } => true,
            Inner::Smtp { conn, .. } => match conn.as_mut() {
                Some(c) => {
                    if c.send(b"DATA\r\n").await.is_ok() {
                        return true;
                    }
                    *conn = None;
                    false
                }
                None => false,
            },
        }
    }

    /// The backend's reply to the DATA sent by `send_data_command`: 354, its
    /// refusal, or a 451 when it failed (the connection is then dropped).
    pub async fn data_reply(&mut self) -> Reply {
        if !matches!(self.inner, Inner::Smtp { .. }) {
            return Reply::new(354, EnhancedCode(2, 0, 0), "Go ahead");
        }
        match self.next_reply("DATA").await {
            Ok(r) if r.code == 354 || r.code >= 400 => r,
            Ok(r) => {
                if let Inner::Smtp { conn, .. } = &mut self.inner {
                    if let Some(c) = conn.take() {
                        tracing::warn!(backend = %c.peer, "unexpected reply to DATA: {}", r.code);
                    }
                }
                backend_lost()
            }
            Err(r) => r,
        }
    }

    /// The backend's next reply to `what`, in the middle of a transaction:
    /// `Err` with a 451 for a 421 or a failure (the connection is then
    /// dropped), or with `backend_lost` when it is already gone.
    async fn next_reply(&mut self, what: &str) -> Result<Reply, Reply> {
        let t = self.backends.command_timeout;
        let Inner::Smtp { conn, .. } = &mut self.inner else {
            return Err(backend_lost());
        };
        let Some(c) = conn.as_mut() else {
            return Err(backend_lost());
        };
        match c.read_reply(t).await {
            Ok(r) if r.code == 421 => {
                *conn = None;
                Err(closing_to_451(&r))
            }
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::warn!(backend = %c.peer, "no reply to {what}: {e}");
                *conn = None;
                Err(backend_lost())
            }
        }
    }

    /// The backend offers CHUNKING: a client's BDAT content is relayed as
    /// BDAT chunks (`smtp::bdat_command` + content through `send_data`);
    /// otherwise it is converted to DATA (a Maildir takes DATA).
    pub fn chunking(&self) -> bool {
        matches!(&self.inner, Inner::Smtp { conn: Some(c), .. } if c.caps.chunking)
    }

    /// The backend's reply to one relayed BDAT chunk that is not the last
    /// (the last one's is `finish_data`): its reply, a 451 for a 421 or a
    /// failure (the connection is then dropped).
    pub async fn chunk_reply(&mut self) -> Reply {
        if !matches!(self.inner, Inner::Smtp { .. }) {
            return Reply::new(250, EnhancedCode(2, 0, 0), "Ok");
        }
        self.next_reply("BDAT").await.unwrap_or_else(|r| r)
    }

    /// True when the backend connection is gone.
    pub fn is_broken(&self) -> bool {
        matches!(&self.inner, Inner::Smtp { conn: None, .. })
    }

    /// Streams message bytes (wire form) to the backend, gathered from
    /// `bufs` (one vectored write when the socket takes it all).
    pub async fn send_data_vectored(
        &mut self,
        bufs: &mut [std::io::IoSlice<'_>],
    ) -> Result<(), BackendError> {
        match &mut self.inner {
            Inner::Smtp { conn, .. } => match conn.as_mut() {
                Some(c) => {
                    let t = self.backends.command_timeout;
                    // Mostly taken at once: no clock read, no timer then.
                    let r = crate::timer::timeout(t, c.send_vectored(bufs)).await;
                    match r {
                        Some(Ok(())) => Ok(()),
                        Some(Err(e)) => {
                            *conn = None;
                            Err(e)
                        }
                        None => {
                            *conn = None;
                            Err(BackendError::Timeout)
                        }
                    }
                }
                None => Err(BackendError::Closed),
            },
            Inner::Maildir { writer, .. } => match writer.as_mut() {
                Some(w) => {
                    for b in bufs.iter() {
                        w.write_wire(b).await.map_err(BackendError::Io)?;
                    }
                    Ok(())
                }
                None => Err(BackendError::Closed),
            },
        }
    }

    /// Streams message bytes (wire form) to the backend.
    pub async fn send_data(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.send_data_vectored(&mut [std::io::IoSlice::new(bytes)])
            .await
    }

    /// After the terminating `.\r\n` was sent: the backend's final reply, or
    /// a 451 when the backend failed.
    pub async fn finish_data(&mut self) -> Reply {
        let t = self.backends.data_end_timeout;
        match &mut self.inner {
            Inner::Smtp {
                conn, completed, ..
            } => {
                let Some(c) = conn.as_mut() else {
                    return backend_lost();
                };
                let got = c.read_reply(t).await;
                if let (Ok(_), Some(pool)) = (&got, self.backends.pool(c.backend)) {
                    // From when the wait began (none: the reply was there).
                    let secs = c
                        .waited_since()
                        .map_or(0.0, |t0| t0.elapsed().as_secs_f64());
                    pool.metrics().reply.observe(secs);
                }
                match got {
                    Ok(r) if r.code == 421 => {
                        *conn = None;
                        closing_to_451(&r)
                    }
                    Ok(r) => {
                        *completed = true;
                        r
                    }
                    Err(e) => {
                        tracing::warn!(backend = %c.peer, "no final reply: {e}");
                        *conn = None;
                        backend_lost()
                    }
                }
            }
            Inner::Maildir { writer, .. } => match writer.take() {
                Some(w) => {
                    let id = w.id.clone();
                    // Boxed: inline, the file writes' future (~800 bytes)
                    // made every relayed message's DATA future larger.
                    match Box::pin(w.commit()).await {
                        Ok(path) => {
                            tracing::debug!(path = %path.display(), "delivered to maildir");
                            Reply::new(250, EnhancedCode(2, 0, 0), format!("Ok: queued as {id}"))
                        }
                        Err(e) => {
                            tracing::error!("maildir delivery failed: {e}");
                            Reply::new(
                                451,
                                EnhancedCode(4, 3, 0),
                                "Local delivery failed, try again later",
                            )
                        }
                    }
                }
                None => backend_lost(),
            },
        }
    }

    /// Drops the backend connection without finishing the data (no dot is
    /// ever sent), so nothing partial is delivered.
    pub fn abort(mut self) {
        if let Inner::Smtp { conn, .. } = &mut self.inner {
            conn.take();
        }
    }

    /// Ends the transaction normally. A dedicated (XCLIENT) connection is
    /// handed back to the session; a pooled one returns to its pool, marked
    /// for RSET unless the transaction completed. The set of backends goes
    /// to `held` (the session's, for its next transaction's
    /// `Backends::begin_now`) unless a reload retired it.
    pub fn end(self, held: &mut Option<Arc<Backends>>) -> Option<PooledConn> {
        let Txn {
            backends,
            mut inner,
            mut pending,
            ..
        } = self;
        let retired = backends.retired.load(Ordering::Acquire);
        if let Inner::Smtp {
            conn,
            completed,
            dedicated,
            wbuf,
            replay,
            ..
        } = &mut inner
        {
            let mut c = conn.take()?;
            c.spare = TxnBufs {
                wbuf: std::mem::take(wbuf),
                replay: std::mem::take(replay),
                pending: std::mem::take(&mut pending),
            };
            if !*completed {
                c.needs_rset = true;
            }
            if retired {
                tokio::spawn(c.quit());
                return None;
            }
            let pool = backends.pool(c.backend);
            if *dedicated {
                // Others waiting for this backend's slots, or open past
                // max_lifetime: give this one up (the session says XCLIENT
                // again on its next MAIL).
                if pool.is_some_and(|p| p.waiting() > 0 || p.settings().too_old(&c)) {
                    tokio::spawn(c.quit());
                    return None;
                }
                return Some(c);
            }
            if let Some(pool) = pool {
                pool.checkin(c);
            }
            *held = Some(backends);
        }
        None
    }
}

/// The address of the next `RCPT TO:<...>` line of `bytes` from `*at` (a
/// batch as sent: its RCPTs are in the order of their replies), moving
/// `*at` past it. Read back from the bytes sent so that a transaction
/// keeps no copy of its recipients.
fn next_rcpt<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a str> {
    while *at < bytes.len() {
        let rest = &bytes[*at..];
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        *at += end;
        if let Some(addr) = rest[..end].strip_prefix(b"RCPT TO:<") {
            let addr = addr.strip_suffix(b">\r\n")?;
            return std::str::from_utf8(addr).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::next_rcpt;

    #[test]
    fn rcpt_addresses_read_back_in_order() {
        let batch = b"XFORWARD NAME=x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<one@x.example>\r\nRCPT TO:<\"q>\"@x.example>\r\nDATA\r\nRCPT TO:<two@y.example>\r\n";
        let mut at = 0;
        assert_eq!(next_rcpt(batch, &mut at), Some("one@x.example"));
        assert_eq!(next_rcpt(batch, &mut at), Some("\"q>\"@x.example"));
        assert_eq!(next_rcpt(batch, &mut at), Some("two@y.example"));
        assert_eq!(next_rcpt(batch, &mut at), None);
        assert_eq!(next_rcpt(b"RCPT TO:<cut", &mut 0), None);
    }
}
