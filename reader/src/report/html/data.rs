//! The data a report page embeds: the run cut into time buckets, the high-water mark of each
//! bucket, and the allocations grouped into intervals between buckets, so that the page can
//! compute every view of any window exactly without the events.
//!
//! Each bucket `k` has a snapshot: the moment its heap was highest (the state after one of its
//! events, or the state it started with). Positions of events are half-buckets: an event of
//! bucket `k` sits at `2k` when it is part of that snapshot (its seq is below `bound[k]`) and
//! at `2k + 1` when it came after it. An interval `(alloc, free)` is live at the snapshot of
//! `k` exactly when `alloc <= 2k < free`, so the live set at each bucket's high-water mark is
//! exact, and the peak of a window is its highest bucket's.

use crate::capture::Capture;
use crate::replay::Replay;
use crate::symbols::Symbolizer;
use memtrack_format::hash::FastMap;
use memtrack_format::EventKind;
use serde::Serialize;

/// Time buckets of the timeline, at most.
pub const BUCKETS: usize = 1000;

/// Interval rows kept before the least important stacks are merged (into 3/4 of it).
pub const ROW_BUDGET: usize = 1_000_000;

/// `free` of an allocation never freed.
const NEVER: u32 = u32::MAX;

/// Flags of an interval row.
const TEMPORARY: u8 = 1;
const LEAKED: u8 = 2;

/// Everything the page shows, as columns (the page reads them with one `JSON.parse`).
#[derive(Serialize, Default)]
pub struct Data {
    pub summary: Header,
    /// Seconds the timeline spans, and whether buckets are by event order (short runs).
    pub span_seconds: f64,
    pub by_event: bool,
    /// Per bucket: the heap's high-water mark in it.
    pub heap: Vec<u64>,
    /// Per bucket: the highest resident-memory sample in it (carried over empty buckets; 0
    /// before the first sample).
    pub rss: Vec<u64>,
    /// Per bucket: the seconds of its high-water mark.
    pub peak_time: Vec<f64>,
    /// Per bucket: the high-water mark of the bytes mapped (mmap) in it; all 0 when the
    /// program mapped nothing (the page then leaves the series out).
    pub mapped: Vec<u64>,
    /// Frame labels, as the flamegraph command names them.
    pub frames: Vec<String>,
    /// The call tree of every stack, nodes in depth-first order (node 0 is the root): node `i`
    /// is frame `node_frame[i]` below node `i - node_up[i]`.
    pub node_frame: Vec<u32>,
    pub node_up: Vec<u32>,
    /// The nodes whose own frame is a Python frame.
    pub python_nodes: Vec<u32>,
    /// Per stack: its node, the node of its Python frames alone, and its allocating location.
    pub stack_node: Vec<u32>,
    pub stack_py_node: Vec<u32>,
    pub stack_loc: Vec<u32>,
    /// Allocating locations: `function (file:line)`.
    pub locs: Vec<String>,
    /// Thread ids, in order of first allocation.
    pub threads: Vec<u32>,
    /// Interval rows, sorted by allocation position: `row_count` allocations of stack
    /// `row_stack` and thread `row_thread` (empty: all of the one thread), holding `row_bytes`,
    /// made at position `row_alloc` (each the difference from the row before) and freed at
    /// `row_alloc + row_free - 1` (`row_free` 0: never). `row_count` and `row_flags` are
    /// (row, value) pairs of the rows where they are not 1 and 0; flags 1: temporary, 2: leaked.
    pub row_stack: Vec<u32>,
    pub row_thread: Vec<u32>,
    pub row_alloc: Vec<u32>,
    pub row_free: Vec<u32>,
    pub row_bytes: Vec<u64>,
    pub row_count: Vec<u64>,
    pub row_flags: Vec<u32>,
    /// Stacks merged into `[smaller stacks]` to keep the page small, and the share of every
    /// view each of them stayed under.
    pub pruned_stacks: usize,
    pub pruned_below_percent: f64,
}

/// The summary header's figures.
#[derive(Serialize, Default)]
pub struct Header {
    pub command: String,
    pub pid: u32,
    pub duration_seconds: f64,
    pub peak_bytes: u64,
    pub peak_time_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    pub peak_rss_time_seconds: Option<f64>,
    /// 0 when the program mapped nothing.
    pub peak_mapped_bytes: u64,
    pub peak_mapped_time_seconds: f64,
    pub leaked_bytes: u64,
    pub leaked_allocations: u64,
    pub leaks_measured_at: &'static str,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub complete: bool,
    pub end_reason: Option<&'static str>,
    pub threads: usize,
    pub python_only: bool,
    /// Said on the page: which process of a tree this is.
    pub note: Option<String>,
    /// Mean bytes between samples when sampled: the heap figures are estimates.
    pub sample_rate_bytes: Option<u64>,
}

/// Where an event falls on the time axis.
struct Axis {
    n: u64,
    span: u64,
    by_event: bool,
}

impl Axis {
    fn of(cap: &Capture) -> Axis {
        let end = cap
            .end
            .map(|e| e.time)
            .unwrap_or(0)
            .max(cap.last_chunk_time);
        // As `plot`: below 50 ms the clock tick says little, events are spread by order.
        let by_event = cap.seconds(end) < 0.05;
        let max_seq = cap
            .end
            .map(|e| e.seq)
            .into_iter()
            .chain(cap.chunks.iter().map(|c| c.header.base_seq + 1))
            .max()
            .unwrap_or(1);
        Axis {
            n: BUCKETS as u64,
            span: if by_event { max_seq } else { end }.max(1),
            by_event,
        }
    }

    fn bucket(&self, time: u64, seq: u64) -> usize {
        let x = if self.by_event { seq } else { time };
        ((x as u128 * self.n as u128) / self.span as u128).min(self.n as u128 - 1) as usize
    }
}

/// One live allocation being followed.
#[derive(Clone, Copy)]
struct Held {
    stack: u32,
    thread: u32,
    alloc: u32,
    size: u64,
    leaked: bool,
}

type RowKey = (u32, u32, u32, u32, u8);

/// Rows being summed.
#[derive(Default)]
struct Rows(FastMap<RowKey, (u64, u64)>);

impl Rows {
    fn add(&mut self, h: Held, free: u32, temporary: bool) {
        let flags = if temporary { TEMPORARY } else { 0 } | if h.leaked { LEAKED } else { 0 };
        let e = self
            .0
            .entry((h.stack, h.thread, h.alloc, free, flags))
            .or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(h.size);
    }
}

/// Builds the page's data from one capture.
pub fn build(cap: &Capture, sym: &mut Symbolizer, header: Header, row_budget: usize) -> Data {
    let axis = Axis::of(cap);
    let n = BUCKETS;
    // Pass 1: each bucket's high-water mark and the seq bound of its snapshot.
    let mut heap = vec![0u64; n];
    let mut mapped = vec![0u64; n];
    let mut mapped_carry = 0u64;
    let mut bound = vec![0u64; n];
    let mut peak_time = vec![0u64; n];
    let mut cur = 0usize;
    let (mut carry, mut next_seq, mut last_time) = (0u64, 0u64, 0u64);
    // Times in seq order may step back by a clock tick between threads: each event is placed no
    // earlier than the one before it, the same way in both passes, so buckets never go back.
    let mut clock = 0u64;
    cap.replay_with(Replay::new(), u64::MAX, |r, ev| {
        clock = clock.max(ev.time);
        let k = axis.bucket(clock, ev.seq);
        while cur < k {
            cur += 1;
            (heap[cur], bound[cur], peak_time[cur]) = (carry, next_seq, last_time);
            mapped[cur] = mapped_carry;
        }
        mapped[k] = mapped[k].max(r.mapped_bytes);
        mapped_carry = r.mapped_bytes;
        if r.live_bytes > heap[k] {
            (heap[k], bound[k], peak_time[k]) = (r.live_bytes, ev.seq + 1, ev.time);
        }
        (carry, next_seq, last_time) = (r.live_bytes, ev.seq + 1, ev.time);
    });
    while cur + 1 < n {
        cur += 1;
        (heap[cur], bound[cur], peak_time[cur]) = (carry, next_seq, last_time);
        mapped[cur] = mapped_carry;
    }

    // Pass 2: every allocation's interval.
    let pos = |time: u64, seq: u64| -> u32 {
        let k = axis.bucket(time, seq);
        (2 * k + (seq >= bound[k]) as usize) as u32
    };
    let mut rows = Rows::default();
    let mut live: FastMap<u64, Held> = FastMap::default();
    let mut pending: FastMap<u32, (u64, Held, u32)> = FastMap::default();
    let mut last: FastMap<u32, u64> = FastMap::default();
    let mut threads: Vec<u32> = Vec::new();
    let mut thread_ix: FastMap<u32, u32> = FastMap::default();
    let mut boundaries = cap.exec_boundaries.iter().copied().peekable();
    let cut = cap.leaks_seq();
    let mut cut_passed = false;
    let mut clock = 0u64;
    let mut stacks = cap
        .replay_with(Replay::new(), u64::MAX, |_, ev| {
            clock = clock.max(ev.time);
            let p = pos(clock, ev.seq);
            // The image was replaced by exec: its heap is gone, not leaked.
            while boundaries.next_if(|&b| ev.seq >= b).is_some() {
                for (_, h) in live.drain() {
                    rows.add(h, p, false);
                }
                for (_, (_, h, at)) in pending.drain() {
                    rows.add(h, at, false);
                }
            }
            if ev.seq > cut && !cut_passed {
                cut_passed = true;
                live.values_mut().for_each(|h| h.leaked = true);
            }
            match ev.kind {
                EventKind::Alloc {
                    kind,
                    addr,
                    size,
                    stack,
                } => {
                    if kind.is_realloc() {
                        if let Some((_, h, at)) = pending.remove(&ev.tid) {
                            rows.add(h, at, false);
                        }
                    }
                    let next = threads.len() as u32;
                    let thread = *thread_ix.entry(ev.tid).or_insert_with(|| {
                        threads.push(ev.tid);
                        next
                    });
                    let h = Held {
                        stack,
                        thread,
                        alloc: p,
                        size,
                        leaked: false,
                    };
                    if let Some(old) = live.insert(addr, h) {
                        rows.add(old, p, false);
                    }
                    last.insert(ev.tid, addr);
                }
                EventKind::Free { addr } => {
                    if let Some(h) = live.remove(&addr) {
                        rows.add(h, p, last.get(&ev.tid) == Some(&addr));
                    }
                    last.remove(&ev.tid);
                }
                EventKind::ReallocFree { addr } => {
                    if let Some(h) = live.remove(&addr) {
                        pending.insert(ev.tid, (addr, h, p));
                    }
                    last.remove(&ev.tid);
                }
                EventKind::ReallocFailed => {
                    if let Some((addr, h, _)) = pending.remove(&ev.tid) {
                        // Back where it was, as the replay does.
                        live.insert(addr, h);
                    }
                    last.remove(&ev.tid);
                }
                EventKind::RegionBegin { .. } | EventKind::RegionEnd => {}
                // Mapped memory is not heap: the page's heap views leave it out.
                EventKind::Map { .. } | EventKind::Unmap { .. } | EventKind::Remap { .. } => {}
            }
        })
        .stacks;
    for (_, (_, h, at)) in pending.drain() {
        rows.add(h, at, false);
    }
    let leaked_all = cut == u64::MAX;
    for (_, mut h) in live.drain() {
        h.leaked |= leaked_all;
        rows.add(h, NEVER, false);
    }

    let mut data = Data {
        summary: header,
        span_seconds: if axis.by_event {
            cap.seconds(
                cap.end
                    .map(|e| e.time)
                    .unwrap_or(0)
                    .max(cap.last_chunk_time),
            )
        } else {
            cap.seconds(axis.span)
        },
        by_event: axis.by_event,
        heap,
        mapped,
        rss: rss_per_bucket(cap, &axis),
        peak_time: peak_time.iter().map(|&t| cap.seconds(t)).collect(),
        threads,
        ..Data::default()
    };
    stacks_and_rows(&mut data, rows, sym, &mut stacks, row_budget);
    data
}

/// The highest RSS sample of each bucket, carried over buckets without one.
fn rss_per_bucket(cap: &Capture, axis: &Axis) -> Vec<u64> {
    let mut rss = vec![0u64; axis.n as usize];
    let mut seen = vec![false; rss.len()];
    for s in &cap.rss {
        let k = axis.bucket(s.time, s.seq);
        rss[k] = rss[k].max(s.rss_bytes);
        seen[k] = true;
    }
    let mut carry = 0;
    for (v, seen) in rss.iter_mut().zip(seen) {
        if seen {
            carry = *v;
        } else {
            *v = carry;
        }
    }
    rss
}

/// The frame table, the call tree, the locations; the rows with stacks renumbered densely.
/// Stacks the page cannot tell apart (the same frames and location) become one; when there are
/// still too many rows, the least important stacks are merged into one frame.
fn stacks_and_rows(
    data: &mut Data,
    rows: Rows,
    sym: &mut Symbolizer,
    stacks: &mut crate::stacks::StackTable,
    row_budget: usize,
) {
    // Raw stack ids to groups of stacks the page shows alike.
    let mut raw: Vec<u32> = rows.0.keys().map(|k| k.0).collect();
    raw.sort_unstable();
    raw.dedup();
    let mut probe = Tree::default();
    let mut group_of: FastMap<u32, u32> = FastMap::default();
    let mut groups: FastMap<(u32, u32, u32), u32> = FastMap::default();
    let mut first_raw: Vec<u32> = Vec::new();
    let mut group_key: Vec<(u32, u32, u32)> = Vec::new();
    // Ids of the same return addresses are symbolized once.
    let mut by_addrs: FastMap<Vec<u64>, (u32, u32, u32)> = FastMap::default();
    for &s in &raw {
        let addrs = stacks.frames(s);
        let key = match by_addrs.get(&addrs) {
            Some(&k) => k,
            None => {
                let k = probe.stack(sym, stacks, s);
                by_addrs.insert(addrs, k);
                k
            }
        };
        let next = groups.len() as u32;
        let g = *groups.entry(key).or_insert_with(|| {
            first_raw.push(s);
            group_key.push(key);
            next
        });
        group_of.insert(s, g);
    }
    drop(by_addrs);
    let mut grouped: FastMap<RowKey, (u64, u64)> = FastMap::default();
    for ((s, t, a, f, fl), (c, b)) in rows.0 {
        let e = grouped.entry((group_of[&s], t, a, f, fl)).or_default();
        e.0 += c;
        e.1 = e.1.saturating_add(b);
    }
    // Importance of a group: its largest share of allocated bytes, or of what was leaked.
    let n = first_raw.len();
    let (mut alloc, mut leak, mut rows_of) = (vec![0u64; n], vec![0u64; n], vec![0usize; n]);
    let (mut total_alloc, mut total_leak) = (0u64, 0u64);
    for (&(g, _, _, _, flags), &(_, bytes)) in &grouped {
        alloc[g as usize] += bytes;
        total_alloc += bytes;
        if flags & LEAKED != 0 {
            leak[g as usize] += bytes;
            total_leak += bytes;
        }
        rows_of[g as usize] += 1;
    }
    let share = |g: usize| -> f64 {
        (alloc[g] as f64 / total_alloc.max(1) as f64).max(leak[g] as f64 / total_leak.max(1) as f64)
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| share(b).total_cmp(&share(a)).then(a.cmp(&b)));
    let over = grouped.len() > row_budget;
    let mut kept: Vec<Option<u32>> = vec![None; n];
    let (mut used, mut dense, mut pruned, mut pruned_below) = (0usize, 0u32, 0usize, 0.0f64);
    // Without pruning, the tree made while grouping is the page's; else one of the kept stacks
    // alone.
    let mut tree = if over { Tree::default() } else { probe };
    for &g in &order {
        if over && used + rows_of[g] > row_budget * 3 / 4 {
            pruned += 1;
            pruned_below = pruned_below.max(share(g));
            continue;
        }
        used += rows_of[g];
        kept[g] = Some(dense);
        dense += 1;
        let (node, py_node, loc) = if over {
            tree.stack(sym, stacks, first_raw[g])
        } else {
            group_key[g]
        };
        data.stack_node.push(node);
        data.stack_py_node.push(py_node);
        data.stack_loc.push(loc);
    }
    if pruned > 0 {
        let label = format!("[{pruned} smaller stacks]");
        let f = tree.frame(&label);
        let node = tree.child(0, f, false);
        let loc = tree.loc(&label);
        data.stack_node.push(node);
        data.stack_py_node.push(node);
        data.stack_loc.push(loc);
        data.pruned_stacks = pruned;
        data.pruned_below_percent = pruned_below * 100.0;
    }
    // Rows of merged groups summed under their new key.
    let mut out: FastMap<RowKey, (u64, u64)> = FastMap::default();
    for ((g, t, a, f, fl), (c, b)) in grouped {
        let e = out
            .entry((kept[g as usize].unwrap_or(dense), t, a, f, fl))
            .or_default();
        e.0 += c;
        e.1 = e.1.saturating_add(b);
    }
    let mut out: Vec<(RowKey, (u64, u64))> = out.into_iter().collect();
    out.sort_unstable_by_key(|r| (r.0 .2, r.0 .0, r.0 .1, r.0 .3, r.0 .4));
    let one_thread = data.threads.len() <= 1;
    let mut prev = 0u32;
    for (i, ((s, t, a, f, fl), (c, b))) in out.into_iter().enumerate() {
        data.row_stack.push(s);
        if !one_thread {
            data.row_thread.push(t);
        }
        data.row_alloc.push(a - prev);
        prev = a;
        data.row_free.push(if f == NEVER { 0 } else { f - a + 1 });
        data.row_bytes.push(b);
        if c != 1 {
            data.row_count.extend([i as u64, c]);
        }
        if fl != 0 {
            data.row_flags.extend([i as u32, fl as u32]);
        }
    }
    // Depth-first numbering: a node's parent is usually close before it, so `node_up` is small.
    let n = tree.parent.len();
    let mut kids: Vec<Vec<u32>> = vec![Vec::new(); n];
    for i in 1..n {
        kids[tree.parent[i] as usize].push(i as u32);
    }
    let mut new_id = vec![0u32; n];
    let mut order = Vec::with_capacity(n);
    let mut todo = vec![0u32];
    while let Some(i) = todo.pop() {
        new_id[i as usize] = order.len() as u32;
        order.push(i);
        todo.extend(kids[i as usize].iter().rev());
    }
    for &old in &order {
        let o = old as usize;
        data.node_frame.push(tree.frame_of[o]);
        data.node_up
            .push(new_id[o] - new_id[tree.parent[o] as usize]);
        if tree.python[o] != 0 {
            data.python_nodes.push(new_id[o]);
        }
    }
    for s in data
        .stack_node
        .iter_mut()
        .chain(data.stack_py_node.iter_mut())
    {
        *s = new_id[*s as usize];
    }
    data.frames = tree.frames;
    data.locs = tree.locs;
}

/// The call tree of the stacks, by frame label, as folded stacks merge them.
struct Tree {
    frames: Vec<String>,
    frame_ix: FastMap<String, u32>,
    parent: Vec<u32>,
    frame_of: Vec<u32>,
    python: Vec<u8>,
    children: FastMap<(u32, u32), u32>,
    locs: Vec<String>,
    loc_ix: FastMap<String, u32>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            frames: vec!["all".into()],
            frame_ix: FastMap::default(),
            parent: vec![0],
            frame_of: vec![0],
            python: vec![0],
            children: FastMap::default(),
            locs: Vec::new(),
            loc_ix: FastMap::default(),
        }
    }
}

impl Tree {
    fn frame(&mut self, label: &str) -> u32 {
        if let Some(&f) = self.frame_ix.get(label) {
            return f;
        }
        let f = self.frames.len() as u32;
        self.frames.push(label.to_string());
        self.frame_ix.insert(label.to_string(), f);
        f
    }

    fn child(&mut self, parent: u32, frame: u32, python: bool) -> u32 {
        if let Some(&c) = self.children.get(&(parent, frame)) {
            return c;
        }
        let c = self.parent.len() as u32;
        self.parent.push(parent);
        self.frame_of.push(frame);
        self.python.push(python as u8);
        self.children.insert((parent, frame), c);
        c
    }

    fn loc(&mut self, label: &str) -> u32 {
        if let Some(&l) = self.loc_ix.get(label) {
            return l;
        }
        let l = self.locs.len() as u32;
        self.locs.push(label.to_string());
        self.loc_ix.insert(label.to_string(), l);
        l
    }

    /// A stack's node, the node of its Python frames alone, and its location.
    fn stack(
        &mut self,
        sym: &mut Symbolizer,
        stacks: &crate::stacks::StackTable,
        stack: u32,
    ) -> (u32, u32, u32) {
        let mut frames: Vec<(String, bool)> = Vec::new();
        sym.for_each_frame(stacks, stack, |f| {
            frames.push((f.label().replace(';', ":"), f.python));
        });
        let (mut node, mut py_node) = (0u32, 0u32);
        for (label, python) in &frames {
            let f = self.frame(label);
            node = self.child(node, f, *python);
            if *python {
                py_node = self.child(py_node, f, true);
            }
        }
        // As folded stacks: a stack without frames is `[unknown]`.
        let unknown = |t: &mut Tree| {
            let f = t.frame("[unknown]");
            t.child(0, f, false)
        };
        if node == 0 {
            node = unknown(self);
        }
        // As `--python-only`: a stack that ran no Python code keeps its native frames.
        if py_node == 0 {
            py_node = node;
        }
        let f = crate::views::allocating_frame(sym, stacks, stack)
            .or_else(|| {
                let leaf = *stacks.frames(stack).first()?;
                sym.frames(leaf).last().cloned()
            })
            .unwrap_or_else(|| crate::Frame::native("[unknown]"));
        let loc = self.loc(&super::super::location_label(
            &f.function,
            f.file.as_deref(),
            f.line,
        ));
        (node, py_node, loc)
    }
}
