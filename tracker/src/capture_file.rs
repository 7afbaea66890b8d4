//! The capture file: creating or reopening it, every write to it, the `END` record, and what
//! happens on a write error (recording stops, one line on stderr, the file stays readable up to
//! its last complete record).
//!
//! Must never: write to a descriptor that is no longer the capture (a program may close every
//! descriptor and get ours back for a file of its own), or allocate on a write error (any
//! thread may meet one).

use crate::guard::SaveErrno;
use crate::lifecycle;
use memtrack_format::EndRecord;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The open capture: its descriptor, and the file it must still be.
pub(crate) struct CaptureFile {
    fd: i32,
    /// (st_dev, st_ino) of the capture: a program that closes every descriptor and opens
    /// another file that gets our number must never receive capture bytes. Changed only by
    /// [`CaptureFile::compact`], on the thread that does every write.
    dev: AtomicU64,
    ino: AtomicU64,
}

impl CaptureFile {
    /// Takes over `fd`, moved to a number out of the way of the program's own low ones.
    pub(crate) fn adopt(fd: i32) -> Option<CaptureFile> {
        // SAFETY: fcntl/close on the descriptor we own.
        let fd = unsafe {
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 512);
            if high >= 0 {
                libc::close(fd);
                high
            } else {
                fd
            }
        };
        let (dev, ino) = file_id(fd)?;
        Some(CaptureFile {
            fd,
            dev: AtomicU64::new(dev),
            ino: AtomicU64::new(ino),
        })
    }

    fn id(&self) -> (u64, u64) {
        (
            self.dev.load(Ordering::Relaxed),
            self.ino.load(Ordering::Relaxed),
        )
    }

    /// Bytes in the capture now.
    pub(crate) fn size(&self) -> Option<u64> {
        file_size(self.fd)
    }

    /// Rewrites the capture without the byte ranges `drop` (sorted, not overlapping): a copy
    /// beside it, renamed over it, then put in place of our descriptor. A kill at any moment
    /// leaves a whole capture at the path (the old one until the rename, the new one after).
    /// The caller is the only thread writing. False when it could not (the capture is then
    /// unchanged and still written).
    pub(crate) fn compact(&self, drop: &[(u64, u64)]) -> bool {
        let _errno = SaveErrno::new();
        let Some(path) = self_path(self.fd) else {
            return false;
        };
        let Some(size) = self.size() else {
            return false;
        };
        let mut tmp = path.clone();
        let name_at = tmp.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        tmp.splice(name_at..name_at, b".".iter().copied());
        tmp.extend_from_slice(b".compacting\0");
        let mut cpath = path;
        cpath.push(0);
        // SAFETY: open with NUL-terminated paths; O_NOFOLLOW: never a symlink planted there.
        let src = unsafe {
            libc::open(
                cpath.as_ptr().cast(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if src < 0 {
            return false;
        }
        let same = file_id(src) == Some(self.id());
        // SAFETY: as above; O_EXCL: a leftover of a killed compaction is removed first.
        let dst = unsafe {
            libc::unlink(tmp.as_ptr().cast());
            libc::open(
                tmp.as_ptr().cast(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_APPEND | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        let ok = same && dst >= 0 && copy_except(src, dst, size, drop) && {
            // SAFETY: fdatasync on our own new file: its bytes are on disk before the rename
            // makes it the capture.
            unsafe { libc::fdatasync(dst) == 0 }
        };
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(src) };
        if !ok {
            if dst >= 0 {
                // SAFETY: removing our own half-written copy.
                unsafe {
                    libc::close(dst);
                    libc::unlink(tmp.as_ptr().cast());
                }
            }
            return false;
        }
        lock_while_writing(dst);
        let Some((dev, ino)) = file_id(dst) else {
            // SAFETY: as above.
            unsafe {
                libc::close(dst);
                libc::unlink(tmp.as_ptr().cast());
            }
            return false;
        };
        // SAFETY: rename of our own copy over the capture; dup3 puts it at our descriptor
        // number atomically (no moment without a capture descriptor), then the copy's own
        // number is closed.
        unsafe {
            if libc::rename(tmp.as_ptr().cast(), cpath.as_ptr().cast()) != 0 {
                libc::close(dst);
                libc::unlink(tmp.as_ptr().cast());
                return false;
            }
            if libc::dup3(dst, self.fd, libc::O_CLOEXEC) < 0 {
                // The path holds the copy, our descriptor the unlinked original: keep writing
                // there would lose the bytes, so recording stops.
                libc::close(dst);
                if lifecycle::disable() {
                    crate::env::stderr_bytes(
                        b"memtrack: compacting the capture failed; recording stopped\n",
                    );
                }
                return false;
            }
            libc::close(dst);
        }
        self.dev.store(dev, Ordering::Relaxed);
        self.ino.store(ino, Ordering::Relaxed);
        true
    }

    /// Writes framed bytes to the capture, if the descriptor still is the capture. False when
    /// they were not written (recording has stopped then).
    pub(crate) fn write(&self, bytes: &[u8]) -> bool {
        if file_id(self.fd) != Some(self.id()) {
            if lifecycle::disable() {
                crate::env::stderr_bytes(
                    b"memtrack: the program closed the capture file's descriptor; recording stopped\n",
                );
            }
            return false;
        }
        write_all(self.fd, bytes)
    }

    /// Writes the `END` record, the capture's last.
    pub(crate) fn write_end(&self, end: &EndRecord) -> bool {
        self.write(&end.encode_framed())
    }
}

/// Copies `[0, size)` of `src` to `dst` but the ranges `drop`.
fn copy_except(src: i32, dst: i32, size: u64, drop: &[(u64, u64)]) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0u64;
    let mut keep = |from: u64, to: u64| -> bool {
        let mut off = from;
        while off < to {
            let want = ((to - off) as usize).min(buf.len());
            // SAFETY: pread into our buffer of at least `want` bytes.
            let n = unsafe { libc::pread(src, buf.as_mut_ptr().cast(), want, off as libc::off_t) };
            if n <= 0 {
                return false;
            }
            if !write_quiet(dst, &buf[..n as usize]) {
                return false;
            }
            off += n as u64;
        }
        true
    };
    for &(start, len) in drop {
        if start < at || !keep(at, start.min(size)) {
            return false;
        }
        at = start.saturating_add(len);
    }
    at <= size && keep(at, size)
}

/// `write_all` without its side effects (an error here only abandons a compaction).
fn write_quiet(fd: i32, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: bytes is a valid slice; fd is the tracker's own file.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            // SAFETY: errno of this thread.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// The path the descriptor's file has now (None once it was deleted).
fn self_path(fd: i32) -> Option<Vec<u8>> {
    let link = format!("/proc/self/fd/{fd}\0");
    let mut buf = vec![0u8; 4096];
    // SAFETY: readlink into our buffer, its length given.
    let n = unsafe { libc::readlink(link.as_ptr().cast(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 || n as usize >= buf.len() {
        return None;
    }
    buf.truncate(n as usize);
    (buf.first() == Some(&b'/') && !buf.ends_with(b" (deleted)")).then_some(buf)
}

fn file_size(fd: i32) -> Option<u64> {
    // SAFETY: st is a valid out-pointer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor number; fails cleanly when it is closed.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_size as u64)
}

fn file_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: st is a valid out-pointer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor number; fails cleanly when it is closed.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// Creates a new capture at `path` (never an existing file: the first process to claim the
/// name records) and returns its descriptor, locked while written.
pub(crate) fn create(path: &str) -> std::io::Result<i32> {
    let cpath = std::ffi::CString::new(path)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open with a valid path; O_EXCL: the first process to claim the name records (and
    // a symlink planted at the path is never followed).
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    lock_while_writing(fd);
    Ok(fd)
}

/// Opens the existing capture at `path` for appending (an image after `exec` continues it).
pub(crate) fn reopen(path: &str) -> Option<i32> {
    let cpath = std::ffi::CString::new(path).ok()?;
    // SAFETY: open with a valid path.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return None;
    }
    lock_while_writing(fd);
    Some(fd)
}

/// Holds an advisory lock on the capture for as long as the process has it open, so that a
/// reader (`memtrack summary`) can tell a capture still being written from one whose writer
/// died: the kernel drops the lock with the last descriptor. Shared: after an exec the new
/// image locks again while a forked child may still hold the old descriptor. Best effort:
/// the result is ignored, errno kept.
fn lock_while_writing(fd: i32) {
    let _errno = SaveErrno::new();
    // SAFETY: flock on the descriptor the tracker just opened; LOCK_NB: never blocks. The lock
    // is on the tracker's own file, which the program does not use.
    unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
}

/// Writes all of `bytes` to `fd`. On a write error recording stops (the file stays readable up
/// to its last complete record) and one line goes to stderr.
pub(crate) fn write_all(fd: i32, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: bytes is a valid slice; fd is the capture file opened by the tracker.
        let n = unsafe { libc::write(fd, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
        if n < 0 {
            // SAFETY: errno of this thread.
            let e = unsafe { *libc::__errno_location() };
            if e == libc::EINTR {
                continue;
            }
            if lifecycle::disable() {
                write_failed(e);
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// What `errno` means, for the errors a write can end with, in C's words; else "errno N" in
/// `buf`. Not strerror: it translates through gettext, which outside the C locale reads LANGUAGE
/// from the environment, and the program may be rewriting its environment meanwhile (see
/// `stack::prepare_writer_thread`).
fn errno_text(errno: i32, buf: &mut [u8; 24]) -> &[u8] {
    match errno {
        libc::EFBIG => b"File too large",
        libc::ENOSPC => b"No space left on device",
        libc::EDQUOT => b"Disk quota exceeded",
        libc::EIO => b"Input/output error",
        libc::EROFS => b"Read-only file system",
        libc::EBADF => b"Bad file descriptor",
        libc::EPIPE => b"Broken pipe",
        libc::EINVAL => b"Invalid argument",
        libc::EPERM => b"Operation not permitted",
        libc::EACCES => b"Permission denied",
        libc::ENXIO => b"No such device or address",
        libc::EAGAIN => b"Resource temporarily unavailable",
        libc::ESTALE => b"Stale file handle",
        _ => {
            // core::fmt into the buffer: no allocation, no locale.
            let left = {
                let mut w = &mut buf[..];
                let _ = write!(w, "errno {}", errno.unsigned_abs());
                w.len()
            };
            &buf[..buf.len() - left]
        }
    }
}

/// One line on stderr saying why recording stopped; no allocation (any thread may get here).
fn write_failed(errno: i32) {
    let mut number = [0u8; 24];
    let reason = errno_text(errno, &mut number);
    let parts: [&[u8]; 3] = [
        b"memtrack: writing the capture failed (",
        reason,
        b"); recording stopped, the program goes on untracked\n",
    ];
    for p in parts {
        // SAFETY: plain writes of byte slices to stderr.
        unsafe { libc::write(2, p.as_ptr() as *const libc::c_void, p.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table says what C's strerror says in the C locale (this process never sets one).
    #[test]
    fn errno_texts_are_cs_own() {
        let mut buf = [0u8; 24];
        for e in [
            libc::EFBIG,
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EIO,
            libc::EROFS,
            libc::EBADF,
            libc::EPIPE,
            libc::EINVAL,
            libc::EPERM,
            libc::EACCES,
            libc::ENXIO,
            libc::EAGAIN,
            libc::ESTALE,
        ] {
            // SAFETY: strerror returns a NUL-terminated string; this test is single-threaded
            // in its use of it.
            let c = unsafe { std::ffi::CStr::from_ptr(libc::strerror(e)) };
            assert_eq!(errno_text(e, &mut buf), c.to_bytes(), "errno {e}");
        }
        assert_eq!(errno_text(1234, &mut buf), b"errno 1234");
        assert_eq!(errno_text(0, &mut buf), b"errno 0");
        assert_eq!(errno_text(i32::MIN, &mut buf), b"errno 2147483648");
    }
}
