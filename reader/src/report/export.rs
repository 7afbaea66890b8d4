//! `memtrack export`: a view as folded stacks, a pprof profile or JSON.

use super::{Part, Reporter};
use crate::{JsonExport, Symbolizer};
use std::io::Write;

/// Writes `stack bytes` lines (from [`Reporter::folded_parts`]), line by line: the text
/// (hundreds of MB for deep stacks) is never held twice.
pub fn write_folded(lines: &[(String, u64)], w: &mut dyn Write) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(w);
    for (path, bytes) in lines {
        writeln!(w, "{path} {bytes}")?;
    }
    w.flush()
}

/// The parts as a gzipped pprof profile.
pub fn pprof(r: &mut Reporter, parts: &[Part<'_>]) -> std::io::Result<Vec<u8>> {
    let mut syms: Vec<Symbolizer> = parts.iter().map(|p| r.symbolizer(p.cap)).collect();
    let figures: Vec<_> = parts
        .iter()
        .map(|p| crate::pprof::view_values(p.cap, &p.view))
        .collect();
    let mut pieces = Vec::new();
    for ((part, sym), (values, allocated)) in parts.iter().zip(syms.iter_mut()).zip(&figures) {
        pieces.push(crate::pprof::Piece {
            cap: part.cap,
            values: values.clone(),
            stacks: &allocated.stacks,
            label: part.label.clone(),
            pid: part.process.pid,
            sym,
        });
    }
    let time = crate::pprof::ProfileTime::whole(parts[0].cap);
    let gz = crate::pprof::profile_gz_of(pieces, time, None)?;
    for sym in &syms {
        r.warn(&sym.warnings);
    }
    Ok(gz)
}

/// The parts as a JSON export, ready to write; `window`: the subject's (`--at`, `--between`).
pub fn json(r: &mut Reporter, parts: &[Part<'_>], window: Option<crate::Window>) -> JsonExport {
    let mut export = JsonExport::default();
    export.window = window.map(|w| (w, parts.iter().find_map(|p| p.view.at_seconds)));
    export.sample_rate = parts.iter().find_map(|p| p.cap.sample_rate());
    for part in parts {
        let mut sym = r.symbolizer(part.cap);
        let process = part.label.clone().map(|l| (part.process.pid, l));
        export.add(&part.view, &mut sym, process);
        r.warn(&sym.warnings);
    }
    export
}
