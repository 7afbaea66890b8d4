//! Regions: named spans of one thread's execution (`memtrack_region_begin`/`_end`), with what
//! each occurrence allocated, kept, and added at its own high-water mark; aggregated per region
//! path for `memtrack regions`, and region-made blocks for the `--region` views.
//!
//! One occurrence is one begin..end on one thread; "own" allocations are those the thread made
//! while the occurrence was open (nested occurrences included: an allocation counts for every
//! occurrence open on its thread). A begin without its end is closed at its thread's last event
//! (the occurrence is flagged `closed: false`).

use crate::capture::{Capture, Event};
use crate::replay::{Replay, SiteSums, SiteTotal};
use crate::stacks::StackTable;
use crate::views::{TableRow, View, ViewSites};
use memtrack_format::EventKind;

type Map<K, V> = memtrack_format::hash::FastMap<K, V>;

/// One begin..end of a region on one thread.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Occurrence {
    pub region: u32,
    /// The region's name.
    pub name: String,
    /// The names of the enclosing occurrences on the thread and its own, joined by `/`.
    pub path: String,
    pub tid: u32,
    /// The enclosing occurrence on the same thread (an index into [`Regions::occurrences`]).
    pub parent: Option<usize>,
    pub begin_seq: u64,
    pub end_seq: u64,
    /// Clock units since the capture started.
    pub begin_time: u64,
    pub end_time: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    /// Own allocations still live at the end (frees by any thread count).
    pub retained_bytes: u64,
    /// High-water mark of own live bytes during the occurrence.
    pub peak_growth_bytes: u64,
    /// The sequence number at which own live bytes first reached `peak_growth_bytes` (the
    /// begin's when the occurrence never held anything).
    pub peak_seq: u64,
    /// The process's heap high-water mark (all threads) while the occurrence was open.
    pub heap_peak_bytes: u64,
    /// False for an occurrence closed by the reader at its thread's last event.
    pub closed: bool,
}

/// Every occurrence of a capture, in the order they began.
#[derive(Clone, Debug, Default)]
pub struct Regions {
    pub occurrences: Vec<Occurrence>,
    /// Ends without a begin on their thread (ignored).
    pub unmatched_ends: u64,
}

/// The figures of one region path (or of one name, for `check --region`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RegionFigures {
    /// The last element of `path`.
    pub name: String,
    pub path: String,
    pub occurrences: u64,
    /// Largest over occurrences.
    pub peak_growth_bytes: u64,
    /// Mean of the occurrences' peak growth (rounded down).
    pub avg_growth_bytes: u64,
    /// Largest over occurrences.
    pub heap_peak_bytes: u64,
    /// Sums over occurrences.
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub retained_bytes: u64,
    pub total_seconds: f64,
    pub max_seconds: f64,
    /// The three allocating locations holding the most of the largest occurrence's own live
    /// bytes at its peak (filled by the report, which symbolizes).
    pub top_locations: Vec<TableRow>,
    /// Nesting depth: 0 for a region opened outside any other.
    pub depth: usize,
    /// Occurrences left open (closed by the reader at their thread's last event).
    pub unclosed: u64,
    /// The occurrence with the largest peak growth (the first of equals): an index into
    /// [`Regions::occurrences`].
    #[serde(skip)]
    pub largest: usize,
}

/// What `--sort` orders `memtrack regions` by (largest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionSort {
    Peak,
    Allocated,
    Retained,
    Count,
    Time,
}

/// An own block: its size and the innermost occurrence open on its thread when it was made.
#[derive(Clone, Copy)]
struct Owned {
    size: u64,
    occ: usize,
}

/// An occurrence's figures as they were at its thread's last event `tseq`, kept when another
/// thread changes them afterwards (for an occurrence the reader closes there).
#[derive(Clone, Copy, Default)]
struct Snap {
    tseq: u64,
    own_live: u64,
    heap_peak: u64,
}

#[derive(Default)]
struct ThreadState {
    open: Vec<usize>,
    last_seq: u64,
    last_time: u64,
}

#[derive(Default)]
struct Builder {
    occ: Vec<Occurrence>,
    own_live: Vec<u64>,
    open: Vec<bool>,
    snap: Vec<Option<Snap>>,
    /// Open occurrences of every thread.
    all_open: Vec<usize>,
    /// At most the smallest heap peak among `all_open`: while the heap is no larger, no open
    /// occurrence's heap peak changes (so most events skip them).
    heap_floor: u64,
    threads: Map<u32, ThreadState>,
    owned: Map<u64, Owned>,
    pending_realloc: Map<u32, (u64, Owned)>,
    unmatched_ends: u64,
}

impl Builder {
    /// Keeps `o`'s figures as of its thread's last event before an event of another thread
    /// changes them.
    fn snap_before_change(&mut self, o: usize, by_tid: u32) {
        let tid = self.occ[o].tid;
        if tid == by_tid {
            return;
        }
        let tseq = self.threads.get(&tid).map_or(0, |t| t.last_seq);
        if self.snap[o].is_none_or(|s| s.tseq != tseq) {
            self.snap[o] = Some(Snap {
                tseq,
                own_live: self.own_live[o],
                heap_peak: self.occ[o].heap_peak_bytes,
            });
        }
    }

    /// Adds (or removes) `size` bytes to the open occurrences of the chain from `occ` out.
    fn own_change(&mut self, occ: usize, size: u64, add: bool, ev: &Event) {
        let mut at = Some(occ);
        while let Some(o) = at {
            at = self.occ[o].parent;
            if !self.open[o] {
                continue;
            }
            self.snap_before_change(o, ev.tid);
            if add {
                self.own_live[o] = self.own_live[o].saturating_add(size);
                if self.own_live[o] > self.occ[o].peak_growth_bytes {
                    self.occ[o].peak_growth_bytes = self.own_live[o];
                    self.occ[o].peak_seq = ev.seq;
                }
            } else {
                self.own_live[o] = self.own_live[o].saturating_sub(size);
            }
        }
    }

    fn remove_block(&mut self, addr: u64, ev: &Event) -> Option<Owned> {
        let b = self.owned.remove(&addr)?;
        self.own_change(b.occ, b.size, false, ev);
        Some(b)
    }

    fn close(&mut self, o: usize, seq: u64, time: u64, closed: bool) {
        let tseq = self.threads.get(&self.occ[o].tid).map_or(0, |t| t.last_seq);
        let (own, heap) = match self.snap[o] {
            Some(s) if !closed && s.tseq == tseq => (s.own_live, s.heap_peak),
            _ => (self.own_live[o], self.occ[o].heap_peak_bytes),
        };
        let occ = &mut self.occ[o];
        occ.end_seq = seq;
        occ.end_time = time;
        occ.retained_bytes = own;
        occ.heap_peak_bytes = heap;
        occ.closed = closed;
        self.open[o] = false;
        if let Some(i) = self.all_open.iter().position(|&x| x == o) {
            self.all_open.swap_remove(i);
        }
    }

    /// Closes every open occurrence at its thread's last event.
    fn close_all_open(&mut self) {
        let mut tids: Vec<u32> = self.threads.keys().copied().collect();
        tids.sort_unstable();
        for tid in tids {
            let t = self.threads.get_mut(&tid).expect("listed");
            let open = std::mem::take(&mut t.open);
            let (seq, time) = (t.last_seq, t.last_time);
            for &o in open.iter().rev() {
                self.close(o, seq, time, false);
            }
        }
    }

    fn event(
        &mut self,
        ev: &Event,
        live_bytes: u64,
        names: &std::collections::HashMap<u32, String>,
    ) {
        if ev.kind.is_mapped() {
            // Mapped memory is not the heap regions measure.
            return;
        }
        let t = self.threads.entry(ev.tid).or_default();
        t.last_seq = ev.seq;
        t.last_time = ev.time;
        match ev.kind {
            EventKind::RegionBegin { region } => {
                let parent = t.open.last().copied();
                let name = names
                    .get(&region)
                    .cloned()
                    .unwrap_or_else(|| format!("region#{region}"));
                let path = match parent {
                    Some(p) => format!("{}/{name}", self.occ[p].path),
                    None => name.clone(),
                };
                let o = self.occ.len();
                t.open.push(o);
                self.occ.push(Occurrence {
                    region,
                    name,
                    path,
                    tid: ev.tid,
                    parent,
                    begin_seq: ev.seq,
                    end_seq: ev.seq,
                    begin_time: ev.time,
                    end_time: ev.time,
                    allocated_bytes: 0,
                    allocations: 0,
                    retained_bytes: 0,
                    peak_growth_bytes: 0,
                    peak_seq: ev.seq,
                    heap_peak_bytes: live_bytes,
                    closed: true,
                });
                self.own_live.push(0);
                self.open.push(true);
                self.snap.push(None);
                self.all_open.push(o);
                self.heap_floor = self.heap_floor.min(live_bytes);
                return;
            }
            EventKind::RegionEnd => {
                match t.open.pop() {
                    Some(o) => self.close(o, ev.seq, ev.time, true),
                    None => self.unmatched_ends += 1,
                }
                return;
            }
            EventKind::Map { .. } | EventKind::Unmap { .. } | EventKind::Remap { .. } => return,
            EventKind::Alloc {
                kind, addr, size, ..
            } => {
                let innermost = t.open.last().copied();
                if kind.is_realloc() {
                    self.pending_realloc.remove(&ev.tid);
                }
                self.remove_block(addr, ev);
                if let Some(occ) = innermost {
                    self.owned.insert(addr, Owned { size, occ });
                    let mut at = Some(occ);
                    while let Some(o) = at {
                        let c = &mut self.occ[o];
                        c.allocated_bytes = c.allocated_bytes.saturating_add(size);
                        c.allocations += 1;
                        at = c.parent;
                    }
                    self.own_change(occ, size, true, ev);
                }
            }
            EventKind::Free { addr } => {
                self.remove_block(addr, ev);
            }
            EventKind::ReallocFree { addr } => {
                if let Some(b) = self.remove_block(addr, ev) {
                    self.pending_realloc.insert(ev.tid, (addr, b));
                }
            }
            EventKind::ReallocFailed => {
                if let Some((addr, b)) = self.pending_realloc.remove(&ev.tid) {
                    self.owned.insert(addr, b);
                    self.own_change(b.occ, b.size, true, ev);
                }
            }
        }
        // The heap's high-water mark of every open occurrence.
        if live_bytes <= self.heap_floor {
            return;
        }
        let mut floor = u64::MAX;
        for i in 0..self.all_open.len() {
            let o = self.all_open[i];
            if live_bytes > self.occ[o].heap_peak_bytes {
                self.snap_before_change(o, ev.tid);
                self.occ[o].heap_peak_bytes = live_bytes;
            }
            floor = floor.min(self.occ[o].heap_peak_bytes);
        }
        self.heap_floor = floor;
    }

    /// An exec replaced the program image: its heap is gone, its threads with it.
    fn exec_reset(&mut self) {
        self.close_all_open();
        self.owned.clear();
        self.pending_realloc.clear();
    }
}

impl Capture {
    /// Every region occurrence with its figures, in one replay (the heap's high-water marks are
    /// the replay's, as in `summary`).
    pub fn regions(&self) -> Regions {
        let mut b = Builder::default();
        let mut boundaries = self.exec_boundaries.iter().copied().peekable();
        self.replay_with(Replay::new(), u64::MAX, |r, ev| {
            while boundaries.next_if(|&x| ev.seq >= x).is_some() {
                b.exec_reset();
            }
            b.event(ev, r.live_bytes, &self.region_names);
        });
        b.close_all_open();
        Regions {
            occurrences: b.occ,
            unmatched_ends: b.unmatched_ends,
        }
    }

    /// For each occurrence in `occs` (indexes into `regions`), its own blocks live at its
    /// peak (`peak_seq`), grouped by stack, largest first; and the stack table. One replay for
    /// all of them.
    pub fn held_at_peaks(
        &self,
        regions: &Regions,
        occs: &[usize],
    ) -> (Vec<Vec<SiteTotal>>, StackTable) {
        let targets: Vec<&Occurrence> = occs.iter().map(|&i| &regions.occurrences[i]).collect();
        let mut held: Vec<Held> = targets.iter().map(|_| Held::default()).collect();
        let mut out: Vec<Vec<SiteTotal>> = vec![Vec::new(); targets.len()];
        let until = targets.iter().map(|t| t.peak_seq).max().unwrap_or(0);
        let mut stacks = StackTable::default();
        let mut boundaries = self.exec_boundaries.iter().copied().peekable();
        // Only the targets between their begin and their peak look at events.
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_by_key(|&i| targets[i].begin_seq);
        let mut order = order.into_iter().peekable();
        let mut active: Vec<usize> = Vec::new();
        if !targets.is_empty() {
            self.with_events(&mut stacks, |events| {
                events.for_each_while(|ev| {
                    if ev.seq > until {
                        return false;
                    }
                    while boundaries.next_if(|&x| ev.seq >= x).is_some() {
                        for &i in &active {
                            held[i] = Held::default();
                        }
                    }
                    while let Some(i) = order.next_if(|&i| targets[i].begin_seq <= ev.seq) {
                        active.push(i);
                    }
                    for &i in &active {
                        held[i].event(ev, ev.tid == targets[i].tid);
                    }
                    active.retain(|&i| {
                        if targets[i].peak_seq > ev.seq {
                            return true;
                        }
                        out[i] = std::mem::take(&mut held[i]).by_stack();
                        false
                    });
                    true
                });
            });
        }
        (out, stacks)
    }

    /// Whether some region is named `name`, or `name` is a path `a/b` of region names.
    fn region_matches(&self, name: &str) -> bool {
        self.region_names.values().any(|n| n == name)
            || (name.contains('/')
                && name
                    .split('/')
                    .all(|part| self.region_names.values().any(|n| n == part)))
    }

    /// The region names of the capture, sorted.
    pub fn region_name_list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.region_names.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }

    /// Checks that `name` is a region of this capture: an error naming the capture and the
    /// regions it has otherwise.
    pub fn check_region(&self, name: &str) -> Result<(), String> {
        if self.region_matches(name) {
            return Ok(());
        }
        let names = self.region_name_list();
        Err(if names.is_empty() {
            format!(
                "{}: no region named {name:?}: the capture has no regions",
                self.path().display()
            )
        } else {
            format!(
                "{}: no region named {name:?} (its regions: {})",
                self.path().display(),
                names.join(", ")
            )
        })
    }

    /// `view` restricted to the allocations made inside occurrences of the region `name` (a
    /// name, or a path `a/b`): the peak view is the region-made blocks live at the peak of its
    /// largest occurrence; leaks, those live at exit (or where `--leaks` looks); allocated,
    /// every region-made allocation. The temporary view is not defined for a region (empty).
    pub fn region_view(&self, view: View, name: &str) -> ViewSites {
        let matches = |o: &Occurrence| o.name == name || o.path == name;
        let until = match view {
            View::Peak => {
                let regions = self.regions();
                let largest = regions.occurrences.iter().filter(|o| matches(o)).fold(
                    None::<&Occurrence>,
                    |best, o| match best {
                        Some(b) if b.peak_growth_bytes >= o.peak_growth_bytes => Some(b),
                        _ => Some(o),
                    },
                );
                match largest {
                    Some(o) => o.peak_seq,
                    None => return ViewSites::new(view, Vec::new(), StackTable::default()),
                }
            }
            View::Leaks => self.leaks_seq(),
            View::LeaksAtExit | View::Allocated => u64::MAX,
            // Not defined for a region (the CLI refuses them with --region).
            View::Temporary | View::Mapped | View::MappedLeaks | View::MappedAllocated => {
                return ViewSites::new(view, Vec::new(), StackTable::default());
            }
        };
        let mut stacks = StackTable::default();
        let mut held = Held::default();
        let mut sums = SiteSums::default();
        // Per thread: for each open occurrence, its path and whether it is one of `name`.
        let mut open: Map<u32, Vec<(String, bool)>> = Map::default();
        let mut boundaries = self.exec_boundaries.iter().copied().peekable();
        self.with_events(&mut stacks, |events| {
            events.for_each_while(|ev| {
                if ev.seq > until {
                    return false;
                }
                while boundaries.next_if(|&x| ev.seq >= x).is_some() {
                    held = Held::default();
                    open.clear();
                }
                let stack = open.entry(ev.tid).or_default();
                match ev.kind {
                    EventKind::RegionBegin { region } => {
                        let n = self
                            .region_names
                            .get(&region)
                            .cloned()
                            .unwrap_or_else(|| format!("region#{region}"));
                        let path = match stack.last() {
                            Some((p, _)) => format!("{p}/{n}"),
                            None => n.clone(),
                        };
                        let inside = n == name || path == name;
                        stack.push((path, inside));
                    }
                    EventKind::RegionEnd => {
                        stack.pop();
                    }
                    _ => {
                        let mine = stack.iter().any(|s| s.1);
                        if mine {
                            if let EventKind::Alloc { size, stack, .. } = ev.kind {
                                sums.add(stack, size);
                            }
                        }
                        held.event(ev, mine);
                    }
                }
                true
            });
        });
        let sites = match view {
            View::Allocated => sums.into_sorted(),
            _ => held.by_stack(),
        };
        ViewSites::new(view, sites, stacks)
    }
}

/// Blocks made by the allocations a caller picks, while they are live.
#[derive(Default)]
pub(crate) struct Held {
    live: Map<u64, (u64, u32)>,
    pending_realloc: Map<u32, (u64, (u64, u32))>,
}

impl Held {
    /// Applies `ev`; `mine`: an allocation it makes is one of these blocks.
    pub(crate) fn event(&mut self, ev: &Event, mine: bool) {
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
                if mine {
                    self.live.insert(addr, (size, stack));
                } else {
                    self.live.remove(&addr);
                }
            }
            EventKind::Free { addr } => {
                self.live.remove(&addr);
            }
            EventKind::ReallocFree { addr } => {
                if let Some(b) = self.live.remove(&addr) {
                    self.pending_realloc.insert(ev.tid, (addr, b));
                }
            }
            EventKind::ReallocFailed => {
                if let Some((addr, b)) = self.pending_realloc.remove(&ev.tid) {
                    self.live.insert(addr, b);
                }
            }
            EventKind::RegionBegin { .. }
            | EventKind::RegionEnd
            | EventKind::Map { .. }
            | EventKind::Unmap { .. }
            | EventKind::Remap { .. } => {}
        }
    }

    pub(crate) fn by_stack(&self) -> Vec<SiteTotal> {
        let mut sums = SiteSums::default();
        for &(size, stack) in self.live.values() {
            sums.add(stack, size);
        }
        sums.into_sorted()
    }
}

impl Regions {
    /// True when the capture marked no region.
    pub fn is_empty(&self) -> bool {
        self.occurrences.is_empty()
    }

    /// The figures of the occurrences `pick` chooses, aggregated (their `name`, `path` and
    /// `depth` are the first one's); `None` when it chooses none.
    pub fn aggregate(
        &self,
        cap: &Capture,
        pick: impl Fn(&Occurrence) -> bool,
    ) -> Option<RegionFigures> {
        let mut f: Option<RegionFigures> = None;
        let mut growth_sum: u128 = 0;
        for (i, o) in self.occurrences.iter().enumerate() {
            if !pick(o) {
                continue;
            }
            let secs = cap.seconds(o.end_time.saturating_sub(o.begin_time));
            let g = f.get_or_insert_with(|| RegionFigures {
                name: o.name.clone(),
                path: o.path.clone(),
                occurrences: 0,
                peak_growth_bytes: 0,
                avg_growth_bytes: 0,
                heap_peak_bytes: 0,
                allocated_bytes: 0,
                allocations: 0,
                retained_bytes: 0,
                total_seconds: 0.0,
                max_seconds: 0.0,
                top_locations: Vec::new(),
                depth: o.path.matches('/').count(),
                unclosed: 0,
                largest: i,
            });
            g.occurrences += 1;
            if o.peak_growth_bytes > g.peak_growth_bytes || g.occurrences == 1 {
                if o.peak_growth_bytes > g.peak_growth_bytes {
                    g.largest = i;
                }
                g.peak_growth_bytes = g.peak_growth_bytes.max(o.peak_growth_bytes);
            }
            growth_sum += o.peak_growth_bytes as u128;
            g.heap_peak_bytes = g.heap_peak_bytes.max(o.heap_peak_bytes);
            g.allocated_bytes = g.allocated_bytes.saturating_add(o.allocated_bytes);
            g.allocations += o.allocations;
            g.retained_bytes = g.retained_bytes.saturating_add(o.retained_bytes);
            g.total_seconds += secs;
            g.max_seconds = g.max_seconds.max(secs);
            g.unclosed += u64::from(!o.closed);
        }
        if let Some(g) = f.as_mut() {
            g.avg_growth_bytes = (growth_sum / g.occurrences as u128) as u64;
        }
        f
    }

    /// One row per region path, in tree order: top-level paths largest first by `sort`, each
    /// followed by its nested paths, ordered the same way.
    pub fn figures(&self, cap: &Capture, sort: RegionSort) -> Vec<RegionFigures> {
        let mut paths: Vec<&str> = self.occurrences.iter().map(|o| o.path.as_str()).collect();
        paths.sort_unstable();
        paths.dedup();
        let all: Vec<RegionFigures> = paths
            .iter()
            .filter_map(|p| self.aggregate(cap, |o| o.path == *p))
            .collect();
        order_rows(all, sort)
    }
}

/// Rows in tree order: top-level paths largest first by `sort`, each followed by its nested
/// paths, ordered the same way.
pub fn order_rows(all: Vec<RegionFigures>, sort: RegionSort) -> Vec<RegionFigures> {
    let key = |f: &RegionFigures| -> (u64, u64) {
        match sort {
            RegionSort::Peak => (f.peak_growth_bytes, f.heap_peak_bytes),
            RegionSort::Allocated => (f.allocated_bytes, f.allocations),
            RegionSort::Retained => (f.retained_bytes, f.peak_growth_bytes),
            RegionSort::Count => (f.occurrences, f.peak_growth_bytes),
            RegionSort::Time => ((f.total_seconds * 1e9) as u64, f.peak_growth_bytes),
        }
    };
    fn parent(path: &str) -> &str {
        path.rsplit_once('/').map_or("", |(p, _)| p)
    }
    let mut out = Vec::with_capacity(all.len());
    // Depth-first from the top level; siblings largest first (ties by path).
    fn walk<'a>(
        all: &'a [RegionFigures],
        under: &str,
        key: &dyn Fn(&RegionFigures) -> (u64, u64),
        out: &mut Vec<&'a RegionFigures>,
    ) {
        let mut kids: Vec<&RegionFigures> =
            all.iter().filter(|f| parent(&f.path) == under).collect();
        kids.sort_by(|a, b| key(b).cmp(&key(a)).then(a.path.cmp(&b.path)));
        for k in kids {
            out.push(k);
            walk(all, &k.path, key, out);
        }
    }
    walk(&all, "", &key, &mut out);
    out.into_iter().cloned().collect()
}

/// The rows of several processes' regions as one report: per path, occurrences, allocations
/// and times add up, peaks are the largest of any process (each process has its own heap),
/// the average growth is over every occurrence, and the top locations are those of the
/// process whose occurrence grew most.
pub fn merge_rows(per_process: Vec<Vec<RegionFigures>>, sort: RegionSort) -> Vec<RegionFigures> {
    let mut by_path: std::collections::BTreeMap<String, (RegionFigures, u128)> =
        std::collections::BTreeMap::new();
    for f in per_process.into_iter().flatten() {
        let growth = f.avg_growth_bytes as u128 * f.occurrences as u128;
        match by_path.get_mut(&f.path) {
            None => {
                by_path.insert(f.path.clone(), (f, growth));
            }
            Some((g, sum)) => {
                *sum += growth;
                if f.peak_growth_bytes > g.peak_growth_bytes {
                    g.peak_growth_bytes = f.peak_growth_bytes;
                    g.top_locations = f.top_locations;
                }
                g.occurrences += f.occurrences;
                g.heap_peak_bytes = g.heap_peak_bytes.max(f.heap_peak_bytes);
                g.allocated_bytes = g.allocated_bytes.saturating_add(f.allocated_bytes);
                g.allocations += f.allocations;
                g.retained_bytes = g.retained_bytes.saturating_add(f.retained_bytes);
                g.total_seconds += f.total_seconds;
                g.max_seconds = g.max_seconds.max(f.max_seconds);
                g.unclosed += f.unclosed;
            }
        }
    }
    let all = by_path
        .into_values()
        .map(|(mut g, sum)| {
            g.avg_growth_bytes = (sum / g.occurrences.max(1) as u128) as u64;
            g
        })
        .collect();
    order_rows(all, sort)
}

/// Limits on one region's figures (`check --region NAME --max-peak ...`); `None` is not
/// checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionBudget {
    /// A region name, or a path `a/b`.
    pub name: String,
    /// On `peak_growth_bytes` (the largest occurrence's).
    pub max_peak: Option<u64>,
    /// On `allocated_bytes` (all occurrences).
    pub max_total: Option<u64>,
    /// On `retained_bytes` (all occurrences).
    pub max_leaked: Option<u64>,
    /// On `allocations` (all occurrences).
    pub max_allocations: Option<u64>,
}

impl Capture {
    /// Checks each region's limits against its figures (every occurrence of the name, or of
    /// the path); an exceeded peak or total names the three largest stacks of the region's
    /// view. A region the capture does not have is an error.
    pub fn check_regions(
        &self,
        budgets: &[RegionBudget],
        sym: &mut crate::Symbolizer,
    ) -> Result<Vec<crate::LimitResult>, String> {
        for b in budgets {
            self.check_region(&b.name)?;
        }
        if budgets.is_empty() {
            return Ok(Vec::new());
        }
        let regions = self.regions();
        let mut out = Vec::new();
        for b in budgets {
            let f = regions.aggregate(self, |o| o.name == b.name || o.path == b.name);
            let figure = |g: fn(&RegionFigures) -> u64| f.as_ref().map_or(0, g);
            for (name, unit, limit, measured) in [
                (
                    "max_peak",
                    "bytes",
                    b.max_peak,
                    figure(|f| f.peak_growth_bytes),
                ),
                (
                    "max_leaked",
                    "bytes",
                    b.max_leaked,
                    figure(|f| f.retained_bytes),
                ),
                (
                    "max_allocations",
                    "allocations",
                    b.max_allocations,
                    figure(|f| f.allocations),
                ),
                (
                    "max_total",
                    "bytes",
                    b.max_total,
                    figure(|f| f.allocated_bytes),
                ),
            ] {
                let Some(limit) = limit else { continue };
                let exceeded = measured > limit;
                let top = match (exceeded, name) {
                    (true, "max_peak") => {
                        // What the occurrence that grew most held at its own peak: the
                        // figure measured, not what earlier occurrences kept.
                        let largest = f.as_ref().map_or(0, |f| f.largest);
                        let (held, stacks) = self.held_at_peaks(&regions, &[largest]);
                        let sites = held.into_iter().next().unwrap_or_default();
                        crate::check::top3(&sites, &stacks, sym, false)
                    }
                    (true, "max_total" | "max_allocations") => {
                        let v = self.region_view(View::Allocated, &b.name);
                        crate::check::top3(&v.sites, &v.stacks, sym, unit == "allocations")
                    }
                    _ => Vec::new(),
                };
                out.push(crate::LimitResult {
                    name,
                    unit,
                    limit,
                    measured,
                    exceeded,
                    top,
                    processes: Vec::new(),
                    lower_bound: None,
                    stderr: None,
                    region: Some(b.name.clone()),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrack_format::{
        encode_stream, put_record, record, AllocKind, ChunkHeader, Header, Item, RegionNameRecord,
    };

    fn alloc(addr: u64, size: u64, stack: u32) -> EventKind {
        EventKind::Alloc {
            kind: AllocKind::Malloc,
            addr,
            size,
            stack,
        }
    }

    fn free(addr: u64) -> EventKind {
        EventKind::Free { addr }
    }

    /// A capture file of these region names and events `(seq, tid, kind)` (time = 10 × seq
    /// milliseconds), each thread's events in chunks split where `splits` says (a seq
    /// starting a new chunk); stack `n` (1..=7) is one frame at 0x1000 × n.
    fn capture(
        name: &str,
        names: &[(u32, &str)],
        events: &[(u64, u32, EventKind)],
        splits: &[u64],
    ) -> Capture {
        let mut file = Header {
            version: memtrack_format::FORMAT_VERSION,
            pid: 4242,
            clock_unit_ns: 1_000_000,
            executable: "/bin/regions".into(),
            argv: vec!["regions".into()],
            pointer_size: 8,
            machine: 62,
            ..Default::default()
        }
        .encode();
        for &(id, n) in names {
            let r = RegionNameRecord {
                id,
                name: n.as_bytes().to_vec(),
            };
            put_record(&mut file, record::REGION_NAME, &r.encode());
        }
        let mut tids: Vec<u32> = events.iter().map(|e| e.1).collect();
        tids.sort_unstable();
        tids.dedup();
        let mut chunks: Vec<(ChunkHeader, Vec<Item>)> = Vec::new();
        for tid in tids {
            let mut cur: Option<(ChunkHeader, Vec<Item>)> = None;
            for &(seq, t, kind) in events.iter().filter(|e| e.1 == tid) {
                if cur.is_some() && splits.contains(&seq) {
                    chunks.extend(cur.take());
                }
                let c = cur.get_or_insert_with(|| {
                    let mut items = Vec::new();
                    if chunks.is_empty() {
                        for n in 1..=7u64 {
                            items.push(Item::Node {
                                id: n,
                                parent: 0,
                                ip: 0x1000 * n,
                            });
                        }
                    }
                    (
                        ChunkHeader {
                            tid: t,
                            base_seq: seq - 1,
                            base_time: (seq - 1) * 10,
                        },
                        items,
                    )
                });
                c.1.push(Item::Event {
                    seq,
                    time: seq * 10,
                    kind,
                });
            }
            chunks.extend(cur);
        }
        for (h, items) in &chunks {
            put_record(&mut file, record::EVENTS, &encode_stream(h, items));
        }
        let path = std::env::temp_dir().join(format!(
            "memtrack-regions-{}-{name}.cap",
            std::process::id()
        ));
        std::fs::write(&path, file).unwrap();
        let cap = Capture::open(&path).unwrap();
        assert!(cap.warnings.is_empty(), "{:?}", cap.warnings);
        cap
    }

    /// load (keeps 3,000), search (2,000, realloc'd to 4,000, a nested rank of 500 freed
    /// again; a block freed by another thread) on thread 1; on thread 2 a second search left
    /// open, one of whose blocks thread 1 frees after thread 2's last event.
    fn pipeline(name: &str) -> Capture {
        let realloc = EventKind::Alloc {
            kind: AllocKind::Realloc,
            addr: 0x5000,
            size: 4000,
            stack: 3,
        };
        let ev = [
            (1, 1, alloc(0x1000, 1000, 1)),
            (2, 1, EventKind::RegionBegin { region: 11 }),
            (3, 1, alloc(0x2000, 3000, 2)),
            (4, 1, EventKind::RegionEnd),
            (5, 1, EventKind::RegionBegin { region: 22 }),
            (6, 1, alloc(0x3000, 2000, 3)),
            (7, 1, EventKind::RegionBegin { region: 33 }),
            (8, 1, alloc(0x4000, 500, 4)),
            (9, 1, free(0x4000)),
            (10, 1, EventKind::RegionEnd),
            (11, 1, EventKind::ReallocFree { addr: 0x3000 }),
            (12, 1, realloc),
            (13, 2, alloc(0x6000, 1000, 5)),
            (14, 1, free(0x5000)),
            (15, 1, alloc(0x7000, 100, 6)),
            (16, 1, alloc(0x8000, 300, 6)),
            (17, 2, free(0x7000)),
            (18, 1, EventKind::RegionEnd),
            (19, 2, EventKind::RegionBegin { region: 22 }),
            (20, 2, alloc(0x9000, 700, 7)),
            (21, 2, alloc(0xa000, 50, 7)),
            (22, 1, alloc(0xb000, 10000, 1)),
            (23, 1, free(0x9000)),
            (24, 1, EventKind::RegionEnd),
        ];
        capture(
            name,
            &[(11, "load"), (22, "search"), (33, "rank")],
            &ev,
            &[8, 22],
        )
    }

    #[test]
    fn every_occurrence_has_exact_figures() {
        let cap = pipeline("occurrences");
        let r = cap.regions();
        assert_eq!(r.unmatched_ends, 1);
        let o = &r.occurrences;
        let got: Vec<_> = o
            .iter()
            .map(|o| {
                (
                    o.path.as_str(),
                    o.tid,
                    (o.begin_seq, o.end_seq),
                    (o.allocated_bytes, o.allocations),
                    o.retained_bytes,
                    (o.peak_growth_bytes, o.peak_seq),
                    o.heap_peak_bytes,
                    o.closed,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("load", 1, (2, 4), (3000, 1), 3000, (3000, 3), 4000, true),
                ("search", 1, (5, 18), (6900, 5), 300, (4000, 12), 9000, true),
                ("search/rank", 1, (7, 10), (500, 1), 0, (500, 8), 6500, true),
                // Closed at thread 2's last event (21): thread 1's later 10,000 bytes and its
                // free of 0x9000 are not the occurrence's.
                ("search", 2, (19, 21), (750, 2), 750, (750, 21), 6050, false),
            ]
        );
        assert_eq!(o[2].parent, Some(1));
        assert_eq!((o[1].begin_time, o[1].end_time), (50, 180));
        // The heap peaks agree with the replay's (summary's) figure.
        assert_eq!(cap.summary().unwrap().peak_bytes, 16050);
    }

    #[test]
    fn figures_per_path_nested_under_their_parent() {
        let cap = pipeline("figures");
        let r = cap.regions();
        let f = r.figures(&cap, RegionSort::Peak);
        let rows: Vec<_> = f
            .iter()
            .map(|f| {
                (
                    f.path.as_str(),
                    f.name.as_str(),
                    f.depth,
                    f.occurrences,
                    (f.peak_growth_bytes, f.avg_growth_bytes, f.heap_peak_bytes),
                    (f.allocated_bytes, f.allocations, f.retained_bytes),
                    f.unclosed,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (
                    "search",
                    "search",
                    0,
                    2,
                    (4000, 2375, 9000),
                    (7650, 7, 1050),
                    1
                ),
                (
                    "search/rank",
                    "rank",
                    1,
                    1,
                    (500, 500, 6500),
                    (500, 1, 0),
                    0
                ),
                ("load", "load", 0, 1, (3000, 3000, 4000), (3000, 1, 3000), 0),
            ]
        );
        let secs = |f: &RegionFigures| {
            (
                (f.total_seconds * 1000.0).round() as u64,
                (f.max_seconds * 1000.0).round() as u64,
            )
        };
        assert_eq!(secs(&f[0]), (150, 130));
        assert_eq!(secs(&f[1]), (30, 30));
        assert_eq!(secs(&f[2]), (20, 20));
        // Retained first: load (3,000) before search (1,050).
        let by_retained = r.figures(&cap, RegionSort::Retained);
        let order: Vec<&str> = by_retained.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(order, ["load", "search", "search/rank"]);
        let by_count = r.figures(&cap, RegionSort::Count);
        assert_eq!(by_count[0].path, "search");
        // Own blocks at the largest occurrence's peak: the realloc'd 4,000 bytes (stack 3).
        let largest: Vec<usize> = f.iter().map(|f| f.largest).collect();
        assert_eq!(largest, [1, 2, 0]);
        let (held, _) = cap.held_at_peaks(&r, &largest);
        let sites = |v: &Vec<SiteTotal>| -> Vec<(u32, u64, u64)> {
            v.iter()
                .map(|s| (s.stack, s.bytes, s.allocations))
                .collect()
        };
        assert_eq!(sites(&held[0]), [(3, 4000, 1)]);
        assert_eq!(sites(&held[1]), [(4, 500, 1)]);
        assert_eq!(sites(&held[2]), [(2, 3000, 1)]);
        // By name (check --region): the same as the one path here.
        let search = r.aggregate(&cap, |o| o.name == "search").unwrap();
        assert_eq!(
            (
                search.peak_growth_bytes,
                search.allocated_bytes,
                search.retained_bytes
            ),
            (4000, 7650, 1050)
        );
    }

    #[test]
    fn region_views_hold_region_made_blocks() {
        let cap = pipeline("views");
        let sites = |v: ViewSites| -> (u64, u64, Vec<(u32, u64, u64)>) {
            let s = v
                .sites
                .iter()
                .map(|s| (s.stack, s.bytes, s.allocations))
                .collect();
            (v.bytes, v.allocations, s)
        };
        assert_eq!(
            sites(cap.region_view(View::Peak, "search")),
            (4000, 1, vec![(3, 4000, 1)])
        );
        assert_eq!(
            sites(cap.region_view(View::Allocated, "search")),
            (
                7650,
                7,
                vec![(3, 6000, 2), (7, 750, 2), (4, 500, 1), (6, 400, 2)]
            )
        );
        // 0x8000 (thread 1) and 0xa000 (thread 2) are left; 0x9000 was freed by thread 1.
        assert_eq!(
            sites(cap.region_view(View::LeaksAtExit, "search")),
            (350, 2, vec![(6, 300, 1), (7, 50, 1)])
        );
        assert_eq!(
            sites(cap.region_view(View::Leaks, "load")),
            (3000, 1, vec![(2, 3000, 1)])
        );
        for name in ["rank", "search/rank"] {
            assert_eq!(
                sites(cap.region_view(View::Peak, name)),
                (500, 1, vec![(4, 500, 1)])
            );
        }
        assert!(cap.check_region("search/rank").is_ok());
        let e = cap.check_region("index").unwrap_err();
        assert!(
            e.ends_with("no region named \"index\" (its regions: load, rank, search)"),
            "{e}"
        );
        // Existing views are untouched by the marks.
        assert_eq!(cap.view(View::Peak).bytes, 16050);
    }

    #[test]
    fn a_capture_without_regions_has_none() {
        let cap = capture(
            "none",
            &[],
            &[(1, 1, alloc(0x10, 8, 1)), (2, 1, free(0x10))],
            &[],
        );
        assert!(cap.regions().is_empty());
        assert!(cap.region_view(View::Peak, "x").sites.is_empty());
        let e = cap.check_region("x").unwrap_err();
        assert!(
            e.ends_with("no region named \"x\": the capture has no regions"),
            "{e}"
        );
    }
}
