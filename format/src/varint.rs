//! Writing the integers every record is made of: unsigned LEB128 varints, zigzag for signed
//! deltas, length-prefixed byte strings, and [`ByteSink`], the one trait the writers share (a
//! `Vec<u8>`, or the tracker's own buffers on its hot path). Reading them back is
//! [`crate::Cursor`]'s.

use crate::{Cursor, FormatError};

/// Where encoded bytes go: a `Vec<u8>`, or the tracker's own buffers.
pub trait ByteSink {
    fn push_byte(&mut self, b: u8);
    fn push_slice(&mut self, s: &[u8]);

    /// Appends `v` as an unsigned LEB128 varint (a sink may do it without a check per byte).
    #[inline]
    fn push_uvarint(&mut self, v: u64) {
        push_uvarint_bytewise(self, v);
    }
}

/// Appends `v` as an unsigned LEB128 varint, a byte at a time through `push_byte`.
#[inline]
pub fn push_uvarint_bytewise<S: ByteSink + ?Sized>(buf: &mut S, mut v: u64) {
    while v >= 0x80 {
        buf.push_byte((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push_byte(v as u8);
}

/// `v` as an unsigned LEB128 varint in one little-endian word, and its length, when it takes
/// at most 8 bytes (`v < 2^56`: every address, size and delta the tracker writes). Without a
/// loop: a loop's trip count is the varint's length, which varies from event to event, and
/// its mispredicted exits cost more than the whole encoding.
#[inline(always)]
pub fn uvarint_word(v: u64) -> Option<(u64, usize)> {
    if v >> 56 != 0 {
        return None;
    }
    let bits = 64 - (v | 1).leading_zeros() as usize;
    let len = bits.div_ceil(7);
    // Spread the 7-bit groups to one per byte: 28 bits to each half, 14 to each quarter, 7 to
    // each byte.
    let mut x = (v & 0x0000_0000_0fff_ffff) | ((v & 0x00ff_ffff_f000_0000) << 4);
    x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x0fff_c000_0fff_c000) << 2);
    x = (x & 0x007f_007f_007f_007f) | ((x & 0x3f80_3f80_3f80_3f80) << 1);
    // Continuation bits on every byte but the last.
    let more = 0x8080_8080_8080_8080 & ((1u64 << (8 * (len - 1))) - 1);
    Some((x | more, len))
}

impl ByteSink for Vec<u8> {
    #[inline]
    fn push_byte(&mut self, b: u8) {
        self.push(b);
    }
    #[inline]
    fn push_slice(&mut self, s: &[u8]) {
        self.extend_from_slice(s);
    }
}

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub fn put_uvarint<S: ByteSink + ?Sized>(buf: &mut S, v: u64) {
    buf.push_uvarint(v);
}

/// Appends `v` zigzag-encoded, so small negative deltas stay small.
#[inline]
pub fn put_ivarint<S: ByteSink + ?Sized>(buf: &mut S, v: i64) {
    put_uvarint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

/// `v` as a wrapping delta, zigzag-encoded: small negative deltas become small numbers.
#[inline]
pub(crate) fn zigzag(v: u64) -> u64 {
    let v = v as i64;
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
#[inline]
pub(crate) fn unzigzag(u: u64) -> u64 {
    (((u >> 1) as i64) ^ -((u & 1) as i64)) as u64
}

/// Appends a length-prefixed byte string.
pub fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_uvarint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

/// Reads an unsigned varint from `buf[*pos..end]` (the varint column encoding's columns).
#[inline]
pub fn read_uvarint(buf: &[u8], pos: &mut usize, end: usize) -> Result<u64, FormatError> {
    let end = end.min(buf.len());
    if *pos < end {
        let b = buf[*pos];
        if b < 0x80 {
            *pos += 1;
            return Ok(b as u64);
        }
    }
    let mut c = Cursor::new(&buf[(*pos).min(end)..end]);
    let v = c.uvarint_slow()?;
    *pos += c.pos();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_the_edges() {
        let values = [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX];
        let mut buf = Vec::new();
        for v in values {
            put_uvarint(&mut buf, v);
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            put_ivarint(&mut buf, v);
        }
        let mut c = Cursor::new(&buf);
        for v in values {
            assert_eq!(c.uvarint().unwrap(), v);
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            assert_eq!(c.ivarint().unwrap(), v);
        }
        assert!(c.is_empty());
        assert_eq!(c.uvarint(), Err(FormatError::Truncated));
    }

    #[test]
    fn varints_of_every_bit_length_round_trip_with_and_without_lookahead() {
        let mut values = vec![0u64];
        for bits in 1..=64 {
            let top = 1u64 << (bits - 1);
            values.extend([top, top | (top >> 1) | 1, top | (top - 1)]);
        }
        let mut buf = Vec::new();
        for &v in &values {
            put_uvarint(&mut buf, v);
        }
        // Each also alone in a buffer of its own (fewer than 8 bytes to look ahead at).
        let mut c = Cursor::new(&buf);
        for &v in &values {
            assert_eq!(c.uvarint().unwrap(), v);
            let mut one = Vec::new();
            put_uvarint(&mut one, v);
            assert_eq!(Cursor::new(&one).uvarint().unwrap(), v);
        }
        assert!(c.is_empty());
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let buf = [0xffu8; 11];
        assert_eq!(Cursor::new(&buf).uvarint(), Err(FormatError::BadVarint));
    }
}

#[cfg(test)]
mod word_tests {
    use super::*;

    #[test]
    fn uvarint_word_is_leb128() {
        let mut vals = vec![0u64, 1, 0x7f, 0x80, 0x3fff, 0x4000, (1 << 56) - 1];
        for b in 0..56 {
            vals.extend([
                1u64 << b,
                (1u64 << b) - 1,
                (1u64 << b) + 1,
                (1u64 << b) | 0x55,
            ]);
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            vals.push(state >> (state % 64 + 8).min(63));
        }
        for v in vals {
            let mut want = Vec::new();
            push_uvarint_bytewise(&mut want, v);
            let (w, len) = uvarint_word(v).expect("below 2^56");
            assert_eq!(&w.to_le_bytes()[..len], &want[..], "{v:#x}");
        }
        assert_eq!(uvarint_word(1 << 56), None);
        assert_eq!(uvarint_word(u64::MAX), None);
    }
}
