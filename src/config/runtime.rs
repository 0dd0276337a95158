//! `[runtime]`: how the process runs its event loop: tokio's multi-thread
//! scheduler (work stealing over `worker_threads` threads), one
//! current-thread loop (`auto`, the default, takes it whenever there is
//! one worker: measured fairer and cheaper, loadtest/RESULTS.md section
//! 19), or one current-thread loop per core (`thread_per_core`: each with
//! its own `SO_REUSEPORT` listeners and its own share of every backend
//! pool, `server::cores`), and the scheduler's fairness knobs. Read once,
//! when `main` builds the runtime; a reload that changes it is told a
//! restart is needed.

use serde::Deserialize;

/// Which tokio scheduler runs the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// `current_thread` when the proxy has one worker (`worker_threads =
    /// 1`, `TOKIO_WORKER_THREADS=1`, or one CPU to run on), else
    /// `multi_thread`.
    #[default]
    Auto,
    /// Work-stealing over `worker_threads` threads.
    MultiThread,
    /// One thread runs everything (no work stealing, no cross-thread
    /// wake-ups): for one core, or one process per core.
    CurrentThread,
    /// `worker_threads` threads, each a current-thread runtime of its own
    /// with its own listening sockets (`SO_REUSEPORT`: the kernel spreads
    /// connections) and its own share of each backend's connections. A
    /// session stays on the thread that accepted it. The admin listener,
    /// signals and reloads run on the main thread.
    ThreadPerCore,
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub flavor: Flavor,
    /// Worker threads of the multi-thread scheduler, or the cores of
    /// `thread_per_core`; 0 = one per core (`TOKIO_WORKER_THREADS` when
    /// set).
    pub worker_threads: usize,
    /// Tasks a worker runs between two polls of the I/O driver; 0 =
    /// tokio's default (61). Lower: readiness is seen sooner, at more
    /// polls of the driver.
    pub event_interval: u32,
    /// Tasks a worker runs between two looks at the shared queue (where
    /// tasks woken from outside a worker wait); 0 = tokio's default.
    pub global_queue_interval: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            flavor: Flavor::Auto,
            worker_threads: 0,
            event_interval: 0,
            global_queue_interval: 0,
        }
    }
}

impl RuntimeConfig {
    /// `err(key, message)`.
    pub fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if self.worker_threads > 4096 {
            err(
                "runtime.worker_threads".into(),
                "at most 4096 (0 = one per core)".into(),
            );
        }
        if self.flavor == Flavor::CurrentThread && self.worker_threads > 1 {
            err(
                "runtime.worker_threads".into(),
                "flavor = \"current_thread\" runs one thread: leave worker_threads at 0 or 1"
                    .into(),
            );
        }
    }

    /// The number of cores that keep a share of each backend pool: the
    /// workers with `thread_per_core`, else 1.
    pub fn cores(&self) -> usize {
        match self.flavor {
            Flavor::ThreadPerCore => self.workers(),
            _ => 1,
        }
    }

    /// The worker count the multi-thread scheduler would have: the
    /// setting, else `TOKIO_WORKER_THREADS`, else the CPUs this process
    /// may run on.
    pub fn workers(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The flavor `Auto` stands for here.
    pub fn resolved(&self) -> Flavor {
        match self.flavor {
            Flavor::Auto if self.workers() == 1 => Flavor::CurrentThread,
            Flavor::Auto => Flavor::MultiThread,
            f => f,
        }
    }

    /// The tokio runtime these settings describe: with `thread_per_core`,
    /// the main thread's (admin, signals, reloads; the cores' are
    /// `build_core`).
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = match self.resolved() {
            Flavor::MultiThread => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if self.worker_threads > 0 {
                    b.worker_threads(self.worker_threads);
                }
                b
            }
            Flavor::CurrentThread | Flavor::Auto | Flavor::ThreadPerCore => {
                tokio::runtime::Builder::new_current_thread()
            }
        };
        self.tune(&mut b);
        b.build()
    }

    /// One core's runtime in the thread-per-core layout.
    pub fn build_core(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = tokio::runtime::Builder::new_current_thread();
        self.tune(&mut b);
        b.build()
    }

    fn tune(&self, b: &mut tokio::runtime::Builder) {
        b.enable_all();
        // Workers and blocking threads (`main` and each core's thread do
        // their own).
        b.on_thread_start(crate::cores::no_cancellation);
        if self.event_interval > 0 {
            b.event_interval(self.event_interval);
        }
        if self.global_queue_interval > 0 {
            b.global_queue_interval(self.global_queue_interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_current_thread_for_one_worker() {
        let one = RuntimeConfig {
            worker_threads: 1,
            ..RuntimeConfig::default()
        };
        assert_eq!(one.resolved(), Flavor::CurrentThread);
        let four = RuntimeConfig {
            worker_threads: 4,
            ..RuntimeConfig::default()
        };
        assert_eq!(four.resolved(), Flavor::MultiThread);
        let forced = RuntimeConfig {
            flavor: Flavor::MultiThread,
            worker_threads: 1,
            ..RuntimeConfig::default()
        };
        assert_eq!(forced.resolved(), Flavor::MultiThread);
    }
}
