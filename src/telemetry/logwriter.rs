//! Where log lines go: tracing-appender's non-blocking writer to stderr,
//! whose thread is started by the first line written, not at startup.
//!
//! Why late: a process with one thread is cheaper per system call. glibc
//! wraps `recv`, `send` and `writev` in thread-cancellation bookkeeping
//! (two atomic operations a call) once a second thread exists, and the
//! kernel takes a reference on the socket's file for every call on it
//! while the file table is shared. With one worker (`[runtime]` current
//! thread) and nothing to log (`RUST_LOG=warn` and no warning), smtp-edge
//! stays a single thread: about 2 % of its CPU per relayed message
//! (loadtest/RESULTS.md section 32). The first line starts the thread for
//! good; it is the same writer from then on (bounded queue, lossy, lines
//! dropped counted).

use std::sync::{Mutex, OnceLock};

use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;

/// Log lines queued for the log thread at most; beyond, lines are dropped
/// and counted (`smtp_edge_log_lines_dropped_total`) rather than stall a
/// session.
const LOG_QUEUE: usize = 65_536;

static WRITER: OnceLock<NonBlocking> = OnceLock::new();
/// Flushes the lines still queued when taken and dropped (`Flush`).
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// The `MakeWriter` of the log layer: the shared non-blocking writer,
/// started on the first line.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LateStderr;

impl<'a> MakeWriter<'a> for LateStderr {
    type Writer = NonBlocking;

    fn make_writer(&'a self) -> NonBlocking {
        writer().clone()
    }
}

/// The writer, started by its first caller.
fn writer() -> &'static NonBlocking {
    WRITER.get_or_init(|| {
        // Lines go to stderr from a thread of their own, buffered and
        // written in batches: a session never waits for a write(2) per
        // line, nor for a slow reader of stderr (a full pipe to
        // journald), whose lines are then dropped and counted.
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(LOG_QUEUE)
            .thread_name("smtp-edge-log")
            .finish(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            ));
        // Nothing panics while holding the lock; a poisoned one is still
        // sound, and dropping the guard here would end the log thread.
        *GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
        writer
    })
}

/// Log lines dropped because the log queue was full (stderr not read fast
/// enough); 0 before the first line.
pub(super) fn dropped_lines() -> u64 {
    WRITER
        .get()
        .map_or(0, |w| w.error_counter().dropped_lines() as u64)
}

/// Held by `Telemetry`: when dropped, the lines still queued are written
/// and the log thread ends (lines after that are lost, as at any exit).
#[derive(Debug)]
pub(super) struct Flush;

impl Drop for Flush {
    fn drop(&mut self) {
        let guard = GUARD.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(guard);
    }
}
