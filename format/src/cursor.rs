//! Reading encoded bytes: [`Cursor`], whose every read fails with an error rather than panicking
//! when the data ends early or is damaged.

use crate::FormatError;

/// A cursor over encoded bytes. Every read fails with [`FormatError::Truncated`] rather than
/// panicking when the data ends early.
#[derive(Clone, Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }
    /// A cursor at `pos` (at most `data.len()`).
    pub(crate) fn at(data: &'a [u8], pos: usize) -> Self {
        Cursor {
            data,
            pos: pos.min(data.len()),
        }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }

    #[inline]
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        let b = *self.data.get(self.pos).ok_or(FormatError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub fn uvarint(&mut self) -> Result<u64, FormatError> {
        // Most values fit one byte.
        if let Some(&b) = self.data.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(b as u64);
            }
        }
        self.uvarint_slow()
    }

    #[inline]
    pub(crate) fn uvarint_slow(&mut self) -> Result<u64, FormatError> {
        // Up to 8 bytes (56 bits) from one load: addresses and their deltas take 2 to 6.
        if let Some(b) = self.data.get(self.pos..self.pos + 8) {
            let w = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            if let Some(x) = self.squeeze(w) {
                return Ok(x);
            }
        }
        self.uvarint_bytewise()
    }

    /// A varint from the 8 bytes at the position, `w` (read little-endian), when it ends
    /// among them; the position moves past it.
    #[inline(always)]
    fn squeeze(&mut self, w: u64) -> Option<u64> {
        let stops = !w & 0x8080_8080_8080_8080;
        if stops == 0 {
            return None;
        }
        let bits = stops.trailing_zeros() + 1; // through the last byte's stop bit
        self.pos += (bits / 8) as usize;
        let mut x = w & (u64::MAX >> (64 - bits));
        // Squeeze out the continuation bits: 7-bit groups to 14, 28, then 56 bits.
        x = ((x & 0x7f00_7f00_7f00_7f00) >> 1) | (x & 0x007f_007f_007f_007f);
        x = ((x & 0x3fff_0000_3fff_0000) >> 2) | (x & 0x0000_3fff_0000_3fff);
        x = ((x & 0x0fff_ffff_0000_0000) >> 4) | (x & 0x0000_0000_0fff_ffff);
        Some(x)
    }

    /// `uvarint` with one 8-byte load and no bounds check on the way (a stream's items are read
    /// so while far from its end).
    ///
    /// # Safety
    /// At least 8 bytes from the position are in the data.
    #[inline(always)]
    pub(crate) unsafe fn uvarint_unchecked(&mut self) -> Result<u64, FormatError> {
        debug_assert!(self.remaining() >= 8);
        // SAFETY: the caller's guarantee; an unaligned read of plain bytes.
        let w = u64::from_le(unsafe {
            std::ptr::read_unaligned(self.data.as_ptr().add(self.pos) as *const u64)
        });
        if w & 0x80 == 0 {
            self.pos += 1;
            return Ok(w & 0x7f);
        }
        match self.squeeze(w) {
            Some(x) => Ok(x),
            None => self.uvarint_bytewise(),
        }
    }

    #[cold]
    fn uvarint_bytewise(&mut self) -> Result<u64, FormatError> {
        let mut v: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(FormatError::BadVarint);
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(FormatError::BadVarint);
            }
        }
    }

    #[inline]
    pub fn ivarint(&mut self) -> Result<i64, FormatError> {
        let u = self.uvarint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::Truncated);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn len_bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let n = self.uvarint()?;
        if n > self.remaining() as u64 {
            return Err(FormatError::Truncated);
        }
        self.bytes(n as usize)
    }

    pub fn string(&mut self) -> Result<String, FormatError> {
        // Paths and argv are bytes on Unix; keep them readable rather than failing.
        Ok(String::from_utf8_lossy(self.len_bytes()?).into_owned())
    }
}
