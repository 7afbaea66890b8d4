//! Budgets for CI: limits on peak, leaks and totals, each with the stacks that contribute most
//! when it is exceeded.

use crate::capture::Capture;
use crate::replay::{Replay, SiteTotal};
use crate::stacks::StackTable;
use crate::symbols::{stack_frames, Symbolizer};
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
}

fn top3(
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
            frames: stack_frames(sym, stacks, s.stack)
                .iter()
                .rev()
                .map(crate::views::describe)
                .collect(),
        })
        .collect()
}

impl Capture {
    /// Checks `budget`. Peak and leaks come from one replay; the allocated view is read again
    /// only when a total limit is exceeded (for its top stacks).
    pub fn check(&self, budget: &Budget, sym: &mut Symbolizer) -> Vec<LimitResult> {
        let (r, stacks, errors) = self.replay_into(Replay::tracking_sites(), u64::MAX);
        let s = self.summarize(&r, errors);
        let mut out = Vec::new();
        let mut push = |name, unit, limit: Option<u64>, measured: u64| {
            if let Some(limit) = limit {
                out.push(LimitResult {
                    name,
                    unit,
                    limit,
                    measured,
                    exceeded: measured > limit,
                    top: Vec::new(),
                });
            }
        };
        push("max_peak", "bytes", budget.max_peak, s.peak_bytes);
        push("max_leaked", "bytes", budget.max_leaked, s.leaked_bytes);
        push(
            "max_leaked_allocations",
            "allocations",
            budget.max_leaked_allocations,
            s.leaked_allocations,
        );
        push(
            "max_allocations",
            "allocations",
            budget.max_allocations,
            s.total_allocations,
        );
        push("max_total", "bytes", budget.max_total, s.total_bytes);
        let mut allocated = None;
        for l in out.iter_mut().filter(|l| l.exceeded) {
            let by_count = l.unit == "allocations";
            l.top = match l.name {
                "max_peak" => top3(&r.peak_by_stack(), &stacks, sym, false),
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
