//! `memtrack tree`: the call tree of a view, largest branches first.

use super::{bytes, count, Reporter, Subject};
use crate::View;
use anyhow::Result;
use std::io::Write;
use std::path::Path;

/// Writes the call tree of `view`, `depth` levels, branches under `min_percent` of the view
/// folded.
pub fn tree(
    r: &mut Reporter,
    subject: &Subject,
    file: &Path,
    view: View,
    depth: usize,
    min_percent: f64,
    out: &mut impl Write,
) -> Result<()> {
    let parts = r.parts(subject, view, false, false);
    let mut root = crate::TreeNode {
        name: "[all]".into(),
        ..Default::default()
    };
    for part in &parts {
        let mut sym = r.symbolizer(part.cap);
        let mut t = part.view.call_tree(&mut sym);
        r.warn(&sym.warnings);
        match &part.label {
            None => root.children.append(&mut t.children),
            Some(label) => {
                t.name = label.clone();
                root.children.push(t);
            }
        }
        root.bytes += part.view.bytes;
        root.allocations += part.view.allocations;
    }
    root.children
        .sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    writeln!(
        out,
        "memtrack tree of {}: {}, {} in {}",
        file.display(),
        r.view_title(view, subject, &parts),
        bytes(root.bytes),
        count(root.allocations, view.unit())
    )?;
    writeln!(
        out,
        "{:>8} {:>11} {:>10}  call path",
        "share", "bytes", "count"
    )?;
    write!(out, "{}", root.render(depth, min_percent / 100.0))?;
    Ok(())
}
