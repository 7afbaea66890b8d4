//! The real functions the hooks stand in for, found with `dlsym(RTLD_NEXT, ..)`, so a program
//! that links another allocator keeps it.
//!
//! Must never: call anything that may allocate before the table is filled (`dlsym` itself may
//! call `calloc`, which the bootstrap arena serves meanwhile).

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// A function of the C library that a hook forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Real {
    Malloc,
    Free,
    Calloc,
    Realloc,
    ReallocArray,
    PosixMemalign,
    AlignedAlloc,
    Memalign,
    Valloc,
    Pvalloc,
    UsableSize,
    Dlclose,
    Execve,
    Execv,
    Execvp,
    Execvpe,
    Fexecve,
    /// `_exit`.
    ExitNow,
    /// `_Exit`.
    ExitNowUpper,
    Abort,
    Mmap,
    Munmap,
    Mremap,
    Dlopen,
}

const COUNT: usize = Real::Dlopen as usize + 1;

impl Real {
    const ALL: [Real; COUNT] = [
        Real::Malloc,
        Real::Free,
        Real::Calloc,
        Real::Realloc,
        Real::ReallocArray,
        Real::PosixMemalign,
        Real::AlignedAlloc,
        Real::Memalign,
        Real::Valloc,
        Real::Pvalloc,
        Real::UsableSize,
        Real::Dlclose,
        Real::Execve,
        Real::Execv,
        Real::Execvp,
        Real::Execvpe,
        Real::Fexecve,
        Real::ExitNow,
        Real::ExitNowUpper,
        Real::Abort,
        Real::Mmap,
        Real::Munmap,
        Real::Mremap,
        Real::Dlopen,
    ];

    /// The C symbol.
    const fn name(self) -> &'static CStr {
        match self {
            Real::Malloc => c"malloc",
            Real::Free => c"free",
            Real::Calloc => c"calloc",
            Real::Realloc => c"realloc",
            Real::ReallocArray => c"reallocarray",
            Real::PosixMemalign => c"posix_memalign",
            Real::AlignedAlloc => c"aligned_alloc",
            Real::Memalign => c"memalign",
            Real::Valloc => c"valloc",
            Real::Pvalloc => c"pvalloc",
            Real::UsableSize => c"malloc_usable_size",
            Real::Dlclose => c"dlclose",
            Real::Execve => c"execve",
            Real::Execv => c"execv",
            Real::Execvp => c"execvp",
            Real::Execvpe => c"execvpe",
            Real::Fexecve => c"fexecve",
            Real::ExitNow => c"_exit",
            Real::ExitNowUpper => c"_Exit",
            Real::Abort => c"abort",
            Real::Mmap => c"mmap",
            Real::Munmap => c"munmap",
            Real::Mremap => c"mremap",
            Real::Dlopen => c"dlopen",
        }
    }

    /// The function's address, resolving the table on first use; 0 while it is being filled
    /// (or when the symbol does not exist).
    #[inline(always)]
    pub(crate) fn addr(self) -> usize {
        let f = TABLE[self as usize].load(Ordering::Acquire);
        if f != 0 {
            return f;
        }
        resolve();
        TABLE[self as usize].load(Ordering::Acquire)
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const NONE: AtomicUsize = AtomicUsize::new(0);
static TABLE: [AtomicUsize; COUNT] = [NONE; COUNT];
/// 0: not resolved, 1: being resolved, 2: resolved.
static RESOLVE: AtomicU8 = AtomicU8::new(0);

/// Fills the table, once (later calls, and calls made while it is being filled, return at once).
/// Preloaded, the real functions are the next definitions after this library.
#[cold]
pub(crate) fn resolve() {
    resolve_with(libc::RTLD_NEXT);
}

/// Fills the table with the functions the process itself uses ([`process_definition`]): the
/// library was loaded into a running process, where the relocation slots it redirects were
/// bound to these (the program's own allocator, if it exports one, else libc's).
#[cold]
pub(crate) fn resolve_default() {
    resolve_with(std::ptr::null_mut());
}

/// `handle` null: each function's [`process_definition`]; else `dlsym(handle, ..)`.
fn resolve_with(handle: *mut c_void) {
    if RESOLVE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    for real in Real::ALL {
        let f = if handle.is_null() {
            process_definition(real.name())
        } else {
            // SAFETY: dlsym with a valid NUL-terminated name.
            unsafe { libc::dlsym(handle, real.name().as_ptr()) as usize }
        };
        TABLE[real as usize].store(f, Ordering::Release);
    }
    RESOLVE.store(2, Ordering::Release);
}

/// The definition of `name` the process's code calls: `dlsym(RTLD_DEFAULT)`, unless that is
/// an address of the main program that is no symbol of its own, i.e. the canonical PLT entry a
/// non-PIE program gives a function whose address it takes (calling that entry jumps through
/// the program's own relocation slot, which recording redirects to the hook: the hook would
/// call itself). Then the next definition after this library (libc's). Never this library's
/// own function.
pub(crate) fn process_definition(name: &CStr) -> usize {
    // SAFETY: dlsym/dladdr with valid arguments and out-pointers.
    unsafe {
        let d = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        let next = || libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize;
        if d.is_null() {
            return next();
        }
        let mut at: libc::Dl_info = std::mem::zeroed();
        let mut own: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(d, &mut at) == 0
            || libc::dladdr(process_definition as *const () as *const c_void, &mut own) == 0
        {
            return next();
        }
        if at.dli_fbase == own.dli_fbase {
            return next();
        }
        let main = libc::dlopen(std::ptr::null(), libc::RTLD_LAZY);
        let mut in_main = false;
        if !main.is_null() {
            let mut map: *mut c_void = std::ptr::null_mut();
            // RTLD_DI_LINKMAP: the main program's link map, whose l_addr (its first field) is
            // its load bias; the module of `d` is the main program when dladdr's base is the
            // one of any address of it: compare with the address of its _DYNAMIC via the map.
            if libc::dlinfo(
                main,
                libc::RTLD_DI_LINKMAP,
                &mut map as *mut _ as *mut c_void,
            ) == 0
                && !map.is_null()
            {
                let lm = map as *const LinkMapHead;
                let mut dynamic: libc::Dl_info = std::mem::zeroed();
                in_main = libc::dladdr((*lm).l_ld as *const c_void, &mut dynamic) != 0
                    && dynamic.dli_fbase == at.dli_fbase;
            }
            libc::dlclose(main);
        }
        if in_main && at.dli_saddr != d {
            return next();
        }
        d as usize
    }
}

/// The public head of glibc's `struct link_map`.
#[repr(C)]
struct LinkMapHead {
    l_addr: usize,
    l_name: *const c_char,
    l_ld: *const c_void,
}

/// `Some(f)`, the real function as a typed pointer, or `None` while the table is being filled.
macro_rules! real_fn {
    ($real:expr, $t:ty) => {{
        let f = $crate::real::Real::addr($real);
        // SAFETY: the table holds, for each `Real`, the address dlsym returned for its symbol,
        // whose C signature is $t; zero (not resolved yet) is checked before the call.
        (f != 0).then(|| unsafe { std::mem::transmute::<usize, $t>(f) })
    }};
}
pub(crate) use real_fn;

pub(crate) type Malloc = unsafe extern "C" fn(usize) -> *mut c_void;
pub(crate) type Free = unsafe extern "C" fn(*mut c_void);
pub(crate) type Calloc = unsafe extern "C" fn(usize, usize) -> *mut c_void;
pub(crate) type Realloc = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
pub(crate) type ReallocArray = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
pub(crate) type PosixMemalign = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
pub(crate) type Memalign = unsafe extern "C" fn(usize, usize) -> *mut c_void;
pub(crate) type UsableSize = unsafe extern "C" fn(*mut c_void) -> usize;
pub(crate) type Dlclose = unsafe extern "C" fn(*mut c_void) -> c_int;
pub(crate) type Execve =
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
pub(crate) type Execv = unsafe extern "C" fn(*const c_char, *const *const c_char) -> c_int;
pub(crate) type Fexecve =
    unsafe extern "C" fn(c_int, *const *const c_char, *const *const c_char) -> c_int;
pub(crate) type Exit = unsafe extern "C" fn(c_int) -> !;
pub(crate) type Abort = unsafe extern "C" fn() -> !;
pub(crate) type Mmap =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
pub(crate) type Dlopen = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
pub(crate) type Munmap = unsafe extern "C" fn(*mut c_void, usize) -> c_int;
pub(crate) type Mremap = unsafe extern "C" fn(*mut c_void, usize, usize, c_int, ...) -> *mut c_void;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_function_in_order() {
        for (i, r) in Real::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert!(Real::ALL.iter().all(|r| !r.name().is_empty()));
    }
}
