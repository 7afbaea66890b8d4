//! The writer's queue: a bounded crossbeam channel whose senders wait on a futex when it is
//! full, woken as the writer takes messages.

use crate::guard::SaveErrno;
use crate::writer::Msg;
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Sends to the writer. Back-pressure: while the writer is behind, the thread sleeps on a futex
/// until the writer has taken a message (`room_made`): polling instead, hundreds of waiting
/// threads keep the kernel's scheduler busy and starve the writer. Not crossbeam's blocking
/// send: it parks through `std::thread::current()`, which panics in a thread whose TLS is being
/// torn down (an exiting thread's last events come here), and elsewhere gives the program
/// thread a thread-local that std frees outside the guard. Given up after 10 s rather than hang.
pub(crate) fn send(tx: &Sender<Msg>, mut m: Msg) {
    let start = Instant::now();
    loop {
        let seen = ROOM.load(Ordering::SeqCst);
        match tx.try_send(m) {
            Ok(()) => return,
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
            Err(crossbeam_channel::TrySendError::Full(back)) => m = back,
        }
        if start.elapsed() > SEND_PATIENCE {
            return;
        }
        WAITERS.fetch_add(1, Ordering::SeqCst);
        // Room made since `seen` (after the failed try) changes ROOM: the wait returns at once.
        futex_wait(&ROOM, seen, Duration::from_millis(10));
        WAITERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a thread waits for room in the writer's queue.
const SEND_PATIENCE: Duration = Duration::from_secs(10);
/// Bumped by the writer each time it takes a message while threads wait for room.
static ROOM: AtomicU32 = AtomicU32::new(0);
/// Threads waiting in `send` for room in the queue.
static WAITERS: AtomicU32 = AtomicU32::new(0);

/// The writer took a message from the queue: one waiting thread may send.
#[inline]
pub(crate) fn room_made() {
    if WAITERS.load(Ordering::SeqCst) != 0 {
        ROOM.fetch_add(1, Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE on a static word; wakes at most one waiter, fails harmlessly.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                ROOM.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            )
        };
    }
}

/// Sleeps while `word` holds `expected`, for at most `timeout` (or until a signal).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // A wait may be cut short by a signal, which sets errno.
    let _errno = SaveErrno::new();
    // SAFETY: FUTEX_WAIT on a static word with a relative timeout; returns on a wake, a
    // timeout, a signal, or at once when the word no longer holds `expected`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        )
    };
}
