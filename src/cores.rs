//! The thread-per-core layout's one piece of shared knowledge: which core
//! the current thread serves. `server::cores` starts one thread per core
//! (`[runtime] flavor = "thread_per_core"`), each with its own
//! current-thread runtime, and calls `enter` there; code that keeps a
//! share per core (the backend pools, `relay::pool`) asks `current`. Every
//! other thread (the main one, a multi-thread runtime's workers) is core 0,
//! so with one share nothing changes.
//!
//! Also each thread's `shard`: which of `SHARDS` cache-line-padded slots a
//! value written from every thread (the hot path's metrics,
//! `telemetry::sharded`) is written into, so
//! that threads on different cores do not write one cache line. A core's
//! thread has its core's shard; any other thread takes one the first time
//! it asks, counting down from the last, so a multi-thread runtime's
//! workers get shards of their own too. More threads than shards share
//! (still correct: the shards are atomics).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Shards of a value written from every thread.
pub const SHARDS: usize = 16;

thread_local! {
    static CORE: Cell<usize> = const { Cell::new(0) };
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Shards handed to threads that serve no core, counting down.
static OTHERS: AtomicUsize = AtomicUsize::new(0);

/// Marks the current thread as serving core `k` (0-based), for life.
pub fn enter(k: usize) {
    CORE.with(|c| c.set(k));
    SHARD.with(|s| s.set(k % SHARDS));
}

/// The core the current thread serves: 0 outside a core's thread.
#[inline]
pub fn current() -> usize {
    CORE.with(|c| c.get())
}

/// The shard the current thread writes (below `SHARDS`).
#[inline]
pub fn shard() -> usize {
    SHARD.with(|s| match s.get() {
        k if k < SHARDS => k,
        _ => {
            let k = SHARDS - 1 - OTHERS.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(k);
            k
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_has_its_own_core() {
        assert_eq!(current(), 0);
        std::thread::spawn(|| {
            enter(3);
            assert_eq!(current(), 3);
        })
        .join()
        .unwrap();
        assert_eq!(current(), 0);
    }

    #[test]
    fn a_core_writes_its_own_shard_and_others_keep_theirs() {
        std::thread::spawn(|| {
            enter(SHARDS + 2);
            assert_eq!(shard(), 2);
        })
        .join()
        .unwrap();
        // A thread of no core keeps the shard it was given.
        let (a, b) = std::thread::spawn(|| (shard(), shard())).join().unwrap();
        assert_eq!(a, b);
        assert!(a < SHARDS);
    }
}
