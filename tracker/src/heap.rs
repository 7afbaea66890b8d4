//! The preload library's own heap, apart from the program's.
//!
//! **Why**: through the program's `malloc`, the tracker's own allocations (each thread's stack
//! caches, the stack trie, the transcoder's buffers) landed in glibc's per-thread arenas of the
//! threads that made them, and stayed there once freed, fragmenting them (figures in
//! `bench/RESULTS.md`). They also shaped the program's own heap, which a tracker must leave as
//! it would be.
//! **How**: a dlmalloc heap of its own, on pages from `mmap`, behind one mutex (the tracker
//! allocates seldom on its hot paths), is the preload library's `#[global_allocator]`. A
//! `fork` waits for the mutex, so the child never inherits it held by a thread it does not have.

use dlmalloc::Dlmalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// The heap: `#[global_allocator] static A: PrivateHeap = PrivateHeap;`.
pub struct PrivateHeap;

struct Heap {
    lock: UnsafeCell<libc::pthread_mutex_t>,
    dl: UnsafeCell<Dlmalloc>,
}

// SAFETY: `dl` is only touched with `lock` held; the mutex is made for sharing.
unsafe impl Sync for Heap {}

static HEAP: Heap = Heap {
    lock: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
    dl: UnsafeCell::new(Dlmalloc::new()),
};

static FORK_SAFE: AtomicBool = AtomicBool::new(false);

struct Held;

impl Held {
    #[inline]
    fn take() -> Held {
        if !FORK_SAFE.load(Ordering::Acquire) {
            register_fork_handlers();
        }
        // SAFETY: the mutex is initialised statically (or in the fork child, before any use).
        unsafe { libc::pthread_mutex_lock(HEAP.lock.get()) };
        Held
    }

    /// The heap, while the mutex is held.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    fn dl(&self) -> &mut Dlmalloc {
        // SAFETY: `self` exists only while the mutex is held, and one `Held` at a time uses it.
        unsafe { &mut *HEAP.dl.get() }
    }
}

impl Drop for Held {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: locked by `take`.
        unsafe { libc::pthread_mutex_unlock(HEAP.lock.get()) };
    }
}

extern "C" fn before_fork() {
    // SAFETY: as in `Held::take`; released in the parent, made afresh in the child.
    unsafe { libc::pthread_mutex_lock(HEAP.lock.get()) };
}

extern "C" fn after_fork_parent() {
    // SAFETY: locked by `before_fork` on this thread.
    unsafe { libc::pthread_mutex_unlock(HEAP.lock.get()) };
}

extern "C" fn after_fork_child() {
    // SAFETY: the child has one thread, this one, which holds the mutex since `before_fork`;
    // a fresh mutex replaces it (a child may not unlock what another thread id locked).
    unsafe { HEAP.lock.get().write(libc::PTHREAD_MUTEX_INITIALIZER) };
}

/// Once, outside the mutex: `pthread_atfork` allocates (through the program's `malloc`, which
/// the calling thread's guard passes straight to glibc's).
#[cold]
fn register_fork_handlers() {
    if FORK_SAFE.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: registers handlers that never unwind and only lock or reset the mutex.
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(after_fork_child),
        )
    };
}

// SAFETY: every call forwards to dlmalloc with the mutex held; dlmalloc returns blocks of the
// requested size and alignment, or null.
unsafe impl GlobalAlloc for PrivateHeap {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the mutex is held (`Held`); the layout comes from the caller's contract.
        unsafe { Held::take().dl().malloc(layout.size(), layout.align()) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { Held::take().dl().calloc(layout.size(), layout.align()) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this heap with this layout (the trait's contract).
        unsafe { Held::take().dl().free(ptr, layout.size(), layout.align()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as in `dealloc`.
        unsafe {
            Held::take()
                .dl()
                .realloc(ptr, layout.size(), layout.align(), new_size)
        }
    }
}
