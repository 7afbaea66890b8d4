//! The rank encoding (`EVENTS_R`, format version 4), which the writer transcodes every chunk into.
//!
//! The layout is `EVENTS_T`'s (token columns compressed one by one, raw extra bits after them)
//! with its own columns and ops: every address is predicted from the chunk's own history. A free
//! names its block by its rank among the blocks still live ([`super::live`]; 1 = the newest); an
//! allocation reuses an address freed a moment ago, or starts where a block allocated earlier
//! ends (an allocator splitting free memory), and a reused small block predicts the size. Op
//! classes go three to a byte. The encoder is [`encode::Transcoder`], the decoder
//! [`decode::RankDecoder`]; both keep the same history, so they agree on every prediction.

pub(super) mod decode;
pub(super) mod encode;

/// Columns, each compressed on its own.
pub(super) mod col {
    /// Op classes, three to a byte ([`super::class`]).
    pub const OPS: usize = 0;
    pub const SEQ: usize = 1;
    pub const TIME: usize = 2;
    /// A free's block ([`super::free_symbol`]).
    pub const FREE: usize = 3;
    /// An allocation's address ([`super::alloc_symbol`]).
    pub const ALLOC: usize = 4;
    pub const SIZE: usize = 5;
    /// The size as a zigzag delta from the size of the reused small block it replaces.
    pub const SIZE_REL: usize = 6;
    pub const STACK: usize = 7;
    pub const NODE: usize = 8;
    /// The allocation kind of an allocation of class `ALLOC_OTHER`.
    pub const KIND: usize = 9;
    pub const COUNT: usize = 10;
}

/// Op classes, three to an ops byte (`a * 36 + b * 6 + c`).
pub(super) mod class {
    pub const MALLOC: u8 = 0;
    /// Any other kind: the kind column says which.
    pub const ALLOC_OTHER: u8 = 1;
    pub const FREE: u8 = 2;
    pub const REALLOC_FREE: u8 = 3;
    pub const REALLOC_FAILED: u8 = 4;
    pub const NODE: u8 = 5;
    pub const COUNT: u8 = 6;
}

/// The symbols of the `ALLOC` column: how an allocation's address is given, plus the token of the
/// number that follows.
pub(super) mod alloc_symbol {
    /// The address a free `v` back released.
    pub const REUSED: u8 = 0;
    /// The end of the block allocated `v` back.
    pub const AFTER: u8 = 64;
    /// A zigzag delta from the last new address, in short tokens.
    pub const NEW: u8 = 128;
}

/// The symbols of the `FREE` column: how a free's block is given, plus the token of the number
/// that follows.
pub(super) mod free_symbol {
    /// By its rank among the live blocks allocated in this chunk.
    pub const RANK: u8 = 0;
    /// Another block: a zigzag delta from the last such address, in short tokens.
    pub const OTHER: u8 = 128;
}

/// Where the next block starts after a block of `size` bytes at `addr`, in glibc's layout: 8
/// bytes of header, 16-byte granules, 32 bytes at least. Other allocators only predict less.
#[inline]
pub(super) fn block_end(addr: u64, size: u64) -> u64 {
    addr.wrapping_add((size.saturating_add(8 + 15) & !15).max(32))
}

/// Blocks up to this size are reused by size class (glibc's tcache and fast bins): a block
/// reused from one predicts the new size.
pub(super) const SMALL_BLOCK: u64 = 1032;

/// A freed block whose size the chunk does not know (allocated before the chunk).
pub(super) const UNKNOWN_SIZE: u64 = u64::MAX;
