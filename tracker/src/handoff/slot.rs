//! A thread's slot in the hand-off: the chunk it is filling ([`ChunkBuf`]) and the handshake
//! by which another thread (the writer's sweep, `finish`) may take that chunk while the thread
//! is between events.
//!
//! The owning thread takes its buffer for one event with a plain store and a light barrier
//! (Dekker's handshake with [`claim_idle_buffers`], whose side pays the heavy barrier), so an
//! event pays no locked instruction.

use super::barrier;
use crate::mapbuf::MapBuf;
use crate::writer::FramedChunk;
use memtrack_format::{frame_in_place, record, ChunkHeader, StreamEncoder, MAX_FRAME_PREFIX};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The part of a thread's state the writer may take: the chunk being filled, and the stream
/// encoder's running values for it.
pub(crate) struct ChunkBuf {
    /// None when no buffer could be mapped: events are then dropped (and counted as lost by the
    /// reader's consistency checks) rather than risking the program.
    pub data: Option<MapBuf>,
    pub open: bool,
    /// Event time (clock units) when the chunk was opened.
    pub opened_at: u64,
    /// Encodes the chunk's events from the values of the previous one.
    pub enc: StreamEncoder,
}

impl ChunkBuf {
    pub(crate) fn new(data: Option<MapBuf>) -> Self {
        ChunkBuf {
            data,
            open: false,
            opened_at: 0,
            enc: StreamEncoder::default(),
        }
    }

    /// Frames the open chunk and takes it, with its buffer: none is left in its place (the
    /// thread takes one at its next event). The buffer's first `MAX_FRAME_PREFIX` bytes were
    /// reserved for the frame when the chunk was opened.
    pub(crate) fn take_framed(&mut self) -> Option<FramedChunk> {
        if !self.open {
            return None;
        }
        self.open = false;
        let mut data = self.data.take()?;
        let start = frame_in_place(data.as_mut_slice(), record::EVENTS);
        Some(FramedChunk::new(data, start))
    }

    /// Opens the chunk if needed, for an event of `tid` with this sequence number and time.
    #[inline]
    pub(crate) fn begin_event(&mut self, tid: u32, seq: u64, time: u64) {
        if !self.open {
            let header = ChunkHeader {
                tid,
                base_seq: seq,
                base_time: time,
            };
            self.enc = match self.data.as_mut() {
                Some(d) => {
                    d.zeroed(MAX_FRAME_PREFIX);
                    StreamEncoder::begin(d, &header)
                }
                None => StreamEncoder::new(&header),
            };
            self.open = true;
            self.opened_at = time;
        }
    }
}

/// One thread's slot: its buffer and the flags of the handshake over it.
pub(crate) struct ThreadSlot {
    /// The owning thread is inside an event (it holds `buf`).
    busy: AtomicBool,
    /// Another thread (the writer's sweep, `finish`) holds or wants `buf`.
    claim: AtomicBool,
    buf: UnsafeCell<ChunkBuf>,
    /// The thread has exited: once its chunk is taken, the slot is forgotten.
    dead: AtomicBool,
}

// SAFETY: `buf` is only touched by the holder of a `BufGuard` (see `ThreadSlot::lock`).
unsafe impl Sync for ThreadSlot {}
// SAFETY: as above; the slot moves between threads only inside an Arc.
unsafe impl Send for ThreadSlot {}

/// The buffer of a slot, held by its owner for one event or by a claimer.
pub(crate) struct BufGuard<'a> {
    slot: &'a ThreadSlot,
    /// Held by the owning thread (else by a claimer).
    owner: bool,
}

impl std::ops::Deref for BufGuard<'_> {
    type Target = ChunkBuf;
    fn deref(&self) -> &ChunkBuf {
        // SAFETY: the lock is held for the guard's lifetime.
        unsafe { &*self.slot.buf.get() }
    }
}
impl std::ops::DerefMut for BufGuard<'_> {
    fn deref_mut(&mut self) -> &mut ChunkBuf {
        // SAFETY: the lock is held for the guard's lifetime.
        unsafe { &mut *self.slot.buf.get() }
    }
}
impl Drop for BufGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if self.owner {
            self.slot.busy.store(false, Ordering::Release);
        } else {
            self.slot.claim.store(false, Ordering::Release);
        }
    }
}

impl ThreadSlot {
    pub(crate) fn new(buf: Option<MapBuf>) -> Self {
        ThreadSlot {
            busy: AtomicBool::new(false),
            claim: AtomicBool::new(false),
            buf: UnsafeCell::new(ChunkBuf::new(buf)),
            dead: AtomicBool::new(false),
        }
    }

    /// The owning thread takes its buffer for one event. Dekker's handshake with
    /// [`ThreadSlot::request`]: the owner's side is a plain store and a light barrier (the
    /// claimer's heavy barrier orders it).
    #[inline]
    pub(crate) fn lock(&self) -> BufGuard<'_> {
        loop {
            self.busy.store(true, Ordering::Relaxed);
            barrier::light();
            if !self.claim.load(Ordering::Acquire) {
                return BufGuard {
                    slot: self,
                    owner: true,
                };
            }
            self.busy.store(false, Ordering::Release);
            while self.claim.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        }
    }

    /// The owning thread is inside an event.
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// The owning thread has exited (its last chunk was taken from the slot).
    pub(crate) fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Another thread asks for the buffer; it gets it with [`ThreadSlot::claimed`] after a
    /// heavy barrier, unless the owner is inside an event. Claims are made under the registry
    /// lock, so there is one claimer at a time.
    fn request(&self) -> bool {
        !self.claim.swap(true, Ordering::Acquire)
    }

    /// After `request` and a heavy barrier: the buffer, or None (the claim withdrawn) when the
    /// owner is inside an event.
    fn claimed(&self) -> Option<BufGuard<'_>> {
        if self.busy.load(Ordering::Acquire) {
            self.claim.store(false, Ordering::Release);
            return None;
        }
        Some(BufGuard {
            slot: self,
            owner: false,
        })
    }
}

/// Claims the buffers of the `threads` that `wanted` picks (by index) with one heavy barrier:
/// each entry is the buffer, or None when its owner was inside an event (busy, not idle) or it
/// was not picked. The caller holds the registry lock.
pub(crate) fn claim_idle_buffers(
    threads: &[Arc<ThreadSlot>],
    wanted: impl Fn(usize) -> bool,
) -> Vec<Option<BufGuard<'_>>> {
    let asked: Vec<bool> = threads
        .iter()
        .enumerate()
        .map(|(i, slot)| wanted(i) && slot.request())
        .collect();
    let fenced = barrier::heavy();
    threads
        .iter()
        .zip(asked)
        .map(|(slot, asked)| match (asked, fenced) {
            (false, _) => None,
            (true, false) => {
                slot.claim.store(false, Ordering::Release);
                None
            }
            (true, true) => slot.claimed(),
        })
        .collect()
}
