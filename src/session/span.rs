//! The session's spans: the root span of a connection (`smtp.session`), the
//! policy verdicts recorded on it, and the end of a transaction recorded on
//! its `smtp.transaction` span. A leaf: it knows nothing of `Session`.

use std::net::SocketAddr;

use tracing::{field, Span};

use crate::policy::Verdict;
use crate::smtp::{self, Reply};

/// The root span of one client connection (`smtp.session`), made at accept
/// so the admission's DNS lookups and a refusal belong to it.
/// `via` is the load balancer's address when the client's came in a PROXY
/// protocol header (`network.peer.*`, the socket's other end).
pub fn session_span(peer: SocketAddr, via: Option<SocketAddr>) -> Span {
    let span = crate::span!(
        crate::telemetry::sample_session(),
        "smtp.session",
        "otel.kind" = "server",
        "client.address" = %peer.ip(),
        // Integers as i64: tracing-opentelemetry formats a u64 (or u16)
        // into a string attribute, an allocation per field.
        "client.port" = i64::from(peer.port()),
        "server.address" = field::Empty,
        "server.port" = field::Empty,
        "network.transport" = "tcp",
        "network.peer.address" = field::Empty,
        "network.peer.port" = field::Empty,
        "smtp.helo" = field::Empty,
        "tls.protocol.version" = field::Empty,
        "tls.cipher" = field::Empty,
        "smtp.policy.check" = field::Empty,
        "smtp.policy.action" = field::Empty,
        "error.type" = field::Empty,
        "otel.status_code" = field::Empty,
        trace_id = field::Empty,
    );
    if let Some(v) = via {
        span.record("network.peer.address", field::display(v.ip()));
        span.record("network.peer.port", i64::from(v.port()));
    }
    // The trace id in every log line of the session (when traced).
    if let Some(id) = crate::telemetry::trace_id(&span) {
        span.record("trace_id", id);
    }
    span
}

/// Marks a session refused by the policy at accept (for tail sampling).
pub fn record_refusal(span: &Span, v: &Verdict) {
    record_verdict(span, v.at_connect().0, v);
}

/// An enforced policy verdict, answered with `code`, on the session span:
/// the check, the action (`reject` for a 5xx, `defer` for a 4xx) and an
/// error status, so that the collector's tail sampling keeps the session
/// (the last verdict wins).
pub(super) fn record_verdict(span: &Span, code: u16, v: &Verdict) {
    let action = if code >= 500 { "reject" } else { "defer" };
    span.record("smtp.policy.check", v.check.name());
    span.record("smtp.policy.action", action);
    span.record("error.type", "refused");
    span.record("otel.status_code", "ERROR");
}

/// The span of one transaction (`smtp.transaction`): MAIL to the final
/// reply, the wait for a backend inside it. The sender's address is
/// recorded only with `telemetry.record_addresses` (`record_addresses`).
pub(super) fn transaction_span(from: &str, record_addresses: bool) -> Span {
    let span = crate::span!(
        crate::telemetry::in_traced(),
        "smtp.transaction",
        "smtp.mail_from.domain" = from.rsplit_once('@').map_or("", |(_, d)| d),
        "smtp.mail_from" = field::Empty,
        "smtp.rcpt.count" = field::Empty,
        "smtp.message.size" = field::Empty,
        "smtp.reply.code" = field::Empty,
        "smtp.reply.enhanced_code" = field::Empty,
        "smtp.chunking" = field::Empty,
        "server.address" = field::Empty,
        "error.type" = field::Empty,
        "otel.status_code" = field::Empty,
    );
    if record_addresses {
        span.record("smtp.mail_from", from);
    }
    span
}

/// The end of a transaction on its span: recipients and size when the
/// message was sent, the final reply (an error status for 4xx and 5xx).
/// One `record_all` (one pass through every layer) instead of a `record`
/// per field: this runs once per message.
pub(super) fn record_end(span: &Span, sent: Option<(usize, u64)>, reply: &Reply) {
    let Some(meta) = span.metadata() else {
        return;
    };
    let fields = meta.fields();
    let (Some(rcpts_f), Some(size_f), Some(code_f), Some(enh_f), Some(err_f), Some(status_f)) = (
        fields.field("smtp.rcpt.count"),
        fields.field("smtp.message.size"),
        fields.field("smtp.reply.code"),
        fields.field("smtp.reply.enhanced_code"),
        fields.field("error.type"),
        fields.field("otel.status_code"),
    ) else {
        return;
    };
    // Integers as i64 and texts as `str`: tracing-opentelemetry formats
    // a u64 or a `display` value into a new `String` (an allocation and
    // the formatting machinery per field, per message).
    let (rcpts, size) = sent.unzip();
    let rcpts = rcpts.map(|n| n as i64);
    let size = size.map(|n| n.min(i64::MAX as u64) as i64);
    let code = i64::from(reply.code);
    let mut enh_buf = [0u8; 17];
    let enhanced = reply.enhanced().map(|e| e.text(&mut enh_buf));
    let mut code_buf = [0u8; 5];
    let code_str = smtp::reply::code_text(reply.code, &mut code_buf);
    let failed = reply.code >= 400;
    let values: [(&field::Field, Option<&dyn field::Value>); 6] = [
        (&rcpts_f, rcpts.as_ref().map(|v| v as &dyn field::Value)),
        (&size_f, size.as_ref().map(|v| v as &dyn field::Value)),
        (&code_f, Some(&code as &dyn field::Value)),
        (&enh_f, enhanced.as_ref().map(|v| v as &dyn field::Value)),
        // error.type is a string (semantic conventions): the reply code.
        (&err_f, failed.then_some(&code_str as &dyn field::Value)),
        (&status_f, failed.then_some(&"ERROR" as &dyn field::Value)),
    ];
    span.record_all(&fields.value_set(&values));
}
