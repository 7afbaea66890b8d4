//! The one guard type for "do not record our own allocations" (dhat-rs `IgnoreAllocs`).

use std::cell::Cell;

thread_local! {
    // Const-initialised and without Drop: a plain TLS slot, so touching it never allocates
    // and never registers a destructor (it is read inside malloc).
    static IN_TRACKER: Cell<bool> = const { Cell::new(false) };
}

/// While alive, allocations made by this thread are passed through unrecorded. It also
/// saves `errno` on entry and restores it on drop, so recording never changes what the
/// program sees.
pub struct IgnoreAllocs {
    errno: i32,
}

impl IgnoreAllocs {
    /// Enters the tracker; `None` when this thread is already inside it.
    #[inline]
    pub fn enter() -> Option<IgnoreAllocs> {
        let was = IN_TRACKER.with(|g| g.replace(true));
        if was {
            return None;
        }
        // SAFETY: __errno_location always returns this thread's valid errno slot.
        let errno = unsafe { *libc::__errno_location() };
        Some(IgnoreAllocs { errno })
    }

    /// Takes the current `errno` as the one to restore: call it right after the real allocator
    /// returned, so the program sees the allocator's errno and not ours.
    #[inline]
    pub fn keep_errno(&mut self) {
        // SAFETY: __errno_location always returns this thread's valid errno slot.
        self.errno = unsafe { *libc::__errno_location() };
    }

    /// Marks the calling thread as the tracker's own for the rest of its life (writer thread).
    pub fn forever() {
        IN_TRACKER.with(|g| g.set(true));
    }

    #[inline]
    pub fn active() -> bool {
        IN_TRACKER.with(|g| g.get())
    }
}

impl Drop for IgnoreAllocs {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        unsafe { *libc::__errno_location() = self.errno };
        IN_TRACKER.with(|g| g.set(false));
    }
}
