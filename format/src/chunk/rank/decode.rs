//! The decoder of the rank encoding: keeps the history the transcoder predicted from (the chunk's
//! allocations and frees, its live set) and resolves each address from it.

use super::{alloc_symbol, block_end, class, col, free_symbol, SMALL_BLOCK, UNKNOWN_SIZE};
use crate::chunk::block::{ColumnBlock, Nodes};
use crate::chunk::live::LiveSet;
use crate::{unzigzag, AllocKind, ChunkHeader, EventKind, FormatError, Item};

/// The running values and history of one `EVENTS_R` chunk being decoded.
pub(in crate::chunk) struct RankDecoder {
    /// Ops left to decode.
    left: u64,
    seq: u64,
    time: u64,
    new_addr: u64,
    other_free: u64,
    stack_prev: u64,
    nodes: Nodes,
    /// Addresses and sizes of the chunk's allocations and frees.
    allocs: Vec<(u64, u64)>,
    frees: Vec<(u64, u64)>,
    live: LiveSet,
    /// Op classes of the last ops byte not yet used: how many, and the three.
    nops: u8,
    ops: [u8; 3],
}

impl RankDecoder {
    /// The decoder of a chunk of `left` ops that starts from `header`.
    pub(in crate::chunk) fn new(header: &ChunkHeader, left: u64) -> Self {
        // Allocations and frees are about half of a chunk's ops each (`left` is damage-checked
        // only by the block size bound, so this stays modest).
        let capacity = (left / 2 + 16).min(1 << 16) as usize;
        RankDecoder {
            left,
            seq: header.base_seq,
            time: header.base_time,
            new_addr: 0,
            other_free: 0,
            stack_prev: 0,
            nodes: Nodes::default(),
            allocs: Vec::with_capacity(capacity),
            frees: Vec::with_capacity(capacity),
            live: LiveSet::default(),
            nops: 0,
            ops: [0; 3],
        }
    }

    /// The next item, its fields read from `b`.
    #[inline]
    pub(in crate::chunk) fn next_item(
        &mut self,
        b: &mut ColumnBlock,
    ) -> Result<Option<Item>, FormatError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        if self.nops == 0 {
            let byte = b.u8(col::OPS)?;
            if byte >= class::COUNT * class::COUNT * class::COUNT {
                return Err(FormatError::BadOp(byte));
            }
            self.ops = [byte / 36, byte / 6 % 6, byte % 6];
            self.nops = 3;
        }
        let op = self.ops[3 - self.nops as usize];
        self.nops -= 1;
        if op == class::NODE {
            return self.nodes.next(b, col::NODE).map(Some);
        }
        self.seq = self.seq.wrapping_add(b.uv(col::SEQ)?);
        self.time = self.time.wrapping_add(b.uv(col::TIME)?);
        let kind = match op {
            class::MALLOC | class::ALLOC_OTHER => {
                let t = b.u8(col::ALLOC)?;
                let (addr, reused) = if t < alloc_symbol::AFTER {
                    let v = b.token_rest::<16, 2>(t)?;
                    self.frees[back(self.frees.len(), v)?]
                } else if t < alloc_symbol::NEW {
                    let v = b.token_rest::<16, 2>(t - alloc_symbol::AFTER)?;
                    let (a, size) = self.allocs[back(self.allocs.len(), v)?];
                    (block_end(a, size), UNKNOWN_SIZE)
                } else {
                    let d = unzigzag(b.token_rest::<4, 1>(t - alloc_symbol::NEW)?);
                    self.new_addr = self.new_addr.wrapping_add(d);
                    (self.new_addr, UNKNOWN_SIZE)
                };
                let kind = if op == class::MALLOC {
                    AllocKind::Malloc
                } else {
                    let k = b.u8(col::KIND)?;
                    AllocKind::from_u8(k).ok_or(FormatError::BadOp(k))?
                };
                let size = if reused <= SMALL_BLOCK {
                    reused.wrapping_add(b.iv(col::SIZE_REL)?)
                } else {
                    b.uv(col::SIZE)?
                };
                self.stack_prev = self.stack_prev.wrapping_add(b.iv(col::STACK)?);
                self.live.insert(self.allocs.len());
                self.allocs.push((addr, size));
                EventKind::Alloc {
                    kind,
                    addr,
                    size,
                    // u32 ids: see `StreamDecoder`.
                    stack: self.stack_prev as u32,
                }
            }
            class::FREE | class::REALLOC_FREE => {
                let t = b.u8(col::FREE)?;
                let (addr, size) = if t < free_symbol::OTHER {
                    let r = b.token_rest::<16, 2>(t)?;
                    let i = self.live.select(r).ok_or(FormatError::Truncated)?;
                    let block = *self.allocs.get(i).ok_or(FormatError::Truncated)?;
                    self.live.remove(i);
                    block
                } else {
                    let d = unzigzag(b.token_rest::<4, 1>(t - free_symbol::OTHER)?);
                    self.other_free = self.other_free.wrapping_add(d);
                    (self.other_free, UNKNOWN_SIZE)
                };
                self.frees.push((addr, size));
                if op == class::FREE {
                    EventKind::Free { addr }
                } else {
                    EventKind::ReallocFree { addr }
                }
            }
            class::REALLOC_FAILED => EventKind::ReallocFailed,
            c => return Err(FormatError::BadOp(c)),
        };
        Ok(Some(Item::Event {
            seq: self.seq,
            time: self.time,
            kind,
        }))
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
