//! The stream encoding (`EVENTS`): one op byte and varints per event, cheap enough to write on
//! the tracker's hot path, in place into its per-thread buffer. Its encoder and decoder.
//!
//! Every event op is followed by the deltas of the sequence number, the time and the address
//! from the previous event of the chunk, then its own fields. A chunk starts its running values
//! from its header, so each chunk decodes on its own.

use crate::{put_ivarint, put_uvarint, unzigzag, AllocKind, ByteSink, ChunkHeader, Cursor};
use crate::{EventKind, FormatError, Item};

/// Operation codes inside an events chunk. Every event op is followed by the sequence delta
/// and the time delta, then its own fields.
pub mod op {
    /// Allocation ops are `ALLOC_BASE + kind` for `kind` in [`crate::AllocKind`].
    pub const ALLOC_BASE: u8 = 0x00;
    /// free(): a block released.
    pub const FREE: u8 = 0x20;
    /// First half of a realloc of a non-NULL pointer: the old block is released. The next event
    /// of the same thread is the allocation half (`ALLOC_BASE + Realloc`) or `REALLOC_FAILED`.
    pub const REALLOC_FREE: u8 = 0x21;
    /// The realloc whose first half was recorded failed: the old block is live again.
    pub const REALLOC_FAILED: u8 = 0x22;
    /// Not an event: defines a stack trie node (`id`, `parent`, `ip`).
    pub const STACK_NODE: u8 = 0x30;
    /// The thread opened a region: the field after the deltas is the region's name id.
    pub const REGION_BEGIN: u8 = 0x40;
    /// The thread closed its innermost open region.
    pub const REGION_END: u8 = 0x41;
    /// A mapping made: after the deltas (the address's is the mapping's), `size`, `stack`, and
    /// `file << 1 | shared`.
    pub const MAP: u8 = 0x42;
    /// A range unmapped: after the deltas (the range's start), `size`.
    pub const UNMAP: u8 = 0x43;
    /// A range remapped: after the deltas (the new address's), `size`, `stack`, the old
    /// address as a signed delta from the new one, `old_size`.
    pub const REMAP: u8 = 0x44;
}

/// The stream encoder of one chunk: the running values the next event's deltas are taken from,
/// which are also what a decoder holds after the events written so far. Small and `Copy`: the
/// tracker keeps one in each thread's buffer, beside the bytes, and writes through any
/// [`ByteSink`] (its in-place tail writer included); nothing here allocates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamEncoder {
    seq: u64,
    time: u64,
    addr: u64,
}

impl StreamEncoder {
    /// The encoder of the chunk `header` opens (its first event takes `seq == base_seq`); the
    /// header itself is written by [`ChunkHeader::encode`], or by [`StreamEncoder::begin`].
    #[inline]
    pub fn new(header: &ChunkHeader) -> Self {
        StreamEncoder {
            seq: header.base_seq,
            time: header.base_time,
            addr: 0,
        }
    }

    /// Writes `header` (the start of an `EVENTS` payload) and returns the chunk's encoder.
    #[inline]
    pub fn begin<S: ByteSink + ?Sized>(sink: &mut S, header: &ChunkHeader) -> Self {
        header.encode(sink);
        Self::new(header)
    }

    /// Writes the definition of a stack trie node (the running values do not change).
    #[inline]
    pub fn node<S: ByteSink + ?Sized>(sink: &mut S, id: u64, parent: u64, ip: u64) {
        sink.push_byte(op::STACK_NODE);
        put_uvarint(sink, id);
        put_uvarint(sink, parent);
        put_uvarint(sink, ip);
    }

    /// Writes one event. Sequence numbers and addresses are wrapping deltas. Times never run
    /// backwards inside a chunk: a time below the previous event's is written as that time
    /// (delta 0), so a chunk's times read back sorted.
    #[inline(always)]
    pub fn event<S: ByteSink + ?Sized>(
        &mut self,
        sink: &mut S,
        seq: u64,
        time: u64,
        kind: EventKind,
    ) {
        let (opcode, addr) = match kind {
            EventKind::Alloc { kind, addr, .. } => (op::ALLOC_BASE + kind as u8, addr),
            EventKind::Free { addr } => (op::FREE, addr),
            EventKind::ReallocFree { addr } => (op::REALLOC_FREE, addr),
            EventKind::ReallocFailed => (op::REALLOC_FAILED, self.addr),
            EventKind::RegionBegin { .. } => (op::REGION_BEGIN, self.addr),
            EventKind::RegionEnd => (op::REGION_END, self.addr),
            EventKind::Map { addr, .. } => (op::MAP, addr),
            EventKind::Unmap { addr, .. } => (op::UNMAP, addr),
            EventKind::Remap { addr, .. } => (op::REMAP, addr),
        };
        sink.push_byte(opcode);
        put_uvarint(sink, seq.wrapping_sub(self.seq));
        put_uvarint(sink, time.saturating_sub(self.time));
        put_ivarint(sink, addr.wrapping_sub(self.addr) as i64);
        self.seq = seq;
        self.time = time.max(self.time);
        self.addr = addr;
        match kind {
            EventKind::Alloc { size, stack, .. } => {
                put_uvarint(sink, size);
                put_uvarint(sink, stack as u64);
            }
            EventKind::RegionBegin { region } => put_uvarint(sink, region as u64),
            EventKind::Map {
                size,
                stack,
                file,
                shared,
                ..
            } => {
                put_uvarint(sink, size);
                put_uvarint(sink, stack as u64);
                put_uvarint(sink, (file as u64) << 1 | shared as u64);
            }
            EventKind::Unmap { size, .. } => put_uvarint(sink, size),
            EventKind::Remap {
                old_addr,
                old_size,
                addr,
                size,
                stack,
            } => {
                put_uvarint(sink, size);
                put_uvarint(sink, stack as u64);
                put_ivarint(sink, old_addr.wrapping_sub(addr) as i64);
                put_uvarint(sink, old_size);
            }
            _ => {}
        }
    }

    /// Writes one item: [`StreamEncoder::event`] or [`StreamEncoder::node`].
    #[inline]
    pub fn item<S: ByteSink + ?Sized>(&mut self, sink: &mut S, item: &Item) {
        match *item {
            Item::Event { seq, time, kind } => self.event(sink, seq, time, kind),
            Item::Node { id, parent, ip } => Self::node(sink, id, parent, ip),
        }
    }
}

/// A whole `EVENTS` payload, header and `items` in the stream encoding (for tests and tools: the
/// tracker writes its events in place with a [`StreamEncoder`]).
pub fn encode_stream(header: &ChunkHeader, items: &[Item]) -> Vec<u8> {
    let mut b = Vec::new();
    let mut enc = StreamEncoder::begin(&mut b, header);
    for item in items {
        enc.item(&mut b, item);
    }
    b
}

/// One item of the stream as its op and plain numbers, for a reader that matches on the op
/// itself (the transcoder). Every field is a u64, so an item is stored and loaded in whole
/// words: building an [`Item`] and copying it out, the compiler writes its tags byte by byte
/// and reads them back as words, and each such read waits for the stores to drain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawItem {
    /// The op byte ([`op`]).
    pub op: u64,
    /// A node's id; else the event's sequence number.
    pub seq: u64,
    /// A node's parent; else the event's time.
    pub time: u64,
    /// A node's ip; else the event's address (a mapping's, a range's start).
    pub addr: u64,
    /// The op's own fields in the stream's order: an allocation's size and stack; a region's
    /// id; a mapping's size, stack and `file << 1 | shared`; an unmap's size; a remap's size,
    /// stack, zigzag delta of the old address from the new one, and old size.
    pub more: [u64; 4],
}

impl RawItem {
    /// The item, as [`StreamDecoder::next_item`] gives it.
    pub fn item(&self) -> Result<Item, FormatError> {
        let opcode = self.op as u8;
        let (seq, time, addr, m) = (self.seq, self.time, self.addr, self.more);
        let kind = match opcode {
            op::STACK_NODE => {
                return Ok(Item::Node {
                    id: seq,
                    parent: time,
                    ip: addr,
                })
            }
            op::FREE => EventKind::Free { addr },
            op::REALLOC_FREE => EventKind::ReallocFree { addr },
            op::REALLOC_FAILED => EventKind::ReallocFailed,
            op::REGION_BEGIN => EventKind::RegionBegin {
                region: m[0] as u32,
            },
            op::REGION_END => EventKind::RegionEnd,
            op::MAP => EventKind::Map {
                addr,
                size: m[0],
                stack: m[1] as u32,
                file: (m[2] >> 1).min(u32::MAX as u64) as u32,
                shared: m[2] & 1 != 0,
            },
            op::UNMAP => EventKind::Unmap { addr, size: m[0] },
            op::REMAP => EventKind::Remap {
                old_addr: addr.wrapping_add(unzigzag(m[2])),
                old_size: m[3],
                addr,
                size: m[0],
                stack: m[1] as u32,
            },
            o => EventKind::Alloc {
                kind: AllocKind::from_u8(o.wrapping_sub(op::ALLOC_BASE))
                    .ok_or(FormatError::BadOp(o))?,
                addr,
                size: m[0],
                // Stack ids are u32 (the trie's); a larger one is damage, kept as its low bits.
                stack: m[1] as u32,
            },
        };
        Ok(Item::Event { seq, time, kind })
    }
}

/// Decoder of the stream encoding.
pub struct StreamDecoder<'a> {
    c: Cursor<'a>,
    seq: u64,
    time: u64,
    addr: u64,
}

impl<'a> StreamDecoder<'a> {
    /// `ops`: the payload after the chunk header.
    pub fn new(ops: &'a [u8], header: &ChunkHeader) -> Self {
        StreamDecoder {
            c: Cursor::new(ops),
            seq: header.base_seq,
            time: header.base_time,
            addr: 0,
        }
    }

    /// The deltas every event starts with. The new values are returned in registers as well
    /// as kept: a caller reading them back from `self` would wait on the stores just made
    /// (store forwarding) on every event the transcoder reads.
    #[inline(always)]
    fn head<const FAR: bool>(&mut self) -> Result<(u64, u64, u64), FormatError> {
        // Wrapping: damaged input must not panic.
        let seq = self.seq.wrapping_add(self.uv::<FAR>()?);
        let time = self.time.wrapping_add(self.uv::<FAR>()?);
        let addr = self.addr.wrapping_add(unzigzag(self.uv::<FAR>()?));
        self.seq = seq;
        self.time = time;
        self.addr = addr;
        Ok((seq, time, addr))
    }

    /// A varint; `FAR`: the item began at least `FAR_FROM_END` bytes from the end.
    #[inline(always)]
    fn uv<const FAR: bool>(&mut self) -> Result<u64, FormatError> {
        if FAR {
            // SAFETY: an item is an opcode and at most seven varints of at most 10 bytes, so
            // every varint of it starts within 61 bytes of the item's start, and 8 bytes from
            // there are within the `FAR_FROM_END` bytes that were left.
            unsafe { self.c.uvarint_unchecked() }
        } else {
            self.c.uvarint()
        }
    }

    /// Asks the CPU for the stream's bytes `ahead` bytes past the position: a chunk written
    /// by another core is in that core's cache, and fetching it line by line as the decoder
    /// reaches it would stall on every line.
    #[inline(always)]
    pub fn prefetch(&self, ahead: usize) {
        if let Some(b) = self.c.rest().get(ahead) {
            super::prefetch(b);
        }
    }

    #[inline]
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        let mut raw = RawItem::default();
        if !self.next_raw(&mut raw)? {
            return Ok(None);
        }
        raw.item().map(Some)
    }

    /// The next item into `out` as plain numbers (see [`RawItem`]); false after the chunk's
    /// last. Checks what [`StreamDecoder::next_item`] checks.
    #[inline(always)]
    pub fn next_raw(&mut self, out: &mut RawItem) -> Result<bool, FormatError> {
        if self.c.remaining() >= FAR_FROM_END {
            self.raw::<true>(out)?;
        } else if self.c.is_empty() {
            return Ok(false);
        } else {
            self.raw::<false>(out)?;
        }
        Ok(true)
    }

    #[inline(always)]
    fn raw<const FAR: bool>(&mut self, out: &mut RawItem) -> Result<(), FormatError> {
        let opcode = self.c.u8()?;
        out.op = opcode as u64;
        if opcode == op::STACK_NODE {
            out.seq = self.uv::<FAR>()?;
            out.time = self.uv::<FAR>()?;
            out.addr = self.uv::<FAR>()?;
            return Ok(());
        }
        let fields = match opcode {
            op::FREE | op::REALLOC_FREE | op::REALLOC_FAILED | op::REGION_END => 0,
            op::REGION_BEGIN | op::UNMAP => 1,
            op::MAP => 3,
            op::REMAP => 4,
            o if AllocKind::from_u8(o.wrapping_sub(op::ALLOC_BASE)).is_some() => 2,
            o => return Err(FormatError::BadOp(o)),
        };
        (out.seq, out.time, out.addr) = self.head::<FAR>()?;
        for k in 0..fields {
            out.more[k] = self.uv::<FAR>()?;
        }
        Ok(())
    }
}

/// A stream decoder over bytes it owns: a decompressed `EVENTS_S` chunk.
pub(crate) struct OwnedStream {
    ops: Vec<u8>,
    pos: usize,
    seq: u64,
    time: u64,
    addr: u64,
}

impl OwnedStream {
    pub(crate) fn new(ops: Vec<u8>, header: &ChunkHeader) -> Self {
        OwnedStream {
            ops,
            pos: 0,
            seq: header.base_seq,
            time: header.base_time,
            addr: 0,
        }
    }

    pub(crate) fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        let mut d = StreamDecoder {
            c: Cursor::at(&self.ops, self.pos),
            seq: self.seq,
            time: self.time,
            addr: self.addr,
        };
        let item = d.next_item();
        (self.pos, self.seq, self.time, self.addr) = (d.c.pos(), d.seq, d.time, d.addr);
        item
    }
}

/// Bytes left from which on an item of the stream encoding is read without bounds checks: its
/// last varint starts at most 61 bytes in and is read as 8 bytes (see `StreamDecoder::uv`).
const FAR_FROM_END: usize = 72;

#[cfg(test)]
mod tests {
    use super::*;

    /// `next_raw` gives every op as `next_item` does, near the chunk's end (bounds-checked
    /// reads) and far from it, and refuses the same damage.
    #[test]
    fn raw_items_are_the_items() {
        let header = ChunkHeader {
            tid: 1,
            base_seq: 7,
            base_time: 3,
        };
        let kinds = [
            EventKind::Alloc {
                kind: AllocKind::Malloc,
                addr: 0x7f00_0000_1000,
                size: 5000,
                stack: 9,
            },
            EventKind::Alloc {
                kind: AllocKind::AlignedAlloc,
                addr: 0x10,
                size: 64,
                stack: u32::MAX,
            },
            EventKind::Free {
                addr: 0x7f00_0000_1000,
            },
            EventKind::ReallocFree { addr: 0x10 },
            EventKind::ReallocFailed,
            EventKind::RegionBegin {
                region: 0xdead_beef,
            },
            EventKind::RegionEnd,
            EventKind::Map {
                addr: 0x7f10_0000_0000,
                size: 1 << 21,
                stack: 4,
                file: 77,
                shared: true,
            },
            EventKind::Unmap {
                addr: 0x7f10_0000_0000,
                size: 4096,
            },
            EventKind::Remap {
                old_addr: 0x7f10_0000_1000,
                old_size: 8192,
                addr: 0x7f00_0000_0000,
                size: 1 << 20,
                stack: 2,
            },
        ];
        let mut items = Vec::new();
        for round in 0..20u64 {
            items.push(Item::Node {
                id: round + 1,
                parent: round,
                ip: 0x5555_0000_0000 + round,
            });
            for (i, &kind) in kinds.iter().enumerate() {
                items.push(Item::Event {
                    seq: 7 + round * 16 + i as u64,
                    time: 3 + round,
                    kind,
                });
            }
        }
        let b = encode_stream(&header, &items);
        let mut c = Cursor::new(&b);
        let h = ChunkHeader::decode(&mut c).unwrap();
        let mut d = StreamDecoder::new(c.rest(), &h);
        let mut raw = RawItem::default();
        let mut back = Vec::new();
        while d.next_raw(&mut raw).unwrap() {
            back.push(raw.item().unwrap());
        }
        assert_eq!(back, items);
        // An unknown op, far from the end and at it.
        for tail in [vec![0x0b; 100], vec![0x0b]] {
            let mut d = StreamDecoder::new(&tail, &h);
            assert!(matches!(
                d.next_raw(&mut raw),
                Err(FormatError::BadOp(0x0b))
            ));
        }
    }

    /// The bytes the tracker has always written for these events: a time below the previous
    /// one saturates (delta 0), a failed realloc keeps the address (delta 0).
    #[test]
    fn the_encoder_writes_the_trackers_bytes() {
        let header = ChunkHeader {
            tid: 5,
            base_seq: 10,
            base_time: 100,
        };
        let mut b = Vec::new();
        let mut enc = StreamEncoder::begin(&mut b, &header);
        StreamEncoder::node(&mut b, 3, 0, 0x41);
        let alloc = EventKind::Alloc {
            kind: AllocKind::Calloc,
            addr: 0x1000,
            size: 24,
            stack: 3,
        };
        enc.event(&mut b, 10, 100, alloc);
        enc.event(&mut b, 12, 90, EventKind::Free { addr: 0x1000 });
        enc.event(&mut b, 13, 101, EventKind::ReallocFailed);
        #[rustfmt::skip]
        let want = [
            5, 10, 100,
            op::STACK_NODE, 3, 0, 0x41,
            op::ALLOC_BASE + 1, 0, 0, 0x80, 0x40, 24, 3,
            op::FREE, 2, 0, 0,
            op::REALLOC_FAILED, 1, 1, 0,
        ];
        assert_eq!(b, want);
        let mut c = Cursor::new(&b);
        let h = ChunkHeader::decode(&mut c).unwrap();
        let mut d = StreamDecoder::new(c.rest(), &h);
        let mut items = Vec::new();
        while let Some(it) = d.next_item().unwrap() {
            items.push(it);
        }
        let ev = |seq, time, kind| Item::Event { seq, time, kind };
        assert_eq!(
            items,
            [
                Item::Node {
                    id: 3,
                    parent: 0,
                    ip: 0x41
                },
                ev(10, 100, alloc),
                ev(12, 100, EventKind::Free { addr: 0x1000 }),
                ev(13, 101, EventKind::ReallocFailed),
            ]
        );
    }
}
