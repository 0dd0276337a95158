//! Who is sending right now, for `GET /top` and `smtp-edge top`: per client
//! address and per network prefix, over the last minute, the sessions
//! open and begun, messages, recipients and refusals by reason.
//!
//! # Bounded under a flood
//! Each view (addresses, prefixes) is a moka cache of at most `top_size`
//! entries. Its admission policy (TinyLFU: a new key must have been seen
//! more often than the entry it would evict, by a frequency sketch of a
//! few bytes per slot) keeps the heavy hitters and turns one-shot keys
//! away, so a flood of a million distinct addresses costs the sketch and
//! `top_size` entries, no more (RSS measured in loadtest/RESULTS.md), and
//! the busy senders stay in view. Entries idle for a minute expire.
//!
//! # The window
//! Counts go into six 10-second slots per entry, each stamped with its
//! epoch (Unix time / 10, kept in an atomic by a once-a-second ticker so
//! that events read no clock): a slot of an older epoch is reset when
//! written and ignored when read, so a read sums the last 50 to 60
//! seconds.
//!
//! A leaf like the rest of `telemetry`: keyed by `IpAddr`, fed by the
//! session and the accept loop, read by the admin server, which adds the
//! ban state.

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

const SLOTS: usize = 6;
const SLOT_SECS: u64 = 10;
/// The window a read covers, in seconds.
pub const WINDOW_SECS: u64 = SLOTS as u64 * SLOT_SECS;

/// One 10-second slot's counts, stamped with the epoch they are of.
/// Atomics: a busy sender's sessions, on every core, count without a lock
/// (one add per event; loadtest/RESULTS.md section 28).
#[derive(Default)]
struct Slot {
    epoch: AtomicU64,
    sessions: AtomicU32,
    messages: AtomicU32,
    recipients: AtomicU32,
}

/// Refusals by reason (a policy check's name, `bad_command`,
/// `recipient_refused`: a handful at most) in one slot, with its epoch.
type Refusals = (u64, Vec<(&'static str, u32)>);

/// One address's or prefix's activity.
#[derive(Default)]
pub struct Activity {
    open: AtomicI64,
    slots: [Slot; SLOTS],
    /// Rare, so under a lock, which also orders a slot's reset to a new
    /// epoch.
    refusals: Mutex<[Refusals; SLOTS]>,
}

/// What a read of one entry gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub open: i64,
    pub sessions: u64,
    pub messages: u64,
    pub recipients: u64,
    pub refusals: Vec<(&'static str, u64)>,
}

impl Counts {
    pub fn refusals_total(&self) -> u64 {
        self.refusals.iter().map(|r| r.1).sum()
    }
}

/// The current slot epoch, kept by a ticker task (`Top::new` starts one
/// on the runtime it is built in): a session's events read an atomic, not
/// the clock (two clock reads per message otherwise, ~1 % of the
/// instructions per relayed message). 0 until a ticker runs: then the
/// clock is read.
static EPOCH: AtomicU64 = AtomicU64::new(0);

fn clock_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / SLOT_SECS)
}

fn epoch() -> u64 {
    match EPOCH.load(Ordering::Relaxed) {
        0 => clock_epoch(),
        e => e,
    }
}

/// Keeps `EPOCH` within a second of the clock while the runtime runs.
fn start_ticker() {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        EPOCH.store(clock_epoch(), Ordering::Relaxed);
        rt.spawn(async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                EPOCH.store(clock_epoch(), Ordering::Relaxed);
            }
        });
    }
}

/// `f` on an address's and its prefix's entries at the current epoch;
/// the epoch is read only when there are entries (`/top` on).
fn on_both(entries: Option<(&Activity, &Activity)>, f: impl Fn(&Activity, u64)) {
    if let Some((a, p)) = entries {
        let e = epoch();
        f(a, e);
        f(p, e);
    }
}

/// Where epoch `e`'s counts go among an entry's slots.
fn slot_of(e: u64) -> usize {
    (e % SLOTS as u64) as usize
}

impl Activity {
    fn refusals(&self) -> std::sync::MutexGuard<'_, [Refusals; SLOTS]> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot of epoch `e`, emptied first when it holds an older one;
    /// None when it holds a later one (`e` is out of the window: a
    /// session's batch held over a minute).
    fn slot(&self, e: u64) -> Option<&Slot> {
        let s = &self.slots[slot_of(e)];
        if s.epoch.load(Ordering::Acquire) != e {
            let _order = self.refusals();
            match s.epoch.load(Ordering::Acquire) {
                now if now > e => return None,
                now if now < e => {
                    s.sessions.store(0, Ordering::Relaxed);
                    s.messages.store(0, Ordering::Relaxed);
                    s.recipients.store(0, Ordering::Relaxed);
                    // Writers that see the new epoch add after the reset.
                    s.epoch.store(e, Ordering::Release);
                }
                _ => {}
            }
        }
        Some(s)
    }

    fn add(&self, e: u64, field: fn(&Slot) -> &AtomicU32) {
        if let Some(s) = self.slot(e) {
            field(s).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A session's batch of epoch `e`.
    fn add_batch(&self, e: u64, b: &Batch) {
        if let Some(s) = self.slot(e) {
            if b.messages > 0 {
                s.messages.fetch_add(b.messages, Ordering::Relaxed);
            }
            if b.recipients > 0 {
                s.recipients.fetch_add(b.recipients, Ordering::Relaxed);
            }
        }
    }

    fn refusal(&self, e: u64, why: &'static str) {
        let mut r = self.refusals();
        let (epoch, list) = &mut r[slot_of(e)];
        if *epoch != e {
            *epoch = e;
            list.clear();
        }
        match list.iter_mut().find(|r| r.0 == why) {
            Some(r) => r.1 = r.1.saturating_add(1),
            None => list.push((why, 1)),
        }
    }

    fn counts(&self, e: u64) -> Counts {
        let mut c = Counts {
            open: self.open.load(Ordering::Relaxed).max(0),
            ..Counts::default()
        };
        let within = |epoch: u64| epoch + (SLOTS as u64) > e && epoch <= e;
        for s in &self.slots {
            if within(s.epoch.load(Ordering::Acquire)) {
                c.sessions += u64::from(s.sessions.load(Ordering::Relaxed));
                c.messages += u64::from(s.messages.load(Ordering::Relaxed));
                c.recipients += u64::from(s.recipients.load(Ordering::Relaxed));
            }
        }
        for (_, list) in self.refusals().iter().filter(|r| within(r.0)) {
            for &(why, n) in list {
                match c.refusals.iter_mut().find(|r| r.0 == why) {
                    Some(r) => r.1 += u64::from(n),
                    None => c.refusals.push((why, u64::from(n))),
                }
            }
        }
        c.refusals.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        c
    }
}

/// The two views; `None` inside when `top_size = 0` (off).
pub struct Top {
    views: Option<(Cache, Cache)>,
    v4_prefix: u8,
    v6_prefix: u8,
}

type Cache = moka::sync::Cache<IpAddr, Arc<Activity>>;

/// A read: the busiest addresses, and the busiest prefixes.
pub type Ranking = (Vec<(IpAddr, Counts)>, Vec<(IpNet, Counts)>);

/// A session's place in the view (its address's and its prefix's entries,
/// held: the session's events cost no lookup); its open count is given
/// back on drop.
///
/// Messages and recipients are counted in the session first and added to
/// the entries in batches (`BATCH` events, or when the 10-second slot
/// turns, at QUIT, at the session's end): a busy sender's entries are
/// shared by every core serving it, and one add per event on them was the
/// last cache line every core wrote per message (loadtest/RESULTS.md
/// section 29). The view lags by less than a batch per session.
/// Boxed: one word in every session's future.
pub struct Open(Option<Box<Entries>>);

struct Entries {
    address: Arc<Activity>,
    prefix: Arc<Activity>,
    batch: Batch,
}

/// Events at most in a session's batch.
const BATCH: u32 = 16;

/// Counts of one epoch not yet added to the entries.
#[derive(Default)]
struct Batch {
    epoch: u64,
    messages: u32,
    recipients: u32,
}

impl Entries {
    fn flush(&mut self) {
        let b = &mut self.batch;
        if b.messages | b.recipients != 0 {
            self.address.add_batch(b.epoch, b);
            self.prefix.add_batch(b.epoch, b);
            b.messages = 0;
            b.recipients = 0;
        }
    }

    fn count(&mut self, messages: u32, recipients: u32) {
        let e = epoch();
        if self.batch.epoch != e {
            self.flush();
            self.batch.epoch = e;
        }
        let b = &mut self.batch;
        b.messages += messages;
        b.recipients += recipients;
        if b.messages + b.recipients >= BATCH {
            self.flush();
        }
    }
}

impl Open {
    /// Not in any view (`top_size = 0`, and tests).
    pub fn none() -> Open {
        Open(None)
    }

    pub fn message(&mut self) {
        if let Some(x) = self.0.as_deref_mut() {
            x.count(1, 0);
        }
    }

    pub fn recipient(&mut self) {
        if let Some(x) = self.0.as_deref_mut() {
            x.count(0, 1);
        }
    }

    /// Adds the session's batch to the view now (QUIT: the client may
    /// look at `/top` as soon as it has the reply).
    pub fn flush(&mut self) {
        if let Some(x) = self.0.as_deref_mut() {
            x.flush();
        }
    }

    pub fn refusal(&self, why: &'static str) {
        let entries = self.0.as_deref().map(|x| (&*x.address, &*x.prefix));
        on_both(entries, |x, e| x.refusal(e, why));
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(mut x) = self.0.take() {
            x.flush();
            x.address.open.fetch_sub(1, Ordering::Relaxed);
            x.prefix.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What to sort a read by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Sessions,
    Messages,
    Recipients,
    Refusals,
}

impl By {
    pub fn parse(s: &str) -> Option<By> {
        Some(match s {
            "sessions" => By::Sessions,
            "messages" => By::Messages,
            "recipients" => By::Recipients,
            "refusals" => By::Refusals,
            _ => return None,
        })
    }

    fn key(self, c: &Counts) -> (u64, i64) {
        let v = match self {
            By::Sessions => c.sessions,
            By::Messages => c.messages,
            By::Recipients => c.recipients,
            By::Refusals => c.refusals_total(),
        };
        (v, c.open)
    }
}

impl Top {
    /// `size` entries per view (0 = off); prefixes of `v4` / `v6` bits.
    pub fn new(size: u64, v4: u8, v6: u8) -> Top {
        let cache = || {
            moka::sync::Cache::builder()
                .max_capacity(size)
                .time_to_idle(Duration::from_secs(WINDOW_SECS))
                .build()
        };
        if size > 0 {
            start_ticker();
        }
        Top {
            views: (size > 0).then(|| (cache(), cache())),
            v4_prefix: v4.min(32),
            v6_prefix: v6.min(128),
        }
    }

    /// The client's prefix as the limits count it.
    pub fn prefix(&self, ip: IpAddr) -> IpNet {
        let ip = ip.to_canonical();
        let len = match ip {
            IpAddr::V4(_) => self.v4_prefix,
            IpAddr::V6(_) => self.v6_prefix,
        };
        IpNet::new(ip, len).map_or(IpNet::from(ip), |n| n.trunc())
    }

    /// The entries of `ip` and of its prefix (made when absent); None
    /// when the view is off.
    fn entries(&self, ip: IpAddr) -> Option<(Arc<Activity>, Arc<Activity>)> {
        let (a, p) = self.views.as_ref()?;
        let ip = ip.to_canonical();
        Some((
            a.get_with(ip, Arc::default),
            p.get_with(self.prefix(ip).addr(), Arc::default),
        ))
    }

    /// A session begins: counted, and open until the guard drops.
    pub fn open(&self, ip: IpAddr) -> Open {
        let entries = self.entries(ip);
        on_both(entries.as_ref().map(|(a, p)| (&**a, &**p)), |x, e| {
            x.open.fetch_add(1, Ordering::Relaxed);
            x.add(e, |s| &s.sessions);
        });
        Open(entries.map(|(address, prefix)| {
            Box::new(Entries {
                address,
                prefix,
                batch: Batch::default(),
            })
        }))
    }

    /// A connection refused at accept: a session begun and refused.
    pub fn refused_at_accept(&self, ip: IpAddr, why: &'static str) {
        let entries = self.entries(ip);
        on_both(entries.as_ref().map(|(a, p)| (&**a, &**p)), |x, e| {
            x.add(e, |s| &s.sessions);
            x.refusal(e, why);
        });
    }

    /// The `n` busiest addresses and prefixes by `by` (most first): each
    /// address (or network) with its counts.
    pub fn read(&self, by: By, n: usize) -> Ranking {
        let Some((a, p)) = &self.views else {
            return (Vec::new(), Vec::new());
        };
        let e = epoch();
        let pick = |c: &Cache| {
            let mut v: Vec<(IpAddr, Counts)> = c
                .iter()
                .map(|(k, x)| (*k, x.counts(e)))
                .filter(|(_, c)| c.open > 0 || c.sessions > 0 || c.refusals_total() > 0)
                .collect();
            v.sort_by(|x, y| by.key(&y.1).cmp(&by.key(&x.1)).then(x.0.cmp(&y.0)));
            v.truncate(n);
            v
        };
        let prefixes = pick(p)
            .into_iter()
            .map(|(ip, c)| (self.prefix(ip), c))
            .collect();
        (pick(a), prefixes)
    }

    /// Entries held (addresses, prefixes).
    pub fn tracked(&self) -> (u64, u64) {
        match &self.views {
            Some((a, p)) => {
                a.run_pending_tasks();
                p.run_pending_tasks();
                (a.entry_count(), p.entry_count())
            }
            None => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_per_address_and_prefix() {
        let t = Top::new(100, 24, 64);
        let mut a = t.open(ip("192.0.2.7"));
        let _b = t.open(ip("::ffff:192.0.2.8"));
        a.message();
        a.recipient();
        a.recipient();
        a.refusal("recipient_refused");
        // Counts of an open session are in the view after a flush.
        a.flush();
        t.refused_at_accept(ip("192.0.2.9"), "ban");
        let (addrs, prefixes) = t.read(By::Recipients, 10);
        assert_eq!(addrs[0].0, ip("192.0.2.7"));
        assert_eq!(
            addrs[0].1,
            Counts {
                open: 1,
                sessions: 1,
                messages: 1,
                recipients: 2,
                refusals: vec![("recipient_refused", 1)],
            }
        );
        assert_eq!(addrs.len(), 3);
        assert_eq!(prefixes.len(), 1);
        assert_eq!(prefixes[0].0.to_string(), "192.0.2.0/24");
        assert_eq!(prefixes[0].1.sessions, 3);
        assert_eq!(prefixes[0].1.open, 2);
        assert_eq!(prefixes[0].1.refusals_total(), 2);
        drop(a);
        let (addrs, _) = t.read(By::Refusals, 1);
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].1.open, 0);
        let off = Top::new(0, 24, 64);
        let _o = off.open(ip("192.0.2.7"));
        assert_eq!(off.read(By::Sessions, 10).0.len(), 0);
    }

    /// A read sums the last six 10-second slots; a slot written in a
    /// later epoch starts from zero, refusals included.
    #[test]
    fn the_window_moves_on() {
        let a = Activity::default();
        for e in [100, 101, 105] {
            a.add(e, |s| &s.messages);
            a.refusal(e, "ban");
        }
        a.add(105, |s| &s.recipients);
        let c = a.counts(105);
        assert_eq!((c.messages, c.recipients), (3, 1));
        assert_eq!(c.refusals, vec![("ban", 3)]);
        // Epoch 106: slot 100's counts are out of the window ...
        let c = a.counts(106);
        assert_eq!(c.messages, 2);
        assert_eq!(c.refusals, vec![("ban", 2)]);
        // ... and writing 106 (the same slot) starts it again.
        a.add(106, |s| &s.messages);
        a.refusal(106, "rate");
        let c = a.counts(106);
        assert_eq!(c.messages, 3);
        assert_eq!(c.refusals, vec![("ban", 2), ("rate", 1)]);
        assert_eq!(a.counts(200), Counts::default());
    }

    /// A session's messages and recipients reach the view in batches:
    /// a full one at once, the rest at a flush or the session's end; a
    /// batch of an epoch whose slot was since reused is dropped, not
    /// counted in the later epoch.
    #[test]
    fn a_session_counts_in_batches() {
        let t = Top::new(100, 24, 64);
        let mut o = t.open(ip("192.0.2.7"));
        let messages = |t: &Top| t.read(By::Messages, 1).0[0].1.messages;
        for _ in 0..BATCH - 1 {
            o.message();
        }
        assert_eq!(messages(&t), 0);
        o.message();
        assert_eq!(messages(&t), u64::from(BATCH));
        o.message();
        o.recipient();
        assert_eq!(messages(&t), u64::from(BATCH));
        drop(o);
        let c = &t.read(By::Messages, 1).0[0].1;
        assert_eq!((c.messages, c.recipients), (u64::from(BATCH) + 1, 1));

        let a = Activity::default();
        a.add(107, |s| &s.messages);
        let old = Batch {
            epoch: 101,
            messages: 5,
            recipients: 5,
        };
        a.add_batch(101, &old);
        assert_eq!(a.counts(107).messages, 1);
    }

    /// Events from several threads at once are all counted.
    #[test]
    fn threads_count_without_losing_any() {
        let a = Activity::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for k in 0..10_000u64 {
                        a.add(7 + k / 5_000, |s| &s.messages);
                    }
                });
            }
        });
        assert_eq!(a.counts(8).messages, 40_000);
    }

    #[test]
    fn a_flood_of_distinct_addresses_stays_bounded_and_keeps_the_heavy() {
        let t = Top::new(1000, 24, 64);
        // A sender busy during the flood (one session in 100) stays in
        // view; the one-shot addresses come and go.
        for i in 0..200_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(t.open(a));
            if i % 100 == 0 {
                drop(t.open(ip("198.51.100.1")));
            }
        }
        let (addrs, prefixes) = t.tracked();
        assert!(addrs <= 1000 && prefixes <= 1000, "{addrs} {prefixes}");
        let (top, _) = t.read(By::Sessions, 1);
        assert_eq!(top[0].0, ip("198.51.100.1"), "the heavy hitter stays");
    }
}
