//! Following a capture while it is being written (`memtrack live`). Each read indexes only the
//! records appended since the last one, decodes only their events chunks, and applies the
//! events to one [`Replay`] kept across reads: a capture that grows for hours costs what it
//! grew by, not its size.
//!
//! Order: every thread writes its own chunks, so events reach the file grouped by thread, not
//! in sequence order; a chunk of a quiet thread (or of a thread not seen yet) can arrive after
//! another thread's later events. Sequence numbers are dense (every event takes the next
//! one), so decoded events wait until they are safe to apply in order: the run of numbers
//! that follows the last one applied, and past a gap only events [`SETTLE_NS`] older than the
//! newest event read (the tracker writes every buffer within about 250 ms of its first event,
//! so a number still missing then was lost). The clock is not asked: a starved writer stops
//! the file and its event times alike. An event that arrives below what was applied all
//! the same is applied when it arrives and counted in [`Follower::late_events`].

use crate::capture::{decode_chunk, Capture, ChunkRef, Event, IndexState, ReadError};
use crate::replay::{Replay, SiteSums, SiteTotal};
use crate::stacks::StackTable;
use crate::symbols::Symbolizer;
use crate::views::{table_rows, GroupBy, TableRow};
use memtrack_format::{EndReason, EventKind, Header};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How old an event must be before every event numbered below it is surely in the file: the
/// tracker writes a thread's buffer within 250 ms of its first event (`MAX_AGE_US` plus a
/// sweep), with room left for a busy writer.
pub const SETTLE_NS: u64 = 750_000_000;

/// [`SETTLE_NS`] while the file holds more than the follower has read.
pub const BEHIND_SETTLE_NS: u64 = 5_000_000_000;

/// Seconds of heap and RSS history kept (one point per second).
pub const HISTORY_SECONDS: usize = 3600;

/// Which of the events read a [`Follower::poll`] may apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Horizon {
    /// All of them: the capture is finished, or the caller knows better (tests).
    All,
    /// What is safe to apply (see the module's doc).
    Safe,
}

/// What the table of a live view sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// What is live now.
    Live,
    /// What was allocated since [`Follower::mark_start`] (freed or not).
    AllocatedSinceStart,
}

/// One point of a history: the highest value in one second, and the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    /// Seconds since the capture started.
    pub second: u64,
    pub max: u64,
    pub last: u64,
}

/// Per-second history, the last [`HISTORY_SECONDS`] kept.
#[derive(Default, Debug, Clone)]
pub struct History(VecDeque<Point>);

impl History {
    #[inline]
    fn add(&mut self, second: u64, value: u64) {
        match self.0.back_mut() {
            Some(p) if p.second >= second => {
                p.max = p.max.max(value);
                p.last = value;
            }
            _ => {
                if self.0.len() == HISTORY_SECONDS {
                    self.0.pop_front();
                }
                self.0.push_back(Point {
                    second,
                    max: value,
                    last: value,
                });
            }
        }
    }

    pub fn points(&self) -> impl DoubleEndedIterator<Item = &Point> + ExactSizeIterator {
        self.0.iter()
    }

    pub fn last(&self) -> Option<Point> {
        self.0.back().copied()
    }
}

/// The state when the view started: what growth and "allocated since start" count from.
struct Start {
    live_bytes: u64,
    sites: Vec<SiteTotal>,
    allocated: SiteSums,
    allocated_bytes: u64,
    allocated_count: u64,
}

/// One row of a live table: a location as `memtrack table` names it, and how its live bytes
/// changed since the view started (`None` in [`Measure::AllocatedSinceStart`]).
#[derive(Clone, Debug)]
pub struct LiveRow {
    /// The location as `memtrack table` prints it.
    pub label: String,
    pub row: TableRow,
    pub growth: Option<i64>,
}

/// What one [`Follower::poll`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    /// File bytes indexed by this read.
    pub bytes: u64,
    /// Events decoded, and applied (some may have waited from an earlier read).
    pub decoded: u64,
    pub applied: u64,
    /// The file holds more than this read took (it was given a budget): read again.
    pub behind: bool,
}

/// A capture followed as it grows.
pub struct Follower {
    cap: Capture,
    file: File,
    index: IndexState,
    /// Where the next record starts.
    offset: usize,
    /// Events decoded and not yet applied, in sequence order.
    pending: Vec<Event>,
    /// The newest event time read.
    file_time: u64,
    /// Storage for the next chunk's events (the allocation kept from one read to the next).
    spare: Vec<Event>,
    replay: Replay,
    stacks: StackTable,
    /// Exec boundaries already applied.
    execs: usize,
    /// The highest sequence number applied.
    applied: Option<u64>,
    /// Events that arrived below what was already applied (applied out of order).
    pub late_events: u64,
    /// Chunks that could not be decoded whole.
    pub damaged_chunks: usize,
    start: Option<Start>,
    heap: History,
    rss: History,
    /// Clock units per second.
    units_per_second: u64,
}

impl Follower {
    /// Opens `path` (a capture, complete or being written) with nothing read past its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Follower, ReadError> {
        let path = path.as_ref().to_path_buf();
        let io = |error| ReadError::Io {
            path: path.clone(),
            error,
        };
        let file = File::open(&path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "this is a directory; give a capture file (a .cap written by `memtrack run`)",
            )));
        }
        // The header is short: its first 64 KiB hold it (argv included) or it is cut off.
        let mut head = vec![0u8; 64 << 10];
        let n = read_at(&file, &mut head, 0).map_err(io)?;
        head.truncate(n);
        let (header, first) = match Header::decode(&head) {
            Ok(h) => h,
            Err(e) => return Err(ReadError::of_header(path, e)),
        };
        let units_per_second = (1_000_000_000 / header.clock_unit_ns.max(1)).max(1);
        Ok(Follower {
            cap: Capture::unmapped(path, header),
            file,
            index: IndexState::default(),
            offset: first,
            pending: Vec::new(),
            spare: Vec::new(),
            file_time: 0,
            replay: Replay::tracking_sites(),
            stacks: StackTable::default(),
            execs: 0,
            applied: None,
            late_events: 0,
            damaged_chunks: 0,
            start: None,
            heap: History::default(),
            rss: History::default(),
            units_per_second,
        })
    }

    /// The capture as indexed so far: header, modules, Python code, `END` (its events are not
    /// in it: they are in [`Follower::replay`]; its RSS samples are in [`Follower::rss`]).
    pub fn capture(&self) -> &Capture {
        &self.cap
    }

    /// The heap as replayed so far.
    pub fn replay(&self) -> &Replay {
        &self.replay
    }

    /// The stacks named by the events read so far.
    pub fn stacks(&self) -> &StackTable {
        &self.stacks
    }

    /// The heap in use, per second.
    pub fn heap(&self) -> &History {
        &self.heap
    }

    /// Resident memory, per second (from the capture's `RSS` samples).
    pub fn rss(&self) -> &History {
        &self.rss
    }

    /// Bytes of the file read so far.
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }

    /// Events read but not applied yet (waiting for other threads' chunks).
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// True once the capture's final `END` was read (not an exec's) and every event applied:
    /// the traced program has ended and nothing more will come.
    pub fn finished(&self) -> bool {
        self.ended() && self.pending.is_empty()
    }

    fn ended(&self) -> bool {
        self.cap.end.is_some_and(|e| e.reason != EndReason::Exec)
    }

    /// The capture's clock now, by this machine's clock: the capture's start is in its header.
    pub fn clock_now(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        now.saturating_sub(self.cap.header.start_unix_ns) / self.cap.header.clock_unit_ns.max(1)
    }

    /// Seconds since the capture started of a clock value.
    pub fn seconds(&self, time: u64) -> f64 {
        self.cap.seconds(time)
    }

    /// Reads what was appended since the last read (at most about `budget` bytes of it) and
    /// applies the events that `horizon` allows.
    pub fn poll(&mut self, horizon: Horizon, budget: usize) -> Result<Poll, ReadError> {
        let path = self.cap.path().to_path_buf();
        let io = |error| ReadError::Io {
            path: path.clone(),
            error,
        };
        let len = self.file.metadata().map_err(io)?.len() as usize;
        if len < self.offset {
            return Err(io(std::io::Error::other(
                "the capture got shorter while it was followed (was it written anew?)",
            )));
        }
        let mut stop = len.min(self.offset.saturating_add(budget.max(1)));
        let mut poll = Poll::default();
        let from = self.offset;
        loop {
            let (off, _cut) =
                self.cap
                    .index_records(&self.file, stop, self.offset, &mut self.index);
            self.offset = off;
            // A record longer than the budget: read it whole.
            if off == from && stop < len {
                stop = len;
                continue;
            }
            break;
        }
        poll.bytes = (self.offset - from) as u64;
        poll.behind = stop < len;
        self.cap.threads = self.index.tids.len();
        let chunks = std::mem::take(&mut self.cap.chunks);
        let mut buf = Vec::new();
        for ch in &chunks {
            poll.decoded += self.decode(ch, &mut buf).map_err(io)?;
        }
        // Each thread's events are in order already: a stable sort merges the runs (one
        // thread's alone need none).
        if !self.pending.is_sorted_by_key(|e| e.seq) {
            self.pending.sort_by_key(|e| e.seq);
        }
        let n = self.ready(horizon, !poll.behind);
        poll.applied = n as u64;
        let mut pending = std::mem::take(&mut self.pending);
        for ev in &pending[..n] {
            self.apply(ev);
        }
        if n == pending.len() {
            // Its storage decodes the next chunk.
            pending.clear();
            self.spare = pending;
        } else {
            pending.drain(..n);
            self.pending = pending;
        }
        for s in std::mem::take(&mut self.cap.rss) {
            self.rss.add(s.time / self.units_per_second, s.rss_bytes);
        }
        Ok(poll)
    }

    /// Decodes one chunk into `pending`; returns the number of events.
    fn decode(&mut self, ch: &ChunkRef, buf: &mut Vec<u8>) -> std::io::Result<u64> {
        buf.resize(ch.end - ch.ops_offset, 0);
        let n = read_at(&self.file, buf, ch.ops_offset as u64)?;
        buf.truncate(n);
        let local = ChunkRef {
            ops_offset: 0,
            end: buf.len(),
            ..*ch
        };
        let mut d = decode_chunk(buf, &local, std::mem::take(&mut self.spare));
        for &(id, parent, ip) in &d.nodes {
            self.stacks.insert(id, parent, ip);
        }
        self.damaged_chunks += d.damaged as usize;
        if let Some(applied) = self.applied {
            // A thread's events are in order.
            self.late_events += d.events.partition_point(|e| e.seq <= applied) as u64;
        }
        let count = d.events.len() as u64;
        if let Some(last) = d.events.last() {
            self.file_time = self.file_time.max(last.time);
        }
        if self.pending.is_empty() {
            // The common case (everything before was applied): no copy.
            self.pending = d.events;
        } else {
            self.pending.extend_from_slice(&d.events);
            d.events.clear();
            self.spare = d.events;
        }
        Ok(count)
    }

    /// How many of the pending events (a prefix) may be applied now; `caught_up`: the last read
    /// reached the end of the file.
    fn ready(&self, horizon: Horizon, caught_up: bool) -> usize {
        if self.ended() || horizon == Horizon::All {
            return self.pending.len();
        }
        let unit = self.cap.header.clock_unit_ns.max(1);
        // A missing number is an event at most ~250 ms older than the newest one in the file
        // (it waits in a buffer or the writer's queue). Event times, not the clock: they lag
        // the clock when the tracker's writer is starved, and a reader that is behind must not
        // take the rest of the file for lost. While the file holds more than was read, a
        // thread descheduled inside its buffer on a loaded machine can be further behind than
        // that: a wider margin. None: nothing is that old yet.
        let margin = if caught_up {
            SETTLE_NS
        } else {
            BEHIND_SETTLE_NS
        };
        let settled = self.file_time.checked_sub(margin / unit);
        // Numbers taken by something that is not an event (the mark of Python's end).
        let marks = self.cap.python_end.map(|p| p.seq);
        let mut next = self.applied.map_or(1, |a| a + 1);
        let mut n = 0;
        for e in &self.pending {
            if marks == Some(next) {
                next += 1;
            }
            // The next number (or one taken twice), or past a gap that time has shown to be
            // numbers lost (an event with no buffer to go to, a process forked with its count).
            if e.seq <= next || settled.is_some_and(|t| e.time <= t) {
                next = next.max(e.seq + 1);
                n += 1;
                continue;
            }
            break;
        }
        // Not the clock: when the tracker's writer is starved the file stops growing with
        // numbers missing that are not lost, and its event times stop too. A number lost just
        // before the program went quiet holds what follows until newer events come (or the
        // capture ends).
        n
    }

    #[inline]
    fn apply(&mut self, ev: &Event) {
        while let Some(&b) = self.cap.exec_boundaries.get(self.execs) {
            if ev.seq < b {
                break;
            }
            self.replay.exec_reset();
            self.execs += 1;
        }
        self.replay.sample_rate = self.cap.sample_rate().unwrap_or(0);
        self.replay.apply(ev);
        self.applied = Some(self.applied.map_or(ev.seq, |a| a.max(ev.seq)));
        if ev.kind.is_heap() {
            self.heap
                .add(ev.time / self.units_per_second, self.replay.live_bytes);
        }
        if let (Some(s), EventKind::Alloc { size, stack, .. }) = (self.start.as_mut(), ev.kind) {
            s.allocated.add(stack, size);
            s.allocated_bytes = s.allocated_bytes.saturating_add(size);
            s.allocated_count += 1;
        }
    }

    /// Makes now the start that growth and [`Measure::AllocatedSinceStart`] count from.
    pub fn mark_start(&mut self) {
        self.start = Some(Start {
            live_bytes: self.replay.live_bytes,
            sites: self.replay.live_sites(),
            allocated: SiteSums::default(),
            allocated_bytes: 0,
            allocated_count: 0,
        });
    }

    /// Live bytes now less live bytes at the start (0 before [`Follower::mark_start`]).
    pub fn growth(&self) -> i64 {
        self.start
            .as_ref()
            .map_or(0, |s| self.replay.live_bytes as i64 - s.live_bytes as i64)
    }

    /// Bytes and allocations made since the start.
    pub fn allocated_since_start(&self) -> (u64, u64) {
        self.start
            .as_ref()
            .map_or((0, 0), |s| (s.allocated_bytes, s.allocated_count))
    }

    /// What is live now grouped by stack, largest first.
    pub fn live_sites(&self) -> Vec<SiteTotal> {
        self.replay.live_sites()
    }

    /// The `top` locations of `measure`, grouped by `by` and named as `memtrack table` names
    /// them, largest first; in [`Measure::Live`] each with its growth since the start.
    pub fn table(
        &self,
        sym: &mut Symbolizer,
        measure: Measure,
        by: GroupBy,
        top: usize,
    ) -> Vec<LiveRow> {
        let mut rows = match measure {
            Measure::Live => table_rows(&self.replay.live_sites(), &self.stacks, sym, by),
            Measure::AllocatedSinceStart => match &self.start {
                Some(s) => table_rows(&s.allocated.sorted(), &self.stacks, sym, by),
                None => Vec::new(),
            },
        };
        rows.truncate(top);
        let before: HashMap<(String, Option<String>, Option<u32>), u64> =
            match (&self.start, measure) {
                (Some(s), Measure::Live) => table_rows(&s.sites, &self.stacks, sym, by)
                    .into_iter()
                    .map(|r| ((r.function, r.file, r.line), r.total_bytes))
                    .collect(),
                _ => HashMap::new(),
            };
        rows.into_iter()
            .map(|row| {
                let growth = (measure == Measure::Live).then(|| {
                    let key = (row.function.clone(), row.file.clone(), row.line);
                    row.total_bytes as i64 - before.get(&key).copied().unwrap_or(0) as i64
                });
                let label =
                    crate::report::location_label(&row.function, row.file.as_deref(), row.line);
                LiveRow { label, row, growth }
            })
            .collect()
    }
}

/// Reads up to `buf.len()` bytes at `at` (fewer at the end of the file).
fn read_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/captures")
            .join(name)
    }

    /// Offsets just past each record of `data` (from the first after the header).
    fn record_ends(data: &[u8]) -> Vec<usize> {
        let (_, mut off) = Header::decode(data).unwrap();
        let mut ends = Vec::new();
        while let memtrack_format::Next::Record(r) = memtrack_format::next_record(data, off) {
            off = r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
            ends.push(off);
        }
        ends
    }

    #[test]
    fn events_wait_for_the_numbers_before_them_unless_they_are_old() {
        let path = stored("v4-threads.cap");
        let full = Capture::open(&path).unwrap();
        assert!(full.threads > 1);
        let total = full.replay().replay.events;
        let mut f = Follower::open(&path).unwrap();
        // Only what is safe, but the capture is complete: everything.
        f.poll(Horizon::Safe, usize::MAX).unwrap();
        assert!(f.finished(), "a complete capture applies everything");
        assert_eq!(f.replay().events, total);

        // Each prefix without its END: what is applied is the unbroken run of numbers from 1
        // in it, and the rest once the clock says the gaps are old.
        let data = std::fs::read(&path).unwrap();
        let dir = std::env::temp_dir().join(format!("memtrack-horizon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cut = dir.join("cut.cap");
        let mut waited = 0;
        for &end in &record_ends(&data)[..record_ends(&data).len() - 1] {
            std::fs::write(&cut, &data[..end]).unwrap();
            let prefix = Capture::open(&cut).unwrap();
            let mut seqs: Vec<u64> = prefix
                .events(&mut StackTable::default())
                .map(|e| e.seq)
                .collect();
            seqs.sort_unstable();
            let run = seqs
                .iter()
                .enumerate()
                .take_while(|&(i, &s)| s == i as u64 + 1)
                .count();
            let mut f = Follower::open(&cut).unwrap();
            let p = f.poll(Horizon::Safe, usize::MAX).unwrap();
            assert_eq!(p.decoded as usize, seqs.len());
            assert_eq!(p.applied as usize, run, "at {end}: {seqs:?}");
            assert_eq!(f.replay().last_seq, if run > 0 { run as u64 } else { 0 });
            waited += seqs.len() - run;
            // The process is gone: all of it, out of order as it came.
            let p = f.poll(Horizon::All, usize::MAX).unwrap();
            assert_eq!(p.applied as usize, seqs.len() - run);
            assert!(!f.finished());
            assert_eq!(f.late_events, 0);
        }
        assert!(waited > 0, "some prefix has a gap to wait at");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
