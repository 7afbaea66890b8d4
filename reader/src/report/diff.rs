//! `memtrack diff`: a view of two captures compared, as a differential flamegraph, a table,
//! folded lines or JSON, and the verdict of a growth limit.

use super::{bytes, empty_svg, signed_bytes, view_words, Part, Reporter, Subject};
use crate::{human_bytes, Diff, DiffSide, Symbolizer, View};
use anyhow::Result;
use std::io::Write;
use std::path::Path;

/// A growth limit of `diff --fail-on-growth`.
#[derive(Clone, Copy, Debug)]
pub enum Growth {
    /// A percentage of the base's total.
    Percent(f64),
    Bytes(u64),
}

/// Compares `view` of the captures `base` and `new`. `pid` picks a process of the new
/// capture's tree; the base's tree is compared whole unless it has a process of the same
/// command.
pub fn compare(
    r: &mut Reporter,
    base: &Path,
    new: &Path,
    pid: Option<u32>,
    view: View,
) -> Result<Diff> {
    compare_in(r, base, new, pid, view, None, None)
}

/// [`compare`], both views restricted to the region `region` (`--region`): the new capture
/// must have it; a base without it compares as empty.
pub fn compare_in(
    r: &mut Reporter,
    base: &Path,
    new: &Path,
    pid: Option<u32>,
    view: View,
    region: Option<&str>,
    window: Option<crate::Window>,
) -> Result<Diff> {
    let (sb, mut sn) = (
        Subject::open(base, None)?,
        Subject::open(new, pid)?.with_region(region.map(str::to_string))?,
    );
    if let Some(note) = sn.with_window(window, Some(view))? {
        r.note(format_args!("memtrack: note: {}: {note}\n", new.display()));
    }
    let sb = match sn.one() {
        Some(p) if sb.tree.is_tree() => {
            let same = sb
                .tree
                .processes
                .iter()
                .find(|q| q.has_capture() && q.name() == p.name())
                .map(|q| q.pid);
            match same {
                Some(q) => Subject::open(base, Some(q))?,
                None => sb,
            }
        }
        _ => sb,
    };
    let mut sb = sb;
    sb.region = region.map(str::to_string);
    if let Some(note) = sb.with_window(window, Some(view))? {
        r.note(format_args!("memtrack: note: {}: {note}\n", base.display()));
    }
    if view == View::Peak {
        for subject in [&sb, &sn] {
            subject.refuse_aggregated_tree("the combined peak of a process tree")?;
        }
    }
    let (pb, pn) = (sb.parts(view, false), sn.parts(view, false));
    let mut syms: Vec<Symbolizer> = pb
        .iter()
        .chain(pn.iter())
        .map(|p| r.symbolizer(p.cap))
        .collect();
    let (syms_b, syms_n) = syms.split_at_mut(pb.len());
    fn side<'a>(parts: Vec<Part<'_>>, syms: &'a mut [Symbolizer]) -> Vec<DiffSide<'a>> {
        parts
            .into_iter()
            .zip(syms.iter_mut())
            .map(|(p, sym)| DiffSide {
                label: p.label.as_ref().map(|_| p.process.name()),
                view: p.view,
                sym,
            })
            .collect()
    }
    let window = sn.window;
    let (cb, cn) = (sb.main_capture(), sn.main_capture());
    let sampling = (cb.sampled() || cn.sampled()).then(|| {
        // The errors of whole-capture peak and leaks; a window's, a region's or the
        // allocated total's are not tracked (0).
        let plain = window.is_none() && region.is_none();
        let se = |c: &crate::Capture| match (c.sampled() && plain, view) {
            (true, View::Peak) => c.summary().map_or(0, |s| s.peak_stderr_bytes),
            (true, View::Leaks) => c.summary().map_or(0, |s| s.leaked_stderr_bytes),
            _ => 0,
        };
        crate::DiffSampling {
            before_sample_rate_bytes: cb.sample_rate(),
            after_sample_rate_bytes: cn.sample_rate(),
            before_stderr_bytes: se(cb),
            after_stderr_bytes: se(cn),
        }
    });
    let mut d = Diff::of_sides(side(pb, syms_b), side(pn, syms_n), view);
    d.window = window;
    d.sampling = sampling;
    r.warn(&d.warnings);
    Ok(d)
}

/// The stacks as `stack before after` lines.
pub fn folded(d: &Diff, out: &mut impl Write) -> std::io::Result<()> {
    for s in &d.stacks {
        writeln!(out, "{} {} {}", s.stack, s.before, s.after)?;
    }
    Ok(())
}

/// The locations whose bytes changed most, `top` of them.
pub fn table(d: &Diff, view: View, top: usize, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "memtrack diff of {}: {} -> {} ({}{})\n{:>12} {:>12} {:>13} {:>8}  Location",
        diff_words(d, view),
        human_bytes(d.before_bytes),
        human_bytes(d.after_bytes),
        signed_bytes(d.growth()),
        d.growth_percent()
            .map(|p| format!(", {p:+.1}%"))
            .unwrap_or_default(),
        "Before",
        "After",
        "Delta",
        "%"
    )?;
    for row in d.locations.iter().filter(|r| r.delta != 0).take(top) {
        // The file is already short (Python's relative to the program's directory).
        let location = match (&row.file, row.line) {
            (Some(f), Some(l)) => format!("{} ({f}:{l})", row.function),
            _ => row.function.clone(),
        };
        writeln!(
            out,
            "{:>12} {:>12} {:>13} {:>8}  {location}",
            human_bytes(row.before),
            human_bytes(row.after),
            signed_bytes(row.delta),
            row.percent
                .map(|p| format!("{p:+.1}%"))
                .unwrap_or_else(|| "new".into())
        )?;
    }
    Ok(())
}

/// Whether the view's total grew by more than `limit`, said on the diagnostics stream with
/// the stacks that grew most when it did; returns the exit code (0 within, 1 exceeded).
pub fn verdict(r: &mut Reporter, d: &Diff, view: View, limit: Growth) -> u8 {
    let (exceeded, said) = match limit {
        Growth::Percent(p) => (
            match d.growth_percent() {
                Some(g) => g > p,
                None => d.after_bytes > 0,
            },
            format!("{p}%"),
        ),
        Growth::Bytes(b) => (d.growth() > b as i64, bytes(b)),
    };
    // Sampled: growth counts only when it is also beyond the noise of the two estimates.
    let (exceeded, said) = match &d.sampling {
        Some(smp) => {
            let se = smp.growth_stderr();
            let beyond = d.growth() > 2 * se as i64;
            r.note(format_args!(
                "memtrack: note: a sampled capture: totals are estimates; growth fails the limit only when it is also above twice its standard error, 2·sqrt(se1² + se2²) = {}{}\n",
                bytes(2 * se),
                if se == 0 {
                    " (the error of this view is not tracked: the estimates are compared as they are)"
                } else {
                    ""
                }
            ));
            (exceeded && beyond, format!("{said} and 2 standard errors"))
        }
        None => (exceeded, said),
    };
    let grew = format!(
        "{}{}",
        signed_bytes(d.growth()),
        d.growth_percent()
            .map(|p| format!(" ({p:+.1}%)"))
            .unwrap_or_default()
    );
    if !exceeded {
        r.note(format_args!(
            "memtrack: {} grew by {grew}: within {said}\n",
            diff_words(d, view)
        ));
        return 0;
    }
    r.note(format_args!(
        "memtrack: {} grew by {grew}, more than {said}; the stacks that grew most:\n",
        diff_words(d, view)
    ));
    // One line a stack, innermost frame first.
    for s in d.grown(10) {
        r.note(format_args!(
            "  {} ({} -> {})  {}\n",
            signed_bytes(s.after as i64 - s.before as i64),
            human_bytes(s.before),
            human_bytes(s.after),
            s.one_line(6)
        ));
    }
    1
}

/// inferno's differential flamegraph: widths are the new capture's bytes; red grew, blue shrank.
pub fn svg(
    r: &Reporter,
    d: &Diff,
    view: View,
    base: &Path,
    new: &Path,
    w: &mut impl Write,
) -> Result<()> {
    let fold = |after: bool| {
        let mut t = String::new();
        for s in &d.stacks {
            let n = if after { s.after } else { s.before };
            if n > 0 {
                t.push_str(&format!("{} {n}\n", s.stack));
            }
        }
        t
    };
    let (before, after) = (fold(false), fold(true));
    let mut lines = Vec::new();
    inferno::differential::from_readers(
        inferno::differential::Options::default(),
        before.as_bytes(),
        after.as_bytes(),
        &mut lines,
    )?;
    let lines = String::from_utf8_lossy(&lines).into_owned();
    let mut opts = inferno::flamegraph::Options::default();
    let what = r.with_frames(&diff_words(d, view));
    opts.title = format!(
        "memtrack diff: {what}, {} -> {} ({} vs {})",
        human_bytes(d.before_bytes),
        human_bytes(d.after_bytes),
        new.display(),
        base.display()
    );
    opts.count_name = "bytes".into();
    opts.name_type = "Function:".into();
    // Cut long labels at their end: a Python frame's function comes first, its file:line last.
    opts.text_truncate_direction = inferno::flamegraph::TextTruncateDirection::Right;
    // Icicle, as `flamegraph` draws by default: the root on the first screen.
    opts.direction = inferno::flamegraph::Direction::Inverted;
    if lines.trim().is_empty() || d.after_bytes == 0 {
        empty_svg(
            w,
            &opts.title,
            "no allocations in this view of the new capture",
        )?;
        return Ok(());
    }
    inferno::flamegraph::from_lines(&mut opts, lines.lines(), w)
        .map_err(|e| anyhow::anyhow!("cannot draw the flamegraph: {e}"))?;
    Ok(())
}

/// What a diff compares, in words (with its window of time).
fn diff_words(d: &Diff, view: View) -> String {
    match &d.window {
        Some(w) => super::window_words(view, w, None),
        None => view_words(view).to_string(),
    }
}
