//! The writer thread: the only place that writes events to the capture file.

use crate::clock;
use crate::guard::IgnoreAllocs;
use crate::lifecycle;
use crate::mapbuf::MapBuf;
use crate::recorder::{self, Recorder};
use crossbeam_channel::{Receiver, TryRecvError};
use memtrack_format::EndReason;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub(crate) enum Msg {
    /// A framed events chunk starting at the given offset of the buffer.
    Chunk(MapBuf, usize),
    /// A framed record.
    Raw(Vec<u8>),
    /// Write everything buffered, then `END`, then acknowledge.
    Finish(EndReason, Arc<AtomicBool>),
}

/// Buffers older than this are collected by the writer even when not full, so a killed
/// process loses at most ~250 ms of events.
const MAX_AGE_US: u64 = 150_000;
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Writes all of `bytes` to `fd`. On a write error recording stops (the file stays readable up
/// to its last complete record) and one line goes to stderr.
pub(crate) fn write_all(fd: i32, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: bytes is a valid slice; fd is the capture file opened by the tracker.
        let n = unsafe { libc::write(fd, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
        if n < 0 {
            // SAFETY: errno of this thread.
            let e = unsafe { *libc::__errno_location() };
            if e == libc::EINTR {
                continue;
            }
            if lifecycle::disable() {
                write_failed(e);
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// What `errno` means, for the errors a write can end with, in C's words; else "errno N" in
/// `buf`. Not strerror: it translates through gettext, which outside the C locale reads LANGUAGE
/// from the environment, and the program may be rewriting its environment meanwhile (the writer
/// thread crashed so in bash, through dlerror; see `recorder::writer_entry`).
fn errno_text(errno: i32, buf: &mut [u8; 24]) -> &[u8] {
    match errno {
        libc::EFBIG => b"File too large",
        libc::ENOSPC => b"No space left on device",
        libc::EDQUOT => b"Disk quota exceeded",
        libc::EIO => b"Input/output error",
        libc::EROFS => b"Read-only file system",
        libc::EBADF => b"Bad file descriptor",
        libc::EPIPE => b"Broken pipe",
        libc::EINVAL => b"Invalid argument",
        libc::EPERM => b"Operation not permitted",
        libc::EACCES => b"Permission denied",
        libc::ENXIO => b"No such device or address",
        libc::EAGAIN => b"Resource temporarily unavailable",
        libc::ESTALE => b"Stale file handle",
        _ => {
            // core::fmt into the buffer: no allocation, no locale.
            let left = {
                let mut w = &mut buf[..];
                let _ = write!(w, "errno {}", errno.unsigned_abs());
                w.len()
            };
            &buf[..buf.len() - left]
        }
    }
}

/// One line on stderr saying why recording stopped; no allocation (any thread may get here).
fn write_failed(errno: i32) {
    let mut number = [0u8; 24];
    let reason = errno_text(errno, &mut number);
    let parts: [&[u8]; 3] = [
        b"memtrack: writing the capture failed (",
        reason,
        b"); recording stopped, the program goes on untracked\n",
    ];
    for p in parts {
        // SAFETY: plain writes of byte slices to stderr.
        unsafe { libc::write(2, p.as_ptr() as *const libc::c_void, p.len()) };
    }
}

pub(crate) fn run(rec: &'static Recorder, rx: Receiver<Msg>) {
    IgnoreAllocs::forever();
    let mut last_sweep = clock::tick();
    loop {
        // Polled, never a blocking receive: a blocked receiver makes crossbeam's senders look up
        // `std::thread::current()`, which gives program threads a handle that std frees at thread
        // exit, outside the guard, as if the program had freed an unknown block.
        // One message at a time, the clock published after each: with the queue kept full
        // (threads waiting for room send as soon as one is made), draining it first starved
        // the clock and the sweep for the whole run.
        match take(&rx) {
            Ok(m) => handle(rec, &rx, m),
            Err(TryRecvError::Empty) => std::thread::sleep(clock::TICK),
            Err(TryRecvError::Disconnected) => return,
        }
        let now = clock::tick();
        if now.saturating_sub(last_sweep) >= SWEEP_EVERY.as_micros() as u64 {
            sweep(rec, false);
            last_sweep = now;
        }
    }
}

fn handle(rec: &Recorder, rx: &Receiver<Msg>, m: Msg) {
    match m {
        Msg::Chunk(data, start) => {
            rec.write_chunk(&data.as_slice()[start..]);
            rec.recycle(data);
        }
        Msg::Raw(bytes) => {
            rec.write(&bytes);
        }
        Msg::Finish(reason, ack) => {
            drain(rec, rx);
            sweep(rec, true);
            drain(rec, rx);
            rec.write(&recorder::end_record(rec, reason));
            ack.store(true, Ordering::Release);
        }
    }
}

/// The next queued message; taking it makes room for a thread waiting in `recorder::send`.
fn take(rx: &Receiver<Msg>) -> Result<Msg, TryRecvError> {
    let m = rx.try_recv()?;
    recorder::room_made();
    Ok(m)
}

/// Writes what is queued now (not what arrives meanwhile, so it always ends).
fn drain(rec: &Recorder, rx: &Receiver<Msg>) {
    for _ in 0..rx.len() {
        match take(rx) {
            Ok(m) => handle(rec, rx, m),
            Err(_) => break,
        }
    }
}

/// Collects buffers that are old enough (all non-empty ones when `force`) and forgets the
/// states of threads that have exited and been emptied.
pub(crate) fn sweep(rec: &Recorder, force: bool) {
    let mut taken = Vec::new();
    if let Ok(mut reg) = rec.registry.lock() {
        let now = clock::event_time();
        // Threads whose buffer is still to be looked at; at the end, a thread in the middle
        // of an event is waited for briefly.
        let mut pending = vec![true; reg.len()];
        let mut gone = vec![false; reg.len()];
        for attempt in 0..if force { 1000 } else { 1 } {
            if attempt > 0 {
                std::thread::yield_now();
            }
            // Only the threads still pending: a claim stalls the thread's next event.
            let claimed = recorder::claim_all(&reg, |i| pending[i]);
            for (i, guard) in claimed.into_iter().enumerate() {
                let Some(mut b) = guard else { continue };
                pending[i] = false;
                let ts = &reg[i];
                if b.open && (force || now.saturating_sub(b.opened_at) >= MAX_AGE_US) {
                    // No buffer in its place: the thread takes one at its next event, so
                    // threads that have gone quiet hold none.
                    if let Some(t) = b.take_framed(None) {
                        taken.push(t);
                    }
                }
                gone[i] = ts.dead.load(Ordering::Acquire) && !b.open;
            }
            if !pending.contains(&true) {
                break;
            }
        }
        let mut i = 0;
        reg.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
        recorder::set_thread_count(reg.len());
    }
    for (data, start) in taken {
        rec.write_chunk(&data.as_slice()[start..]);
        rec.recycle(data);
    }
}

/// `finish` when no writer thread was ever started.
pub(crate) fn finish_inline(rec: &Recorder, reason: EndReason) {
    sweep(rec, true);
    rec.write(&recorder::end_record(rec, reason));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table says what C's strerror says in the C locale (this process never sets one).
    #[test]
    fn errno_texts_are_cs_own() {
        let mut buf = [0u8; 24];
        for e in [
            libc::EFBIG,
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EIO,
            libc::EROFS,
            libc::EBADF,
            libc::EPIPE,
            libc::EINVAL,
            libc::EPERM,
            libc::EACCES,
            libc::ENXIO,
            libc::EAGAIN,
            libc::ESTALE,
        ] {
            // SAFETY: strerror returns a NUL-terminated string; this test is single-threaded
            // in its use of it.
            let c = unsafe { std::ffi::CStr::from_ptr(libc::strerror(e)) };
            assert_eq!(errno_text(e, &mut buf), c.to_bytes(), "errno {e}");
        }
        assert_eq!(errno_text(1234, &mut buf), b"errno 1234");
        assert_eq!(errno_text(0, &mut buf), b"errno 0");
        assert_eq!(errno_text(i32::MIN, &mut buf), b"errno 2147483648");
    }
}
