//! `memtrack stats`: sizes, allocator functions, top locations, temporary allocations.

use super::{bytes, count, plural, Reporter, Subject};
use crate::{grouped, human_bytes, GroupBy, TableRow};
use anyhow::Result;
use std::io::Write;

/// Writes the allocation statistics of `subject`'s process (the launched one of a tree): text,
/// or one JSON object.
pub fn stats(r: &mut Reporter, subject: &Subject, json: bool, out: &mut impl Write) -> Result<()> {
    let cap = subject.main_capture();
    if subject.one().is_none() && !json {
        r.note(format_args!(
            "memtrack: stats of the launched process {}; --pid PID for another process of the tree\n",
            subject.tree.root().label()
        ));
    }
    let progress = r.reading(cap, json);
    let st = cap.stats();
    drop(progress);
    let mut sym = r.symbolizer(cap);
    let mut by_count = st.allocated.table(&mut sym, GroupBy::Function);
    let by_bytes: Vec<_> = by_count.iter().take(5).cloned().collect();
    by_count.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.total_bytes.cmp(&a.total_bytes))
    });
    by_count.truncate(5);
    let temporary = st.temporary.table(&mut sym, GroupBy::Function);
    r.warn(&sym.warnings);
    if json {
        let v = serde_json::json!({
            "capture": cap.path().display().to_string(),
            "pid": cap.header.pid,
            "sampled": cap.sampled(),
            "sample_rate_bytes": cap.sample_rate(),
            "total_allocations": st.allocated.allocations,
            "total_bytes": st.allocated.bytes,
            "histogram": st.histogram,
            "by_function": st.by_function,
            "top_by_count": by_count,
            "top_by_bytes": by_bytes,
            "temporary_allocations": st.temporary.allocations,
            "temporary_bytes": st.temporary.bytes,
            "top_temporary": temporary.iter().take(5).collect::<Vec<_>>(),
            "mapped_files": st.mapped_files,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(out, "memtrack stats of {}", cap.path().display())?;
    if let Some(rate) = cap.sample_rate() {
        writeln!(
            out,
            "  a sampled capture (one sample per {} allocated on average): allocation counts and sizes below are estimates where weighted, else of the recorded samples (large blocks are recorded more often than small ones); temporary allocations are not meaningful under sampling",
            crate::human_bytes(rate)
        )?;
    }
    writeln!(
        out,
        "  {}, {} requested; {} temporary ({})",
        count(st.allocated.allocations, "allocation"),
        bytes(st.allocated.bytes),
        grouped(st.temporary.allocations),
        bytes(st.temporary.bytes)
    )?;
    writeln!(out, "\nallocation sizes")?;
    let most = st
        .histogram
        .iter()
        .map(|b| b.count)
        .max()
        .unwrap_or(1)
        .max(1);
    for b in &st.histogram {
        let bar = "#".repeat(((b.count * 40).div_ceil(most)) as usize);
        writeln!(
            out,
            "  {:>10} .. {:<10} {:>12}  {bar}",
            human_bytes(b.min),
            human_bytes(b.max),
            grouped(b.count)
        )?;
    }
    writeln!(out, "\nby allocator function")?;
    for k in &st.by_function {
        writeln!(
            out,
            "  {:<16} {:>12} {}  {}",
            k.function,
            grouped(k.count),
            plural(k.count, "call"),
            bytes(k.bytes)
        )?;
    }
    by_calls(out, "top locations by count", &by_count)?;
    writeln!(out, "\ntop locations by bytes")?;
    for row in &by_bytes {
        writeln!(
            out,
            "  {:>12}  {:>12} {}  {}",
            human_bytes(row.total_bytes),
            grouped(row.count),
            plural(row.count, "call"),
            row.function
        )?;
    }
    let temporary = &temporary[..temporary.len().min(5)];
    by_calls(out, "temporary allocations", temporary)?;
    if !st.mapped_files.is_empty() {
        writeln!(out, "\nfile-backed mappings (mmap)")?;
        writeln!(
            out,
            "  {:>12}  {:>12}  {:>12}  {:>10}  file",
            "peak", "mapped", "at exit", "mappings"
        )?;
        for f in &st.mapped_files {
            writeln!(
                out,
                "  {:>12}  {:>12}  {:>12}  {:>10}  {}",
                human_bytes(f.peak_bytes),
                human_bytes(f.mapped_bytes),
                human_bytes(f.at_exit_bytes),
                grouped(f.mappings),
                f.file
            )?;
        }
    }
    Ok(())
}

/// A heading and rows of `calls  bytes  function`.
fn by_calls(out: &mut impl Write, heading: &str, rows: &[TableRow]) -> Result<()> {
    writeln!(out, "\n{heading}")?;
    for row in rows {
        writeln!(
            out,
            "  {:>12} {}  {:>12}  {}",
            grouped(row.count),
            plural(row.count, "call"),
            human_bytes(row.total_bytes),
            row.function
        )?;
    }
    Ok(())
}
