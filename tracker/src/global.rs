//! `Tracker<A>`: a `#[global_allocator]` wrapper with cheap exact counters, readable at any
//! time, and `measure` for tests that assert a closure's allocations and peak (as dhat-rs's
//! testing mode does).
//!
//! ```
//! use std::alloc::System;
//! // In a program: #[global_allocator]
//! static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);
//! # let _ = &ALLOC;
//! let s = memtrack_tracker::stats();
//! assert!(s.peak_bytes >= s.live_bytes);
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
/// The peak of the `measure` in progress.
static WINDOW_PEAK: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);

/// Wraps an allocator and counts what goes through it.
pub struct Tracker<A> {
    inner: A,
}

impl<A> Tracker<A> {
    pub const fn new(inner: A) -> Self {
        Tracker { inner }
    }
}

#[inline]
fn grew(size: u64) {
    let live = LIVE.fetch_add(size, Relaxed) + size;
    // Most allocations do not raise a peak: a plain load spares the read-modify-write.
    if live > PEAK.load(Relaxed) {
        PEAK.fetch_max(live, Relaxed);
    }
    if live > WINDOW_PEAK.load(Relaxed) {
        WINDOW_PEAK.fetch_max(live, Relaxed);
    }
}

// SAFETY: every method forwards to the wrapped allocator with the caller's arguments and only
// adds atomic counter updates, which neither allocate nor unwind.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Tracker<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding the caller's layout.
        let p = unsafe { self.inner.alloc(layout) };
        if !p.is_null() {
            ALLOCATIONS.fetch_add(1, Relaxed);
            grew(layout.size() as u64);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding the caller's layout.
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATIONS.fetch_add(1, Relaxed);
            grew(layout.size() as u64);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREES.fetch_add(1, Relaxed);
        LIVE.fetch_sub(layout.size() as u64, Relaxed);
        // SAFETY: forwarding a block this allocator handed out, with its layout.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarding the caller's arguments.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // As in captures: a realloc is one allocation call; the old block is not a free.
            ALLOCATIONS.fetch_add(1, Relaxed);
            let (old, new) = (layout.size() as u64, new_size as u64);
            if new >= old {
                grew(new - old);
            } else {
                LIVE.fetch_sub(old - new, Relaxed);
            }
        }
        p
    }
}

/// Figures of the allocator: requested bytes, as in captures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes live now (for `measure`: the closure's net growth, 0 if it shrank the heap).
    pub live_bytes: u64,
    /// The high-water mark (for `measure`: above the live bytes at its start).
    pub peak_bytes: u64,
    /// Calls that handed out a block (alloc, alloc_zeroed, each realloc).
    pub allocations: u64,
    pub frees: u64,
}

/// The counters now. Exact when `Tracker` is the global allocator; zeros otherwise.
pub fn stats() -> Stats {
    Stats {
        live_bytes: LIVE.load(Relaxed),
        peak_bytes: PEAK.load(Relaxed),
        allocations: ALLOCATIONS.load(Relaxed),
        frees: FREES.load(Relaxed),
    }
}

/// Starts a new peak from the bytes live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

/// Runs `f` and returns its result with the figures of just that call: its allocations and frees,
/// its peak above the live bytes at entry, and its net growth. Allocations of other threads
/// meanwhile count too (the counters are process-wide), so measure with other threads quiet;
/// measurements do not nest.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Stats) {
    let start = stats();
    WINDOW_PEAK.store(start.live_bytes, Relaxed);
    let r = f();
    let end = stats();
    let stats = Stats {
        live_bytes: end.live_bytes.saturating_sub(start.live_bytes),
        peak_bytes: WINDOW_PEAK.load(Relaxed).saturating_sub(start.live_bytes),
        allocations: end.allocations - start.allocations,
        frees: end.frees - start.frees,
    };
    (r, stats)
}
