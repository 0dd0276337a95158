//! The command lines: input split into lines, each command parsed and
//! answered. EHLO/HELO and STARTTLS are answered here; MAIL, RCPT and DATA
//! are relayed (their replies owed, see `resolve`; with routes MAIL is
//! answered here and RCPT routed by `route.rs`); BDAT is `bdat.rs`'s and
//! the message after DATA's 354 is `data.rs`'s.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{Instrument, Span};

use super::inbuf::room_for_commands;
use super::span::{record_end, transaction_span};
use super::{Owed, Session, Step};
use crate::config::TlsMode;
use crate::relay::client::ClientIdentity;
use crate::relay::pool::PooledConn;
use crate::relay::route::GroupId;
use crate::relay::{Backends, Txn};
use crate::smtp::{self, Command, Reply};

/// Most pipelined input kept while waiting for a backend connection.
const WAIT_INPUT_LIMIT: usize = 16 * 1024;

/// Awaits `fut` (a wait in line for a backend connection) while reading the
/// client: what it pipelines is kept in `inbuf` (up to a limit), and its
/// hanging up gives None, dropping `fut` and so its place in line.
///
/// An end of input after pipelined commands is not a hang-up: Exim sends
/// `MAIL, RCPT.., BDAT n LAST, QUIT` in one go and shuts its side down
/// (half-close), then reads the replies. With commands still to answer in
/// `inbuf`, the wait goes on (it is bounded by itself); only an end of
/// input with nothing left to answer gives the place up.
///
/// `fut` comes boxed (`Unpin`): this future then holds a pointer, not a
/// second copy of the wait (a pinned argument is stored twice), and the
/// caller's future stays small without boxing this one too.
pub(super) async fn while_client_stays<S: AsyncRead + Unpin, T>(
    io: &mut S,
    inbuf: &mut BytesMut,
    mut fut: impl std::future::Future<Output = T> + Unpin,
) -> Option<T> {
    loop {
        if inbuf.len() >= WAIT_INPUT_LIMIT {
            return Some(fut.await);
        }
        tokio::select! {
            biased;
            r = &mut fut => return Some(r),
            n = super::inbuf::read(io, inbuf, room_for_commands) => match n {
                Ok(0) if !inbuf.is_empty() => return Some(fut.await),
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
        }
    }
}

/// What `begin_txn` is given: the group, the client, and a connection
/// kept for this client (`dedicated`) if any.
pub(super) type Begin<'a> = (GroupId, &'a ClientIdentity, Option<PooledConn>);

/// A transaction begun on group `g` for `id` at once, when
/// `Backends::begin_now` can (the usual case: nothing boxed, no future of
/// the relay's polled or made): None. Else `begin` back, for
/// `begin_wait`. `span` is the transaction's, the parent of the
/// backend's. The transaction goes straight into `slot` (the session's):
/// returned, it would be moved through the command future's state three
/// times before it got there, a few hundred bytes of cold lines written
/// per message (RESULTS.md section 30). Not async: a future made for the
/// usual case would have its arguments written into the command's state,
/// on lines nothing else of the message touches.
pub(super) fn begin_txn<'a>(
    relay: &Arc<Backends>,
    begin: Begin<'a>,
    held: &mut Option<Arc<Backends>>,
    span: &Span,
    slot: &mut Option<Txn>,
) -> Option<Begin<'a>> {
    if begin.2.is_none() {
        if let Some(txn) = span.in_scope(|| relay.begin_now(begin.0, begin.1, held)) {
            *slot = Some(txn);
            return None;
        }
    }
    Some(begin)
}

/// The transaction `begin_txn` could not begin at once: `Backends::begin`
/// boxed and awaited while the client stays (None: it left).
pub(super) async fn begin_wait<S: AsyncRead + Unpin>(
    io: &mut S,
    inbuf: &mut BytesMut,
    relay: &Arc<Backends>,
    (g, id, dedicated): Begin<'_>,
    span: &Span,
    slot: &mut Option<Txn>,
) -> Option<Result<(), Reply>> {
    // Boxed (`while_client_stays` takes it `Unpin`): the one allocation
    // of a message that does not begin at once (tests/allocs.rs).
    let begin = Box::pin(relay.begin(g, id, dedicated).instrument(span.clone()));
    Some(
        while_client_stays(io, inbuf, begin)
            .await?
            .map(|txn| *slot = Some(txn)),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Handles every complete command line in the input buffer.
    pub(super) async fn process_lines(&mut self) -> Step {
        let max_line = self.cfg().limits.max_command_line;
        loop {
            if self.st.data_go {
                return Step::Continue;
            }
            let Some(nl) = memchr::memchr(b'\n', &self.inbuf) else {
                if self.inbuf.len() > max_line {
                    // Too long and still no end: drop what we have, skip
                    // the rest of the line.
                    self.inbuf.clear();
                    if !self.st.skipping_line {
                        self.st.skipping_line = true;
                        self.resolve().await;
                        self.bad(500, "5.5.6", "Line too long");
                    }
                }
                // No input buffer held while the backend replies.
                super::inbuf::give_back(&mut self.inbuf);
                return self.check_bad();
            };
            // The line is copied out (a few dozen octets) rather than split
            // off: `inbuf` stays one unshared buffer that reads can start at
            // the front of again (`inbuf::rewind`).
            let mut line = std::mem::take(&mut self.line);
            line.clear();
            line.extend_from_slice(&self.inbuf[..=nl]);
            self.inbuf.advance(nl + 1);
            let step = if std::mem::take(&mut self.st.skipping_line) {
                Step::Continue
            } else if line.len() > max_line {
                self.resolve().await;
                self.bad(500, "5.5.6", "Line too long");
                Step::Continue
            } else {
                self.command(&line[..nl]).await
            };
            self.line = line;
            if self.client_gone {
                return Step::Close;
            }
            if !matches!(step, Step::Continue) {
                return step;
            }
            if let Step::Close = self.check_bad() {
                return Step::Close;
            }
        }
    }

    fn check_bad(&mut self) -> Step {
        if let Some(v) = self.over_budget.take() {
            self.verdict_given(v.code, &v);
            self.reply(v.code, v.enh, &v.text);
            return Step::Close;
        }
        if self.st.bad > self.cfg().limits.max_bad_commands {
            self.reply(421, "4.7.0", "Too many errors, closing connection");
            return Step::Close;
        }
        Step::Continue
    }

    async fn command(&mut self, line: &[u8]) -> Step {
        let cmd = match smtp::command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                self.resolve().await;
                self.count_bad();
                e.write_reply(&mut self.out);
                return Step::Continue;
            }
        };
        // Relayed commands queue without waiting; every other reply must
        // come after the backend replies still owed.
        if !matches!(
            cmd,
            Command::Mail { .. } | Command::Rcpt { .. } | Command::Data
        ) {
            self.resolve().await;
        }
        if let Some(v) = self.refuse.take() {
            self.resolve().await;
            self.connect_refusal(&v).await;
            return Step::Close;
        }
        if self.junk_over(&cmd) {
            self.reply(
                421,
                "4.7.0",
                "Too many commands without a message, closing connection",
            );
            return Step::Close;
        }
        match cmd {
            Command::Ehlo(name) => self.ehlo(name, true).await,
            Command::Helo(name) => self.ehlo(name, false).await,
            Command::Mail { from, params } => self.mail(from, params).await,
            Command::Rcpt { to } => {
                self.top.recipient();
                self.rcpt(to).await
            }
            Command::Data if self.st.chunking.is_some() => self.bad(
                503,
                "5.5.1",
                "DATA not allowed after BDAT in one transaction",
            ),
            Command::Data => {
                self.st.data_seen = self.st.mail.is_some();
                self.data_cmd().await
            }
            // Boxed: it reads and backends a whole chunk.
            Command::Bdat { size, last } => return Box::pin(self.bdat(size, last)).await,
            Command::Rset => {
                self.end_txn();
                self.st.mail_refused = false;
                self.reply(250, "2.0.0", "Ok");
            }
            Command::Noop => self.reply(250, "2.0.0", "Ok"),
            Command::Vrfy => self.reply(
                252,
                "2.0.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Command::Help => self.reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            ),
            Command::Quit => {
                self.end_txn();
                self.pol.release();
                // In `/top` before the client has the reply.
                self.top.flush();
                self.reply(221, "2.0.0", "Bye");
                return Step::Quit;
            }
            Command::StartTls => return self.starttls(),
        }
        Step::Continue
    }

    /// Counts a junk command (one that moves no mail: NOOP, RSET, VRFY,
    /// HELP, EHLO/HELO); true past `max_junk_commands` since the last
    /// message, like Postfix's smtpd_junk_command_limit: a client looping
    /// on them holds a session (and a slot) without ever sending mail.
    fn junk_over(&mut self, cmd: &Command) -> bool {
        let max = self.cfg().limits.max_junk_commands;
        let junk = matches!(
            cmd,
            Command::Noop
                | Command::Rset
                | Command::Vrfy
                | Command::Help
                | Command::Ehlo(_)
                | Command::Helo(_)
        );
        if max == 0 || !junk {
            return false;
        }
        if self.st.junk_since != self.st.messages {
            self.st.junk_since = self.st.messages;
            self.st.junk = 0;
        }
        self.st.junk += 1;
        self.st.junk > max
    }

    /// EHLO (`esmtp`) or HELO: the transaction ends, the name is checked
    /// by the policy, and the reply (EHLO's lists the extensions) starts a
    /// fresh identity for the backend and the Received header.
    async fn ehlo(&mut self, name: &str, esmtp: bool) {
        self.end_txn();
        // The name the client gave, accepted or refused.
        Span::current().record("smtp.helo", name);
        if let Some(v) = Box::pin(self.pol.helo(name, self.local)).await {
            if self.pol.delay_reject() {
                self.pol.hold_helo(v);
            } else {
                self.st.helo = None;
                return self.policy_reply(&v).await;
            }
        }
        // A dedicated (XCLIENT) backend connection carries the old
        // identity: let it go.
        if let Some(c) = self.st.dedicated.take() {
            tokio::spawn(c.quit());
        }
        self.st.helo = Some(name.to_string());
        self.st.ident = None;
        self.st.received.clear();
        self.st.esmtp = esmtp;
        if esmtp {
            self.ehlo_reply();
        } else {
            let line = format!("250 {}\r\n", self.cfg().hostname);
            self.out.extend_from_slice(line.as_bytes());
        }
    }

    fn ehlo_reply(&mut self) {
        let cfg = &self.shared.cfg;
        let starttls = self.tls.is_none()
            && self.listener.tls == TlsMode::Starttls
            && self.shared.tls.is_some();
        let mut s = format!(
            "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n",
            cfg.hostname, cfg.limits.max_message_size
        );
        if starttls {
            s.push_str("250-SMTPUTF8\r\n250 STARTTLS\r\n");
        } else {
            s.push_str("250 SMTPUTF8\r\n");
        }
        self.out.extend_from_slice(s.as_bytes());
    }

    /// STARTTLS: 220 and the handshake next (`Step::StartTls`), or refused
    /// (TLS already on, not offered here, or inside a transaction).
    fn starttls(&mut self) -> Step {
        if self.tls.is_some() {
            self.bad(503, "5.5.1", "TLS already active");
        } else if self.listener.tls != TlsMode::Starttls || self.shared.tls.is_none() {
            self.bad(502, "5.5.1", "STARTTLS not available");
        } else if self.st.mail.is_some() {
            self.bad(
                503,
                "5.5.1",
                "STARTTLS not allowed during a mail transaction",
            );
        } else {
            self.reply(220, "2.0.0", "Ready to start TLS");
            return Step::StartTls;
        }
        Step::Continue
    }

    /// 503 to RCPT or DATA without a MAIL; an error unless it follows a
    /// refused MAIL in the same pipeline.
    pub(super) fn need_mail(&mut self) {
        if self.st.mail_refused {
            self.reply(503, "5.5.1", "Need MAIL command");
        } else {
            self.bad(503, "5.5.1", "Need MAIL command");
        }
    }

    async fn mail(&mut self, from: &str, params: smtp::MailParams) {
        self.st.mail_refused = true;
        if self.st.helo.is_none() {
            self.resolve().await;
            return self.bad(503, "5.5.1", "Send HELO/EHLO first");
        }
        if self.st.mail.is_some() {
            self.resolve().await;
            return self.bad(503, "5.5.1", "Nested MAIL command");
        }
        if self.listener.require_tls && self.tls.is_none() {
            return self.reply(530, "5.7.0", "Must issue a STARTTLS command first");
        }
        if self.pol.unsettled() {
            Box::pin(self.pol.connect_verdict()).await;
        }
        if let Some(v) = self.pol.mail() {
            self.resolve().await;
            return self.policy_reply(&v).await;
        }
        // A guard, not an `Arc` clone: every core writing the one
        // reference count per MAIL is what the cores would share (the
        // transaction takes its own clone).
        let relay = self.shared.backends.load();
        let routed = relay.routed();
        // The edge's own limit; without routes the transaction begins here,
        // on any backend, so none may get a message above the smallest
        // limit they announced either.
        let mut max = self.cfg().limits.max_message_size;
        if !routed {
            max = max.min(relay.size_limit(GroupId::UNROUTED).unwrap_or(u64::MAX));
        }
        if params.size.is_some_and(|s| s > max) {
            return self.reply(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
        }
        self.st.size_declared = params.size.unwrap_or(0);
        let dedicated = if routed {
            None
        } else {
            self.st.dedicated.take()
        };
        let (peer, pol, st) = (self.peer, &self.pol, &mut self.st);
        let id = st.ident.get_or_insert_with(|| {
            Box::new(ClientIdentity::new(
                peer,
                pol.rdns_name().map(str::to_string),
                st.helo.clone(),
                if st.esmtp { "ESMTP" } else { "SMTP" },
            ))
        });
        let span = transaction_span(from, self.shared.cfg.telemetry.record_addresses);
        if routed {
            self.st.txn_span = Some(span);
            return self.mail_routed(from, params);
        }
        // The wait for a backend connection may be long under a burst:
        // keep reading the client meanwhile, so one who hangs up gives up
        // its place in line at once (`begin_txn`). The replies and the DATA
        // phase are awaited inline: 412 bytes more per idle connection
        // than boxed (idle.sh), two allocations and ~20 cold cache lines
        // fewer per message (RESULTS.md section 24).
        let begin = (GroupId::UNROUTED, &**id, dedicated);
        let (held, slot) = (&mut st.held, &mut st.txn);
        let begun = match begin_txn(&relay, begin, held, &span, slot) {
            None => Some(Ok(())),
            Some(begin) => {
                begin_wait(&mut self.io, &mut self.inbuf, &relay, begin, &span, slot).await
            }
        };
        drop(relay);
        match begun {
            None => {
                self.client_gone = true;
                return;
            }
            Some(Err(reply)) => {
                record_end(&span, None, &reply);
                reply.write_to(&mut self.out);
                return;
            }
            Some(Ok(())) => {}
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return;
        };
        span.record("server.address", &*txn.name);
        txn.queue_mail(from, &params);
        let pipelining = txn.pipelining();
        self.st.txn_span = Some(span);
        self.mail_taken(from, params.smtputf8);
        self.st.owed.push_back(Owed::Mail);
        if !pipelining {
            self.resolve().await;
        }
    }

    /// A MAIL taken (relayed, or answered by the edge with routes): the
    /// transaction's state begins.
    pub(super) fn mail_taken(&mut self, from: &str, smtputf8: bool) {
        self.st.txn_started = Some(crate::timer::Stamp::now());
        self.st.mail = Some(smtputf8);
        self.st.mail_refused = false;
        self.st.from.clear();
        self.st.from.push_str(from);
    }

    async fn rcpt(&mut self, to: &str) {
        let Some(smtputf8) = self.st.mail else {
            self.resolve().await;
            return self.need_mail();
        };
        if self.st.lost {
            return crate::relay::backend_lost().write_to(&mut self.out);
        }
        if self.st.rcpts_sent >= self.cfg().limits.max_recipients {
            self.resolve().await;
            return self.reply(452, "4.5.3", "Too many recipients");
        }
        if !smtputf8 && !to.is_ascii() {
            self.resolve().await;
            return self.reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
        }
        if let Some(v) = self.pol.rcpt() {
            self.resolve().await;
            return self.policy_reply(&v).await;
        }
        // Near its budget of unknown recipients: the replies to the RCPTs
        // in flight first (one of them may end the session), so no more
        // than the budget reaches the backend, pipelined or not. With none
        // in flight there is nothing to wait for (and no budget to look up).
        let in_flight = self.st.owed.iter().filter(|o| **o == Owed::Rcpt).count();
        if in_flight > 0
            && self
                .pol
                .unknown_left()
                .is_some_and(|left| in_flight >= left as usize)
        {
            self.resolve().await;
            if self.over_budget.is_some() {
                return;
            }
        }
        if self.st.routed.is_some() {
            // Boxed: only routed sessions pay for its future.
            return Box::pin(self.rcpt_routed(to)).await;
        }
        let known =
            (self.st.txn.as_ref()).and_then(|t| t.backends().unknown_recipient(t.group(), to));
        if let Some(r) = known {
            return self.unknown_refusal(r).await;
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return self.reply(503, "5.5.1", "Need MAIL command");
        };
        txn.queue_rcpt(to);
        self.st.rcpts_sent += 1;
        self.st.owed.push_back(Owed::Rcpt);
        if !txn.pipelining() {
            self.resolve().await;
        }
    }

    /// A RCPT the backend refused as unknown a short while ago: its reply,
    /// given by the edge (in order after the replies still owed), counted
    /// as given (DATA then says no valid recipients).
    pub(super) async fn unknown_refusal(&mut self, reply: crate::smtp::Reply) {
        self.resolve().await;
        self.st.rcpts_sent += 1;
        self.shared.metrics.recipients_unknown_cached.inc();
        self.top.refusal("recipient_refused");
        if let Some(v) = self.pol.rcpt_refused(&reply) {
            self.over_budget.get_or_insert(Box::new(v));
        }
        reply.write_to(&mut self.out);
    }

    /// DATA rides in the same batch as the RCPTs still owed a reply (the
    /// backend then judges whether any recipient was accepted).
    async fn data_cmd(&mut self) {
        if self.st.mail.is_none() {
            self.resolve().await;
            return self.need_mail();
        }
        if self.st.lost {
            return crate::relay::backend_lost().write_to(&mut self.out);
        }
        if self.st.rcpts_sent == 0 {
            self.resolve().await;
            return self.bad(503, "5.5.1", "Need RCPT command");
        }
        if self.st.owed.is_empty() && self.st.rcpts_ok == 0 {
            return self.reply(554, "5.5.1", "No valid recipients");
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return self.reply(503, "5.5.1", "Need MAIL command");
        };
        if self.st.owed.is_empty() && self.st.rcpts_ok > 0 {
            // Every recipient is settled and one was accepted: send DATA and
            // answer 354 without waiting for the backend, so the message
            // travels while the backend answers (one round trip less per
            // message). A backend refusal of DATA becomes the reply after
            // the final dot, and no byte of the message is sent to it.
            if !txn.send_data_command().await {
                self.st.lost = true;
                return crate::relay::backend_lost().write_to(&mut self.out);
            }
            self.reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>");
            self.st.data_go = true;
            self.st.data_early = true;
            return;
        }
        txn.queue_data();
        self.st.owed.push_back(Owed::Data);
        self.resolve().await;
    }
}
