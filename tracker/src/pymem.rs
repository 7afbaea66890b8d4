//! Python's object allocator in a recording started in a running CPython: its `MEM` and `OBJ`
//! domains are wrapped (`PyMem_SetAllocator`) so that each object is recorded, not only the
//! arenas pymalloc maps. Under `memtrack run` this is not needed (`PYTHONMALLOC=malloc` is set
//! before Python starts); a running interpreter has made its choice already.
//!
//! The wrappers (exported by the preload library, registered here) call the allocator that was
//! installed before them inside the guard, so the `malloc` or `mmap` it makes is not recorded a
//! second time. They stay installed after a stop when it cannot take the GIL (a stop by the
//! writer thread) and then only forward. Must run with the GIL held (`install`, `uninstall`).

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// CPython's `PyMemAllocatorEx`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PyMemAllocatorEx {
    pub ctx: *mut c_void,
    pub malloc: Option<unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void>,
    pub calloc: Option<unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void>,
    pub realloc: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void>,
    pub free: Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
}

// SAFETY: plain function pointers and an opaque context CPython hands to any thread.
unsafe impl Send for PyMemAllocatorEx {}

const EMPTY: PyMemAllocatorEx = PyMemAllocatorEx {
    ctx: std::ptr::null_mut(),
    malloc: None,
    calloc: None,
    realloc: None,
    free: None,
};

/// `PYMEM_DOMAIN_MEM` and `PYMEM_DOMAIN_OBJ` (RAW is `malloc`, already hooked).
const DOMAINS: [c_int; 2] = [1, 2];

/// The allocators wrapped, one per domain: the wrappers' `ctx` points here, so the storage
/// never moves and is never freed.
static mut ORIGINAL: [PyMemAllocatorEx; 2] = [EMPTY; 2];
static LOCK: Mutex<()> = Mutex::new(());

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicUsize = AtomicUsize::new(0);
/// The preload library's wrappers: malloc, calloc, realloc, free.
static WRAPPERS: [AtomicUsize; 4] = [ZERO; 4];

/// Registers the preload library's wrapper functions.
pub fn register_wrappers(malloc: usize, calloc: usize, realloc: usize, free: usize) {
    for (w, f) in WRAPPERS.iter().zip([malloc, calloc, realloc, free]) {
        w.store(f, Ordering::Release);
    }
}

type Malloc = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type Calloc = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type Realloc = unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void, *mut c_void);
type GetAllocator = unsafe extern "C" fn(c_int, *mut PyMemAllocatorEx);
type SetAllocator = unsafe extern "C" fn(c_int, *mut PyMemAllocatorEx);

fn python_api() -> Option<(GetAllocator, SetAllocator)> {
    // SAFETY: dlsym with valid names; the functions have these C signatures in every CPython 3.
    unsafe {
        let g = libc::dlsym(libc::RTLD_DEFAULT, c"PyMem_GetAllocator".as_ptr());
        let s = libc::dlsym(libc::RTLD_DEFAULT, c"PyMem_SetAllocator".as_ptr());
        let init = libc::dlsym(libc::RTLD_DEFAULT, c"Py_IsInitialized".as_ptr());
        if g.is_null() || s.is_null() || init.is_null() {
            return None;
        }
        let initialized = std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(init);
        if initialized() == 0 {
            return None;
        }
        Some((
            std::mem::transmute::<*mut c_void, GetAllocator>(g),
            std::mem::transmute::<*mut c_void, SetAllocator>(s),
        ))
    }
}

fn wrapper_table(ctx: *mut c_void) -> Option<PyMemAllocatorEx> {
    let w: Vec<usize> = WRAPPERS.iter().map(|w| w.load(Ordering::Acquire)).collect();
    if w.contains(&0) {
        return None;
    }
    // SAFETY: the registered addresses are the preload library's wrappers, with these
    // signatures.
    unsafe {
        Some(PyMemAllocatorEx {
            ctx,
            malloc: Some(std::mem::transmute::<usize, Malloc>(w[0])),
            calloc: Some(std::mem::transmute::<usize, Calloc>(w[1])),
            realloc: Some(std::mem::transmute::<usize, Realloc>(w[2])),
            free: Some(std::mem::transmute::<usize, Free>(w[3])),
        })
    }
}

/// Wraps the `MEM` and `OBJ` domains (kept when already wrapped). The caller holds the GIL.
/// False when the process is not a running CPython.
pub fn install() -> bool {
    let Some((get, set)) = python_api() else {
        return false;
    };
    let Ok(_l) = LOCK.lock() else { return false };
    let mut any = false;
    for (i, domain) in DOMAINS.iter().enumerate() {
        let mut cur = EMPTY;
        // SAFETY: a valid out-pointer; the GIL is held (the caller's contract).
        unsafe { get(*domain, &mut cur) };
        let mine = WRAPPERS[0].load(Ordering::Acquire);
        if cur.malloc.map(|f| f as usize) == Some(mine) {
            any = true;
            continue;
        }
        // SAFETY: ORIGINAL is only written here and in `uninstall`, under LOCK and the GIL;
        // the wrappers read it through `ctx` only after `set` publishes them.
        let slot = unsafe {
            let base = &raw mut ORIGINAL;
            (*base)[i] = cur;
            (base as *mut PyMemAllocatorEx).add(i)
        };
        let Some(mut table) = wrapper_table(slot as *mut c_void) else {
            return false;
        };
        // SAFETY: as above.
        unsafe { set(*domain, &mut table) };
        any = true;
    }
    any
}

/// Puts the wrapped allocators back where the wrappers are still installed. The caller holds
/// the GIL.
pub fn uninstall() {
    let Some((get, set)) = python_api() else {
        return;
    };
    let Ok(_l) = LOCK.lock() else { return };
    for (i, domain) in DOMAINS.iter().enumerate() {
        let mut cur = EMPTY;
        // SAFETY: a valid out-pointer; the GIL is held.
        unsafe { get(*domain, &mut cur) };
        if cur.malloc.map(|f| f as usize) != Some(WRAPPERS[0].load(Ordering::Acquire)) {
            continue;
        }
        // SAFETY: ORIGINAL[i] was saved by `install` for this domain.
        let mut orig = unsafe {
            (&raw const ORIGINAL)
                .cast::<PyMemAllocatorEx>()
                .add(i)
                .read()
        };
        // SAFETY: the GIL is held.
        unsafe { set(*domain, &mut orig) };
    }
}

/// Has the interpreter's main thread wrap (`later(true)`) or unwrap (`later(false)`) the
/// domains at its next check for pending calls, under the GIL: for a caller without the GIL
/// (an attach's injected call, the writer thread). `Py_AddPendingCall` needs neither the GIL
/// nor a thread state. False when the process is not a running CPython or the call could not
/// be queued.
pub fn later(wrap: bool) -> bool {
    type AddPendingCall =
        unsafe extern "C" fn(extern "C" fn(*mut c_void) -> c_int, *mut c_void) -> c_int;
    if python_api().is_none() {
        return false;
    }
    // SAFETY: dlsym with a valid name; the function has this signature in every CPython 3.
    let add = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"Py_AddPendingCall".as_ptr()) };
    if add.is_null() {
        return false;
    }
    // SAFETY: as above.
    let add = unsafe { std::mem::transmute::<*mut c_void, AddPendingCall>(add) };
    extern "C" fn run(arg: *mut c_void) -> c_int {
        let Some(_g) = crate::guard::IgnoreAllocs::enter() else {
            return 0;
        };
        if !arg.is_null() {
            // Only while the recording that asked for it still runs.
            if crate::lifecycle::is_recording() {
                crate::inproc::pymalloc_installed(install());
            }
        } else {
            uninstall();
        }
        0
    }
    let arg = if wrap {
        std::ptr::dangling_mut::<c_void>()
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: `run` never unwinds and ignores its argument beyond null or not.
    unsafe { add(run, arg) == 0 }
}
