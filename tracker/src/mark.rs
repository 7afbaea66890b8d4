//! The region marks of a Rust program: [`region`] (a guard), [`region_begin`] and
//! [`region_end`].
//!
//! Two recorders may be in the process: this crate's own, when [`crate::Tracker`] is the global
//! allocator and records (`start` or `MEMTRACK_OUTPUT`), and the preload library's, under
//! `memtrack run` (the library holds a copy of this crate of its own, whose statics this one
//! cannot see). A mark goes to this crate's recorder when it records; otherwise to the preload
//! library's `memtrack_region_begin` and `memtrack_region_end`, looked up once with
//! `dlsym(RTLD_DEFAULT)`; otherwise nowhere. (Under `memtrack run` this crate's recorder stands
//! down: the preload library records the program's allocations.)
//!
//! ```
//! fn load_index() -> Vec<u8> {
//!     let _r = memtrack_tracker::region("load_index");
//!     vec![0u8; 1024] // recorded inside "load_index" when the program records
//! } // the region ends here
//! assert_eq!(load_index().len(), 1024);
//! ```

use crate::guard::IgnoreAllocs;
use crate::lifecycle::{self, State};
use crate::recorder;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The region a thread is in while this guard lives: made by [`region`], ends on drop.
#[must_use = "the region ends when this guard is dropped"]
pub struct Region {
    // A region belongs to the thread that opened it: the guard does not leave it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Region {
    #[inline]
    fn drop(&mut self) {
        region_end();
    }
}

/// Enters region `name` on the calling thread until the returned guard drops. Regions nest.
/// Recorded by this crate's recorder or, under `memtrack run`, by the preload library; a
/// no-op otherwise.
#[inline]
pub fn region(name: &str) -> Region {
    region_begin(name);
    Region {
        _not_send: std::marker::PhantomData,
    }
}

/// Enters region `name` on the calling thread; [`region_end`] leaves it. Prefer [`region`].
/// Through the preload library (`memtrack run`) a name is cut at 255 bytes and at a NUL.
pub fn region_begin(name: &str) {
    if lifecycle::current_relaxed() == State::Active {
        if let Some(g) = IgnoreAllocs::enter() {
            recorder::region_begin(name.as_bytes(), &g);
        }
        return;
    }
    let f = preload(&BEGIN, c"memtrack_region_begin");
    if f == NONE {
        return;
    }
    // A NUL-terminated copy on the stack (longer names are cut at 255 bytes, and at a NUL).
    let mut buf = [0u8; 256];
    let n = name.len().min(buf.len() - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: `f` is the preload library's `memtrack_region_begin(const char *)`, given a
    // NUL-terminated string.
    unsafe {
        let f: unsafe extern "C" fn(*const c_char) = std::mem::transmute(f);
        f(buf.as_ptr() as *const c_char)
    }
}

/// Leaves the calling thread's innermost open region.
pub fn region_end() {
    if lifecycle::current_relaxed() == State::Active {
        if let Some(g) = IgnoreAllocs::enter() {
            recorder::region_end(&g);
        }
        return;
    }
    let f = preload(&END, c"memtrack_region_end");
    if f == NONE {
        return;
    }
    // SAFETY: `f` is the preload library's `memtrack_region_end(void)`.
    unsafe {
        let f: unsafe extern "C" fn() = std::mem::transmute(f);
        f()
    }
}

/// Not looked up yet.
const UNKNOWN: usize = 0;
/// Looked up: not in the process.
const NONE: usize = 1;
static BEGIN: AtomicUsize = AtomicUsize::new(UNKNOWN);
static END: AtomicUsize = AtomicUsize::new(UNKNOWN);

/// The preload library's function `name`, looked up once (`NONE`: absent).
#[inline]
fn preload(cache: &AtomicUsize, name: &std::ffi::CStr) -> usize {
    match cache.load(Ordering::Acquire) {
        UNKNOWN => {
            // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope,
            // where LD_PRELOAD puts libmemtrack.so.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as usize;
            let v = if p == 0 { NONE } else { p };
            cache.store(v, Ordering::Release);
            v
        }
        v => v,
    }
}
