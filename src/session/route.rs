//! Recipients routed by domain (`[[route]]`). With routes the edge answers
//! MAIL itself (after its own checks) and the transaction begins at the
//! first RCPT, on the group that recipient's domain routes to; the MAIL
//! goes to the backend then, ahead of that RCPT (`Owed::DeferredMail`).
//!
//! - No route for the domain: 550 5.7.1, nothing sent anywhere.
//! - The first accepted recipient fixes the route: a recipient of another
//!   route gets 452 4.5.3 (RFC 5321's "too many recipients": the client
//!   sends it again in a new transaction). Until one is accepted, a
//!   recipient of another route drops the transaction begun (RSET) and
//!   begins one on its own route.
//! - `SIZE=` above the smallest limit the route's backends announced: 552
//!   5.3.4 at that RCPT, before anything is sent.
//! - A backend that refuses the deferred MAIL: the RCPTs of its batch get
//!   that refusal (the client had 250 for MAIL), the backend transaction is
//!   dropped and the next RCPT begins again.
//!
//! Without routes none of this runs: MAIL begins the transaction, as it
//! always did (`commands.rs`).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::commands::{begin_txn, begin_wait};
use super::{Owed, Session};
use crate::relay::route::GroupId;
use crate::relay::{backend_lost, Backends};
use crate::smtp::{MailParams, Reply};

/// What a routed transaction keeps of its MAIL until a RCPT begins it.
pub(super) struct RoutedMail {
    /// The MAIL's parameters, sent with it.
    params: MailParams,
    /// A backend refused the MAIL the edge had answered, and no RCPT was
    /// in its batch to carry that reply: the RCPT that began it gets it.
    refusal: Option<Reply>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// MAIL with routes: accepted here (the caller made every check MAIL
    /// gets); the backend hears it at the first RCPT.
    pub(super) fn mail_routed(&mut self, from: &str, params: MailParams) {
        self.st.routed = Some(Box::new(RoutedMail {
            params,
            refusal: None,
        }));
        self.mail_taken(from, params.smtputf8);
        self.reply(250, "2.1.0", "Ok");
    }

    /// RCPT of a routed transaction (the caller made every check RCPT
    /// gets before its route).
    pub(super) async fn rcpt_routed(&mut self, to: &str) {
        // Routed by the set the transaction began from, if it has begun (a
        // reload may have swapped in another since).
        let backends = match &self.st.txn {
            Some(t) => t.backends().clone(),
            None => self.shared.backends(),
        };
        let Some(g) = backends.route(to) else {
            self.resolve().await;
            return self.route_refusal("no_route", 550, "5.7.1", "Relay access denied");
        };
        if let Some(r) = backends.unknown_recipient(g, to) {
            return self.unknown_refusal(r).await;
        }
        if self.st.txn.as_ref().is_some_and(|t| t.group() != g) {
            // Whether a recipient fixed the route: every reply owed decides.
            self.resolve().await;
            if self.st.lost {
                return backend_lost().write_to(&mut self.out);
            }
            if self.st.rcpts_ok > 0 {
                return self.route_refusal(
                    "other_route",
                    452,
                    "4.5.3",
                    "Too many recipients: this domain takes another route, send it in a new transaction",
                );
            }
            // None accepted: this recipient's route is the transaction's.
            if let Some(t) = self.st.txn.take() {
                self.st.dedicated = t.end(&mut self.st.held);
            }
        }
        if self.st.txn.is_none() && !self.begin_route(&backends, g).await {
            return;
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return;
        };
        txn.queue_rcpt(to);
        self.st.rcpts_sent += 1;
        self.st.owed.push_back(Owed::Rcpt);
        if !txn.pipelining() {
            self.resolve().await;
        }
    }

    /// A recipient the routes refuse: counted as given (DATA then says no
    /// valid recipients), and by reason.
    fn route_refusal(&mut self, reason: &'static str, code: u16, enh: &str, text: &str) {
        self.st.rcpts_sent += 1;
        self.shared.metrics.route_refusal(reason);
        self.reply(code, enh, text);
    }

    /// Begins the transaction on group `g` with the deferred MAIL queued;
    /// false when it did not (the RCPT's reply is written).
    async fn begin_route(&mut self, backends: &Arc<Backends>, g: GroupId) -> bool {
        let Some(params) = self.st.routed.as_ref().map(|r| r.params) else {
            return false;
        };
        if let (Some(size), Some(limit)) = (params.size, backends.size_limit(g)) {
            if size > limit {
                self.route_refusal(
                    "size",
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                );
                return false;
            }
        }
        let dedicated = self.st.dedicated.take();
        let Some(id) = self.st.ident.as_deref() else {
            return false;
        };
        let span = self.st.txn_span.clone().unwrap_or_else(tracing::Span::none);
        let begin = (g, id, dedicated);
        let (held, slot) = (&mut self.st.held, &mut self.st.txn);
        let begun = match begin_txn(backends, begin, held, &span, slot) {
            None => Some(Ok(())),
            Some(begin) => {
                begin_wait(&mut self.io, &mut self.inbuf, backends, begin, &span, slot).await
            }
        };
        match begun {
            None => {
                self.client_gone = true;
                return false;
            }
            Some(Err(reply)) => {
                self.st.rcpts_sent += 1;
                reply.write_to(&mut self.out);
                return false;
            }
            Some(Ok(())) => {}
        }
        let Some(txn) = self.st.txn.as_mut() else {
            return false;
        };
        span.record("server.address", &*txn.name);
        txn.queue_mail(&self.st.from, &params);
        let pipelining = txn.pipelining();
        self.st.owed.push_back(Owed::DeferredMail);
        if !pipelining {
            self.resolve().await;
            if self.st.txn.is_none() {
                if let Some(r) = self.st.routed.as_mut().and_then(|r| r.refusal.take()) {
                    self.st.rcpts_sent += 1;
                    r.write_to(&mut self.out);
                }
                return false;
            }
        }
        true
    }

    /// The backend refused a deferred MAIL (`reply`): its transaction is
    /// dropped (the connection aborted when `abort`, else RSET and back to
    /// its pool) and the client's MAIL stands, its route open again. When
    /// no RCPT of the batch carried the refusal, the RCPT that began it
    /// will.
    pub(super) fn drop_refused_txn(&mut self, reply: Reply, carried: bool, abort: bool) {
        if let Some(t) = self.st.txn.take() {
            if abort {
                t.abort();
            } else {
                self.st.dedicated = t.end(&mut self.st.held);
            }
        }
        if let (false, Some(r)) = (carried, self.st.routed.as_mut()) {
            r.refusal = Some(reply);
        }
    }
}
