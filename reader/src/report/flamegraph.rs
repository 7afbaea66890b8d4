//! `memtrack flamegraph`: a view as an icicle or flame graph (inferno's SVG).

use super::{empty_svg, Reporter, Subject};
use crate::{human_bytes, View};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// A flamegraph computed and ready to draw.
pub struct Flamegraph {
    opts: inferno::flamegraph::Options<'static>,
    /// `stack bytes` lines.
    text: Vec<String>,
    /// What the graph shows, for the caller's message.
    pub what: String,
}

/// Computes the flamegraph of `view`: `inverted` puts allocation sites at the root, `flame`
/// draws the root at the bottom (an icicle graph otherwise).
pub fn flamegraph(
    r: &mut Reporter,
    subject: &Subject,
    view: View,
    inverted: bool,
    flame: bool,
) -> Flamegraph {
    let parts = r.parts(subject, view, false, false);
    let lines = r.folded_parts(&parts);
    let total: u64 = parts.iter().map(|p| p.view.bytes).sum();
    let what = r.view_title(view, subject, &parts);
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!(
        "memtrack: {what}, {} ({})",
        human_bytes(total),
        subject.about()
    );
    opts.count_name = "bytes".into();
    opts.name_type = "Function:".into();
    // Cut long labels at their end: a Python frame's function comes first, its file:line last.
    opts.text_truncate_direction = inferno::flamegraph::TextTruncateDirection::Right;
    opts.colors =
        inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    opts.reverse_stack_order = inverted;
    // Icicle by default: the root and the widest frames on the first screen, however deep the
    // stacks (a Python service's reach 100 frames: as a flame graph its root is pages down).
    if !flame {
        opts.direction = inferno::flamegraph::Direction::Inverted;
    }
    let text: Vec<String> = lines.iter().map(|(p, b)| format!("{p} {b}")).collect();
    Flamegraph { opts, text, what }
}

impl Flamegraph {
    /// Draws the SVG into `w`; `out` names it in errors.
    pub fn write(mut self, w: &mut impl Write, out: &Path) -> Result<()> {
        if self.text.is_empty() {
            // inferno refuses a profile without counts: say so in an SVG of our own.
            empty_svg(w, &self.opts.title, "no allocations in this view")
                .with_context(|| format!("cannot write {}", out.display()))?;
        } else {
            inferno::flamegraph::from_lines(
                &mut self.opts,
                self.text.iter().map(String::as_str),
                w,
            )
            .map_err(|e| anyhow::anyhow!("cannot draw the flamegraph: {e}"))?;
        }
        Ok(())
    }
}
