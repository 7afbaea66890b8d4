//! The writer thread: the only place that writes events to the capture in steady state. It
//! takes messages from the hand-off queue, transcodes each events chunk into the compact
//! encoding, collects buffers that threads have left idle ([`Inbox::take_chunks`]), publishes
//! the clock, and at the end writes what is left and the `END` record.
//!
//! Must never: reach into the recorder or the hand-off's per-thread state (everything it needs
//! comes through [`Inbox`], which the recorder implements), or block on the program's threads.

use crate::aggregate::Aggregator;
use crate::capture_file::CaptureFile;
use crate::clock;
use crate::guard::IgnoreAllocs;
use crate::mapbuf::MapBuf;
use crate::rss::RssSampler;
use crossbeam_channel::TryRecvError;
use memtrack_format::{
    frame_in_place, record, ByteSink, EndReason, EndRecord, FastEncoder, RssRecord, Transcoder,
    MAX_FRAME_PREFIX,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An events chunk framed in place in its buffer (`memtrack_format::frame_in_place`): the
/// record starts at `start`, its payload `MAX_FRAME_PREFIX` bytes into the buffer. The writer
/// transcodes the payload as it is, without parsing the frame again.
pub(crate) struct FramedChunk {
    buf: MapBuf,
    start: usize,
}

impl FramedChunk {
    pub(crate) fn new(buf: MapBuf, start: usize) -> Self {
        FramedChunk { buf, start }
    }

    /// The whole record, frame prefix included.
    fn framed(&self) -> &[u8] {
        self.buf.as_slice().get(self.start..).unwrap_or(&[])
    }

    /// The `EVENTS` payload: chunk header and stream-encoded items.
    fn payload(&self) -> &[u8] {
        self.buf.as_slice().get(MAX_FRAME_PREFIX..).unwrap_or(&[])
    }

    /// The buffer, to be used again.
    pub(crate) fn into_buf(self) -> MapBuf {
        self.buf
    }
}

/// What the writer is handed.
pub(crate) enum Msg {
    /// An events chunk.
    Chunk(FramedChunk),
    /// A framed record, written as it is.
    Record(Vec<u8>),
    /// Write everything buffered, then `END`, then acknowledge.
    Finish(EndReason, Arc<AtomicBool>),
}

/// Buffers older than this are collected by the writer even when not full, so a killed
/// process loses at most ~250 ms of events.
pub(crate) const MAX_AGE_US: u64 = 150_000;
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Where the writer's work comes from (implemented by the recorder over the hand-off).
pub(crate) trait Inbox {
    /// The next queued message.
    fn take(&self) -> Result<Msg, TryRecvError>;
    /// Messages queued now.
    fn queued(&self) -> usize;
    /// The open chunks of threads' buffers opened at least `max_age` clock units ago (every
    /// non-empty one when `force`), framed.
    fn take_chunks(&self, force: bool, max_age: u64) -> Vec<FramedChunk>;
    /// A buffer written, for threads to take again.
    fn recycle(&self, buf: MapBuf);
    /// The `END` record, as of now.
    fn end_record(&self, reason: EndReason) -> EndRecord;
    /// The global sequence value now (the number the next event takes), read without
    /// disturbing the threads that take numbers.
    fn seq_now(&self) -> u64;

    /// True when a recording started in a running process is to stop now (its hooks are
    /// removed and the state is `Finished` when this returns true): see `inproc`.
    fn stop_due(&self) -> bool {
        false
    }
}

/// The capture and the encoders that turn chunks into what the file holds.
pub(crate) struct Writer {
    file: CaptureFile,
    /// Used by the writer thread only (or by `finish` when no writer was ever started).
    transcoder: Mutex<Encoder>,
    /// The same, for a program thread that transcodes its own chunk while the writer is
    /// behind (see `handoff::Handoff::hand_off`).
    helper: Mutex<Encoder>,
    /// Aggregated recording: events are applied here and checkpoints written instead.
    agg: Option<Mutex<Aggregator>>,
    /// Clock units between checkpoints.
    interval: u64,
    /// The checkpoints this image wrote and that are still in the file: (offset, length).
    checkpoints: Mutex<Vec<(u64, u64)>>,
}

/// Superseded checkpoints are compacted away once they take more than this, and more than the
/// rest of the file: a steady aggregated run stays within about twice its stacks' size plus
/// this, whatever its length.
const COMPACT_AT: u64 = 256 * 1024;

impl Writer {
    /// `first_seq`: the number this image's first event takes.
    pub(crate) fn new(file: CaptureFile, first_seq: u64) -> Self {
        let fast = Encoder::fast_wanted();
        Writer {
            file,
            transcoder: Mutex::new(Encoder::new(fast)),
            helper: Mutex::new(Encoder::new(fast)),
            agg: crate::aggregate::from_env()
                .map(|rate| Mutex::new(Aggregator::new(first_seq, rate))),
            interval: crate::aggregate::interval(),
            checkpoints: Mutex::new(Vec::new()),
        }
    }

    /// True when recording aggregated.
    pub(crate) fn aggregated(&self) -> bool {
        self.agg.is_some()
    }

    /// The writer's queue is empty: the aggregator may give up gaps no event will fill.
    fn idle(&self, now: u64) {
        if let Some(Ok(mut a)) = self.agg.as_ref().map(|a| a.lock()) {
            a.give_up_stale(now);
        }
    }

    /// True when aggregating and a checkpoint is due at `now`.
    fn checkpoint_due(&self, now: u64) -> bool {
        let Some(agg) = &self.agg else { return false };
        agg.lock().is_ok_and(|a| self.due(&a, now))
    }

    fn due(&self, a: &Aggregator, now: u64) -> bool {
        now.saturating_sub(a.last_checkpoint) >= self.interval
    }

    /// Writes a checkpoint (aggregated recording only) when one is due, or always when `last`.
    fn checkpoint(&self, now: u64, rss: &mut RssSampler, last: bool) {
        let Some(agg) = &self.agg else { return };
        let Ok(mut a) = agg.lock() else { return };
        if !last && !self.due(&a, now) {
            return;
        }
        let rss_bytes = rss.due(now, true).unwrap_or(0);
        let payload = a.checkpoint(now, rss_bytes, last).encode();
        drop(a);
        let mut out = Vec::with_capacity(payload.len() + MAX_FRAME_PREFIX);
        memtrack_format::put_record(&mut out, record::CHECKPOINT, &payload);
        let at = self.file.size();
        if !self.file.write(&out) {
            return;
        }
        let Ok(mut written) = self.checkpoints.lock() else {
            return;
        };
        let Some(at) = at else {
            return;
        };
        written.push((at, out.len() as u64));
        if !last {
            self.compact(&mut written);
        }
    }

    /// Drops the superseded checkpoints from the file when they have grown large (see
    /// [`COMPACT_AT`]). Every earlier image's last checkpoint stays (this image never listed
    /// them), and the newest holds the series of the ones dropped.
    fn compact(&self, written: &mut Vec<(u64, u64)>) {
        let Some((&newest, superseded)) = written.split_last() else {
            return;
        };
        let old: u64 = superseded.iter().map(|c| c.1).sum();
        let Some(size) = self.file.size() else {
            return;
        };
        let rest = size.saturating_sub(old + newest.1);
        if old <= COMPACT_AT.max(rest) {
            return;
        }
        if self.file.compact(superseded) {
            let size = self.file.size().unwrap_or(0);
            written.clear();
            written.push((size.saturating_sub(newest.1), newest.1));
        } else {
            // Not possible here (a path that is gone, a read-only directory): those stay in
            // the file; later checkpoints are counted afresh, so a retry waits for as many
            // bytes more instead of coming at every checkpoint.
            written.clear();
        }
    }

    /// Writes a framed record as it is.
    pub(crate) fn write_record(&self, bytes: &[u8]) -> bool {
        if let Some(agg) = &self.agg {
            // A `PYTHON_END` mark takes a sequence number: the aggregator must not wait for it.
            if let memtrack_format::Next::Record(r) = memtrack_format::next_record(bytes, 0) {
                if r.kind == record::PYTHON_END {
                    if let Ok(m) = memtrack_format::PythonEndRecord::decode(r.payload) {
                        if let Ok(mut a) = agg.lock() {
                            a.skip(m.seq, clock::now_units());
                        }
                    }
                }
            }
        }
        self.file.write(bytes)
    }

    /// Writes an events chunk, transcoded into the compact encoding.
    pub(crate) fn write_chunk(&self, chunk: &FramedChunk) -> bool {
        if let Some(agg) = &self.agg {
            let nodes = agg
                .lock()
                .ok()
                .and_then(|mut a| a.feed(chunk.payload(), clock::now_units()));
            let Some(nodes) = nodes else { return true };
            let compacted = self
                .transcoder
                .lock()
                .ok()
                .and_then(|mut c| transcode(&mut c, &nodes));
            return match compacted {
                Some(out) => self.file.write(&out),
                None => {
                    let mut out = Vec::with_capacity(nodes.len() + MAX_FRAME_PREFIX);
                    memtrack_format::put_record(&mut out, record::EVENTS, &nodes);
                    self.file.write(&out)
                }
            };
        }
        let compacted = self
            .transcoder
            .lock()
            .ok()
            .and_then(|mut c| transcode(&mut c, chunk.payload()));
        // A chunk that cannot be transcoded (never expected) is kept as it is.
        self.file
            .write(compacted.as_deref().unwrap_or(chunk.framed()))
    }

    /// The compact encoding of a chunk, made on the calling thread when the helper transcoder
    /// is free (None: it is busy, or the chunk is not transcodable).
    pub(crate) fn transcode_aside(&self, chunk: &FramedChunk) -> Option<Vec<u8>> {
        if self.agg.is_some() {
            // Every chunk goes through the aggregator, on the writer thread.
            return None;
        }
        let mut c = self.helper.try_lock().ok()?;
        transcode(&mut c, chunk.payload())
    }
}

/// How chunks are encoded for the file: the rank encoding (`EVENTS_R`, the default), or with
/// `MEMTRACK_ENCODING=fast` the stream compressed at a low zstd level (`EVENTS_S`), which costs
/// the writer under half the CPU per event for 2.5 to 3.4 times the bytes (`memtrack compact`
/// transcodes it later).
enum Encoder {
    Rank(Box<Transcoder>),
    Fast(FastEncoder),
}

/// The fast encoding asked for by the session's start (`memtrack_start_with`'s `START_FAST`:
/// `memtrack attach --encoding fast`), beside the environment's `MEMTRACK_ENCODING`.
static FAST: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_fast(on: bool) {
    FAST.store(on, Ordering::Relaxed);
}

/// zstd's level for `EVENTS_S`: under half the rank encoding's CPU per event, and lower levels
/// save little more (see bench/RESULTS.md).
const FAST_LEVEL: i32 = -5;

impl Encoder {
    /// `MEMTRACK_ENCODING=fast`, or the session's start asked for it.
    fn fast_wanted() -> bool {
        crate::env::getenv(c"MEMTRACK_ENCODING").is_some_and(|v| v.to_bytes() == b"fast")
            || FAST.load(Ordering::Relaxed)
    }

    fn new(fast: bool) -> Self {
        if fast {
            Encoder::Fast(FastEncoder::new())
        } else {
            Encoder::Rank(Box::default())
        }
    }
}

/// The encoded chunk (a framed record) of an `EVENTS` payload (None: not encodable).
fn transcode(c: &mut Encoder, payload: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() / 2);
    match c {
        Encoder::Rank(t) => t.transcode(payload, 1, &mut out).ok()?,
        Encoder::Fast(f) => f.encode(payload, FAST_LEVEL, &mut out).ok()?,
    }
    Some(out)
}

/// The writer thread's loop, until the queue is disconnected.
pub(crate) fn run(w: &Writer, inbox: &impl Inbox) {
    IgnoreAllocs::forever();
    // Opened here, by this process's own writer: a forked child's writer opens its own.
    let mut rss = RssSampler::open();
    let mut last_sweep = clock::tick();
    loop {
        // Polled, never a blocking receive: a blocked receiver makes crossbeam's senders look up
        // `std::thread::current()`, which gives program threads a handle that std frees at thread
        // exit, outside the guard, as if the program had freed an unknown block.
        // One message at a time, the clock published after each: with the queue kept full
        // (threads waiting for room send as soon as one is made), draining it first would
        // starve the clock and the sweep for as long as the program keeps it full.
        match inbox.take() {
            Ok(m) => {
                if handle(w, inbox, &mut rss, m) {
                    return;
                }
            }
            Err(TryRecvError::Empty) => {
                w.idle(clock::now_units());
                std::thread::sleep(clock::TICK)
            }
            Err(TryRecvError::Disconnected) => return,
        }
        let now = clock::tick();
        sample_rss(w, inbox, &mut rss, now, false);
        if now.saturating_sub(last_sweep) >= SWEEP_EVERY.as_micros() as u64 {
            // Before a checkpoint every thread's buffered events are collected, so that it
            // counts all events made until now, not those of busy threads only.
            let due = w.checkpoint_due(now);
            sweep(w, inbox, due);
            last_sweep = now;
            w.checkpoint(now, &mut rss, false);
            if inbox.stop_due() {
                let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                handle(w, inbox, &mut rss, Msg::Finish(EndReason::Detached, done));
                return;
            }
        }
    }
}

/// True when the writer's work is over (a recording of a running process was stopped: the
/// process goes on without it).
fn handle(w: &Writer, inbox: &impl Inbox, rss: &mut RssSampler, m: Msg) -> bool {
    match m {
        Msg::Chunk(chunk) => {
            w.write_chunk(&chunk);
            inbox.recycle(chunk.into_buf());
        }
        Msg::Record(bytes) => {
            w.write_record(&bytes);
        }
        Msg::Finish(reason, ack) => {
            if reason == EndReason::Detached {
                // The hooks are gone and the state says so: threads that entered one just
                // before finish their event within this time.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drain(w, inbox, rss);
            sweep(w, inbox, true);
            drain(w, inbox, rss);
            sample_rss(w, inbox, rss, clock::now_units(), true);
            w.checkpoint(clock::now_units(), rss, true);
            // Nothing after END: the loop goes on until the queue closes, and a sample written
            // after END would hide it from the next image of an exec, which continues the
            // capture only when the file ends with END (it then ran unrecorded).
            rss.off();
            w.file.write_end(&inbox.end_record(reason));
            crate::inproc::ended();
            ack.store(true, Ordering::Release);
            return reason == EndReason::Detached;
        }
    }
    false
}

/// Writes what is queued now (not what arrives meanwhile, so it always ends).
fn drain(w: &Writer, inbox: &impl Inbox, rss: &mut RssSampler) {
    for _ in 0..inbox.queued() {
        match inbox.take() {
            Ok(m) => {
                handle(w, inbox, rss, m);
            }
            Err(_) => break,
        }
    }
}

/// Writes the chunks of buffers that are old enough (all non-empty ones when `force`).
fn sweep(w: &Writer, inbox: &impl Inbox, force: bool) {
    for chunk in inbox.take_chunks(force, MAX_AGE_US) {
        w.write_chunk(&chunk);
        inbox.recycle(chunk.into_buf());
    }
}

/// Ends the capture on the calling thread, when no writer thread was ever started.
pub(crate) fn finish_inline(w: &Writer, inbox: &impl Inbox, reason: EndReason) {
    sweep(w, inbox, true);
    let mut rss = RssSampler::open();
    sample_rss(w, inbox, &mut rss, clock::now_units(), true);
    w.checkpoint(clock::now_units(), &mut rss, true);
    w.file.write_end(&inbox.end_record(reason));
}

/// Writes an `RSS` record when a sample is due and changed (always when `force`). The record
/// is framed in a stack buffer: nothing is allocated.
fn sample_rss(w: &Writer, inbox: &impl Inbox, rss: &mut RssSampler, now: u64, force: bool) {
    if w.aggregated() {
        // The checkpoints carry it: RSS records would grow the file with time.
        return;
    }
    let Some(rss_bytes) = rss.due(now, force) else {
        return;
    };
    // Taken after the read: every event whose effect the sample can show is numbered below.
    let sample = RssRecord {
        seq: inbox.seq_now(),
        time: now,
        rss_bytes,
    };
    let mut buf = FixedBuf {
        bytes: [0; MAX_FRAME_PREFIX + RssRecord::MAX_LEN],
        len: MAX_FRAME_PREFIX,
    };
    sample.write_to(&mut buf);
    let len = buf.len;
    let Some(framed) = buf.bytes.get_mut(..len) else {
        return;
    };
    let start = frame_in_place(framed, record::RSS);
    if w.write_record(framed.get(start..).unwrap_or(&[])) {
        rss.written(rss_bytes);
    }
}

/// A byte sink over a stack array (bytes past its end are dropped, never expected: the array
/// holds the longest record).
struct FixedBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> ByteSink for FixedBuf<N> {
    fn push_byte(&mut self, b: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }
    fn push_slice(&mut self, s: &[u8]) {
        for &b in s {
            self.push_byte(b);
        }
    }
}
