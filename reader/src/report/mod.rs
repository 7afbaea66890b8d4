//! The reports of the `memtrack` command, rendered as text, JSON and SVG.
//!
//! Each submodule renders one report into a writer it is given; none prints, reads the
//! environment or keeps global state. What the command line chose arrives as a
//! [`ReportOptions`] value inside a [`Reporter`], which also carries where warnings go and the
//! progress display of long reads. Files and standard output are the caller's: a report that
//! has something to compute before it writes (a flamegraph, a diff, an export) is split into a
//! step that computes and a step that writes, so that the caller creates its output file only
//! when there is something to put in it, as before.

pub mod check;
pub mod diff;
pub mod dump;
pub mod export;
pub mod flamegraph;
pub mod html;
pub mod plot;
pub mod regions;
pub mod stats;
pub mod subject;
pub mod summary;
pub mod table;
pub mod tree;

use crate::{grouped, human_bytes, Capture, Symbolizer, View};
use std::io::Write;
use std::path::Path;
pub use subject::{being_written, Part, Subject};

/// The switches that change every report (the command line's global options).
#[derive(Clone, Debug, Default)]
pub struct ReportOptions {
    /// Stacks keep only their Python frames (`--python-only`).
    pub python_only: bool,
    /// Stacks keep the interpreter's own frames around Python frames (`--all-frames`).
    pub all_frames: bool,
    /// Functions never named as the allocating one (`--skip-function`, globs).
    pub skip_functions: Vec<String>,
    /// Frames stay module+offset: no file is read (`MEMTRACK_SYMBOLIZE=0`; the same output on
    /// every machine).
    pub no_symbols: bool,
}

impl ReportOptions {
    /// The symbolizer of `cap` with these options.
    pub fn symbolizer(&self, cap: &Capture) -> Symbolizer {
        let mut sym = Symbolizer::new(cap);
        sym.python_only = self.python_only;
        sym.all_frames = self.all_frames;
        sym.skip_functions = self.skip_functions.clone();
        if self.no_symbols {
            sym.read_no_files();
        }
        sym
    }
}

/// Something shown while a long read is under way; dropping it ends the display.
pub type ProgressGuard = Box<dyn std::any::Any>;

/// What every report is given besides its subject: the options, where warnings go, and the
/// progress display of long reads.
pub struct Reporter<'a> {
    pub options: ReportOptions,
    /// Warnings and notes for the person at the terminal (the command's standard error).
    pub diag: &'a mut dyn Write,
    /// Starts the display of a long read of a capture; `quiet` when the report's own output
    /// is machine-readable (JSON), where the command shows none.
    pub progress: &'a dyn Fn(&Capture, bool) -> ProgressGuard,
}

impl Reporter<'_> {
    /// The symbolizer of `cap` with the report's options.
    pub fn symbolizer(&self, cap: &Capture) -> Symbolizer {
        self.options.symbolizer(cap)
    }

    /// The symbolizer's warnings (a binary changed since the capture, say).
    pub fn warn(&mut self, warnings: &[String]) {
        for w in warnings {
            // A standard error that cannot be written to has nobody to tell.
            let _ = writeln!(self.diag, "memtrack: warning: {w}");
        }
    }

    /// A note on the diagnostics stream.
    pub fn note(&mut self, args: std::fmt::Arguments) {
        let _ = self.diag.write_fmt(args);
    }

    /// Shows the read of `cap` under way until the returned guard is dropped.
    pub fn reading(&self, cap: &Capture, quiet: bool) -> ProgressGuard {
        (self.progress)(cap, quiet)
    }

    /// A report's view of its subject, with the progress display while it is computed.
    pub fn parts<'s>(
        &self,
        subject: &'s Subject,
        view: View,
        with_max: bool,
        quiet: bool,
    ) -> Vec<Part<'s>> {
        let progress = self.reading(subject.main_capture(), quiet);
        let parts = subject.parts(view, with_max);
        drop(progress);
        parts
    }

    /// The parts' folded stacks, each below its process's root frame when there are several.
    pub fn folded_parts(&mut self, parts: &[Part<'_>]) -> Vec<(String, u64)> {
        let mut lines = Vec::new();
        for part in parts {
            let mut sym = self.symbolizer(part.cap);
            let mut l = part.view.folded(&mut sym);
            self.warn(&sym.warnings);
            if let Some(label) = &part.label {
                let label = label.replace(';', ":");
                for (path, _) in &mut l {
                    *path = format!("{label};{path}");
                }
            }
            lines.extend(l);
        }
        lines.sort();
        lines
    }

    /// The view's words for a title: the peak of a tree is its combined peak; in a window,
    /// the window and (`--between`'s peak) when its high-water mark was, from `parts`.
    pub fn view_title(&self, view: View, subject: &Subject, parts: &[Part<'_>]) -> String {
        let words = match (subject.window, view, subject.one()) {
            (Some(w), _, one) => {
                let at = parts.iter().find_map(|p| p.view.at_seconds);
                let words = window_words(view, &w, at);
                match (view, one) {
                    (View::Peak, None) if !w.is_at() => {
                        words.replacen("at the peak", "at the combined peak", 1)
                    }
                    _ => words,
                }
            }
            (None, View::Peak, None) if !subject.tree.combined_known => {
                "live at each process's own peak (aggregated: their sum bounds the combined peak)"
                    .to_string()
            }
            (None, View::Peak, None) => "live at the combined peak".to_string(),
            // A recording of a running process that was stopped: the blocks are the ones made
            // while it recorded and not freed by the stop, not the program's leaks.
            (None, View::Leaks | View::LeaksAtExit, _)
                if subject.main_capture().attached.is_some()
                    && subject
                        .main_capture()
                        .end
                        .is_some_and(|e| e.reason == memtrack_format::EndReason::Detached) =>
            {
                "allocated while recording and still live when it stopped".to_string()
            }
            _ => view_words(view).to_string(),
        };
        // What was allocated before a recording began in a running process is not in it.
        let words = match subject.main_capture().attached.map(|a| a.how) {
            Some(memtrack_format::AttachHow::Attach) => format!("{words}, recorded since attach"),
            Some(memtrack_format::AttachHow::InProcess) => {
                format!("{words}, recorded since memtrack_start")
            }
            None => words,
        };
        let words = match &subject.main_capture().checkpoint {
            Some(c) => format!(
                "{words}, aggregated (checkpoint {}{})",
                c.number,
                if c.last {
                    ", final"
                } else {
                    ", process cut off"
                }
            ),
            None => words,
        };
        let words = match subject.main_capture().sample_rate() {
            Some(rate) => format!("{words}, {}", sampled_words(view, rate)),
            None => words,
        };
        match &subject.region {
            Some(region) => self.with_frames(&format!("{words}, region {region}")),
            None => self.with_frames(&words),
        }
    }

    /// `words`, saying when only Python frames are shown.
    pub(crate) fn with_frames(&self, words: &str) -> String {
        if self.options.python_only {
            format!("{words}, Python frames only")
        } else {
            words.into()
        }
    }
}

/// What the figures of a sampled capture are, in words (`rate`: mean bytes between samples).
pub fn sampled_words(view: View, rate: u64) -> String {
    let rate = crate::human_bytes(rate);
    match view {
        View::Temporary => format!(
            "NOT MEANINGFUL under sampling (a sampled block's neighbours were not recorded; sampled at {rate})"
        ),
        View::Mapped | View::MappedLeaks | View::MappedAllocated => {
            format!("exact (mmap is not sampled; the heap was sampled at {rate})")
        }
        _ => format!("estimated from allocations sampled at {rate}"),
    }
}

/// What a view holds, in words.
pub fn view_words(view: View) -> &'static str {
    match view {
        View::Peak => "live at the peak",
        View::Leaks => "leaked (left live by the program)",
        View::LeaksAtExit => "live at exit",
        View::Allocated => "allocated",
        View::Temporary => "temporary (freed before the thread allocated again)",
        View::Mapped => "mapped at the mapped-memory peak",
        View::MappedLeaks => "still mapped at exit",
        View::MappedAllocated => "mapped (every mapping made)",
    }
}

/// What a view holds in a window, in words: `live at 1.200 s`, `live at the peak between
/// 1.000 s and 1.500 s, at 1.003 s` (`at`: when the peak was), `allocated between ...`.
pub fn window_words(view: View, w: &crate::Window, at: Option<f64>) -> String {
    let span = w.words();
    match view {
        View::Peak if w.is_at() => format!("live {span}"),
        View::Peak => match at {
            Some(t) => format!("live at the peak {span}, at {}", crate::seconds_text(t)),
            None => format!("live at the peak {span}"),
        },
        View::Allocated => format!("allocated {span}"),
        View::Leaks => format!("allocated {span} and left live by the program"),
        View::LeaksAtExit => format!("allocated {span} and still live at exit"),
        View::Temporary => {
            format!("temporary (freed before the thread allocated again), allocated {span}")
        }
        View::Mapped if w.is_at() => format!("mapped {span}"),
        View::Mapped => match at {
            Some(t) => format!(
                "mapped at the mapped-memory peak {span}, at {}",
                crate::seconds_text(t)
            ),
            None => format!("mapped at the mapped-memory peak {span}"),
        },
        View::MappedAllocated => format!("mapped (mappings made) {span}"),
        View::MappedLeaks => format!("mapped {span} and still mapped at exit"),
    }
}

/// `function (file.c:12)`, an absolute file shortened to its name (a relative one, such as a
/// Python file's `pkg/mod.py`, kept: its folders tell files apart); `function (file)` without a
/// line; the function alone without a file.
pub(crate) fn location_label(function: &str, file: Option<&str>, line: Option<u32>) -> String {
    let Some(f) = file else {
        return function.to_string();
    };
    let short = if f.starts_with('/') {
        Path::new(f)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        f.to_string()
    };
    match line {
        Some(l) => format!("{function} ({short}:{l})"),
        None => format!("{function} ({short})"),
    }
}

/// `1 allocation`, `2,048 allocations`: a count with its noun (plural with an `s`), for running
/// text (unpadded, unlike [`plural`]).
fn count(n: u64, noun: &str) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{} {noun}{s}", grouped(n))
}

/// The noun for `n` of it, padded to the plural's width (for columns).
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{noun} ")
    } else {
        format!("{noun}s")
    }
}

/// `512 bytes`, or `1,536 bytes (1.50 KiB)` from a KiB on.
fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{} bytes", grouped(n))
    } else {
        format!("{} bytes ({})", grouped(n), human_bytes(n))
    }
}

/// `+1.50 KiB`, `-12 B`.
fn signed_bytes(n: i64) -> String {
    if n < 0 {
        format!("-{}", human_bytes(n.unsigned_abs()))
    } else {
        format!("+{}", human_bytes(n as u64))
    }
}

/// An SVG that shows `title` and `note`: inferno refuses to draw a profile without counts.
fn empty_svg(w: &mut impl Write, title: &str, note: &str) -> std::io::Result<()> {
    let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;");
    write!(
        w,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"80\" font-family=\"Verdana, sans-serif\"><text x=\"600\" y=\"30\" text-anchor=\"middle\" font-size=\"16\">{}</text><text x=\"600\" y=\"60\" text-anchor=\"middle\" font-size=\"13\">{}</text></svg>\n",
        esc(title),
        esc(note)
    )
}
