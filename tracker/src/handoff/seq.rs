//! The global sequence number, which orders every event across threads. Taken after a block is
//! obtained and before one is handed back, so that no other thread's event on the same address
//! can fall between.
//!
//! While one thread records, it takes numbers with a plain load and store (no locked
//! instruction on the hot path); once a second thread records, every thread takes them with an
//! atomic add ([`share_sequence`]).

use super::barrier;
use super::slot::ThreadSlot;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[repr(align(128))]
struct Padded<T>(T);

/// The next sequence number. Kept on its own cache line: every event touches it.
static SEQ: Padded<AtomicU64> = Padded(AtomicU64::new(1));
/// Set once a second thread records: from then on `SEQ` is taken with an atomic add.
static SHARED: AtomicBool = AtomicBool::new(false);

/// The next sequence number. Called inside an event (the thread's slot is busy) or after
/// `share_sequence`.
#[inline(always)]
pub(crate) fn next() -> u64 {
    if SHARED.load(Ordering::Relaxed) {
        SEQ.0.fetch_add(1, Ordering::Relaxed)
    } else {
        let s = SEQ.0.load(Ordering::Relaxed);
        SEQ.0.store(s + 1, Ordering::Relaxed);
        s
    }
}

/// The number the next event will take (for records that are not events).
pub(crate) fn peek() -> u64 {
    SEQ.0.load(Ordering::Relaxed)
}

/// A fresh image or a forked child: one thread so far, numbers from `first`.
pub(crate) fn start_at(first: u64) {
    SEQ.0.store(first.max(1), Ordering::Relaxed);
    SHARED.store(false, Ordering::Relaxed);
}

/// Whether numbers are already taken atomically.
pub(crate) fn is_shared() -> bool {
    SHARED.load(Ordering::Relaxed)
}

/// A second thread is about to record: every thread takes sequence numbers atomically from
/// now on. A thread that read `SHARED` as false before the barrier is inside its event (its
/// slot's busy flag is visible after the barrier), and is waited for; any later event of it
/// sees `SHARED`. Called with the registry lock held, outside any event of the calling thread.
pub(crate) fn share_sequence(threads: &[Arc<ThreadSlot>]) {
    if SHARED.swap(true, Ordering::SeqCst) {
        return;
    }
    // Once registered, membarrier does not fail; if it ever did, the busy flags below still
    // catch every thread whose event had begun visibly.
    let _ = barrier::heavy();
    for slot in threads {
        // Bounded: a thread interrupted inside an event by a signal handler that waits for this
        // thread would otherwise never let go. Past the bound, the worst case is one sequence
        // number taken twice, which the reader orders arbitrarily.
        for i in 0..200_000u32 {
            if !slot.is_busy() {
                break;
            }
            if i < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}
