//! The thread-per-core layout's one piece of shared knowledge: which core
//! the current thread serves. `server::cores` starts one thread per core
//! (`[runtime] flavor = "thread_per_core"`), each with its own
//! current-thread runtime, and calls `enter` there; code that keeps a
//! share per core (the backend pools, `relay::pool`) asks `current`. Every
//! other thread (the main one, a multi-thread runtime's workers) is core 0,
//! so with one share nothing changes.

use std::cell::Cell;

thread_local! {
    static CORE: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as serving core `k` (0-based), for life.
pub fn enter(k: usize) {
    CORE.with(|c| c.set(k));
}

/// The core the current thread serves: 0 outside a core's thread.
#[inline]
pub fn current() -> usize {
    CORE.with(|c| c.get())
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_thread_has_its_own_core() {
        assert_eq!(super::current(), 0);
        std::thread::spawn(|| {
            super::enter(3);
            assert_eq!(super::current(), 3);
        })
        .join()
        .unwrap();
        assert_eq!(super::current(), 0);
    }
}
