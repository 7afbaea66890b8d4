//! The transcoder: the stream encoding of a chunk in, a framed `EVENTS_R` record out. The
//! tracker's writer thread runs it on every chunk (a program thread too, when the writer falls
//! behind), so it keeps its tables between chunks and clears them by a generation count.

use super::{alloc_symbol, block_end, class, col, free_symbol, SMALL_BLOCK, UNKNOWN_SIZE};
use crate::chunk::live::LiveSet;
use crate::chunk::stream::RawItem;
use crate::chunk::tokens::{BitWriter, Long, Short};
use crate::{op, FormatError, Item, StreamDecoder, StreamEncoder};
use crate::{put_record, put_uvarint, record, zigzag, AllocKind, ChunkHeader, Cursor};

/// What the chunk so far says about an address: one entry of the transcoder's one table, 16
/// bytes (a table of 64 k entries fits a core's 1 MiB L2). `meta` packs, from bit 0: the state
/// (2 bits: `NEITHER`, `LIVE`, `FREED`), the table's generation when the entry was made (8),
/// the block's size (11: a size only matters when it is at most `SMALL_BLOCK`, so larger and
/// unknown sizes are `NO_SIZE`), `num` (21: `LIVE`, its allocation index; `FREED`, its free
/// number) and `end_of` (21: the latest allocation of the chunk that ends at this address,
/// `NO_END` for none). A chunk's counts stay below 2^21: see `MAX_PAYLOAD`.
#[derive(Clone, Copy, Default)]
struct Slot {
    key: u64,
    meta: u64,
}

const NEITHER: u64 = 0;
const LIVE: u64 = 1;
const FREED: u64 = 2;
const GEN_SHIFT: u32 = 2;
const GEN_MASK: u64 = 0xff;
const SIZE_SHIFT: u32 = 10;
const NO_SIZE: u64 = 0x7ff;
const NUM_SHIFT: u32 = 21;
const END_SHIFT: u32 = 42;
const NUM_MASK: u64 = 0x1f_ffff;
const NO_END: u32 = NUM_MASK as u32;
/// The largest payload transcoded: an event takes at least 4 bytes of stream, so a chunk's
/// allocation and free counts stay below `NUM_MASK`. The tracker's chunks are at most 320 KiB;
/// a larger one is refused and kept as it is.
const MAX_PAYLOAD: usize = 4 << 20;

impl Slot {
    #[inline(always)]
    fn state(&self) -> u64 {
        self.meta & 3
    }
    #[inline(always)]
    fn size(&self) -> u64 {
        (self.meta >> SIZE_SHIFT) & NO_SIZE
    }
    #[inline(always)]
    fn num(&self) -> u32 {
        ((self.meta >> NUM_SHIFT) & NUM_MASK) as u32
    }
    #[inline(always)]
    fn end_of(&self) -> u32 {
        ((self.meta >> END_SHIFT) & NUM_MASK) as u32
    }
    /// Sets the state, `num` and size (capped at `NO_SIZE`), keeping the generation and `end_of`.
    #[inline(always)]
    fn set(&mut self, state: u64, num: u32, size: u64) {
        let keep = self.meta & ((GEN_MASK << GEN_SHIFT) | (NUM_MASK << END_SHIFT));
        self.meta = keep
            | state
            | (size.min(NO_SIZE) << SIZE_SHIFT)
            | ((num as u64 & NUM_MASK) << NUM_SHIFT);
    }
    #[inline(always)]
    fn set_end_of(&mut self, a: u32) {
        self.meta = (self.meta & !(NUM_MASK << END_SHIFT)) | ((a as u64 & NUM_MASK) << END_SHIFT);
    }
}

/// Items decoded ahead of the one transcoded (see `Transcoder::transcode`).
const AHEAD: usize = 32;
/// Bytes of the stream prefetched ahead of the decoder.
const STREAM_AHEAD: usize = 512;
/// The op of a ring slot past the chunk's last item (no op byte has this value).
const END_OF_CHUNK: u64 = u64::MAX;

/// Addresses the chunk has met (allocated, freed, or where a block ends), open addressing with
/// linear probing. A lookup touches one place in memory (hashbrown's control bytes and buckets
/// are two), and clearing it between chunks is a generation count, not a pass over a table
/// larger than the core's L1 and L2 caches care to refill.
struct AddrTable {
    slots: Vec<Slot>,
    /// Generations run from 1 to `GEN_MASK`: zeroed slots are free in every generation.
    generation: u64,
    len: usize,
    /// The table doubles when `len` reaches this (three quarters full).
    grow_at: usize,
    /// 64 - log2(slots.len()): the hash's top bits pick the first slot.
    shift: u32,
}

impl Default for AddrTable {
    fn default() -> Self {
        // A chunk meets up to some 50 k addresses; the table doubles when it needs to.
        Self::with_slots(1 << 16)
    }
}

impl AddrTable {
    /// `n`: a power of two.
    fn with_slots(n: usize) -> Self {
        AddrTable {
            slots: vec![Slot::default(); n],
            generation: 1,
            len: 0,
            grow_at: n / 4 * 3,
            shift: 64 - n.trailing_zeros(),
        }
    }

    fn clear(&mut self) {
        self.len = 0;
        self.generation += 1;
        if self.generation > GEN_MASK {
            self.slots.fill(Slot::default());
            self.generation = 1;
        }
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// The entry of `key`, made (neither live nor freed, size unknown, no end) when missing.
    #[inline(always)]
    fn entry(&mut self, key: u64) -> &mut Slot {
        if self.len >= self.grow_at {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let current = self.generation;
        let mut i = self.home(key);
        loop {
            let meta = self.slots[i & mask].meta;
            if (meta >> GEN_SHIFT) & GEN_MASK != current {
                self.len += 1;
                let s = &mut self.slots[i & mask];
                *s = Slot {
                    key,
                    meta: NEITHER
                        | (current << GEN_SHIFT)
                        | (NO_SIZE << SIZE_SHIFT)
                        | ((NO_END as u64) << END_SHIFT),
                };
                return s;
            }
            if self.slots[i & mask].key == key {
                return &mut self.slots[i & mask];
            }
            i = (i & mask) + 1;
        }
    }

    /// Asks the CPU to bring `key`'s first slot into the cache: the transcoder names the
    /// addresses of items some way ahead, so their lookups find the slots there.
    #[inline(always)]
    fn prefetch(&self, key: u64) {
        let i = self.home(key) & (self.slots.len() - 1);
        crate::chunk::prefetch(self.slots.as_ptr().wrapping_add(i));
    }

    /// Prefetches the slots an item will look up.
    #[inline(always)]
    fn prefetch_raw(&self, item: &RawItem) {
        let o = item.op as u8;
        if o < op::FREE {
            // An allocation: its address, and where the block ends.
            self.prefetch(item.addr);
            self.prefetch(block_end(item.addr, item.more[0]));
        } else if o == op::FREE || o == op::REALLOC_FREE {
            self.prefetch(item.addr);
        }
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let current = self.generation;
        let n = self.slots.len() * 2;
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); n]);
        self.shift -= 1;
        self.grow_at = n / 4 * 3;
        let mask = self.slots.len() - 1;
        let live = |s: &Slot| (s.meta >> GEN_SHIFT) & GEN_MASK == current;
        for s in old.into_iter().filter(live) {
            let mut i = self.home(s.key);
            while live(&self.slots[i & mask]) {
                i = (i & mask) + 1;
            }
            self.slots[i & mask] = s;
        }
    }
}

/// The transcoder's output columns and extra bits, as they fill.
#[derive(Default)]
struct Columns {
    cols: [Vec<u8>; col::COUNT],
    bits: BitWriter,
    /// Op classes not yet in an ops byte: their count and value.
    nops: u8,
    ops: u8,
}

impl Columns {
    fn clear(&mut self) {
        for col in self.cols.iter_mut() {
            col.clear();
        }
        self.bits.out.clear();
        self.nops = 0;
        self.ops = 0;
    }

    #[inline(always)]
    fn put(&mut self, field: usize, v: u64) {
        let (t, n, x) = Long::split(v);
        self.cols[field].push(t);
        if n > 0 {
            self.bits.put(x, n);
        }
    }

    #[inline(always)]
    fn put_short(&mut self, field: usize, base: u8, v: u64) {
        let (t, n, x) = Short::split(v);
        self.cols[field].push(base + t);
        if n > 0 {
            self.bits.put(x, n);
        }
    }

    /// A number of a field whose symbols share the token space with others: written (`true`)
    /// when its token is below `limit`.
    #[inline(always)]
    fn put_below(&mut self, field: usize, base: u8, limit: u8, v: u64) -> bool {
        let (t, n, x) = Long::split(v);
        if t >= limit {
            return false;
        }
        self.cols[field].push(base + t);
        if n > 0 {
            self.bits.put(x, n);
        }
        true
    }

    #[inline]
    fn op(&mut self, class: u8) {
        self.ops = self.ops * class::COUNT + class;
        self.nops += 1;
        if self.nops == 3 {
            self.cols[col::OPS].push(self.ops);
            self.ops = 0;
            self.nops = 0;
        }
    }
}

/// Reusable state of the transcoder (the writer thread keeps one).
#[derive(Default)]
pub struct Transcoder {
    out: Columns,
    /// Every address the chunk has met: allocated, freed, or where a block ends.
    blocks: AddrTable,
    live: LiveSet,
    block: Vec<u8>,
    packed: Vec<u8>,
    zstd: crate::chunk::CachedCompressor,
    /// The chunk's region marks, in the stream encoding: they leave as a `REGIONS` record.
    regions: Vec<u8>,
    /// The chunk's mapped-memory events, in the stream encoding: they leave as a `MAPPED`
    /// record.
    mapped: Vec<u8>,
}

impl Transcoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Transcodes an `EVENTS` payload (chunk header and stream-encoded items, as the tracker's
    /// threads write it) into a framed `EVENTS_R` record appended to `out`; `level` is zstd's.
    /// Region marks, which the rank encoding has no class for, follow it as a `REGIONS` record
    /// (the same chunk header, the marks in the stream encoding) when the chunk has any.
    pub fn transcode(
        &mut self,
        payload: &[u8],
        level: i32,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(FormatError::TooLarge(payload.len()));
        }
        let mut c = Cursor::new(payload);
        let header = ChunkHeader::decode(&mut c)?;
        let mut events = StreamDecoder::new(c.rest(), &header);
        self.out.clear();
        self.blocks.clear();
        self.live.clear();
        let cols = &mut self.out;
        let (mut acnt, mut fcnt) = (0u32, 0u32);
        let (mut seq, mut time) = (header.base_seq, header.base_time);
        let (mut new_addr, mut other_free, mut stack_prev) = (0u64, 0u64, 0u64);
        let (mut node_prev, mut ip_prev) = (0u64, 0u64);
        let mut n_ops = 0u64;
        self.regions.clear();
        self.mapped.clear();
        let mut marks = StreamEncoder::new(&header);
        let mut maps = StreamEncoder::new(&header);
        // Items are decoded `AHEAD` of the one transcoded, and their slots prefetched: the
        // table is larger than the core's nearer caches and its lookups are random, so most
        // would otherwise wait for memory one after the other.
        let mut ring = [RawItem::default(); AHEAD];
        let mut ended = false;
        for r in ring.iter_mut() {
            if !ended && events.next_raw(r)? {
                self.blocks.prefetch_raw(r);
            } else {
                ended = true;
                r.op = END_OF_CHUNK;
            }
        }
        let mut at = 0;
        loop {
            let item = ring[at];
            if item.op == END_OF_CHUNK {
                break;
            }
            // The item `AHEAD` on takes this one's place (or the end's mark does).
            if !ended {
                events.prefetch(STREAM_AHEAD);
                if events.next_raw(&mut ring[at])? {
                    self.blocks.prefetch_raw(&ring[at]);
                } else {
                    ended = true;
                    ring[at].op = END_OF_CHUNK;
                }
            }
            at = (at + 1) % AHEAD;
            let o = item.op as u8;
            match o {
                op::STACK_NODE => {
                    n_ops += 1;
                    let (id, parent, ip) = (item.seq, item.time, item.addr);
                    cols.op(class::NODE);
                    cols.put(col::NODE, zigzag(id.wrapping_sub(node_prev)));
                    cols.put(col::NODE, id.wrapping_sub(parent));
                    cols.put(col::NODE, zigzag(ip.wrapping_sub(ip_prev)));
                    node_prev = id;
                    ip_prev = ip;
                    continue;
                }
                op::MAP | op::UNMAP | op::REMAP | op::REGION_BEGIN | op::REGION_END => {
                    if let Item::Event { seq, time, kind } = item.item()? {
                        if kind.is_mapped() {
                            maps.event(&mut self.mapped, seq, time, kind);
                        } else {
                            marks.event(&mut self.regions, seq, time, kind);
                        }
                    }
                    continue;
                }
                _ => {}
            }
            n_ops += 1;
            let (s, t, addr) = (item.seq, item.time, item.addr);
            // Each field in the order the decoder reads it: op, seq, time, address, kind, size,
            // stack.
            let kind = match o {
                op::FREE => None,
                op::REALLOC_FREE => None,
                op::REALLOC_FAILED => None,
                _ => Some(
                    AllocKind::from_u8(o.wrapping_sub(op::ALLOC_BASE))
                        .ok_or(FormatError::BadOp(o))?,
                ),
            };
            cols.op(match (o, kind) {
                (_, Some(AllocKind::Malloc)) => class::MALLOC,
                (_, Some(_)) => class::ALLOC_OTHER,
                (op::FREE, None) => class::FREE,
                (op::REALLOC_FREE, None) => class::REALLOC_FREE,
                _ => class::REALLOC_FAILED,
            });
            cols.put(col::SEQ, s.wrapping_sub(seq));
            cols.put(col::TIME, t.wrapping_sub(time));
            seq = s;
            time = t;
            match (o, kind) {
                (_, Some(kind)) => {
                    let (size, stack) = (item.more[0], item.more[1] as u32);
                    let slot = self.blocks.entry(addr);
                    // Only a reused address (given as such) predicts the size.
                    let mut reused = UNKNOWN_SIZE;
                    let given = if slot.state() == FREED
                        && cols.put_below(
                            col::ALLOC,
                            alloc_symbol::REUSED,
                            alloc_symbol::AFTER,
                            (fcnt - slot.num() + 1) as u64,
                        ) {
                        reused = slot.size();
                        true
                    } else {
                        slot.end_of() != NO_END
                            && cols.put_below(
                                col::ALLOC,
                                alloc_symbol::AFTER,
                                alloc_symbol::AFTER,
                                (acnt - slot.end_of()) as u64,
                            )
                    };
                    if !given {
                        cols.put_short(
                            col::ALLOC,
                            alloc_symbol::NEW,
                            zigzag(addr.wrapping_sub(new_addr)),
                        );
                        new_addr = addr;
                    }
                    slot.set(LIVE, acnt, size);
                    if kind != AllocKind::Malloc {
                        cols.cols[col::KIND].push(kind as u8);
                    }
                    if reused <= SMALL_BLOCK {
                        cols.put(col::SIZE_REL, zigzag(size.wrapping_sub(reused)));
                    } else {
                        cols.put(col::SIZE, size);
                    }
                    cols.put(col::STACK, zigzag((stack as u64).wrapping_sub(stack_prev)));
                    stack_prev = stack as u64;
                    self.blocks.entry(block_end(addr, size)).set_end_of(acnt);
                    self.live.insert(acnt as usize);
                    acnt += 1;
                }
                (op::FREE | op::REALLOC_FREE, None) => {
                    let slot = self.blocks.entry(addr);
                    let given = slot.state() == LIVE
                        && cols.put_below(
                            col::FREE,
                            free_symbol::RANK,
                            free_symbol::OTHER,
                            self.live.rank(slot.num() as usize),
                        );
                    let size = if given {
                        self.live.remove(slot.num() as usize);
                        slot.size()
                    } else {
                        // A block given otherwise stays live for the decoder, which cannot
                        // know it.
                        cols.put_short(
                            col::FREE,
                            free_symbol::OTHER,
                            zigzag(addr.wrapping_sub(other_free)),
                        );
                        other_free = addr;
                        NO_SIZE
                    };
                    fcnt += 1;
                    slot.set(FREED, fcnt, size);
                }
                _ => {}
            }
        }
        while cols.nops != 0 {
            // Padding classes: the op count says where the chunk ends.
            cols.op(0);
        }
        cols.bits.finish();
        // Each column is compressed on its own, so each gets an entropy table fitted to it.
        let z = crate::chunk::compressor(&mut self.zstd, level)?;
        let mut payload = Vec::with_capacity(cols.bits.out.len() + 4096);
        header.encode(&mut payload);
        put_uvarint(&mut payload, n_ops);
        self.block.clear();
        for col in &cols.cols {
            put_uvarint(&mut payload, col.len() as u64);
            self.packed.clear();
            if !col.is_empty() {
                self.packed
                    .reserve(zstd::zstd_safe::compress_bound(col.len()));
                z.compress_to_buffer(col, &mut self.packed)
                    .map_err(|_| FormatError::Compression)?;
            }
            if self.packed.is_empty() || self.packed.len() >= col.len() {
                // Stored as it is (length 0 says so).
                put_uvarint(&mut payload, 0);
                self.block.extend_from_slice(col);
            } else {
                put_uvarint(&mut payload, self.packed.len() as u64);
                self.block.extend_from_slice(&self.packed);
            }
        }
        payload.extend_from_slice(&self.block);
        payload.extend_from_slice(&cols.bits.out);
        put_record(out, record::EVENTS_R, &payload);
        if !self.regions.is_empty() {
            payload.clear();
            header.encode(&mut payload);
            payload.extend_from_slice(&self.regions);
            put_record(out, record::REGIONS, &payload);
        }
        if !self.mapped.is_empty() {
            payload.clear();
            header.encode(&mut payload);
            payload.extend_from_slice(&self.mapped);
            put_record(out, record::MAPPED, &payload);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::tests::{rank_items, stream_chunk};
    use crate::EventKind;

    #[test]
    fn a_chunk_meeting_more_addresses_than_the_table_holds_round_trips() {
        // 60 k allocations never freed and 30 k frees of blocks from elsewhere: some 150 k
        // addresses (ends included) against a table that starts at 64 k slots, so it grows
        // twice with entries of every state in it.
        let header = ChunkHeader {
            tid: 2,
            base_seq: 1,
            base_time: 0,
        };
        let mut items = Vec::new();
        let mut seq = 1;
        for i in 0..90_000u64 {
            let op = if i % 3 == 2 {
                EventKind::Free {
                    addr: 0x7000_0000_0000 + i * 48,
                }
            } else {
                EventKind::Alloc {
                    kind: AllocKind::Malloc,
                    addr: 0x1000_0000 + i * 4096 + (i % 7) * 16,
                    size: 24 + i % 2000,
                    stack: (i % 5) as u32,
                }
            };
            items.push(Item::Event {
                seq,
                time: 0,
                kind: op,
            });
            seq += 1 + i % 3;
        }
        // Then frees of allocations made before the table grew, and reuses of their addresses.
        for i in (0..90_000u64).filter(|i| i % 3 == 0).take(5_000) {
            let addr = 0x1000_0000 + i * 4096 + (i % 7) * 16;
            items.push(Item::Event {
                seq,
                time: 1,
                kind: EventKind::Free { addr },
            });
            items.push(Item::Event {
                seq: seq + 1,
                time: 1,
                kind: EventKind::Alloc {
                    kind: AllocKind::Malloc,
                    addr,
                    size: 24 + i % 2000,
                    stack: 1,
                },
            });
            seq += 2;
        }
        // Growing must not change what the table answers: the same bytes as from a table that
        // never grows, and from one that grows from a tenth of the size many times.
        let stream = stream_chunk(header, &items);
        let mut outs = Vec::new();
        for slots in [1 << 10, 1 << 16, 1 << 20] {
            let mut c = Transcoder::new();
            c.blocks = AddrTable::with_slots(slots);
            let mut out = Vec::new();
            c.transcode(&stream, 1, &mut out).unwrap();
            outs.push(out);
        }
        assert!(outs[0] == outs[2] && outs[1] == outs[2]);
        // Nor does the generation count's wrap (the table is then zeroed).
        let mut c = Transcoder::new();
        c.blocks.generation = GEN_MASK - 1;
        for _ in 0..3 {
            let mut out = Vec::new();
            c.transcode(&stream, 1, &mut out).unwrap();
            assert!(out == outs[1]);
        }
        assert_eq!(c.blocks.generation, 2);
        let (_, back) = rank_items(&outs[1]);
        assert_eq!(back.len(), items.len());
        assert!(back == items, "the chunk does not round-trip");
    }
}
