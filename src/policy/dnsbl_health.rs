//! DNSBL hygiene: a list's answer must never reject all mail by accident.
//!
//! - Answers in 127.255.255.0/24 are the lists' error codes (Spamhaus:
//!   query refused, public or open resolver, rate limited): they never count
//!   as a listing, whatever a zone's `codes` say; they are counted per zone
//!   and logged at most once per zone per hour (`ZoneHealth::error_answer`).
//! - Zone health: every `[policy.dnsbl] health_interval` seconds (and at
//!   start) each zone is asked for its test entries (RFC 5782 §5): 127.0.0.2
//!   must be listed, 127.0.0.1 must not. A zone that lists 127.0.0.1 lists
//!   everything (a wildcard, a parked domain, a resolver that rewrites
//!   NXDOMAIN) and is taken out of scoring, not queried, until a check finds
//!   it healthy again; each change is logged once. A zone that does not list
//!   127.0.0.2 can reject nobody: it is logged and kept. A check that fails
//!   (timeout, SERVFAIL) changes nothing.
//!
//! This file is the state and its rules (a leaf); the state is per zone of
//! a `Dns`, whose `check_zones` asks the test entries on a task that ends
//! with it (`Dns::spawn_health_checks`). Read at scrape time by
//! `server::live_stats` (`Dns::zone_healths`).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often one zone's error answers are logged at most.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(3600);

/// An answer in 127.255.255.0/24: the list's error code, never a listing.
pub fn is_error_answer(a: Ipv4Addr) -> bool {
    matches!(a.octets(), [127, 255, 255, _])
}

/// One zone's health: error answers seen, and whether it is in scoring.
#[derive(Debug, Default)]
pub struct ZoneHealth {
    error_answers: AtomicU64,
    /// Unix seconds of the last error-answer log line (0: none yet).
    error_logged: AtomicU64,
    /// Taken out of scoring by a health check (lists 127.0.0.1).
    out: AtomicBool,
    /// The last check found 127.0.0.2 not listed (logged once per change).
    no_test_entry: AtomicBool,
}

impl ZoneHealth {
    pub fn in_scoring(&self) -> bool {
        !self.out.load(Ordering::Relaxed)
    }

    pub fn error_answers(&self) -> u64 {
        self.error_answers.load(Ordering::Relaxed)
    }

    /// A lookup in `zone` answered `a`, an error code: counted, logged at
    /// most once per hour per zone.
    pub fn error_answer(&self, zone: &str, a: Ipv4Addr) {
        self.error_answers.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.error_logged.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= ERROR_LOG_EVERY.as_secs())
            && self
                .error_logged
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                zone,
                answer = %a,
                "DNSBL zone answered with an error code (127.255.255.x: refused, public resolver or rate limited): not counted as a listing; use a resolver of your own for DNSBL queries (logged at most once an hour per zone)"
            );
        }
    }

    /// What a health check found: `lists_all` (127.0.0.1 listed) takes the
    /// zone out of scoring, its absence puts it back.
    pub(super) fn checked(&self, zone: &str, lists_all: bool, test_entry: bool) {
        if self.out.swap(lists_all, Ordering::Relaxed) != lists_all {
            if lists_all {
                tracing::error!(
                    zone,
                    "DNSBL zone lists 127.0.0.1 (it would list every client): taken out of scoring until it is healthy again"
                );
            } else {
                tracing::warn!(
                    zone,
                    "DNSBL zone healthy again (127.0.0.1 not listed): back in scoring"
                );
            }
        }
        if self.no_test_entry.swap(!test_entry, Ordering::Relaxed) == test_entry && !test_entry {
            tracing::warn!(
                zone,
                "DNSBL zone does not list its test entry 127.0.0.2: it lists nobody (a blocked or wrong resolver?)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        assert!(is_error_answer(Ipv4Addr::new(127, 255, 255, 254)));
        assert!(is_error_answer(Ipv4Addr::new(127, 255, 255, 0)));
        assert!(!is_error_answer(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(!is_error_answer(Ipv4Addr::new(127, 255, 254, 1)));
    }

    #[test]
    fn out_of_scoring_and_back() {
        let h = ZoneHealth::default();
        assert!(h.in_scoring());
        h.checked("z", true, true);
        assert!(!h.in_scoring());
        h.checked("z", false, true);
        assert!(h.in_scoring());
        h.checked("z", false, false);
        assert!(h.in_scoring(), "a zone that lists nobody stays");
        h.error_answer("z", Ipv4Addr::new(127, 255, 255, 254));
        h.error_answer("z", Ipv4Addr::new(127, 255, 255, 254));
        assert_eq!(h.error_answers(), 2);
    }
}
