//! Comparing a view of two captures: what grew and what shrank, by stack and by allocating
//! location. Stacks are matched by their symbolized frames (function names, and Python frames'
//! paths relative to the program's directory), never by addresses: two runs load their code at
//! different addresses. Locations are matched by function and a file path that does not depend
//! on where the program was checked out.

use crate::views::{GroupBy, TableRow, View, ViewSites};
use crate::{Capture, Symbolizer};
use std::collections::BTreeMap;

/// One stack (folded, root first) with its bytes in the base and the new capture.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiffStack {
    pub stack: String,
    pub before: u64,
    pub after: u64,
}

impl DiffStack {
    /// The stack on one line, innermost frame first (`alloc <- handler (svc.py:12) <- main`): of
    /// the native frames below the innermost Python frame (the allocator's and interpreter's
    /// path) only the first two, then at most `max` frames in all and a count of the rest.
    pub fn one_line(&self, max: usize) -> String {
        let frames: Vec<&str> = self.stack.split(';').rev().collect();
        // Python frames are labelled `qualname (path.py:LINE)` (or `<frozen abc>:LINE`);
        // native ones by their function alone.
        let python = |f: &str| {
            f.strip_suffix(')')
                .and_then(|f| f.rsplit_once(':'))
                .is_some_and(|(head, line)| {
                    head.contains(" (")
                        && !line.is_empty()
                        && line.bytes().all(|b| b.is_ascii_digit())
                })
        };
        // The allocator's path to the innermost Python frame, cut to its first two frames.
        let (head, tail) = match frames.iter().position(|f| python(f)) {
            Some(i) if i > 3 => (&frames[..2], &frames[i..]),
            _ => (&frames[..0], &frames[..]),
        };
        let mut shown: Vec<&str> = head.to_vec();
        if !head.is_empty() {
            shown.push("...");
        }
        let room = max.saturating_sub(shown.len());
        shown.extend(tail.iter().take(room));
        let mut line = shown.join(" <- ");
        if tail.len() > room {
            line.push_str(&format!(" <- ... ({} more)", tail.len() - room));
        }
        line
    }
}

/// One allocating location (function and file:line) in both captures.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DiffRow {
    pub function: String,
    /// As reports show it: a Python file relative to the program's directory or its library
    /// folder, a native source file by its name alone (absolute paths differ between checkouts).
    pub file: Option<String>,
    pub line: Option<u32>,
    pub before: u64,
    pub after: u64,
    /// `after - before`.
    pub delta: i64,
    /// The change relative to `before` (None when `before` is 0).
    pub percent: Option<f64>,
}

/// The comparison of one view of two captures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Diff {
    pub view: &'static str,
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub before_allocations: u64,
    pub after_allocations: u64,
    /// Every stack of either capture, largest change first.
    pub stacks: Vec<DiffStack>,
    /// Allocating locations, largest change first.
    pub locations: Vec<DiffRow>,
    /// Warnings of the symbolizers (stale binaries, missing files).
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// `--at` or `--between`: both sides are of this window of time, each on its own
    /// capture's clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::Window>,
    /// When either capture is sampled: the totals are estimates, with these errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<DiffSampling>,
}

/// The sampling of the two sides of a diff (`sample_rate_bytes` null: a full capture).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DiffSampling {
    pub before_sample_rate_bytes: Option<u64>,
    pub after_sample_rate_bytes: Option<u64>,
    /// Standard errors of the two totals (0 where not known: a full capture, or a view
    /// whose error is not tracked).
    pub before_stderr_bytes: u64,
    pub after_stderr_bytes: u64,
}

impl DiffSampling {
    /// The standard error of the growth: sqrt(se1² + se2²).
    pub fn growth_stderr(&self) -> u64 {
        let (a, b) = (
            self.before_stderr_bytes as f64,
            self.after_stderr_bytes as f64,
        );
        (a * a + b * b).sqrt().round() as u64
    }
}

impl Diff {
    /// Growth of the view's total, in bytes (negative when it shrank).
    pub fn growth(&self) -> i64 {
        self.after_bytes as i64 - self.before_bytes as i64
    }

    /// Growth relative to the base's total, in percent (None when the base's total is 0).
    pub fn growth_percent(&self) -> Option<f64> {
        (self.before_bytes > 0).then(|| self.growth() as f64 * 100.0 / self.before_bytes as f64)
    }

    /// The stacks that grew most, largest growth first.
    pub fn grown(&self, n: usize) -> Vec<&DiffStack> {
        let mut v: Vec<&DiffStack> = self.stacks.iter().filter(|s| s.after > s.before).collect();
        v.sort_by(|a, b| {
            (b.after - b.before)
                .cmp(&(a.after - a.before))
                .then(a.stack.cmp(&b.stack))
        });
        v.truncate(n);
        v
    }
}

/// Function, file and line of an allocating location.
type LocationKey = (String, Option<String>, Option<u32>);

/// A file path that two checkouts of a program share: an absolute path (a native source file, a
/// Python file outside the program's directory) by its file name; a relative one (Python paths
/// are made relative to the program's directory or library folder) as it is.
fn portable(file: &str) -> String {
    if file.starts_with('/') {
        file.rsplit('/').next().unwrap_or(file).to_string()
    } else {
        file.to_string()
    }
}

fn change(before: u64, after: u64) -> u64 {
    before.abs_diff(after)
}

/// One process's view on one side of a diff; `label` (the process's command, without its pid,
/// so that two runs match) is put above its stacks when a side spans processes.
pub struct DiffSide<'a> {
    pub label: Option<String>,
    pub view: ViewSites,
    pub sym: &'a mut Symbolizer,
}

impl Diff {
    /// Compares `view` of `base` and `new`.
    pub fn between(base: &Capture, new: &Capture, view: View) -> Diff {
        let (mut sb, mut sn) = (Symbolizer::new(base), Symbolizer::new(new));
        let b = DiffSide {
            label: None,
            view: base.view(view),
            sym: &mut sb,
        };
        let n = DiffSide {
            label: None,
            view: new.view(view),
            sym: &mut sn,
        };
        Diff::of_sides(vec![b], vec![n], view)
    }

    /// Compares two sides, each one or more processes' views.
    pub fn of_sides<'a>(
        mut base: Vec<DiffSide<'a>>,
        mut new: Vec<DiffSide<'a>>,
        view: View,
    ) -> Diff {
        let mut stacks: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (sides, after) in [(&mut base, false), (&mut new, true)] {
            for side in sides.iter_mut() {
                for (s, b) in side.view.folded(side.sym) {
                    let s = match &side.label {
                        Some(l) => format!("{};{s}", l.replace(';', ":")),
                        None => s,
                    };
                    let e = stacks.entry(s).or_default();
                    if after {
                        e.1 += b;
                    } else {
                        e.0 += b;
                    }
                }
            }
        }
        let mut stacks: Vec<DiffStack> = stacks
            .into_iter()
            .map(|(stack, (before, after))| DiffStack {
                stack,
                before,
                after,
            })
            .collect();
        stacks.sort_by(|a, b| {
            change(b.before, b.after)
                .cmp(&change(a.before, a.after))
                .then(a.stack.cmp(&b.stack))
        });

        let key = |r: &TableRow| (r.function.clone(), r.file.as_deref().map(portable), r.line);
        let mut rows: BTreeMap<LocationKey, (u64, u64)> = BTreeMap::new();
        for side in base.iter_mut() {
            for r in side.view.table(side.sym, GroupBy::Line) {
                rows.entry(key(&r)).or_default().0 += r.total_bytes;
            }
        }
        for side in new.iter_mut() {
            for r in side.view.table(side.sym, GroupBy::Line) {
                rows.entry(key(&r)).or_default().1 += r.total_bytes;
            }
        }
        let mut locations: Vec<DiffRow> = rows
            .into_iter()
            .map(|((function, file, line), (before, after))| DiffRow {
                function,
                file,
                line,
                before,
                after,
                delta: after as i64 - before as i64,
                percent: (before > 0)
                    .then(|| (after as f64 - before as f64) * 100.0 / before as f64),
            })
            .collect();
        locations.sort_by(|a, b| {
            change(b.before, b.after)
                .cmp(&change(a.before, a.after))
                .then(a.function.cmp(&b.function))
        });
        let mut warnings: Vec<String> = Vec::new();
        for side in base.iter().chain(new.iter()) {
            for w in &side.sym.warnings {
                if !warnings.contains(w) {
                    warnings.push(w.clone());
                }
            }
        }
        let sum = |sides: &[DiffSide<'_>], f: fn(&ViewSites) -> u64| -> u64 {
            sides.iter().map(|s| f(&s.view)).sum()
        };
        Diff {
            window: None,
            sampling: None,
            view: view.name(),
            before_bytes: sum(&base, |v| v.bytes),
            after_bytes: sum(&new, |v| v.bytes),
            before_allocations: sum(&base, |v| v.allocations),
            after_allocations: sum(&new, |v| v.allocations),
            stacks,
            locations,
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DiffStack;

    fn line(stack: &str, max: usize) -> String {
        DiffStack {
            stack: stack.into(),
            before: 0,
            after: 1,
        }
        .one_line(max)
    }

    #[test]
    fn one_line_reads_innermost_first_and_cuts_the_allocator_path() {
        assert_eq!(line("main;outer;leaf", 6), "leaf <- outer <- main");
        assert_eq!(line("a;b;c;d;e;f;g;h", 3), "h <- g <- f <- ... (5 more)");
        // Four native frames below the innermost Python frame: the first two are kept.
        assert_eq!(
            line(
                "<module> (svc.py:40);handler (app/h.py:12);type_call;bytearray___init__;bytearray___init___impl;PyByteArray_Resize",
                6
            ),
            "PyByteArray_Resize <- bytearray___init___impl <- ... <- handler (app/h.py:12) <- <module> (svc.py:40)"
        );
        // Frozen modules are Python frames too; C++ signatures are not.
        assert_eq!(
            line(
                "exec_module (<frozen abc>:7);f(int);g(int);h(int);operator new(unsigned long)",
                6
            ),
            "operator new(unsigned long) <- h(int) <- ... <- exec_module (<frozen abc>:7)"
        );
        assert_eq!(
            line(
                "main;ns::f(int);ns::g(int);ns::h(int);alloc(unsigned long)",
                2
            ),
            "alloc(unsigned long) <- ns::h(int) <- ... (3 more)"
        );
    }
}
