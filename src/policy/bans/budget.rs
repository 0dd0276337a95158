//! Error budgets per client address: recipients refused as unknown, and bad
//! commands (syntax errors, unknown and out-of-order commands), counted
//! across sessions in a window of `period` seconds. Going over a budget
//! is reported once per window; `Policy` turns that into a 421 and a ban.
//!
//! The window starts at an address's first event and ends `period` later
//! (a fixed window, not a sliding one: at worst twice the budget passes
//! over two windows' boundary). Each counter lives in a bounded moka cache
//! (`max_tracked_keys` of `[policy.limits]`) whose entries expire with
//! their window: memory is the addresses that erred within one period.
//! Counted per instance (the ban they lead to is shared with `store =
//! "redis"`).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::policy::settings::BudgetConfig;

/// Which budget an event counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    UnknownRecipients,
    BadCommands,
}

/// One budget's windows, per address.
pub struct Budget {
    pub cfg: BudgetConfig,
    period: Duration,
    windows: moka::sync::Cache<IpAddr, Arc<Mutex<Window>>>,
}

struct Window {
    start: Instant,
    count: u32,
}

impl Budget {
    /// None when its action is `off`.
    pub fn new(cfg: &BudgetConfig, max_keys: u64) -> Option<Budget> {
        if !cfg.action.runs() {
            return None;
        }
        let period = Duration::try_from_secs_f64(cfg.per_ip.period).ok()?;
        Some(Budget {
            cfg: cfg.clone(),
            period,
            windows: moka::sync::Cache::builder()
                .max_capacity(max_keys.max(1))
                .time_to_live(period)
                .build(),
        })
    }

    /// Counts one event of `ip`: true when this one goes over the budget
    /// (once per window).
    pub fn spend(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let w = self.windows.get_with(ip, || {
            Arc::new(Mutex::new(Window {
                start: Instant::now(),
                count: 0,
            }))
        });
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.elapsed() >= self.period {
            w.start = Instant::now();
            w.count = 0;
        }
        w.count = w.count.saturating_add(1);
        w.count == self.cfg.per_ip.count.saturating_add(1)
    }

    /// Forgets `ip`'s window (after a ban: it starts afresh when lifted).
    pub fn forget(&self, ip: IpAddr) {
        self.windows.invalidate(&ip.to_canonical());
    }

    /// Addresses with a window open (approximate; for tests and metrics).
    pub fn tracked(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.windows.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::settings::{Action, Budget as Rate};

    #[test]
    fn over_once_per_window() {
        let cfg = BudgetConfig {
            action: Action::Reject,
            per_ip: Rate {
                count: 3,
                period: 0.2,
            },
            ban_for: 10.0,
        };
        let b = Budget::new(&cfg, 100).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!b.spend(a) && !b.spend(a) && !b.spend(a));
        assert!(!b.spend(other));
        assert!(b.spend(a), "the fourth goes over");
        assert!(!b.spend(a), "reported once");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!b.spend(a), "a new window");
        b.forget(a);
        let off = BudgetConfig {
            action: Action::Off,
            ..cfg
        };
        assert!(Budget::new(&off, 100).is_none());
    }
}
