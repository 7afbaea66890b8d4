//! Time windows: `--at SECONDS` (what was live at one moment) and `--between A B` (the
//! high-water mark inside a window and what was live then, what was allocated in it, ...).
//!
//! **What a time means.** Seconds since the launched process started: the root of the process
//! tree a report opened (a child's capture opened on its own counts from its own start). Every
//! capture of a tree stamps its start on the same monotonic clock (`start_mono_ns`), so a
//! child's events are placed on the root's axis by the difference of the two starts.
//!
//! **Which events a window holds.** Those whose time lies in `[A, B]`; `--at T` is the state
//! after every event at or before `T`. Events are replayed in sequence order, and each carries
//! the clock tick (2 ms) its thread last read, so across threads times can be a tick out of
//! order. An event's time is therefore taken as the latest time of any event up to it: the
//! edges of a window are cuts of the sequence order, the state at `T` is every event before the
//! first one stamped later than `T`, and no address is ever live twice in it. An event stamped
//! a tick early, after one stamped later, counts at the later time.

use crate::capture::{Capture, Event};
use crate::replay::{Replay, Replayed, SiteSums, Step};
use crate::stacks::StackTable;
use crate::views::{View, ViewSites};
use memtrack_format::EventKind;

/// A window of time, in seconds since the launched process started.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Window {
    #[serde(rename = "start_seconds")]
    pub start: f64,
    #[serde(rename = "end_seconds")]
    pub end: f64,
    /// `--at`: one moment (`start == end`), whose view is what was live then.
    #[serde(skip)]
    at: bool,
}

/// A window that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WindowError {
    #[error("--between {start} {end}: the start is after the end (give the earlier time first)")]
    Reversed { start: String, end: String },
    #[error("{0}")]
    Refused(String),
}

/// `1.5`, `1.5s`, `1500ms`, `90us`, `2min` as seconds.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("'{s}' is not a time: give seconds (1.5, 1.5s) or a unit (1500ms, 2min)")
    })?;
    let per = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown time unit '{other}' in '{s}' (use s, ms, us, ns, min or h)"
            ))
        }
    };
    let secs = value * per;
    if !secs.is_finite() {
        return Err(format!("'{s}' is too large"));
    }
    Ok(secs)
}

/// `1.200 s`.
pub fn seconds_text(t: f64) -> String {
    format!("{t:.3} s")
}

impl Window {
    /// The moment `t` (`--at`).
    pub fn at(t: f64) -> Window {
        Window {
            start: t,
            end: t,
            at: true,
        }
    }

    /// `[start, end]` (`--between`); an error when `start` is after `end`.
    pub fn between(start: f64, end: f64) -> Result<Window, WindowError> {
        if start > end {
            return Err(WindowError::Reversed {
                start: seconds_text(start),
                end: seconds_text(end),
            });
        }
        Ok(Window {
            start,
            end,
            at: false,
        })
    }

    /// True for `--at`.
    pub fn is_at(&self) -> bool {
        self.at
    }

    /// The window with its times brought within `[0, end]` (the capture's length), and a note
    /// saying so when a time was past it.
    pub fn clamped(self, end: f64) -> (Window, Option<String>) {
        let end = end.max(0.0);
        let past: Vec<String> = [self.start, self.end]
            .iter()
            .take(if self.at { 1 } else { 2 })
            .filter(|t| **t > end)
            .map(|t| seconds_text(*t))
            .collect();
        let w = Window {
            start: self.start.clamp(0.0, end),
            end: self.end.clamp(0.0, end),
            at: self.at,
        };
        let note = (!past.is_empty()).then(|| {
            format!(
                "{} past the end of the capture ({}): using {}",
                past.join(" and "),
                seconds_text(end),
                seconds_text(end)
            )
        });
        (w, note)
    }

    /// `at 1.200 s`, `between 1.000 s and 1.500 s`.
    pub fn words(&self) -> String {
        if self.at {
            format!("at {}", seconds_text(self.start))
        } else {
            format!(
                "between {} and {}",
                seconds_text(self.start),
                seconds_text(self.end)
            )
        }
    }

    /// Why `view` has no meaning in this window, if it has none: `--at` is one moment, where
    /// only what was live means anything.
    pub fn refusal(&self, view: View) -> Option<String> {
        if view == View::MappedLeaks {
            return Some(
                "--mapped --leaks has no window yet: use --mapped (the mapped peak in it, or \
                 what was mapped --at a moment) or --mapped --allocated"
                    .into(),
            );
        }
        (self.at && !matches!(view, View::Peak | View::Mapped)).then(|| {
            format!(
                "--at shows what was live at one moment; --{} needs a span of time: use --between A B",
                view.name()
            )
        })
    }

    /// The window on the clock of a capture that started `offset_ns` after the launched
    /// process.
    pub fn span(&self, offset_ns: i128) -> Span {
        let ns = |t: f64| (t * 1e9).round() as i128;
        Span {
            from_ns: ns(self.start) - offset_ns,
            to_ns: ns(self.end) - offset_ns,
            offset_ns,
            at: self.at,
        }
    }
}

/// A window on one capture's clock: nanoseconds since the capture's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub from_ns: i128,
    pub to_ns: i128,
    /// The capture's start, after the launched process's.
    pub offset_ns: i128,
    pub at: bool,
}

impl Span {
    /// Seconds since the launched process started, from nanoseconds on the capture's clock.
    fn seconds(&self, ns: i128) -> f64 {
        (ns + self.offset_ns) as f64 / 1e9
    }

    fn contains(&self, ns: i128) -> bool {
        self.from_ns <= ns && ns <= self.to_ns
    }
}

/// Event times in nanoseconds, never earlier than an event before (see the module's doc).
struct Clock {
    unit: i128,
    now: i128,
}

impl Clock {
    fn of(cap: &Capture) -> Clock {
        Clock {
            unit: cap.header.clock_unit_ns.max(1) as i128,
            now: 0,
        }
    }

    fn tick(&mut self, ev: &Event) -> i128 {
        self.now = self.now.max(ev.time as i128 * self.unit);
        self.now
    }
}

/// A window's figures: the heap at its start, its high-water mark and at its end, what was
/// allocated and freed in it, and resident memory.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WindowFigures {
    /// `--at`: the moment (`start_seconds == end_seconds`).
    pub at: bool,
    pub start_seconds: f64,
    pub end_seconds: f64,
    /// Live just before the window's first event.
    pub live_at_start_bytes: u64,
    pub live_at_start_allocations: u64,
    /// The most live at once within the window (from what was live at its start), and when.
    pub peak_bytes: u64,
    pub peak_allocations: u64,
    pub peak_time_seconds: f64,
    /// Live after the window's last event (`--at`: live then).
    pub live_at_end_bytes: u64,
    pub live_at_end_allocations: u64,
    /// Allocation calls made, and frees of live blocks, within the window.
    pub allocations: u64,
    pub allocated_bytes: u64,
    pub frees: u64,
    /// Resident memory: its highest sample in the window, the last one before it counted as
    /// its value at the start (`--at`: the last sample at or before the moment), and when.
    pub rss_bytes: Option<u64>,
    pub rss_time_seconds: Option<f64>,
    /// Mapped memory (`mmap`, not heap): the most mapped at once within the window (from what
    /// was mapped at its start; `--at`: mapped then), and when.
    pub mapped_peak_bytes: u64,
    pub mapped_peak_time_seconds: f64,
    /// The last event of the mapped peak's state (`None`: nothing mapped before any event).
    #[serde(skip)]
    pub mapped_peak_seq: Option<u64>,
    /// The last event of the peak's state (`None`: the heap was empty before any event).
    #[serde(skip)]
    pub peak_seq: Option<u64>,
}

impl Capture {
    /// Replays into `r` the events up to the end of `span`, and measures the window.
    pub(crate) fn replay_window(&self, r: Replay, span: &Span) -> (Replayed, WindowFigures) {
        let mut clock = Clock::of(self);
        let mut f = WindowFigures {
            at: span.at,
            start_seconds: span.seconds(span.from_ns),
            end_seconds: span.seconds(span.to_ns),
            peak_time_seconds: span.seconds(span.from_ns),
            mapped_peak_time_seconds: span.seconds(span.from_ns),
            ..Default::default()
        };
        let mut started = false;
        let mut last_seq = None;
        let mut totals = (0, 0, 0);
        let start = |f: &mut WindowFigures, r: &Replay, last_seq| {
            f.live_at_start_bytes = r.live_bytes;
            f.live_at_start_allocations = r.live_allocations();
            f.peak_bytes = r.live_bytes;
            f.peak_allocations = r.live_allocations();
            f.peak_seq = last_seq;
            f.mapped_peak_bytes = r.mapped.bytes;
            f.mapped_peak_seq = last_seq;
            (r.total_allocations, r.total_bytes, r.total_frees)
        };
        let replayed = self.replay_steps(r, u64::MAX, |step, r, ev| match step {
            Step::Before => {
                let t = clock.tick(ev);
                if t > span.to_ns {
                    return false;
                }
                if !started && t >= span.from_ns {
                    started = true;
                    totals = start(&mut f, r, last_seq);
                }
                true
            }
            Step::After => {
                last_seq = Some(ev.seq);
                if started && r.live_bytes > f.peak_bytes {
                    f.peak_bytes = r.live_bytes;
                    f.peak_allocations = r.live_allocations();
                    f.peak_seq = Some(ev.seq);
                    f.peak_time_seconds = span.seconds(clock.now);
                }
                if started && r.mapped.bytes > f.mapped_peak_bytes {
                    f.mapped_peak_bytes = r.mapped.bytes;
                    f.mapped_peak_seq = Some(ev.seq);
                    f.mapped_peak_time_seconds = span.seconds(clock.now);
                }
                true
            }
        });
        let r = &replayed.replay;
        if !started {
            // No event in the window: its state is what the events before it left.
            totals = start(&mut f, r, last_seq);
        }
        f.live_at_end_bytes = r.live_bytes;
        f.live_at_end_allocations = r.live_allocations();
        f.allocations = r.total_allocations - totals.0;
        f.allocated_bytes = r.total_bytes.saturating_sub(totals.1);
        f.frees = r.total_frees - totals.2;
        if let Some((bytes, ns)) = self.rss_in(span) {
            f.rss_bytes = Some(bytes);
            f.rss_time_seconds = Some(span.seconds(ns));
        }
        (replayed, f)
    }

    /// The window's figures.
    pub fn window_figures(&self, span: &Span) -> WindowFigures {
        self.replay_window(Replay::new(), span).1
    }

    /// Resident memory in the window and when: the highest sample in it, the last sample
    /// before it standing for its start (placed at the start); `--at`, the last sample at or
    /// before the moment.
    fn rss_in(&self, span: &Span) -> Option<(u64, i128)> {
        let unit = self.header.clock_unit_ns.max(1) as i128;
        let mut before: Option<(u64, i128)> = None;
        let mut within: Option<(u64, i128)> = None;
        for s in &self.rss {
            let ns = s.time as i128 * unit;
            if ns > span.to_ns {
                break;
            }
            if span.at {
                before = Some((s.rss_bytes, ns));
            } else if ns < span.from_ns {
                before = Some((s.rss_bytes, span.from_ns));
            } else if within.is_none_or(|w| s.rss_bytes > w.0) {
                within = Some((s.rss_bytes, ns));
            }
        }
        match (before, within) {
            (Some(b), Some(w)) if b.0 >= w.0 => Some(b),
            (b, None) => b,
            (_, w) => w,
        }
    }

    /// A view in a window: `--at`, what was live then; `--between`, what was live at the
    /// window's high-water mark, the allocations made in it (`--allocated`), those of them
    /// still live where `--leaks` (or `--leaks-at-exit`) looks, or freed again at once
    /// (`--temporary`). The peak view's `at_seconds` says when its high-water mark was.
    pub fn window_view(&self, view: View, span: &Span) -> ViewSites {
        let mut stacks = StackTable::default();
        let mut clock = Clock::of(self);
        let sites = match view {
            View::Peak if span.at => {
                let (Replayed { replay, stacks, .. }, _) = self.replay_window(Replay::new(), span);
                let mut v = ViewSites::new(view, replay.live_by_stack(), stacks);
                v.at_seconds = Some(span.seconds(span.to_ns));
                return v;
            }
            View::Peak => {
                let f = self.window_figures(span);
                let mut v = match f.peak_seq {
                    Some(seq) => {
                        let Replayed { replay, stacks, .. } = self.replay_until(seq);
                        ViewSites::new(view, replay.live_by_stack(), stacks)
                    }
                    None => ViewSites::new(view, Vec::new(), StackTable::default()),
                };
                v.at_seconds = Some(f.peak_time_seconds);
                return v;
            }
            View::Mapped if span.at => {
                let (Replayed { replay, stacks, .. }, _) = self.replay_window(Replay::new(), span);
                let mut v = ViewSites::new(view, replay.mapped.live_by_stack(), stacks);
                v.at_seconds = Some(span.seconds(span.to_ns));
                return v;
            }
            View::Mapped => {
                let f = self.window_figures(span);
                let mut v = match f.mapped_peak_seq {
                    Some(seq) => {
                        let Replayed { replay, stacks, .. } = self.replay_until(seq);
                        ViewSites::new(view, replay.mapped.live_by_stack(), stacks)
                    }
                    None => ViewSites::new(view, Vec::new(), StackTable::default()),
                };
                v.at_seconds = Some(f.mapped_peak_time_seconds);
                return v;
            }
            View::MappedAllocated => {
                let mut sums = SiteSums::default();
                self.with_events(&mut stacks, |events| {
                    events.for_each_while(|ev| {
                        let t = clock.tick(ev);
                        match ev.kind {
                            EventKind::Map { size, stack, .. }
                            | EventKind::Remap { size, stack, .. }
                                if span.contains(t) =>
                            {
                                sums.add(stack, size)
                            }
                            _ => {}
                        }
                        t <= span.to_ns
                    })
                });
                sums.into_sorted()
            }
            // Refused by `Window::refusal`.
            View::MappedLeaks => Vec::new(),
            View::Allocated => {
                let mut sums = SiteSums::default();
                self.with_events(&mut stacks, |events| {
                    events.for_each_while(|ev| {
                        let t = clock.tick(ev);
                        if let EventKind::Alloc { size, stack, .. } = ev.kind {
                            if span.contains(t) {
                                let (bytes, count) = self.weighed(size);
                                sums.add_weighted(stack, bytes, count, size);
                            }
                        }
                        t <= span.to_ns
                    })
                });
                sums.into_sorted()
            }
            View::Temporary => {
                let mut temporaries = crate::stats::Temporaries::default();
                self.with_events(&mut stacks, |events| {
                    events.for_each_while(|ev| {
                        let t = clock.tick(ev);
                        temporaries.event(ev, span.contains(t));
                        true
                    })
                });
                temporaries.sums.into_sorted()
            }
            View::Leaks | View::LeaksAtExit => {
                let until = if view == View::Leaks {
                    self.leaks_seq()
                } else {
                    u64::MAX
                };
                self.born_in(span, until, &mut stacks)
            }
        };
        ViewSites::new(view, sites, stacks)
    }

    /// The blocks allocated in `span` and still live after the events with seq <= `until`,
    /// by stack.
    fn born_in(
        &self,
        span: &Span,
        until: u64,
        stacks: &mut StackTable,
    ) -> Vec<crate::replay::SiteTotal> {
        let mut clock = Clock::of(self);
        let mut born = crate::regions::Held::default();
        let mut boundaries = self.exec_boundaries.iter().copied().peekable();
        self.with_events(stacks, |events| {
            events.for_each_while(|ev| {
                if ev.seq > until {
                    return false;
                }
                while boundaries.next_if(|&b| ev.seq >= b).is_some() {
                    // The image was replaced: its heap is gone.
                    born = Default::default();
                }
                let t = clock.tick(ev);
                born.event(ev, span.contains(t));
                true
            })
        });
        born.by_stack()
    }

    /// Seconds from the capture's start to its last record.
    pub fn end_seconds(&self) -> f64 {
        self.seconds(
            self.end
                .map(|e| e.time)
                .unwrap_or(0)
                .max(self.last_chunk_time),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_accepted_form() {
        assert_eq!(parse_seconds("1.5"), Ok(1.5));
        assert_eq!(parse_seconds("1.5s"), Ok(1.5));
        assert_eq!(parse_seconds("1500ms"), Ok(1.5));
        assert_eq!(parse_seconds(" 2min"), Ok(120.0));
        assert_eq!(parse_seconds("0"), Ok(0.0));
        assert!(parse_seconds("soon").unwrap_err().contains("not a time"));
        assert!(parse_seconds("-1").unwrap_err().contains("not a time"));
        assert!(parse_seconds("3 days")
            .unwrap_err()
            .contains("unknown time unit 'days'"));
    }

    #[test]
    fn windows_are_ordered_and_clamped() {
        assert_eq!(
            Window::between(1.5, 1.0).unwrap_err().to_string(),
            "--between 1.500 s 1.000 s: the start is after the end (give the earlier time first)"
        );
        let (w, note) = Window::between(1.0, 9.0).unwrap().clamped(2.25);
        assert_eq!((w.start, w.end), (1.0, 2.25));
        assert_eq!(
            note.as_deref(),
            Some("9.000 s past the end of the capture (2.250 s): using 2.250 s")
        );
        assert_eq!(Window::at(0.5).clamped(2.0), (Window::at(0.5), None));
        assert_eq!(w.words(), "between 1.000 s and 2.250 s");
        assert_eq!(Window::at(1.2).words(), "at 1.200 s");
        assert!(Window::at(1.0).refusal(View::Leaks).is_some());
        assert!(Window::at(1.0).refusal(View::Peak).is_none());
    }
}

/// A wall-clock time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_time_text(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A length of time for people: `850 ms`, `42.0 s`, `4 min 12 s`, `3 h 5 min`, `2 d 4 h`.
pub fn duration_text(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms} ms"),
        1..=59 => format!("{:.1} s", ms as f64 / 1000.0),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s / 60 % 60),
        _ => format!("{} d {} h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod time_text_tests {
    use super::*;

    #[test]
    fn wall_clock_and_durations() {
        // 2026-12-06 22:41:21 UTC
        assert_eq!(
            utc_time_text(1_796_596_881_000_000_000),
            "2026-12-06 22:41:21 UTC"
        );
        assert_eq!(utc_time_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            utc_time_text(951_782_400_000_000_000),
            "2000-02-29 00:00:00 UTC"
        );
        assert_eq!(duration_text(850), "850 ms");
        assert_eq!(duration_text(42_000), "42.0 s");
        assert_eq!(duration_text(252_000), "4 min 12 s");
        assert_eq!(duration_text(11_100_000), "3 h 5 min");
        assert_eq!(duration_text(187_200_000), "2 d 4 h");
    }
}
