//! The sessions' input buffers, lent from a per-thread pool only while they
//! hold input (HAProxy's way with its buffers). A session that waits for
//! its client's next command, for a backend's reply or for a message's
//! data (one that fits a pooled buffer) with nothing buffered holds no
//! buffer: a read that finds no input gives the buffer back, and the next
//! read takes the buffer given back last, the one most likely still in
//! the CPU's caches.
//! A busy session no longer keeps the 64 KiB its first message grew its
//! buffer to: 400 relaying sessions hold 30-33 MiB instead of 59, for
//! about 2 % more instructions per message (loadtest/RESULTS.md section
//! 22).

use std::cell::RefCell;
use std::future::poll_fn;
use std::future::Future;
use std::pin::pin;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most buffers a thread keeps for reuse; more are freed.
const KEEP: usize = 256;

/// A new buffer's capacity (HAProxy's `tune.bufsize`): more than a read of
/// commands or of a small message needs room for. A message larger than
/// this is read 64 KiB at a time (`room_for_large_data`; 16 KiB reads made
/// a 100 KiB message cost 30 % more CPU), and its grown buffer comes back
/// to the pool as it is.
pub(super) const BUF: usize = 16 * 1024;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Gives `buf` back to the thread's pool when it holds nothing (and holds
/// an allocation); it is then an empty `BytesMut` without one.
pub(super) fn give_back(buf: &mut BytesMut) {
    if !buf.is_empty() {
        return;
    }
    // First: a buffer read to its very end and consumed has no room left
    // after its start (capacity 0), yet holds its allocation.
    rewind(buf);
    if buf.capacity() == 0 {
        return;
    }
    let b = std::mem::take(buf);
    let _ = FREE.try_with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < KEEP {
            f.push(b);
        }
    });
}

/// Gives `buf` the pool's last buffer, or a new one, when it has none.
fn lend(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        // Read to its end and consumed, or none at all (see `give_back`).
        rewind(buf);
    }
    if buf.capacity() == 0 {
        *buf = match FREE.try_with(|f| f.borrow_mut().pop()) {
            Ok(Some(b)) => b,
            _ => BytesMut::with_capacity(BUF),
        };
    }
}

/// `io.read_buf(buf)`, with `room` making space first; the buffer comes
/// from the pool for each try and goes back to it while no input is ready
/// (an `AsyncRead` leaves the buffer untouched when it is not ready).
pub(super) async fn read<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    room: fn(&mut BytesMut),
) -> std::io::Result<usize> {
    poll_fn(|cx| {
        lend(buf);
        room(buf);
        let r = pin!(io.read_buf(buf)).poll(cx);
        if r.is_pending() {
            give_back(buf);
        }
        r
    })
    .await
}

/// `read` for a large message's data: the grown buffer is kept while the
/// read waits (a session in the middle of such a message is busy, and
/// its waits are short; given back, it would mix 64 KiB buffers into the
/// pool's 16 KiB ones and the next large read would grow another).
pub(super) async fn read_holding<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    room: fn(&mut BytesMut),
) -> std::io::Result<usize> {
    lend(buf);
    room(buf);
    io.read_buf(buf).await
}

/// Room to read more command input into: grown in 4 KiB steps only when
/// less than 512 octets are free.
pub(super) fn room_for_commands(inbuf: &mut BytesMut) {
    rewind(inbuf);
    if inbuf.capacity() - inbuf.len() < 512 {
        inbuf.reserve(4096);
    }
}

/// Once everything read is consumed and the room after it is down to half
/// a buffer, the next read goes to the buffer's front again: a buffer
/// walked through message by message would touch all of its capacity
/// before it wraps, and the bytes the CPU's caches hold are those near
/// its front (loadtest/RESULTS.md section 22).
fn rewind(inbuf: &mut BytesMut) {
    if inbuf.is_empty() && inbuf.capacity() < BUF / 2 {
        // Moves nothing and allocates nothing: `inbuf` is one unshared
        // buffer (lines are copied out of it, not split off), and with
        // nothing in it any space before its start is enough.
        let _ = inbuf.try_reclaim(inbuf.capacity() + 1);
    }
}

/// Room to read message data into: 64 KiB more when less than 8 KiB are
/// free (a pooled buffer holds a small message whole).
pub(super) fn room_for_data(inbuf: &mut BytesMut) {
    rewind(inbuf);
    if inbuf.capacity() - inbuf.len() < 8192 {
        inbuf.reserve(64 * 1024);
    }
}

/// Room to read more of a message larger than a pooled buffer: 64 KiB per
/// read (a reservation that moves an empty buffer's start back when it
/// can, and grows it once otherwise).
pub(super) fn room_for_large_data(inbuf: &mut BytesMut) {
    if inbuf.capacity() - inbuf.len() < 32 * 1024 {
        inbuf.reserve(64 * 1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_buffer_goes_back_rewound_and_comes_out_again() {
        let mut a = BytesMut::with_capacity(1024);
        a.extend_from_slice(b"MAIL FROM:<a@b>\r\n");
        let p = a.as_ptr();
        bytes::Buf::advance(&mut a, 17);
        give_back(&mut a);
        assert_eq!(a.capacity(), 0);
        let mut b = BytesMut::new();
        lend(&mut b);
        assert_eq!(b.as_ptr(), p, "the buffer given back last, at its front");
        assert!(b.capacity() >= 1024);
        let mut c = BytesMut::new();
        lend(&mut c);
        assert!(c.capacity() >= BUF, "an empty pool lends a new buffer");
    }

    #[test]
    fn a_buffer_read_to_its_end_is_kept_not_replaced() {
        let mut a = BytesMut::with_capacity(BUF);
        let p = a.as_ptr();
        let full = a.capacity();
        a.resize(full, b'x');
        bytes::Buf::advance(&mut a, full);
        assert_eq!(a.capacity(), 0, "no room left after its start");
        lend(&mut a);
        assert_eq!(a.as_ptr(), p, "the same allocation, at its front");
        assert_eq!(a.capacity(), full);
        a.resize(full, b'y');
        bytes::Buf::advance(&mut a, full);
        give_back(&mut a);
        let mut b = BytesMut::new();
        lend(&mut b);
        assert_eq!(b.as_ptr(), p, "given back, not dropped");
    }

    #[test]
    fn a_buffer_with_input_stays() {
        let mut a = BytesMut::with_capacity(64);
        a.extend_from_slice(b"RCPT");
        give_back(&mut a);
        assert_eq!(&a[..], b"RCPT");
    }
}
