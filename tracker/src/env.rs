//! The process environment and stderr, read and written without allocating.

use std::ffi::CStr;
use std::os::raw::c_void;

/// The value of `name`, if set. The C library's `getenv`: no allocation, no lock.
pub(crate) fn getenv(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: getenv with a NUL-terminated name; the result lives as long as the environment.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: non-null results of getenv are NUL-terminated strings.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

/// Writes `msg` to stderr with one `write` (nothing buffered, nothing allocated).
pub(crate) fn stderr_bytes(msg: &[u8]) {
    // SAFETY: plain write of a byte slice to fd 2.
    unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
}
