//! The two sides of the asymmetric handshakes between a program thread and the thread that
//! claims its buffer (the writer's sweep, `finish`) or switches the sequence to shared mode.
//!
//! With expedited `membarrier(2)` registered, a program thread's side is a compiler fence and
//! the rare other side pays the syscall, which orders every thread's earlier stores as a fence
//! on each of them would. Without it, both sides are full fences.

use crate::guard::SaveErrno;
use std::sync::atomic::{AtomicBool, Ordering};

/// `membarrier(2)` commands.
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// True when this process registered for expedited `membarrier`.
static EXPEDITED_MEMBARRIER: AtomicBool = AtomicBool::new(false);

/// Registers the process for `membarrier` (once per process image, and again in a forked
/// child: registration belongs to the address space).
/// `MEMTRACK_NO_MEMBARRIER=1` keeps to fences (for sandboxes where the syscall misbehaves; the
/// tests run both ways).
pub(crate) fn register() {
    if crate::env::getenv(c"MEMTRACK_NO_MEMBARRIER").is_some() {
        EXPEDITED_MEMBARRIER.store(false, Ordering::Release);
        return;
    }
    // SAFETY: membarrier with a command and flags 0 has no memory-safety preconditions.
    let ok = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
            0,
            0,
        )
    } == 0;
    EXPEDITED_MEMBARRIER.store(ok, Ordering::Release);
}

/// A program thread's side: orders its store of a flag before its load of the other side's.
#[inline(always)]
pub(crate) fn light() {
    if EXPEDITED_MEMBARRIER.load(Ordering::Relaxed) {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    } else {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// The other side: orders this thread's earlier stores before every other thread's later
/// loads, as a full fence on all of them would. False when that could not be done (nothing may
/// then be assumed).
pub(crate) fn heavy() -> bool {
    std::sync::atomic::fence(Ordering::SeqCst);
    if !EXPEDITED_MEMBARRIER.load(Ordering::Acquire) {
        return true;
    }
    let _errno = SaveErrno::new();
    // SAFETY: as in `register`.
    unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0 }
}
