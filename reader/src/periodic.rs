//! Periodic profiles (`memtrack export --format pprof --every 60s`): one profile per interval of
//! a capture, for continuous profilers (Pyroscope, Parca) and `go tool pprof -diff_base`.
//!
//! Intervals are aligned to the capture's start: interval `k` covers `[k * every, (k + 1) *
//! every)` of the capture's clock. Each profile holds what was in use at the end of its
//! interval (`inuse_*`) and what was allocated during it (`alloc_*`). One replay goes over the
//! events once, cut at the intervals' ends; an event's time is the latest of any event up to it
//! (as for windows), so every cut is a prefix of the sequence order.
//!
//! Where the figures come from is an [`IntervalFigures`]: [`ExactFigures`] counts every event
//! of a full capture, [`SampledFigures`] weighs each sampled block as the replay does (the
//! profiles are estimates, and say so).
//!
//! An aggregated capture has no events, only its checkpoints: the profile of an interval holds
//! what was in use at the last checkpoint in it, and what was allocated between the last
//! checkpoint before it and that one (each stack's totals of the two, subtracted). An interval
//! with no checkpoint of its own (none written in it, or compacted away since) has no profile:
//! it is reported as skipped, with the reason, and its allocations are counted in the next
//! profile written, whose comment says from which checkpoint it counts. Never a figure made up.

use crate::capture::{Capture, Event};
use crate::pprof::{Piece, ProfileTime, StackValues};
use crate::replay::{Replay, SiteSums, Step};
use crate::{StackTable, Symbolizer};
use memtrack_format::{sampling, Checkpoint, EventKind};
use std::collections::HashMap;

/// The per-stack figures of each interval, taken as the replay goes.
pub trait IntervalFigures {
    /// After each event applied to `replay`.
    fn event(&mut self, replay: &Replay, ev: &Event);
    /// The interval that just ended: per stack, in use now and allocated since the last call.
    /// Starts the next interval.
    fn interval(&mut self, replay: &Replay) -> Vec<StackValues>;
    /// Ends an interval that is not written (an earlier run wrote it).
    fn skip(&mut self, replay: &Replay) {
        let _ = self.interval(replay);
    }
    /// What the profiles' comment adds (a sampled capture: that the figures are estimates).
    fn note(&self) -> Option<String> {
        None
    }
}

/// The exact figures of a full capture: in use from the replay's per-stack figures (a
/// [`Replay::tracking_sites`]), allocated from every allocation event.
#[derive(Default)]
pub struct ExactFigures {
    allocated: SiteSums,
}

impl IntervalFigures for ExactFigures {
    #[inline]
    fn event(&mut self, _: &Replay, ev: &Event) {
        if let EventKind::Alloc { size, stack, .. } = ev.kind {
            self.allocated.add(stack, size);
        }
    }

    fn interval(&mut self, replay: &Replay) -> Vec<StackValues> {
        let mut by: HashMap<u32, StackValues> = HashMap::new();
        for s in replay.live_sites() {
            by.insert(
                s.stack,
                StackValues {
                    stack: s.stack,
                    inuse_objects: s.allocations,
                    inuse_space: s.bytes,
                    ..Default::default()
                },
            );
        }
        for s in std::mem::take(&mut self.allocated).into_sorted() {
            let v = by.entry(s.stack).or_insert(StackValues {
                stack: s.stack,
                ..Default::default()
            });
            v.alloc_objects = s.allocations;
            v.alloc_space = s.bytes;
        }
        by.into_values().collect()
    }

    fn skip(&mut self, _: &Replay) {
        self.allocated = SiteSums::default();
    }
}

/// The estimates of a sampled capture: in use from the replay's per-stack figures (which weigh
/// each sampled block), allocated from every sampled allocation, weighed the same way
/// (`size / (1 - exp(-size / rate))` bytes, `1 / (1 - exp(-size / rate))` allocations, each
/// rounded as the replay rounds them).
pub struct SampledFigures {
    rate: u64,
    exact: ExactFigures,
}

impl SampledFigures {
    /// For a capture sampled at one per `rate` bytes on average.
    pub fn new(rate: u64) -> Self {
        SampledFigures {
            rate,
            exact: ExactFigures::default(),
        }
    }
}

impl IntervalFigures for SampledFigures {
    #[inline]
    fn event(&mut self, _: &Replay, ev: &Event) {
        if let EventKind::Alloc { size, stack, .. } = ev.kind {
            let bytes = sampling::weight(size, self.rate).round() as u64;
            let count = (sampling::count_weight(size, self.rate).round() as u64).max(1);
            self.exact.allocated.add_weighted(stack, bytes, count, size);
        }
    }

    fn interval(&mut self, replay: &Replay) -> Vec<StackValues> {
        self.exact.interval(replay)
    }

    fn skip(&mut self, replay: &Replay) {
        self.exact.skip(replay);
    }
}

/// How far a capture may be cut into intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// The capture is finished: every interval up to its end, the last one cut at the end.
    End,
    /// The capture is being written: the intervals that end at or before this time
    /// (nanoseconds since the capture's start), when every event before it is in the file.
    Before(u64),
}

/// What to cut.
#[derive(Clone, Debug)]
pub struct Every {
    /// The intervals' length, nanoseconds (more than 0).
    pub every_ns: u64,
    /// Intervals numbered below this one were written by an earlier run: not made again.
    pub first: u64,
    pub until: Until,
    /// An aggregated capture: the checkpoint the earlier run's last profile counted to (its
    /// [`PeriodicOutcome::base`]). What interval `first` allocated counts from it, even when
    /// the tracker has compacted it away from the file since.
    pub base: Option<Checkpoint>,
}

/// One interval's profile.
pub struct IntervalProfile {
    /// The interval's number (0: the one the capture starts in).
    pub index: u64,
    /// Its start (wall clock) and length: shorter than the others for the last interval of a
    /// finished capture.
    pub time: ProfileTime,
    /// The gzipped `profile.proto`.
    pub gz: Vec<u8>,
    /// Totals: in use at its end, allocated during it.
    pub inuse_bytes: u64,
    pub alloc_bytes: u64,
    /// The figures are estimates (a sampled capture).
    pub estimated: bool,
}

/// Why an interval has no profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// An aggregated capture wrote no checkpoint in it.
    NoCheckpoint,
    /// Its checkpoints (these numbers) are no longer in the capture: compacted away.
    Compacted { first: u64, last: u64 },
    /// A new program image (exec) began in it: the two images' figures do not subtract.
    NewImage,
}

/// Intervals without a profile (consecutive ones, for one reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub first: u64,
    pub last: u64,
    pub reason: SkipReason,
    /// The interval whose profile counts what they allocated, if one was written.
    pub folded_into: Option<u64>,
}

impl Skipped {
    /// One sentence for the user.
    pub fn text(&self) -> String {
        let (which, it) = if self.first == self.last {
            (format!("interval {} has", self.first), "it")
        } else {
            (
                format!("intervals {} to {} have", self.first, self.last),
                "them",
            )
        };
        let why = match &self.reason {
            SkipReason::NoCheckpoint => format!("no checkpoint was written in {it}"),
            SkipReason::Compacted { first, last } if first == last => {
                format!("checkpoint {first} is no longer in the capture (compacted)")
            }
            SkipReason::Compacted { first, last } => {
                format!("checkpoints {first} to {last} are no longer in the capture (compacted)")
            }
            SkipReason::NewImage => {
                format!("the program exec'd in {it}: the two images' figures do not subtract")
            }
        };
        let folded = match (&self.reason, self.folded_into) {
            (SkipReason::NewImage, _) | (_, None) => String::new(),
            (_, Some(k)) => {
                format!("; what was allocated in {it} is counted in interval {k}'s profile")
            }
        };
        format!("{which} no profile: {why}{folded}")
    }
}

/// What [`Capture::periodic_profiles`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeriodicOutcome {
    /// Profiles handed to the caller.
    pub written: u64,
    /// One past the last interval that is complete: where the next run starts.
    pub next: u64,
    /// The capture was finished and its last interval is written: nothing is left.
    pub finished: bool,
    /// Chunks that could not be decoded.
    pub corrupt_chunks: usize,
    /// Intervals from `Every::first` on that have no profile, and why (aggregated captures).
    pub skipped: Vec<Skipped>,
    /// The capture holds stack nodes but neither events nor a checkpoint: an aggregated
    /// capture before its first checkpoint. Nothing is cut (an empty profile would be wrong).
    pub no_checkpoint_yet: bool,
    /// An aggregated capture: the checkpoint interval `next`'s allocations count from (None:
    /// the start), for [`Every::base`] of the next run. Its series is left out.
    pub base: Option<Checkpoint>,
}

/// The intervals as they close.
struct Cutter<'a, F: FnMut(IntervalProfile) -> std::io::Result<()>> {
    cap: &'a Capture,
    every: Every,
    sym: &'a mut Symbolizer,
    out: F,
    /// What every profile's comment adds.
    note: Option<String>,
    estimated: bool,
    /// The interval open now.
    k: u64,
    written: u64,
    error: Option<std::io::Error>,
    skipped: Vec<Skipped>,
}

impl<F: FnMut(IntervalProfile) -> std::io::Result<()>> Cutter<'_, F> {
    /// The end of the open interval, nanoseconds since the start.
    fn end(&self) -> u64 {
        self.k.saturating_add(1).saturating_mul(self.every.every_ns)
    }

    /// Closes the open interval (at `until`, ns since the start: its end, or the capture's
    /// end for the last one) with the figures of `figures`, and opens the next.
    fn close(
        &mut self,
        figures: &mut dyn IntervalFigures,
        r: &Replay,
        stacks: &StackTable,
        until: u64,
    ) {
        if self.k < self.every.first || self.error.is_some() {
            figures.skip(r);
            self.k += 1;
            return;
        }
        let values = figures.interval(r);
        self.emit(stacks, values, until, "");
    }

    /// Writes the open interval's profile of `values` (`extra` added to its comment) and opens
    /// the next.
    fn emit(&mut self, stacks: &StackTable, mut values: Vec<StackValues>, until: u64, extra: &str) {
        let k = self.k;
        self.k += 1;
        if k < self.every.first || self.error.is_some() {
            return;
        }
        values.retain(|v| v.alloc_objects > 0 || v.inuse_objects > 0);
        let inuse_bytes = values.iter().map(|v| v.inuse_space).sum();
        let alloc_bytes = values.iter().map(|v| v.alloc_space).sum();
        let start = k.saturating_mul(self.every.every_ns);
        let time = ProfileTime {
            start_unix_ns: self.cap.header.start_unix_ns.saturating_add(start),
            duration_ns: until.saturating_sub(start),
        };
        let note = format!(
            "; interval {k}: {:.3} s to {:.3} s after the start{}{extra}",
            start as f64 / 1e9,
            until as f64 / 1e9,
            self.note.as_deref().unwrap_or("")
        );
        let piece = Piece {
            cap: self.cap,
            values,
            stacks,
            label: None,
            pid: self.cap.header.pid,
            sym: &mut *self.sym,
        };
        let estimated = self.estimated;
        let r = crate::pprof::profile_gz_of(vec![piece], time, Some(&note)).and_then(|gz| {
            (self.out)(IntervalProfile {
                index: k,
                time,
                gz,
                inuse_bytes,
                alloc_bytes,
                estimated,
            })
        });
        match r {
            Ok(()) => self.written += 1,
            Err(e) => self.error = Some(e),
        }
    }

    /// Records that the open interval has no profile, and opens the next.
    fn skip(&mut self, reason: SkipReason) {
        let k = self.k;
        self.k += 1;
        if k < self.every.first {
            return;
        }
        if let Some(s) = self.skipped.last_mut() {
            if s.last + 1 == k && s.reason == reason && s.folded_into.is_none() {
                s.last = k;
                return;
            }
        }
        self.skipped.push(Skipped {
            first: k,
            last: k,
            reason,
            folded_into: None,
        });
    }
}

/// The figures of the checkpoints as they are read (aggregated captures).
struct Checkpointed {
    unit: u64,
    /// The last checkpoint of the last interval closed with one: what "allocated" counts from
    /// (None: the start, when nothing was allocated yet).
    base: Option<Checkpoint>,
    /// The last checkpoint read in the open interval.
    cur: Option<Checkpoint>,
    /// The number of the last checkpoint read.
    last_number: Option<u64>,
    /// The last checkpoint read was its image's final one: the next is another image's.
    last_final: bool,
    /// Why the intervals closed before the next checkpoint have none: checkpoints missing
    /// before it (compacted), else none was written.
    gap: Option<SkipReason>,
    /// A new image began in the open interval without its predecessor's final checkpoint.
    new_image: bool,
    /// Per stack, allocated by earlier images (exec) since `base`, up to their final
    /// checkpoints: the new image's totals count from 0 again.
    carry: HashMap<u32, (u64, u64)>,
    /// The first interval since `base` skipped with no checkpoint (its allocations are
    /// counted in the next profile).
    folded_from: Option<u64>,
}

impl Checkpointed {
    fn seconds(&self, c: &Checkpoint) -> f64 {
        c.time.saturating_mul(self.unit) as f64 / 1e9
    }

    /// Closes the open interval of `cut` (at `until`, ns since the start).
    fn close<F: FnMut(IntervalProfile) -> std::io::Result<()>>(
        &mut self,
        cut: &mut Cutter<'_, F>,
        stacks: &StackTable,
        until: u64,
    ) {
        let k = cut.k;
        if self.new_image {
            // What the old image allocated after `base` and what the new one did before its
            // first checkpoint cannot be told apart: counted from the new image's checkpoint.
            self.new_image = false;
            self.base = self.cur.take();
            self.folded_from = None;
            self.carry.clear();
            cut.skip(SkipReason::NewImage);
            return;
        }
        let Some(cp) = self.cur.take() else {
            self.folded_from.get_or_insert(k);
            cut.skip(self.gap.clone().unwrap_or(SkipReason::NoCheckpoint));
            return;
        };
        let from = match &self.base {
            None => "the start".to_string(),
            Some(b) => format!("checkpoint {} ({:.3} s)", b.number, self.seconds(b)),
        };
        let folded = match self.folded_from.take() {
            Some(a) if a + 1 == k => format!(", interval {a} having no checkpoint of its own"),
            Some(a) => format!(
                ", intervals {a} to {} having no checkpoint of their own",
                k - 1
            ),
            None => String::new(),
        };
        for s in cut.skipped.iter_mut() {
            if s.folded_into.is_none() && s.reason != SkipReason::NewImage {
                s.folded_into = Some(k);
            }
        }
        let extra = format!(
            "; aggregated capture: in use at checkpoint {} ({:.3} s), allocated from {from} to it{folded}",
            cp.number,
            self.seconds(&cp)
        );
        let mut values = checkpoint_values(&cp, self.base.as_ref());
        let extra = if self.carry.is_empty() {
            extra
        } else {
            for v in &mut values {
                if let Some((bytes, count)) = self.carry.remove(&v.stack) {
                    v.alloc_space += bytes;
                    v.alloc_objects += count;
                }
            }
            values.extend(
                self.carry
                    .drain()
                    .map(|(stack, (bytes, count))| StackValues {
                        stack,
                        alloc_space: bytes,
                        alloc_objects: count,
                        ..Default::default()
                    }),
            );
            extra + ", and by the image before an exec up to its final checkpoint"
        };
        cut.emit(stacks, values, until, &extra);
        self.base = Some(cp);
    }
}

/// Per stack: in use at `cp`, allocated between `base` (None: the start) and `cp`.
fn checkpoint_values(cp: &Checkpoint, base: Option<&Checkpoint>) -> Vec<StackValues> {
    let before: HashMap<u32, (u64, u64)> = base
        .map(|b| {
            b.stacks
                .iter()
                .map(|s| (s.stack, (s.total_bytes, s.total_count)))
                .collect()
        })
        .unwrap_or_default();
    cp.stacks
        .iter()
        .map(|s| {
            let (bytes, count) = before.get(&s.stack).copied().unwrap_or((0, 0));
            // Totals only grow within an image: saturating only against a damaged capture.
            StackValues {
                stack: s.stack,
                alloc_objects: s.total_count.saturating_sub(count),
                alloc_space: s.total_bytes.saturating_sub(bytes),
                inuse_objects: s.live_count,
                inuse_space: s.live_bytes,
            }
        })
        .collect()
}

impl Capture {
    /// The figures [`Capture::periodic_profiles`] uses for this capture's events: exact, or
    /// weighted estimates when it is sampled.
    pub fn interval_figures(&self) -> Box<dyn IntervalFigures> {
        match self.sample_rate() {
            Some(rate) => Box::new(SampledFigures::new(rate)),
            None => Box::new(ExactFigures::default()),
        }
    }

    /// Cuts the capture into intervals of `every` and hands each complete one's profile to
    /// `out`, in order: a capture with events in one replay (exact figures, or estimates when
    /// sampled), an aggregated one from its checkpoints. An error from `out` stops the
    /// cutting and is returned.
    pub fn periodic_profiles(
        &self,
        every: Every,
        sym: &mut Symbolizer,
        out: impl FnMut(IntervalProfile) -> std::io::Result<()>,
    ) -> std::io::Result<PeriodicOutcome> {
        if self.aggregated() {
            return self.periodic_checkpoints(every, sym, out);
        }
        let mut figures = self.interval_figures();
        self.periodic_profiles_with(every, &mut *figures, sym, out)
    }

    /// [`Capture::periodic_profiles`] of a capture with events, the figures taken by `figures`.
    pub fn periodic_profiles_with(
        &self,
        every: Every,
        figures: &mut dyn IntervalFigures,
        sym: &mut Symbolizer,
        out: impl FnMut(IntervalProfile) -> std::io::Result<()>,
    ) -> std::io::Result<PeriodicOutcome> {
        assert!(every.every_ns > 0, "intervals of no length");
        let unit = self.header.clock_unit_ns.max(1);
        let limit = match every.until {
            Until::End => u64::MAX,
            Until::Before(t) => t,
        };
        let mut c = Cutter {
            cap: self,
            every: every.clone(),
            sym,
            out,
            note: figures.note(),
            estimated: self.sampled(),
            k: 0,
            written: 0,
            error: None,
            skipped: Vec::new(),
        };
        // The latest event time so far, ns.
        let mut now = 0u64;
        let mut events = 0u64;
        let replayed =
            self.replay_steps_tabled(Replay::tracking_sites(), u64::MAX, |step, r, ev, stacks| {
                if step == Step::After {
                    figures.event(r, ev);
                    return true;
                }
                events += 1;
                now = now.max(ev.time.saturating_mul(unit));
                if now >= limit {
                    return false;
                }
                while now >= c.end() {
                    let end = c.end();
                    c.close(figures, r, stacks, end);
                }
                c.error.is_none()
            });
        let (r, stacks) = (&replayed.replay, &replayed.stacks);
        if events == 0 && !self.chunks.is_empty() && replayed.corrupt_chunks < self.chunks.len() {
            // Chunks of stack nodes only: what an aggregated capture writes before its first
            // checkpoint (a full capture writes nodes with the events using them).
            return Ok(PeriodicOutcome {
                next: every.first,
                corrupt_chunks: replayed.corrupt_chunks,
                no_checkpoint_yet: true,
                ..Default::default()
            });
        }
        let mut finished = false;
        match every.until {
            Until::Before(t) => {
                while c.end() <= t && c.error.is_none() {
                    let end = c.end();
                    c.close(figures, r, stacks, end);
                }
            }
            Until::End => {
                let end_time = self
                    .end
                    .map_or(0, |e| e.time)
                    .max(r.last_time)
                    .max(self.last_chunk_time);
                let end = now.max(end_time.saturating_mul(unit));
                while c.end() <= end && c.error.is_none() {
                    let e = c.end();
                    c.close(figures, r, stacks, e);
                }
                // The last interval, cut at the end.
                if c.k.saturating_mul(every.every_ns) < end && c.error.is_none() {
                    c.close(figures, r, stacks, end);
                }
                finished = true;
            }
        }
        if let Some(e) = c.error {
            return Err(e);
        }
        Ok(PeriodicOutcome {
            written: c.written,
            next: c.k.max(every.first),
            finished,
            corrupt_chunks: replayed.corrupt_chunks,
            skipped: c.skipped,
            no_checkpoint_yet: false,
            base: None,
        })
    }

    /// The periodic profiles of an aggregated capture, from its checkpoints read in file
    /// order (one at a time). An interval closes once a checkpoint after it is in the file
    /// (checkpoints are written in order, so none of its own can come later), or at the end
    /// of a finished capture.
    fn periodic_checkpoints(
        &self,
        every: Every,
        sym: &mut Symbolizer,
        out: impl FnMut(IntervalProfile) -> std::io::Result<()>,
    ) -> std::io::Result<PeriodicOutcome> {
        assert!(every.every_ns > 0, "intervals of no length");
        let unit = self.header.clock_unit_ns.max(1);
        // The stack nodes (nodes-only chunks).
        let mut stacks = StackTable::default();
        let corrupt_chunks = self.with_events(&mut stacks, |events| {
            events.for_each_while(|_| true);
            events.errors
        });
        let rate = self
            .sample_rate()
            .or_else(|| self.checkpoint.as_ref().map(|c| c.sample_rate))
            .filter(|&r| r > 0);
        // The pprof comment says it of a capture with a SAMPLING record; else it is said here.
        let note = match (rate, self.sample_rate()) {
            (Some(r), None) => Some(format!(
                "; values are ESTIMATES from allocations sampled at one per {r} bytes on average"
            )),
            _ => None,
        };
        let mut c = Cutter {
            cap: self,
            every: every.clone(),
            sym,
            out,
            note,
            estimated: rate.is_some(),
            k: 0,
            written: 0,
            error: None,
            skipped: Vec::new(),
        };
        let mut st = Checkpointed {
            unit,
            base: None,
            cur: None,
            last_number: None,
            last_final: false,
            gap: None,
            new_image: false,
            carry: HashMap::new(),
            folded_from: None,
        };
        let mut last_ns = 0u64;
        // Resumed with the earlier run's base: intervals before `first` are done, and what
        // they read may have been compacted away since.
        let resume_ns = match &every.base {
            Some(b) if every.first > 0 => {
                st.base = Some(b.clone());
                st.last_number = Some(b.number);
                st.last_final = b.last;
                c.k = every.first;
                every.first.saturating_mul(every.every_ns)
            }
            _ => 0,
        };
        for cp in self.checkpoints() {
            if c.error.is_some() {
                break;
            }
            let t = cp.time.saturating_mul(unit);
            last_ns = last_ns.max(t);
            if t < resume_ns {
                continue;
            }
            let expected = st.last_number.map_or(1, |n| n + 1);
            let new_image = st.last_final || st.last_number.is_some_and(|n| cp.number <= n);
            st.gap = (!new_image && cp.number > expected).then(|| SkipReason::Compacted {
                first: expected,
                last: cp.number - 1,
            });
            while t >= c.end() && c.error.is_none() {
                let end = c.end();
                st.close(&mut c, &stacks, end);
            }
            st.gap = None;
            if new_image && st.last_final {
                // The old image's final checkpoint holds all it allocated: what it did since
                // `base` is carried over, and the new image counts from its start.
                if let Some(old) = st.cur.take() {
                    for v in checkpoint_values(&old, st.base.as_ref()) {
                        let e = st.carry.entry(v.stack).or_default();
                        e.0 += v.alloc_space;
                        e.1 += v.alloc_objects;
                    }
                }
                st.base = None;
            } else {
                st.new_image |= new_image;
            }
            st.last_number = Some(cp.number);
            st.last_final = cp.last;
            st.cur = Some(cp);
        }
        let mut finished = false;
        if every.until == Until::End {
            let end_time = self
                .end
                .map_or(0, |e| e.time)
                .max(self.last_chunk_time)
                .saturating_mul(unit);
            let end = last_ns.max(end_time);
            while c.end() <= end && c.error.is_none() {
                let e = c.end();
                st.close(&mut c, &stacks, e);
            }
            // The last interval, cut at the end.
            if (c.k.saturating_mul(every.every_ns) < end || st.cur.is_some()) && c.error.is_none() {
                st.close(&mut c, &stacks, end);
            }
            finished = true;
        }
        if let Some(e) = c.error {
            return Err(e);
        }
        Ok(PeriodicOutcome {
            written: c.written,
            next: c.k.max(every.first),
            finished,
            corrupt_chunks,
            skipped: c.skipped,
            no_checkpoint_yet: false,
            base: st.base.map(|mut b| {
                b.series = Vec::new();
                b
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrack_format::{put_record, record, Header, StackFigures};

    /// A checkpoint numbered `number` at `ms` after the start: stack 1 has allocated
    /// `total` bytes in `total / 10` blocks, `live` of them live.
    fn cp(number: u64, ms: u64, total: u64, live: u64) -> Checkpoint {
        Checkpoint {
            number,
            time: ms,
            stacks: vec![StackFigures {
                stack: 1,
                live_bytes: live,
                live_count: live / 10,
                total_bytes: total,
                total_count: total / 10,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// An aggregated capture file of these checkpoints (clock in milliseconds), `cut` bytes
    /// short (a record being written).
    fn capture(name: &str, cps: &[Checkpoint], cut: usize) -> Capture {
        let mut file = Header {
            version: memtrack_format::FORMAT_VERSION,
            pid: 4242,
            clock_unit_ns: 1_000_000,
            executable: "/bin/agg".into(),
            argv: vec!["agg".into()],
            pointer_size: 8,
            machine: 62,
            ..Default::default()
        }
        .encode();
        for c in cps {
            put_record(&mut file, record::CHECKPOINT, &c.encode());
        }
        file.truncate(file.len() - cut);
        let path = std::env::temp_dir().join(format!(
            "memtrack-periodic-{}-{name}.cap",
            std::process::id()
        ));
        std::fs::write(&path, file).unwrap();
        Capture::open(&path).unwrap()
    }

    /// (interval, allocated, in use) of each profile, and the outcome.
    fn cut(
        cap: &Capture,
        first: u64,
        until: Until,
        base: Option<Checkpoint>,
    ) -> (Vec<(u64, u64, u64)>, PeriodicOutcome) {
        let mut sym = Symbolizer::new(cap);
        let mut got = Vec::new();
        let every = Every {
            every_ns: 200_000_000,
            first,
            until,
            base,
        };
        let outcome = cap
            .periodic_profiles(every, &mut sym, |p| {
                assert!(!p.estimated);
                got.push((p.index, p.alloc_bytes, p.inuse_bytes));
                Ok(())
            })
            .unwrap();
        (got, outcome)
    }

    /// Compacted checkpoints (4 and 5), then an exec (numbers start again at 1).
    fn history() -> Vec<Checkpoint> {
        vec![
            cp(1, 150, 100, 100),
            cp(2, 350, 300, 200),
            cp(3, 420, 350, 150),
            cp(6, 1150, 900, 50),
            cp(1, 1250, 40, 40),
            cp(2, 1450, 70, 30),
        ]
    }

    #[test]
    fn checkpoints_cut_into_intervals_and_gaps_are_skipped_with_the_reason() {
        let cap = capture("gaps", &history(), 0);
        assert!(cap.aggregated());
        let numbers: Vec<u64> = cap.checkpoints().map(|c| c.number).collect();
        assert_eq!(numbers, [1, 2, 3, 6, 1, 2]);
        let (got, out) = cut(&cap, 0, Until::End, None);
        assert_eq!(
            got,
            [
                (0, 100, 100),
                (1, 200, 200),
                (2, 50, 150),
                // Allocated since checkpoint 3: intervals 3 and 4 had none left.
                (5, 550, 50),
                // Since the new image's first checkpoint, in the skipped interval 6.
                (7, 30, 30),
            ]
        );
        assert_eq!(
            out.skipped,
            [
                Skipped {
                    first: 3,
                    last: 4,
                    reason: SkipReason::Compacted { first: 4, last: 5 },
                    folded_into: Some(5),
                },
                Skipped {
                    first: 6,
                    last: 6,
                    reason: SkipReason::NewImage,
                    folded_into: None,
                },
            ]
        );
        assert_eq!(
            out.skipped[0].text(),
            "intervals 3 to 4 have no profile: checkpoints 4 to 5 are no longer in the capture \
             (compacted); what was allocated in them is counted in interval 5's profile"
        );
        assert!(out.finished);
        assert_eq!(out.next, 8);

        // Resumed at interval 3: the same figures from there on, the skips from there on.
        let (again, out) = cut(&cap, 3, Until::End, None);
        assert_eq!(again, got[3..]);
        assert_eq!(out.skipped.len(), 2);
        let (again, out) = cut(&cap, 6, Until::End, None);
        assert_eq!(again, got[4..]);
        assert_eq!(out.skipped.len(), 1);
    }

    #[test]
    fn a_capture_being_written_closes_an_interval_once_a_later_checkpoint_is_in() {
        let h = history();
        // The last record cut short: as if being written.
        let cap = capture("live", &h, 3);
        assert_eq!(cap.checkpoints().count(), h.len() - 1);
        let (got, out) = cut(&cap, 0, Until::Before(u64::MAX), None);
        // Interval 6 holds the last complete checkpoint: it may get more.
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1, 2, 5]);
        assert_eq!(out.next, 6);
        assert!(!out.finished);
    }

    #[test]
    fn a_resumed_run_counts_from_the_earlier_runs_base_when_it_was_compacted_away() {
        let run1 = capture(
            "before",
            &[
                cp(1, 150, 100, 100),
                cp(2, 350, 300, 200),
                cp(3, 420, 350, 150),
            ],
            0,
        );
        let (got, out) = cut(&run1, 0, Until::Before(u64::MAX), None);
        assert_eq!(got, [(0, 100, 100), (1, 200, 200)]);
        assert_eq!(out.next, 2);
        let base = out.base.clone().expect("a base");
        assert_eq!(base.number, 2);
        // The tracker compacted checkpoints 1 to 4 away since.
        let run2 = capture("after", &[cp(5, 650, 500, 120), cp(6, 850, 560, 100)], 0);
        let (got, out) = cut(&run2, 2, Until::End, Some(base));
        // Interval 2 had checkpoint 3 (gone): none; interval 3 counts from checkpoint 2.
        assert_eq!(got, [(3, 200, 120), (4, 60, 100)]);
        assert_eq!(
            out.skipped,
            [Skipped {
                first: 2,
                last: 2,
                reason: SkipReason::Compacted { first: 3, last: 4 },
                folded_into: Some(3),
            }]
        );
        // Without the base, interval 3 would count from the start: no base, no overlap with
        // the earlier run's profiles is what the base is for.
        let (got, _) = cut(&run2, 2, Until::End, None);
        assert_eq!(got[0], (3, 500, 120));
    }

    #[test]
    fn an_exec_with_the_old_images_final_checkpoint_is_counted_across() {
        let mut fin = cp(3, 420, 350, 150);
        fin.last = true;
        let cps = [
            cp(1, 150, 100, 100),
            cp(2, 250, 300, 200),
            fin,
            cp(1, 480, 40, 40),
            cp(2, 650, 70, 30),
        ];
        let cap = capture("exec", &cps, 0);
        let (got, out) = cut(&cap, 0, Until::End, None);
        // Interval 2: 50 by the first image after checkpoint 2, 40 by the second.
        assert_eq!(
            got,
            [(0, 100, 100), (1, 200, 200), (2, 90, 40), (3, 30, 30)]
        );
        assert!(out.skipped.is_empty());
    }
}
