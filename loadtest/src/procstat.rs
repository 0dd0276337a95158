//! Process figures from /proc (CPU time and RSS of the server under test, for
//! `--watch-pid`) and raising our own RLIMIT_NOFILE.

use serde::{Deserialize, Serialize};

/// CPU time (user + system) of `pid` in seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(user, system)| user + system)
}

/// (user, system) CPU seconds of `pid`, from /proc/PID/stat.
fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields after the
    // last ')' start at field 3 (state); utime and stime are fields 14, 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    Some((utime as f64 / ticks, stime as f64 / ticks))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resident set size of `pid` in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (user + system, user) CPU seconds summed over `pids`, from one read of
/// each process's stat (both figures of one snapshot); `None` when any of
/// them is gone.
fn cpu_of(pids: &[u32]) -> Option<(f64, f64)> {
    pids.iter().try_fold((0.0, 0.0), |(total, user), &p| {
        cpu_split(p).map(|(u, s)| (total + u + s, user + u))
    })
}

/// Sums over several pids; `None` when any of them is gone.
pub fn sum<F: Fn(u32) -> Option<T>, T: std::iter::Sum<T>>(pids: &[u32], f: F) -> Option<T> {
    pids.iter()
        .map(|&p| f(p))
        .collect::<Option<Vec<T>>>()
        .map(|v| v.into_iter().sum())
}

/// CPU and memory of the watched server processes over the measured
/// interval (`server` in the JSON report).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerUsage {
    /// The watched process ids (`--watch-pid`).
    pub pids: Vec<u32>,
    /// CPU seconds (user + system, all pids) used during the measured interval.
    pub cpu_s: f64,
    /// `cpu_s` per 1 000 accepted messages (or sessions, with `--churn`).
    pub cpu_s_per_1000: f64,
    /// The user-space part of `cpu_s` (the rest is the kernel's, on the
    /// process's behalf: system calls, the network stack it runs).
    #[serde(default)]
    pub user_s: f64,
    /// Summed RSS at the start and at the end of the measured interval, KiB.
    pub rss_kib_start: u64,
    pub rss_kib_end: u64,
}

/// A snapshot at the start of the measured interval.
#[derive(Debug, Clone)]
pub struct UsageStart {
    pids: Vec<u32>,
    /// (user + system, user) CPU seconds.
    cpu: Option<(f64, f64)>,
    rss: Option<u64>,
}

impl UsageStart {
    pub fn take(pids: &[u32]) -> UsageStart {
        UsageStart {
            pids: pids.to_vec(),
            cpu: cpu_of(pids),
            rss: sum(pids, rss_kib),
        }
    }

    /// The usage since the snapshot; `None` when nothing is watched or a
    /// process disappeared.
    pub fn finish(&self, units: u64) -> Option<ServerUsage> {
        if self.pids.is_empty() {
            return None;
        }
        let (cpu_end, user_end) = cpu_of(&self.pids)?;
        let (cpu_start, user_start) = self.cpu?;
        let cpu_s = cpu_end - cpu_start;
        Some(ServerUsage {
            pids: self.pids.clone(),
            cpu_s,
            cpu_s_per_1000: if units > 0 {
                cpu_s * 1000.0 / units as f64
            } else {
                0.0
            },
            user_s: user_end - user_start,
            rss_kib_start: self.rss?,
            rss_kib_end: sum(&self.pids, rss_kib)?,
        })
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard)
/// as they are afterwards.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
pub fn raise_nofile() -> (u64, u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return (0, 0);
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
    }
    (rl.rlim_cur as u64, rl.rlim_max as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        let (soft, hard) = raise_nofile();
        assert_eq!(soft, hard);
        assert!(cpu_seconds(u32::MAX).is_none());
    }
}
