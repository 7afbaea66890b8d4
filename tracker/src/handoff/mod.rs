//! The hand-off between the program's threads and the writer: each recording thread's slot
//! with the chunk it fills ([`slot`]), the registry of slots, the global sequence ([`seq`]),
//! the barriers of the handshakes ([`barrier`]), the spare buffers, and the writer's queue
//! ([`queue`]). A thread hands a chunk over when it is full; the writer also takes the chunks
//! of threads that have gone quiet ([`Handoff::take_chunks`]).
//!
//! Must never: decide what an event contains (the recorder does), or call back into the
//! recorder; the writer is only reached through its [`Writer`] and queue.

pub(crate) mod barrier;
mod queue;
pub(crate) mod seq;
pub(crate) mod slot;

pub(crate) use queue::room_made;
pub(crate) use slot::{ChunkBuf, ThreadSlot};

use crate::guard::SaveErrno;
use crate::mapbuf::MapBuf;
use crate::writer::{FramedChunk, Msg, Writer};
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A thread hands its buffer to the writer once it holds this many bytes, or fewer when threads
/// are many (`FLUSH_LIMIT`).
const FLUSH_AT: usize = 256 * 1024;
/// With many threads, each holding a buffer, they share this many bytes between them.
const BUFFERS_BUDGET: usize = 16 << 20;
/// Spare buffers kept for threads to take (a buffer written whole holds 320 KiB of memory).
const SPARE_BUFFERS: usize = 16;
/// The least a thread buffers: smaller chunks encode less compactly.
const FLUSH_MIN: usize = 32 * 1024;
/// The current hand-over size, for the number of threads known (see `set_thread_count`).
static FLUSH_LIMIT: AtomicUsize = AtomicUsize::new(FLUSH_AT);
/// Messages in the writer's queue from which on a program thread transcodes its own chunk: 8,
/// or `MEMTRACK_WRITER_BEHIND` (0: always; the tests use it to run that path on every chunk).
static WRITER_BEHIND: AtomicUsize = AtomicUsize::new(8);
/// Bound of the writer's queue.
const QUEUE_LEN: usize = 64;

/// Threads with a slot (live, or exited and not yet swept) decide the hand-over size.
fn set_thread_count(n: usize) {
    let each = (BUFFERS_BUDGET / n.max(1)).clamp(FLUSH_MIN, FLUSH_AT);
    FLUSH_LIMIT.store(each, Ordering::Relaxed);
}

/// Whether a chunk of `len` bytes is to be handed over.
#[inline(always)]
pub(crate) fn is_full(len: usize) -> bool {
    len >= FLUSH_LIMIT.load(Ordering::Relaxed)
}

fn read_writer_behind() {
    let v = crate::env::getenv(c"MEMTRACK_WRITER_BEHIND");
    if let Some(n) = v.and_then(|v| v.to_str().ok()?.parse().ok()) {
        WRITER_BEHIND.store(n, Ordering::Relaxed);
    }
}

/// The hand-off of one recording (one capture).
pub(crate) struct Handoff {
    pub(crate) writer: Writer,
    tx: Sender<Msg>,
    /// The queue's receiving end, until the writer thread takes it.
    rx: Mutex<Option<Receiver<Msg>>>,
    spare_tx: Sender<MapBuf>,
    spare_rx: Receiver<MapBuf>,
    writer_started: AtomicBool,
    /// The slots of threads that have recorded (live, or exited and not yet swept).
    registry: Mutex<Vec<Arc<ThreadSlot>>>,
}

impl Handoff {
    /// The hand-off into `writer`; sequence numbers start at `first_seq`.
    pub(crate) fn new(writer: Writer, first_seq: u64) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_LEN);
        let (spare_tx, spare_rx) = crossbeam_channel::bounded(SPARE_BUFFERS);
        seq::start_at(first_seq);
        barrier::register();
        read_writer_behind();
        Handoff {
            writer,
            tx,
            rx: Mutex::new(Some(rx)),
            spare_tx,
            spare_rx,
            writer_started: AtomicBool::new(false),
            registry: Mutex::new(Vec::new()),
        }
    }

    /// A spare buffer, or a new mapping (None only when the kernel refuses memory).
    pub(crate) fn fresh_buffer(&self) -> Option<MapBuf> {
        self.spare_rx.try_recv().ok().or_else(MapBuf::new)
    }

    /// A written buffer, kept for threads to take (or unmapped when enough are spare).
    pub(crate) fn recycle(&self, mut buf: MapBuf) {
        buf.clear();
        let _ = self.spare_tx.try_send(buf);
    }

    /// The queue's receiving end, for the writer thread (once).
    pub(crate) fn take_receiver(&self) -> Option<Receiver<Msg>> {
        self.rx.lock().ok().and_then(|mut r| r.take())
    }

    pub(crate) fn mark_writer_started(&self) {
        self.writer_started.store(true, Ordering::Release);
    }

    pub(crate) fn writer_started(&self) -> bool {
        self.writer_started.load(Ordering::Acquire)
    }

    /// Sends to the writer (waiting while its queue is full).
    pub(crate) fn send(&self, m: Msg) {
        queue::send(&self.tx, m);
    }

    /// Hands a framed record to the writer, or writes it now while no writer runs yet.
    pub(crate) fn send_record(&self, bytes: Vec<u8>) {
        if self.writer_started() {
            self.send(Msg::Record(bytes));
        } else {
            // Before the writer starts (allocations before constructors), write synchronously:
            // the process is still single-threaded then.
            self.writer.write_record(&bytes);
        }
    }

    /// Hands a chunk to the writer.
    pub(crate) fn hand_off(&self, chunk: FramedChunk) {
        let _errno = SaveErrno::new();
        if self.writer_started() {
            // The writer is behind: the program's threads outnumber the cores and it gets its
            // fair share of one, less than transcoding takes. Left alone, the chunks pile up (up
            // to the queue's 64, some 20 MB, and then the threads wait) and are transcoded after
            // the program's threads are done, on one core while the others idle. So a thread
            // transcodes its own chunk (one at a time, beside the writer) and hands over only
            // the bytes to write.
            if self.tx.len() >= WRITER_BEHIND.load(Ordering::Relaxed) {
                if let Some(out) = self.writer.transcode_aside(&chunk) {
                    self.recycle(chunk.into_buf());
                    self.send(Msg::Record(out));
                    return;
                }
            }
            self.send(Msg::Chunk(chunk));
        } else {
            self.writer.write_chunk(&chunk);
            self.recycle(chunk.into_buf());
        }
    }

    /// Hands the calling thread's open chunk to the writer (outside any event of the thread).
    #[cold]
    #[inline(never)]
    pub(crate) fn flush(&self, slot: &ThreadSlot) {
        // No buffer in its place until the thread's next event: a thread waiting in `send` for
        // room in the writer's queue would otherwise hold two.
        let taken = slot.lock().take_framed();
        if let Some(chunk) = taken {
            self.hand_off(chunk);
        }
    }

    /// Adds the slot of a thread that records for the first time. False when the registry is
    /// unusable (a thread panicked holding it).
    pub(crate) fn register(&self, slot: Arc<ThreadSlot>) -> bool {
        let Ok(mut r) = self.registry.lock() else {
            return false;
        };
        if !r.is_empty() {
            seq::share_sequence(&r);
        }
        r.push(slot);
        set_thread_count(r.len());
        true
    }

    /// A thread without a slot records (an exiting thread's late events): the sequence is
    /// shared from now on, if it was not yet.
    pub(crate) fn share_sequence(&self) {
        if !seq::is_shared() {
            if let Ok(r) = self.registry.lock() {
                seq::share_sequence(&r);
            }
        }
    }

    /// Takes the open chunks of idle threads opened at least `max_age` clock units before
    /// `now` (all non-empty ones when `force`), and forgets the slots of threads that have
    /// exited and been emptied.
    pub(crate) fn take_chunks(&self, force: bool, now: u64, max_age: u64) -> Vec<FramedChunk> {
        let mut taken = Vec::new();
        let Ok(mut reg) = self.registry.lock() else {
            return taken;
        };
        // Threads whose buffer is still to be looked at; at the end, a thread in the middle
        // of an event is waited for briefly.
        let mut pending = vec![true; reg.len()];
        let mut gone = vec![false; reg.len()];
        for attempt in 0..if force { 1000 } else { 1 } {
            if attempt > 0 {
                std::thread::yield_now();
            }
            // Only the threads still pending: a claim stalls the thread's next event.
            let claimed = slot::claim_idle_buffers(&reg, |i| pending[i]);
            for (i, guard) in claimed.into_iter().enumerate() {
                let Some(mut b) = guard else { continue };
                pending[i] = false;
                if b.open && (force || now.saturating_sub(b.opened_at) >= max_age) {
                    // No buffer in its place: the thread takes one at its next event, so
                    // threads that have gone quiet hold none.
                    if let Some(t) = b.take_framed() {
                        taken.push(t);
                    }
                }
                gone[i] = reg[i].is_dead() && !b.open;
            }
            if !pending.contains(&true) {
                break;
            }
        }
        let mut i = 0;
        reg.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
        set_thread_count(reg.len());
        taken
    }
}
