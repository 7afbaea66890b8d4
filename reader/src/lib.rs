//! Reads memtrack captures and rebuilds what the heap looked like, then reports on it.
//!
//! **What**: opens a capture (memory-mapped), indexes its records, and replays its events in
//! their global order to compute the peak (the high-water mark of live requested bytes), what
//! was still live at exit (leaks), and totals; from a replay it builds views (which stacks held
//! what, at the peak, at exit, over the run), symbolizes them, and renders the reports of the
//! `memtrack` command ([`report`]): summary, stats, check, table, tree, flamegraph, diff,
//! export, plot, dump.
//!
//! **Why**: a report must be exact and must open in seconds even for captures of hundreds of
//! millions of events, so the replay streams: memory is bounded by the live allocations and the
//! stack table, never by the number of events. Rendering lives here, beside the figures, so
//! that the command line only parses arguments and picks files, and every report can be tested
//! by writing it into a buffer.
//!
//! **How**: each thread's events arrive in chunks that are sorted by a global sequence number;
//! a k-way merge over the chunks yields one ordered stream ([`Capture::events`]), which
//! [`Capture::replay`] applies to a [`Replay`] and returns as a [`Replayed`]. A capture cut short
//! (the process was killed) is read up to its last complete record and reported as incomplete.
//! A computation is a method of the value it reads: [`Capture`] (replay, view, summary, stats,
//! plot, check), [`ViewSites`] (folded, table, top_locations, call_tree), [`Symbolizer`] (frames
//! of a stack), [`Diff`] (between two views). Reports are functions of [`report`] that take a
//! [`report::Reporter`] (the [`report::ReportOptions`], the diagnostics stream, the progress
//! display) and write to the writer they are given.
//!
//! ```
//! use memtrack_reader::report::{ProgressGuard, ReportOptions, Reporter, Subject};
//! use memtrack_reader::{Capture, GroupBy, View};
//!
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/captures/v4-every-function.cap");
//! let cap = Capture::open(path).unwrap();
//! let s = cap.summary().unwrap();
//! assert_eq!((s.peak_bytes, s.leaked_bytes), (14022, 3350));
//!
//! // The table of `memtrack table --by line`, into a buffer; frames as module+offset.
//! let options = ReportOptions { no_symbols: true, ..Default::default() };
//! let (mut diag, progress) = (Vec::new(), |_: &Capture, _: bool| -> ProgressGuard { Box::new(()) });
//! let mut r = Reporter { options, diag: &mut diag, progress: &progress };
//! let subject = Subject::open(path.as_ref(), None).unwrap();
//! let mut out = Vec::new();
//! memtrack_reader::report::table::table(
//!     &mut r, &subject, path.as_ref(), View::Peak, GroupBy::Line, 3, false, &mut out,
//! )
//! .unwrap();
//! let text = String::from_utf8(out).unwrap();
//! assert!(text.contains("live at the peak, 14,022 bytes (13.69 KiB) in 10 allocations"));
//! assert_eq!(text.lines().count(), 2 + 3);
//! ```

mod capture;
mod check;
mod compact;
mod diff;
mod export;
mod family;
mod follow;
mod mapped;
mod modinfo;
mod periodic;
mod plot;
pub mod pprof;
mod regions;
mod replay;
pub mod report;
mod stacks;
mod stats;
mod symbols;
mod tree;
mod views;
mod window;

pub use capture::{Capture, Checkpoints, ChunkRef, Event, ReadError, Warning};
pub use check::{Budget, Contributor, LimitResult, ProcessShare};
pub use compact::{compact_file, Compacted};
pub use diff::{Diff, DiffRow, DiffSampling, DiffSide, DiffStack};
pub use export::JsonExport;
pub use family::{
    child_captures, shell_command, shell_quote, ChildCapture, Process, ProcessFigures, ProcessTree,
};
pub use follow::{
    Follower, History, Horizon, LiveRow, Measure, Point, Poll, BEHIND_SETTLE_NS, HISTORY_SECONDS,
    SETTLE_NS,
};
pub use mapped::{FileFigures, MappedSet};
pub use memtrack_format::{
    AllocKind, Checkpoint, ColumnEncoding, DroppedProcess, EndReason, EventKind, Header, Module,
    ModulesRecord,
};
pub use periodic::{
    Every, ExactFigures, IntervalFigures, IntervalProfile, PeriodicOutcome, SampledFigures,
    SkipReason, Skipped, Until,
};
pub use plot::Plot;
pub use regions::{Occurrence, RegionBudget, RegionFigures, RegionSort, Regions};
pub use replay::{Replay, Replayed, SiteTotal, Summary};
pub use stacks::StackTable;
pub use stats::{Bucket, FileMapStat, KindStat, Stats};
pub use symbols::{Frame, Symbolizer};
pub use tree::TreeNode;
pub use views::{GroupBy, TableRow, View, ViewSites};
pub use window::{
    duration_text, parse_seconds, seconds_text, utc_time_text, Span, Window, WindowError,
    WindowFigures,
};

/// `1234567` -> `1,234,567`.
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Formats a byte count in binary units, e.g. `1.50 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_units() {
        assert_eq!(super::human_bytes(0), "0 B");
        assert_eq!(super::human_bytes(1023), "1023 B");
        assert_eq!(super::human_bytes(1536), "1.50 KiB");
        assert_eq!(super::human_bytes(3 << 30), "3.00 GiB");
        assert_eq!(super::grouped(0), "0");
        assert_eq!(super::grouped(1234567), "1,234,567");
        assert_eq!(super::grouped(100), "100");
    }
}
