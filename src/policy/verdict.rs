//! What a policy check reports: [`Check`] (every check, named for counts
//! and logs), [`Verdict`] (a failed check's reply and whether it is
//! enforced) and [`CheckCount`] (a check's counts). Plain values; the
//! policy (`mod.rs`) decides and counts them.

/// Every check, for counting and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Deny,
    GlobalCap,
    Concurrency,
    ConnectionRate,
    MessageRate,
    RecipientRate,
    Pregreet,
    Rdns,
    Dnsbl,
    HeloSyntax,
    HeloBareIp,
    HeloLiteral,
    HeloFqdn,
    HeloOurs,
    HeloResolves,
    HeloRdns,
    /// A banned address (or network), refused at connect.
    Ban,
    /// Past the budget of recipients refused as unknown.
    UnknownRecipients,
    /// Past the budget of bad commands.
    BadCommands,
}

impl Check {
    pub const ALL: [Check; 19] = [
        Check::Deny,
        Check::GlobalCap,
        Check::Concurrency,
        Check::ConnectionRate,
        Check::MessageRate,
        Check::RecipientRate,
        Check::Pregreet,
        Check::Rdns,
        Check::Dnsbl,
        Check::HeloSyntax,
        Check::HeloBareIp,
        Check::HeloLiteral,
        Check::HeloFqdn,
        Check::HeloOurs,
        Check::HeloResolves,
        Check::HeloRdns,
        Check::Ban,
        Check::UnknownRecipients,
        Check::BadCommands,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::Deny => "deny_list",
            Check::GlobalCap => "max_connections",
            Check::Concurrency => "concurrency",
            Check::ConnectionRate => "connection_rate",
            Check::MessageRate => "message_rate",
            Check::RecipientRate => "recipient_rate",
            Check::Pregreet => "pregreet",
            Check::Rdns => "rdns",
            Check::Dnsbl => "dnsbl",
            Check::HeloSyntax => "helo_syntax",
            Check::HeloBareIp => "helo_bare_ip",
            Check::HeloLiteral => "helo_literal_mismatch",
            Check::HeloFqdn => "helo_fqdn",
            Check::HeloOurs => "helo_not_ours",
            Check::HeloResolves => "helo_resolves",
            Check::HeloRdns => "helo_match_rdns",
            Check::Ban => "ban",
            Check::UnknownRecipients => "unknown_recipients",
            Check::BadCommands => "bad_commands",
        }
    }
}

/// A failed check: the reply it gives and whether it is enforced (false:
/// observe-only, logged and counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub check: Check,
    pub code: u16,
    pub enh: &'static str,
    pub text: String,
    pub enforce: bool,
}

impl Verdict {
    /// The same verdict given at connect (as the greeting or instead of
    /// it): 554 for a permanent refusal, 421 for a temporary one.
    pub fn at_connect(&self) -> (u16, &'static str) {
        if self.code >= 500 {
            (554, self.enh)
        } else {
            (421, self.enh)
        }
    }
}

/// Counts per check: how often it failed while observed, and enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckCount {
    pub check: Check,
    pub observed: u64,
    pub enforced: u64,
}
