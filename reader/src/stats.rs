//! Allocation statistics in one pass over the events: size histogram, calls by allocator
//! function, allocated and temporary allocations by stack.

use crate::capture::Capture;
use crate::replay::SiteSums;
use crate::stacks::StackTable;
use crate::views::{View, ViewSites};
use memtrack_format::hash::FastMap;
use memtrack_format::AllocKind;
use memtrack_format::EventKind;

/// Allocations whose size lies in `[min, max]` (power-of-two buckets).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Bucket {
    pub min: u64,
    pub max: u64,
    pub count: u64,
    pub bytes: u64,
}

/// Calls of one allocator function.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KindStat {
    pub function: &'static str,
    pub count: u64,
    pub bytes: u64,
}

/// The mappings of one file (file-backed `mmap`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct FileMapStat {
    pub file: String,
    /// `mmap` calls that mapped it.
    pub mappings: u64,
    /// Bytes they mapped, in all.
    pub mapped_bytes: u64,
    /// The most bytes of it mapped at once.
    pub peak_bytes: u64,
    /// Bytes of it still mapped at exit.
    pub at_exit_bytes: u64,
}

pub struct Stats {
    pub histogram: Vec<Bucket>,
    pub by_function: Vec<KindStat>,
    pub allocated: ViewSites,
    /// Allocations freed again before the same thread allocated anything else (heaptrack's
    /// definition), by stack.
    pub temporary: ViewSites,
    /// File-backed mappings by file, the most mapped at once first.
    pub mapped_files: Vec<FileMapStat>,
}

impl Capture {
    pub fn stats(&self) -> Stats {
        let mut stacks = StackTable::default();
        let mut hist = vec![Bucket::default(); 65];
        let mut kinds: Vec<(u64, u64)> = vec![(0, 0); AllocKind::ALL.len()];
        let mut allocated = SiteSums::default();
        let mut temporary = Temporaries::default();
        let mut mapped = crate::MappedSet::default();
        let mut boundaries = self.exec_boundaries.iter().copied().peekable();
        // Decoded ahead on worker threads, as for the replay.
        self.with_events(&mut stacks, |events| {
            events.for_each_while(|ev| {
                while boundaries.next_if(|&b| ev.seq >= b).is_some() {
                    mapped.clear();
                }
                if ev.kind.is_mapped() {
                    mapped.apply(&ev.kind, ev.seq);
                }
                if let EventKind::Alloc {
                    kind, size, stack, ..
                } = ev.kind
                {
                    let b = if size == 0 {
                        0
                    } else {
                        64 - (size - 1).leading_zeros() as usize
                    };
                    let bucket = &mut hist[b.min(64)];
                    bucket.count += 1;
                    bucket.bytes = bucket.bytes.saturating_add(size);
                    let k = &mut kinds[kind as usize];
                    k.0 += 1;
                    k.1 = k.1.saturating_add(size);
                    allocated.add(stack, size);
                }
                temporary.event(ev, true);
                true
            })
        });
        let histogram = hist
            .into_iter()
            .enumerate()
            .filter(|(_, b)| b.count > 0)
            .map(|(i, mut b)| {
                (b.min, b.max) = match i {
                    0 => (0, 1),
                    64 => (1 << 63, u64::MAX),
                    _ => ((1u64 << (i - 1)) + 1, 1u64 << i),
                };
                b
            })
            .collect();
        let by_function = AllocKind::ALL
            .iter()
            .zip(kinds)
            .filter(|(_, (c, _))| *c > 0)
            .map(|(k, (count, bytes))| KindStat {
                function: k.name(),
                count,
                bytes,
            })
            .collect();
        let allocated = ViewSites::new(View::Allocated, allocated.into_sorted(), stacks.clone());
        let temporary = ViewSites::new(View::Temporary, temporary.sums.into_sorted(), stacks);
        let mut mapped_files: Vec<FileMapStat> = mapped
            .files
            .iter()
            .map(|(id, f)| FileMapStat {
                file: self
                    .map_files
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("file#{id}")),
                mappings: f.mappings,
                mapped_bytes: f.mapped_bytes,
                peak_bytes: f.peak_bytes,
                at_exit_bytes: f.live_bytes,
            })
            .collect();
        mapped_files.sort_by(|a, b| {
            (b.peak_bytes, b.mapped_bytes)
                .cmp(&(a.peak_bytes, a.mapped_bytes))
                .then_with(|| a.file.cmp(&b.file))
        });
        Stats {
            histogram,
            by_function,
            allocated,
            temporary,
            mapped_files,
        }
    }
}

/// Temporary allocations being found: per thread its most recent allocation (address, size,
/// stack, whether it counts), until the thread does anything else.
#[derive(Default)]
pub(crate) struct Temporaries {
    last: FastMap<u32, (u64, u64, u32, bool)>,
    pub(crate) sums: SiteSums,
}

impl Temporaries {
    /// Takes the next event; an allocation that is not `counted` (made outside a window) is
    /// followed but never summed.
    #[inline]
    pub(crate) fn event(&mut self, ev: &crate::Event, counted: bool) {
        match ev.kind {
            EventKind::Alloc {
                addr, size, stack, ..
            } => {
                self.last.insert(ev.tid, (addr, size, stack, counted));
            }
            EventKind::Free { addr } => {
                if let Some((a, size, stack, counted)) = self.last.remove(&ev.tid) {
                    if a == addr && counted {
                        self.sums.add(stack, size);
                    }
                }
            }
            EventKind::ReallocFree { .. } | EventKind::ReallocFailed => {
                self.last.remove(&ev.tid);
            }
            EventKind::RegionBegin { .. } | EventKind::RegionEnd => {}
            // Not heap: they leave the thread's last allocation as it was.
            EventKind::Map { .. } | EventKind::Unmap { .. } | EventKind::Remap { .. } => {}
        }
    }
}
