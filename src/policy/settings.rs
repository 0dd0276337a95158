//! The `[policy]` configuration section: types, defaults and validation of
//! admission policy settings (lists, limits, HELO, rDNS, DNSBL, pregreet,
//! DNS, the recipient verdict cache, bans and their budgets), and the Redis URL check that validation runs. Plain data; the
//! checks that use it live beside it in `policy/`.

use std::net::SocketAddr;

use ipnet::IpNet;
use redis::IntoConnectionInfo;
use serde::Deserialize;

/// What a check does when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The check is not run.
    #[default]
    Off,
    /// Run, log and count, never enforce.
    Observe,
    /// Enforce with a temporary (4xx) reply.
    Defer,
    /// Enforce with the check's permanent (5xx) reply; checks whose failure
    /// is temporary by nature (rate limits, DNS errors) still answer 4xx.
    Reject,
}

impl Action {
    /// The action's name in the configuration and in logs and traces.
    pub fn name(self) -> &'static str {
        match self {
            Action::Off => "off",
            Action::Observe => "observe",
            Action::Defer => "defer",
            Action::Reject => "reject",
        }
    }

    pub fn runs(self) -> bool {
        self != Action::Off
    }
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Deliver connect- and HELO-phase rejections as the reply to MAIL FROM
    /// (Postfix `smtpd_delay_reject = yes`) instead of at connect / HELO.
    pub delay_reject: bool,
    /// Seconds to wait before sending any policy reject or defer reply.
    pub tarpit: f64,
    /// CIDRs that skip the whole policy (limits included).
    pub allow: Vec<IpNet>,
    /// CIDRs refused at connect with 554 5.7.1.
    pub deny: Vec<IpNet>,
    pub limits: LimitsConfig,
    pub helo: HeloConfig,
    pub rdns: RdnsConfig,
    pub dnsbl: DnsblConfig,
    pub pregreet: PregreetConfig,
    pub dns: DnsConfig,
    pub recipients: RecipientsConfig,
    pub bans: BansConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            delay_reject: true,
            tarpit: 0.0,
            allow: Vec::new(),
            deny: Vec::new(),
            limits: LimitsConfig::default(),
            helo: HeloConfig::default(),
            rdns: RdnsConfig::default(),
            dnsbl: DnsblConfig::default(),
            pregreet: PregreetConfig::default(),
            dns: DnsConfig::default(),
            recipients: RecipientsConfig::default(),
            bans: BansConfig::default(),
        }
    }
}

/// `[policy.limits]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sessions at once over all clients; 0 = no limit. Over it: 421 4.3.2.
    pub max_connections: usize,
    /// Prefix length that groups IPv4 clients into one "network".
    pub ipv4_prefix: u8,
    /// Prefix length that groups IPv6 clients into one "network".
    pub ipv6_prefix: u8,
    /// Upper bound on keys held by each rate limiter before idle keys are
    /// evicted early (a flood of distinct addresses cannot grow it further).
    pub max_tracked_keys: usize,
    /// Seconds between sweeps that evict idle keys.
    pub sweep_interval: f64,
    pub concurrency: ConcurrencyConfig,
    pub connection_rate: RateConfig,
    pub message_rate: RateConfig,
    pub recipient_rate: RateConfig,
    /// `[policy.limits.redis]`: the Redis the `store = "redis"` rates share.
    pub redis: Option<RedisConfig>,
}

impl LimitsConfig {
    /// True when some rate limit keeps its state on Redis.
    pub fn uses_redis(&self) -> bool {
        [
            &self.connection_rate,
            &self.message_rate,
            &self.recipient_rate,
        ]
        .iter()
        .any(|r| r.store == Store::Redis)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            max_tracked_keys: 1_000_000,
            sweep_interval: 60.0,
            concurrency: ConcurrencyConfig::default(),
            connection_rate: RateConfig::default(),
            message_rate: RateConfig::default(),
            recipient_rate: RateConfig::default(),
            redis: None,
        }
    }
}

/// `[policy.limits.redis]`: where the shared rate limits live and what the
/// limits do while it cannot be reached.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` or `unix:///path`; TLS
    /// (`rediss://`) is not built in.
    pub url: Option<String>,
    /// Seconds a Redis call may take before it counts as failed and the
    /// limits follow `on_failure`. Sessions never wait for Redis.
    pub timeout: f64,
    pub on_failure: OnFailure,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            timeout: 0.05,
            on_failure: OnFailure::Local,
        }
    }
}

/// What a Redis-backed limit does while Redis is slow or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Enforce with this instance's own limiter (the same rate, counted
    /// per instance).
    #[default]
    Local,
    /// Admit: the limit is not enforced until Redis is back.
    Open,
}

impl OnFailure {
    pub fn name(self) -> &'static str {
        match self {
            OnFailure::Local => "local",
            OnFailure::Open => "open",
        }
    }
}

/// Where a rate limit keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    /// In this process: each instance counts on its own.
    #[default]
    Local,
    /// On `[policy.limits.redis]`: the instances sharing it count together.
    Redis,
}

/// `[policy.limits.concurrency]`: sessions at once per IP and per prefix.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConcurrencyConfig {
    pub action: Action,
    /// 0 = no limit.
    pub per_ip: u32,
    /// 0 = no limit.
    pub per_prefix: u32,
}

/// `[policy.limits.connection_rate]` and friends: GCRA rates per IP and
/// per prefix.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    pub action: Action,
    pub per_ip: Option<Rate>,
    pub per_prefix: Option<Rate>,
    /// `local` (default) or `redis` (shared by the instances on one Redis).
    pub store: Store,
}

/// `count` events per `period` seconds, with up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub count: u32,
    #[serde(default = "default_period")]
    pub period: f64,
    /// Defaults to `count`.
    #[serde(default)]
    pub burst: Option<u32>,
}

fn default_period() -> f64 {
    60.0
}

/// `[policy.helo]`: one action per HELO/EHLO check.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeloConfig {
    /// RFC 5321 Domain or address literal. 501 5.5.2.
    pub syntax: Action,
    /// A dotted name, not a bare label. 504 5.5.2.
    pub fqdn: Action,
    /// Not our hostname or one of our listener addresses. 550 5.7.1.
    pub not_ours: Action,
    /// A bare IP address without brackets. 501 5.5.2.
    pub bare_ip: Action,
    /// An address literal must be the client's address. 550 5.7.1.
    pub literal_mismatch: Action,
    /// The name must have A, AAAA or MX records. 550 5.7.1 / 450 4.7.1.
    pub resolves: Action,
    /// The name must equal the client's forward-confirmed rDNS name or be
    /// in its domain. 550 5.7.1.
    pub match_rdns: Action,
}

impl Default for HeloConfig {
    fn default() -> Self {
        HeloConfig {
            syntax: Action::Reject,
            fqdn: Action::Observe,
            not_ours: Action::Observe,
            bare_ip: Action::Observe,
            literal_mismatch: Action::Observe,
            resolves: Action::Off,
            match_rdns: Action::Off,
        }
    }
}

/// `[policy.rdns]`: reverse DNS with forward confirmation (FCrDNS).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdnsConfig {
    /// Look the client's name up at all (also feeds the Received header
    /// and XFORWARD NAME).
    pub lookup: bool,
    /// No PTR record. 550 5.7.25.
    pub no_ptr: Action,
    /// No PTR name resolves back to the client. 550 5.7.25.
    pub mismatch: Action,
    /// The lookup failed temporarily (SERVFAIL, timeout). Always 4xx:
    /// 450 4.7.25.
    pub temp_error: Action,
    /// PTR names tried for forward confirmation.
    pub max_names: usize,
}

impl Default for RdnsConfig {
    fn default() -> Self {
        RdnsConfig {
            lookup: false,
            no_ptr: Action::Observe,
            mismatch: Action::Observe,
            temp_error: Action::Observe,
            max_names: 2,
        }
    }
}

/// `[policy.dnsbl]`: postscreen-style weighted DNS lists.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblConfig {
    pub action: Action,
    /// A client whose summed weights reach this is listed. 554 5.7.1.
    pub threshold: i32,
    #[serde(rename = "zone")]
    pub zones: Vec<DnsblZone>,
    /// Seconds between the zones' health checks (their test entries); 0 =
    /// off.
    pub health_interval: f64,
}

impl Default for DnsblConfig {
    fn default() -> Self {
        DnsblConfig {
            action: Action::Off,
            threshold: 1,
            zones: Vec::new(),
            health_interval: 300.0,
        }
    }
}

/// `[[policy.dnsbl.zone]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsblZone {
    /// DNS zone, e.g. `zen.spamhaus.org`.
    pub name: String,
    /// Added to the score when listed; negative for allow lists.
    #[serde(default = "default_weight")]
    pub weight: i32,
    /// Answers that count: addresses or inclusive ranges
    /// (`127.0.0.2..127.0.0.11`); empty = any answer.
    #[serde(default)]
    pub codes: Vec<String>,
}

fn default_weight() -> i32 {
    1
}

/// `[policy.pregreet]`: talk-before-greeting detection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PregreetConfig {
    /// 554 5.5.1 for a client that talked first.
    pub action: Action,
    /// Seconds between the first line of a two-line greeting (`220-`) and
    /// the last (`220 `). 0 = no delay.
    pub delay: f64,
    /// Seconds an offender is remembered (refused at connect meanwhile).
    pub remember: f64,
}

impl Default for PregreetConfig {
    fn default() -> Self {
        PregreetConfig {
            action: Action::Off,
            delay: 0.0,
            remember: 3600.0,
        }
    }
}

/// `[policy.recipients]`: recipients a backend refused as unknown,
/// remembered at the edge (the cache is the relay's, per group of backends).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecipientsConfig {
    /// Seconds a backend's permanent "no such user" answer is remembered
    /// and given by the edge itself; 0 = off.
    pub cache_unknown: f64,
    /// Most recipients remembered (over all groups).
    pub cache_size: u64,
    /// The enhanced codes of a 5xx RCPT reply that mean "no such user".
    pub unknown_codes: Vec<String>,
    /// Whether the local part compares case-sensitively (the domain never
    /// does). Most backends treat local parts without regard to case.
    pub local_part_case_sensitive: bool,
}

impl Default for RecipientsConfig {
    fn default() -> Self {
        RecipientsConfig {
            cache_unknown: 300.0,
            cache_size: 100_000,
            unknown_codes: vec!["5.1.1".into()],
            local_part_case_sensitive: false,
        }
    }
}

impl RecipientsConfig {
    /// The enhanced codes of `unknown_codes` (those that parse).
    pub fn codes(&self) -> Vec<(u8, u16, u16)> {
        self.unknown_codes
            .iter()
            .filter_map(|c| parse_enhanced(c))
            .collect()
    }

    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if !secs_ok(self.cache_unknown) {
            err(
                "policy.recipients.cache_unknown".into(),
                "must be seconds >= 0 (0 = off)".into(),
            );
        }
        if self.cache_size == 0 {
            err(
                "policy.recipients.cache_size".into(),
                "must be > 0 (cache_unknown = 0 turns the cache off)".into(),
            );
        }
        for c in &self.unknown_codes {
            if parse_enhanced(c).is_none_or(|(class, _, _)| class != 5) {
                err(
                    "policy.recipients.unknown_codes".into(),
                    format!("{c:?}: expected a permanent enhanced code, 5.x.y (such as \"5.1.1\")"),
                );
            }
        }
    }
}

/// `[policy.bans]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BansConfig {
    /// `local` (this process only, gone on restart) or `redis` (shared on
    /// `[policy.limits.redis]`, with their expiry there).
    pub store: Store,
    /// Most bans held; past it, an automatic ban is not added (logged and
    /// counted), an admin one is refused.
    pub max_bans: usize,
    pub unknown_recipients: BudgetConfig,
    pub bad_commands: BudgetConfig,
}

impl Default for BansConfig {
    fn default() -> Self {
        BansConfig {
            store: Store::Local,
            max_bans: 100_000,
            unknown_recipients: BudgetConfig {
                action: Action::Off,
                per_ip: Budget {
                    count: 20,
                    period: 600.0,
                },
                ban_for: 3600.0,
            },
            bad_commands: BudgetConfig {
                action: Action::Off,
                per_ip: Budget {
                    count: 50,
                    period: 600.0,
                },
                ban_for: 600.0,
            },
        }
    }
}

/// One error budget: past `per_ip` within its period, the session gets
/// 421 and the address is banned for `ban_for` seconds (`reject` or
/// `defer`); `observe` logs and counts only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default)]
    pub action: Action,
    pub per_ip: Budget,
    pub ban_for: f64,
}

/// `count` events per `period` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub count: u32,
    pub period: f64,
}

impl BansConfig {
    /// `err(key, message)`; `has_redis`: `[policy.limits.redis]` has a url.
    pub fn validate(&self, has_redis: bool, err: &mut dyn FnMut(String, String)) {
        if self.store == Store::Redis && !has_redis {
            err(
                "policy.bans.store".into(),
                "\"redis\" needs a [policy.limits.redis] section with a url (bans share the limits' Redis)".into(),
            );
        }
        if self.max_bans == 0 {
            err("policy.bans.max_bans".into(), "must be > 0".into());
        }
        for (name, b) in [
            ("unknown_recipients", &self.unknown_recipients),
            ("bad_commands", &self.bad_commands),
        ] {
            let key = |k: &str| format!("policy.bans.{name}.{k}");
            if b.per_ip.count == 0 {
                err(key("per_ip"), "count must be > 0".into());
            }
            if !(secs_ok(b.per_ip.period) && b.per_ip.period > 0.0) {
                err(key("per_ip"), "period must be seconds > 0".into());
            }
            if !(secs_ok(b.ban_for) && b.ban_for > 0.0) {
                err(key("ban_for"), "must be seconds > 0".into());
            }
        }
    }
}

/// `class.subject.detail` (RFC 3463: class 2, 4 or 5; subject and detail
/// up to three digits).
pub(crate) fn parse_enhanced(s: &str) -> Option<(u8, u16, u16)> {
    let mut it = s.split('.');
    let class: u8 = it.next()?.parse().ok()?;
    let subject: u16 = it.next()?.parse().ok()?;
    let detail: u16 = it.next()?.parse().ok()?;
    (it.next().is_none() && matches!(class, 2 | 4 | 5) && subject < 1000 && detail < 1000)
        .then_some((class, subject, detail))
}

/// `[policy.dns]`: the resolver and the verdict caches.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers (`ip:port`); empty = the system's (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Seconds per query attempt.
    pub timeout: f64,
    /// Attempts per query.
    pub attempts: usize,
    /// Entries per cache (rDNS, DNSBL, HELO names each).
    pub cache_size: u64,
    /// Cached answers live at least this many seconds...
    pub min_ttl: f64,
    /// ... and at most this many.
    pub max_ttl: f64,
    /// Seconds a negative answer lives when the zone gives no SOA minimum,
    /// and a temporary failure always.
    pub negative_ttl: f64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: 3.0,
            attempts: 2,
            cache_size: 100_000,
            min_ttl: 60.0,
            max_ttl: 86_400.0,
            negative_ttl: 300.0,
        }
    }
}

impl PolicyConfig {
    /// Semantic checks; `err(key, message)` with keys relative to the file.
    /// One section after the other, then the settings that need another
    /// section's.
    pub fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if !secs_ok(self.tarpit) {
            err("policy.tarpit".into(), "must be seconds >= 0".into());
        }
        self.limits.validate(err);
        if let Some(r) = &self.limits.redis {
            r.validate(err);
        }
        self.rdns.validate(err);
        self.dnsbl.validate(err);
        self.validate_needs(err);
        self.pregreet.validate(err);
        self.dns.validate(err);
        self.recipients.validate(err);
        let has_redis = self.limits.redis.as_ref().is_some_and(|r| r.url.is_some());
        self.bans.validate(has_redis, err);
    }

    /// Settings that need another one: enforced rDNS checks and HELO
    /// matching need the rDNS lookup, a DNSBL action needs zones.
    fn validate_needs(&self, err: &mut dyn FnMut(String, String)) {
        for (k, a) in [
            ("no_ptr", self.rdns.no_ptr),
            ("mismatch", self.rdns.mismatch),
            ("temp_error", self.rdns.temp_error),
        ] {
            if matches!(a, Action::Defer | Action::Reject) && !self.rdns.lookup {
                err(
                    format!("policy.rdns.{k}"),
                    "is enforced but [policy.rdns] lookup = false: set lookup = true".into(),
                );
            }
        }
        if self.helo.match_rdns.runs() && !self.rdns.lookup {
            err(
                "policy.helo.match_rdns".into(),
                "needs [policy.rdns] lookup = true (there is no name to match otherwise)".into(),
            );
        }
        if self.dnsbl.action.runs() && self.dnsbl.zones.is_empty() {
            err(
                "policy.dnsbl.zone".into(),
                "dnsbl.action is set but no [[policy.dnsbl.zone]] is given".into(),
            );
        }
    }
}

/// Seconds a setting may hold: finite, `0..1e7`.
fn secs_ok(v: f64) -> bool {
    v.is_finite() && (0.0..1e7).contains(&v)
}

impl LimitsConfig {
    /// `[policy.limits]` and its rates (`[policy.limits.redis]` is
    /// [`RedisConfig::validate`]).
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let l = self;
        if l.ipv4_prefix > 32 {
            err("policy.limits.ipv4_prefix".into(), "must be 0..=32".into());
        }
        if l.ipv6_prefix > 128 {
            err("policy.limits.ipv6_prefix".into(), "must be 0..=128".into());
        }
        if l.max_tracked_keys == 0 {
            err(
                "policy.limits.max_tracked_keys".into(),
                "must be > 0".into(),
            );
        }
        if !(secs_ok(l.sweep_interval) && l.sweep_interval > 0.0) {
            err(
                "policy.limits.sweep_interval".into(),
                "must be seconds > 0".into(),
            );
        }
        for (name, r) in [
            ("connection_rate", &l.connection_rate),
            ("message_rate", &l.message_rate),
            ("recipient_rate", &l.recipient_rate),
        ] {
            for (which, rate) in [("per_ip", &r.per_ip), ("per_prefix", &r.per_prefix)] {
                if let Some(rate) = rate {
                    let key = format!("policy.limits.{name}.{which}");
                    if rate.count == 0 {
                        err(key.clone(), "count must be > 0".into());
                    }
                    if !(secs_ok(rate.period) && rate.period > 0.0) {
                        err(key.clone(), "period must be seconds > 0".into());
                    }
                    if rate.burst == Some(0) {
                        err(key, "burst must be > 0".into());
                    }
                }
            }
            let has_url = l.redis.as_ref().is_some_and(|r| r.url.is_some());
            if r.store == Store::Redis && !has_url {
                err(
                    format!("policy.limits.{name}.store"),
                    "\"redis\" needs a [policy.limits.redis] section with a url".into(),
                );
            }
        }
    }
}

impl RedisConfig {
    /// `[policy.limits.redis]`.
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let r = self;
        match &r.url {
            None => err(
                "policy.limits.redis.url".into(),
                "is required in [policy.limits.redis]".into(),
            ),
            Some(url) => {
                if let Err(e) = check_url(url) {
                    err("policy.limits.redis.url".into(), e);
                }
            }
        }
        if !(secs_ok(r.timeout) && r.timeout > 0.0) {
            err(
                "policy.limits.redis.timeout".into(),
                "must be seconds > 0".into(),
            );
        }
    }
}

/// Checks that `url` is one the Redis client can connect to (without
/// connecting): for `check-config`.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("rediss://") {
        return Err(format!(
            "{url:?}: TLS to Redis (rediss://) is not built in; use redis:// on a private network, or unix://"
        ));
    }
    if !(url.starts_with("redis://")
        || url.starts_with("unix://")
        || url.starts_with("redis+unix://"))
    {
        return Err(format!(
            "{url:?}: expected redis://[user:password@]host[:port][/db] or unix:///path"
        ));
    }
    match url.into_connection_info() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{url:?}: {e}")),
    }
}

impl RdnsConfig {
    /// `[policy.rdns]` on its own (its actions' need of the lookup is
    /// checked with the other needs).
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if self.max_names == 0 {
            err("policy.rdns.max_names".into(), "must be > 0".into());
        }
    }
}

impl DnsblConfig {
    /// `[[policy.dnsbl.zone]]` (the action's need of zones is checked with
    /// the other needs).
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if !secs_ok(self.health_interval) {
            err(
                "policy.dnsbl.health_interval".into(),
                "must be seconds >= 0 (0 = off)".into(),
            );
        }
        for (i, z) in self.zones.iter().enumerate() {
            if z.name.is_empty() || z.name.starts_with('.') || z.name.contains("..") {
                err(
                    format!("policy.dnsbl.zone[{i}].name"),
                    "must be a DNS zone name".into(),
                );
            }
            for c in &z.codes {
                if parse_code_range(c).is_none() {
                    err(
                        format!("policy.dnsbl.zone[{i}].codes"),
                        format!("{c:?}: expected an IPv4 address or a range a.b.c.d..e.f.g.h"),
                    );
                }
            }
        }
    }
}

impl PregreetConfig {
    /// `[policy.pregreet]`.
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let p = self;
        if !secs_ok(p.delay) {
            err(
                "policy.pregreet.delay".into(),
                "must be seconds >= 0".into(),
            );
        }
        if !secs_ok(p.remember) {
            err(
                "policy.pregreet.remember".into(),
                "must be seconds >= 0".into(),
            );
        }
    }
}

impl DnsConfig {
    /// `[policy.dns]`.
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let d = self;
        if !(secs_ok(d.timeout) && d.timeout > 0.0) {
            err("policy.dns.timeout".into(), "must be seconds > 0".into());
        }
        if d.attempts == 0 {
            err("policy.dns.attempts".into(), "must be > 0".into());
        }
        if d.cache_size == 0 {
            err("policy.dns.cache_size".into(), "must be > 0".into());
        }
        for (k, v) in [
            ("min_ttl", d.min_ttl),
            ("max_ttl", d.max_ttl),
            ("negative_ttl", d.negative_ttl),
        ] {
            if !secs_ok(v) {
                err(format!("policy.dns.{k}"), "must be seconds >= 0".into());
            }
        }
        if d.min_ttl > d.max_ttl {
            err(
                "policy.dns.min_ttl".into(),
                "must not exceed policy.dns.max_ttl".into(),
            );
        }
    }
}

/// Parses a DNSBL answer filter: `127.0.0.2` or `127.0.0.2..127.0.0.11`.
pub fn parse_code_range(s: &str) -> Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    let (a, b) = match s.split_once("..") {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let a = s.trim().parse().ok()?;
            (a, a)
        }
    };
    (a <= b).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(p: &PolicyConfig) -> Vec<String> {
        let mut out = Vec::new();
        p.validate(&mut |k, _| out.push(k));
        out
    }

    fn parse(toml: &str) -> PolicyConfig {
        #[derive(Deserialize)]
        struct File {
            policy: PolicyConfig,
        }
        match toml::from_str::<File>(toml) {
            Ok(f) => f.policy,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn redis_store_keys_parse() {
        let p = parse(
            "[policy.limits.redis]\nurl = \"redis://127.0.0.1:6379/2\"\ntimeout = 0.2\n\
             on_failure = \"open\"\n[policy.limits.connection_rate]\nstore = \"redis\"\n\
             [policy.limits.recipient_rate]\nstore = \"local\"\n",
        );
        let r = p.limits.redis.clone().unwrap_or_default();
        assert_eq!(r.url.as_deref(), Some("redis://127.0.0.1:6379/2"));
        assert_eq!((r.timeout, r.on_failure), (0.2, OnFailure::Open));
        assert_eq!(p.limits.connection_rate.store, Store::Redis);
        assert_eq!(p.limits.message_rate.store, Store::Local);
        assert_eq!(p.limits.recipient_rate.store, Store::Local);
        assert!(p.limits.uses_redis());
        assert!(errors(&p).is_empty(), "{:?}", errors(&p));
        // Defaults: 50 ms, fall back to the local limiter.
        let d = parse("[policy.limits.redis]\nurl = \"redis://localhost\"\n");
        let r = d.limits.redis.clone().unwrap_or_default();
        assert_eq!((r.timeout, r.on_failure), (0.05, OnFailure::Local));
        assert!(!d.limits.uses_redis());
        assert!(errors(&d).is_empty());
    }

    #[test]
    fn redis_store_validation_names_the_key() {
        // store = "redis" with no [policy.limits.redis] at all.
        let mut p = PolicyConfig::default();
        p.limits.message_rate.store = Store::Redis;
        assert_eq!(errors(&p), ["policy.limits.message_rate.store"]);
        // A section without a url: the url is missing, and the store too.
        p.limits.redis = Some(RedisConfig::default());
        assert_eq!(
            errors(&p),
            [
                "policy.limits.message_rate.store",
                "policy.limits.redis.url"
            ]
        );
        // A bad url, a timeout <= 0, a timeout that is not a number.
        for url in ["http://127.0.0.1:6379", "redis://", "not a url", ""] {
            p.limits.redis = Some(RedisConfig {
                url: Some(url.into()),
                ..RedisConfig::default()
            });
            assert_eq!(errors(&p), ["policy.limits.redis.url"], "{url:?}");
        }
        for timeout in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            p.limits.redis = Some(RedisConfig {
                url: Some("redis://127.0.0.1:6379".into()),
                timeout,
                ..RedisConfig::default()
            });
            assert_eq!(errors(&p), ["policy.limits.redis.timeout"], "{timeout}");
        }
        p.limits.redis = Some(RedisConfig {
            url: Some("redis://127.0.0.1:6379".into()),
            ..RedisConfig::default()
        });
        assert!(errors(&p).is_empty());
        // Unknown values and keys are refused by the parser.
        for bad in [
            "[policy.limits.redis]\non_failure = \"closed\"\n",
            "[policy.limits.message_rate]\nstore = \"memcached\"\n",
            "[policy.limits.redis]\nurl = \"redis://x\"\nprefix = \"a\"\n",
        ] {
            #[derive(Debug, Deserialize)]
            #[allow(dead_code)]
            struct File {
                policy: PolicyConfig,
            }
            assert!(toml::from_str::<File>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enforced_rdns_checks_need_the_lookup() {
        let mut p = PolicyConfig::default();
        assert!(errors(&p).is_empty());
        p.rdns.no_ptr = Action::Reject;
        p.helo.match_rdns = Action::Observe;
        assert_eq!(errors(&p), ["policy.rdns.no_ptr", "policy.helo.match_rdns"]);
        p.rdns.lookup = true;
        assert!(errors(&p).is_empty());
    }

    #[test]
    fn urls_checked() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_url("redis://:secret@redis.internal/3").is_ok());
        assert!(check_url("unix:///run/redis.sock").is_ok());
        for bad in [
            "",
            "127.0.0.1:6379",
            "http://x",
            "redis://",
            "redis://host:notaport",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
