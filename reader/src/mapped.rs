//! Mapped memory while events are replayed: the ranges `mmap` made and `munmap`/`mremap` have
//! not taken back yet, exact to the byte range (an unmap may take the middle of a mapping, or
//! several mappings at once), each with the stack, file and mapping it came from. Kept apart
//! from the heap: no heap figure depends on it.

use crate::replay::{SiteSums, SiteTotal};
use memtrack_format::hash::FastMap;
use memtrack_format::EventKind;
use std::collections::BTreeMap;

/// One mapped range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    end: u64,
    stack: u32,
    /// 0: anonymous; else a `MAP_FILE` id.
    file: u32,
    shared: bool,
    /// The mapping the range is (part of): the sequence number of the event that made it.
    mapping: u64,
}

/// What the mappings of one file came to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileFigures {
    /// `mmap` calls that mapped it.
    pub mappings: u64,
    /// Bytes those calls mapped, in all.
    pub mapped_bytes: u64,
    /// Bytes of it mapped now.
    pub live_bytes: u64,
    /// The most bytes of it mapped at once.
    pub peak_bytes: u64,
}

/// The mapped ranges, and per-stack figures at the mapped peak.
#[derive(Default)]
pub struct MappedSet {
    /// By start address; ranges never overlap.
    ranges: BTreeMap<u64, Range>,
    /// Bytes mapped now.
    pub bytes: u64,
    /// Pieces of each live mapping (an unmap in its middle leaves two): a mapping counts once
    /// per stack while any piece of it is left.
    pieces: FastMap<u64, u32>,
    /// stack -> (bytes, mappings) mapped now, and whether it changed since the last peak.
    by_stack: FastMap<u32, (u64, u64, bool)>,
    /// Stacks changed since the last peak, and their values at it.
    dirty: Vec<u32>,
    at_peak: FastMap<u32, (u64, u64)>,
    /// File id -> its figures.
    pub files: FastMap<u32, FileFigures>,
    /// stack -> the largest mapping it made (a table's Max).
    largest: FastMap<u32, u64>,
}

impl MappedSet {
    /// Applies a mapped-memory event (others are ignored); true when it was one.
    pub fn apply(&mut self, kind: &EventKind, seq: u64) -> bool {
        match *kind {
            EventKind::Map {
                addr,
                size,
                stack,
                file,
                shared,
            } => {
                let r = Range {
                    end: addr.saturating_add(size),
                    stack,
                    file,
                    shared,
                    mapping: seq,
                };
                if file != 0 {
                    let f = self.files.entry(file).or_default();
                    f.mappings += 1;
                    f.mapped_bytes = f.mapped_bytes.saturating_add(size);
                }
                self.insert(addr, r);
            }
            EventKind::Unmap { addr, size } => {
                self.remove(addr, addr.saturating_add(size));
            }
            EventKind::Remap {
                old_addr,
                old_size,
                addr,
                size,
                stack,
            } => {
                let old = self.remove(old_addr, old_addr.saturating_add(old_size));
                let (file, shared) = old.map_or((0, false), |o| (o.file, o.shared));
                self.insert(
                    addr,
                    Range {
                        end: addr.saturating_add(size),
                        stack,
                        file,
                        shared,
                        mapping: seq,
                    },
                );
            }
            _ => return false,
        }
        true
    }

    /// Records the current state as the mapped peak (per-stack figures).
    pub fn mark_peak(&mut self) {
        for s in self.dirty.drain(..) {
            if let Some(e) = self.by_stack.get_mut(&s) {
                e.2 = false;
                self.at_peak.insert(s, (e.0, e.1));
            }
        }
    }

    /// What was mapped at the last [`MappedSet::mark_peak`], by stack, largest first.
    pub fn peak_by_stack(&self) -> Vec<SiteTotal> {
        sorted(&self.at_peak, &self.largest)
    }

    /// What is mapped now, by stack, largest first.
    pub fn live_by_stack(&self) -> Vec<SiteTotal> {
        let now: FastMap<u32, (u64, u64)> = self
            .by_stack
            .iter()
            .map(|(&s, e)| (s, (e.0, e.1)))
            .collect();
        sorted(&now, &self.largest)
    }

    /// Every mapping is gone (the image was replaced by exec).
    pub fn clear(&mut self) {
        let starts: Vec<(u64, u64)> = self.ranges.iter().map(|(&s, r)| (s, r.end)).collect();
        for (s, e) in starts {
            self.remove(s, e);
        }
    }

    fn account(&mut self, stack: u32, file: u32, bytes: u64, mappings: i64, add: bool) {
        let e = self.by_stack.entry(stack).or_insert((0, 0, false));
        if add {
            e.0 = e.0.saturating_add(bytes);
            self.bytes = self.bytes.saturating_add(bytes);
        } else {
            e.0 = e.0.saturating_sub(bytes);
            self.bytes = self.bytes.saturating_sub(bytes);
        }
        e.1 = (e.1 as i64 + mappings).max(0) as u64;
        if !e.2 {
            e.2 = true;
            self.dirty.push(stack);
        }
        if file != 0 {
            let f = self.files.entry(file).or_default();
            if add {
                f.live_bytes = f.live_bytes.saturating_add(bytes);
                f.peak_bytes = f.peak_bytes.max(f.live_bytes);
            } else {
                f.live_bytes = f.live_bytes.saturating_sub(bytes);
            }
        }
    }

    /// Maps `[start, r.end)`, replacing whatever was mapped there (`MAP_FIXED`).
    fn insert(&mut self, start: u64, r: Range) {
        if r.end <= start {
            return;
        }
        let big = self.largest.entry(r.stack).or_insert(0);
        *big = (*big).max(r.end - start);
        self.remove(start, r.end);
        let pieces = self.pieces.entry(r.mapping).or_insert(0);
        *pieces += 1;
        let first = *pieces == 1;
        self.account(r.stack, r.file, r.end - start, first as i64, true);
        self.ranges.insert(start, r);
    }

    /// Unmaps `[lo, hi)`: the ranges inside go, those across an edge are cut. Returns the
    /// first range met (its attributes), if any.
    fn remove(&mut self, lo: u64, hi: u64) -> Option<Range> {
        if hi <= lo {
            return None;
        }
        // Ranges that start before `hi` and end after `lo`: the one starting at or before `lo`
        // (if it reaches past it), and those starting inside.
        let mut hit: Vec<(u64, Range)> = Vec::new();
        if let Some((&s, &r)) = self.ranges.range(..=lo).next_back() {
            if r.end > lo {
                hit.push((s, r));
            }
        }
        for (&s, &r) in self.ranges.range(lo.saturating_add(1)..hi) {
            hit.push((s, r));
        }
        let first = hit.first().map(|h| h.1);
        for (s, r) in hit {
            self.ranges.remove(&s);
            // What stays: the part below `lo` and the part above `hi`.
            let below = (s < lo).then_some((s, lo));
            let above = (r.end > hi).then_some((hi, r.end));
            let kept = below
                .iter()
                .chain(above.iter())
                .map(|&(a, b)| b - a)
                .sum::<u64>();
            let gone = (r.end - s) - kept;
            let left = below.is_some() as u32 + above.is_some() as u32;
            let pieces = self.pieces.entry(r.mapping).or_insert(1);
            *pieces = (*pieces - 1) + left;
            let last = *pieces == 0;
            if last {
                self.pieces.remove(&r.mapping);
            }
            self.account(r.stack, r.file, gone, -(last as i64), false);
            for (a, b) in below.into_iter().chain(above) {
                self.ranges.insert(a, Range { end: b, ..r });
            }
        }
        first
    }
}

/// Per-stack figures, largest first, with each stack's largest mapping as its `max`.
fn sorted(m: &FastMap<u32, (u64, u64)>, largest: &FastMap<u32, u64>) -> Vec<SiteTotal> {
    let mut sums = SiteSums::default();
    for (&stack, &(bytes, mappings)) in m {
        if mappings > 0 || bytes > 0 {
            let max = largest.get(&stack).copied().unwrap_or(0);
            sums.set(stack, bytes, mappings, max);
        }
    }
    sums.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(addr: u64, size: u64, stack: u32, file: u32) -> EventKind {
        EventKind::Map {
            addr,
            size,
            stack,
            file,
            shared: false,
        }
    }

    #[test]
    fn an_unmap_in_the_middle_leaves_both_ends_of_one_mapping() {
        let mut m = MappedSet::default();
        m.apply(&map(0x10000, 0x10000, 1, 0), 1);
        m.apply(&map(0x40000, 0x2000, 2, 5), 2);
        m.mark_peak();
        m.apply(
            &EventKind::Unmap {
                addr: 0x14000,
                size: 0x4000,
            },
            3,
        );
        assert_eq!(m.bytes, 0xc000 + 0x2000);
        let live = m.live_by_stack();
        assert_eq!(
            (live[0].stack, live[0].bytes, live[0].allocations),
            (1, 0xc000, 1)
        );
        assert_eq!(m.peak_by_stack()[0].bytes, 0x10000);
        // One unmap across both pieces and the file mapping.
        m.apply(
            &EventKind::Unmap {
                addr: 0x10000,
                size: 0x40000,
            },
            4,
        );
        assert_eq!(m.bytes, 0);
        assert!(m.live_by_stack().is_empty());
        let f = m.files[&5];
        assert_eq!(
            (f.mappings, f.mapped_bytes, f.live_bytes, f.peak_bytes),
            (1, 0x2000, 0, 0x2000)
        );
    }

    #[test]
    fn a_remap_moves_the_range_to_its_stack_and_keeps_the_file() {
        let mut m = MappedSet::default();
        m.apply(&map(0x10000, 0x4000, 1, 3), 1);
        m.apply(
            &EventKind::Remap {
                old_addr: 0x10000,
                old_size: 0x4000,
                addr: 0x80000,
                size: 0x8000,
                stack: 9,
            },
            2,
        );
        assert_eq!(m.bytes, 0x8000);
        let live = m.live_by_stack();
        assert_eq!(live.len(), 1);
        assert_eq!(
            (live[0].stack, live[0].bytes, live[0].allocations),
            (9, 0x8000, 1)
        );
        assert_eq!(m.files[&3].live_bytes, 0x8000);
        // MAP_FIXED over part of it replaces that part.
        m.apply(&map(0x84000, 0x8000, 4, 0), 3);
        assert_eq!(m.bytes, 0x4000 + 0x8000);
    }
}
