//! Decoding events chunks (both encodings) and transcoding the tracker's fast encoding into the
//! compact one.
//!
//! The tracker's threads append events in the simple *stream* encoding (`EVENTS`, one op byte and
//! varints per event: cheap to write on the hot path). The writer thread turns each chunk into
//! the *compact* encoding (`EVENTS_Z`) before it reaches the file: fields split into columns,
//! addresses predicted from the chunk's own history (an allocation usually reuses an address
//! freed a moment ago; a free names a block allocated in the same chunk), and the columns
//! compressed with zstd. Each chunk still decodes on its own.

use crate::hash::FastMap;
use crate::{op, put_ivarint, put_uvarint, AllocKind, ChunkHeader, Cursor, FormatError};

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

// ---------------------------------------------------------------- compact encoding (EVENTS_Z)

// Op codes of the compact encoding's op column.
const Z_ALLOC_REUSED: u8 = 0x00; // + kind: the address was freed earlier in this chunk
const Z_ALLOC_NEW: u8 = 0x10; // + kind: address as a delta from the previous such address
const Z_FREE_KNOWN: u8 = 0x20; // the block was allocated earlier in this chunk
const Z_FREE_OTHER: u8 = 0x21;
const Z_REALLOC_FREE_KNOWN: u8 = 0x22;
const Z_REALLOC_FREE_OTHER: u8 = 0x23;
const Z_REALLOC_FAILED: u8 = 0x24;
const Z_NODE: u8 = 0x30;

const COLUMNS: usize = 7;
const C_OPS: usize = 0;
const C_SEQ: usize = 1;
const C_TIME: usize = 2;
const C_ADDR: usize = 3;
const C_SIZE: usize = 4;
const C_STACK: usize = 5;
const C_NODE: usize = 6;

/// Largest decompressed column block accepted (damage guard).
const MAX_BLOCK: u64 = 1 << 30;

/// Reusable state of the transcoder (the writer thread keeps one).
#[derive(Default)]
pub struct Compactor {
    cols: [Vec<u8>; COLUMNS],
    allocs: FastMap<u64, u32>,
    frees: FastMap<u64, u32>,
    block: Vec<u8>,
}

impl Compactor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Transcodes the stream-encoded `EVENTS` payload into a framed `EVENTS_Z` record appended to
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
        self.allocs.clear();
        self.frees.clear();
        let (mut acnt, mut fcnt) = (0u32, 0u32);
        let (mut seq, mut time) = (header.base_seq, header.base_time);
        let (mut new_addr, mut other_free, mut stack_prev) = (0u64, 0u64, 0u64);
        let (mut node_prev, mut ip_prev) = (0u64, 0u64);
        let mut n_ops = 0u64;
        while let Some(item) = events.next_item()? {
            n_ops += 1;
            let cols = &mut self.cols;
            match item {
                Item::Node { id, parent, ip } => {
                    cols[C_OPS].push(Z_NODE);
                    put_ivarint(&mut cols[C_NODE], id.wrapping_sub(node_prev) as i64);
                    put_uvarint(&mut cols[C_NODE], id.wrapping_sub(parent));
                    put_ivarint(&mut cols[C_NODE], ip.wrapping_sub(ip_prev) as i64);
                    node_prev = id;
                    ip_prev = ip;
                }
                Item::Event {
                    seq: s,
                    time: t,
                    op,
                } => {
                    put_uvarint(&mut cols[C_SEQ], s.wrapping_sub(seq));
                    put_uvarint(&mut cols[C_TIME], t.wrapping_sub(time));
                    seq = s;
                    time = t;
                    match op {
                        Op::Alloc {
                            kind,
                            addr,
                            size,
                            stack,
                        } => {
                            if let Some(i) = self.frees.remove(&addr) {
                                cols[C_OPS].push(Z_ALLOC_REUSED + kind as u8);
                                put_uvarint(&mut cols[C_ADDR], (fcnt - i + 1) as u64);
                            } else {
                                cols[C_OPS].push(Z_ALLOC_NEW + kind as u8);
                                put_ivarint(&mut cols[C_ADDR], addr.wrapping_sub(new_addr) as i64);
                                new_addr = addr;
                            }
                            acnt += 1;
                            self.allocs.insert(addr, acnt);
                            put_uvarint(&mut cols[C_SIZE], size);
                            put_ivarint(&mut cols[C_STACK], stack.wrapping_sub(stack_prev) as i64);
                            stack_prev = stack;
                        }
                        Op::Free { addr } | Op::ReallocFree { addr } => {
                            let realloc = matches!(op, Op::ReallocFree { .. });
                            if let Some(i) = self.allocs.remove(&addr) {
                                cols[C_OPS].push(if realloc {
                                    Z_REALLOC_FREE_KNOWN
                                } else {
                                    Z_FREE_KNOWN
                                });
                                put_uvarint(&mut cols[C_ADDR], (acnt - i + 1) as u64);
                            } else {
                                cols[C_OPS].push(if realloc {
                                    Z_REALLOC_FREE_OTHER
                                } else {
                                    Z_FREE_OTHER
                                });
                                put_ivarint(
                                    &mut cols[C_ADDR],
                                    addr.wrapping_sub(other_free) as i64,
                                );
                                other_free = addr;
                            }
                            fcnt += 1;
                            self.frees.insert(addr, fcnt);
                        }
                        Op::ReallocFailed => cols[C_OPS].push(Z_REALLOC_FAILED),
                    }
                }
            }
        }
        self.block.clear();
        put_uvarint(&mut self.block, n_ops);
        for col in &self.cols {
            put_uvarint(&mut self.block, col.len() as u64);
        }
        for col in &self.cols {
            self.block.extend_from_slice(col);
        }
        let compressed =
            zstd::bulk::compress(&self.block, level).map_err(|_| FormatError::Compression)?;
        let mut payload = Vec::with_capacity(compressed.len() + 32);
        header.encode(&mut payload);
        put_uvarint(&mut payload, self.block.len() as u64);
        payload.extend_from_slice(&compressed);
        crate::put_record(out, crate::record::EVENTS_Z, &payload);
        Ok(())
    }
}

/// A column of the decompressed block, read front to back.
#[derive(Clone, Copy, Default)]
struct Col {
    pos: usize,
    end: usize,
}

/// An address from the addr column: `v` steps back in `history` (1 = the latest) when `known`,
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

/// Decoder of the compact encoding. Owns the decompressed block.
pub struct CompactEvents {
    block: Vec<u8>,
    cols: [Col; COLUMNS],
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
    /// `data` is the `EVENTS_Z` payload after the chunk header.
    pub fn new(data: &[u8], header: &ChunkHeader) -> Result<Self, FormatError> {
        let mut c = Cursor::new(data);
        let raw_len = c.uvarint()?;
        if raw_len > MAX_BLOCK {
            return Err(FormatError::Compression);
        }
        let block = zstd::bulk::decompress(c.rest(), raw_len as usize)
            .map_err(|_| FormatError::Compression)?;
        if block.len() as u64 != raw_len {
            return Err(FormatError::Compression);
        }
        let mut b = Cursor::new(&block);
        let left = b.uvarint()?;
        let mut lens = [0u64; COLUMNS];
        for l in lens.iter_mut() {
            *l = b.uvarint()?;
        }
        let mut cols = [Col::default(); COLUMNS];
        let mut pos = b.pos();
        for (col, &len) in cols.iter_mut().zip(&lens) {
            let end = (pos as u64)
                .checked_add(len)
                .filter(|&e| e <= block.len() as u64)
                .ok_or(FormatError::Truncated)?;
            *col = Col {
                pos,
                end: end as usize,
            };
            pos = end as usize;
        }
        Ok(CompactEvents {
            block,
            cols,
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

    #[inline]
    fn u8(&mut self, c: usize) -> Result<u8, FormatError> {
        let col = &mut self.cols[c];
        if col.pos >= col.end {
            return Err(FormatError::Truncated);
        }
        let b = self.block[col.pos];
        col.pos += 1;
        Ok(b)
    }

    #[inline]
    fn uv(&mut self, c: usize) -> Result<u64, FormatError> {
        let col = &mut self.cols[c];
        crate::read_uvarint(&self.block, &mut col.pos, col.end)
    }

    #[inline]
    fn iv(&mut self, c: usize) -> Result<i64, FormatError> {
        let u = self.uv(c)?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    #[inline]
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let code = self.u8(C_OPS)?;
        if code == Z_NODE {
            let id = self.node_prev.wrapping_add(self.iv(C_NODE)? as u64);
            let parent = id.wrapping_sub(self.uv(C_NODE)?);
            let ip = self.ip_prev.wrapping_add(self.iv(C_NODE)? as u64);
            self.node_prev = id;
            self.ip_prev = ip;
            return Ok(Some(Item::Node { id, parent, ip }));
        }
        self.seq = self.seq.wrapping_add(self.uv(C_SEQ)?);
        self.time = self.time.wrapping_add(self.uv(C_TIME)?);
        let op = match code {
            c if c < Z_ALLOC_NEW + 0x10 => {
                let kind = AllocKind::from_u8(c & 0x0f).ok_or(FormatError::BadOp(c))?;
                let v = self.uv(C_ADDR)?;
                let addr = resolve_addr(c < Z_ALLOC_NEW, v, &self.frees, &mut self.new_addr)?;
                self.allocs.push(addr);
                let size = self.uv(C_SIZE)?;
                self.stack_prev = self.stack_prev.wrapping_add(self.iv(C_STACK)? as u64);
                Op::Alloc {
                    kind,
                    addr,
                    size,
                    stack: self.stack_prev,
                }
            }
            Z_FREE_KNOWN | Z_REALLOC_FREE_KNOWN | Z_FREE_OTHER | Z_REALLOC_FREE_OTHER => {
                let known = code == Z_FREE_KNOWN || code == Z_REALLOC_FREE_KNOWN;
                let v = self.uv(C_ADDR)?;
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
        assert_eq!(r.kind, crate::record::EVENTS_Z);
        let mut c = Cursor::new(r.payload);
        let h2 = ChunkHeader::decode(&mut c).unwrap();
        assert_eq!(h2, header);
        let mut z = CompactEvents::new(c.rest(), &h2).unwrap();
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
                        if let Ok(mut z) = CompactEvents::new(c.rest(), &h) {
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
