//! Budgets for CI: limits on peak, leaks and totals, each with the stacks that contribute most
//! when it is exceeded.

use crate::capture::Capture;
use crate::replay::{Replay, SiteTotal};
use crate::stacks::StackTable;
use crate::symbols::Symbolizer;
use crate::views::View;

/// The limits to check; `None` is not checked.
#[derive(Clone, Copy, Debug, Default)]
pub struct Budget {
    pub max_peak: Option<u64>,
    pub max_leaked: Option<u64>,
    pub max_leaked_allocations: Option<u64>,
    pub max_allocations: Option<u64>,
    pub max_total: Option<u64>,
}

/// One stack that contributes to an exceeded limit.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Contributor {
    pub bytes: u64,
    pub allocations: u64,
    /// Innermost (the allocating function) first, as `function (file:line)`.
    pub frames: Vec<String>,
    /// In a process tree: the process whose stack it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

/// In a process tree: one process's share of a limit's figure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProcessShare {
    pub pid: u32,
    pub command: String,
    pub measured: u64,
}

/// One checked limit.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LimitResult {
    /// The option's name, e.g. `max_peak`.
    pub name: &'static str,
    /// `bytes` or `allocations`.
    pub unit: &'static str,
    pub limit: u64,
    pub measured: u64,
    pub exceeded: bool,
    /// The three stacks that contribute most, when exceeded.
    pub top: Vec<Contributor>,
    /// In a process tree, when exceeded: the processes that contribute most, largest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessShare>,
    /// A sampled capture: `measured` is an estimate and the limit is exceeded only when
    /// `lower_bound` is above it: max(estimate - 2 standard errors, the recorded bytes or
    /// count, which the truth cannot be below) for peak and leaked bytes, the recorded figure
    /// for counts and totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower_bound: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr: Option<u64>,
    /// A region's limit (`check --region NAME`): the region it applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

pub(crate) fn top3(
    sites: &[SiteTotal],
    stacks: &StackTable,
    sym: &mut Symbolizer,
    by_count: bool,
) -> Vec<Contributor> {
    let mut v: Vec<&SiteTotal> = sites.iter().collect();
    if by_count {
        v.sort_by(|a, b| {
            b.allocations
                .cmp(&a.allocations)
                .then(b.bytes.cmp(&a.bytes))
        });
    } else {
        v.sort_by(|a, b| {
            b.bytes
                .cmp(&a.bytes)
                .then(b.allocations.cmp(&a.allocations))
        });
    }
    v.into_iter()
        .take(3)
        .map(|s| Contributor {
            bytes: s.bytes,
            allocations: s.allocations,
            frames: from_location(sym, stacks, s.stack),
            pid: None,
            process: None,
        })
        .collect()
}

/// A stack's frames, innermost first, from its allocating frame (the location of `table`:
/// allocator wrappers below it, such as `operator new` or an `xmalloc`, left out).
fn from_location(sym: &mut Symbolizer, stacks: &StackTable, stack: u32) -> Vec<String> {
    let mut frames = sym.stack_frames(stacks, stack);
    frames.reverse();
    if let Some(at) = crate::views::allocating_frame(sym, stacks, stack)
        .and_then(|loc| frames.iter().position(|f| *f == loc))
    {
        frames.drain(..at);
    }
    frames.iter().map(crate::views::describe).collect()
}

/// The limits as results, `measured` filled in by `figure(name)`.
fn limits(budget: &Budget, figure: impl Fn(&str) -> u64) -> Vec<LimitResult> {
    [
        ("max_peak", "bytes", budget.max_peak),
        ("max_leaked", "bytes", budget.max_leaked),
        (
            "max_leaked_allocations",
            "allocations",
            budget.max_leaked_allocations,
        ),
        ("max_allocations", "allocations", budget.max_allocations),
        ("max_total", "bytes", budget.max_total),
    ]
    .into_iter()
    .filter_map(|(name, unit, limit)| {
        let limit = limit?;
        let measured = figure(name);
        Some(LimitResult {
            name,
            unit,
            limit,
            measured,
            exceeded: measured > limit,
            top: Vec::new(),
            processes: Vec::new(),
            lower_bound: None,
            stderr: None,
            region: None,
        })
    })
    .collect()
}

impl crate::ProcessTree {
    /// Checks `budget` against the combined figures of the tree: the combined peak, and the
    /// sums of leaks and totals over its processes. An exceeded limit names the processes that
    /// contribute most and the three largest stacks among them. `symbolizer` makes the
    /// symbolizer of a process's capture.
    pub fn check(
        &self,
        budget: &Budget,
        mut symbolizer: impl FnMut(&Capture) -> Symbolizer,
    ) -> Vec<LimitResult> {
        let (leaked, leaked_n, total_n, total) = self.totals();
        let mut out = limits(budget, |name| match name {
            "max_peak" => self.combined_peak_bytes,
            "max_leaked" => leaked,
            "max_leaked_allocations" => leaked_n,
            "max_allocations" => total_n,
            _ => total,
        });
        let mut syms: Vec<Option<Symbolizer>> = self.processes.iter().map(|_| None).collect();
        for l in out.iter_mut().filter(|l| l.exceeded) {
            let by_count = l.unit == "allocations";
            let (view, share): (View, fn(&crate::Process) -> u64) = match l.name {
                "max_peak" => (View::Peak, |p| p.held_at_combined_peak),
                "max_leaked" => (View::Leaks, |p| p.summary.leaked_bytes),
                "max_leaked_allocations" => (View::Leaks, |p| p.summary.leaked_allocations),
                "max_allocations" => (View::Allocated, |p| p.summary.total_allocations),
                _ => (View::Allocated, |p| p.summary.total_bytes),
            };
            let mut shares: Vec<ProcessShare> = self
                .processes
                .iter()
                .map(|p| ProcessShare {
                    pid: p.pid,
                    command: p.command(),
                    measured: share(p),
                })
                .filter(|s| s.measured > 0)
                .collect();
            shares.sort_by(|a, b| b.measured.cmp(&a.measured).then(a.pid.cmp(&b.pid)));
            shares.truncate(5);
            l.processes = shares;
            let mut top = Vec::new();
            for (i, v) in self.views(view, false) {
                let p = &self.processes[i];
                let cap = p.capture.as_ref().expect("views come from captures");
                let sym = syms[i].get_or_insert_with(|| symbolizer(cap));
                top.extend(
                    top3(&v.sites, &v.stacks, sym, by_count)
                        .into_iter()
                        .map(|c| Contributor {
                            pid: Some(p.pid),
                            process: Some(p.label()),
                            ..c
                        }),
                );
            }
            top.sort_by(|a, b| {
                if by_count {
                    b.allocations
                        .cmp(&a.allocations)
                        .then(b.bytes.cmp(&a.bytes))
                } else {
                    b.bytes
                        .cmp(&a.bytes)
                        .then(b.allocations.cmp(&a.allocations))
                }
            });
            top.truncate(3);
            l.top = top;
        }
        out
    }
}

impl Capture {
    /// Checks `budget`. Peak and leaks come from one replay; the allocated view is read again
    /// only when a total limit is exceeded (for its top stacks).
    pub fn check(&self, budget: &Budget, sym: &mut Symbolizer) -> Vec<LimitResult> {
        let replayed = self.replay_into(Replay::tracking_sites(), u64::MAX);
        let s = self.summarize(&replayed);
        let crate::Replayed {
            replay: r, stacks, ..
        } = replayed;
        let mut out = limits(budget, |name| match name {
            "max_peak" => s.peak_bytes,
            "max_leaked" => s.leaked_bytes,
            "max_leaked_allocations" => s.leaked_allocations,
            "max_allocations" => s.total_allocations,
            _ => s.total_bytes,
        });
        if s.sampled {
            let (raw_leaked, raw_leaked_n) = match (self.python_end, r.raw_at_leaks_seq) {
                (Some(_), Some(at)) => at,
                _ => (r.live_raw, r.live_recorded()),
            };
            for l in out.iter_mut() {
                let (se, raw) = match l.name {
                    "max_peak" => (s.peak_stderr_bytes, r.peak_raw),
                    "max_leaked" => (s.leaked_stderr_bytes, raw_leaked),
                    "max_leaked_allocations" => (0, raw_leaked_n),
                    "max_allocations" => (0, r.recorded_allocations),
                    _ => (0, r.recorded_bytes),
                };
                let estimated = matches!(l.name, "max_peak" | "max_leaked");
                let bound = if estimated {
                    l.measured.saturating_sub(2 * se).max(raw)
                } else {
                    raw
                };
                l.lower_bound = Some(bound);
                l.stderr = estimated.then_some(se);
                l.exceeded = bound > l.limit;
            }
        }
        let mut allocated = None;
        let mut leaks = None;
        for l in out.iter_mut().filter(|l| l.exceeded) {
            let by_count = l.unit == "allocations";
            l.top = match l.name {
                "max_peak" => top3(&r.peak_by_stack(), &stacks, sym, false),
                "max_leaked" | "max_leaked_allocations" if self.python_end.is_some() => {
                    // Live where the Python program's code ended, not at exit.
                    let v = leaks.get_or_insert_with(|| self.view(View::Leaks));
                    top3(&v.sites, &v.stacks, sym, by_count)
                }
                "max_leaked" | "max_leaked_allocations" => {
                    top3(&r.live_by_stack(), &stacks, sym, by_count)
                }
                _ => {
                    let v = allocated.get_or_insert_with(|| self.view(View::Allocated));
                    top3(&v.sites, &v.stacks, sym, by_count)
                }
            };
        }
        out
    }
}

impl Capture {
    /// Checks `budget` within a window of time: the peak is the window's high-water mark
    /// (`--at`: what was live then), totals count the allocations made in it, leaks those of
    /// them still live where `--leaks` looks.
    pub fn check_window(
        &self,
        budget: &Budget,
        span: &crate::Span,
        sym: &mut Symbolizer,
    ) -> Vec<LimitResult> {
        let f = self.window_figures(span);
        let leaks = (budget.max_leaked.is_some() || budget.max_leaked_allocations.is_some())
            .then(|| self.window_view(View::Leaks, span));
        let (leaked, leaked_n) = leaks.as_ref().map_or((0, 0), |v| (v.bytes, v.allocations));
        let mut out = limits(budget, |name| match name {
            "max_peak" if span.at => f.live_at_end_bytes,
            "max_peak" => f.peak_bytes,
            "max_leaked" => leaked,
            "max_leaked_allocations" => leaked_n,
            "max_allocations" => f.allocations,
            _ => f.allocated_bytes,
        });
        let mut allocated = None;
        let mut peak = None;
        for l in out.iter_mut().filter(|l| l.exceeded) {
            let by_count = l.unit == "allocations";
            let v = match l.name {
                "max_peak" => peak.get_or_insert_with(|| self.window_view(View::Peak, span)),
                "max_leaked" | "max_leaked_allocations" => leaks.as_ref().expect("measured"),
                _ => allocated.get_or_insert_with(|| self.window_view(View::Allocated, span)),
            };
            l.top = top3(&v.sites, &v.stacks, sym, by_count);
        }
        out
    }
}
