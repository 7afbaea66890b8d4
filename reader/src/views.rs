//! Views of a capture for reports: what was live at the peak, live at exit, or ever allocated,
//! grouped by stack; and folded stacks for flamegraphs.

use crate::capture::{Capture, EventKind};
use crate::replay::SiteTotal;
use crate::stacks::StackTable;
use crate::symbols::{stack_frames, Symbolizer};
use memtrack_format::hash::FastMap;

/// Which allocations a report covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Live at the high-water mark.
    Peak,
    /// Live at exit (at the cut-off for an incomplete capture).
    Leaks,
    /// Everything ever allocated.
    Allocated,
}

impl View {
    pub fn name(self) -> &'static str {
        match self {
            View::Peak => "peak",
            View::Leaks => "leaks",
            View::Allocated => "allocated",
        }
    }
}

/// A view's allocations grouped by stack, largest first.
pub struct ViewSites {
    pub view: View,
    pub sites: Vec<SiteTotal>,
    pub stacks: StackTable,
    pub bytes: u64,
    pub allocations: u64,
}

impl Capture {
    /// Computes a view. `Peak` replays twice: once to find the peak, once up to it.
    pub fn view(&self, view: View) -> ViewSites {
        let (sites, stacks) = match view {
            View::Leaks => {
                let (r, stacks, _) = self.replay();
                (r.live_by_stack(), stacks)
            }
            View::Peak => {
                let (r, stacks, _) = self.replay_into(crate::Replay::tracking_sites(), u64::MAX);
                (r.peak_by_stack(), stacks)
            }
            View::Allocated => {
                let mut stacks = StackTable::default();
                let mut by: FastMap<u32, SiteTotal> = FastMap::default();
                for ev in self.events(&mut stacks) {
                    if let EventKind::Alloc { size, stack, .. } = ev.kind {
                        let e = by.entry(stack).or_insert(SiteTotal {
                            stack,
                            ..Default::default()
                        });
                        e.bytes = e.bytes.saturating_add(size);
                        e.allocations += 1;
                    }
                }
                let mut v: Vec<SiteTotal> = by.into_values().collect();
                v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack.cmp(&b.stack)));
                (v, stacks)
            }
        };
        let bytes = sites.iter().map(|s| s.bytes).sum();
        let allocations = sites.iter().map(|s| s.allocations).sum();
        ViewSites {
            view,
            sites,
            stacks,
            bytes,
            allocations,
        }
    }
}

/// Folded stacks (`root;...;leaf bytes`), one line per distinct function path, sorted. Frames
/// are function names, inlined frames included.
pub fn folded(v: &ViewSites, sym: &mut Symbolizer) -> Vec<(String, u64)> {
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    for site in &v.sites {
        let frames = stack_frames(sym, &v.stacks, site.stack);
        let path = if frames.is_empty() {
            "[unknown]".to_string()
        } else {
            frames
                .iter()
                // `;` separates frames in the folded format.
                .map(|f| f.function.replace(';', ":"))
                .collect::<Vec<_>>()
                .join(";")
        };
        *by.entry(path).or_default() += site.bytes;
    }
    by.into_iter().filter(|(_, b)| *b > 0).collect()
}
