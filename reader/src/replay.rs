//! Replaying events: the live set, the peak, leaks and totals.

use crate::capture::{Capture, Event, ReadError};
use crate::mapped::MappedSet;
use crate::stacks::StackTable;
use memtrack_format::EndReason;
use memtrack_format::EventKind;

type Map<K, V> = memtrack_format::hash::FastMap<K, V>;

#[derive(Clone, Copy, Debug)]
struct Live {
    /// The bytes the block stands for: its size, or its weight in a sampled capture.
    size: u64,
    stack: u32,
    /// The allocations it stands for (1, or the count weight when sampled).
    count: u64,
    /// Its term of the live estimate's variance (0 unless sampled).
    var: u64,
    /// Its recorded size (what `size` is an estimate from).
    raw: u64,
    /// Which half of a sampled capture's split sample it is in ([`Replay::peak_halves`]):
    /// 0 or 1, or 2 for both (a block sampled with probability one half or more).
    half: u8,
}

/// One half's share of a sampled block: bytes, allocations, variance term.
#[derive(Clone, Copy, Default)]
struct HalfShare {
    size: u64,
    count: u64,
    var: u64,
}

/// Bytes and allocation count attributed to one stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SiteTotal {
    pub stack: u32,
    pub bytes: u64,
    pub allocations: u64,
    /// The largest single allocation (0 where not tracked: the one-pass peak view).
    pub max: u64,
}

/// Per-stack totals being summed up (bytes, allocations, largest allocation).
#[derive(Default)]
pub(crate) struct SiteSums(Map<u32, SiteTotal>);

impl SiteSums {
    #[inline]
    pub(crate) fn add(&mut self, stack: u32, size: u64) {
        let e = self.0.entry(stack).or_insert(SiteTotal {
            stack,
            ..Default::default()
        });
        e.bytes = e.bytes.saturating_add(size);
        e.allocations += 1;
        e.max = e.max.max(size);
    }

    /// Adds a block that stands for `count` allocations.
    #[inline]
    pub(crate) fn add_weighted(&mut self, stack: u32, size: u64, count: u64, raw: u64) {
        let e = self.0.entry(stack).or_insert(SiteTotal {
            stack,
            ..Default::default()
        });
        e.bytes = e.bytes.saturating_add(size);
        e.allocations += count;
        // The largest block recorded (a weight is not a block's size).
        e.max = e.max.max(raw);
    }

    /// Sets a stack's figures (what it holds is already summed up elsewhere).
    pub(crate) fn set(&mut self, stack: u32, bytes: u64, allocations: u64, max: u64) {
        self.0.insert(
            stack,
            SiteTotal {
                stack,
                bytes,
                allocations,
                max,
            },
        );
    }

    /// Largest first (ties by stack id, so the order is stable).
    pub(crate) fn into_sorted(self) -> Vec<SiteTotal> {
        sorted(self.0.into_values().collect())
    }

    /// The same, leaving the sums as they are.
    pub(crate) fn sorted(&self) -> Vec<SiteTotal> {
        sorted(self.0.values().copied().collect())
    }
}

fn sorted(mut v: Vec<SiteTotal>) -> Vec<SiteTotal> {
    v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack.cmp(&b.stack)));
    v
}

/// The state of the heap while events are replayed.
#[derive(Default)]
pub struct Replay {
    live: Map<u64, Live>,
    pending_realloc: Map<u32, (u64, Live)>,
    /// Mean bytes between samples when the capture is sampled (0: every allocation is in
    /// it). Sampled blocks are weighted here, in [`Replay::apply`], the one place sizes enter
    /// the heap figures: every figure of a sampled capture is an estimate.
    pub sample_rate: u64,
    /// Variance of the live-bytes estimate (sum over live sampled blocks), and its value at
    /// the peak; 0 for a full capture.
    pub live_var: u128,
    pub peak_var: u128,
    /// Allocations live now (weighted when sampled) and sampled blocks live now.
    live_count: u64,
    /// Allocation events applied (the raw count of recorded blocks, whatever the weights).
    pub recorded_allocations: u64,
    /// Recorded (unweighted) bytes: live now, live at the estimated peak, allocated in all.
    pub live_raw: u64,
    pub peak_raw: u64,
    /// Sampled blocks the peak estimate rests on (sampled captures).
    pub peak_sampled_blocks: u64,
    pub recorded_bytes: u64,
    pub live_bytes: u64,
    pub peak_bytes: u64,
    pub peak_allocations: u64,
    pub peak_seq: u64,
    pub peak_time: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub total_frees: u64,
    /// Frees of addresses that were not live (allocated before recording began, or their
    /// allocation was lost with a torn tail).
    pub unmatched_frees: u64,
    /// Allocations at an address that was still live: the free in between was lost.
    pub overlapping_allocations: u64,
    pub events: u64,
    pub last_seq: u64,
    pub last_time: u64,
    /// Per-stack figures at the peak, kept when `track_sites` is set.
    sites: Option<Box<SiteTracker>>,
    /// Heap in use over time: the largest value in each of `series.len()` equal slices of
    /// `[0, series_span)` (time units, or event numbers when `series_by_event`).
    pub series: Vec<u64>,
    /// The heap in use after the last event of each slice (`None`: no event in the slice).
    pub series_last: Vec<Option<u64>>,
    /// Mapped memory over time, sampled like `series`: the most mapped in each slice.
    pub mapped_series: Vec<u64>,
    /// The bytes mapped after the last mapping event of each slice (`None`: none in it).
    pub mapped_series_last: Vec<Option<u64>>,
    series_span: u64,
    series_by_event: bool,
    /// Live bytes and allocations where `--leaks` looks ([`Capture::leaks_seq`]), when the
    /// capture marks a Python program's end and the replay got there.
    pub live_at_leaks_seq: Option<(u64, u64)>,
    /// The live estimate's variance there (sampled captures).
    pub var_at_leaks_seq: Option<u128>,
    /// Recorded (unweighted) bytes and blocks live there.
    pub raw_at_leaks_seq: Option<(u64, u64)>,
    /// Live bytes just before the sequence value of the capture's highest RSS sample
    /// ([`Capture::peak_rss`]), when the replay got past it.
    pub live_at_peak_rss: Option<u64>,
    /// Mapped memory (`mmap`, not heap): the ranges, per-stack and per-file figures.
    pub mapped: MappedSet,
    /// Bytes mapped now (`mapped.bytes`).
    pub mapped_bytes: u64,
    /// The most bytes mapped at once, the event that got there and its time.
    pub peak_mapped_bytes: u64,
    pub peak_mapped_seq: u64,
    pub peak_mapped_time: u64,
    /// An aggregated capture's per-stack figures (its last checkpoint's), standing for a
    /// live set it does not have.
    agg: Option<Vec<memtrack_format::StackFigures>>,
    /// A sampled capture's peak, cross-checked: see [`PeakHalves`].
    peak_halves: PeakHalves,
}

/// The peak of a sampled capture. The highest of a running estimate is biased upward (it
/// picks the moment the sampling noise is highest: 3x the truth on a 2 MiB heap sampled at
/// 512 KiB). So the sample is split in two halves at random (blocks drawn with probability
/// one half or more are in both): half 0 picks the moment of the peak, its highest estimate,
/// and half 1, whose noise is independent of that choice, gives the figures there, per stack
/// too. The peak is then an unbiased estimate of the heap at a moment at or next to the true
/// peak, with about 1.4 times the standard error of the whole sample.
#[derive(Default)]
struct PeakHalves {
    /// Each half's estimate of the live bytes now.
    live: [u64; 2],
    /// Half 1's allocations, sampled blocks and variance now.
    count_1: u64,
    blocks_1: u64,
    var_1: u128,
    /// Half 0's highest estimate so far.
    highest_0: u64,
    /// Half 1's per-stack figures, with their values at half 0's highest (tracking sites).
    sites_1: Option<Box<SiteTracker>>,
}

/// Per-stack live bytes, and their values at the last peak. Stacks changed since the last peak
/// are listed, so each new peak copies only those: O(events) in all, in one pass.
#[derive(Default)]
struct SiteTracker {
    /// stack -> (bytes, allocations, changed since the last peak): stack ids are dense, so
    /// ids below `DENSE_SITES` index a vector; larger ones (only from a damaged capture or a
    /// huge stack table) go to a map.
    dense: Vec<SiteLive>,
    sparse: Map<u32, SiteLive>,
    at_peak: Map<u32, (u64, u64)>,
    dirty: Vec<u32>,
}

type SiteLive = (u64, u64, bool);

/// Stack ids kept in `SiteTracker::dense` (at most 96 MiB of it).
const DENSE_SITES: u32 = 1 << 22;

impl SiteTracker {
    #[inline]
    fn entry(&mut self, stack: u32) -> &mut SiteLive {
        if stack < DENSE_SITES {
            let i = stack as usize;
            if i >= self.dense.len() {
                self.dense
                    .resize((i + 1).next_power_of_two(), (0, 0, false));
            }
            &mut self.dense[i]
        } else {
            self.sparse.entry(stack).or_insert((0, 0, false))
        }
    }

    #[inline]
    fn change(&mut self, stack: u32, bytes: i128, count: i64) {
        let e = self.entry(stack);
        e.0 = (e.0 as i128 + bytes).max(0) as u64;
        e.1 = (e.1 as i64 + count).max(0) as u64;
        if !e.2 {
            e.2 = true;
            self.dirty.push(stack);
        }
    }

    fn peak(&mut self) {
        for i in 0..self.dirty.len() {
            let s = self.dirty[i];
            let e = self.entry(s);
            e.2 = false;
            let v = (e.0, e.1);
            self.at_peak.insert(s, v);
        }
        self.dirty.clear();
    }
}

impl Replay {
    pub fn new() -> Self {
        Self::default()
    }

    /// A replay that also samples the heap in use into `points` slices of `[0, span)`: time
    /// units, or sequence numbers when `by_event`.
    pub fn sampling(points: usize, span: u64, by_event: bool) -> Self {
        Replay {
            series: vec![0; points.max(1)],
            series_last: vec![None; points.max(1)],
            mapped_series: vec![0; points.max(1)],
            mapped_series_last: vec![None; points.max(1)],
            series_span: span.max(1),
            series_by_event: by_event,
            ..Self::default()
        }
    }

    /// The slice of the sampled series that an event at `time`/`seq` falls in.
    #[inline]
    fn slice(&self, time: u64, seq: u64) -> usize {
        let x = if self.series_by_event { seq } else { time };
        let n = self.series.len() as u64;
        ((x as u128 * n as u128) / self.series_span as u128).min(n as u128 - 1) as usize
    }

    #[inline]
    fn sample(&mut self, time: u64, seq: u64) {
        if self.series.is_empty() {
            return;
        }
        let i = self.slice(time, seq);
        self.series[i] = self.series[i].max(self.live_bytes);
        self.series_last[i] = Some(self.live_bytes);
    }

    #[inline]
    fn sample_mapped(&mut self, time: u64, seq: u64) {
        if self.mapped_series.is_empty() {
            return;
        }
        let i = self.slice(time, seq);
        self.mapped_series[i] = self.mapped_series[i].max(self.mapped_bytes);
        self.mapped_series_last[i] = Some(self.mapped_bytes);
    }

    /// A replay that also keeps per-stack figures at the peak (see [`Replay::peak_by_stack`]).
    pub fn tracking_sites() -> Self {
        Replay {
            sites: Some(Box::default()),
            ..Self::default()
        }
    }

    #[inline]
    fn site(&mut self, l: Live, sign: i64) {
        if self.sample_rate != 0 && self.sites.is_some() && self.peak_halves.sites_1.is_none() {
            self.peak_halves.sites_1 = Some(Box::default());
        }
        if let Some(t) = self.sites.as_mut() {
            t.change(
                l.stack,
                sign as i128 * l.size as i128,
                sign * l.count as i64,
            );
        }
    }

    /// A recorded block of `size` bytes as the heap figures count it; `seq`, its event's
    /// number, picks its half of a sampled capture's split sample.
    #[inline]
    fn weigh(&self, size: u64, stack: u32, seq: u64) -> Live {
        if self.sample_rate == 0 {
            return Live {
                size,
                stack,
                count: 1,
                var: 0,
                raw: size,
                half: 2,
            };
        }
        use memtrack_format::sampling;
        let rate = self.sample_rate;
        let half = if sampling::probability(size, rate) >= 0.5 {
            2
        } else {
            (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 63) as u8
        };
        Live {
            size: sampling::weight(size, rate).round() as u64,
            stack,
            count: (sampling::count_weight(size, rate).round() as u64).max(1),
            var: sampling::variance(size, rate).round() as u64,
            raw: size,
            half,
        }
    }

    /// What block `l` adds to half `k`'s estimate: a block of one half stands for twice its
    /// weight there (it was drawn with half the probability), a block of both for its weight.
    #[inline]
    fn share(&self, l: &Live, k: u8) -> HalfShare {
        if l.half == 2 {
            return HalfShare {
                size: l.size,
                count: l.count,
                var: l.var,
            };
        }
        if l.half != k {
            return HalfShare::default();
        }
        let p = memtrack_format::sampling::probability(l.raw, self.sample_rate) / 2.0;
        let w = 2.0 * l.size as f64;
        HalfShare {
            size: 2 * l.size,
            count: 2 * l.count,
            var: ((1.0 - p) * w * w).round() as u64,
        }
    }

    #[inline]
    fn add_live(&mut self, l: Live) {
        if self.sample_rate != 0 {
            self.halves(&l, 1);
        }
        // Saturating: sizes from a damaged capture must not overflow (a real heap cannot).
        self.live_bytes = self.live_bytes.saturating_add(l.size);
        self.live_count = self.live_count.saturating_add(l.count);
        self.live_var += l.var as u128;
        self.live_raw = self.live_raw.saturating_add(l.raw);
    }

    /// Adds (`sign` 1) or removes (-1) a sampled block in the halves' estimates and half
    /// 1's per-stack figures.
    fn halves(&mut self, l: &Live, sign: i64) {
        let (a, b) = (self.share(l, 0), self.share(l, 1));
        let h = &mut self.peak_halves;
        if sign > 0 {
            h.live[0] = h.live[0].saturating_add(a.size);
            h.live[1] = h.live[1].saturating_add(b.size);
            h.count_1 = h.count_1.saturating_add(b.count);
            h.blocks_1 += (b.size > 0) as u64;
            h.var_1 += b.var as u128;
        } else {
            h.live[0] = h.live[0].saturating_sub(a.size);
            h.live[1] = h.live[1].saturating_sub(b.size);
            h.count_1 = h.count_1.saturating_sub(b.count);
            h.blocks_1 = h.blocks_1.saturating_sub((b.size > 0) as u64);
            h.var_1 = h.var_1.saturating_sub(b.var as u128);
        }
        if let Some(t) = h.sites_1.as_mut() {
            if b.size > 0 || b.count > 0 {
                t.change(
                    l.stack,
                    sign as i128 * b.size as i128,
                    sign * b.count as i64,
                );
            }
        }
    }

    #[inline]
    fn sub_live(&mut self, l: Live) {
        if self.sample_rate != 0 {
            self.halves(&l, -1);
        }
        self.live_bytes = self.live_bytes.saturating_sub(l.size);
        self.live_count = self.live_count.saturating_sub(l.count);
        self.live_var = self.live_var.saturating_sub(l.var as u128);
        self.live_raw = self.live_raw.saturating_sub(l.raw);
    }

    #[inline]
    fn insert(&mut self, addr: u64, l: Live) {
        self.site(l, 1);
        if let Some(old) = self.live.insert(addr, l) {
            self.overlapping_allocations += 1;
            self.sub_live(old);
            self.site(old, -1);
        }
        self.add_live(l);
    }

    /// Recorded blocks live now (unweighted).
    pub fn live_recorded(&self) -> u64 {
        self.live.len() as u64
    }

    /// The standard error of the live-bytes estimate now (0 for a full capture).
    pub fn live_stderr(&self) -> u64 {
        (self.live_var as f64).sqrt().round() as u64
    }

    /// The standard error of the peak estimate, at the instant of the estimated peak.
    pub fn peak_stderr(&self) -> u64 {
        (self.peak_var as f64).sqrt().round() as u64
    }

    /// Applies one event.
    #[inline]
    pub fn apply(&mut self, ev: &Event) {
        // Region marks are ordered with the events but are not heap events: not counted.
        self.events += ev.kind.is_heap() as u64;
        self.last_seq = ev.seq;
        self.last_time = ev.time;
        match ev.kind {
            EventKind::Alloc {
                kind,
                addr,
                size,
                stack,
            } => {
                if kind.is_realloc() {
                    self.pending_realloc.remove(&ev.tid);
                }
                let l = self.weigh(size, stack, ev.seq);
                self.recorded_allocations += 1;
                self.recorded_bytes = self.recorded_bytes.saturating_add(size);
                self.total_allocations = self.total_allocations.saturating_add(l.count);
                self.total_bytes = self.total_bytes.saturating_add(l.size);
                self.insert(addr, l);
                if self.sample_rate != 0 {
                    let h = &mut self.peak_halves;
                    if h.live[0] > h.highest_0 || self.recorded_allocations == 1 {
                        h.highest_0 = h.live[0];
                        self.peak_bytes = h.live[1];
                        self.peak_allocations = h.count_1;
                        self.peak_var = h.var_1;
                        self.peak_raw = self.live_raw;
                        self.peak_sampled_blocks = h.blocks_1;
                        self.peak_seq = ev.seq;
                        self.peak_time = ev.time;
                        if let Some(t) = h.sites_1.as_mut() {
                            t.peak();
                        }
                    }
                } else if self.live_bytes > self.peak_bytes {
                    self.peak_bytes = self.live_bytes;
                    self.peak_allocations = self.live_count;
                    self.peak_var = self.live_var;
                    self.peak_raw = self.live_raw;
                    self.peak_seq = ev.seq;
                    self.peak_time = ev.time;
                    if let Some(t) = self.sites.as_mut() {
                        t.peak();
                    }
                }
            }
            EventKind::Free { addr } => match self.live.remove(&addr) {
                Some(l) => {
                    self.sub_live(l);
                    self.total_frees = self.total_frees.saturating_add(l.count);
                    self.site(l, -1);
                }
                None => self.unmatched_frees += 1,
            },
            EventKind::ReallocFree { addr } => match self.live.remove(&addr) {
                Some(l) => {
                    self.sub_live(l);
                    self.site(l, -1);
                    self.pending_realloc.insert(ev.tid, (addr, l));
                }
                None => self.unmatched_frees += 1,
            },
            EventKind::ReallocFailed => {
                if let Some((addr, l)) = self.pending_realloc.remove(&ev.tid) {
                    self.insert(addr, l);
                }
            }
            // Marks, not heap events: the regions report reads them.
            EventKind::RegionBegin { .. } | EventKind::RegionEnd => return,
            // Mapped memory: figures of its own, never the heap's.
            EventKind::Map { .. } | EventKind::Unmap { .. } | EventKind::Remap { .. } => {
                self.mapped.apply(&ev.kind, ev.seq);
                self.mapped_bytes = self.mapped.bytes;
                if self.mapped_bytes > self.peak_mapped_bytes {
                    self.peak_mapped_bytes = self.mapped_bytes;
                    self.peak_mapped_seq = ev.seq;
                    self.peak_mapped_time = ev.time;
                    self.mapped.mark_peak();
                }
                self.sample_mapped(ev.time, ev.seq);
                return;
            }
        }
        self.sample(ev.time, ev.seq);
    }

    /// The program image was replaced by exec: its heap is gone (not leaked).
    pub fn exec_reset(&mut self) {
        let gone: Vec<Live> = if self.sites.is_some() {
            self.live.values().copied().collect()
        } else {
            Vec::new()
        };
        for l in gone {
            self.site(l, -1);
        }
        if self.sample_rate != 0 {
            let all: Vec<Live> = self.live.values().copied().collect();
            for l in all {
                self.halves(&l, -1);
            }
        }
        self.live.clear();
        self.pending_realloc.clear();
        self.live_bytes = 0;
        self.live_count = 0;
        self.live_var = 0;
        self.live_raw = 0;
        self.mapped.clear();
        self.mapped_bytes = 0;
    }

    /// The state an aggregated capture's checkpoint describes; `earlier`: the final checkpoints
    /// of the images before an `exec`, whose totals count and whose peak may be the highest
    /// (their live blocks vanished with the exec).
    pub fn from_checkpoint(
        c: &memtrack_format::Checkpoint,
        earlier: &[memtrack_format::Checkpoint],
    ) -> Replay {
        let at_peak = earlier
            .iter()
            .filter(|e| e.peak_bytes > c.peak_bytes)
            .max_by_key(|e| e.peak_bytes)
            .unwrap_or(c);
        let mut stacks: std::collections::BTreeMap<u32, memtrack_format::StackFigures> =
            Default::default();
        for image in earlier.iter().chain(std::iter::once(c)) {
            let live = std::ptr::eq(image, c);
            let peak = std::ptr::eq(image, at_peak);
            for f in &image.stacks {
                let s = stacks
                    .entry(f.stack)
                    .or_insert(memtrack_format::StackFigures {
                        stack: f.stack,
                        ..Default::default()
                    });
                s.total_bytes += f.total_bytes;
                s.total_count += f.total_count;
                if live {
                    s.live_bytes += f.live_bytes;
                    s.live_count += f.live_count;
                }
                if peak {
                    s.peak_bytes += f.peak_bytes;
                    s.peak_count += f.peak_count;
                }
            }
        }
        let all = || earlier.iter().chain(std::iter::once(c));
        Replay {
            live_bytes: c.heap_bytes,
            peak_bytes: at_peak.peak_bytes,
            peak_allocations: at_peak.peak_count,
            peak_seq: at_peak.peak_seq,
            peak_time: at_peak.peak_time,
            total_allocations: all().map(|e| e.total_count).sum(),
            total_bytes: all().map(|e| e.total_bytes).sum(),
            total_frees: all().map(|e| e.total_frees).sum(),
            unmatched_frees: all().map(|e| e.unmatched_frees).sum(),
            events: all().map(|e| e.events).sum(),
            last_seq: c.seq.saturating_sub(1),
            last_time: c.time,
            live_count: c.stacks.iter().map(|s| s.live_count).sum(),
            sample_rate: c.sample_rate,
            live_var: c.heap_variance.max(0.0) as u128,
            peak_var: at_peak.peak_variance.max(0.0) as u128,
            agg: Some(stacks.into_values().collect()),
            ..Self::default()
        }
    }

    /// An aggregated capture's sites, by `f` (bytes, allocations), largest first.
    fn agg_sites(
        &self,
        f: impl Fn(&memtrack_format::StackFigures) -> (u64, u64),
    ) -> Option<Vec<SiteTotal>> {
        let a = self.agg.as_ref()?;
        Some(sorted(
            a.iter()
                .filter_map(|s| {
                    let (bytes, allocations) = f(s);
                    (allocations > 0 || bytes > 0).then_some(SiteTotal {
                        stack: s.stack,
                        bytes,
                        allocations,
                        max: 0,
                    })
                })
                .collect(),
        ))
    }

    /// Everything allocated, by stack (aggregated captures only: a replay keeps no totals by
    /// stack).
    pub fn allocated_sites(&self) -> Option<Vec<SiteTotal>> {
        self.agg_sites(|s| (s.total_bytes, s.total_count))
    }

    /// Number of allocations live now (an estimate when sampled).
    pub fn live_allocations(&self) -> u64 {
        self.live_count
    }

    /// What was live at the peak, grouped by stack, largest first (a replay made with
    /// [`Replay::tracking_sites`]; empty otherwise).
    pub fn peak_by_stack(&self) -> Vec<SiteTotal> {
        if let Some(v) = self.agg_sites(|s| (s.peak_bytes, s.peak_count)) {
            return v;
        }
        // A sampled capture's peak is half 1's (see `PeakHalves`).
        let sites = if self.sample_rate != 0 {
            &self.peak_halves.sites_1
        } else {
            &self.sites
        };
        let Some(t) = sites else {
            return Vec::new();
        };
        let mut v: Vec<SiteTotal> = t
            .at_peak
            .iter()
            .filter(|(_, e)| e.1 > 0)
            .map(|(&stack, &(bytes, allocations))| SiteTotal {
                stack,
                bytes,
                allocations,
                max: 0,
            })
            .collect();
        v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack.cmp(&b.stack)));
        v
    }

    /// What is live now grouped by stack, largest first, from the per-stack figures a
    /// [`Replay::tracking_sites`] keeps as it goes (the same as [`Replay::live_by_stack`],
    /// without a pass over the live set; empty for another replay).
    pub fn live_sites(&self) -> Vec<SiteTotal> {
        if let Some(v) = self.agg_sites(|s| (s.live_bytes, s.live_count)) {
            return v;
        }
        let Some(t) = &self.sites else {
            return Vec::new();
        };
        let dense = t.dense.iter().enumerate().map(|(i, e)| (i as u32, e));
        let v: Vec<SiteTotal> = dense
            .chain(t.sparse.iter().map(|(&s, e)| (s, e)))
            .filter(|(_, e)| e.1 > 0)
            .map(|(stack, &(bytes, allocations, _))| SiteTotal {
                stack,
                bytes,
                allocations,
                max: 0,
            })
            .collect();
        sorted(v)
    }

    /// The live allocations grouped by stack, largest first.
    pub fn live_by_stack(&self) -> Vec<SiteTotal> {
        if let Some(v) = self.agg_sites(|s| (s.live_bytes, s.live_count)) {
            return v;
        }
        let mut sums = SiteSums::default();
        for l in self.live.values() {
            sums.add_weighted(l.stack, l.size, l.count, l.raw);
        }
        sums.into_sorted()
    }
}

/// The figures of `memtrack summary`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub pid: u32,
    /// The program that ran last (after any exec).
    pub executable: String,
    pub argv: Vec<String>,
    /// Command lines of every program image, in order, when the process exec'd.
    pub exec_chain: Vec<String>,
    pub peak_bytes: u64,
    pub peak_allocations: u64,
    pub peak_time_seconds: f64,
    /// What `--leaks` shows: live when a Python program's code ended, if the capture marks
    /// it (`leaks_measured_at`), else live at exit (at the cut-off of an incomplete capture).
    pub leaked_bytes: u64,
    pub leaked_allocations: u64,
    /// "exit", or "python_program_end": where `leaked_*` were measured.
    pub leaks_measured_at: &'static str,
    /// Live at exit, whatever `leaks_measured_at` says (`--leaks-at-exit`).
    pub leaked_at_exit_bytes: u64,
    pub leaked_at_exit_allocations: u64,
    /// Seconds from the Python program's end to the end of the capture: interpreter shutdown.
    pub python_shutdown_seconds: Option<f64>,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub total_frees: u64,
    pub threads: usize,
    pub duration_seconds: f64,
    pub complete: bool,
    /// How the capture ended: "exit", "_exit", "exec", or null when it was cut off.
    pub end_reason: Option<&'static str>,
    pub events: u64,
    pub unmatched_frees: u64,
    /// Allocations over a live block (not counted by aggregated recording: 0 here, null in
    /// `summary --json`).
    pub overlapping_allocations: u64,
    pub corrupt_chunks: usize,
    /// The highest resident memory sampled (`RSS` records; None: the capture has none), when,
    /// and the heap's live bytes then. Of an aggregated capture: the highest its checkpoints
    /// read ([`Capture::checkpoint_peak_rss`]).
    pub peak_rss_bytes: Option<u64>,
    pub peak_rss_time_seconds: Option<f64>,
    pub heap_at_peak_rss_bytes: Option<u64>,
    /// Mapped memory (`mmap`, apart from the heap): the most at once, when, and at exit; 0
    /// when the capture has no mapped-memory events (and for an aggregated capture, which
    /// keeps none: null in `summary --json`).
    pub peak_mapped_bytes: u64,
    pub peak_mapped_time_seconds: f64,
    pub mapped_at_exit_bytes: u64,
    /// The capture holds a sample of the allocations: the heap figures are estimates.
    pub sampled: bool,
    /// Mean bytes between samples (null: every allocation recorded).
    pub sample_rate_bytes: Option<u64>,
    /// Sampled blocks the peak estimate rests on (null for a full or aggregated capture): a
    /// handful means the heap is not much larger than the sampling rate.
    pub peak_sampled_blocks: Option<u64>,
    /// Standard errors of the peak estimate (at the estimated peak's instant) and of the
    /// leaks estimate; 0 for a full capture.
    pub peak_stderr_bytes: u64,
    pub leaked_stderr_bytes: u64,
    /// Allocations the capture holds (the samples when sampled; `total_allocations` is then
    /// the estimate). A sampled aggregated capture does not keep it: 0 here, null in
    /// `summary --json`.
    pub sampled_allocations: u64,
}

/// Where [`Capture::replay_steps`] calls its step: before an event is applied, or after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Before,
    After,
}

/// What a replay leaves: the heap's state and figures, the stacks its events named, and how
/// many chunks could not be decoded.
pub struct Replayed {
    pub replay: Replay,
    pub stacks: StackTable,
    pub corrupt_chunks: usize,
}

impl Capture {
    /// Replays the events with seq <= `until` (all of them for `u64::MAX`). Two threads: one
    /// decodes and merges the chunks into batches, the other applies them, so the two halves of
    /// the work overlap; at most a few batches are in flight.
    pub fn replay_until(&self, until: u64) -> Replayed {
        self.replay_into(Replay::new(), until)
    }

    /// Replays into `r` (e.g. a [`Replay::tracking_sites`]) the events with seq <= `until`.
    pub fn replay_into(&self, r: Replay, until: u64) -> Replayed {
        self.replay_with(r, until, |_, _| {})
    }

    /// [`Capture::replay_into`], calling `after` with the replay's state after each event.
    pub fn replay_with(
        &self,
        r: Replay,
        until: u64,
        mut after: impl FnMut(&Replay, &Event),
    ) -> Replayed {
        self.replay_steps(r, until, |step, r, ev| {
            if step == Step::After {
                after(r, ev);
            }
            true
        })
    }

    /// The replay of events with seq <= `until`, calling `step` with the replay's state before
    /// each event (`Step::Before`, after any exec's reset; returning false stops the replay
    /// there, before the event) and after it (`Step::After`).
    pub(crate) fn replay_steps(
        &self,
        r: Replay,
        until: u64,
        mut step: impl FnMut(Step, &Replay, &Event) -> bool,
    ) -> Replayed {
        self.replay_steps_tabled(r, until, |s, r, ev, _| step(s, r, ev))
    }

    /// [`Capture::replay_steps`], `step` also given the stack table as it stands.
    pub(crate) fn replay_steps_tabled(
        &self,
        mut r: Replay,
        until: u64,
        mut step: impl FnMut(Step, &Replay, &Event, &StackTable) -> bool,
    ) -> Replayed {
        let mut stacks = StackTable::default();
        r.sample_rate = self.sample_rate().unwrap_or(0);
        if let Some(c) = &self.checkpoint {
            // No events: the stack nodes, and the figures of the last checkpoint. Reports that
            // need a state before it refuse aggregated captures (`Subject::refuse_aggregated`).
            let errors = self.with_events(&mut stacks, |events| {
                events.for_each_while(|_| true);
                events.errors
            });
            let _ = (r, until, &mut step);
            return Replayed {
                replay: Replay::from_checkpoint(c, &self.image_checkpoints),
                stacks,
                corrupt_chunks: errors,
            };
        }
        let mut boundaries = self.exec_boundaries.iter().copied().peekable();
        let cut = self.leaks_seq();
        let rss_seq = self.peak_rss().map_or(u64::MAX, |p| p.seq);
        let mut stopped = false;
        let errors = self.with_events(&mut stacks, |events| {
            events.for_each_with_stacks(|ev, table| {
                if ev.seq > until {
                    return false;
                }
                // Before an exec's reset: a sample of an earlier image saw that image's heap.
                if ev.seq >= rss_seq && r.live_at_peak_rss.is_none() {
                    r.live_at_peak_rss = Some(r.live_bytes);
                }
                while boundaries.next_if(|&b| ev.seq >= b).is_some() {
                    r.exec_reset();
                }
                if !step(Step::Before, &r, ev, table) {
                    stopped = true;
                    return false;
                }
                if ev.seq > cut && r.live_at_leaks_seq.is_none() {
                    r.live_at_leaks_seq = Some((r.live_bytes, r.live_allocations()));
                    r.var_at_leaks_seq = Some(r.live_var);
                    r.raw_at_leaks_seq = Some((r.live_raw, r.live.len() as u64));
                    r.raw_at_leaks_seq = Some((r.live_raw, r.live.len() as u64));
                }
                r.apply(ev);
                step(Step::After, &r, ev, table);
                true
            });
            events.errors
        });
        if !stopped && cut != u64::MAX && until >= cut && r.live_at_leaks_seq.is_none() {
            // No event after the mark.
            r.live_at_leaks_seq = Some((r.live_bytes, r.live_allocations()));
            r.var_at_leaks_seq = Some(r.live_var);
        }
        if !stopped && rss_seq != u64::MAX && until >= rss_seq && r.live_at_peak_rss.is_none() {
            // No event after the sample.
            r.live_at_peak_rss = Some(r.live_bytes);
        }
        Replayed {
            replay: r,
            stacks,
            corrupt_chunks: errors,
        }
    }

    /// The bytes and allocations a recorded block of `size` bytes stands for: itself in a
    /// full capture, its sampling weights in a sampled one (rounded as the replay rounds them).
    pub fn weighed(&self, size: u64) -> (u64, u64) {
        let l = Replay {
            sample_rate: self.sample_rate().unwrap_or(0),
            ..Replay::default()
        }
        .weigh(size, 0, 0);
        (l.size, l.count)
    }

    /// Replays the whole capture.
    pub fn replay(&self) -> Replayed {
        self.replay_until(u64::MAX)
    }

    /// The highest resident-memory sample (the first of equal ones), if the capture has any.
    pub fn peak_rss(&self) -> Option<memtrack_format::RssRecord> {
        self.rss.iter().copied().reduce(|best, s| {
            if s.rss_bytes > best.rss_bytes {
                s
            } else {
                best
            }
        })
    }

    /// Peak, leaks and totals.
    pub fn summary(&self) -> Result<Summary, ReadError> {
        Ok(self.summarize(&self.replay()))
    }

    /// Builds the summary from a finished replay.
    pub fn summarize(&self, replayed: &Replayed) -> Summary {
        let (r, corrupt_chunks) = (&replayed.replay, replayed.corrupt_chunks);
        let end_time = self
            .end
            .map(|e| e.time)
            .unwrap_or(0)
            .max(r.last_time)
            .max(self.last_chunk_time);
        let program_end = self.python_end.filter(|_| r.live_at_leaks_seq.is_some());
        let leaked = match (program_end, r.live_at_leaks_seq) {
            (Some(_), Some(at)) => at,
            _ => (r.live_bytes, r.live_allocations()),
        };
        let leaked_var = match (program_end, r.var_at_leaks_seq) {
            (Some(_), Some(v)) => v,
            _ => r.live_var,
        };
        let peak_rss = self.peak_rss();
        // Live bytes after the last event numbered below the sample: from this replay when it
        // got there, else from one more replay up to it.
        let heap_at_peak_rss = peak_rss.map(|p| {
            r.live_at_peak_rss
                .unwrap_or_else(|| self.replay_until(p.seq.saturating_sub(1)).replay.live_bytes)
        });
        // An aggregated capture has no RSS records: its checkpoints read resident memory.
        let (peak_rss, heap_at_peak_rss) = match self.checkpoint_peak_rss() {
            Some(p) => (
                Some(memtrack_format::RssRecord {
                    seq: 0,
                    time: p.time,
                    rss_bytes: p.rss_bytes,
                }),
                Some(p.heap_bytes),
            ),
            None => (peak_rss, heap_at_peak_rss),
        };
        Summary {
            pid: self.header.pid,
            executable: self.last_image().executable.clone(),
            argv: self.last_image().argv.clone(),
            exec_chain: if self.images.is_empty() {
                Vec::new()
            } else {
                std::iter::once(&self.header)
                    .chain(&self.images)
                    .map(|h| crate::shell_command(&h.argv))
                    .collect()
            },
            peak_bytes: r.peak_bytes,
            peak_allocations: r.peak_allocations,
            peak_time_seconds: self.seconds(r.peak_time),
            leaked_bytes: leaked.0,
            leaked_allocations: leaked.1,
            leaks_measured_at: if program_end.is_some() {
                "python_program_end"
            } else {
                "exit"
            },
            leaked_at_exit_bytes: r.live_bytes,
            leaked_at_exit_allocations: r.live_allocations(),
            python_shutdown_seconds: program_end
                .map(|p| self.seconds(end_time.saturating_sub(p.time))),
            total_allocations: r.total_allocations,
            total_bytes: r.total_bytes,
            total_frees: r.total_frees,
            threads: self.threads,
            duration_seconds: self.seconds(end_time),
            complete: self.complete(),
            end_reason: self
                .end
                .filter(|_| self.complete())
                .map(|e| match e.reason {
                    EndReason::Exit => "exit",
                    EndReason::ImmediateExit => "_exit",
                    EndReason::Abort => "abort",
                    EndReason::Exec => "exec",
                    EndReason::Detached => "detach",
                    EndReason::Other => "other",
                }),
            events: r.events,
            unmatched_frees: r.unmatched_frees,
            overlapping_allocations: r.overlapping_allocations,
            corrupt_chunks,
            peak_rss_bytes: peak_rss.map(|p| p.rss_bytes),
            peak_rss_time_seconds: peak_rss.map(|p| self.seconds(p.time)),
            heap_at_peak_rss_bytes: heap_at_peak_rss,
            peak_mapped_bytes: r.peak_mapped_bytes,
            peak_mapped_time_seconds: self.seconds(r.peak_mapped_time),
            mapped_at_exit_bytes: r.mapped_bytes,
            sampled: self.sampled(),
            sample_rate_bytes: self.sample_rate(),
            peak_sampled_blocks: (self.sampled() && !self.aggregated())
                .then_some(r.peak_sampled_blocks),
            peak_stderr_bytes: r.peak_stderr(),
            leaked_stderr_bytes: (leaked_var as f64).sqrt().round() as u64,
            // Aggregated without sampling: every allocation was counted.
            sampled_allocations: if self.aggregated() && !self.sampled() {
                r.total_allocations
            } else {
                r.recorded_allocations
            },
        }
    }

    /// An aggregated capture's highest resident memory at a checkpoint (the first of equal
    /// ones; of those its series kept), with the heap then; None for a capture of events, or
    /// when no checkpoint read it.
    pub fn checkpoint_peak_rss(&self) -> Option<memtrack_format::SeriesPoint> {
        self.checkpoint_series()
            .into_iter()
            .filter(|p| p.rss_bytes > 0)
            .reduce(|best, p| {
                if p.rss_bytes > best.rss_bytes {
                    p
                } else {
                    best
                }
            })
    }
}
