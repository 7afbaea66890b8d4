//! Aggregated recording (`MEMTRACK_AGGREGATE=1`): the writer thread applies every event itself,
//! in sequence order, to a live set and per-stack figures, and writes `CHECKPOINT` records
//! instead of events. Stack nodes still go to the file (nodes-only chunks) for symbolization.
//!
//! Runs on the writer thread only (or the finishing thread when none was started), inside the
//! guard: its maps live in the tracker's private heap.

use memtrack_format::{
    sampling, Checkpoint, ChunkHeader, Cursor, EventKind, Item, SeriesPoint, StackFigures,
    StreamDecoder, StreamEncoder,
};
use std::collections::{HashMap, VecDeque};

/// A gap in the sequence older than this (clock units: µs) is a number no event will take.
const SETTLE_US: u64 = 2_000_000;
/// Series points kept before every other one is dropped.
const MAX_POINTS: usize = 4096;

#[derive(Default, Clone, Copy)]
struct Site {
    live_bytes: u64,
    live_count: u64,
    total_bytes: u64,
    total_count: u64,
    peak_bytes: u64,
    peak_count: u64,
    /// The peak epoch whose figures `peak_*` hold (else the live ones are the peak's).
    epoch: u64,
    /// Sampled: the measuring half's live figures (see `Halves`).
    half_bytes: u64,
    half_count: u64,
}

/// A sampled peak as the reader finds it (`PeakHalves` in its replay): the sample split in two
/// halves by a hash of each allocation's number; half 0 picks the moment, half 1 measures.
#[derive(Default)]
struct Halves {
    live: [u64; 2],
    count_1: u64,
    var_1: u128,
    highest_0: u64,
    allocations: u64,
}

/// Which half an allocation numbered `seq` of `size` bytes is in (2: both), as the reader
/// decides it.
fn half_of(seq: u64, size: u64, rate: u64) -> u8 {
    if sampling::probability(size, rate) >= 0.5 {
        2
    } else {
        (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 63) as u8
    }
}

struct Pending {
    seq: u64,
    time: u64,
    tid: u32,
    kind: EventKind,
}

/// The events of one chunk not applied yet, in sequence order (a thread numbers its events
/// as it makes them), and when the chunk arrived.
struct Run {
    events: std::collections::VecDeque<Pending>,
    arrived: u64,
}

/// The aggregator's state.
pub(crate) struct Aggregator {
    rate: u64,
    next_seq: u64,
    /// Chunks waiting for lower numbers held by other threads' chunks: merged by their first
    /// event (a handful of runs, not a heap of every event).
    runs: Vec<Run>,
    live: HashMap<u64, (u64, u32, u8)>,
    realloc: HashMap<u32, (u64, u64, u32, u8)>,
    halves: Halves,
    sites: Vec<Site>,
    epoch: u64,
    heap: u64,
    heap_count: u64,
    heap_var: f64,
    peak: u64,
    peak_count: u64,
    peak_var: f64,
    peak_time: u64,
    peak_seq: u64,
    total_bytes: u64,
    total_count: u64,
    total_frees: u64,
    events: u64,
    unmatched: u64,
    number: u64,
    series: Vec<SeriesPoint>,
    /// The time of the last checkpoint written.
    pub(crate) last_checkpoint: u64,
}

impl Aggregator {
    pub(crate) fn new(first_seq: u64, rate: u64) -> Self {
        Aggregator {
            rate,
            next_seq: first_seq,
            runs: Vec::new(),
            live: HashMap::new(),
            realloc: HashMap::new(),
            halves: Halves::default(),
            sites: Vec::new(),
            epoch: 0,
            heap: 0,
            heap_count: 0,
            heap_var: 0.0,
            peak: 0,
            peak_count: 0,
            peak_var: 0.0,
            peak_time: 0,
            peak_seq: 0,
            total_bytes: 0,
            total_count: 0,
            total_frees: 0,
            events: 0,
            unmatched: 0,
            number: 0,
            series: Vec::new(),
            last_checkpoint: 0,
        }
    }

    /// Takes an `EVENTS` payload: queues its events, returns a stream payload holding only its
    /// node definitions (None: it has none, or it cannot be decoded).
    pub(crate) fn feed(&mut self, payload: &[u8], now: u64) -> Option<Vec<u8>> {
        let mut c = Cursor::new(payload);
        let header = ChunkHeader::decode(&mut c).ok()?;
        let mut d = StreamDecoder::new(c.rest(), &header);
        let mut nodes: Option<Vec<u8>> = None;
        let mut enc = StreamEncoder::new(&header);
        let mut run = VecDeque::new();
        while let Ok(Some(item)) = d.next_item() {
            match item {
                Item::Node { .. } => {
                    let out = nodes.get_or_insert_with(|| {
                        let mut v = Vec::new();
                        header.encode(&mut v);
                        v
                    });
                    enc.item(out, &item);
                }
                Item::Event { seq, time, kind } => {
                    // Marks and mapped-memory events are not counted, but they hold their
                    // number in the sequence: left out, they would be gaps that hold every
                    // later event back until it is given up.
                    let p = Pending {
                        seq,
                        time,
                        tid: header.tid,
                        kind,
                    };
                    if seq == self.next_seq && run.is_empty() && self.runs.is_empty() {
                        self.apply(&p);
                    } else {
                        run.push_back(p);
                    }
                }
            }
        }
        if !run.is_empty() {
            self.runs.push(Run {
                events: run,
                arrived: now,
            });
        }
        self.settle(now, false);
        nodes
    }

    /// A sequence number taken by a record that is not an event (`PYTHON_END`): it holds
    /// nothing back.
    pub(crate) fn skip(&mut self, seq: u64, now: u64) {
        self.runs.push(Run {
            events: VecDeque::from([Pending {
                seq,
                time: 0,
                tid: 0,
                kind: EventKind::RegionEnd,
            }]),
            arrived: now,
        });
        self.settle(now, false);
    }

    /// Applies the queued events whose every lower number has arrived (all when `force`).
    pub(crate) fn settle(&mut self, _now: u64, force: bool) {
        self.apply_ready(|top, next, _| force || top.seq <= next);
    }

    /// Called when the writer's queue is empty: every chunk sent has been fed, so a gap that
    /// has held events back for [`SETTLE_US`] (longer than any buffer waits to be collected)
    /// is a number no event will fill (a thread that died inside an event). Never on time
    /// alone while chunks wait in the queue: under a backlog the filler may be queued still,
    /// and applying past it would count a free before its allocation.
    pub(crate) fn give_up_stale(&mut self, now: u64) {
        self.apply_ready(|top, next, arrived| {
            top.seq <= next || now.saturating_sub(arrived) >= SETTLE_US
        });
    }

    fn apply_ready(&mut self, ready: impl Fn(&Pending, u64, u64) -> bool) {
        loop {
            // The run whose next event has the lowest number.
            let Some((i, _)) = self
                .runs
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.events.front().map(|p| (i, p.seq)))
                .min_by_key(|&(_, seq)| seq)
            else {
                self.runs.clear();
                return;
            };
            let arrived = self.runs[i].arrived;
            // Apply from this run while it holds the next numbers (the common case: a thread's
            // stretch of events that no other thread interleaves).
            let mut applied = false;
            while let Some(top) = self.runs[i].events.front() {
                if !(top.seq <= self.next_seq || (!applied && ready(top, self.next_seq, arrived))) {
                    break;
                }
                let Some(p) = self.runs[i].events.pop_front() else {
                    break;
                };
                applied = true;
                self.apply(&p);
            }
            if self.runs[i].events.is_empty() {
                self.runs.swap_remove(i);
            }
            if !applied {
                return;
            }
        }
    }

    fn site(&mut self, stack: u32) -> &mut Site {
        let i = stack as usize;
        if i >= self.sites.len() {
            self.sites
                .resize((i + 1).next_power_of_two(), Site::default());
        }
        let (epoch, sampled) = (self.epoch, self.rate != 0);
        let s = &mut self.sites[i];
        if s.epoch != epoch {
            // The first change since the last peak: keep what it held then (sampled: what the
            // measuring half held).
            (s.peak_bytes, s.peak_count) = if sampled {
                (s.half_bytes, s.half_count)
            } else {
                (s.live_bytes, s.live_count)
            };
            s.epoch = epoch;
        }
        s
    }

    /// Half `k`'s share of a sampled block of half `half`: bytes, allocations, variance term
    /// (rounded as the reader rounds them).
    fn share(&self, size: u64, half: u8, k: u8) -> (u64, u64, u64) {
        let (b, n, v) = self.weights(size);
        if half == 2 {
            return (b, n, v.round() as u64);
        }
        if half != k {
            return (0, 0, 0);
        }
        let p = sampling::probability(size, self.rate) / 2.0;
        let w = 2.0 * b as f64;
        (2 * b, 2 * n, ((1.0 - p) * w * w).round() as u64)
    }

    /// Adds (`sign` 1) or removes (-1) a sampled block in the halves and its stack's half.
    fn halves_change(&mut self, size: u64, stack: u32, half: u8, sign: i8) {
        if self.rate == 0 {
            return;
        }
        let (a, b) = (self.share(size, half, 0), self.share(size, half, 1));
        let h = &mut self.halves;
        if sign > 0 {
            h.live[0] += a.0;
            h.live[1] += b.0;
            h.count_1 += b.1;
            h.var_1 += b.2 as u128;
        } else {
            h.live[0] = h.live[0].saturating_sub(a.0);
            h.live[1] = h.live[1].saturating_sub(b.0);
            h.count_1 = h.count_1.saturating_sub(b.1);
            h.var_1 = h.var_1.saturating_sub(b.2 as u128);
        }
        let s = self.site(stack);
        if sign > 0 {
            s.half_bytes += b.0;
            s.half_count += b.1;
        } else {
            s.half_bytes = s.half_bytes.saturating_sub(b.0);
            s.half_count = s.half_count.saturating_sub(b.1);
        }
    }

    fn weights(&self, size: u64) -> (u64, u64, f64) {
        if self.rate == 0 {
            (size, 1, 0.0)
        } else {
            (
                sampling::weight(size, self.rate).round() as u64,
                sampling::count_weight(size, self.rate).round() as u64,
                sampling::variance(size, self.rate),
            )
        }
    }

    fn add_live(&mut self, addr: u64, size: u64, stack: u32, half: u8) {
        let (b, n, v) = self.weights(size);
        if let Some((osize, ostack, ohalf)) = self.live.insert(addr, (size, stack, half)) {
            self.remove_weights(osize, ostack, ohalf);
        }
        self.halves_change(size, stack, half, 1);
        let s = self.site(stack);
        s.live_bytes += b;
        s.live_count += n;
        self.heap += b;
        self.heap_count += n;
        self.heap_var += v;
    }

    fn remove_weights(&mut self, size: u64, stack: u32, half: u8) {
        self.halves_change(size, stack, half, -1);
        let (b, n, v) = self.weights(size);
        let s = self.site(stack);
        s.live_bytes = s.live_bytes.saturating_sub(b);
        s.live_count = s.live_count.saturating_sub(n);
        self.heap = self.heap.saturating_sub(b);
        self.heap_count = self.heap_count.saturating_sub(n);
        self.heap_var = (self.heap_var - v).max(0.0);
    }

    fn apply(&mut self, p: &Pending) {
        self.next_seq = self.next_seq.max(p.seq + 1);
        self.events += p.kind.is_heap() as u64;
        match p.kind {
            EventKind::Alloc {
                kind,
                addr,
                size,
                stack,
            } => {
                if kind.is_realloc() {
                    self.realloc.remove(&p.tid);
                }
                let (b, n, _) = self.weights(size);
                self.total_bytes += b;
                self.total_count += n;
                let s = self.site(stack);
                s.total_bytes += b;
                s.total_count += n;
                let half = if self.rate == 0 {
                    2
                } else {
                    half_of(p.seq, size, self.rate)
                };
                self.add_live(addr, size, stack, half);
                if self.rate != 0 {
                    let h = &mut self.halves;
                    h.allocations += 1;
                    if h.live[0] > h.highest_0 || h.allocations == 1 {
                        h.highest_0 = h.live[0];
                        self.peak = h.live[1];
                        self.peak_count = h.count_1;
                        self.peak_var = h.var_1 as f64;
                        self.peak_time = p.time;
                        self.peak_seq = p.seq;
                        self.epoch += 1;
                    }
                } else if self.heap > self.peak {
                    self.peak = self.heap;
                    self.peak_count = self.heap_count;
                    self.peak_var = self.heap_var;
                    self.peak_time = p.time;
                    self.peak_seq = p.seq;
                    self.epoch += 1;
                }
            }
            EventKind::Free { addr } => match self.live.remove(&addr) {
                Some((size, stack, half)) => {
                    // Weighted like the allocation it frees (as the reader's replay does).
                    self.total_frees += self.weights(size).1;
                    self.remove_weights(size, stack, half);
                }
                None => self.unmatched += 1,
            },
            EventKind::ReallocFree { addr } => match self.live.remove(&addr) {
                Some((size, stack, half)) => {
                    self.remove_weights(size, stack, half);
                    self.realloc.insert(p.tid, (addr, size, stack, half));
                }
                None => self.unmatched += 1,
            },
            EventKind::ReallocFailed => {
                if let Some((addr, size, stack, half)) = self.realloc.remove(&p.tid) {
                    self.add_live(addr, size, stack, half);
                }
            }
            _ => {}
        }
    }

    /// The checkpoint as of now (`last`: the image ends).
    pub(crate) fn checkpoint(&mut self, now: u64, rss: u64, last: bool) -> Checkpoint {
        self.settle(now, last);
        self.number += 1;
        self.last_checkpoint = now;
        let (epoch, sampled) = (self.epoch, self.rate != 0);
        let stacks = self
            .sites
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let (peak_bytes, peak_count) = if s.epoch == epoch {
                    (s.peak_bytes, s.peak_count)
                } else if sampled {
                    (s.half_bytes, s.half_count)
                } else {
                    (s.live_bytes, s.live_count)
                };
                let f = StackFigures {
                    stack: i as u32,
                    live_bytes: s.live_bytes,
                    live_count: s.live_count,
                    total_bytes: s.total_bytes,
                    total_count: s.total_count,
                    peak_bytes,
                    peak_count,
                };
                (f.total_count > 0 || f.live_count > 0).then_some(f)
            })
            .collect();
        let c = Checkpoint {
            number: self.number,
            last,
            time: now,
            seq: self.next_seq,
            sample_rate: self.rate,
            heap_bytes: self.heap,
            heap_count: self.heap_count,
            peak_bytes: self.peak,
            peak_count: self.peak_count,
            peak_time: self.peak_time,
            peak_seq: self.peak_seq,
            rss_bytes: rss,
            total_bytes: self.total_bytes,
            total_count: self.total_count,
            total_frees: self.total_frees,
            events: self.events,
            unmatched_frees: self.unmatched,
            heap_variance: self.heap_var,
            peak_variance: self.peak_var,
            stacks,
            series: self.series.clone(),
        };
        self.series.push(c.point());
        if self.series.len() > MAX_POINTS {
            // Halve the resolution, keeping the higher heap of each pair.
            let old = std::mem::take(&mut self.series);
            self.series = old
                .chunks(2)
                .map(|p| *p.iter().max_by_key(|x| x.heap_bytes).unwrap_or(&p[0]))
                .collect();
        }
        c
    }
}

/// `MEMTRACK_CHECKPOINT_INTERVAL` in µs when aggregating (0: not aggregating).
static INTERVAL_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads `MEMTRACK_AGGREGATE` and `MEMTRACK_CHECKPOINT_INTERVAL` (milliseconds, default 5 s),
/// once per image, beside the other settings: before the tracker's own `setenv`, after which
/// a program that brings its own `getenv` (bash) may no longer show the environment.
pub(crate) fn configure_from_env() {
    let on = crate::env::getenv(c"MEMTRACK_AGGREGATE").is_some_and(|v| v.to_bytes() == b"1");
    let ms = crate::env::getenv(c"MEMTRACK_CHECKPOINT_INTERVAL")
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .unwrap_or(5000);
    configure(if on { ms } else { 0 });
}

/// Aggregates with a checkpoint every `interval_ms` (0: records events).
pub(crate) fn configure(interval_ms: u64) {
    INTERVAL_US.store(
        interval_ms.saturating_mul(1000),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The aggregation settings: Some(sample rate, 0 for none) when aggregating.
pub(crate) fn from_env() -> Option<u64> {
    (interval() != 0).then(crate::sampling::rate)
}

/// The checkpoint interval in clock units (µs); 0 when not aggregating.
pub(crate) fn interval() -> u64 {
    INTERVAL_US.load(std::sync::atomic::Ordering::Relaxed)
}
