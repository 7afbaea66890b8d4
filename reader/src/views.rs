//! Views of a capture for reports: what was live at the peak, live at exit, or ever allocated,
//! grouped by stack; and folded stacks for flamegraphs.

use crate::capture::Capture;
use crate::replay::SiteTotal;
use crate::stacks::StackTable;
use crate::symbols::Symbolizer;
use memtrack_format::EventKind;

/// Which allocations a report covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Live at the high-water mark.
    Peak,
    /// Left by the program: live when a Python program's own code ended and interpreter
    /// shutdown began ([`Capture::python_end`]); for any other program live at exit (at the
    /// cut-off for an incomplete capture).
    Leaks,
    /// Live at exit (at the cut-off for an incomplete capture), Python or not.
    LeaksAtExit,
    /// Everything ever allocated.
    Allocated,
    /// Allocations freed again before the same thread allocated anything else.
    Temporary,
    /// Mapped memory (`mmap`, not heap) held at its own peak (`--mapped`).
    Mapped,
    /// Mapped memory still mapped at exit (`--mapped --leaks`).
    MappedLeaks,
    /// Every mapping made (`--mapped --allocated`).
    MappedAllocated,
}

impl View {
    pub fn name(self) -> &'static str {
        match self {
            View::Peak => "peak",
            View::Leaks => "leaks",
            View::LeaksAtExit => "leaks-at-exit",
            View::Allocated => "allocated",
            View::Temporary => "temporary",
            View::Mapped => "mapped",
            View::MappedLeaks => "mapped-leaks",
            View::MappedAllocated => "mapped-allocated",
        }
    }

    /// What the view counts: "allocation", or "mapping" for mapped memory.
    pub fn unit(self) -> &'static str {
        if self.is_mapped() {
            "mapping"
        } else {
            "allocation"
        }
    }

    /// True for the views of mapped memory rather than the heap.
    pub fn is_mapped(self) -> bool {
        matches!(
            self,
            View::Mapped | View::MappedLeaks | View::MappedAllocated
        )
    }
}

/// A view's allocations grouped by stack, largest first.
pub struct ViewSites {
    pub view: View,
    pub sites: Vec<SiteTotal>,
    pub stacks: StackTable,
    pub bytes: u64,
    pub allocations: u64,
    /// In a window of time: when what the view holds was live (`--at`'s moment, the time of
    /// `--between`'s high-water mark), in seconds since the launched process started.
    pub at_seconds: Option<f64>,
    /// False when the capture kept no block's size (an aggregated capture's per-stack
    /// figures): the sites' largest allocation is unknown, not 0.
    pub block_sizes_known: bool,
}

impl ViewSites {
    /// A view of these sites; its totals are their sums.
    pub fn new(view: View, sites: Vec<SiteTotal>, stacks: StackTable) -> Self {
        let bytes = sites.iter().map(|s| s.bytes).sum();
        let allocations = sites.iter().map(|s| s.allocations).sum();
        ViewSites {
            view,
            sites,
            stacks,
            bytes,
            allocations,
            at_seconds: None,
            block_sizes_known: true,
        }
    }
}

impl Capture {
    /// Like [`Capture::view`], with the largest single allocation of every site (the peak view
    /// then replays twice: once to find the peak, once up to it).
    pub fn view_with_max(&self, view: View) -> ViewSites {
        if view != View::Peak || self.aggregated() {
            return self.view(view);
        }
        let crate::Replayed { replay: whole, .. } = self.replay();
        let crate::Replayed {
            replay: r, stacks, ..
        } = self.replay_until(whole.peak_seq);
        if self.sampled() {
            // The peak's figures are the measuring half's (`Replay::peak_by_stack`); the live
            // set there gives each stack's largest sampled block.
            let largest: std::collections::HashMap<u32, u64> = r
                .live_by_stack()
                .into_iter()
                .map(|s| (s.stack, s.max))
                .collect();
            let mut v = self.view(view);
            for s in &mut v.sites {
                s.max = largest.get(&s.stack).copied().unwrap_or(0);
            }
            return v;
        }
        ViewSites::new(view, r.live_by_stack(), stacks)
    }

    /// Computes a view in one pass (the peak view without per-site maxima).
    pub fn view(&self, view: View) -> ViewSites {
        let (sites, stacks) = match view {
            View::Leaks => {
                let crate::Replayed {
                    replay: r, stacks, ..
                } = self.replay_until(self.leaks_seq());
                (r.live_by_stack(), stacks)
            }
            View::LeaksAtExit => {
                let crate::Replayed {
                    replay: r, stacks, ..
                } = self.replay();
                (r.live_by_stack(), stacks)
            }
            View::Peak => {
                let crate::Replayed {
                    replay: r, stacks, ..
                } = self.replay_into(crate::Replay::tracking_sites(), u64::MAX);
                (r.peak_by_stack(), stacks)
            }
            View::Temporary => return self.stats().temporary,
            View::Mapped | View::MappedLeaks => {
                let crate::Replayed {
                    replay: r, stacks, ..
                } = self.replay();
                let sites = if view == View::Mapped {
                    r.mapped.peak_by_stack()
                } else {
                    r.mapped.live_by_stack()
                };
                (sites, stacks)
            }
            View::MappedAllocated => {
                let mut stacks = StackTable::default();
                let mut sums = crate::replay::SiteSums::default();
                self.with_events(&mut stacks, |events| {
                    events.for_each_while(|ev| {
                        match ev.kind {
                            EventKind::Map { size, stack, .. }
                            | EventKind::Remap { size, stack, .. } => sums.add(stack, size),
                            _ => {}
                        }
                        true
                    })
                });
                (sums.into_sorted(), stacks)
            }
            View::Allocated if self.aggregated() => {
                let crate::Replayed {
                    replay: r, stacks, ..
                } = self.replay();
                (r.allocated_sites().unwrap_or_default(), stacks)
            }
            View::Allocated => {
                let mut stacks = StackTable::default();
                let mut sums = crate::replay::SiteSums::default();
                self.with_events(&mut stacks, |events| {
                    events.for_each_while(|ev| {
                        if let EventKind::Alloc { size, stack, .. } = ev.kind {
                            let (bytes, count) = self.weighed(size);
                            sums.add_weighted(stack, bytes, count, size);
                        }
                        true
                    })
                });
                (sums.into_sorted(), stacks)
            }
        };
        let mut v = ViewSites::new(view, sites, stacks);
        v.block_sizes_known = !self.aggregated();
        v
    }
}

impl ViewSites {
    /// Folded stacks (`root;...;leaf bytes`), one line per distinct function path, sorted. Frames
    /// are their [labels](crate::Frame::label): function names, inlined frames included, and Python
    /// frames with their file and line.
    pub fn folded(&self, sym: &mut Symbolizer) -> Vec<(String, u64)> {
        // Summed by path in a hash map, sorted once at the end.
        let mut by: std::collections::HashMap<String, u64> = Default::default();
        let mut path = String::new();
        for site in &self.sites {
            path.clear();
            sym.for_each_frame(&self.stacks, site.stack, |f| {
                if !path.is_empty() {
                    path.push(';');
                }
                // `;` separates frames in the folded format.
                let label = f.label();
                if label.contains(';') {
                    path.push_str(&label.replace(';', ":"));
                } else {
                    path.push_str(&label);
                }
            });
            if path.is_empty() {
                path.push_str("[unknown]");
            }
            match by.get_mut(path.as_str()) {
                Some(b) => *b += site.bytes,
                None => {
                    by.insert(path.clone(), site.bytes);
                }
            }
        }
        let mut out: Vec<(String, u64)> = by.into_iter().filter(|(_, b)| *b > 0).collect();
        out.sort_unstable();
        out
    }
}

/// How `table` groups allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// The function that called the allocator (`operator new` frames skipped).
    Function,
    /// That function and the file:line of the call.
    Line,
    /// The whole stack.
    Stack,
}

/// One row of a ranked table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TableRow {
    pub total_bytes: u64,
    /// The largest single allocation; None (JSON null) where the capture kept no block's size
    /// (aggregated).
    pub max_bytes: Option<u64>,
    pub avg_bytes: u64,
    pub count: u64,
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The stack, outermost first (for `Stack` grouping; the allocating frame otherwise).
    pub stack: Vec<String>,
    /// In a report on a process tree: the process the row belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// Rows being summed, by key.
type Rows = std::collections::HashMap<String, TableRow>;

/// Adds a site to the row `key`, which is made from `f` (the allocating frame) if new.
fn add_to_row(
    rows: &mut Rows,
    key: String,
    f: &crate::Frame,
    with_location: bool,
    stack: Vec<String>,
    site: &SiteTotal,
) {
    let row = rows.entry(key).or_insert_with(|| TableRow {
        total_bytes: 0,
        max_bytes: Some(0),
        avg_bytes: 0,
        count: 0,
        function: f.function.clone(),
        file: if with_location { f.file.clone() } else { None },
        line: if with_location { f.line } else { None },
        stack,
        pid: None,
    });
    row.total_bytes += site.bytes;
    row.count += site.allocations;
    row.max_bytes = row.max_bytes.map(|m| m.max(site.max));
}

/// The rows with their averages, largest total first.
fn ranked(rows: Rows) -> Vec<TableRow> {
    let mut out: Vec<TableRow> = rows.into_values().collect();
    for r in &mut out {
        r.avg_bytes = r.total_bytes.checked_div(r.count).unwrap_or(0);
    }
    out.sort_by(|a, b| {
        b.total_bytes
            .cmp(&a.total_bytes)
            .then(a.stack.cmp(&b.stack))
    });
    out
}

/// Frames that only pass an allocation on (C++ `operator new`, libc's strdup family, the Rust
/// standard library's allocation paths: `Vec::with_capacity`, `RawVec` growth, `__rust_alloc`):
/// reports name their caller as the allocating function.
pub(crate) fn is_allocator_wrapper(f: &crate::Frame) -> bool {
    let function = f.function.as_str();
    if function.starts_with("operator new") {
        return true;
    }
    // Rust: the allocator shims, and any frame of the standard library's sources (inlined
    // frames there carry short names such as `with_capacity<u8>`, so the file tells).
    if [
        "__rust_",
        "__rustc::",
        "__rg_",
        "__rdl_",
        "alloc::",
        "<alloc::",
        "<memtrack_tracker::",
    ]
    .iter()
    .any(|p| function.starts_with(p))
    {
        return true;
    }
    if let Some(file) = &f.file {
        if [
            "/library/alloc/src/",
            "/library/core/src/",
            "/library/std/src/",
        ]
        .iter()
        .any(|d| file.contains(d))
        {
            return true;
        }
    }
    // glibc's internal aliases: __GI___strdup, __strdup, ...
    let bare = function.trim_start_matches("__GI_").trim_start_matches('_');
    matches!(bare, "strdup" | "strndup" | "wcsdup")
}

/// The innermost Python frame of a stack, when it has any.
fn python_allocator(sym: &mut Symbolizer, stacks: &StackTable, stack: u32) -> Option<crate::Frame> {
    // Leaf first: the first Python frame is the innermost.
    let first = stacks
        .frames(stack)
        .into_iter()
        .find(|&a| memtrack_format::pyframe::is_python(a))?;
    sym.frames(first).last().cloned()
}

/// `function (file:line)`, or the function alone when the location is unknown.
pub(crate) fn describe(f: &crate::Frame) -> String {
    match f.location() {
        Some(l) => format!("{} ({l})", f.function),
        None => f.function.clone(),
    }
}

impl ViewSites {
    /// The view's allocations grouped and ranked by total bytes.
    pub fn table(&self, sym: &mut Symbolizer, by: GroupBy) -> Vec<TableRow> {
        let mut rows = table_rows(&self.sites, &self.stacks, sym, by);
        if !self.block_sizes_known {
            rows.iter_mut().for_each(|r| r.max_bytes = None);
        }
        rows
    }
}

/// `sites` (stacks of `stacks`) grouped and ranked by total bytes, as `memtrack table` shows them.
pub(crate) fn table_rows(
    sites: &[SiteTotal],
    stacks: &StackTable,
    sym: &mut Symbolizer,
    by: GroupBy,
) -> Vec<TableRow> {
    let mut rows = Rows::default();
    for site in sites {
        // Failing that, the innermost frame.
        let alloc = allocating_frame(sym, stacks, site.stack)
            .or_else(|| {
                let leaf = *stacks.frames(site.stack).first()?;
                sym.frames(leaf).last().cloned()
            })
            .unwrap_or_else(|| crate::Frame::native("[unknown]"));
        // Whole stacks (the costly part: deep ones, each frame's names copied) only when
        // they are the key.
        let (key, stack) = match by {
            // A Python function is known by its file too (`<module>` of each file apart).
            GroupBy::Function if alloc.python => {
                let f = crate::Frame {
                    line: None,
                    ..alloc.clone()
                };
                let label = f.label().into_owned();
                add_to_row(&mut rows, label.clone(), &f, true, vec![label], site);
                continue;
            }
            GroupBy::Function => (alloc.function.clone(), vec![alloc.function.clone()]),
            GroupBy::Line => (describe(&alloc), vec![describe(&alloc)]),
            GroupBy::Stack => {
                let frames = sym.stack_frames(stacks, site.stack);
                let s: Vec<String> = frames.iter().map(describe).collect();
                (s.join(";"), s)
            }
        };
        add_to_row(&mut rows, key, &alloc, by != GroupBy::Function, stack, site);
    }
    ranked(rows)
}

/// The allocating frame of a stack: its innermost Python frame when the interpreter was running
/// (the native frames below it are the interpreter's or an extension's); else its innermost
/// frame past operator new / new[] and the other allocator wrappers. Symbolizes only the frames
/// it looks at, not the whole stack.
pub(crate) fn allocating_frame(
    sym: &mut Symbolizer,
    stacks: &StackTable,
    stack: u32,
) -> Option<crate::Frame> {
    if let Some(f) = python_allocator(sym, stacks, stack) {
        return Some(f);
    }
    // Innermost first; inlined frames of one address come outermost first, so look from the
    // back of each address's list. A frame whose machine code only passes the allocation on
    // (jq's jv_mem_alloc, git's xmalloc, g_malloc: see `Symbolizer::is_wrapper_at`) is skipped
    // whole, as are frames named by `--skip-function`.
    let mut inner = None;
    for a in stacks.frames(stack) {
        if !sym.is_wrapper_at(a, inner) {
            let frames = sym.frames(a);
            if let Some(f) = frames
                .iter()
                .rev()
                .find(|f| !is_allocator_wrapper(f) && !sym.skips(&f.function))
            {
                return Some(f.clone());
            }
        }
        inner = Some(a);
    }
    None
}

impl ViewSites {
    /// The `n` locations (allocating function and file:line) that hold the most bytes in a view.
    /// Only each stack's allocating frame is symbolized (not whole stacks).
    pub fn top_locations(&self, sym: &mut Symbolizer, n: usize) -> Vec<TableRow> {
        let mut rows = Rows::default();
        for site in &self.sites {
            let f = allocating_frame(sym, &self.stacks, site.stack)
                .unwrap_or_else(|| crate::Frame::native("[unknown]"));
            let key = describe(&f);
            add_to_row(&mut rows, key.clone(), &f, true, vec![key], site);
        }
        let mut out = ranked(rows);
        out.truncate(n);
        if !self.block_sizes_known {
            out.iter_mut().for_each(|r| r.max_bytes = None);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::is_allocator_wrapper;

    #[test]
    fn wrappers_are_recognised_and_callers_are_not() {
        let frame = |function: &str, file: Option<&str>| crate::Frame {
            function: function.to_string(),
            file: file.map(str::to_string),
            line: None,
            python: false,
        };
        for w in [
            "operator new(unsigned long)",
            "operator new[](unsigned long)",
            "__GI___strdup",
            "strdup",
            "__strndup",
            "__rust_alloc",
            "__rg_realloc",
            "alloc::raw_vec::RawVecInner<A>::finish_grow",
            "<alloc::alloc::Global as core::alloc::Allocator>::allocate",
            "__rustc::__rust_alloc",
            "<memtrack_tracker::global::Tracker<A> as core::alloc::global::GlobalAlloc>::alloc",
        ] {
            assert!(is_allocator_wrapper(&frame(w, None)), "{w}");
        }
        let std_file =
            "/rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/alloc/src/vec/mod.rs";
        assert!(is_allocator_wrapper(&frame(
            "with_capacity<u8>",
            Some(std_file)
        )));
        for f in [
            "audit_admin",
            "make_value",
            "strdup_config",
            "malloc",
            "calloc",
            "app::alloc_table",
        ] {
            assert!(
                !is_allocator_wrapper(&frame(f, Some("/src/app/main.rs"))),
                "{f}"
            );
        }
    }
}
