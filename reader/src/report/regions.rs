//! `memtrack regions`: one row per region path, ranked, nested regions under their parent.

use super::{Reporter, Subject};
use crate::{grouped, human_bytes, Capture, RegionFigures, RegionSort, ViewSites};
use anyhow::Result;
use std::io::Write;
use std::path::Path;

/// The column heads of the text report.
pub const HEADER: &str =
    "Peak growth |   Max heap | Avg growth |  Allocated | Retained | Count | Time (s) | Region";

/// The figures of every region path of the subject's capture, with their top locations, in
/// the report's order. For a process tree without `--pid`, every recorded process that marked
/// regions (a pre-fork server's workers) counts: its rows are merged by path.
pub fn figures(r: &mut Reporter, subject: &Subject, sort: RegionSort) -> Vec<RegionFigures> {
    let mut per_process: Vec<Vec<RegionFigures>> = marking(subject)
        .into_iter()
        .map(|cap| process_figures(r, cap, sort))
        .collect();
    match per_process.len() {
        0 => Vec::new(),
        1 => per_process.pop().unwrap_or_default(),
        _ => crate::regions::merge_rows(per_process, sort),
    }
}

/// The captures a regions report reads: the one process's, or every recorded process's that
/// marked regions.
fn marking(subject: &Subject) -> Vec<&Capture> {
    match subject.one() {
        Some(_) => vec![subject.main_capture()],
        None => subject
            .tree
            .processes
            .iter()
            .filter_map(|p| p.capture.as_ref())
            .filter(|c| !c.region_names.is_empty())
            .collect(),
    }
}

fn process_figures(r: &mut Reporter, cap: &Capture, sort: RegionSort) -> Vec<RegionFigures> {
    let regions = cap.regions();
    let mut rows = regions.figures(cap, sort);
    let largest: Vec<usize> = rows.iter().map(|f| f.largest).collect();
    let (held, stacks) = cap.held_at_peaks(&regions, &largest);
    let mut view = ViewSites::new(crate::View::Peak, Vec::new(), stacks);
    let mut sym = r.symbolizer(cap);
    for (row, sites) in rows.iter_mut().zip(held) {
        view.sites = sites;
        row.top_locations = view.top_locations(&mut sym, 3);
    }
    r.warn(&sym.warnings);
    rows
}

/// Writes the regions report: text, or a JSON array (`[]` when the capture has no regions).
pub fn regions(
    r: &mut Reporter,
    subject: &Subject,
    file: &Path,
    sort: RegionSort,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let progress = r.reading(subject.main_capture(), json);
    let rows = figures(r, subject, sort);
    drop(progress);
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(
            out,
            "{}: no regions: the program marked none (memtrack_region_begin in C, memtrack_tracker::region in Rust, memtrack.region in Python)",
            file.display()
        )?;
        return Ok(());
    }
    let occurrences: u64 = rows.iter().map(|f| f.occurrences).sum();
    let procs = marking(subject).len();
    writeln!(
        out,
        "memtrack regions of {}: {} region{}, {} occurrence{}{}",
        file.display(),
        grouped(rows.len() as u64),
        if rows.len() == 1 { "" } else { "s" },
        grouped(occurrences),
        if occurrences == 1 { "" } else { "s" },
        if procs > 1 {
            format!(" in {procs} processes (peaks are each process's own; --pid PID shows one)")
        } else {
            String::new()
        }
    )?;
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|f| {
            [
                human_bytes(f.peak_growth_bytes),
                human_bytes(f.heap_peak_bytes),
                human_bytes(f.avg_growth_bytes),
                human_bytes(f.allocated_bytes),
                human_bytes(f.retained_bytes),
                grouped(f.occurrences),
                format!("{:.3}", f.total_seconds),
            ]
        })
        .collect();
    // The heads' widths unless a figure is wider ("1017.61 KiB"): columns stay aligned.
    let heads: Vec<&str> = HEADER.split(" | ").collect();
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([heads[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut head = String::new();
    for (i, w) in widths.iter().enumerate() {
        head.push_str(&format!("{:>w$} | ", heads[i].trim_start()));
    }
    head.push_str(heads[7]);
    writeln!(out, "{head}")?;
    for (f, c) in rows.iter().zip(&cells) {
        let open = if f.unclosed > 0 {
            format!(" ({} left open)", grouped(f.unclosed))
        } else {
            String::new()
        };
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            line.push_str(&format!("{:>w$} | ", c[i]));
        }
        writeln!(out, "{line}{}{}{open}", "  ".repeat(f.depth), f.name)?;
    }
    Ok(())
}
