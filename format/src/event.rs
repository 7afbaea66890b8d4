//! The event model: what one allocation event says, whatever encoding carried it. The tracker
//! writes these, every decoder yields them, and the reader replays them.

use crate::{put_uvarint, ByteSink, Cursor, FormatError};

/// Which function handed out a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum AllocKind {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    ReallocArray = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    Valloc = 7,
    Pvalloc = 8,
    /// Rust `GlobalAlloc::alloc` / `alloc_zeroed` through `memtrack_tracker::Tracker`.
    RustAlloc = 9,
}

impl AllocKind {
    pub const ALL: [AllocKind; 10] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::ReallocArray,
        AllocKind::PosixMemalign,
        AllocKind::AlignedAlloc,
        AllocKind::Memalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
        AllocKind::RustAlloc,
    ];

    pub fn from_u8(v: u8) -> Option<AllocKind> {
        Self::ALL.get(v as usize).copied()
    }

    /// The C name of the function.
    pub fn name(self) -> &'static str {
        match self {
            AllocKind::Malloc => "malloc",
            AllocKind::Calloc => "calloc",
            AllocKind::Realloc => "realloc",
            AllocKind::ReallocArray => "reallocarray",
            AllocKind::PosixMemalign => "posix_memalign",
            AllocKind::AlignedAlloc => "aligned_alloc",
            AllocKind::Memalign => "memalign",
            AllocKind::Valloc => "valloc",
            AllocKind::Pvalloc => "pvalloc",
            AllocKind::RustAlloc => "rust_alloc",
        }
    }

    /// True for the kinds whose allocation half follows a `REALLOC_FREE` of a non-NULL pointer.
    pub fn is_realloc(self) -> bool {
        matches!(self, AllocKind::Realloc | AllocKind::ReallocArray)
    }
}

/// What one event did to the heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A block handed out: `size` bytes requested, at `addr`, by the stack whose trie node is
    /// `stack` (0: the empty stack).
    Alloc {
        kind: AllocKind,
        addr: u64,
        size: u64,
        stack: u32,
    },
    /// A block released.
    Free { addr: u64 },
    /// The old block of a realloc was released; the thread's next event completes the realloc
    /// (an `Alloc` of a realloc kind, or `ReallocFailed`).
    ReallocFree { addr: u64 },
    /// The realloc whose first half was recorded failed: the old block is live again.
    ReallocFailed,
    /// The thread opened an occurrence of the region named `region` (an id of a `REGION_NAME`
    /// record). Regions nest; the thread's next `RegionEnd` closes the innermost one.
    RegionBegin { region: u32 },
    /// The thread closed its innermost open region.
    RegionEnd,
    /// `mmap` (or `mmap64`) made a mapping: `size` bytes (whole pages) at `addr`, by the stack
    /// `stack`. `file` is 0 for anonymous memory, else the id of a `MAP_FILE` record naming the
    /// mapped file; `shared`: `MAP_SHARED`. Not heap: its own figures (`--mapped`).
    Map {
        addr: u64,
        size: u64,
        stack: u32,
        file: u32,
        shared: bool,
    },
    /// `munmap` of `[addr, addr + size)` (whole pages): any part of one or more mappings.
    Unmap { addr: u64, size: u64 },
    /// `mremap` moved or resized `[old_addr, old_addr + old_size)` to `[addr, addr + size)`
    /// (the same address when it stayed), by the stack `stack`; the new range keeps the old
    /// one's file and sharing.
    Remap {
        old_addr: u64,
        old_size: u64,
        addr: u64,
        size: u64,
        stack: u32,
    },
}

impl EventKind {
    /// True for the events that change the heap (every kind but the region marks and the
    /// mapped-memory events).
    #[inline]
    pub fn is_heap(&self) -> bool {
        !matches!(
            self,
            EventKind::RegionBegin { .. }
                | EventKind::RegionEnd
                | EventKind::Map { .. }
                | EventKind::Unmap { .. }
                | EventKind::Remap { .. }
        )
    }

    /// True for the mapped-memory events (`Map`, `Unmap`, `Remap`).
    #[inline]
    pub fn is_mapped(&self) -> bool {
        matches!(
            self,
            EventKind::Map { .. } | EventKind::Unmap { .. } | EventKind::Remap { .. }
        )
    }
}

/// One decoded item of an events chunk: an event, or the definition of a stack trie node that
/// later events (of any chunk) may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Event {
        /// The event's place in the process-wide order.
        seq: u64,
        /// Clock units since the capture started.
        time: u64,
        kind: EventKind,
    },
    /// A stack trie node: the stack `id` is `parent`'s with `ip` as its innermost frame.
    Node { id: u64, parent: u64, ip: u64 },
}

/// The fixed fields at the start of an `EVENTS` payload. Every chunk starts its deltas from
/// these values, so each chunk decodes on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Kernel thread id of the thread whose events these are.
    pub tid: u32,
    /// Sequence number before the chunk's first event (its first delta is relative to this).
    pub base_seq: u64,
    /// Time (in clock units since start) before the first event.
    pub base_time: u64,
}

impl ChunkHeader {
    pub fn encode<S: ByteSink + ?Sized>(&self, buf: &mut S) {
        put_uvarint(buf, self.tid as u64);
        put_uvarint(buf, self.base_seq);
        put_uvarint(buf, self.base_time);
    }
    pub fn decode(c: &mut Cursor<'_>) -> Result<ChunkHeader, FormatError> {
        Ok(ChunkHeader {
            tid: c.uvarint()? as u32,
            base_seq: c.uvarint()?,
            base_time: c.uvarint()?,
        })
    }
}
