//! The one guard type for "do not record our own allocations" (dhat-rs `IgnoreAllocs`), and the
//! thread's tracker state pointer, kept together so a hook reads thread-local storage once.

use std::cell::Cell;

pub(crate) struct Tls {
    in_tracker: Cell<bool>,
    /// This thread's recorder state (`recorder::ThreadState`), null before its first event.
    pub(crate) current: Cell<*const ()>,
    /// Bytes to this thread's next sample point (`sampling`).
    countdown: crate::sampling::Countdown,
}

thread_local! {
    // Const-initialised and without Drop: a plain TLS slot, so touching it never allocates
    // and never registers a destructor (it is read inside malloc).
    static TLS: Tls = const {
        Tls {
            in_tracker: Cell::new(false),
            current: Cell::new(std::ptr::null()),
            countdown: crate::sampling::Countdown::new(),
        }
    };
}

/// While alive, allocations made by this thread are passed through unrecorded.
pub struct IgnoreAllocs {
    tls: *const Tls,
}

impl IgnoreAllocs {
    /// Enters the tracker; `None` when this thread is already inside it.
    #[inline]
    pub fn enter() -> Option<IgnoreAllocs> {
        let tls = TLS.with(|t| t as *const Tls);
        // SAFETY: the pointer is this thread's TLS slot, valid for the thread's life.
        let was = unsafe { (*tls).in_tracker.replace(true) };
        // Not `then_some`: it would build (and drop) a guard even when the flag was set, and
        // the drop would clear the flag of the guard that holds it.
        if was {
            None
        } else {
            Some(IgnoreAllocs { tls })
        }
    }

    /// This thread's TLS, read through the guard that is already held.
    #[inline]
    pub(crate) fn tls(&self) -> &Tls {
        // SAFETY: see `enter`; the guard never leaves its thread (it is !Send: raw pointer).
        unsafe { &*self.tls }
    }

    /// Marks the calling thread as the tracker's own for the rest of its life (writer thread).
    pub fn forever() {
        TLS.with(|t| t.in_tracker.set(true));
    }

    #[inline]
    pub fn active() -> bool {
        TLS.with(|t| t.in_tracker.get())
    }
}

/// Sampling: counts `size` bytes allocated by this thread; true when the allocation is to be
/// recorded. One TLS access, a decrement and a compare, unless the sample point is crossed.
#[inline(always)]
pub(crate) fn sample_take(size: u64) -> bool {
    TLS.with(|t| t.countdown.take(size))
}

impl Drop for IgnoreAllocs {
    #[inline]
    fn drop(&mut self) {
        self.tls().in_tracker.set(false);
    }
}

/// Saves `errno` and restores it on drop. Wrapped around the tracker's slow paths (syscalls,
/// contended locks, thread set-up) so that recording never changes what the program sees; the
/// per-event fast path makes no call that could set errno.
pub(crate) struct SaveErrno(i32);

impl SaveErrno {
    #[inline]
    pub(crate) fn new() -> SaveErrno {
        // SAFETY: __errno_location always returns this thread's valid errno slot.
        SaveErrno(unsafe { *libc::__errno_location() })
    }
}

impl Drop for SaveErrno {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}
