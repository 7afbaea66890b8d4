//! Resident memory samples: the writer thread reads `/proc/self/statm` at most every
//! [`SAMPLE_EVERY_US`] and writes an `RSS` record when the value changed (and once before
//! `END`). Nothing here runs on a program thread or allocates: the file is opened once (by the
//! writer thread of the process it describes) and read with `pread` into a stack buffer.
//!
//! Must never: read a descriptor that is no longer ours (a program may close every descriptor
//! and reuse the number), or say anything: any error turns sampling off silently.

/// The shortest interval between two samples, in clock units (microseconds).
pub(crate) const SAMPLE_EVERY_US: u64 = 10_000;

/// The open `/proc/self/statm` and the last sample written.
pub(crate) struct RssSampler {
    /// -1: sampling is off.
    fd: i32,
    /// (st_dev, st_ino) of the file: the descriptor must still be it.
    id: (u64, u64),
    page_size: u64,
    /// The clock time of the last read.
    last_read: Option<u64>,
    /// The value of the last record written.
    last_written: Option<u64>,
}

impl RssSampler {
    /// Opens `/proc/self/statm` of the calling process (off when it cannot).
    pub(crate) fn open() -> RssSampler {
        let mut s = RssSampler {
            fd: -1,
            id: (0, 0),
            page_size: 0,
            last_read: None,
            last_written: None,
        };
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page <= 0 {
            return s;
        }
        // SAFETY: a NUL-terminated path; open/fcntl/close on descriptors this function owns.
        let fd = unsafe {
            let fd = libc::open(
                c"/proc/self/statm".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return s;
            }
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 512);
            if high >= 0 {
                libc::close(fd);
                high
            } else {
                fd
            }
        };
        match file_id(fd) {
            Some(id) => {
                s.fd = fd;
                s.id = id;
                s.page_size = page as u64;
            }
            None => {
                // SAFETY: our own descriptor.
                unsafe { libc::close(fd) };
            }
        }
        s
    }

    /// A sample to write at clock time `now`, if one is due (at least [`SAMPLE_EVERY_US`] since
    /// the last read) and the value changed since the last one written; every time when
    /// `force`. The caller writes it, then calls [`RssSampler::written`].
    pub(crate) fn due(&mut self, now: u64, force: bool) -> Option<u64> {
        if self.fd < 0 {
            return None;
        }
        if !force {
            if let Some(t) = self.last_read {
                if now.saturating_sub(t) < SAMPLE_EVERY_US {
                    return None;
                }
            }
        }
        self.last_read = Some(now);
        let Some(rss) = self.read() else {
            self.off();
            return None;
        };
        (force || self.last_written != Some(rss)).then_some(rss)
    }

    /// The sample `rss` was written.
    pub(crate) fn written(&mut self, rss: u64) {
        self.last_written = Some(rss);
    }

    /// Resident bytes now (None: the file is not ours any more, or unreadable).
    fn read(&self) -> Option<u64> {
        if file_id(self.fd) != Some(self.id) {
            return None;
        }
        let mut buf = [0u8; 128];
        // SAFETY: buf is valid for buf.len() bytes; pread leaves the offset alone.
        let n = unsafe { libc::pread(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return None;
        }
        let pages = resident_pages(buf.get(..n as usize)?)?;
        pages.checked_mul(self.page_size)
    }

    /// Sampling off for good.
    pub(crate) fn off(&mut self) {
        if self.fd >= 0 && file_id(self.fd) == Some(self.id) {
            // SAFETY: the descriptor is still the file we opened.
            unsafe { libc::close(self.fd) };
        }
        self.fd = -1;
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.off();
    }
}

/// The second field of `statm` (resident pages): `size resident shared text lib data dt`.
fn resident_pages(text: &[u8]) -> Option<u64> {
    let mut fields = text
        .split(|&b| b == b' ' || b == b'\n')
        .filter(|f| !f.is_empty());
    fields.next()?;
    let f = fields.next()?;
    let mut v: u64 = 0;
    for &b in f {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    (!f.is_empty()).then_some(v)
}

fn file_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: st is a valid out-pointer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor number; fails cleanly when it is closed.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_gives_its_second_field() {
        assert_eq!(resident_pages(b"4321 1234 200 10 0 300 0\n"), Some(1234));
        assert_eq!(resident_pages(b"4321"), None);
        assert_eq!(resident_pages(b"4321 12x4 0\n"), None);
    }

    #[test]
    fn a_sample_is_written_when_it_changes_and_always_when_forced() {
        let mut s = RssSampler::open();
        let first = s.due(0, false).expect("statm readable");
        // The test process's own resident memory, in pages of at least 4 KiB.
        assert!(first >= 4096 && first.is_multiple_of(4096), "{first}");
        s.written(first);
        // Too soon for another read.
        assert_eq!(s.due(SAMPLE_EVERY_US - 1, false), None);
        // Forced: written even when unchanged.
        assert!(s.due(SAMPLE_EVERY_US - 1, true).is_some());
        // Touch 8 MiB: resident memory grows, so the next due read has a new value.
        let block = std::hint::black_box(vec![1u8; 8 << 20]);
        let later = s.due(3 * SAMPLE_EVERY_US, false).expect("changed");
        assert!(later >= 8 << 20, "{first} -> {later}");
        assert_eq!(std::hint::black_box(&block)[(4 << 20) + 1], 1);
    }
}
