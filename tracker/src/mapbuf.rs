//! Chunk buffers mapped directly from the kernel. The tracker's large buffers never come from the
//! program's malloc: that would share (and fragment) the program's arenas, and glibc moves its
//! mmap threshold when a large block is freed, which would change how the program's own large
//! allocations are served.

use memtrack_format::ByteSink;

/// Bytes per buffer: a thread hands its chunk over at `FLUSH_AT` (256 KiB); one event, stack
/// nodes included, never needs more than the rest.
pub(crate) const MAP_CAP: usize = 320 * 1024;

pub(crate) struct MapBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone.
unsafe impl Send for MapBuf {}

impl MapBuf {
    /// A fresh mapping, or None when the kernel refuses one.
    pub(crate) fn new() -> Option<MapBuf> {
        // SAFETY: an anonymous private mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_CAP,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(MapBuf {
            ptr: p as *mut u8,
            len: 0,
        })
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Sets the length to `n` zero bytes (n <= MAP_CAP).
    pub(crate) fn zeroed(&mut self, n: usize) {
        let n = n.min(MAP_CAP);
        // SAFETY: n bytes within the mapping.
        unsafe { std::ptr::write_bytes(self.ptr, 0, n) };
        self.len = n;
    }

    /// Room left.
    #[inline]
    pub(crate) fn spare(&self) -> usize {
        MAP_CAP - self.len
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the mapping are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Bytes written after a buffer's end; `commit` makes them part of it. One event is written
/// this way, with its length kept in a register rather than stored per byte.
pub(crate) struct Tail<'a> {
    room: &'a mut [u8],
    n: usize,
    len: &'a mut usize,
}

impl MapBuf {
    #[inline(always)]
    pub(crate) fn tail(&mut self) -> Tail<'_> {
        // SAFETY: the bytes from len to MAP_CAP lie inside the mapping, are owned by this value
        // and are not otherwise borrowed while the Tail (which borrows self) lives.
        let room =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.add(self.len), MAP_CAP - self.len) };
        Tail {
            room,
            n: 0,
            len: &mut self.len,
        }
    }
}

impl Tail<'_> {
    #[inline(always)]
    pub(crate) fn commit(self) {
        *self.len += self.n;
    }
}

impl ByteSink for Tail<'_> {
    /// Bytes past the buffer's end are dropped (callers check `spare` first), as in `MapBuf`.
    #[inline(always)]
    fn push_byte(&mut self, b: u8) {
        if let Some(slot) = self.room.get_mut(self.n) {
            *slot = b;
            self.n += 1;
        }
    }

    #[inline(always)]
    fn push_slice(&mut self, s: &[u8]) {
        for &b in s {
            self.push_byte(b);
        }
    }

    /// A varint in one store when 8 bytes are left (the room checked before each event
    /// guarantees it): no loop whose trip count, the varint's length, varies from event to
    /// event. One and two bytes (counts, sizes, stack ids) directly; longer ones (address
    /// deltas) as a word from `uvarint_word`.
    #[inline(always)]
    fn push_uvarint(&mut self, v: u64) {
        let Some(dst) = self.room.get_mut(self.n..self.n + 8) else {
            return memtrack_format::push_uvarint_bytewise(self, v);
        };
        let (w, len) = if v < 0x80 {
            (v, 1)
        } else if v < 0x4000 {
            ((v & 0x7f) | 0x80 | (v >> 7) << 8, 2)
        } else {
            match memtrack_format::uvarint_word(v) {
                Some(x) => x,
                None => return memtrack_format::push_uvarint_bytewise(self, v),
            }
        };
        dst.copy_from_slice(&w.to_le_bytes());
        self.n += len;
    }
}

impl ByteSink for MapBuf {
    #[inline]
    fn push_byte(&mut self, b: u8) {
        // A full buffer drops bytes rather than overrun; callers check `spare` first, so this
        // never happens in practice (and a chunk cut short decodes as damaged, not as UB).
        if self.len < MAP_CAP {
            // SAFETY: len < MAP_CAP, inside the mapping.
            unsafe { *self.ptr.add(self.len) = b };
            self.len += 1;
        }
    }

    /// With room for the longest varint, its bytes go out with one check and one update of
    /// the length (stack nodes' Python frame ids take ten bytes each).
    #[inline]
    fn push_uvarint(&mut self, mut v: u64) {
        if MAP_CAP - self.len < 10 {
            return memtrack_format::push_uvarint_bytewise(self, v);
        }
        let mut n = self.len;
        // SAFETY: a u64 takes at most 10 bytes, and 10 bytes from len lie inside the mapping.
        unsafe {
            while v >= 0x80 {
                *self.ptr.add(n) = (v as u8) | 0x80;
                v >>= 7;
                n += 1;
            }
            *self.ptr.add(n) = v as u8;
        }
        self.len = n + 1;
    }

    #[inline]
    fn push_slice(&mut self, s: &[u8]) {
        let n = s.len().min(MAP_CAP - self.len);
        // SAFETY: n bytes fit after len; source and mapping do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), self.ptr.add(self.len), n) };
        self.len += n;
    }
}

impl Drop for MapBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, MAP_CAP) };
    }
}
