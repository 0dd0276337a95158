//! What a limiter reports: which limit a client went over ([`LimitKind`])
//! and the key it was counted under ([`Scope`]). Plain values shared by the
//! limiter files; decides nothing and holds no state.

/// Which limit a client went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Concurrency,
    ConnectionRate,
    MessageRate,
    RecipientRate,
}

impl LimitKind {
    /// The limit's section name under `[policy.limits]`.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Concurrency => "concurrency",
            LimitKind::ConnectionRate => "connection_rate",
            LimitKind::MessageRate => "message_rate",
            LimitKind::RecipientRate => "recipient_rate",
        }
    }
}

/// The key a limit was counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Ip,
    Prefix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHit {
    pub kind: LimitKind,
    pub scope: Scope,
}
