//! `Tracker<A>`: a `#[global_allocator]` wrapper with cheap exact counters, readable at any
//! time, and `measure` for tests that assert a closure's allocations and peak (as dhat-rs's
//! testing mode does). It also records captures from inside the program: [`start`] (a guard) or
//! `MEMTRACK_OUTPUT` in the environment, looked at once, at the first allocation.
//!
//! A recorded allocation's stack starts from registers taken in the `Tracker` method's own
//! frame: one unwinding step reaches its caller (a marker local in that frame tells where the
//! tracker's frames end), and from there it is walked like the preload library's stacks.
//!
//! ```
//! use std::alloc::System;
//!
//! #[global_allocator]
//! static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);
//!
//! fn main() {
//!     let s = memtrack_tracker::stats();
//!     assert!(s.peak_bytes >= s.live_bytes);
//!
//!     let path = std::env::temp_dir().join(format!("doc-{}.cap", std::process::id()));
//!     let recording = memtrack_tracker::start(&path).unwrap();
//!     let v = std::hint::black_box(vec![0u8; 4096]); // recorded, with its stack
//!     drop(recording);
//!     drop(v);
//!     assert!(std::fs::read(&path).unwrap().starts_with(b"MEMTRACK"));
//!     std::fs::remove_file(&path).unwrap();
//! }
//! ```

use crate::guard::IgnoreAllocs;
use crate::lifecycle::{self, State};
use crate::recorder::{self, alloc_event};
use crate::sampling;
use crate::session;
use crate::stack::unwind::{here_regs, Caller};
use crate::stack::StackStart;
use memtrack_format::{AllocKind, EndReason, EventKind};
use std::alloc::{GlobalAlloc, Layout};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering::Relaxed};

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

// ---------------------------------------------------------------- recording

/// Whether `MEMTRACK_OUTPUT` was looked at (once, at the first allocation).
static ENV_CHECKED: AtomicBool = AtomicBool::new(false);

/// `Some` with the guard held when this call is to be recorded.
#[inline(always)]
fn recording() -> Option<IgnoreAllocs> {
    match lifecycle::current_relaxed() {
        State::Active => IgnoreAllocs::enter(),
        State::Uninit if !ENV_CHECKED.load(Relaxed) => start_from_env(),
        _ => None,
    }
}

/// `recording` for an allocation of `size` bytes: when sampling, only a sampled one records.
#[inline(always)]
fn recording_alloc(size: usize) -> Option<IgnoreAllocs> {
    if sampling::rate() != 0
        && lifecycle::current_relaxed() == State::Active
        && !crate::guard::sample_take(size as u64)
    {
        return None;
    }
    recording()
}

#[cold]
#[inline(never)]
fn start_from_env() -> Option<IgnoreAllocs> {
    let g = IgnoreAllocs::enter()?;
    if ENV_CHECKED.swap(true, Ordering::AcqRel) {
        return None;
    }
    if !lifecycle::begin_init() {
        return None;
    }
    match session::open_from_env(false) {
        Some(true) => {
            session::began_in_program();
            lifecycle::end_init(State::Active);
            Some(g)
        }
        // Not set (or not readable yet, which a Rust program's allocator never sees): a later
        // `start` may still record.
        None => {
            lifecycle::end_init(State::Uninit);
            None
        }
        Some(false) => {
            lifecycle::end_init(State::Disabled);
            None
        }
    }
}

/// Records a block handed out. `start` are registers taken in the allocator method's frame and
/// `marker` the address of a local of it, so the stack starts at the method's caller.
#[inline(never)]
fn on_alloc(
    g: &IgnoreAllocs,
    kind: AllocKind,
    p: *mut u8,
    size: usize,
    start: Caller,
    marker: u64,
) {
    recorder::record(
        alloc_event(kind, p as u64, size as u64),
        StackStart::AboveMarker(start, marker),
        g,
    );
    sampling::note_sampled(p as u64);
}

#[inline(never)]
fn on_free(g: &IgnoreAllocs, ev: EventKind) {
    recorder::record(ev, StackStart::Here, g);
}

/// The address of a local of the calling frame.
macro_rules! marker {
    ($m:ident) => {{
        std::hint::black_box(&$m) as *const u8 as u64
    }};
}

/// The body of `alloc` and `alloc_zeroed`; `get` is the wrapped allocator's call. Always inlined:
/// the marker must be a local of the calling `Tracker` method's own frame.
#[inline(always)]
fn allocated(size: usize, get: impl FnOnce() -> *mut u8) -> *mut u8 {
    let m = 0u8;
    let g = recording_alloc(size);
    let p = get();
    if !p.is_null() {
        ALLOCATIONS.fetch_add(1, Relaxed);
        grew(size as u64);
        if let Some(g) = &g {
            on_alloc(g, AllocKind::RustAlloc, p, size, here_regs(), marker!(m));
        }
    }
    p
}

// The methods are not inlined: a frame of their own holds the marker, and carries a name that
// reports recognise as the allocator's (when the preload library records the program).
// SAFETY: every method forwards to the wrapped allocator with the caller's arguments and only
// adds atomic counter updates and, while recording, events written under the guard; none of it
// unwinds, and the tracker's own allocations inside the guard are passed through.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Tracker<A> {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding the caller's layout.
        allocated(layout.size(), || unsafe { self.inner.alloc(layout) })
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding the caller's layout.
        allocated(layout.size(), || unsafe { self.inner.alloc_zeroed(layout) })
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREES.fetch_add(1, Relaxed);
        LIVE.fetch_sub(layout.size() as u64, Relaxed);
        let g = sampling::enter_free(ptr as u64, recording);
        if let Some(g) = &g {
            // Before the block goes back: no other thread can be handed it first.
            on_free(g, EventKind::Free { addr: ptr as u64 });
        }
        // SAFETY: forwarding a block this allocator handed out, with its layout.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let m = 0u8;
        // Which halves are recorded: both, unless sampling.
        let (g, old_rec, new_rec) = if sampling::rate() == 0 {
            (recording(), true, true)
        } else {
            let old = sampling::enter_free(ptr as u64, recording);
            let new = lifecycle::current_relaxed() == State::Active
                && crate::guard::sample_take(new_size as u64);
            let old_rec = old.is_some();
            let g = match old {
                Some(g) => Some(g),
                None if new => IgnoreAllocs::enter(),
                None => None,
            };
            (g, old_rec, new)
        };
        if let (Some(g), true) = (&g, old_rec) {
            on_free(g, EventKind::ReallocFree { addr: ptr as u64 });
        }
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
            if let (Some(g), true) = (&g, new_rec) {
                on_alloc(g, AllocKind::Realloc, p, new_size, here_regs(), marker!(m));
            }
        } else if let (Some(g), true) = (&g, old_rec) {
            on_free(g, EventKind::ReallocFailed);
            // The old block stays the program's.
            sampling::note_sampled(ptr as u64);
        }
        p
    }
}

/// Why [`start`] could not record.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create capture {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "a capture was already recorded (or is being recorded) in this process; only one can be"
    )]
    AlreadyRecorded,
    #[error("recording into {0} could not start")]
    Failed(String),
}

/// A recording in progress, started by [`start`]: dropping it finishes the capture.
#[must_use = "the recording stops when this guard is dropped"]
pub struct Recording {
    _private: (),
}

impl Recording {
    /// Finishes the capture now (as dropping the guard does).
    pub fn finish(self) {}
}

impl Drop for Recording {
    fn drop(&mut self) {
        recorder::finish(EndReason::Exit);
    }
}

/// Starts recording every allocation made through [`Tracker`] (which must be the global
/// allocator) into a new capture at `path`, with native stacks, until the returned guard drops
/// or the process exits. The file must not exist yet. One recording per process: a second call
/// (or one after `MEMTRACK_OUTPUT` started a recording) is an error.
pub fn start(path: impl AsRef<Path>) -> Result<Recording, StartError> {
    // Held to the end, so that `path` (made before recording starts) is freed unrecorded.
    let _g = IgnoreAllocs::enter().ok_or(StartError::AlreadyRecorded)?;
    let path = path.as_ref().to_string_lossy().into_owned();
    ENV_CHECKED.store(true, Ordering::Release);
    if !lifecycle::begin_init() {
        return Err(StartError::AlreadyRecorded);
    }
    match session::create_program_capture(&path) {
        Ok(true) => {
            session::began_in_program();
            lifecycle::end_init(State::Active);
            Ok(Recording { _private: () })
        }
        Ok(false) => {
            lifecycle::end_init(State::Disabled);
            Err(StartError::Failed(path))
        }
        Err(source) => {
            lifecycle::end_init(State::Uninit);
            Err(StartError::Create { path, source })
        }
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
