//! Decoding events chunks (every encoding) and transcoding the tracker's fast encoding into the
//! compact one.
//!
//! The tracker's threads append events in the simple *stream* encoding (`EVENTS`, one op byte and
//! varints per event: cheap to write on the hot path). The writer thread turns each chunk into
//! the *token* encoding (`EVENTS_T`) before it reaches the file: fields split into columns,
//! addresses predicted from the chunk's own history (an allocation usually reuses an address
//! freed a moment ago; a free names a block allocated in the same chunk), each number split into
//! a token byte (its magnitude, compressed with zstd column by column) and raw low bits. Each
//! chunk still decodes on its own. Format version 2's `EVENTS_Z` (varint columns in one zstd
//! frame) is still read.

use crate::hash::FastMap;
use crate::{op, put_uvarint, AllocKind, ChunkHeader, Cursor, FormatError};

/// One decoded operation of an events chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Event {
        seq: u64,
        time: u64,
        op: Op,
    },
    /// A stack trie node definition.
    Node {
        id: u64,
        parent: u64,
        ip: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Alloc {
        kind: AllocKind,
        addr: u64,
        size: u64,
        stack: u64,
    },
    Free {
        addr: u64,
    },
    ReallocFree {
        addr: u64,
    },
    ReallocFailed,
}

// ---------------------------------------------------------------- stream encoding (EVENTS)

/// Decoder of the stream encoding; `data` is the payload after the chunk header.
pub struct StreamEvents<'a> {
    c: Cursor<'a>,
    seq: u64,
    time: u64,
    addr: u64,
}

impl<'a> StreamEvents<'a> {
    pub fn new(ops: &'a [u8], header: &ChunkHeader) -> Self {
        StreamEvents {
            c: Cursor::new(ops),
            seq: header.base_seq,
            time: header.base_time,
            addr: 0,
        }
    }

    #[inline]
    fn head(&mut self) -> Result<(u64, u64, u64), FormatError> {
        // Wrapping: damaged input must not panic.
        self.seq = self.seq.wrapping_add(self.c.uvarint()?);
        self.time = self.time.wrapping_add(self.c.uvarint()?);
        self.addr = self.addr.wrapping_add(self.c.ivarint()? as u64);
        Ok((self.seq, self.time, self.addr))
    }

    #[inline]
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        if self.c.is_empty() {
            return Ok(None);
        }
        let opcode = self.c.u8()?;
        let op = match opcode {
            op::STACK_NODE => {
                let id = self.c.uvarint()?;
                let parent = self.c.uvarint()?;
                let ip = self.c.uvarint()?;
                return Ok(Some(Item::Node { id, parent, ip }));
            }
            op::FREE => Op::Free {
                addr: self.head()?.2,
            },
            op::REALLOC_FREE => Op::ReallocFree {
                addr: self.head()?.2,
            },
            op::REALLOC_FAILED => {
                self.head()?;
                Op::ReallocFailed
            }
            o if o < op::FREE => {
                let kind = AllocKind::from_u8(o - op::ALLOC_BASE).ok_or(FormatError::BadOp(o))?;
                let addr = self.head()?.2;
                let size = self.c.uvarint()?;
                let stack = self.c.uvarint()?;
                Op::Alloc {
                    kind,
                    addr,
                    size,
                    stack,
                }
            }
            o => return Err(FormatError::BadOp(o)),
        };
        Ok(Some(Item::Event {
            seq: self.seq,
            time: self.time,
            op,
        }))
    }
}

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
const T_COLUMNS: [usize; FIELDS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
const Z_COLUMNS: [usize; FIELDS] = [0, 1, 2, 3, 3, 3, 3, 4, 5, 6];
const Z_COLUMN_COUNT: usize = 7;

/// Largest decompressed column block accepted (damage guard: a chunk holds what one thread
/// buffered, a few hundred KiB of stream encoding, and its columns are no larger).
const MAX_BLOCK: u64 = 1 << 26;

/// Splits `v` into a token byte and extra bits: values below 16 are their own token; larger ones
/// are named by their bit length and the two bits below the top one, and the remaining low bits
/// follow raw. zstd's entropy coder then sees a small alphabet per column, and the bits it could
/// not compress anyway skip it.
#[inline]
fn token(v: u64) -> (u8, u32, u64) {
    if v < 16 {
        return (v as u8, 0, 0);
    }
    let len = 64 - v.leading_zeros(); // 5..=64
    let extra = len - 3;
    let top = (v >> extra) & 3;
    (
        (16 + 4 * (len - 5) + top as u32) as u8,
        extra,
        v & ((1u64 << extra) - 1),
    )
}

/// Number of extra bits that follow token `t`.
#[inline]
fn token_extra(t: u8) -> u32 {
    if t < 16 {
        0
    } else {
        (t as u32 - 16) / 4 + 2
    }
}

/// Value of token `t` with its extra bits `x`.
#[inline]
fn token_value(t: u8, x: u64) -> u64 {
    if t < 16 {
        return t as u64;
    }
    let top = 4 | (t as u64 - 16) & 3;
    (top << token_extra(t)) | x
}

/// Appends bit fields least significant bit first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    #[inline]
    fn put(&mut self, mut v: u64, mut n: u32) {
        while n > 0 {
            let k = n.min(32);
            self.acc |= (v & ((1u64 << k) - 1)) << self.n;
            self.n += k;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
            v >>= k;
            n -= k;
        }
    }

    fn finish(&mut self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.acc = 0;
        self.n = 0;
    }
}

/// Reusable state of the transcoder (the writer thread keeps one).
#[derive(Default)]
pub struct Compactor {
    cols: [Vec<u8>; FIELDS],
    bits: BitWriter,
    allocs: FastMap<u64, u32>,
    frees: FastMap<u64, u32>,
    block: Vec<u8>,
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl Compactor {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    fn put(&mut self, field: usize, v: u64) {
        let (t, n, x) = token(v);
        self.cols[field].push(t);
        if n > 0 {
            self.bits.put(x, n);
        }
    }

    #[inline]
    fn put_signed(&mut self, field: usize, v: u64) {
        let v = v as i64;
        self.put(field, ((v << 1) ^ (v >> 63)) as u64);
    }

    /// Transcodes the stream-encoded `EVENTS` payload into a framed `EVENTS_T` record appended to
    /// `out`.
    pub fn compact(
        &mut self,
        payload: &[u8],
        level: i32,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let mut c = Cursor::new(payload);
        let header = ChunkHeader::decode(&mut c)?;
        let mut events = StreamEvents::new(c.rest(), &header);
        for col in self.cols.iter_mut() {
            col.clear();
        }
        self.bits.out.clear();
        self.allocs.clear();
        self.frees.clear();
        let (mut acnt, mut fcnt) = (0u32, 0u32);
        let (mut seq, mut time) = (header.base_seq, header.base_time);
        let (mut new_addr, mut other_free, mut stack_prev) = (0u64, 0u64, 0u64);
        let (mut node_prev, mut ip_prev) = (0u64, 0u64);
        let mut n_ops = 0u64;
        while let Some(item) = events.next_item()? {
            n_ops += 1;
            match item {
                Item::Node { id, parent, ip } => {
                    self.cols[F_OPS].push(Z_NODE);
                    self.put_signed(F_NODE, id.wrapping_sub(node_prev));
                    self.put(F_NODE, id.wrapping_sub(parent));
                    self.put_signed(F_NODE, ip.wrapping_sub(ip_prev));
                    node_prev = id;
                    ip_prev = ip;
                }
                Item::Event {
                    seq: s,
                    time: t,
                    op,
                } => {
                    let code = match op {
                        Op::Alloc { kind, addr, .. } => {
                            if self.frees.contains_key(&addr) {
                                Z_ALLOC_REUSED + kind as u8
                            } else {
                                Z_ALLOC_NEW + kind as u8
                            }
                        }
                        Op::Free { addr } => match self.allocs.contains_key(&addr) {
                            true => Z_FREE_KNOWN,
                            false => Z_FREE_OTHER,
                        },
                        Op::ReallocFree { addr } => match self.allocs.contains_key(&addr) {
                            true => Z_REALLOC_FREE_KNOWN,
                            false => Z_REALLOC_FREE_OTHER,
                        },
                        Op::ReallocFailed => Z_REALLOC_FAILED,
                    };
                    self.cols[F_OPS].push(code);
                    self.put(F_SEQ, s.wrapping_sub(seq));
                    self.put(F_TIME, t.wrapping_sub(time));
                    seq = s;
                    time = t;
                    match op {
                        Op::Alloc {
                            addr, size, stack, ..
                        } => {
                            if let Some(i) = self.frees.remove(&addr) {
                                self.put(F_ALLOC_REUSED, (fcnt - i + 1) as u64);
                            } else {
                                self.put_signed(F_ALLOC_NEW, addr.wrapping_sub(new_addr));
                                new_addr = addr;
                            }
                            acnt += 1;
                            self.allocs.insert(addr, acnt);
                            self.put(F_SIZE, size);
                            self.put_signed(F_STACK, stack.wrapping_sub(stack_prev));
                            stack_prev = stack;
                        }
                        Op::Free { addr } | Op::ReallocFree { addr } => {
                            if let Some(i) = self.allocs.remove(&addr) {
                                self.put(F_FREE_KNOWN, (acnt - i + 1) as u64);
                            } else {
                                self.put_signed(F_FREE_OTHER, addr.wrapping_sub(other_free));
                                other_free = addr;
                            }
                            fcnt += 1;
                            self.frees.insert(addr, fcnt);
                        }
                        Op::ReallocFailed => {}
                    }
                }
            }
        }
        self.bits.finish();
        // Each column is compressed on its own, so each gets an entropy table fitted to it.
        if self.zstd.as_ref().map(|z| z.0) != Some(level) {
            let z = zstd::bulk::Compressor::new(level).map_err(|_| FormatError::Compression)?;
            self.zstd = Some((level, z));
        }
        let Some((_, z)) = self.zstd.as_mut() else {
            return Err(FormatError::Compression);
        };
        let mut payload = Vec::with_capacity(self.bits.out.len() + 4096);
        header.encode(&mut payload);
        put_uvarint(&mut payload, n_ops);
        self.block.clear();
        for col in &self.cols {
            put_uvarint(&mut payload, col.len() as u64);
            let packed = if col.is_empty() {
                Vec::new()
            } else {
                z.compress(col).map_err(|_| FormatError::Compression)?
            };
            if packed.is_empty() || packed.len() >= col.len() {
                // Stored as it is (length 0 says so).
                put_uvarint(&mut payload, 0);
                self.block.extend_from_slice(col);
            } else {
                put_uvarint(&mut payload, packed.len() as u64);
                self.block.extend_from_slice(&packed);
            }
        }
        payload.extend_from_slice(&self.block);
        payload.extend_from_slice(&self.bits.out);
        crate::put_record(out, crate::record::EVENTS_T, &payload);
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
    *running = running.wrapping_add((((v >> 1) as i64) ^ -((v & 1) as i64)) as u64);
    Ok(*running)
}

thread_local! {
    /// One zstd decompression context per reading thread, reused across chunks.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Which compact encoding a chunk is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compact {
    /// `EVENTS_Z` (format version 2): varint columns, four address fields sharing one.
    Z,
    /// `EVENTS_T` (format version 3): token columns and a raw bit stream of extra bits.
    T,
}

/// Decoder of the compact encodings. Owns the decompressed block (and, for `EVENTS_T`, a copy of
/// the extra bits after it).
pub struct CompactEvents {
    block: Vec<u8>,
    cols: [Col; FIELDS],
    /// Field to column (`EVENTS_Z` shares one column between the address fields).
    map: [usize; FIELDS],
    tokens: bool,
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
}

impl CompactEvents {
    /// `data` is the `EVENTS_Z` or `EVENTS_T` payload after the chunk header.
    pub fn new(data: &[u8], header: &ChunkHeader, encoding: Compact) -> Result<Self, FormatError> {
        let mut c = Cursor::new(data);
        let (mut block, spans, left) = match encoding {
            Compact::Z => Self::z_block(&mut c)?,
            Compact::T => Self::t_block(&mut c)?,
        };
        let extra = c.rest();
        let map = match encoding {
            Compact::Z => &Z_COLUMNS,
            Compact::T => &T_COLUMNS,
        };
        let bits = Col {
            pos: block.len(),
            end: block.len() + extra.len(),
        };
        block.extend_from_slice(extra);
        Ok(CompactEvents {
            block,
            cols: spans,
            map: *map,
            tokens: encoding == Compact::T,
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
        })
    }

    /// `EVENTS_Z`: one zstd frame holding the op count, the column lengths and the columns.
    fn z_block(c: &mut Cursor<'_>) -> Result<(Vec<u8>, [Col; FIELDS], u64), FormatError> {
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
        let mut spans = [Col::default(); FIELDS];
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

    /// `EVENTS_T`: the op count, each column's length and packed length, the columns (each a zstd
    /// frame, or stored when its packed length is 0); the extra bits follow.
    fn t_block(c: &mut Cursor<'_>) -> Result<(Vec<u8>, [Col; FIELDS], u64), FormatError> {
        let left = c.uvarint()?;
        let mut lens = [(0u64, 0u64); FIELDS];
        let mut total = 0u64;
        for l in lens.iter_mut() {
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
        let mut spans = [Col::default(); FIELDS];
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
            return self.token_rest(t);
        }
        let col = &mut self.cols[self.map[f]];
        crate::read_uvarint(&self.block, &mut col.pos, col.end)
    }

    /// The value of a token of 16 or more, with its extra bits.
    #[inline]
    fn token_rest(&mut self, t: u8) -> Result<u64, FormatError> {
        let n = token_extra(t);
        let x = if n <= 56 {
            self.read_bits(n)?
        } else {
            let lo = self.read_bits(32)?;
            lo | (self.read_bits(n - 32)? << 32)
        };
        Ok(token_value(t, x))
    }

    #[inline(always)]
    fn iv(&mut self, f: usize) -> Result<i64, FormatError> {
        let u = self.uv(f)?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    #[inline]
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let code = self.u8(F_OPS)?;
        if code == Z_NODE {
            let id = self.node_prev.wrapping_add(self.iv(F_NODE)? as u64);
            let parent = id.wrapping_sub(self.uv(F_NODE)?);
            let ip = self.ip_prev.wrapping_add(self.iv(F_NODE)? as u64);
            self.node_prev = id;
            self.ip_prev = ip;
            return Ok(Some(Item::Node { id, parent, ip }));
        }
        self.seq = self.seq.wrapping_add(self.uv(F_SEQ)?);
        self.time = self.time.wrapping_add(self.uv(F_TIME)?);
        let op = match code {
            c if c < Z_ALLOC_NEW + 0x10 => {
                let kind = AllocKind::from_u8(c & 0x0f).ok_or(FormatError::BadOp(c))?;
                let reused = c < Z_ALLOC_NEW;
                let v = self.uv(if reused { F_ALLOC_REUSED } else { F_ALLOC_NEW })?;
                let addr = resolve_addr(reused, v, &self.frees, &mut self.new_addr)?;
                self.allocs.push(addr);
                let size = self.uv(F_SIZE)?;
                self.stack_prev = self.stack_prev.wrapping_add(self.iv(F_STACK)? as u64);
                Op::Alloc {
                    kind,
                    addr,
                    size,
                    stack: self.stack_prev,
                }
            }
            Z_FREE_KNOWN | Z_REALLOC_FREE_KNOWN | Z_FREE_OTHER | Z_REALLOC_FREE_OTHER => {
                let known = code == Z_FREE_KNOWN || code == Z_REALLOC_FREE_KNOWN;
                let v = self.uv(if known { F_FREE_KNOWN } else { F_FREE_OTHER })?;
                let addr = resolve_addr(known, v, &self.allocs, &mut self.other_free)?;
                self.frees.push(addr);
                if code == Z_FREE_KNOWN || code == Z_FREE_OTHER {
                    Op::Free { addr }
                } else {
                    Op::ReallocFree { addr }
                }
            }
            Z_REALLOC_FAILED => Op::ReallocFailed,
            c => return Err(FormatError::BadOp(c)),
        };
        Ok(Some(Item::Event {
            seq: self.seq,
            time: self.time,
            op,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::put_ivarint;

    fn stream_chunk(header: ChunkHeader, items: &[Item]) -> Vec<u8> {
        let mut b = Vec::new();
        header.encode(&mut b);
        let (mut seq, mut time, mut addr) = (header.base_seq, header.base_time, 0u64);
        for it in items {
            match *it {
                Item::Node { id, parent, ip } => {
                    b.push(op::STACK_NODE);
                    put_uvarint(&mut b, id);
                    put_uvarint(&mut b, parent);
                    put_uvarint(&mut b, ip);
                }
                Item::Event {
                    seq: s,
                    time: t,
                    op: o,
                } => {
                    let (code, a) = match o {
                        Op::Alloc { kind, addr, .. } => (op::ALLOC_BASE + kind as u8, addr),
                        Op::Free { addr } => (op::FREE, addr),
                        Op::ReallocFree { addr } => (op::REALLOC_FREE, addr),
                        Op::ReallocFailed => (op::REALLOC_FAILED, addr),
                    };
                    b.push(code);
                    put_uvarint(&mut b, s - seq);
                    put_uvarint(&mut b, t - time);
                    put_ivarint(&mut b, a.wrapping_sub(addr) as i64);
                    (seq, time, addr) = (s, t, a);
                    if let Op::Alloc { size, stack, .. } = o {
                        put_uvarint(&mut b, size);
                        put_uvarint(&mut b, stack);
                    }
                }
            }
        }
        b
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
            op,
        };
        let alloc = |kind, addr, size, stack| Op::Alloc {
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
            ev(103, Op::Free { addr: 0x1000 }),
            ev(104, alloc(AllocKind::Malloc, 0x1000, 16, 2)), // reuses the freed address
            ev(105, Op::ReallocFree { addr: 0x2000 }),
            ev(106, alloc(AllocKind::Realloc, 0x9000, 500, 1)),
            ev(107, Op::ReallocFree { addr: 0x9000 }),
            ev(108, Op::ReallocFailed),
            ev(109, Op::Free { addr: 0x7777 }), // allocated in another chunk
            Item::Node {
                id: 9,
                parent: 2,
                ip: 0x7f00_0000_0042,
            },
            ev(110, alloc(AllocKind::PosixMemalign, 0x7777, 64, 9)),
            ev(111, alloc(AllocKind::RustAlloc, 0x1, 0, 0)),
        ];
        let stream = stream_chunk(header, &items);
        let mut c = Cursor::new(&stream);
        let h = ChunkHeader::decode(&mut c).unwrap();
        let mut s = StreamEvents::new(c.rest(), &h);
        let mut decoded = Vec::new();
        while let Some(it) = s.next_item().unwrap() {
            decoded.push(it);
        }
        assert_eq!(decoded, items);

        let mut out = Vec::new();
        Compactor::new().compact(&stream, 1, &mut out).unwrap();
        let crate::Next::Record(r) = crate::next_record(&out, 0) else {
            panic!("not a record")
        };
        assert_eq!(r.kind, crate::record::EVENTS_T);
        let mut c = Cursor::new(r.payload);
        let h2 = ChunkHeader::decode(&mut c).unwrap();
        assert_eq!(h2, header);
        let mut z = CompactEvents::new(c.rest(), &h2, Compact::T).unwrap();
        let mut back = Vec::new();
        while let Some(it) = z.next_item().unwrap() {
            back.push(it);
        }
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
            let (t, n, x) = token(v);
            assert_eq!(n, token_extra(t), "{v}");
            assert_eq!(x >> n, 0, "{v}");
            assert_eq!(token_value(t, x), v, "{v}");
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
                op: Op::Alloc {
                    kind: AllocKind::Malloc,
                    addr: v.rotate_left(17) ^ 0x5555,
                    size: v,
                    stack: v >> 3,
                },
            })
            .collect();
        let mut out = Vec::new();
        Compactor::new()
            .compact(&stream_chunk(header, &items), 3, &mut out)
            .unwrap();
        let crate::Next::Record(r) = crate::next_record(&out, 0) else {
            panic!("not a record")
        };
        let mut c = Cursor::new(r.payload);
        let h = ChunkHeader::decode(&mut c).unwrap();
        let mut z = CompactEvents::new(c.rest(), &h, Compact::T).unwrap();
        let mut back = Vec::new();
        while let Some(it) = z.next_item().unwrap() {
            back.push(it);
        }
        assert_eq!(back, items);
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
                op: if i % 2 == 0 {
                    Op::Alloc {
                        kind: AllocKind::Malloc,
                        addr: 0x1000 + i * 16,
                        size: i,
                        stack: 0,
                    }
                } else {
                    Op::Free {
                        addr: 0x1000 + (i - 1) * 16,
                    }
                },
            })
            .collect();
        let mut out = Vec::new();
        Compactor::new()
            .compact(&stream_chunk(header, &items), 1, &mut out)
            .unwrap();
        for i in 0..out.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut d = out.clone();
                d[i] ^= flip;
                if let crate::Next::Record(r) = crate::next_record(&d, 0) {
                    let mut c = Cursor::new(r.payload);
                    if let Ok(h) = ChunkHeader::decode(&mut c) {
                        if let Ok(mut z) = CompactEvents::new(c.rest(), &h, Compact::T) {
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
