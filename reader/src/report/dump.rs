//! `memtrack dump`: every record and event of a capture in order, for debugging captures.

use crate::Capture;
use std::io::Write;

/// Writes every record and event of `cap`.
pub fn dump(cap: &Capture, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{:?}", cap.header)?;
    for m in &cap.modules {
        writeln!(out, "modules at seq {}: {} modules", m.seq, m.modules.len())?;
        for x in &m.modules {
            writeln!(
                out,
                "  {:#x} {} build-id {}",
                x.base,
                x.path,
                x.build_id
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )?;
        }
    }
    for r in &cap.rss {
        writeln!(
            out,
            "rss at seq {} time {}: {} bytes",
            r.seq, r.time, r.rss_bytes
        )?;
    }
    let mut stacks = crate::StackTable::default();
    let events: Vec<_> = cap.events(&mut stacks).collect();
    for ev in events {
        write!(
            out,
            "{:>8} {:>10} tid {:>7} {:?}",
            ev.seq, ev.time, ev.tid, ev.kind
        )?;
        if let crate::EventKind::Alloc { stack, .. } = ev.kind {
            write!(
                out,
                " [{}]",
                stacks
                    .frames(stack)
                    .iter()
                    .map(|a| format!("{a:#x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )?;
        }
        writeln!(out)?;
    }
    writeln!(out, "end: {:?}; warnings: {:?}", cap.end, cap.warnings)?;
    Ok(())
}
