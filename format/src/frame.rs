//! Record frames: a type byte, the payload length as a varint, the payload. Framing lets a reader
//! skip types it does not know and stop cleanly at a torn tail.

use crate::{put_uvarint, Cursor};

/// Appends a framed record: type byte, payload length varint, payload.
pub fn put_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    buf.push(kind);
    put_uvarint(buf, payload.len() as u64);
    buf.extend_from_slice(payload);
}

/// Largest encoded size of one record frame prefix (type + length varint).
pub const MAX_FRAME_PREFIX: usize = 11;

/// Frames a record in place: `buf` holds [`MAX_FRAME_PREFIX`] reserved bytes, then the payload.
/// The frame prefix is written just before the payload; returns the offset of the record's first
/// byte (the record is `buf[offset..]`, the same bytes [`put_record`] writes). A writer that
/// reserved the room when it began the payload frames it without moving it.
#[inline]
pub fn frame_in_place(buf: &mut [u8], kind: u8) -> usize {
    let mut prefix = [0u8; MAX_FRAME_PREFIX];
    prefix[0] = kind;
    let mut n = 1;
    let mut v = buf.len().saturating_sub(MAX_FRAME_PREFIX) as u64;
    while v >= 0x80 {
        prefix[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    prefix[n] = v as u8;
    n += 1;
    let start = MAX_FRAME_PREFIX.saturating_sub(n);
    if let Some(room) = buf.get_mut(start..MAX_FRAME_PREFIX) {
        room.copy_from_slice(&prefix[..n]);
    }
    start
}

/// A framed record as found in the file.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
    /// Offset of the record's first byte in the file.
    pub offset: usize,
}

/// Outcome of reading the next record frame.
#[derive(Debug)]
pub enum Next<'a> {
    Record(RawRecord<'a>),
    /// Clean end of data exactly at a record boundary.
    End,
    /// The data ends inside a record: the tail was torn (process killed mid-write).
    Torn {
        offset: usize,
    },
}

/// Reads the record frame starting at `offset`.
pub fn next_record(data: &[u8], offset: usize) -> Next<'_> {
    if offset >= data.len() {
        return Next::End;
    }
    let mut c = Cursor::new(&data[offset..]);
    let kind = match c.u8() {
        Ok(k) => k,
        Err(_) => return Next::Torn { offset },
    };
    let len = match c.uvarint() {
        Ok(l) => l,
        Err(_) => return Next::Torn { offset },
    };
    if kind == 0 || len > c.remaining() as u64 {
        // A zero type byte is never written: it is the zero fill of a torn or preallocated tail.
        return Next::Torn { offset };
    }
    let start = offset + c.pos();
    Next::Record(RawRecord {
        kind,
        payload: &data[start..start + len as usize],
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record;

    #[test]
    fn torn_record_is_detected_and_unknown_records_skip() {
        let mut buf = Vec::new();
        put_record(&mut buf, 200, b"future record type");
        put_record(&mut buf, record::END, &[0u8; 21]);
        let full = buf.len();
        put_record(&mut buf, record::EVENTS, &[0u8; 40]);
        buf.truncate(full + 20);
        let Next::Record(r) = next_record(&buf, 0) else {
            panic!()
        };
        assert_eq!((r.kind, r.payload), (200, &b"future record type"[..]));
        let off = r.offset + 2 + r.payload.len();
        let Next::Record(r2) = next_record(&buf, off) else {
            panic!()
        };
        assert_eq!(r2.kind, record::END);
        assert!(matches!(next_record(&buf, full), Next::Torn { offset } if offset == full));
        assert!(matches!(next_record(&buf[..full], full), Next::End));
    }

    #[test]
    fn records_framed_in_place_are_those_put_record_writes() {
        for len in [0usize, 1, 127, 128, 300, 16383, 16384, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut buf = vec![0u8; MAX_FRAME_PREFIX];
            buf.extend_from_slice(&payload);
            let start = frame_in_place(&mut buf, record::EVENTS);
            let mut want = Vec::new();
            put_record(&mut want, record::EVENTS, &payload);
            assert_eq!(&buf[start..], &want[..], "{len}");
        }
    }
}
