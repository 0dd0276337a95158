//! `[runtime]`: how the process runs its event loop: tokio's multi-thread
//! scheduler (work stealing over `worker_threads` threads, the default) or
//! one current-thread loop, and the scheduler's fairness knobs. Read once,
//! when `main` builds the runtime; a reload that changes it is told a
//! restart is needed.

use serde::Deserialize;

/// Which tokio scheduler runs the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// Work-stealing over `worker_threads` threads.
    #[default]
    MultiThread,
    /// One thread runs everything (no work stealing, no cross-thread
    /// wake-ups): for one core, or one process per core.
    CurrentThread,
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub flavor: Flavor,
    /// Worker threads of the multi-thread scheduler; 0 = one per core
    /// (`TOKIO_WORKER_THREADS` when set).
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
            flavor: Flavor::MultiThread,
            worker_threads: 0,
            event_interval: 0,
            global_queue_interval: 0,
        }
    }
}

impl RuntimeConfig {
    /// `err(key, message)`.
    pub fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if self.worker_threads > 1024 {
            err(
                "runtime.worker_threads".into(),
                "at most 1024 (0 = one per core)".into(),
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

    /// The tokio runtime these settings describe.
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = match self.flavor {
            Flavor::MultiThread => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if self.worker_threads > 0 {
                    b.worker_threads(self.worker_threads);
                }
                b
            }
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        };
        b.enable_all();
        if self.event_interval > 0 {
            b.event_interval(self.event_interval);
        }
        if self.global_queue_interval > 0 {
            b.global_queue_interval(self.global_queue_interval);
        }
        b.build()
    }
}
