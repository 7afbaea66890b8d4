//! `memtrack report`: one self-contained HTML page (no network at view time) with the summary,
//! the heap and resident memory over time, and the flamegraph and table of any time window and
//! view, computed in the browser from the data [`data`] embeds.

mod data;

pub use data::{Data, BUCKETS, ROW_BUDGET};

use super::{Reporter, Subject};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

const PAGE: &str = include_str!("html/report.html");
const CSS: &str = include_str!("html/report.css");
const JS: &str = include_str!("html/report.js");

/// A report computed and ready to write.
pub struct HtmlReport {
    data: Data,
    title: String,
}

impl HtmlReport {
    /// The data the page embeds.
    pub fn data(&self) -> &Data {
        &self.data
    }

    /// What the page holds, for the caller's message.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} stacks, {} intervals, {} time buckets",
            crate::grouped(self.data.stack_node.len() as u64),
            crate::grouped(self.data.row_stack.len() as u64),
            self.data.heap.len()
        );
        if self.data.pruned_stacks > 0 {
            s += &format!(
                "; {} small stacks merged",
                crate::grouped(self.data.pruned_stacks as u64)
            );
        }
        s
    }

    /// Writes the page into `w`; `out` names it in errors.
    pub fn write(&self, w: &mut impl Write, out: &Path) -> Result<()> {
        let json = serde_json::to_string(&self.data)?;
        // Inside <script>: `</` would end the element; `<\/` is the same JSON string.
        let json = json.replace("</", "<\\/");
        let title = self
            .title
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let (head, rest) = PAGE
            .split_once("{{DATA}}")
            .expect("the page has a data slot");
        let head = head.replace("{{TITLE}}", &title).replace("{{CSS}}", CSS);
        let tail = rest.replace("{{JS}}", JS);
        (|| -> std::io::Result<()> {
            w.write_all(head.as_bytes())?;
            w.write_all(json.as_bytes())?;
            w.write_all(tail.as_bytes())?;
            w.flush()
        })()
        .with_context(|| format!("cannot write {}", out.display()))
    }
}

/// Computes the report of the subject's process: the one `--pid` names, else the launched one
/// (a page shows one process of a tree; it says which).
pub fn report(r: &mut Reporter, subject: &Subject) -> Result<HtmlReport> {
    report_with(r, subject, ROW_BUDGET)
}

/// [`report`] with stacks merged past `row_budget` interval rows instead of [`ROW_BUDGET`].
pub fn report_with(r: &mut Reporter, subject: &Subject, row_budget: usize) -> Result<HtmlReport> {
    let cap = subject.main_capture();
    let process = subject.one().unwrap_or(subject.tree.root());
    let progress = r.reading(cap, false);
    let summary = cap.summary()?;
    let mut sym = r.symbolizer(cap);
    // The page switches to Python frames itself: the tree keeps every frame.
    sym.python_only = false;
    let command = crate::shell_command(&process.argv);
    let recorded = subject
        .tree
        .processes
        .iter()
        .filter(|p| p.has_capture())
        .count();
    let header = data::Header {
        command: command.clone(),
        pid: summary.pid,
        duration_seconds: summary.duration_seconds,
        peak_bytes: summary.peak_bytes,
        peak_time_seconds: summary.peak_time_seconds,
        peak_rss_bytes: summary.peak_rss_bytes,
        peak_rss_time_seconds: summary.peak_rss_time_seconds,
        peak_mapped_bytes: summary.peak_mapped_bytes,
        peak_mapped_time_seconds: summary.peak_mapped_time_seconds,
        leaked_bytes: summary.leaked_bytes,
        leaked_allocations: summary.leaked_allocations,
        leaks_measured_at: summary.leaks_measured_at,
        total_allocations: summary.total_allocations,
        total_bytes: summary.total_bytes,
        complete: summary.complete,
        end_reason: summary.end_reason,
        threads: summary.threads,
        python_only: r.options.python_only,
        note: {
            let notes: Vec<String> = [
                (recorded > 1).then(|| {
                    format!("one process of {recorded} recorded (memtrack report --pid PID shows another)")
                }),
                cap.attached.map(|a| {
                    format!(
                        "recorded since {} at {}: allocations made before are not included, and what is live at the end is what the recording allocated and had not freed when it stopped",
                        match a.how {
                            memtrack_format::AttachHow::Attach => "memtrack attach",
                            memtrack_format::AttachHow::InProcess => "memtrack_start in the process",
                        },
                        crate::utc_time_text(cap.header.start_unix_ns)
                    )
                }),
                cap.sample_rate().map(|rate| {
                    format!(
                        "heap figures are ESTIMATES from allocations sampled at {} (peak ± {}, leaks ± {}); temporary allocations are not meaningful",
                        crate::human_bytes(rate),
                        crate::human_bytes(summary.peak_stderr_bytes),
                        crate::human_bytes(summary.leaked_stderr_bytes)
                    )
                }),
            ]
            .into_iter()
            .flatten()
            .collect();
            (!notes.is_empty()).then(|| notes.join("; "))
        },
        sample_rate_bytes: cap.sample_rate(),
    };
    let data = data::build(cap, &mut sym, header, row_budget);
    drop(progress);
    r.warn(&sym.warnings);
    Ok(HtmlReport {
        data,
        title: command,
    })
}
