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
//!
//! And how a thread of the proxy starts: `no_cancellation`, called by
//! `main` for its own thread, by `enter` for a core's and by the runtime's
//! thread-start hook for its workers.

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
    no_cancellation();
    CORE.with(|c| c.set(k));
    SHARD.with(|s| s.set(k % SHARDS));
}

/// Turns POSIX thread cancellation off for the calling thread, for good.
/// Nothing in a Rust program cancels a thread, but once a process has two
/// threads glibc brackets every system call that is a cancellation point
/// (`recv`, `send`, `writev`, `epoll_wait`: all of a socket's I/O) with
/// two atomic updates of the thread's cancellation state; with the state
/// disabled and the type asynchronous, both find nothing to change and
/// return at once (loadtest/RESULTS.md section 32: about 0.4 µs per
/// relayed message). The type is set after the state, so cancellation is
/// never enabled while asynchronous. Elsewhere than glibc, nothing.
pub fn no_cancellation() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use cancel::*;
        let mut old: std::ffi::c_int = 0;
        // SAFETY: both only change the calling thread's own cancellation
        // state, and `old` is a valid place for the previous value. With
        // cancellation disabled, the asynchronous type never acts.
        unsafe {
            pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old);
            pthread_setcanceltype(PTHREAD_CANCEL_ASYNCHRONOUS, &mut old);
        }
    }
}

/// glibc's thread cancellation calls and values (<pthread.h>).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod cancel {
    use std::ffi::c_int;
    extern "C" {
        pub fn pthread_setcancelstate(state: c_int, oldstate: *mut c_int) -> c_int;
        pub fn pthread_setcanceltype(kind: c_int, oldtype: *mut c_int) -> c_int;
    }
    #[cfg(test)]
    pub const PTHREAD_CANCEL_ENABLE: c_int = 0;
    pub const PTHREAD_CANCEL_DISABLE: c_int = 1;
    #[cfg(test)]
    pub const PTHREAD_CANCEL_DEFERRED: c_int = 0;
    pub const PTHREAD_CANCEL_ASYNCHRONOUS: c_int = 1;
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

    /// A new thread starts with cancellation enabled and deferred (glibc's
    /// default); after `no_cancellation` it is disabled and asynchronous,
    /// the pair that makes glibc's wrappers skip their atomic updates.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn no_cancellation_disables_it_and_makes_it_asynchronous() {
        use cancel::*;
        fn now() -> (std::ffi::c_int, std::ffi::c_int) {
            let (mut state, mut kind) = (-1, -1);
            // SAFETY: set to what it was, reading the previous values.
            unsafe {
                pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut state);
                pthread_setcancelstate(state, &mut -1);
                pthread_setcanceltype(PTHREAD_CANCEL_DEFERRED, &mut kind);
                pthread_setcanceltype(kind, &mut -1);
            }
            (state, kind)
        }
        let (before, after) = std::thread::spawn(|| {
            let before = now();
            no_cancellation();
            (before, now())
        })
        .join()
        .unwrap();
        assert_eq!(before, (PTHREAD_CANCEL_ENABLE, PTHREAD_CANCEL_DEFERRED));
        assert_eq!(after, (PTHREAD_CANCEL_DISABLE, PTHREAD_CANCEL_ASYNCHRONOUS));
    }

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
