//! Decoding events chunks (every encoding) and transcoding the tracker's fast encoding into the
//! compact one.
//!
//! The tracker's threads append events in the simple *stream* encoding (`EVENTS`, one op byte and
//! varints per event: cheap to write on the hot path). The writer thread turns each chunk into
//! the *rank* encoding (`EVENTS_R`) before it reaches the file: fields split into columns, each
//! number split into a token byte (its magnitude, compressed with zstd column by column) and raw
//! low bits, and every address predicted from the chunk's own history. A free names its block by
//! its rank among the blocks still live (1 = the newest); an allocation reuses an address freed
//! a moment ago, or starts where a block allocated earlier ends (an allocator splitting free
//! memory), and a reused small block predicts the size. Ops go two to a byte. Each chunk still
//! decodes on its own. The earlier encodings, `EVENTS_Z` (version 2) and `EVENTS_T` (version 3),
//! are still read.

use crate::{
    put_uvarint, unzigzag, zigzag, AllocKind, ChunkHeader, Cursor, EventKind, FormatError,
};
use crate::{Item, StreamDecoder};

// ---------------------------------------------------------------- compact encodings (EVENTS_Z, EVENTS_T)

// Op codes of the compact encodings' op column.
const Z_ALLOC_REUSED: u8 = 0x00; // + kind: the address was freed earlier in this chunk
const Z_ALLOC_NEW: u8 = 0x10; // + kind: address as a delta from the previous such address
const Z_FREE_KNOWN: u8 = 0x20; // the block was allocated earlier in this chunk
const Z_FREE_OTHER: u8 = 0x21;
const Z_REALLOC_FREE_KNOWN: u8 = 0x22;
const Z_REALLOC_FREE_OTHER: u8 = 0x23;
const Z_REALLOC_FAILED: u8 = 0x24;
const Z_NODE: u8 = 0x30;

// Fields of an event, each a column of its own in `EVENTS_T`.
const F_OPS: usize = 0;
const F_SEQ: usize = 1;
const F_TIME: usize = 2;
const F_FREE_KNOWN: usize = 3;
const F_FREE_OTHER: usize = 4;
const F_ALLOC_REUSED: usize = 5;
const F_ALLOC_NEW: usize = 6;
const F_SIZE: usize = 7;
const F_STACK: usize = 8;
const F_NODE: usize = 9;
const FIELDS: usize = 10;

/// Which column holds each field: `EVENTS_T` gives every field its own; `EVENTS_Z` kept the four
/// address fields in one column.
const T_COLUMNS: [usize; MAX_COLUMNS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
const Z_COLUMNS: [usize; MAX_COLUMNS] = [0, 1, 2, 3, 3, 3, 3, 4, 5, 6];
const Z_COLUMN_COUNT: usize = 7;

// Columns of `EVENTS_R`.
const R_OPS: usize = 0;
const R_SEQ: usize = 1;
const R_TIME: usize = 2;
const R_FREE: usize = 3;
const R_ALLOC: usize = 4;
const R_SIZE: usize = 5;
const R_SIZE_REL: usize = 6;
const R_STACK: usize = 7;
const R_NODE: usize = 8;
const R_KIND: usize = 9;
const R_FIELDS: usize = 10;
const MAX_COLUMNS: usize = R_FIELDS;

// Op classes of `EVENTS_R`, three to an ops byte (`a * 36 + b * 6 + c`).
const C_MALLOC: u8 = 0;
const C_ALLOC_OTHER: u8 = 1; // any other kind: the kind column says which
const C_FREE: u8 = 2;
const C_REALLOC_FREE: u8 = 3;
const C_REALLOC_FAILED: u8 = 4;
const C_NODE: u8 = 5;
const CLASSES: u8 = 6;

// The address columns' symbols say how the address is given as well as the number's token.
// An allocation's address: reused (a free `v` back), after (the end of the block allocated `v`
// back), or new (a zigzag delta from the last new address, in short tokens).
const A_REUSED: u8 = 0;
const A_AFTER: u8 = 64;
const A_NEW: u8 = 128;
// A free's block: by rank among the live blocks allocated in this chunk, or another (a zigzag
// delta from the last such address, in short tokens).
const F_RANK: u8 = 0;
const F_OTHER: u8 = 128;

/// Where the next block starts after a block of `size` bytes at `addr`, in glibc's layout: 8
/// bytes of header, 16-byte granules, 32 bytes at least. Other allocators only predict less.
#[inline]
fn block_end(addr: u64, size: u64) -> u64 {
    addr.wrapping_add((size.saturating_add(8 + 15) & !15).max(32))
}

/// Blocks up to this size are reused by size class (glibc's tcache and fast bins): a block
/// reused from one predicts the new size.
const SMALL_BLOCK: u64 = 1032;

/// A freed block whose size the chunk does not know (allocated before the chunk).
const UNKNOWN_SIZE: u64 = u64::MAX;

/// The live blocks among a chunk's allocations (by allocation index): a bitmap, with a count per
/// 512 allocations, so a rank from the newest is a few loads and popcounts away.
#[derive(Default)]
struct LiveSet {
    words: Vec<u64>,
    groups: Vec<u16>,
}

/// Words per group count.
const GROUP: usize = 8;

impl LiveSet {
    fn clear(&mut self) {
        self.words.clear();
        self.groups.clear();
    }

    #[inline(always)]
    fn insert(&mut self, i: usize) {
        let w = i >> 6;
        if w >= self.words.len() {
            // Whole groups: a rank then reads its group's words without a bounds check each.
            self.words.resize((w / GROUP + 1) * GROUP, 0);
            self.groups.resize(w / GROUP + 1, 0);
        }
        let bit = 1u64 << (i & 63);
        if self.words[w] & bit == 0 {
            self.words[w] |= bit;
            self.groups[w / GROUP] += 1;
        }
    }

    #[inline(always)]
    fn remove(&mut self, i: usize) {
        let w = i >> 6;
        let bit = 1u64 << (i & 63);
        if let Some(word) = self.words.get_mut(w) {
            if *word & bit != 0 {
                *word &= !bit;
                self.groups[w / GROUP] -= 1;
            }
        }
    }

    /// The index of the live block of rank `r` (1 = the newest).
    #[inline]
    fn select(&self, r: u64) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has the instruction (just checked).
            return unsafe { self.select_popcnt(r) };
        }
        self.select_any(r)
    }

    // Compiled twice: a software popcount costs a dozen instructions where the CPU's costs one,
    // and x86-64's baseline lacks it (this workspace builds for x86-64-v2, which has it; a build
    // of this crate elsewhere may not).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    unsafe fn select_popcnt(&self, r: u64) -> Option<usize> {
        self.select_any(r)
    }

    /// How many live blocks have an index of `i` or more. The transcoder calls it on every
    /// free of a block of its chunk; `.cargo/config.toml` builds for x86-64-v2, so its popcounts
    /// are single instructions.
    #[inline(always)]
    fn rank(&self, i: usize) -> u64 {
        let w = i >> 6;
        let Some(&first) = self.words.get(w) else {
            return 0;
        };
        let mut n = (first >> (i & 63)).count_ones() as u64;
        // The group's words after `w`: all eight looked at, those before masked out, so the
        // loop's end is always the same (where `w` lies is random).
        let start = w / GROUP * GROUP;
        if let Some(group) = self.words.get(start..start + GROUP) {
            for (k, x) in group.iter().enumerate() {
                n += x.count_ones() as u64 & ((start + k > w) as u64).wrapping_neg();
            }
        }
        n + self.groups[w / GROUP + 1..]
            .iter()
            .map(|&g| g as u64)
            .sum::<u64>()
    }

    /// The group holding the live block of rank `r` (> 0), and that block's rank within it.
    /// Eight groups' counts at a time, newest first: their running sums in one vector, compared
    /// with `r` at once (where the search stops is as good as random, so branches there would
    /// mispredict). Only the loop over eight-group steps branches, and a rank usually lies among
    /// the newest groups.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn select_group(&self, mut r: u64) -> Option<(usize, u64)> {
        use std::arch::x86_64::*;
        let groups = &self.groups;
        let mut end = groups.len();
        loop {
            let start = end.saturating_sub(8);
            // Newest first: lane 0 holds group end - 1. A group counts at most 512, so eight
            // sum to at most 4096 and fit i16 lanes.
            let mut c = [0i16; 8];
            for (lane, &g) in groups[start..end].iter().rev().enumerate() {
                c[lane] = g as i16;
            }
            // SAFETY: SSE2 is part of x86-64; `c` and `sums` are 16 bytes each.
            let (mask, sums) = unsafe {
                let mut v = _mm_loadu_si128(c.as_ptr() as *const __m128i);
                v = _mm_add_epi16(v, _mm_slli_si128::<2>(v));
                v = _mm_add_epi16(v, _mm_slli_si128::<4>(v));
                v = _mm_add_epi16(v, _mm_slli_si128::<8>(v));
                let below = _mm_set1_epi16((r.min(i16::MAX as u64) - 1) as i16);
                let mut sums = [0i16; 8];
                _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, v);
                (_mm_movemask_epi8(_mm_cmpgt_epi16(v, below)) as u32, sums)
            };
            if mask != 0 {
                // The first lane whose running sum reaches r; the lanes before it are passed.
                let lane = (mask.trailing_zeros() / 2) as usize;
                let passed = if lane == 0 { 0 } else { sums[lane - 1] as u64 };
                return Some((end - 1 - lane, r - passed));
            }
            if start == 0 {
                return None;
            }
            r -= sums[7] as u64;
            end = start;
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[inline(always)]
    fn select_group(&self, mut r: u64) -> Option<(usize, u64)> {
        let groups = &self.groups;
        let mut end = groups.len();
        loop {
            let start = end.saturating_sub(4);
            let four: u64 = groups[start..end].iter().map(|&c| c as u64).sum();
            if four >= r {
                break;
            }
            if start == 0 {
                return None;
            }
            r -= four;
            end = start;
        }
        let count = |k: usize| end.checked_sub(k).map_or(0, |g| groups[g] as u64);
        let (c1, c2, c3) = (count(1), count(2), count(3));
        let passed = (c1 < r) as usize + (c1 + c2 < r) as usize + (c1 + c2 + c3 < r) as usize;
        Some((end - 1 - passed, r - [0, c1, c1 + c2, c1 + c2 + c3][passed]))
    }

    #[inline(always)]
    fn select_any(&self, r: u64) -> Option<usize> {
        if r == 0 {
            return None;
        }
        let (group, mut r) = self.select_group(r)?;
        // Its eight words, newest first, the same way.
        let top = group * GROUP + GROUP - 1;
        let mut below = [0u64; GROUP + 1];
        let mut words = [0u64; GROUP];
        for k in 0..GROUP {
            words[k] = top
                .checked_sub(k)
                .and_then(|w| self.words.get(w))
                .copied()
                .unwrap_or(0);
            below[k + 1] = below[k] + words[k].count_ones() as u64;
        }
        let passed: usize = (1..GROUP).map(|k| (below[k] < r) as usize).sum();
        r -= below[passed];
        let x = words[passed];
        let c = x.count_ones() as u64;
        if c < r {
            return None;
        }
        // The r-th set bit from the top is the (c - r)-th from the bottom.
        Some(((top - passed) << 6) | select_bit(x, (c - r) as u32) as usize)
    }
}

/// Position of the `j`-th (from 0) set bit of `x`, counting from the least significant; `x` has
/// more than `j` set bits.
#[inline(always)]
fn select_bit(mut x: u64, mut j: u32) -> u32 {
    let mut pos = 0;
    // Without branches: which half holds the bit is as good as random.
    for half in [32, 16, 8] {
        let low = (x & ((1u64 << half) - 1)).count_ones();
        let upper = ((j >= low) as u32).wrapping_neg();
        j -= low & upper;
        x >>= half & upper;
        pos += half & upper;
    }
    pos + SELECT_IN_BYTE[(x & 0xff) as usize][(j & 7) as usize] as u32
}

/// `SELECT_IN_BYTE[b][j]`: position of the `j`-th set bit of byte `b`.
static SELECT_IN_BYTE: [[u8; 8]; 256] = {
    let mut t = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let (mut bit, mut j) = (0, 0);
        while bit < 8 {
            if b & (1 << bit) != 0 {
                t[b][j] = bit as u8;
                j += 1;
            }
            bit += 1;
        }
        b += 1;
    }
    t
};

/// Largest decompressed column block accepted (damage guard: a chunk holds what one thread
/// buffered, a few hundred KiB of stream encoding, and its columns are no larger).
const MAX_BLOCK: u64 = 1 << 26;

/// Splits numbers into a token byte and extra bits: numbers below `D` are their own token; larger
/// ones are named by their bit length and the `M` bits below the top one, and the remaining low
/// bits follow raw. zstd's entropy coder then sees a small alphabet per column, and the bits it
/// could not compress anyway skip it.
struct Tokens<const D: u64, const M: u32>;

/// The tokens of most columns: 256 for every u64.
type Long = Tokens<16, 2>;
/// Short tokens, for fields that share a column's symbols with another: 128 for every u64.
type Short = Tokens<4, 1>;

impl<const D: u64, const M: u32> Tokens<D, M> {
    /// Bit length of the smallest number that is not its own token.
    const FIRST_LEN: u32 = 64 - D.leading_zeros();

    /// The token of `v`, how many extra bits follow, and those bits.
    #[inline]
    fn split(v: u64) -> (u8, u32, u64) {
        if v < D {
            return (v as u8, 0, 0);
        }
        let len = 64 - v.leading_zeros();
        let extra = len - 1 - M;
        let top = (v >> extra) & ((1 << M) - 1);
        (
            (D + ((len - Self::FIRST_LEN) << M) as u64 + top) as u8,
            extra,
            v & ((1u64 << extra) - 1),
        )
    }

    /// Number of extra bits that follow token `t`.
    #[inline]
    fn extra(t: u8) -> u32 {
        if (t as u64) < D {
            0
        } else {
            ((t as u64 - D) >> M) as u32 + Self::FIRST_LEN - 1 - M
        }
    }

    /// Value of token `t` with its extra bits `x`.
    #[inline]
    fn value(t: u8, x: u64) -> u64 {
        if (t as u64) < D {
            return t as u64;
        }
        let top = (1 << M) | (t as u64 - D) & ((1 << M) - 1);
        (top << Self::extra(t)) | x
    }
}

/// Appends bit fields least significant bit first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Appends `v`, a number of at most `n <= 64` bits.
    #[inline(always)]
    fn put(&mut self, v: u64, n: u32) {
        debug_assert!(n >= 64 || v >> n == 0);
        if n > 32 {
            self.put32(v & 0xffff_ffff, 32);
            self.put32(v >> 32, n - 32);
        } else {
            self.put32(v, n);
        }
    }

    /// `v` has at most `n <= 32` bits; fewer than 32 bits are pending, so they fit.
    #[inline(always)]
    fn put32(&mut self, v: u64, n: u32) {
        self.acc |= v << self.n;
        self.n += n;
        if self.n >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.n -= 32;
        }
    }

    fn finish(&mut self) {
        while self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n = self.n.saturating_sub(8);
        }
        self.acc = 0;
        self.n = 0;
    }
}

/// What the chunk so far says about an address: one entry of the transcoder's one table.
#[derive(Clone, Copy, Default)]
struct Slot {
    key: u64,
    /// The block's size, at most `u32::MAX` (`u32::MAX` also for a freed block the chunk did not
    /// see allocated): a size only matters when it is at most `SMALL_BLOCK`.
    size: u32,
    /// `LIVE`: allocated in the chunk and not freed (its allocation index); `FREED`: freed in
    /// the chunk and not reused (its free number).
    num: u32,
    /// The latest allocation of the chunk that ends at this address (`NO_END`: none).
    end_of: u32,
    /// The table's generation when the entry was made, shifted left 2, and the state
    /// (`LIVE`, `FREED` or neither) in the low bits.
    tag: u32,
}

const LIVE: u32 = 1;
const FREED: u32 = 2;
const NO_END: u32 = u32::MAX;
const NO_SIZE: u32 = u32::MAX;

/// Addresses the chunk has met (allocated, freed, or where a block ends), open addressing with
/// linear probing. A lookup touches one place in memory (hashbrown's control bytes and buckets
/// are two), and clearing it between chunks is a generation count, not a pass over a table
/// larger than the core's L1 and L2 caches care to refill.
struct AddrTable {
    slots: Vec<Slot>,
    /// Generations start at 1: zeroed slots are free in every generation.
    generation: u32,
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
        if self.generation >= 1 << 30 {
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
            let tag = self.slots[i & mask].tag;
            if tag >> 2 != current {
                self.len += 1;
                let s = &mut self.slots[i & mask];
                *s = Slot {
                    key,
                    size: NO_SIZE,
                    num: 0,
                    end_of: NO_END,
                    tag: current << 2,
                };
                return s;
            }
            if self.slots[i & mask].key == key {
                return &mut self.slots[i & mask];
            }
            i = (i & mask) + 1;
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
        for s in old.into_iter().filter(|s| s.tag >> 2 == current) {
            let mut i = self.home(s.key);
            while self.slots[i & mask].tag >> 2 == current {
                i = (i & mask) + 1;
            }
            self.slots[i & mask] = s;
        }
    }
}

/// The transcoder's output columns and extra bits, as they fill.
#[derive(Default)]
struct Columns {
    cols: [Vec<u8>; R_FIELDS],
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
        self.ops = self.ops * CLASSES + class;
        self.nops += 1;
        if self.nops == 3 {
            self.cols[R_OPS].push(self.ops);
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
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl Transcoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Transcodes an `EVENTS` payload (chunk header and stream-encoded items, as the tracker's
    /// threads write it) into a framed `EVENTS_R` record appended to `out`; `level` is zstd's.
    pub fn transcode(
        &mut self,
        payload: &[u8],
        level: i32,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
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
        while let Some(item) = events.next_item()? {
            n_ops += 1;
            let (s, t, event) = match item {
                Item::Node { id, parent, ip } => {
                    cols.op(C_NODE);
                    cols.put(R_NODE, zigzag(id.wrapping_sub(node_prev)));
                    cols.put(R_NODE, id.wrapping_sub(parent));
                    cols.put(R_NODE, zigzag(ip.wrapping_sub(ip_prev)));
                    node_prev = id;
                    ip_prev = ip;
                    continue;
                }
                Item::Event { seq, time, kind } => (seq, time, kind),
            };
            // Each field in the order the decoder reads it: op, seq, time, address, kind, size,
            // stack.
            cols.op(match event {
                EventKind::Alloc {
                    kind: AllocKind::Malloc,
                    ..
                } => C_MALLOC,
                EventKind::Alloc { .. } => C_ALLOC_OTHER,
                EventKind::Free { .. } => C_FREE,
                EventKind::ReallocFree { .. } => C_REALLOC_FREE,
                EventKind::ReallocFailed => C_REALLOC_FAILED,
            });
            cols.put(R_SEQ, s.wrapping_sub(seq));
            cols.put(R_TIME, t.wrapping_sub(time));
            seq = s;
            time = t;
            match event {
                EventKind::Alloc {
                    kind,
                    addr,
                    size,
                    stack,
                } => {
                    let slot = self.blocks.entry(addr);
                    // Only a reused address (given as such) predicts the size.
                    let mut reused = UNKNOWN_SIZE;
                    let given = if slot.tag & 3 == FREED
                        && cols.put_below(R_ALLOC, A_REUSED, A_AFTER, (fcnt - slot.num + 1) as u64)
                    {
                        reused = slot.size as u64;
                        true
                    } else {
                        slot.end_of != NO_END
                            && cols.put_below(
                                R_ALLOC,
                                A_AFTER,
                                A_AFTER,
                                (acnt - slot.end_of) as u64,
                            )
                    };
                    if !given {
                        cols.put_short(R_ALLOC, A_NEW, zigzag(addr.wrapping_sub(new_addr)));
                        new_addr = addr;
                    }
                    slot.tag = (slot.tag & !3) | LIVE;
                    slot.num = acnt;
                    slot.size = size.min(NO_SIZE as u64) as u32;
                    if kind != AllocKind::Malloc {
                        cols.cols[R_KIND].push(kind as u8);
                    }
                    if reused <= SMALL_BLOCK {
                        cols.put(R_SIZE_REL, zigzag(size.wrapping_sub(reused)));
                    } else {
                        cols.put(R_SIZE, size);
                    }
                    cols.put(R_STACK, zigzag((stack as u64).wrapping_sub(stack_prev)));
                    stack_prev = stack as u64;
                    self.blocks.entry(block_end(addr, size)).end_of = acnt;
                    self.live.insert(acnt as usize);
                    acnt += 1;
                }
                EventKind::Free { addr } | EventKind::ReallocFree { addr } => {
                    let slot = self.blocks.entry(addr);
                    let given = slot.tag & 3 == LIVE
                        && cols.put_below(
                            R_FREE,
                            F_RANK,
                            F_OTHER,
                            self.live.rank(slot.num as usize),
                        );
                    let size = if given {
                        self.live.remove(slot.num as usize);
                        slot.size
                    } else {
                        // A block given otherwise stays live for the decoder, which cannot
                        // know it.
                        cols.put_short(R_FREE, F_OTHER, zigzag(addr.wrapping_sub(other_free)));
                        other_free = addr;
                        NO_SIZE
                    };
                    fcnt += 1;
                    slot.tag = (slot.tag & !3) | FREED;
                    slot.num = fcnt;
                    slot.size = size;
                }
                EventKind::ReallocFailed => {}
            }
        }
        while cols.nops != 0 {
            // Padding classes: the op count says where the chunk ends.
            cols.op(0);
        }
        cols.bits.finish();
        // Each column is compressed on its own, so each gets an entropy table fitted to it.
        if self.zstd.as_ref().map(|z| z.0) != Some(level) {
            let z = zstd::bulk::Compressor::new(level).map_err(|_| FormatError::Compression)?;
            self.zstd = Some((level, z));
        }
        let Some((_, z)) = self.zstd.as_mut() else {
            return Err(FormatError::Compression);
        };
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
        crate::put_record(out, crate::record::EVENTS_R, &payload);
        Ok(())
    }
}

/// A column of the decompressed block, read front to back.
#[derive(Clone, Copy, Default)]
struct Col {
    pos: usize,
    end: usize,
}

/// An address from an address field: `v` steps back in `history` (1 = the latest) when `known`,
/// else a zigzag delta from `*running`, which it updates.
#[inline]
fn resolve_addr(
    known: bool,
    v: u64,
    history: &[u64],
    running: &mut u64,
) -> Result<u64, FormatError> {
    if known {
        let i = (history.len() as u64)
            .checked_sub(v)
            .filter(|_| v > 0)
            .ok_or(FormatError::Truncated)?;
        return Ok(history[i as usize]);
    }
    *running = running.wrapping_add(unzigzag(v));
    Ok(*running)
}

thread_local! {
    /// One zstd decompression context per reading thread, reused across chunks.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The column encodings a writer transcodes its chunks into, one per record type: fields in
/// columns, each compressed with zstd on its own, every chunk still decoding on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnEncoding {
    /// `EVENTS_Z` (format version 2): varint columns, four address fields sharing one.
    Varint,
    /// `EVENTS_T` (format version 3): token columns and a raw bit stream of extra bits.
    Token,
    /// `EVENTS_R` (format version 4): `EVENTS_T`'s tokens; frees by rank among live blocks,
    /// three ops to a byte, addresses after block ends, sizes relative to the reused block.
    Rank,
}

impl ColumnEncoding {
    /// The encoding of an events record of type `kind` (`None`: not a column encoding).
    pub fn of_record(kind: u8) -> Option<ColumnEncoding> {
        match kind {
            crate::record::EVENTS_Z => Some(ColumnEncoding::Varint),
            crate::record::EVENTS_T => Some(ColumnEncoding::Token),
            crate::record::EVENTS_R => Some(ColumnEncoding::Rank),
            _ => None,
        }
    }
}

/// Decoder of the compact encodings. Owns the decompressed block (and, for `EVENTS_T`, a copy of
/// the extra bits after it).
pub struct ColumnDecoder {
    block: Vec<u8>,
    cols: [Col; MAX_COLUMNS],
    /// Field to column (`EVENTS_Z` shares one column between the address fields).
    map: [usize; MAX_COLUMNS],
    tokens: bool,
    rank: bool,
    // The extra-bit reader: `acc` holds `nbits` unread bits; `bits` is where it refills from.
    bits: Col,
    acc: u64,
    nbits: u32,
    left: u64,
    seq: u64,
    time: u64,
    allocs: Vec<u64>,
    frees: Vec<u64>,
    new_addr: u64,
    other_free: u64,
    stack_prev: u64,
    node_prev: u64,
    ip_prev: u64,
    // `EVENTS_R` only: addresses and sizes of the chunk's allocations and frees, the live
    // allocations.
    r_allocs: Vec<(u64, u64)>,
    r_frees: Vec<(u64, u64)>,
    live: LiveSet,
    /// Op classes of the last ops byte not yet used: how many, and the three.
    nops: u8,
    ops: [u8; 3],
}

impl ColumnDecoder {
    /// `data` is the `EVENTS_Z` or `EVENTS_T` payload after the chunk header.
    pub fn new(
        data: &[u8],
        header: &ChunkHeader,
        encoding: ColumnEncoding,
    ) -> Result<Self, FormatError> {
        let mut c = Cursor::new(data);
        let (mut block, spans, left) = match encoding {
            ColumnEncoding::Varint => Self::z_block(&mut c)?,
            ColumnEncoding::Token => Self::t_block(&mut c, FIELDS)?,
            ColumnEncoding::Rank => Self::t_block(&mut c, R_FIELDS)?,
        };
        let extra = c.rest();
        let map = match encoding {
            ColumnEncoding::Varint => &Z_COLUMNS,
            ColumnEncoding::Token | ColumnEncoding::Rank => &T_COLUMNS,
        };
        let bits = Col {
            pos: block.len(),
            end: block.len() + extra.len(),
        };
        block.extend_from_slice(extra);
        Ok(ColumnDecoder {
            block,
            cols: spans,
            map: *map,
            tokens: encoding != ColumnEncoding::Varint,
            rank: encoding == ColumnEncoding::Rank,
            bits,
            acc: 0,
            nbits: 0,
            left,
            seq: header.base_seq,
            time: header.base_time,
            allocs: Vec::new(),
            frees: Vec::new(),
            new_addr: 0,
            other_free: 0,
            stack_prev: 0,
            node_prev: 0,
            ip_prev: 0,
            // Allocations and frees are about half of a chunk's ops each.
            r_allocs: Vec::with_capacity(rank_capacity(encoding, left)),
            r_frees: Vec::with_capacity(rank_capacity(encoding, left)),
            live: LiveSet::default(),
            nops: 0,
            ops: [0; 3],
        })
    }

    /// `EVENTS_Z`: one zstd frame holding the op count, the column lengths and the columns.
    fn z_block(c: &mut Cursor<'_>) -> Result<(Vec<u8>, [Col; MAX_COLUMNS], u64), FormatError> {
        let raw_len = c.uvarint()?;
        if raw_len > MAX_BLOCK {
            return Err(FormatError::Compression);
        }
        let block = zstd::bulk::decompress(c.bytes(c.remaining())?, raw_len as usize)
            .map_err(|_| FormatError::Compression)?;
        if block.len() as u64 != raw_len {
            return Err(FormatError::Compression);
        }
        let mut b = Cursor::new(&block);
        let left = b.uvarint()?;
        let mut spans = [Col::default(); MAX_COLUMNS];
        let mut pos = 0u64;
        let mut lens = [0u64; Z_COLUMN_COUNT];
        for l in lens.iter_mut() {
            *l = b.uvarint()?;
        }
        pos += b.pos() as u64;
        for (span, &len) in spans.iter_mut().zip(&lens) {
            let end = pos
                .checked_add(len)
                .filter(|&e| e <= block.len() as u64)
                .ok_or(FormatError::Truncated)?;
            *span = Col {
                pos: pos as usize,
                end: end as usize,
            };
            pos = end;
        }
        Ok((block, spans, left))
    }

    /// `EVENTS_T` and `EVENTS_R`: the op count, each of the `ncols` columns' length and packed
    /// length, the columns (each a zstd frame, or stored when its packed length is 0); the extra
    /// bits follow.
    fn t_block(
        c: &mut Cursor<'_>,
        ncols: usize,
    ) -> Result<(Vec<u8>, [Col; MAX_COLUMNS], u64), FormatError> {
        let left = c.uvarint()?;
        let mut lens = [(0u64, 0u64); MAX_COLUMNS];
        let mut total = 0u64;
        for l in lens[..ncols].iter_mut() {
            *l = (c.uvarint()?, c.uvarint()?);
            total = total.saturating_add(l.0);
        }
        if total > MAX_BLOCK {
            return Err(FormatError::Compression);
        }
        // Room for the extra bits too, which the caller appends.
        // Zeroed by the allocator (untouched pages until written): a damaged length that passes
        // the bound costs address space, not memory, until decompression fails.
        let mut block = vec![0u8; total as usize];
        let mut spans = [Col::default(); MAX_COLUMNS];
        let mut pos = 0usize;
        for (span, &(raw, packed)) in spans.iter_mut().zip(&lens) {
            let out = &mut block[pos..pos + raw as usize];
            if packed == 0 {
                out.copy_from_slice(c.bytes(raw as usize)?);
            } else {
                let z = c.bytes(usize::try_from(packed).map_err(|_| FormatError::Truncated)?)?;
                let n = DCTX
                    .with(|d| {
                        let mut d = d.borrow_mut();
                        if d.is_none() {
                            *d = zstd::bulk::Decompressor::new().ok();
                        }
                        d.as_mut().map(|d| d.decompress_to_buffer(z, out))
                    })
                    .and_then(|r| r.ok())
                    .ok_or(FormatError::Compression)?;
                if n as u64 != raw {
                    return Err(FormatError::Compression);
                }
            }
            *span = Col {
                pos,
                end: pos + raw as usize,
            };
            pos += raw as usize;
        }
        Ok((block, spans, left))
    }

    #[inline]
    fn u8(&mut self, f: usize) -> Result<u8, FormatError> {
        let col = &mut self.cols[self.map[f]];
        if col.pos >= col.end {
            return Err(FormatError::Truncated);
        }
        let b = self.block[col.pos];
        col.pos += 1;
        Ok(b)
    }

    /// Reads `n` (at most 56) extra bits.
    #[inline]
    fn read_bits(&mut self, n: u32) -> Result<u64, FormatError> {
        if self.nbits < n {
            let b = &mut self.bits;
            if b.pos + 8 <= b.end {
                // Branch-free refill: bits beyond the whole bytes taken are reloaded next time
                // with the same values, so OR-ing them in early is harmless.
                let w = u64::from_le_bytes(self.block[b.pos..b.pos + 8].try_into().unwrap());
                self.acc |= w << self.nbits;
                b.pos += ((63 - self.nbits) >> 3) as usize;
                self.nbits |= 56;
            } else {
                while self.nbits <= 56 && b.pos < b.end {
                    self.acc |= (self.block[b.pos] as u64) << self.nbits;
                    b.pos += 1;
                    self.nbits += 8;
                }
                if self.nbits < n {
                    return Err(FormatError::Truncated);
                }
            }
        }
        let v = self.acc & ((1u64 << n) - 1);
        self.acc >>= n;
        self.nbits -= n;
        Ok(v)
    }

    /// The next value of field `f`.
    #[inline(always)]
    fn uv(&mut self, f: usize) -> Result<u64, FormatError> {
        if self.tokens {
            // Every field has its own column here: no mapping.
            let col = &mut self.cols[f];
            if col.pos >= col.end {
                return Err(FormatError::Truncated);
            }
            let t = self.block[col.pos];
            col.pos += 1;
            if t < 16 {
                return Ok(t as u64);
            }
            return self.token_rest::<16, 2>(t);
        }
        let col = &mut self.cols[self.map[f]];
        crate::read_uvarint(&self.block, &mut col.pos, col.end)
    }

    /// The number of token `t` of kind `Tokens<D, M>`, with its extra bits.
    #[inline]
    fn token_rest<const D: u64, const M: u32>(&mut self, t: u8) -> Result<u64, FormatError> {
        if (t as u64) < D {
            return Ok(t as u64);
        }
        let n = Tokens::<D, M>::extra(t);
        let x = if n <= 56 {
            self.read_bits(n)?
        } else {
            let lo = self.read_bits(32)?;
            lo | (self.read_bits(n - 32)? << 32)
        };
        Ok(Tokens::<D, M>::value(t, x))
    }

    /// The next value of field `f`, zigzag-decoded (a wrapping delta).
    #[inline(always)]
    fn iv(&mut self, f: usize) -> Result<u64, FormatError> {
        Ok(unzigzag(self.uv(f)?))
    }

    #[inline]
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        if self.rank {
            return self.next_rank_item();
        }
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let code = self.u8(F_OPS)?;
        if code == Z_NODE {
            let id = self.node_prev.wrapping_add(self.iv(F_NODE)?);
            let parent = id.wrapping_sub(self.uv(F_NODE)?);
            let ip = self.ip_prev.wrapping_add(self.iv(F_NODE)?);
            self.node_prev = id;
            self.ip_prev = ip;
            return Ok(Some(Item::Node { id, parent, ip }));
        }
        self.seq = self.seq.wrapping_add(self.uv(F_SEQ)?);
        self.time = self.time.wrapping_add(self.uv(F_TIME)?);
        let kind = match code {
            c if c < Z_ALLOC_NEW + 0x10 => {
                let kind =
                    AllocKind::from_u8((c - Z_ALLOC_REUSED) & 0x0f).ok_or(FormatError::BadOp(c))?;
                let reused = c < Z_ALLOC_NEW;
                let v = self.uv(if reused { F_ALLOC_REUSED } else { F_ALLOC_NEW })?;
                let addr = resolve_addr(reused, v, &self.frees, &mut self.new_addr)?;
                self.allocs.push(addr);
                let size = self.uv(F_SIZE)?;
                self.stack_prev = self.stack_prev.wrapping_add(self.iv(F_STACK)?);
                EventKind::Alloc {
                    kind,
                    addr,
                    size,
                    // u32 ids: see `StreamDecoder`.
                    stack: self.stack_prev as u32,
                }
            }
            Z_FREE_KNOWN | Z_REALLOC_FREE_KNOWN | Z_FREE_OTHER | Z_REALLOC_FREE_OTHER => {
                let known = code == Z_FREE_KNOWN || code == Z_REALLOC_FREE_KNOWN;
                let v = self.uv(if known { F_FREE_KNOWN } else { F_FREE_OTHER })?;
                let addr = resolve_addr(known, v, &self.allocs, &mut self.other_free)?;
                self.frees.push(addr);
                if code == Z_FREE_KNOWN || code == Z_FREE_OTHER {
                    EventKind::Free { addr }
                } else {
                    EventKind::ReallocFree { addr }
                }
            }
            Z_REALLOC_FAILED => EventKind::ReallocFailed,
            c => return Err(FormatError::BadOp(c)),
        };
        Ok(Some(Item::Event {
            seq: self.seq,
            time: self.time,
            kind,
        }))
    }

    /// `EVENTS_R`: the next item.
    #[inline]
    fn next_rank_item(&mut self) -> Result<Option<Item>, FormatError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        if self.nops == 0 {
            let b = self.u8(R_OPS)?;
            if b >= CLASSES * CLASSES * CLASSES {
                return Err(FormatError::BadOp(b));
            }
            self.ops = [b / 36, b / 6 % 6, b % 6];
            self.nops = 3;
        }
        let class = self.ops[3 - self.nops as usize];
        self.nops -= 1;
        if class == C_NODE {
            let id = self.node_prev.wrapping_add(self.iv(R_NODE)?);
            let parent = id.wrapping_sub(self.uv(R_NODE)?);
            let ip = self.ip_prev.wrapping_add(self.iv(R_NODE)?);
            self.node_prev = id;
            self.ip_prev = ip;
            return Ok(Some(Item::Node { id, parent, ip }));
        }
        self.seq = self.seq.wrapping_add(self.uv(R_SEQ)?);
        self.time = self.time.wrapping_add(self.uv(R_TIME)?);
        let kind = match class {
            C_MALLOC | C_ALLOC_OTHER => {
                let t = self.u8(R_ALLOC)?;
                let (addr, reused) = if t < A_AFTER {
                    let v = self.token_rest::<16, 2>(t)?;
                    self.r_frees[back(self.r_frees.len(), v)?]
                } else if t < A_NEW {
                    let v = self.token_rest::<16, 2>(t - A_AFTER)?;
                    let (a, size) = self.r_allocs[back(self.r_allocs.len(), v)?];
                    (block_end(a, size), UNKNOWN_SIZE)
                } else {
                    let d = unzigzag(self.token_rest::<4, 1>(t - A_NEW)?);
                    self.new_addr = self.new_addr.wrapping_add(d);
                    (self.new_addr, UNKNOWN_SIZE)
                };
                let kind = if class == C_MALLOC {
                    AllocKind::Malloc
                } else {
                    let k = self.u8(R_KIND)?;
                    AllocKind::from_u8(k).ok_or(FormatError::BadOp(k))?
                };
                let size = if reused <= SMALL_BLOCK {
                    reused.wrapping_add(self.iv(R_SIZE_REL)?)
                } else {
                    self.uv(R_SIZE)?
                };
                self.stack_prev = self.stack_prev.wrapping_add(self.iv(R_STACK)?);
                self.live.insert(self.r_allocs.len());
                self.r_allocs.push((addr, size));
                EventKind::Alloc {
                    kind,
                    addr,
                    size,
                    // u32 ids: see `StreamDecoder`.
                    stack: self.stack_prev as u32,
                }
            }
            C_FREE | C_REALLOC_FREE => {
                let t = self.u8(R_FREE)?;
                let (addr, size) = if t < F_OTHER {
                    let r = self.token_rest::<16, 2>(t)?;
                    let i = self.live.select(r).ok_or(FormatError::Truncated)?;
                    let block = *self.r_allocs.get(i).ok_or(FormatError::Truncated)?;
                    self.live.remove(i);
                    block
                } else {
                    let d = unzigzag(self.token_rest::<4, 1>(t - F_OTHER)?);
                    self.other_free = self.other_free.wrapping_add(d);
                    (self.other_free, UNKNOWN_SIZE)
                };
                self.r_frees.push((addr, size));
                if class == C_FREE {
                    EventKind::Free { addr }
                } else {
                    EventKind::ReallocFree { addr }
                }
            }
            C_REALLOC_FAILED => EventKind::ReallocFailed,
            c => return Err(FormatError::BadOp(c)),
        };
        Ok(Some(Item::Event {
            seq: self.seq,
            time: self.time,
            kind,
        }))
    }
}

/// Room to reserve for a rank chunk's allocations or frees (`left` is damage-checked only by the
/// block size bound, so this stays modest).
fn rank_capacity(encoding: ColumnEncoding, left: u64) -> usize {
    if encoding == ColumnEncoding::Rank {
        (left / 2 + 16).min(1 << 16) as usize
    } else {
        0
    }
}

/// The index `v` steps back from the end of a history of `len` entries (1 = the latest).
#[inline]
fn back(len: usize, v: u64) -> Result<usize, FormatError> {
    (len as u64)
        .checked_sub(v)
        .filter(|_| v > 0)
        .map(|i| i as usize)
        .ok_or(FormatError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_stream;

    fn stream_chunk(header: ChunkHeader, items: &[Item]) -> Vec<u8> {
        encode_stream(&header, items)
    }

    /// The header and items of a framed `EVENTS_R` record.
    fn compacted_items(record: &[u8]) -> (ChunkHeader, Vec<Item>) {
        let crate::Next::Record(r) = crate::next_record(record, 0) else {
            panic!("not a record")
        };
        assert_eq!(r.kind, crate::record::EVENTS_R);
        let mut c = Cursor::new(r.payload);
        let h = ChunkHeader::decode(&mut c).unwrap();
        let mut z = ColumnDecoder::new(c.rest(), &h, ColumnEncoding::Rank).unwrap();
        let mut items = Vec::new();
        while let Some(it) = z.next_item().unwrap() {
            items.push(it);
        }
        (h, items)
    }

    fn stream_items(stream: &[u8]) -> Vec<Item> {
        let mut c = Cursor::new(stream);
        let h = ChunkHeader::decode(&mut c).unwrap();
        let mut s = StreamDecoder::new(c.rest(), &h);
        let mut items = Vec::new();
        while let Some(it) = s.next_item().unwrap() {
            items.push(it);
        }
        items
    }

    #[test]
    fn compact_round_trips_every_op() {
        let header = ChunkHeader {
            tid: 7,
            base_seq: 100,
            base_time: 5,
        };
        let ev = |seq, op| Item::Event {
            seq,
            time: 5 + seq / 3,
            kind: op,
        };
        let alloc = |kind, addr, size, stack| EventKind::Alloc {
            kind,
            addr,
            size,
            stack,
        };
        let items = vec![
            Item::Node {
                id: 1,
                parent: 0,
                ip: 0x5555_0000_1234,
            },
            Item::Node {
                id: 2,
                parent: 1,
                ip: 0x5555_0000_1000,
            },
            ev(100, alloc(AllocKind::Malloc, 0x1000, 24, 2)),
            ev(101, alloc(AllocKind::Calloc, 0x2000, 100, 1)),
            ev(103, EventKind::Free { addr: 0x1000 }),
            ev(104, alloc(AllocKind::Malloc, 0x1000, 16, 2)), // reuses the freed address
            ev(105, EventKind::ReallocFree { addr: 0x2000 }),
            ev(106, alloc(AllocKind::Realloc, 0x9000, 500, 1)),
            ev(107, EventKind::ReallocFree { addr: 0x9000 }),
            ev(108, EventKind::ReallocFailed),
            ev(109, EventKind::Free { addr: 0x7777 }), // allocated in another chunk
            Item::Node {
                id: 9,
                parent: 2,
                ip: 0x7f00_0000_0042,
            },
            ev(110, alloc(AllocKind::PosixMemalign, 0x7777, 64, 9)),
            ev(111, alloc(AllocKind::RustAlloc, 0x1, 0, 0)),
        ];
        let stream = stream_chunk(header, &items);
        assert_eq!(stream_items(&stream), items);

        let mut out = Vec::new();
        Transcoder::new().transcode(&stream, 1, &mut out).unwrap();
        let (h2, back) = compacted_items(&out);
        assert_eq!(h2, header);
        assert_eq!(back, items);
    }

    #[test]
    fn tokens_round_trip_at_every_bit_length() {
        let mut values = vec![0u64, 1, 15, 16, 17, 19, 20, 31, 32, u64::MAX, u64::MAX - 1];
        for bits in 5..64 {
            let b = 1u64 << bits;
            values.extend([b - 1, b, b + 1, b | (b >> 1), b | (b >> 2) | 1]);
        }
        for &v in &values {
            let (t, n, x) = Long::split(v);
            assert_eq!(n, Long::extra(t), "{v}");
            assert_eq!(x >> n, 0, "{v}");
            assert_eq!(Long::value(t, x), v, "{v}");
            let (t, n, x) = Short::split(v);
            assert!(t < 128, "{v}");
            assert_eq!(n, Short::extra(t), "{v}");
            assert_eq!(x >> n, 0, "{v}");
            assert_eq!(Short::value(t, x), v, "{v}");
        }
        // And through a chunk: sizes and stack ids of every magnitude, addresses far apart.
        let header = ChunkHeader {
            tid: 3,
            base_seq: 0,
            base_time: 0,
        };
        let items: Vec<Item> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| Item::Event {
                seq: 1 + i as u64 * 1000,
                time: i as u64 * 77,
                kind: EventKind::Alloc {
                    kind: AllocKind::Malloc,
                    addr: v.rotate_left(17) ^ 0x5555,
                    size: v,
                    stack: (v >> 3) as u32,
                },
            })
            .collect();
        let mut out = Vec::new();
        Transcoder::new()
            .transcode(&stream_chunk(header, &items), 3, &mut out)
            .unwrap();
        let crate::Next::Record(r) = crate::next_record(&out, 0) else {
            panic!("not a record")
        };
        let mut c = Cursor::new(r.payload);
        let h = ChunkHeader::decode(&mut c).unwrap();
        let mut z = ColumnDecoder::new(c.rest(), &h, ColumnEncoding::Rank).unwrap();
        let mut back = Vec::new();
        while let Some(it) = z.next_item().unwrap() {
            back.push(it);
        }
        assert_eq!(back, items);
    }

    #[test]
    fn live_set_ranks_and_selects() {
        for j in 0..64 {
            let x = u64::MAX;
            assert_eq!(select_bit(x, j), j);
        }
        assert_eq!(select_bit(0b1010_0000_0000_0001, 0), 0);
        assert_eq!(select_bit(0b1010_0000_0000_0001, 1), 13);
        assert_eq!(select_bit(0b1010_0000_0000_0001, 2), 15);
        assert_eq!(select_bit(1 << 63 | 1 << 40, 1), 63);
        // Against a plain list, across words and groups.
        let mut set = LiveSet::default();
        let mut plain: Vec<usize> = Vec::new();
        let mut state = 7u64;
        for i in 0..5000 {
            set.insert(i);
            plain.push(i);
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if state >> 62 != 0 && !plain.is_empty() {
                let r = 1 + (state >> 20) as usize % plain.len();
                let want = plain[plain.len() - r];
                assert_eq!(set.rank(want), r as u64);
                assert_eq!(set.select(r as u64), Some(want));
                set.remove(want);
                plain.retain(|&x| x != want);
            }
        }
        assert_eq!(set.select(plain.len() as u64 + 1), None);
        assert_eq!(set.select(0), None);
    }

    #[test]
    fn stream_items_read_the_same_far_from_the_end_and_near_it() {
        // Values of every varint length (1 to 10 bytes), so the unchecked reads far from the
        // end meet each case, their fallback to byte-wise reading included; the last items are
        // read with bounds checks.
        let header = ChunkHeader {
            tid: 3,
            base_seq: 1,
            base_time: 0,
        };
        let mut items = Vec::new();
        let (mut seq, mut time) = (1u64, 0u64);
        for (i, bits) in (0..64u32).cycle().take(400).enumerate() {
            let v = (1u64 << bits) | (i as u64 & 1);
            seq = seq.wrapping_add(v);
            time = time.wrapping_add(v >> 3);
            let op = match i % 4 {
                0 => EventKind::Alloc {
                    kind: AllocKind::Malloc,
                    addr: v.rotate_left(7),
                    size: v,
                    stack: (v >> 1) as u32,
                },
                1 => EventKind::Free { addr: !v },
                2 => EventKind::ReallocFailed,
                _ => EventKind::ReallocFree { addr: v },
            };
            items.push(Item::Event {
                seq,
                time,
                kind: op,
            });
            if i % 7 == 0 {
                items.push(Item::Node {
                    id: v,
                    parent: u64::MAX - v,
                    ip: v ^ 0x5555,
                });
            }
        }
        let stream = stream_chunk(header, &items);
        assert_eq!(stream_items(&stream), items);
        // Damaged or cut short: errors or other items, never a read past the end.
        let read_all = |bytes: &[u8]| {
            let mut c = Cursor::new(bytes);
            if let Ok(h) = ChunkHeader::decode(&mut c) {
                let mut s = StreamDecoder::new(c.rest(), &h);
                while let Ok(Some(_)) = s.next_item() {}
            }
        };
        for i in (0..stream.len()).step_by(3) {
            for flip in [0x80u8, 0xff] {
                let mut d = stream.clone();
                d[i] ^= flip;
                read_all(&d);
            }
            read_all(&stream[..i]);
        }
    }

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
        c.blocks.generation = (1 << 30) - 2;
        for _ in 0..3 {
            let mut out = Vec::new();
            c.transcode(&stream, 1, &mut out).unwrap();
            assert!(out == outs[1]);
        }
        assert_eq!(c.blocks.generation, 2);
        let (_, back) = compacted_items(&outs[1]);
        assert_eq!(back.len(), items.len());
        assert!(back == items, "the chunk does not round-trip");
    }

    #[test]
    fn damaged_compact_chunks_are_errors_not_panics() {
        let header = ChunkHeader {
            tid: 1,
            base_seq: 1,
            base_time: 0,
        };
        let items: Vec<Item> = (0..200u64)
            .map(|i| Item::Event {
                seq: 1 + i,
                time: 0,
                kind: if i % 2 == 0 {
                    EventKind::Alloc {
                        kind: AllocKind::Malloc,
                        addr: 0x1000 + i * 16,
                        size: i,
                        stack: 0,
                    }
                } else {
                    EventKind::Free {
                        addr: 0x1000 + (i - 1) * 16,
                    }
                },
            })
            .collect();
        let mut out = Vec::new();
        Transcoder::new()
            .transcode(&stream_chunk(header, &items), 1, &mut out)
            .unwrap();
        for i in 0..out.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut d = out.clone();
                d[i] ^= flip;
                if let crate::Next::Record(r) = crate::next_record(&d, 0) {
                    let mut c = Cursor::new(r.payload);
                    if let Ok(h) = ChunkHeader::decode(&mut c) {
                        if let Ok(mut z) = ColumnDecoder::new(c.rest(), &h, ColumnEncoding::Rank) {
                            for _ in 0..1000 {
                                match z.next_item() {
                                    Ok(Some(_)) => {}
                                    _ => break,
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
