//! `memtrack table`: a ranked table of allocation sites.

use super::{bytes, count, location_label, Reporter, Subject};
use crate::{grouped, human_bytes, GroupBy, View};
use anyhow::Result;
use std::io::Write;
use std::path::Path;

#[allow(clippy::too_many_arguments)] // one per command-line option
/// Writes the `top` allocation sites of `view`, grouped by `group`: text, or a JSON array.
pub fn table(
    r: &mut Reporter,
    subject: &Subject,
    file: &Path,
    view: View,
    group: GroupBy,
    top: usize,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let parts = r.parts(subject, view, true, json);
    let mut rows = Vec::new();
    for part in &parts {
        let mut sym = r.symbolizer(part.cap);
        let mut rows_of = part.view.table(&mut sym, group);
        r.warn(&sym.warnings);
        if part.label.is_some() {
            for row in &mut rows_of {
                row.pid = Some(part.process.pid);
            }
        }
        rows.extend(rows_of);
    }
    rows.sort_by(|a, b| {
        b.total_bytes
            .cmp(&a.total_bytes)
            .then(a.pid.cmp(&b.pid))
            .then(a.function.cmp(&b.function))
    });
    rows.truncate(top);
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "memtrack table of {}: {}, {} in {}",
        file.display(),
        r.view_title(view, subject, &parts),
        bytes(parts.iter().map(|p| p.view.bytes).sum()),
        count(parts.iter().map(|p| p.view.allocations).sum(), view.unit())
    )?;
    if parts.len() > 1 {
        writeln!(out, "  processes:")?;
        for part in &parts {
            writeln!(
                out,
                "    pid {:<8} {:>11}  {}",
                part.process.pid,
                human_bytes(part.view.bytes),
                part.process.command()
            )?;
        }
    }
    writeln!(
        out,
        "{:>12} {:>12} {:>12} {:>9}  Location",
        "Total", "Max", "Avg", "Count"
    )?;
    for r in &rows {
        let mut location = match group {
            // Innermost first: `f <- g` reads "f, called from g".
            GroupBy::Stack => r
                .stack
                .iter()
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join(" <- "),
            _ => location_label(&r.function, r.file.as_deref(), r.line),
        };
        if let Some(pid) = r.pid {
            location = format!("[pid {pid}] {location}");
        }
        writeln!(
            out,
            "{:>12} {:>12} {:>12} {:>9}  {location}",
            human_bytes(r.total_bytes),
            // Unknown (an aggregated capture kept no block's size): never a made-up 0.
            r.max_bytes.map_or_else(|| "-".to_string(), human_bytes),
            human_bytes(r.avg_bytes),
            grouped(r.count)
        )?;
    }
    Ok(())
}
