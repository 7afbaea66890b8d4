//! The column encodings before the rank encoding, read-only: `EVENTS_Z` (format version 2:
//! varint columns in one zstd frame, the four address fields sharing one column) and `EVENTS_T`
//! (version 3: a column per field, tokens and extra bits). Both give a reused address as a step
//! back through the chunk's frees and a freed block as a step back through its allocations.
//! Nothing writes them any more; captures of those versions must keep reading the same.

use super::block::{ColumnBlock, Nodes, MAX_COLUMNS};
use crate::{unzigzag, AllocKind, ChunkHeader, EventKind, FormatError, Item};

/// Op codes of the ops column.
pub(super) mod code {
    /// `+ kind`: the address was freed earlier in this chunk.
    pub const ALLOC_REUSED: u8 = 0x00;
    /// `+ kind`: the address as a delta from the previous such address.
    pub const ALLOC_NEW: u8 = 0x10;
    /// The block was allocated earlier in this chunk.
    pub const FREE_KNOWN: u8 = 0x20;
    pub const FREE_OTHER: u8 = 0x21;
    pub const REALLOC_FREE_KNOWN: u8 = 0x22;
    pub const REALLOC_FREE_OTHER: u8 = 0x23;
    pub const REALLOC_FAILED: u8 = 0x24;
    pub const NODE: u8 = 0x30;
}

/// Fields of an event, each a column of its own in `EVENTS_T`.
pub(super) mod field {
    pub const OPS: usize = 0;
    pub const SEQ: usize = 1;
    pub const TIME: usize = 2;
    pub const FREE_KNOWN: usize = 3;
    pub const FREE_OTHER: usize = 4;
    pub const ALLOC_REUSED: usize = 5;
    pub const ALLOC_NEW: usize = 6;
    pub const SIZE: usize = 7;
    pub const STACK: usize = 8;
    pub const NODE: usize = 9;
    pub const COUNT: usize = 10;
}

/// The column of each field in `EVENTS_Z`, which kept the four address fields in one.
pub(super) const VARINT_COLUMNS: [usize; MAX_COLUMNS] = [0, 1, 2, 3, 3, 3, 3, 4, 5, 6];
pub(super) const VARINT_COLUMN_COUNT: usize = 7;

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

/// The running values and history of one `EVENTS_Z` or `EVENTS_T` chunk being decoded.
pub(super) struct LegacyDecoder {
    /// Ops left to decode.
    left: u64,
    seq: u64,
    time: u64,
    /// Addresses of the chunk's allocations and frees.
    allocs: Vec<u64>,
    frees: Vec<u64>,
    new_addr: u64,
    other_free: u64,
    stack_prev: u64,
    nodes: Nodes,
}

impl LegacyDecoder {
    /// The decoder of a chunk of `left` ops that starts from `header`.
    pub(super) fn new(header: &ChunkHeader, left: u64) -> Self {
        LegacyDecoder {
            left,
            seq: header.base_seq,
            time: header.base_time,
            allocs: Vec::new(),
            frees: Vec::new(),
            new_addr: 0,
            other_free: 0,
            stack_prev: 0,
            nodes: Nodes::default(),
        }
    }

    /// The next item, its fields read from `b`.
    #[inline]
    pub(super) fn next_item(&mut self, b: &mut ColumnBlock) -> Result<Option<Item>, FormatError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let op = b.u8(field::OPS)?;
        if op == code::NODE {
            return self.nodes.next(b, field::NODE).map(Some);
        }
        self.seq = self.seq.wrapping_add(b.uv(field::SEQ)?);
        self.time = self.time.wrapping_add(b.uv(field::TIME)?);
        let kind = match op {
            c if c < code::ALLOC_NEW + 0x10 => {
                let kind = AllocKind::from_u8((c - code::ALLOC_REUSED) & 0x0f)
                    .ok_or(FormatError::BadOp(c))?;
                let reused = c < code::ALLOC_NEW;
                let v = b.uv(if reused {
                    field::ALLOC_REUSED
                } else {
                    field::ALLOC_NEW
                })?;
                let addr = resolve_addr(reused, v, &self.frees, &mut self.new_addr)?;
                self.allocs.push(addr);
                let size = b.uv(field::SIZE)?;
                self.stack_prev = self.stack_prev.wrapping_add(b.iv(field::STACK)?);
                EventKind::Alloc {
                    kind,
                    addr,
                    size,
                    // u32 ids: see `StreamDecoder`.
                    stack: self.stack_prev as u32,
                }
            }
            code::FREE_KNOWN
            | code::REALLOC_FREE_KNOWN
            | code::FREE_OTHER
            | code::REALLOC_FREE_OTHER => {
                let known = op == code::FREE_KNOWN || op == code::REALLOC_FREE_KNOWN;
                let v = b.uv(if known {
                    field::FREE_KNOWN
                } else {
                    field::FREE_OTHER
                })?;
                let addr = resolve_addr(known, v, &self.allocs, &mut self.other_free)?;
                self.frees.push(addr);
                if op == code::FREE_KNOWN || op == code::FREE_OTHER {
                    EventKind::Free { addr }
                } else {
                    EventKind::ReallocFree { addr }
                }
            }
            code::REALLOC_FAILED => EventKind::ReallocFailed,
            c => return Err(FormatError::BadOp(c)),
        };
        Ok(Some(Item::Event {
            seq: self.seq,
            time: self.time,
            kind,
        }))
    }
}
