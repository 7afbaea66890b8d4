//! `libmemtrack.so`: the `LD_PRELOAD` shim. Only `extern "C"` exports live here; each
//! forwards to `memtrack_tracker::interpose`, so no library that programs link exports
//! `malloc`. A panic cannot unwind out of these functions: Rust aborts at an `extern "C"`
//! boundary, and the tracker does not panic on its paths.

use memtrack_tracker::interpose as ip;
use std::os::raw::{c_char, c_int, c_void};

/// # Safety
/// C `malloc`.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::malloc(size) }
}

/// # Safety
/// C `free`.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { ip::free(p) }
}

/// # Safety
/// C `cfree` (obsolete alias of free).
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { ip::free(p) }
}

/// # Safety
/// C `calloc`.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, m: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::calloc(n, m) }
}

/// # Safety
/// C `realloc`.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::realloc(p, size) }
}

/// # Safety
/// C `reallocarray`.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, m: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::reallocarray(p, n, m) }
}

/// # Safety
/// C `posix_memalign`.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::posix_memalign(out, align, size) }
}

/// # Safety
/// C `aligned_alloc`.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::aligned_alloc(align, size) }
}

/// # Safety
/// C `memalign`.
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::memalign(align, size) }
}

/// # Safety
/// C `valloc`.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::valloc(size) }
}

/// # Safety
/// C `pvalloc`.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { ip::pvalloc(size) }
}

/// # Safety
/// C `malloc_usable_size`.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: same contract.
    unsafe { ip::malloc_usable_size(p) }
}

/// # Safety
/// C `dlclose`.
#[no_mangle]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::dlclose(handle) }
}

/// # Safety
/// C `execve`.
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execve(path, argv, envp) }
}

/// # Safety
/// C `execv`.
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execv(path, argv) }
}

/// # Safety
/// C `execvp`.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execvp(file, argv) }
}

/// # Safety
/// C `execvpe`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execvpe(file, argv, envp) }
}

/// # Safety
/// C `fexecve`.
#[no_mangle]
pub unsafe extern "C" fn fexecve(
    fd: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::fexecve(fd, argv, envp) }
}

/// # Safety
/// C `_exit`.
#[no_mangle]
pub unsafe extern "C" fn _exit(status: c_int) -> ! {
    // SAFETY: same contract.
    unsafe { ip::exit_now(status, false) }
}

/// # Safety
/// C `_Exit`.
#[no_mangle]
pub unsafe extern "C" fn _Exit(status: c_int) -> ! {
    // SAFETY: same contract.
    unsafe { ip::exit_now(status, true) }
}

extern "C" fn memtrack_constructor() {
    ip::constructor();
}

extern "C" fn memtrack_destructor() {
    ip::destructor();
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = memtrack_constructor;

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = memtrack_destructor;
