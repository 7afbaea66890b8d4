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
//! of a full capture; a sampled capture's weighted estimates, or an aggregated capture's
//! checkpoints, hand the profile the same [`StackValues`] through it.

use crate::capture::{Capture, Event};
use crate::pprof::{Piece, ProfileTime, StackValues};
use crate::replay::{Replay, SiteSums, Step};
use crate::{StackTable, Symbolizer};
use memtrack_format::EventKind;
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
#[derive(Clone, Copy, Debug)]
pub struct Every {
    /// The intervals' length, nanoseconds (more than 0).
    pub every_ns: u64,
    /// Intervals numbered below this one were written by an earlier run: not made again.
    pub first: u64,
    pub until: Until,
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
}

/// What [`Capture::periodic_profiles`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodicOutcome {
    /// Profiles handed to the caller.
    pub written: u64,
    /// One past the last interval that is complete: where the next run starts.
    pub next: u64,
    /// The capture was finished and its last interval is written: nothing is left.
    pub finished: bool,
    /// Chunks that could not be decoded.
    pub corrupt_chunks: usize,
}

/// The intervals as they close.
struct Cutter<'a, F: FnMut(IntervalProfile) -> std::io::Result<()>> {
    cap: &'a Capture,
    every: Every,
    figures: &'a mut dyn IntervalFigures,
    sym: &'a mut Symbolizer,
    out: F,
    note: Option<String>,
    /// The interval open now.
    k: u64,
    written: u64,
    error: Option<std::io::Error>,
}

impl<F: FnMut(IntervalProfile) -> std::io::Result<()>> Cutter<'_, F> {
    /// The end of the open interval, nanoseconds since the start.
    fn end(&self) -> u64 {
        self.k.saturating_add(1).saturating_mul(self.every.every_ns)
    }

    /// Closes the open interval (at `until`, ns since the start: its end, or the capture's
    /// end for the last one) and opens the next.
    fn close(&mut self, r: &Replay, stacks: &StackTable, until: u64) {
        let k = self.k;
        self.k += 1;
        if k < self.every.first || self.error.is_some() {
            self.figures.skip(r);
            return;
        }
        let mut values = self.figures.interval(r);
        values.retain(|v| v.alloc_objects > 0 || v.inuse_objects > 0);
        let inuse_bytes = values.iter().map(|v| v.inuse_space).sum();
        let alloc_bytes = values.iter().map(|v| v.alloc_space).sum();
        let start = k.saturating_mul(self.every.every_ns);
        let time = ProfileTime {
            start_unix_ns: self.cap.header.start_unix_ns.saturating_add(start),
            duration_ns: until.saturating_sub(start),
        };
        let note = format!(
            "; interval {k}: {:.3} s to {:.3} s after the start{}",
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
        let r = crate::pprof::profile_gz_of(vec![piece], time, Some(&note)).and_then(|gz| {
            (self.out)(IntervalProfile {
                index: k,
                time,
                gz,
                inuse_bytes,
                alloc_bytes,
            })
        });
        match r {
            Ok(()) => self.written += 1,
            Err(e) => self.error = Some(e),
        }
    }
}

impl Capture {
    /// Cuts the capture into intervals of `every` and hands each complete one's profile to
    /// `out`, in order, in one replay. An error from `out` stops the cutting and is returned.
    pub fn periodic_profiles(
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
        let note = figures.note();
        let mut c = Cutter {
            cap: self,
            every,
            figures,
            sym,
            out,
            note,
            k: 0,
            written: 0,
            error: None,
        };
        // The latest event time so far, ns.
        let mut now = 0u64;
        let replayed =
            self.replay_steps_tabled(Replay::tracking_sites(), u64::MAX, |step, r, ev, stacks| {
                if step == Step::After {
                    c.figures.event(r, ev);
                    return true;
                }
                now = now.max(ev.time.saturating_mul(unit));
                if now >= limit {
                    return false;
                }
                while now >= c.end() {
                    let end = c.end();
                    c.close(r, stacks, end);
                }
                c.error.is_none()
            });
        let (r, stacks) = (&replayed.replay, &replayed.stacks);
        let mut finished = false;
        match every.until {
            Until::Before(t) => {
                while c.end() <= t && c.error.is_none() {
                    let end = c.end();
                    c.close(r, stacks, end);
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
                    c.close(r, stacks, e);
                }
                // The last interval, cut at the end.
                if c.k.saturating_mul(every.every_ns) < end && c.error.is_none() {
                    c.close(r, stacks, end);
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
        })
    }
}
