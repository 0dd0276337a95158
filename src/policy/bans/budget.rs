//! Error budgets per client address: recipients refused as unknown, and bad
//! commands (syntax errors, unknown and out-of-order commands), counted
//! across sessions in a window of `period` seconds. Every event past the
//! budget is reported (`Spent::Crossed` for the one that went over, then
//! `Over`): `Policy` turns it into a 421 and a ban, so a session that was
//! already open when its address was banned ends at its next error too.
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

/// What one event did to its address's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    Within,
    /// This event went over the budget.
    Crossed,
    /// Already over (a session that was open when the address was banned,
    /// or the first event after a ban that ended within the window).
    Over,
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

    /// Counts one event of `ip`: whether the window is now over the
    /// budget, and whether this very event crossed it.
    pub fn spend(&self, ip: IpAddr) -> Spent {
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
        let budget = self.cfg.per_ip.count;
        match w.count {
            c if c <= budget => Spent::Within,
            c if c == budget.saturating_add(1) => Spent::Crossed,
            _ => Spent::Over,
        }
    }

    /// Events `ip` may still have within its window.
    pub fn left(&self, ip: IpAddr) -> u32 {
        let budget = self.cfg.per_ip.count;
        match self.windows.get(&ip.to_canonical()) {
            None => budget,
            Some(w) => {
                let w = w.lock().unwrap_or_else(|e| e.into_inner());
                if w.start.elapsed() >= self.period {
                    budget
                } else {
                    budget.saturating_sub(w.count)
                }
            }
        }
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
    fn over_the_budget_per_window() {
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
        for _ in 0..3 {
            assert_eq!(b.spend(a), Spent::Within);
        }
        assert_eq!(b.spend(other), Spent::Within);
        assert_eq!(b.spend(a), Spent::Crossed, "the fourth goes over");
        assert_eq!(b.spend(a), Spent::Over);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(b.spend(a), Spent::Within, "a new window");
        assert_eq!(b.left(a), 2);
        assert_eq!(b.left(other), 3, "its window ended: the whole budget");
        let off = BudgetConfig {
            action: Action::Off,
            ..cfg
        };
        assert!(Budget::new(&off, 100).is_none());
    }
}
