//! Memory over time as an SVG chart: the heap in use, mapped memory (when the program mapped
//! any) and resident memory, each in a panel of its own scale (a heap of kilobytes stays readable under a resident memory of gigabytes) on one
//! time axis, each peak marked with its time and size; region bands below.

use crate::capture::Capture;
use crate::replay::Replay;
use crate::{grouped, human_bytes};

/// What the chart shows, for the caller's message.
pub struct Plot {
    pub svg: String,
    pub peak_bytes: u64,
    pub peak_seconds: f64,
    /// The highest resident-memory sample and when, when the chart draws it.
    pub peak_rss: Option<(u64, f64)>,
    /// An aggregated capture's chart: the checkpoints it draws (its points).
    pub checkpoints: Option<usize>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Capture {
    /// Replays the capture sampling the heap in use, and draws it.
    pub fn plot(&self) -> Plot {
        if let Some(c) = &self.checkpoint {
            return self.plot_checkpoints(c);
        }
        const POINTS: usize = 1000;
        let end = self
            .end
            .map(|e| e.time)
            .unwrap_or(0)
            .max(self.last_chunk_time);
        // Below 50 ms the 2 ms clock tick says little: spread events by their order instead.
        let by_event = self.seconds(end) < 0.05;
        let max_seq = self
            .end
            .map(|e| e.seq)
            .into_iter()
            .chain(self.chunks.iter().map(|c| c.header.base_seq + 1))
            .max()
            .unwrap_or(1);
        let span = if by_event { max_seq } else { end.max(1) };
        let crate::Replayed { replay: r, .. } =
            self.replay_into(Replay::sampling(POINTS, span, by_event), u64::MAX);
        let peak = r.peak_bytes;
        let points = carried(&r.series, &r.series_last);
        let frac = |seq: u64, time: u64| {
            if by_event {
                seq as f64 / span as f64
            } else {
                time as f64 / span as f64
            }
        };
        let peak_frac = frac(r.peak_seq, r.peak_time);
        let peak_seconds = self.seconds(r.peak_time);
        let x_axis = if by_event {
            XAxis::Events(span)
        } else {
            XAxis::Seconds(self.seconds(end))
        };
        let bands = if self.region_names.is_empty() {
            Vec::new()
        } else {
            self.region_bands(by_event, span)
        };
        let heap = Panel {
            axis_title: "heap in use",
            colour: HEAP_COLOUR,
            height: 320.0,
            series: vec![Series::whole(String::new(), HEAP_COLOUR, points)],
            peak,
            peak_frac,
            peak_label: format!(
                "peak {} ({} bytes) at {:.3} s",
                human_bytes(peak),
                grouped(peak),
                peak_seconds
            ),
            note: None,
        };
        let mut panels = vec![heap];
        // Only when something was mapped: plots of programs that map nothing stay as they were.
        if r.peak_mapped_bytes > 0 {
            let peak = r.peak_mapped_bytes;
            panels.push(Panel {
                axis_title: "mapped memory",
                colour: MAPPED_COLOUR,
                height: 200.0,
                series: vec![Series::whole(
                    String::new(),
                    MAPPED_COLOUR,
                    carried(&r.mapped_series, &r.mapped_series_last),
                )],
                peak,
                peak_frac: frac(r.peak_mapped_seq, r.peak_mapped_time),
                peak_label: format!(
                    "peak mapped {} ({} bytes) at {:.3} s",
                    human_bytes(peak),
                    grouped(peak),
                    self.seconds(r.peak_mapped_time)
                ),
                note: None,
            });
        }
        panels.extend(self.rss_panel(POINTS, span, by_event));
        let what = if panels.len() > 1 {
            "memory"
        } else {
            "heap in use"
        };
        let svg = chart(
            &format!(
                "memtrack: {what} over time ({}){}",
                crate::shell_command(&self.last_image().argv),
                match self.sample_rate() {
                    Some(rate) => format!(
                        ", heap estimated from allocations sampled at {}",
                        crate::human_bytes(rate)
                    ),
                    None => String::new(),
                }
            ),
            None,
            &panels,
            x_axis,
            &bands,
        );
        Plot {
            svg,
            peak_bytes: peak,
            peak_seconds,
            peak_rss: self.peak_rss().map(|p| (p.rss_bytes, self.seconds(p.time))),
            checkpoints: None,
        }
    }

    /// An aggregated capture's memory over time: the points of the checkpoints before its
    /// last one (its `series`, thinned on long runs) and the last one's, oldest first; empty
    /// for a capture of events.
    pub fn checkpoint_series(&self) -> Vec<memtrack_format::SeriesPoint> {
        let Some(c) = &self.checkpoint else {
            return Vec::new();
        };
        let mut points = c.series.clone();
        points.push(c.point());
        points
    }

    /// The chart of an aggregated capture, from its checkpoints: heap in use and the peak so
    /// far at each (a point per checkpoint, nothing between them is known), the peak at its
    /// own time, and resident memory at each checkpoint that sampled it.
    fn plot_checkpoints(&self, c: &memtrack_format::Checkpoint) -> Plot {
        let points = self.checkpoint_series();
        let end = self
            .end
            .map(|e| e.time)
            .unwrap_or(0)
            .max(self.last_chunk_time)
            .max(c.time)
            .max(c.peak_time)
            .max(1);
        let at: Vec<f64> = points.iter().map(|p| p.time as f64 / end as f64).collect();
        let sampled = c.sample_rate > 0;
        let approx = if sampled { "\u{2248} " } else { "" };
        let n = points.len();
        let tips: Vec<String> = points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let which = if i + 1 == n {
                    format!("checkpoint {} (the last read)", c.number)
                } else if n as u64 == c.number {
                    format!("checkpoint {}", i + 1)
                } else {
                    "checkpoint".to_string()
                };
                let rss = match p.rss_bytes {
                    0 => String::new(),
                    b => format!(", RSS {}", size_text(b)),
                };
                format!(
                    "{which} at {:.3} s: heap in use {approx}{}, peak so far {approx}{}{rss}",
                    self.seconds(p.time),
                    size_text(p.heap_bytes),
                    size_text(p.peak_bytes)
                )
            })
            .collect();
        let heap_line = Series {
            name: "heap in use at each checkpoint".to_string(),
            colour: HEAP_COLOUR,
            values: points.iter().map(|p| Some(p.heap_bytes)).collect(),
            at: Some(at.clone()),
            tips: tips.clone(),
            dashed: false,
        };
        let peak_line = Series {
            name: "peak so far at each checkpoint".to_string(),
            colour: PEAK_SO_FAR_COLOUR,
            values: points.iter().map(|p| Some(p.peak_bytes)).collect(),
            at: Some(at.clone()),
            tips: Vec::new(),
            dashed: true,
        };
        let peak = c
            .peak_bytes
            .max(points.iter().map(|p| p.peak_bytes).max().unwrap_or(0));
        let peak_seconds = self.seconds(c.peak_time);
        let mut panels = vec![Panel {
            axis_title: "heap in use",
            colour: HEAP_COLOUR,
            height: 320.0,
            series: vec![heap_line, peak_line],
            peak,
            peak_frac: c.peak_time as f64 / end as f64,
            peak_label: format!(
                "peak {approx}{} ({} bytes) at {:.3} s",
                human_bytes(peak),
                grouped(peak),
                peak_seconds
            ),
            note: (n == 1).then(|| {
                "a single checkpoint: memtrack run --checkpoint-interval sets how often they are written"
                    .to_string()
            }),
        }];
        // Resident memory where a checkpoint sampled it (0: not read then).
        let rss_peak = points
            .iter()
            .filter(|p| p.rss_bytes > 0)
            .copied()
            .reduce(|best, p| {
                if p.rss_bytes > best.rss_bytes {
                    p
                } else {
                    best
                }
            });
        if let Some(best) = rss_peak {
            let sampled_points = points.iter().filter(|p| p.rss_bytes > 0).count();
            panels.push(Panel {
                axis_title: "resident (RSS)",
                colour: RSS_COLOUR,
                height: 200.0,
                series: vec![Series {
                    name: String::new(),
                    colour: RSS_COLOUR,
                    values: points
                        .iter()
                        .map(|p| (p.rss_bytes > 0).then_some(p.rss_bytes))
                        .collect(),
                    at: Some(at.clone()),
                    tips: tips.clone(),
                    dashed: false,
                }],
                peak: best.rss_bytes,
                peak_frac: best.time as f64 / end as f64,
                peak_label: format!(
                    "highest RSS at a checkpoint {} ({} bytes) at {:.3} s",
                    human_bytes(best.rss_bytes),
                    grouped(best.rss_bytes),
                    self.seconds(best.time)
                ),
                note: (sampled_points < 2)
                    .then(|| "resident memory read at a single checkpoint".to_string()),
            });
        }
        let what = if panels.len() > 1 {
            "memory"
        } else {
            "heap in use"
        };
        // Sampling is said in the subtitle, which a long command line cannot push out.
        let title = format!(
            "memtrack: {what} over time ({})",
            crate::shell_command(&self.last_image().argv)
        );
        let subtitle = checkpoints_caption(self, c, &points, sampled);
        let svg = chart(
            &title,
            Some(&subtitle),
            &panels,
            XAxis::Seconds(self.seconds(end)),
            &[],
        );
        Plot {
            svg,
            peak_bytes: peak,
            peak_seconds,
            peak_rss: rss_peak.map(|p| (p.rss_bytes, self.seconds(p.time))),
            checkpoints: Some(n),
        }
    }

    /// Resident memory over time, when the capture has samples: per slice of `[0, span)` (time
    /// units, or sequence numbers when `by_event`) the highest sample in it, the last one
    /// carried on until the next; nothing before the first sample.
    fn rss_panel(&self, points: usize, span: u64, by_event: bool) -> Option<Panel> {
        let peak = self.peak_rss()?;
        let x = |s: &memtrack_format::RssRecord| if by_event { s.seq } else { s.time };
        let slice = |v: u64| ((v as u128 * points as u128) / span.max(1) as u128) as usize;
        let mut values: Vec<Option<u64>> = vec![None; points];
        let mut last = vec![None; points];
        for s in &self.rss {
            let i = slice(x(s)).min(points - 1);
            values[i] = Some(values[i].map_or(s.rss_bytes, |v: u64| v.max(s.rss_bytes)));
            last[i] = Some(s.rss_bytes);
        }
        let mut carry = None;
        for (v, l) in values.iter_mut().zip(last) {
            match (*v, carry) {
                (None, c) => *v = c,
                (Some(m), Some(c)) => *v = Some(m.max(c)),
                (Some(_), None) => {}
            }
            if l.is_some() {
                carry = l;
            }
        }
        Some(Panel {
            axis_title: "resident (RSS)",
            colour: RSS_COLOUR,
            height: 200.0,
            series: vec![Series {
                name: String::new(),
                colour: RSS_COLOUR,
                values,
                at: None,
                tips: Vec::new(),
                dashed: false,
            }],
            peak: peak.rss_bytes,
            peak_frac: x(&peak) as f64 / span.max(1) as f64,
            peak_label: format!(
                "peak RSS {} ({} bytes) at {:.3} s",
                human_bytes(peak.rss_bytes),
                grouped(peak.rss_bytes),
                self.seconds(peak.time)
            ),
            note: (self.rss.len() < 2)
                .then(|| "a single sample of resident memory (sampled at most every 10 ms)".into()),
        })
    }

    /// One band per region path among the [`MAX_BANDS`] with the largest peak growth, each
    /// with its occurrences as spans of the time axis (`[0, span)`: time units, or sequence
    /// numbers when `by_event`).
    fn region_bands(&self, by_event: bool, span: u64) -> Vec<Band> {
        let regions = self.regions();
        let mut figures = regions.figures(self, crate::RegionSort::Peak);
        figures.sort_by(|a, b| {
            b.peak_growth_bytes
                .cmp(&a.peak_growth_bytes)
                .then(a.path.cmp(&b.path))
        });
        figures.truncate(MAX_BANDS);
        let frac = |v: u64| v as f64 / span.max(1) as f64;
        figures
            .iter()
            .map(|f| Band {
                label: format!("{} (peak +{})", f.path, human_bytes(f.peak_growth_bytes)),
                spans: regions
                    .occurrences
                    .iter()
                    .filter(|o| o.path == f.path)
                    .map(|o| {
                        let (a, b) = if by_event {
                            (o.begin_seq, o.end_seq)
                        } else {
                            (o.begin_time, o.end_time)
                        };
                        (
                            frac(a),
                            frac(b),
                            format!(
                                "{} (thread {}): peak growth {}, heap peak {}, {:.3} s",
                                o.path,
                                o.tid,
                                human_bytes(o.peak_growth_bytes),
                                human_bytes(o.heap_peak_bytes),
                                self.seconds(o.end_time.saturating_sub(o.begin_time))
                            ),
                        )
                    })
                    .collect(),
            })
            .collect()
    }
}

/// `12,345,678 bytes (11.77 MiB)`.
fn size_text(b: u64) -> String {
    format!("{} bytes ({})", grouped(b), human_bytes(b))
}

/// A duration to two significant digits in a unit that suits it: `100 ms`, `5 s`, `2.5 min`.
fn about_duration(seconds: f64) -> String {
    let (v, unit) = if seconds < 1.0 {
        (seconds * 1e3, "ms")
    } else if seconds < 120.0 {
        (seconds, "s")
    } else if seconds < 7200.0 {
        (seconds / 60.0, "min")
    } else {
        (seconds / 3600.0, "h")
    };
    if v <= 0.0 || !v.is_finite() {
        return format!("0 {unit}");
    }
    let step = 10f64.powf(v.log10().floor() - 1.0);
    let r = (v / step).round() * step;
    let text = if r >= 10.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    };
    format!("{text} {unit}")
}

/// What an aggregated capture's points are: how many checkpoints, about how often (the
/// shortest gap between them, the last one apart: it is written at the end, whenever that
/// is), whether older ones were thinned, and that heap figures are estimates when sampled.
fn checkpoints_caption(
    cap: &Capture,
    c: &memtrack_format::Checkpoint,
    points: &[memtrack_format::SeriesPoint],
    sampled: bool,
) -> String {
    let mut gaps: Vec<u64> = std::iter::once(0)
        .chain(points.iter().map(|p| p.time))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    if c.last {
        gaps.pop();
    }
    let every = gaps
        .into_iter()
        .filter(|&g| g > 0)
        .min()
        .map(|g| format!(", about every {}", about_duration(cap.seconds(g))))
        .unwrap_or_default();
    let n = points.len() as u64;
    let what = if n == c.number && n == 1 {
        format!("a single checkpoint, at {:.3} s", cap.seconds(c.time))
    } else if n == c.number {
        format!(
            "one point per checkpoint{every} ({} checkpoints)",
            grouped(n)
        )
    } else {
        format!(
            "one point per checkpoint{every} ({} of {} checkpoints: older ones thinned)",
            grouped(n),
            grouped(c.number)
        )
    };
    let estimates = if sampled {
        format!(
            "\nheap figures are estimates from allocations sampled at {}",
            human_bytes(c.sample_rate)
        )
    } else {
        String::new()
    };
    format!("aggregated capture: {what}{estimates}")
}

/// Per slice of a sampled series, its highest value, with the value after the last event of
/// the slice before carried into it (and into slices without events).
fn carried(most: &[u64], last: &[Option<u64>]) -> Vec<u64> {
    let mut carry = 0u64;
    most.iter()
        .zip(last)
        .map(|(&m, &l)| match l {
            Some(l) => {
                let v = m.max(carry);
                carry = l;
                v
            }
            None => carry,
        })
        .collect()
}

/// Height of one region band's row in a plot: its label's line and the band.
const BAND_ROW: f64 = 30.0;

/// Regions drawn as bands under a chart, at most (those with the largest peak growth).
pub const MAX_BANDS: usize = 8;

/// A labelled row under the chart: spans of the time axis (fractions of it), each with its
/// tooltip.
struct Band {
    label: String,
    spans: Vec<(f64, f64, String)>,
}

/// Colours of the processes' lines in a tree's chart, after the combined line's.
const PROCESS_COLOURS: [&str; 5] = ["#2980b9", "#27ae60", "#8e44ad", "#d35400", "#7f8c8d"];

impl crate::ProcessTree {
    /// The combined heap of the tree over time, and the five processes that held most at the
    /// combined peak, each as a line; the combined peak marked.
    pub fn plot(&self) -> Plot {
        const POINTS: usize = 1000;
        let start = self.root().start_mono_ns;
        let end = self
            .processes
            .iter()
            .map(|p| p.end_mono_ns)
            .max()
            .unwrap_or(start)
            .max(start + 1);
        let span = (end - start) as f64;
        let bin = |ns: u64| {
            (((ns.saturating_sub(start)) as f64 / span * POINTS as f64) as usize).min(POINTS - 1)
        };
        let mut combined = vec![0u64; POINTS];
        let mut shown: Vec<(usize, Vec<u64>)> = Vec::new();
        let mut order: Vec<usize> = (0..self.processes.len())
            .filter(|&i| self.processes[i].capture.is_some())
            .collect();
        order.sort_by(|&a, &b| {
            self.processes[b]
                .held_at_combined_peak
                .cmp(&self.processes[a].held_at_combined_peak)
                .then(a.cmp(&b))
        });
        for (rank, &i) in order.iter().enumerate() {
            let p = &self.processes[i];
            let cap = p.capture.as_ref().expect("filtered on captures");
            let unit = cap.header.clock_unit_ns.max(1);
            // Per slice: the most live in it, and what was live after its last event.
            let mut most: Vec<Option<(u64, u64)>> = vec![None; POINTS];
            cap.replay_with(crate::Replay::new(), u64::MAX, |r, ev| {
                let k = bin(p.start_mono_ns + ev.time * unit);
                let e = most[k].get_or_insert((0, 0));
                e.0 = e.0.max(r.live_bytes);
                e.1 = r.live_bytes;
            });
            let last = if p.summary.complete {
                bin(p.end_mono_ns)
            } else {
                POINTS
            };
            let mut values = vec![0u64; POINTS];
            let mut carry = 0u64;
            for k in bin(p.start_mono_ns)..POINTS {
                let v = match most[k] {
                    Some((m, l)) => {
                        let v = m.max(carry);
                        carry = l;
                        v
                    }
                    None => carry,
                };
                if k > last {
                    break;
                }
                values[k] = v;
            }
            for (c, v) in combined.iter_mut().zip(&values) {
                *c += v;
            }
            if rank < PROCESS_COLOURS.len() {
                shown.push((i, values));
            }
        }
        let peak = self
            .combined_peak_bytes
            .max(combined.iter().copied().max().unwrap_or(0));
        let peak_seconds = self.seconds(self.combined_peak_mono_ns);
        let mut series = vec![Series::whole(
            "all processes".to_string(),
            HEAP_COLOUR,
            combined,
        )];
        for (k, (i, values)) in shown.into_iter().enumerate() {
            series.push(Series::whole(
                self.processes[i].label(),
                PROCESS_COLOURS[k],
                values,
            ));
        }
        let heap = Panel {
            axis_title: "heap in use",
            colour: HEAP_COLOUR,
            height: 320.0,
            series,
            peak,
            peak_frac: peak_seconds * 1e9 / span,
            peak_label: format!(
                "combined peak {} ({} bytes) at {:.3} s",
                human_bytes(self.combined_peak_bytes),
                grouped(self.combined_peak_bytes),
                peak_seconds
            ),
            note: None,
        };
        let svg = chart(
            &format!(
                "memtrack: heap in use over time, {} ({})",
                match self.processes.iter().filter(|p| p.has_capture()).count() {
                    1 => "1 process".to_string(),
                    n => format!("{n} processes"),
                },
                self.root().label()
            ),
            None,
            &[heap],
            XAxis::Seconds(span / 1e9),
            &[],
        );
        Plot {
            svg,
            peak_bytes: self.combined_peak_bytes,
            peak_seconds,
            peak_rss: None,
            checkpoints: None,
        }
    }
}

/// What the horizontal axis spans: seconds, or events in order (short captures).
#[derive(Clone, Copy)]
enum XAxis {
    Seconds(f64),
    Events(u64),
}

/// A round step (1, 2 or 5 times a power of ten) for about `ticks` ticks over `range`.
fn nice_step(range: f64, ticks: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// A tick's value in a unit, with the decimals its step needs: `0.5`, `20`, `0.05`.
fn tick_number(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10() - 1e-9).ceil() as usize
    };
    format!("{v:.decimals$}")
}

/// The horizontal axis's ticks (position as a fraction of the span, label) and its title.
fn x_ticks(x: XAxis) -> (Vec<(f64, String)>, String) {
    let (span, unit, per, title) = match x {
        XAxis::Events(n) => (n.max(1) as f64, "", 1.0, "events, in order".to_string()),
        XAxis::Seconds(s) => {
            let (unit, per) = if s < 1.0 {
                ("ms", 1e-3)
            } else if s < 120.0 {
                ("s", 1.0)
            } else if s < 7200.0 {
                ("min", 60.0)
            } else {
                ("h", 3600.0)
            };
            (s.max(1e-9), unit, per, format!("time ({unit})"))
        }
    };
    let in_unit = span / per;
    let step = nice_step(in_unit, 8.0);
    let mut ticks = Vec::new();
    let mut k = 0u32;
    loop {
        let v = step * k as f64;
        if v > in_unit * (1.0 + 1e-9) {
            break;
        }
        let label = if unit.is_empty() {
            grouped(v.round() as u64)
        } else {
            tick_number(v, step)
        };
        ticks.push((v / in_unit, label));
        k += 1;
    }
    (ticks, title)
}

/// The vertical axis's top (a round size at or above `peak`) and its ticks (bytes, label in
/// B, KiB, MiB or GiB).
fn y_ticks(peak: u64) -> (f64, Vec<(f64, String)>) {
    let peak = peak.max(1) as f64;
    let (unit, per) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .into_iter()
        .find(|&(_, per)| peak >= per as f64)
        .map_or(("B", 1.0), |(u, per)| (u, per as f64));
    let step = nice_step(peak / per, 5.0).max(if unit == "B" { 1.0 } else { 0.0 });
    let top = (peak / per / step - 1e-9).ceil().max(1.0) * step;
    let ticks = (0..)
        .map(|k| k as f64 * step)
        .take_while(|v| *v <= top * (1.0 + 1e-9))
        .map(|v| {
            let label = if v == 0.0 {
                "0".to_string()
            } else {
                format!("{} {unit}", tick_number(v, step))
            };
            (v * per, label)
        })
        .collect();
    (top * per, ticks)
}

/// The heap's colour (the first line of its panel).
const HEAP_COLOUR: &str = "#c0392b";
/// Resident memory's colour.
const RSS_COLOUR: &str = "#2471a3";
/// Mapped memory's colour.
const MAPPED_COLOUR: &str = "#7d3c98";
/// An aggregated capture's peak so far.
const PEAK_SO_FAR_COLOUR: &str = "#e59866";

/// One line of a panel: a value per slice of time (`None`: not known then, not drawn).
struct Series {
    /// Named lines get a legend.
    name: String,
    colour: &'static str,
    values: Vec<Option<u64>>,
    /// Where each value sits on the time axis, as fractions of it (points at irregular times,
    /// such as checkpoints); None: one per slice, evenly.
    at: Option<Vec<f64>>,
    /// A dot with this tooltip on each value (none when empty, or past [`MAX_DOTS`] values).
    tips: Vec<String>,
    /// Drawn dashed (a line that often lies on another: the one below shows through).
    dashed: bool,
}

/// Values of a series past which its dots are not drawn (the line alone stays readable).
const MAX_DOTS: usize = 300;

impl Series {
    /// A line known at every slice.
    fn whole(name: String, colour: &'static str, values: Vec<u64>) -> Series {
        Series {
            name,
            colour,
            values: values.into_iter().map(Some).collect(),
            at: None,
            tips: Vec::new(),
            dashed: false,
        }
    }
}

/// One quantity over time, on a vertical scale of its own (a small heap stays readable under a
/// large resident memory): its lines, and its peak marked at `peak_frac` of the time axis.
struct Panel {
    axis_title: &'static str,
    colour: &'static str,
    height: f64,
    series: Vec<Series>,
    peak: u64,
    peak_frac: f64,
    peak_label: String,
    /// Said in the middle of the panel (too few points to draw a line, say).
    note: Option<String>,
}

/// The title, cut with an ellipsis to fit the chart's width (a long command line otherwise
/// runs off both sides); a closing parenthesis stays.
fn fit_title(title: &str, max_chars: usize) -> String {
    let n = title.chars().count();
    if n <= max_chars {
        return title.to_string();
    }
    let close = title.ends_with(')');
    let keep = max_chars.saturating_sub(1 + close as usize);
    let mut out: String = title.chars().take(keep).collect();
    out.push('…');
    if close {
        out.push(')');
    }
    out
}

/// Draws the panels one above the other on one time axis (ticks under each, titled under the
/// last), each under a round size above its peak with its own ticks and its peak marked;
/// named lines get a legend, and region bands follow.
fn chart(
    title: &str,
    subtitle: Option<&str>,
    panels: &[Panel],
    x_axis: XAxis,
    bands: &[Band],
) -> String {
    let (w, left, right) = (1000.0f64, 100.0, 30.0);
    // Each line of a subtitle takes a line under the title.
    let sub_lines: Vec<&str> = subtitle.map_or(Vec::new(), |s| s.lines().collect());
    let top = 50.0 + 18.0 * sub_lines.len() as f64;
    // Between panels: the tick labels of the one above.
    const GAP: f64 = 40.0;
    let pw = w - left - right;
    let tops: Vec<f64> = panels
        .iter()
        .scan(top, |y, p| {
            let t = *y;
            *y += p.height + GAP;
            Some(t)
        })
        .collect();
    let bottom = tops.last().copied().unwrap_or(top) + panels.last().map_or(0.0, |p| p.height);
    let legend: Vec<&Series> = panels
        .iter()
        .flat_map(|p| &p.series)
        .filter(|s| !s.name.is_empty())
        .collect();
    let h = bottom + 70.0 + 18.0 * legend.len() as f64;
    // Region bands below the legend: a title row, then one row each (its label, its band).
    let bands_top = h;
    let h = if bands.is_empty() {
        h
    } else {
        h + 24.0 + BAND_ROW * bands.len() as f64 + 10.0
    };
    let mut svg = String::new();
    svg.push_str(&format!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"Verdana, sans-serif\" font-size=\"12\">\n"
        ));
    svg.push_str(&format!(
        "<rect width=\"{w}\" height=\"{h}\" fill=\"#fdfdf8\"/>\n"
    ));
    // About 10 px a character at 16 px: the title stays within the chart, whole in a tooltip.
    let shown = fit_title(title, 95);
    let tip = if shown == title {
        String::new()
    } else {
        format!("<title>{}</title>", esc(title))
    };
    svg.push_str(&format!(
        "<text x=\"{}\" y=\"24\" font-size=\"16\" text-anchor=\"middle\">{tip}{}</text>\n",
        w / 2.0,
        esc(&shown)
    ));
    for (k, line) in sub_lines.iter().enumerate() {
        // About 7 px a character at 12 px.
        let shown = fit_title(line, 135);
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>\n",
            w / 2.0,
            44.0 + 18.0 * k as f64,
            esc(&shown)
        ));
    }
    let (x_tick_list, x_title) = x_ticks(x_axis);
    for (panel, &ptop) in panels.iter().zip(&tops) {
        let ph = panel.height;
        // Some room above the peak for its label, clear of the panel above.
        let (y_max, y_tick_list) = y_ticks(panel.peak + panel.peak / 16);
        let scale = ph / y_max;
        // axes, grid and ticks
        for (v, label) in &y_tick_list {
            let y = ptop + ph - v * scale;
            svg.push_str(&format!(
                "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n",
                left + pw
            ));
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>\n",
                left - 6.0,
                y + 4.0
            ));
        }
        for (f, label) in &x_tick_list {
            let x = left + pw * f;
            svg.push_str(&format!(
                "<line x1=\"{x:.1}\" y1=\"{0}\" x2=\"{x:.1}\" y2=\"{1}\" stroke=\"#333\"/><text x=\"{x:.1}\" y=\"{2}\" text-anchor=\"middle\">{label}</text>\n",
                ptop + ph,
                ptop + ph + 5.0,
                ptop + ph + 19.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\" font-weight=\"bold\" fill=\"{2}\" transform=\"rotate(-90 {0} {1})\">{3}</text>\n",
            22.0,
            ptop + ph / 2.0,
            panel.colour,
            panel.axis_title
        ));
        svg.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{ptop}\" x2=\"{left}\" y2=\"{}\" stroke=\"#333\"/>\n<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#333\"/>\n",
            ptop + ph,
            left + pw
        ));
        // The first line is the panel's own; the ones after it (processes) are thinner.
        for (k, series) in panel.series.iter().enumerate() {
            let n = series.values.len().max(1) as f64;
            let mut run = String::new();
            let mut runs = Vec::new();
            for (i, v) in series.values.iter().enumerate() {
                match v {
                    Some(v) => {
                        let f = match &series.at {
                            Some(at) => at.get(i).copied().unwrap_or(1.0).clamp(0.0, 1.0),
                            None => (i as f64 + 0.5) / n,
                        };
                        let x = left + pw * f;
                        let y = ptop + ph - *v as f64 * scale;
                        run.push_str(&format!("{x:.1},{y:.1} "));
                    }
                    None if !run.is_empty() => runs.push(std::mem::take(&mut run)),
                    None => {}
                }
            }
            runs.push(run);
            for points in runs.iter().filter(|r| !r.is_empty()) {
                if let Some((x, y)) = points
                    .trim_end()
                    .split_once(',')
                    .filter(|_| !points.trim_end().contains(' '))
                {
                    // One point (a single sample): a dot, since a line of one point is not drawn.
                    svg.push_str(&format!(
                        "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{}\"/>\n",
                        series.colour
                    ));
                    continue;
                }
                svg.push_str(&format!(
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"{} points=\"{}\"/>\n",
                    series.colour,
                    if k == 0 { 1.5 } else { 1.0 },
                    if series.dashed {
                        " stroke-dasharray=\"6 4\""
                    } else {
                        ""
                    },
                    points.trim_end()
                ));
            }
            if !series.tips.is_empty() && series.values.len() <= MAX_DOTS {
                for (i, (v, tip)) in series.values.iter().zip(&series.tips).enumerate() {
                    let Some(v) = v else { continue };
                    let f = match &series.at {
                        Some(at) => at.get(i).copied().unwrap_or(1.0).clamp(0.0, 1.0),
                        None => (i as f64 + 0.5) / n,
                    };
                    svg.push_str(&format!(
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"><title>{}</title></circle>\n",
                        left + pw * f,
                        ptop + ph - *v as f64 * scale,
                        series.colour,
                        esc(tip)
                    ));
                }
            }
        }
        if let Some(note) = &panel.note {
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#777\">{}</text>\n",
                left + pw / 2.0,
                ptop + ph / 2.0,
                esc(note)
            ));
        }
        // the peak
        let peak_x = left + pw * panel.peak_frac.clamp(0.0, 1.0);
        let peak_y = ptop + ph - panel.peak as f64 * scale;
        svg.push_str(&format!(
            "<line x1=\"{peak_x:.1}\" y1=\"{peak_y:.1}\" x2=\"{peak_x:.1}\" y2=\"{}\" stroke=\"#2c3e50\" stroke-dasharray=\"4 3\"/>\n",
            ptop + ph
        ));
        svg.push_str(&format!(
            "<circle cx=\"{peak_x:.1}\" cy=\"{peak_y:.1}\" r=\"4\" fill=\"#2c3e50\"/>\n"
        ));
        let (anchor, lx) = if peak_x > left + pw * 0.6 {
            ("end", peak_x - 8.0)
        } else {
            ("start", peak_x + 8.0)
        };
        svg.push_str(&format!(
            "<text x=\"{lx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" font-weight=\"bold\">{}</text>\n",
            (peak_y - 8.0).max(ptop - 8.0),
            esc(&panel.peak_label)
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{x_title}</text>\n",
        left + pw / 2.0,
        bottom + 40.0
    ));
    for (k, series) in legend.iter().enumerate() {
        let y = bottom + 62.0 + 18.0 * k as f64;
        svg.push_str(&format!(
                "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"{2}\" stroke-width=\"3\"/><text x=\"{3}\" y=\"{4:.1}\">{5}</text>\n",
                y - 4.0,
                left + 24.0,
                series.colour,
                left + 32.0,
                y,
                esc(&series.name)
            ));
    }
    if !bands.is_empty() {
        svg.push_str(&format!(
            "<text x=\"{left}\" y=\"{:.1}\" font-weight=\"bold\">regions (largest peak growth first)</text>\n",
            bands_top + 16.0
        ));
    }
    const BAND_COLOURS: [&str; 4] = ["#16a085", "#2980b9", "#8e44ad", "#d35400"];
    for (k, band) in bands.iter().enumerate() {
        let y = bands_top + 24.0 + BAND_ROW * k as f64;
        let colour = BAND_COLOURS[k % BAND_COLOURS.len()];
        // The label on a line of its own above the band, so that no span hides it.
        svg.push_str(&format!(
            "<text x=\"{left}\" y=\"{:.1}\" font-size=\"11\">{}</text>\n",
            y + 10.0,
            esc(&band.label)
        ));
        svg.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#eee\"/>\n",
            y + 20.0,
            left + pw
        ));
        for (a, b, tip) in &band.spans {
            let x = left + pw * a.clamp(0.0, 1.0);
            let x2 = left + pw * b.clamp(0.0, 1.0);
            svg.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"12\" fill=\"{colour}\" fill-opacity=\"0.6\"><title>{}</title></rect>\n",
                y + 14.0,
                (x2 - x).max(1.5),
                esc(tip)
            ));
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_titles_are_cut_with_an_ellipsis() {
        let long = format!(
            "memtrack: heap in use over time (python3 app.py {})",
            "x".repeat(200)
        );
        let t = super::fit_title(&long, 95);
        assert_eq!(t.chars().count(), 95);
        assert!(t.starts_with("memtrack: heap in use over time (python3 app.py xx"));
        assert!(t.ends_with("x…)"), "{t}");
        assert_eq!(super::fit_title("memtrack (ls)", 95), "memtrack (ls)");
    }

    #[test]
    fn durations_are_said_to_two_digits() {
        use super::about_duration;
        assert_eq!(about_duration(0.1023), "100 ms");
        assert_eq!(about_duration(0.0456), "46 ms");
        assert_eq!(about_duration(5.04), "5 s");
        assert_eq!(about_duration(2.56), "2.6 s");
        assert_eq!(about_duration(300.0), "5 min");
        assert_eq!(about_duration(5400.0), "90 min");
        assert_eq!(about_duration(36000.0), "10 h");
    }

    /// A capture file holding only a header and one `CHECKPOINT` (a process cut off before
    /// its END when `end` is false), in milliseconds.
    fn aggregated(name: &str, c: &memtrack_format::Checkpoint, end: bool) -> crate::Capture {
        use memtrack_format::{put_record, record, Header};
        let mut file = Header {
            version: memtrack_format::FORMAT_VERSION,
            pid: 77,
            clock_unit_ns: 1_000_000,
            executable: "/bin/svc".into(),
            argv: vec!["svc".into(), "--port".into(), "8080".into()],
            pointer_size: 8,
            machine: 62,
            ..Default::default()
        }
        .encode();
        put_record(&mut file, record::CHECKPOINT, &c.encode());
        if end {
            let e = memtrack_format::EndRecord {
                seq: c.seq,
                time: c.time,
                reason: memtrack_format::EndReason::Exit,
                next_stack_id: 1,
            };
            file.extend_from_slice(&e.encode_framed());
        }
        let path =
            std::env::temp_dir().join(format!("memtrack-plot-{}-{name}.cap", std::process::id()));
        std::fs::write(&path, file).unwrap();
        let cap = crate::Capture::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(cap.warnings.is_empty(), "{:?}", cap.warnings);
        cap
    }

    fn point(time: u64, heap: u64, peak: u64, rss: u64) -> memtrack_format::SeriesPoint {
        memtrack_format::SeriesPoint {
            time,
            heap_bytes: heap,
            peak_bytes: peak,
            rss_bytes: rss,
        }
    }

    #[test]
    fn a_thinned_series_says_how_many_checkpoints_it_kept() {
        // Checkpoint 9 of a process killed after it: the series kept 4 of the 8 before it
        // (every other one, as thinning does), 2 s apart.
        let c = memtrack_format::Checkpoint {
            number: 9,
            last: false,
            time: 9_000,
            seq: 100,
            heap_bytes: 3_000,
            peak_bytes: 5_000,
            peak_time: 4_500,
            rss_bytes: 0,
            series: vec![
                point(2_000, 1_000, 1_000, 8_000),
                point(4_000, 2_000, 2_000, 9_000),
                point(6_000, 4_000, 5_000, 12_000),
                point(8_000, 3_500, 5_000, 11_000),
            ],
            ..Default::default()
        };
        let cap = aggregated("thinned", &c, false);
        let points = cap.checkpoint_series();
        assert_eq!(points.len(), 5);
        assert_eq!(points[4], point(9_000, 3_000, 5_000, 0));
        let plot = cap.plot();
        assert_eq!(plot.checkpoints, Some(5));
        assert_eq!(plot.peak_bytes, 5_000);
        assert_eq!(plot.peak_seconds, 4.5);
        // The highest RSS a checkpoint read; the last read none.
        assert_eq!(plot.peak_rss, Some((12_000, 6.0)));
        let svg = &plot.svg;
        assert!(
            svg.contains("aggregated capture: one point per checkpoint, about every 1 s (5 of 9 checkpoints: older ones thinned)"),
            "{svg}"
        );
        assert!(
            svg.contains("memtrack: memory over time (svc --port 8080)"),
            "{svg}"
        );
        assert!(
            svg.contains("peak 4.88 KiB (5,000 bytes) at 4.500 s"),
            "{svg}"
        );
        // Thinned: the tooltips cannot number the kept checkpoints, except the last.
        assert!(svg.contains("<title>checkpoint at 6.000 s: heap in use 4,000 bytes (3.91 KiB), peak so far 5,000 bytes (4.88 KiB), RSS 12,000 bytes (11.72 KiB)</title>"), "{svg}");
        assert!(svg.contains("<title>checkpoint 9 (the last read) at 9.000 s: heap in use 3,000 bytes (2.93 KiB), peak so far 5,000 bytes (4.88 KiB)</title>"), "{svg}");
        // Four RSS readings: a line, no single-reading note.
        assert!(
            svg.contains("highest RSS at a checkpoint 11.72 KiB (12,000 bytes) at 6.000 s"),
            "{svg}"
        );
        assert!(!svg.contains("read at a single checkpoint"), "{svg}");
        // Summary figures agree.
        let s = cap.summary().unwrap();
        assert_eq!(s.peak_rss_bytes, Some(12_000));
        assert_eq!(s.heap_at_peak_rss_bytes, Some(4_000));
        assert_eq!(s.peak_rss_time_seconds, Some(6.0));
    }

    #[test]
    fn a_single_checkpoint_is_a_dot_and_says_so() {
        let c = memtrack_format::Checkpoint {
            number: 1,
            last: true,
            time: 80,
            seq: 10,
            sample_rate: 524_288,
            heap_bytes: 1_000_000,
            peak_bytes: 3_000_000,
            peak_time: 60,
            rss_bytes: 20_000_000,
            ..Default::default()
        };
        let cap = aggregated("single", &c, true);
        let plot = cap.plot();
        assert_eq!(plot.checkpoints, Some(1));
        let svg = &plot.svg;
        assert!(
            svg.contains("aggregated capture: a single checkpoint, at 0.080 s</text>"),
            "{svg}"
        );
        assert!(
            svg.contains(
                ">heap figures are estimates from allocations sampled at 512.00 KiB</text>"
            ),
            "{svg}"
        );
        assert!(svg.contains("a single checkpoint: memtrack run --checkpoint-interval sets how often they are written"), "{svg}");
        assert!(
            svg.contains("resident memory read at a single checkpoint"),
            "{svg}"
        );
        assert!(
            svg.contains("peak \u{2248} 2.86 MiB (3,000,000 bytes) at 0.060 s"),
            "{svg}"
        );
        assert!(!svg.contains("<polyline"), "one point, no line: {svg}");
    }
}
