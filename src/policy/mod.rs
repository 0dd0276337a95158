//! Admission policy: which clients may connect and proceed, decided per
//! phase (connect, helo, mail, rcpt) from lists, limits, HELO checks,
//! reverse DNS, DNSBLs and pregreet, each with its own configured action.
//! `Policy` is shared and reloadable: it holds the current `Generation`
//! (one configuration and the state built for it), which a reload replaces
//! whole while carrying the counters, limiters and caches over.
//! `ClientPolicy` is one session's view: it keeps the generation it was
//! admitted under and holds its concurrency slots. Writes no bytes: the
//! session sends the replies. What a check reports is in `verdict.rs`; the
//! limiters are `limits/`, the resolver and caches `dns.rs`, the HELO name
//! checks `helo.rs`, the configuration `settings.rs`.
//!
//! A check that fails gives a `Verdict` (with `enforce == false` in observe
//! mode) and the session or the accept loop sends it; `Verdict::at_connect`
//! maps it to 554 / 421 for a refusal at accept or instead of the greeting.
//! `Generation::verdict` is the one place an `Action` (`off`, `observe`,
//! `defer`, `reject`) shapes a reply. Phase entry points: `Policy::admit`
//! (in the accept loop), then on the `ClientPolicy` `connect_verdict`,
//! `helo`, `mail`, `rcpt`, `pregreet_hit`, and `release` at QUIT.

pub mod bans;
pub mod dns;
pub mod dnsbl_health;
pub mod helo;
pub mod limits;
pub mod settings;
mod verdict;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::bans::budget::{Budget, Kind as BudgetKind, Spent};
use self::bans::{Bans, Source};
use self::dns::{Dns, DnsblResult, Rdns, Resolves};
use self::helo::HeloName;
use self::limits::{ConnPermit, GlobalPermit, LimitHit, LimitKind, Limiters, Scope};
use self::settings::{Action, PolicyConfig};
pub use self::verdict::{Check, CheckCount, Verdict};

/// The shared, reloadable policy: the current [`Generation`], swapped
/// whole by [`Policy::reload`]. Admission loads it once per connection (a
/// lock-free load); sessions keep the generation they were admitted under.
pub struct Policy {
    current: ArcSwap<Generation>,
    /// Serializes reloads (each one builds on the generation before it).
    reloading: Mutex<()>,
    /// `start` was called: new generations start their sweeper.
    started: AtomicBool,
    /// The ban list: one per process, whatever the generation.
    bans: Arc<Bans>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("limits", &self.current().limits)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Builds the policy; Err names what could not be set up (the resolver).
    pub fn new(cfg: &PolicyConfig, hostname: &str) -> Result<Arc<Policy>, String> {
        let bans = Bans::new();
        Ok(Arc::new(Policy {
            current: ArcSwap::new(Generation::build(cfg, hostname, None, &bans)?),
            reloading: Mutex::new(()),
            started: AtomicBool::new(false),
            bans,
        }))
    }

    /// Starts background work (idle-key eviction), for this generation and
    /// the ones reloads bring.
    pub fn start(&self) {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        if !self.started.swap(true, Ordering::Relaxed) {
            self.current().limits.spawn_sweeper();
            self.bans.spawn_sweeper();
        }
    }

    /// The generation new connections are admitted under.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Replaces the current generation with one built for `cfg`, carrying
    /// the state over (see [`Generation::next`]). Sessions already admitted
    /// keep theirs; new connections get the new one. On Err (a resolver
    /// that cannot be set up) the running generation stays.
    pub fn reload(&self, cfg: &PolicyConfig, hostname: &str) -> Result<Arc<Generation>, String> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current();
        let new = old.next(cfg, hostname)?;
        self.current.store(new.clone());
        old.limits.retire();
        if self.started.load(Ordering::Relaxed) {
            new.limits.spawn_sweeper();
        }
        let (kept, fresh) = new.carried_from(&old);
        let list = |v: Vec<&str>| {
            if v.is_empty() {
                "-".into()
            } else {
                v.join(", ")
            }
        };
        info!(
            kept = %list(kept),
            fresh = %list(fresh),
            "policy: new generation; state carried over"
        );
        Ok(new)
    }

    /// The connect phase under the current generation: see
    /// [`Generation::admit`].
    pub fn admit(&self, ip: IpAddr) -> Result<ClientPolicy, Verdict> {
        self.current.load_full().admit(ip)
    }

    /// The ban list (the admin API's, and what admission consults).
    pub fn bans(&self) -> &Arc<Bans> {
        &self.bans
    }

    /// The current generation's limiters.
    pub fn limits(&self) -> Arc<Limiters> {
        self.current.load().limits.clone()
    }

    /// The current generation's resolver and caches.
    pub fn dns(&self) -> Option<Arc<Dns>> {
        self.current.load().dns.clone()
    }

    /// Counts of every check so far (over all generations).
    pub fn counts(&self) -> Vec<CheckCount> {
        self.current.load().counts()
    }
}

/// Verdict counts per check, shared by every generation (monotonic).
#[derive(Default)]
struct Counters {
    observed: [AtomicU64; Check::ALL.len()],
    enforced: [AtomicU64; Check::ALL.len()],
}

/// One generation of the policy: a configuration and the state built for
/// it (limiters, DNS caches, pregreet memory, counters), much of it shared
/// with the generations before and after it.
pub struct Generation {
    cfg: PolicyConfig,
    hostname: String,
    limits: Arc<Limiters>,
    dns: Option<Arc<Dns>>,
    bans: Arc<Bans>,
    unknown_budget: Option<Arc<Budget>>,
    bad_budget: Option<Arc<Budget>>,
    counts: Arc<Counters>,
}

impl Generation {
    fn build(
        cfg: &PolicyConfig,
        hostname: &str,
        prev: Option<&Generation>,
        bans: &Arc<Bans>,
    ) -> Result<Arc<Generation>, String> {
        let needs_dns = cfg.rdns.lookup
            || cfg.dnsbl.action.runs()
            || cfg.helo.resolves.runs()
            || cfg.helo.match_rdns.runs();
        let dns = if needs_dns {
            // The resolver and its caches: kept while what they were built
            // from is unchanged (DNSBL answers are cached per zone index).
            let same = |p: &&Generation| {
                p.cfg.dns == cfg.dns
                    && p.cfg.rdns.max_names == cfg.rdns.max_names
                    && p.cfg.dnsbl.zones == cfg.dnsbl.zones
                    && p.cfg.dnsbl.health_interval == cfg.dnsbl.health_interval
            };
            match prev.filter(same).and_then(|p| p.dns.clone()) {
                Some(d) => Some(d),
                None => {
                    let d = Dns::new(&cfg.dns, &cfg.rdns, &cfg.dnsbl)?;
                    if cfg.dnsbl.action.runs() {
                        Dns::spawn_health_checks(
                            &d,
                            Duration::from_secs_f64(cfg.dnsbl.health_interval),
                        );
                    }
                    Some(d)
                }
            }
        } else {
            None
        };
        bans.configure(&cfg.bans, cfg.limits.redis.as_ref());
        // A budget keeps its windows while its settings are unchanged.
        let max_keys = cfg.limits.max_tracked_keys as u64;
        let budget = |c: &settings::BudgetConfig, old: Option<&Arc<Budget>>| {
            old.filter(|b| b.cfg == *c)
                .cloned()
                .or_else(|| Budget::new(c, max_keys).map(Arc::new))
        };
        let unknown_budget = budget(
            &cfg.bans.unknown_recipients,
            prev.and_then(|g| g.unknown_budget.as_ref()),
        );
        let bad_budget = budget(
            &cfg.bans.bad_commands,
            prev.and_then(|g| g.bad_budget.as_ref()),
        );
        Ok(Arc::new(Generation {
            cfg: cfg.clone(),
            hostname: hostname.to_string(),
            limits: match prev {
                Some(g) => g.limits.reload(&cfg.limits),
                None => Limiters::new(&cfg.limits),
            },
            dns,
            bans: bans.clone(),
            unknown_budget,
            bad_budget,
            counts: prev.map_or_else(Arc::default, |g| g.counts.clone()),
        }))
    }

    /// The generation for `cfg` that follows this one, carrying over: the
    /// session count, the concurrency counts and the unchanged rate
    /// limiters (see [`Limiters::reload`]), the resolver and its caches while
    /// `[policy.dns]`, `rdns.max_names` and the DNSBL zones are unchanged,
    /// each error budget while its settings are, and the ban list and the
    /// verdict counts always. Builds only: [`Policy::reload`] swaps it in.
    pub fn next(&self, cfg: &PolicyConfig, hostname: &str) -> Result<Arc<Generation>, String> {
        Self::build(cfg, hostname, Some(self), &self.bans)
    }

    /// What this generation shares with `old` (the one it was built from):
    /// the names of the states carried over and of those started fresh.
    pub fn carried_from(&self, old: &Generation) -> (Vec<&'static str>, Vec<&'static str>) {
        let (mut kept, mut fresh) = self.limits.carried_from(&old.limits);
        if let Some(d) = &self.dns {
            if old.dns.as_ref().is_some_and(|o| Arc::ptr_eq(d, o)) {
                kept.push("dns");
            } else {
                fresh.push("dns");
            }
        }
        for (name, new, old) in [
            (
                "unknown_recipients",
                &self.unknown_budget,
                &old.unknown_budget,
            ),
            ("bad_commands", &self.bad_budget, &old.bad_budget),
        ] {
            if let Some(b) = new {
                if old.as_ref().is_some_and(|o| Arc::ptr_eq(b, o)) {
                    kept.push(name);
                } else {
                    fresh.push(name);
                }
            }
        }
        kept.push("bans");
        kept.push("counters");
        (kept, fresh)
    }

    pub fn limits(&self) -> &Arc<Limiters> {
        &self.limits
    }

    pub fn dns(&self) -> Option<&Arc<Dns>> {
        self.dns.as_ref()
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Seconds to wait before an enforced policy reply.
    pub fn tarpit(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.tarpit)
    }

    /// Counts of every check so far.
    pub fn counts(&self) -> Vec<CheckCount> {
        Check::ALL
            .iter()
            .enumerate()
            .map(|(i, &check)| CheckCount {
                check,
                observed: self.counts.observed[i].load(Ordering::Relaxed),
                enforced: self.counts.enforced[i].load(Ordering::Relaxed),
            })
            .collect()
    }

    fn index(check: Check) -> usize {
        Check::ALL.iter().position(|&c| c == check).unwrap_or(0)
    }

    /// Turns a failed check into a verdict per its action, counting and
    /// logging it; None when the action is Off. `code` is the check's
    /// reply; `defer` turns a 5xx into 450 (421 for a 554), and a 4xx
    /// stays a 4xx whatever the action.
    fn verdict(
        &self,
        ip: IpAddr,
        check: Check,
        action: Action,
        code: u16,
        enh: &'static str,
        text: String,
    ) -> Option<Verdict> {
        let (code, enh) = match action {
            Action::Off => return None,
            Action::Defer if code >= 500 => (if code == 554 { 421 } else { 450 }, defer_enh(enh)),
            _ => (code, enh),
        };
        let enforce = action != Action::Observe;
        let i = Self::index(check);
        if enforce {
            self.counts.enforced[i].fetch_add(1, Ordering::Relaxed);
            // In a session's span: an event of its trace as well.
            info!(client = %ip, check = check.name(), action = action.name(), code, "policy: {text}");
        } else {
            self.counts.observed[i].fetch_add(1, Ordering::Relaxed);
            info!(client = %ip, check = check.name(), action = "observe", would = code, "policy (observe): {text}");
        }
        Some(Verdict {
            check,
            code,
            enh,
            text,
            enforce,
        })
    }

    /// The connect phase, run in the accept loop before a session exists:
    /// bans, global cap, deny list, concurrency and connection rate. Err
    /// is the refusal to send before closing.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ClientPolicy, Verdict> {
        let allowed = self.cfg.allow.iter().any(|n| contains(n, ip));
        if !allowed {
            if let Some(v) = self.ban_verdict(ip) {
                return Err(v);
            }
        }
        // Counted also without a cap: a reload may set one.
        let Some(global) = self.limits.try_global() else {
            return Err(self
                .verdict(
                    ip,
                    Check::GlobalCap,
                    Action::Reject,
                    421,
                    "4.3.2",
                    "Too many connections, try again later".into(),
                )
                .expect("reject yields a verdict"));
        };
        let mut client = ClientPolicy {
            policy: self.clone(),
            ip,
            allowed,
            _global: Some(global),
            _conn: None,
            rdns: Pending::None,
            dnsbl: Pending::None,
            connect: None,
            connect_done: false,
            helo: None,
        };
        if !allowed {
            self.screen(ip, &mut client)?;
        }
        if let Some(dns) = &self.dns {
            if self.cfg.rdns.lookup {
                let d = dns.clone();
                client.rdns = Pending::Running(tokio::spawn(
                    async move { d.rdns(ip).await }.in_current_span(),
                ));
            }
            if self.cfg.dnsbl.action.runs() && !allowed {
                let d = dns.clone();
                client.dnsbl = Pending::Running(tokio::spawn(
                    async move { d.dnsbl(ip).await }.in_current_span(),
                ));
            }
        }
        // Nothing to wait for: the connect phase is already settled.
        client.connect_done =
            matches!(client.rdns, Pending::None) && matches!(client.dnsbl, Pending::None);
        Ok(client)
    }

    /// Deny list, concurrency, connection rate.
    fn screen(&self, ip: IpAddr, client: &mut ClientPolicy) -> Result<(), Verdict> {
        if self.cfg.deny.iter().any(|n| contains(n, ip)) {
            return Err(self
                .verdict(
                    ip,
                    Check::Deny,
                    Action::Reject,
                    554,
                    "5.7.1",
                    format!("Access denied for [{ip}]"),
                )
                .expect("reject yields a verdict"));
        }
        let (permit, hit) = self.limits.connect(ip);
        client._conn = Some(permit);
        if let Some(hit) = hit {
            if let Some(v) = self.limit_verdict(ip, hit) {
                if v.enforce {
                    return Err(v);
                }
            }
        }
        Ok(())
    }

    /// The refusal of a banned client: 421 4.7.1 naming the ban's source
    /// and its end (the reason stays the operator's).
    fn ban_verdict(&self, ip: IpAddr) -> Option<Verdict> {
        let ban = self.bans.find(ip)?;
        self.bans.count_refusal(ban.source);
        let until =
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(ban.expires));
        self.verdict(
            ip,
            Check::Ban,
            Action::Reject,
            421,
            "4.7.1",
            format!(
                "Client host [{ip}] blocked until {until} ({})",
                ban.source.name()
            ),
        )
    }

    /// One event against a budget: past it, the verdict (421 4.7.1; with
    /// an enforcing action the address is banned for `ban_for`).
    fn spend(&self, ip: IpAddr, kind: BudgetKind) -> Option<Verdict> {
        let (budget, check, source, what) = match kind {
            BudgetKind::UnknownRecipients => (
                self.unknown_budget.as_ref()?,
                Check::UnknownRecipients,
                Source::UnknownRecipients,
                "recipients refused as unknown",
            ),
            BudgetKind::BadCommands => (
                self.bad_budget.as_ref()?,
                Check::BadCommands,
                Source::BadCommands,
                "bad commands",
            ),
        };
        let spent = budget.spend(ip);
        let c = &budget.cfg;
        // Observed: logged and counted once per window; enforced: every
        // event past the budget ends its session and (re)bans the address.
        match (spent, c.action) {
            (Spent::Within, _) => return None,
            (Spent::Over, Action::Observe) => return None,
            _ => {}
        }
        let v = self.verdict(
            ip,
            check,
            c.action,
            421,
            "4.7.1",
            format!(
                "Too many {what} from [{ip}]; banned for {} s",
                c.ban_for.round()
            ),
        )?;
        // An address already banned (a session open before its ban) is
        // not banned again: its session ends.
        if v.enforce && (spent == Spent::Crossed || self.bans.find(ip).is_none()) {
            let reason = format!("over {} {what} in {} s", c.per_ip.count, c.per_ip.period);
            let ttl = Duration::from_secs_f64(c.ban_for);
            let _ = self.bans.add(IpNet::from(ip), ttl, source, &reason);
        }
        Some(v)
    }

    fn pregreet_verdict(&self, ip: IpAddr) -> Option<Verdict> {
        self.verdict(
            ip,
            Check::Pregreet,
            self.cfg.pregreet.action,
            554,
            "5.5.1",
            "Protocol error: talked before the greeting".into(),
        )
    }

    fn limit_verdict(&self, ip: IpAddr, hit: LimitHit) -> Option<Verdict> {
        let l = &self.cfg.limits;
        let who = match hit.scope {
            Scope::Ip => format!("[{ip}]"),
            Scope::Prefix => "your network".to_string(),
        };
        let (check, action, code, enh, text) = match hit.kind {
            LimitKind::Concurrency => (
                Check::Concurrency,
                l.concurrency.action,
                421,
                "4.7.0",
                format!("Too many concurrent connections from {who}, try again later"),
            ),
            LimitKind::ConnectionRate => (
                Check::ConnectionRate,
                l.connection_rate.action,
                421,
                "4.7.0",
                format!("Connection rate limit exceeded for {who}, try again later"),
            ),
            LimitKind::MessageRate => (
                Check::MessageRate,
                l.message_rate.action,
                450,
                "4.7.28",
                format!("Message rate limit exceeded for {who}, try again later"),
            ),
            LimitKind::RecipientRate => (
                Check::RecipientRate,
                l.recipient_rate.action,
                452,
                "4.7.28",
                format!("Recipient rate limit exceeded for {who}, try again later"),
            ),
        };
        self.verdict(ip, check, action, code, enh, text)
    }
}

fn defer_enh(enh: &'static str) -> &'static str {
    match enh {
        "5.7.1" => "4.7.1",
        "5.7.25" => "4.7.25",
        "5.5.1" => "4.5.1",
        "5.5.2" => "4.5.2",
        _ => "4.7.0",
    }
}

/// IPv4-mapped IPv6 clients match IPv4 networks.
fn contains(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&ip.to_canonical())
}

/// A lookup started at accept and awaited where its answer is needed.
enum Pending<T> {
    None,
    Running(JoinHandle<T>),
    Done(T),
}

impl<T: Clone> Pending<T> {
    async fn get(&mut self, failed: T) -> Option<T> {
        if let Pending::Running(h) = self {
            let v = match h.await {
                Ok(v) => v,
                Err(e) => {
                    warn!("policy lookup task failed: {e}");
                    failed
                }
            };
            *self = Pending::Done(v);
        }
        match self {
            Pending::Done(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// One session's policy state: its concurrency slots (released on drop),
/// its DNS lookups and the verdicts held for delivery.
pub struct ClientPolicy {
    policy: Arc<Generation>,
    ip: IpAddr,
    allowed: bool,
    _global: Option<GlobalPermit>,
    _conn: Option<ConnPermit>,
    rdns: Pending<Rdns>,
    dnsbl: Pending<DnsblResult>,
    /// The connect-phase verdict (pregreet, rDNS, DNSBL), once decided.
    connect: Option<Verdict>,
    connect_done: bool,
    /// The HELO verdict held for MAIL (delay_reject).
    helo: Option<Verdict>,
}

impl std::fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPolicy")
            .field("ip", &self.ip)
            .field("allowed", &self.allowed)
            .field("connect", &self.connect)
            .field("helo", &self.helo)
            .finish_non_exhaustive()
    }
}

impl ClientPolicy {
    /// Gives back the session's global and concurrency slots now (at QUIT,
    /// before the 221 goes out, so a client that reconnects at once finds
    /// its slot free); dropping the ClientPolicy does the same.
    pub fn release(&mut self) {
        self._global = None;
        self._conn = None;
    }

    /// The generation this session was admitted under.
    pub fn policy(&self) -> &Arc<Generation> {
        &self.policy
    }

    /// On the allow list: no checks apply.
    pub fn allowed(&self) -> bool {
        self.allowed
    }

    pub fn delay_reject(&self) -> bool {
        self.policy.cfg.delay_reject
    }

    /// The pause between `220-` and `220 ` when pregreet detection runs.
    pub fn pregreet_delay(&self) -> Option<Duration> {
        let p = &self.policy.cfg.pregreet;
        (p.action.runs() && p.delay > 0.0 && !self.allowed)
            .then(|| Duration::from_secs_f64(p.delay))
    }

    /// The client talked before the greeting ended.
    /// With an enforcing action and `remember`, the address is banned for
    /// that long (source `pregreet`).
    pub fn pregreet_hit(&mut self) {
        if let Some(v) = self.policy.pregreet_verdict(self.ip) {
            let remember = self.policy.cfg.pregreet.remember;
            if v.enforce && remember > 0.0 {
                let _ = self.policy.bans.add(
                    IpNet::from(self.ip),
                    Duration::from_secs_f64(remember),
                    Source::Pregreet,
                    "talked before the greeting",
                );
            }
            if self.connect.as_ref().is_none_or(|c| !c.enforce) {
                self.connect = Some(v);
            }
        }
    }

    /// A RCPT reply (the backend's or the edge's remembered one): a 5xx
    /// with one of `[policy.recipients] unknown_codes` counts against the
    /// `unknown_recipients` budget. Some(enforced verdict) when it went
    /// over: the session sends it and closes.
    pub fn rcpt_refused(&mut self, reply: &crate::smtp::Reply) -> Option<Verdict> {
        if self.allowed || self.policy.unknown_budget.is_none() || reply.code / 100 != 5 {
            return None;
        }
        let e = reply.enhanced()?;
        let unknown = (self.policy.cfg.recipients.unknown_codes.iter())
            .filter_map(|c| settings::parse_enhanced(c))
            .any(|(c, s, d)| crate::smtp::EnhancedCode(c, s, d) == e);
        if !unknown {
            return None;
        }
        self.policy
            .spend(self.ip, BudgetKind::UnknownRecipients)
            .filter(|v| v.enforce)
    }

    /// How many more recipients this client may have refused as unknown
    /// before it goes over its budget; None without a budget (or on the
    /// allow list). The session stops pipelining RCPTs to the backend when
    /// as many are in flight, so that no more than the budget (and the one
    /// that crosses it) reach the backend.
    pub fn unknown_left(&self) -> Option<u32> {
        if self.allowed {
            return None;
        }
        Some(self.policy.unknown_budget.as_ref()?.left(self.ip))
    }

    /// A bad command (syntax error, unknown or out of order): counts
    /// against the `bad_commands` budget; Some(enforced verdict) when it
    /// went over.
    pub fn bad_command(&mut self) -> Option<Verdict> {
        if self.allowed {
            return None;
        }
        self.policy
            .spend(self.ip, BudgetKind::BadCommands)
            .filter(|v| v.enforce)
    }

    /// Whether the greeting must wait for the connect verdict (delay_reject
    /// off and a DNS check that can refuse).
    pub fn greeting_waits(&self) -> bool {
        let c = &self.policy.cfg;
        !c.delay_reject
            && !self.allowed
            && ((c.rdns.lookup
                && [c.rdns.no_ptr, c.rdns.mismatch, c.rdns.temp_error]
                    .iter()
                    .any(|a| matches!(a, Action::Defer | Action::Reject)))
                || matches!(c.dnsbl.action, Action::Defer | Action::Reject))
    }

    /// The client's forward-confirmed name, once the lookup has finished.
    pub fn rdns_name(&self) -> Option<&str> {
        match &self.rdns {
            Pending::Done(Rdns::Pass(name)) => Some(name),
            _ => None,
        }
    }

    /// The connect-phase verdict: waits for the rDNS and DNSBL lookups
    /// (once), then judges them. Returns the verdict only when enforced.
    pub async fn connect_verdict(&mut self) -> Option<Verdict> {
        let rdns = self.rdns.get(Rdns::TempError).await;
        if !self.connect_done {
            self.connect_done = true;
            let held = self.connect.as_ref().is_some_and(|v| v.enforce);
            if !self.allowed && !held {
                let mut found = Vec::new();
                if let Some(r) = rdns {
                    found.extend(self.rdns_verdict(&r));
                }
                if let Some(bl) = self.dnsbl.get(DnsblResult::default()).await {
                    found.extend(self.dnsbl_verdict(&bl));
                }
                if let Some(v) = found.into_iter().find(|v| v.enforce) {
                    self.connect = Some(v);
                }
            }
        }
        self.connect.as_ref().filter(|v| v.enforce).cloned()
    }

    fn rdns_verdict(&self, r: &Rdns) -> Option<Verdict> {
        let c = &self.policy.cfg.rdns;
        let ip = self.ip;
        let (action, code, enh, text) = match r {
            Rdns::Pass(_) => return None,
            Rdns::NoPtr => (
                c.no_ptr,
                550,
                "5.7.25",
                format!("Reverse DNS validation failed: no PTR record for [{ip}]"),
            ),
            Rdns::Mismatch(name) => (
                c.mismatch,
                550,
                "5.7.25",
                format!(
                    "Reverse DNS validation failed: {} does not resolve to [{ip}]",
                    clean(name)
                ),
            ),
            Rdns::TempError => (
                c.temp_error,
                450,
                "4.7.25",
                format!("Temporary failure looking up the reverse DNS of [{ip}]"),
            ),
        };
        self.policy
            .verdict(ip, Check::Rdns, action, code, enh, text)
    }

    fn dnsbl_verdict(&self, bl: &DnsblResult) -> Option<Verdict> {
        let c = &self.policy.cfg.dnsbl;
        if bl.score < c.threshold {
            return None;
        }
        let zones: Vec<&str> = bl.listed.iter().map(|(z, _)| &**z).collect();
        self.policy.verdict(
            self.ip,
            Check::Dnsbl,
            c.action,
            554,
            "5.7.1",
            format!(
                "Service unavailable; client [{}] blocked using {}",
                self.ip,
                zones.join(", ")
            ),
        )
    }

    /// HELO/EHLO checks in order; the first enforced failure is returned
    /// (observe-only failures are logged and counted on the way). `local`
    /// is the address the client connected to.
    pub async fn helo(&mut self, name: &str, local: IpAddr) -> Option<Verdict> {
        self.helo = None;
        if self.allowed {
            return None;
        }
        let p = self.policy.clone();
        let c = &p.cfg.helo;
        let ip = self.ip;
        let shown = clean(name);
        let kind = helo::classify(name);
        let mut checks: Vec<Option<Verdict>> = Vec::new();
        let v = |check, action, code, enh, why: &str| {
            p.verdict(
                ip,
                check,
                action,
                code,
                enh,
                format!("<{shown}>: Helo command rejected: {why}"),
            )
        };
        match kind {
            HeloName::Invalid => {
                checks.push(v(Check::HeloSyntax, c.syntax, 501, "5.5.2", "Invalid name"))
            }
            HeloName::BareIp(_) => checks.push(v(
                Check::HeloBareIp,
                c.bare_ip,
                501,
                "5.5.2",
                "an address must be enclosed in brackets",
            )),
            HeloName::Literal(lit) if !helo::literal_matches(lit, ip) => checks.push(v(
                Check::HeloLiteral,
                c.literal_mismatch,
                550,
                "5.7.1",
                "address literal is not your address",
            )),
            HeloName::Domain { fqdn: false } => checks.push(v(
                Check::HeloFqdn,
                c.fqdn,
                504,
                "5.5.2",
                "need fully-qualified hostname",
            )),
            _ => {}
        }
        if c.not_ours.runs() && helo::is_ours(name, &kind, &p.hostname, local) {
            checks.push(v(
                Check::HeloOurs,
                c.not_ours,
                550,
                "5.7.1",
                "that is my name",
            ));
        }
        if let Some(found) = checks.iter().flatten().find(|v| v.enforce) {
            return Some(found.clone());
        }
        let is_domain = matches!(kind, HeloName::Domain { .. });
        if is_domain && c.resolves.runs() {
            if let Some(dns) = &p.dns {
                let r = match dns.helo_resolves(name).await {
                    Resolves::Yes => None,
                    Resolves::No => v(
                        Check::HeloResolves,
                        c.resolves,
                        550,
                        "5.7.1",
                        "Host not found",
                    ),
                    Resolves::TempError => v(
                        Check::HeloResolves,
                        c.resolves,
                        450,
                        "4.7.1",
                        "temporary failure resolving the name",
                    ),
                };
                if let Some(r) = r.filter(|r| r.enforce) {
                    return Some(r);
                }
            }
        }
        if c.match_rdns.runs() {
            let r = self.rdns.get(Rdns::TempError).await;
            let bad = match (&kind, r) {
                (HeloName::Domain { .. }, Some(Rdns::Pass(rn)))
                    if helo::matches_rdns(name, &rn) =>
                {
                    None
                }
                (_, Some(Rdns::TempError)) | (_, None) => v(
                    Check::HeloRdns,
                    c.match_rdns,
                    450,
                    "4.7.25",
                    "cannot verify your reverse DNS name now",
                ),
                _ => v(
                    Check::HeloRdns,
                    c.match_rdns,
                    550,
                    "5.7.1",
                    "does not match your reverse DNS name",
                ),
            };
            if let Some(r) = bad.filter(|r| r.enforce) {
                return Some(r);
            }
        }
        None
    }

    /// Holds a HELO verdict for delivery at MAIL (delay_reject).
    pub fn hold_helo(&mut self, v: Verdict) {
        self.helo = Some(v);
    }

    /// Whether lookups are still to be awaited and judged: call (and
    /// await) `connect_verdict` before `mail` then.
    pub fn unsettled(&self) -> bool {
        !self.connect_done
    }

    /// The MAIL phase: held connect and HELO verdicts, then the message
    /// rate. Synchronous: the connect verdict must be settled first.
    pub fn mail(&mut self) -> Option<Verdict> {
        if let Some(v) = self.connect.as_ref().filter(|v| v.enforce) {
            return Some(v.clone());
        }
        if self.allowed {
            return None;
        }
        if let Some(v) = &self.helo {
            return Some(v.clone());
        }
        let hit = self.policy.limits.message(self.ip)?;
        self.policy
            .limit_verdict(self.ip, hit)
            .filter(|v| v.enforce)
    }

    /// The RCPT phase: the recipient rate.
    pub fn rcpt(&mut self) -> Option<Verdict> {
        if self.allowed {
            return None;
        }
        let hit = self.policy.limits.recipient(self.ip)?;
        self.policy
            .limit_verdict(self.ip, hit)
            .filter(|v| v.enforce)
    }
}

/// Client-supplied text made safe for a reply line or log: printable ASCII,
/// at most 255 characters.
fn clean(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_lists_match_v4_v6_and_mapped() {
        let v4: IpNet = "192.0.2.0/24".parse().unwrap();
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(contains(&v4, "192.0.2.77".parse().unwrap()));
        assert!(contains(&v4, "::ffff:192.0.2.77".parse().unwrap()));
        assert!(!contains(&v4, "192.0.3.1".parse().unwrap()));
        assert!(contains(&v6, "2001:db8:1::5".parse().unwrap()));
        assert!(!contains(&v6, "2001:db9::5".parse().unwrap()));
    }

    #[tokio::test]
    async fn actions_shape_the_verdict() {
        let p = Policy::new(&PolicyConfig::default(), "edge.test").unwrap();
        let g = p.current();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let v = |a, code, enh| g.verdict(ip, Check::Rdns, a, code, enh, "why".into());
        assert_eq!(v(Action::Off, 550, "5.7.25"), None);
        let r = v(Action::Reject, 550, "5.7.25").unwrap();
        assert_eq!((r.code, r.enh, r.enforce), (550, "5.7.25", true));
        let d = v(Action::Defer, 550, "5.7.25").unwrap();
        assert_eq!((d.code, d.enh, d.enforce), (450, "4.7.25", true));
        // A temporary failure stays temporary whatever the action.
        let t = v(Action::Reject, 450, "4.7.25").unwrap();
        assert_eq!(t.code, 450);
        let o = v(Action::Observe, 550, "5.7.25").unwrap();
        assert!(!o.enforce);
        assert_eq!(r.at_connect(), (554, "5.7.25"));
        assert_eq!(d.at_connect(), (421, "4.7.25"));
        let c = p.counts();
        let rdns = c.iter().find(|c| c.check == Check::Rdns).unwrap();
        assert_eq!((rdns.observed, rdns.enforced), (1, 3));
    }

    #[tokio::test]
    async fn allow_list_skips_limits_and_deny_refuses() {
        let mut cfg = PolicyConfig {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            deny: vec![
                "10.1.0.0/16".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ..PolicyConfig::default()
        };
        cfg.limits.concurrency.action = Action::Reject;
        cfg.limits.concurrency.per_ip = 1;
        let p = Policy::new(&cfg, "edge.test").unwrap();
        let a = p.admit("10.1.2.3".parse().unwrap()).unwrap();
        let b = p.admit("10.1.2.3".parse().unwrap()).unwrap();
        assert!(a.allowed() && b.allowed());
        let e = p.admit("2001:db8::1".parse().unwrap()).unwrap_err();
        assert_eq!((e.code, e.enh), (554, "5.7.1"));
        let _c = p.admit("192.0.2.1".parse().unwrap()).unwrap();
        let e = p.admit("192.0.2.1".parse().unwrap()).unwrap_err();
        assert_eq!(e.at_connect(), (421, "4.7.0"));
    }
    fn with_dns(mut cfg: PolicyConfig) -> PolicyConfig {
        // A resolver that is built but never asked.
        cfg.dns.nameservers = vec!["127.0.0.1:9".parse().unwrap()];
        cfg.rdns.lookup = true;
        cfg.pregreet.action = Action::Observe;
        cfg
    }

    #[tokio::test]
    async fn reload_swaps_for_new_clients_and_keeps_admitted_ones() {
        let mut cfg = with_dns(PolicyConfig::default());
        cfg.limits.concurrency.action = Action::Reject;
        cfg.limits.concurrency.per_ip = 1;
        let p = Policy::new(&cfg, "edge.test").unwrap();
        p.start();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let first = p.admit(a).unwrap();
        assert!(p.admit(a).is_err());
        let old = p.current();
        let mut next = cfg.clone();
        next.deny = vec!["192.0.2.0/24".parse().unwrap()];
        next.limits.concurrency.per_ip = 2;
        next.helo.fqdn = Action::Reject;
        let new = p.reload(&next, "edge.test").unwrap();
        assert!(Arc::ptr_eq(&new, &p.current()));
        assert!(Arc::ptr_eq(first.policy(), &old));
        let (kept, fresh) = new.carried_from(&old);
        assert_eq!(fresh, Vec::<&str>::new());
        for k in ["sessions", "concurrency.per_ip", "dns", "bans", "counters"] {
            assert!(kept.contains(&k), "{k} not kept: {kept:?}");
        }
        // New clients meet the new deny list; counters keep counting.
        let e = p.admit(a).unwrap_err();
        assert_eq!((e.code, e.enh), (554, "5.7.1"));
        let deny = |p: &Policy| p.counts().into_iter().find(|c| c.check == Check::Deny);
        assert_eq!(deny(&p).unwrap().enforced, 1);
        assert_eq!(old.counts(), new.counts());
        // The admitted session still counts, and releases into the new limits.
        assert_eq!(p.limits().global_in_use(), 1);
        assert_eq!(p.limits().tracked_keys(), 1);
        drop(first);
        assert_eq!(p.limits().global_in_use(), 0);
        assert_eq!(p.limits().tracked_keys(), 0);
    }

    #[tokio::test]
    async fn reload_rebuilds_what_changed() {
        let cfg = with_dns(PolicyConfig::default());
        let p = Policy::new(&cfg, "edge.test").unwrap();
        let old = p.current();
        let mut next = cfg.clone();
        next.dns.timeout = 1.0;
        next.bans.bad_commands.action = Action::Reject;
        let new = p.reload(&next, "edge.test").unwrap();
        let (kept, fresh) = new.carried_from(&old);
        assert_eq!(fresh, vec!["dns", "bad_commands"]);
        // A budget whose settings stay keeps its windows.
        let again = p.reload(&next, "edge.test").unwrap();
        assert!(again.carried_from(&new).0.contains(&"bad_commands"));
        assert!(kept.contains(&"bans"));
        // No DNS check left: no resolver.
        let none = p.reload(&PolicyConfig::default(), "edge.test").unwrap();
        assert!(none.dns().is_none() && p.dns().is_none());
        // A resolver that cannot be built keeps the running generation.
        let mut bad = with_dns(PolicyConfig::default());
        bad.dnsbl.zones = vec![settings::DnsblZone {
            name: " ".into(),
            weight: 1,
            codes: Vec::new(),
        }];
        assert!(p.reload(&bad, "edge.test").is_err());
        assert!(Arc::ptr_eq(&p.current(), &none));
    }
}
