//! `memtrack summary`: peak heap, leaks, totals, the process tree and the top locations.

use super::{bytes, count, location_label, plural, Reporter, Subject};
use crate::{grouped, human_bytes, Capture, Summary, View};
use anyhow::Result;
use std::io::Write;
use std::path::Path;

/// Writes the summary of `subject`, opened from `file` (`pid`: the `--pid` it was opened with):
/// text, or one JSON object.
pub fn summary(
    r: &mut Reporter,
    subject: &mut Subject,
    file: &Path,
    pid: Option<u32>,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let cap = subject.main_capture();
    let shown_file = cap.path().to_path_buf();
    let progress = r.reading(cap, json);
    // One replay gives the figures and what each stack held at the peak.
    let replayed = cap.replay_into(crate::Replay::tracking_sites(), u64::MAX);
    drop(progress);
    let s = cap.summarize(&replayed);
    let view = crate::ViewSites::new(View::Peak, replayed.replay.peak_by_stack(), replayed.stacks);
    // In a window (`--at`, `--between`): its figures, and the top locations of what was live
    // at its moment or high-water mark, of the main capture.
    let window = subject.span().map(|span| {
        let _progress = r.reading(cap, json);
        (
            cap.window_figures(&span),
            cap.window_view(View::Peak, &span),
        )
    });
    let mut sym = r.symbolizer(cap);
    let top = view.top_locations(&mut sym, 5);
    let window_top = window.as_ref().map(|(_, v)| v.top_locations(&mut sym, 5));
    r.warn(&sym.warnings);
    let parent_pid = cap.header.parent_pid;
    let chosen = cap.header.pid;
    let children = if parent_pid == 0 && pid.is_none() {
        crate::child_captures(file)
    } else {
        Vec::new()
    };
    if !subject.tree.analyzed {
        subject.tree.set_summary(s.clone());
    }
    let cap = subject.main_capture();
    let tree = &subject.tree;
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["capture"] = serde_json::Value::String(shown_file.display().to_string());
        v["encoding"] = if fast_chunks(cap) { "fast" } else { "compact" }.into();
        if let Some(a) = &cap.attached {
            v["attached"] = serde_json::json!({
                "how": match a.how {
                    memtrack_format::AttachHow::Attach => "attach",
                    memtrack_format::AttachHow::InProcess => "in_process",
                },
                "at_unix_seconds": cap.header.start_unix_ns as f64 / 1e9,
                "process_age_seconds": a.process_age_ms as f64 / 1000.0,
                "frees_of_earlier_blocks": s.unmatched_frees,
            });
        }
        if let Some(c) = &cap.checkpoint {
            v["aggregated"] = true.into();
            v["checkpoint"] = c.number.into();
            v["checkpoint_seconds"] = cap.seconds(c.time).into();
            v["checkpoint_final"] = c.last.into();
            v["checkpoint_rss_bytes"] = match c.rss_bytes {
                0 => serde_json::Value::Null,
                b => b.into(),
            };
            // Not kept by aggregated recording: unknown, not 0.
            let mut unknown = vec![
                "overlapping_allocations",
                "peak_mapped_bytes",
                "peak_mapped_time_seconds",
                "mapped_at_exit_bytes",
            ];
            if c.sample_rate > 0 {
                unknown.push("sampled_allocations");
            }
            for key in unknown {
                v[key] = serde_json::Value::Null;
            }
            if c.sample_rate > 0 {
                v["aggregated_sample_rate_bytes"] = c.sample_rate.into();
                v["peak_standard_error_bytes"] = c.peak_variance.sqrt().into();
                v["leaked_standard_error_bytes"] = c.heap_variance.sqrt().into();
            }
        }
        v["parent_pid"] = match parent_pid {
            0 => serde_json::Value::Null,
            p => p.into(),
        };
        v["children"] = serde_json::to_value(&children)?;
        v["top_peak_locations"] = locations_json(&top);
        v["processes"] = serde_json::to_value(tree.figures())?;
        if tree.combined_known {
            v["combined_peak_bytes"] = tree.combined_peak_bytes.into();
            v["combined_peak_time_seconds"] = tree.seconds(tree.combined_peak_mono_ns).into();
        } else {
            v["combined_peak_bytes"] = serde_json::Value::Null;
            v["combined_peak_time_seconds"] = serde_json::Value::Null;
            v["combined_peak_at_most_bytes"] = tree.combined_peak_bytes.into();
            if let Some(ps) = v["processes"].as_array_mut() {
                for p in ps {
                    p["bytes_at_combined_peak"] = serde_json::Value::Null;
                }
            }
        }
        if let (Some((f, _)), Some(top)) = (&window, &window_top) {
            let mut w = serde_json::to_value(f)?;
            w["top_locations"] = locations_json(top);
            v["window"] = w;
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    print_summary(out, &shown_file, cap, &s)?;
    if let Some(c) = &cap.checkpoint {
        let how = if c.last {
            "written as the process ended: figures are final"
        } else if cap.complete() {
            "the last before the end"
        } else {
            "the process did not end cleanly: figures are as of then"
        };
        writeln!(
            out,
            "  aggregated:     from checkpoint {} at {:.1} s ({how}); no events: per-stack figures only",
            c.number,
            cap.seconds(c.time)
        )?;
    }
    if parent_pid != 0 {
        writeln!(out, "  forked from:    pid {parent_pid}")?;
    }
    if !children.is_empty() {
        writeln!(
            out,
            "  children:       {} captures of processes it started ({}.<pid>)",
            children.len(),
            file.display()
        )?;
    }
    if tree.is_tree() {
        print_tree_summary(out, tree, chosen)?;
    }
    // Of a tree: where the memory was at the combined peak, in every process.
    let recorded = tree.processes.iter().filter(|p| p.has_capture()).count();
    let heading_at;
    let (top, heading) = if let (Some((f, _)), Some(top)) = (&window, window_top) {
        print_window(out, f)?;
        if let Some(rate) = cap.sample_rate() {
            writeln!(
                out,
                "    (a sampled capture, at {}: the window's figures are estimates, without a standard error; its high-water mark reads high like the peak's)",
                human_bytes(rate)
            )?;
        }
        heading_at = if f.at {
            format!(
                "top locations live at {}:",
                crate::seconds_text(f.end_seconds)
            )
        } else {
            "top locations at the window's peak:".to_string()
        };
        (top, heading_at.as_str())
    } else if recorded > 1 && pid.is_none() {
        let mut rows = Vec::new();
        for part in subject.parts(View::Peak, false) {
            let mut sym = r.symbolizer(part.cap);
            let mut top = part.view.top_locations(&mut sym, 5);
            r.warn(&sym.warnings);
            if part.label.is_some() {
                top.iter_mut()
                    .for_each(|row| row.pid = Some(part.process.pid));
            }
            rows.extend(top);
        }
        rows.sort_by(|a, b| b.total_bytes.cmp(&a.total_bytes).then(a.pid.cmp(&b.pid)));
        rows.truncate(5);
        let title = if subject.tree.combined_known {
            "top locations at the combined peak:"
        } else {
            "top locations at each process's own peak:"
        };
        (rows, title)
    } else {
        (top, "top locations at the peak:")
    };
    if !top.is_empty() {
        writeln!(out, "  {heading}")?;
        for t in &top {
            let mut location = location_label(&t.function, t.file.as_deref(), t.line);
            if let Some(pid) = t.pid {
                location = format!("[pid {pid}] {location}");
            }
            writeln!(
                out,
                "    {:>11} in {:>9} {}  {location}",
                human_bytes(t.total_bytes),
                grouped(t.count),
                plural(t.count, "allocation")
            )?;
        }
    }
    Ok(())
}

/// The top locations as JSON.
fn locations_json(top: &[crate::TableRow]) -> serde_json::Value {
    top.iter()
        .map(|t| {
            serde_json::json!({
                "function": t.function, "file": t.file, "line": t.line,
                "bytes": t.total_bytes, "allocations": t.count,
            })
        })
        .collect()
}

/// The figures of a window of time (`--at`, `--between`).
fn print_window(out: &mut impl Write, f: &crate::WindowFigures) -> std::io::Result<()> {
    let rss = match (f.rss_bytes, f.rss_time_seconds) {
        (Some(b), Some(t)) => Some((b, t)),
        _ => None,
    };
    if f.at {
        writeln!(out, "  at {}:", crate::seconds_text(f.end_seconds))?;
        writeln!(
            out,
            "    live:         {} in {}",
            bytes(f.live_at_end_bytes),
            count(f.live_at_end_allocations, "allocation")
        )?;
        if let Some((b, t)) = rss {
            writeln!(out, "    RSS:          {} (sampled at {t:.3} s)", bytes(b))?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "  between {} and {}:",
        crate::seconds_text(f.start_seconds),
        crate::seconds_text(f.end_seconds)
    )?;
    writeln!(
        out,
        "    peak heap:    {} in {}, at {:.3} s",
        bytes(f.peak_bytes),
        count(f.peak_allocations, "allocation"),
        f.peak_time_seconds
    )?;
    writeln!(
        out,
        "    live:         {} at the start, {} at the end",
        bytes(f.live_at_start_bytes),
        bytes(f.live_at_end_bytes)
    )?;
    writeln!(
        out,
        "    allocated:    {} in {}",
        bytes(f.allocated_bytes),
        count(f.allocations, "call")
    )?;
    writeln!(out, "    frees:        {}", grouped(f.frees))?;
    if let Some((b, t)) = rss {
        writeln!(out, "    peak RSS:     {} at {t:.3} s", bytes(b))?;
    }
    Ok(())
}

/// The processes of a tree, the combined peak and what each held then; `chosen` is marked.
fn print_tree_summary(
    out: &mut impl Write,
    tree: &crate::ProcessTree,
    chosen: u32,
) -> std::io::Result<()> {
    let recorded = tree.processes.iter().filter(|p| p.has_capture()).count();
    writeln!(
        out,
        "  process tree:   {} process{} recorded{}",
        recorded,
        if recorded == 1 { "" } else { "es" },
        match tree.processes.len() - recorded {
            0 => String::new(),
            n => format!(
                ", and {n} short helper{} kept as figures",
                if n == 1 { "" } else { "s" }
            ),
        }
    )?;
    // One recorded process (and helpers kept as figures): its own figures above say it all.
    let table = recorded > 1;
    if table && tree.combined_known {
        writeln!(
            out,
            "  combined peak:  {} at {:.3} s (the most all processes' heaps held at once)",
            bytes(tree.combined_peak_bytes),
            tree.seconds(tree.combined_peak_mono_ns)
        )?;
    } else if table {
        writeln!(
            out,
            "  combined peak:  at most {}: the sum of each process's own peak (aggregated captures keep no events to line the processes up in time)",
            bytes(tree.combined_peak_bytes),
        )?;
    }
    if table {
        writeln!(
            out,
            "  {:>9} {:>9} {:>11} {:>11} {:>11}  command",
            "pid", "parent", "peak", "at comb.pk", "leaked"
        )?;
    }
    const ROWS: usize = 25;
    let captured: Vec<&crate::Process> =
        tree.processes.iter().filter(|p| p.has_capture()).collect();
    for p in captured.iter().take(if table { ROWS } else { 0 }) {
        writeln!(
            out,
            "{} {:>9} {:>9} {:>11} {:>11} {:>11}  {}",
            if p.pid == chosen { " *" } else { "  " },
            p.pid,
            if p.parent_pid == 0 {
                "-".to_string()
            } else {
                p.parent_pid.to_string()
            },
            human_bytes(p.summary.peak_bytes),
            if tree.combined_known {
                human_bytes(p.held_at_combined_peak)
            } else {
                "-".to_string()
            },
            human_bytes(p.summary.leaked_bytes),
            p.command()
        )?;
    }
    if captured.len() > ROWS {
        let rest = &captured[ROWS..];
        writeln!(out,
            "    ... and {} more processes, peaks up to {} (memtrack summary --json lists them all)",
            rest.len(),
            human_bytes(rest.iter().map(|p| p.summary.peak_bytes).max().unwrap_or(0))
        )?;
    }
    let helpers: Vec<&crate::Process> =
        tree.processes.iter().filter(|p| !p.has_capture()).collect();
    if !helpers.is_empty() {
        let mut names: Vec<(String, usize)> = Vec::new();
        for h in &helpers {
            let name = Path::new(h.argv.first().unwrap_or(&h.executable))
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match names.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 += 1,
                None => names.push((name, 1)),
            }
        }
        names.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let listed: Vec<String> = names
            .iter()
            .take(6)
            .map(|(n, c)| {
                if *c == 1 {
                    n.clone()
                } else {
                    format!("{n} ×{c}")
                }
            })
            .collect();
        writeln!(
            out,
            "    + {} short helper{} ({}{}): peaks up to {}, not in the {}peak",
            helpers.len(),
            if helpers.len() == 1 { "" } else { "s" },
            listed.join(", "),
            if names.len() > 6 { ", ..." } else { "" },
            human_bytes(
                helpers
                    .iter()
                    .map(|p| p.summary.peak_bytes)
                    .max()
                    .unwrap_or(0)
            ),
            if table { "combined " } else { "" }
        )?;
    }
    Ok(())
}

/// " ± SE" after an estimate of a sampled capture (nothing for a full one).
fn stderr_text(s: &Summary, se: u64) -> String {
    if s.sampled {
        format!(" ± {}", human_bytes(se))
    } else {
        String::new()
    }
}

/// An aggregated capture's resident memory: the highest its checkpoints read (of those its
/// series kept) and the last checkpoint's.
fn print_checkpoint_rss(
    out: &mut impl Write,
    cap: &Capture,
    c: &memtrack_format::Checkpoint,
    s: &Summary,
) -> std::io::Result<()> {
    let kept = c.series.len() as u64 + 1;
    let of = if kept == c.number {
        match kept {
            1 => "read at its one checkpoint".to_string(),
            n => format!("the highest read at {} checkpoints", grouped(n)),
        }
    } else {
        format!(
            "the highest read at the {} of {} checkpoints kept",
            grouped(kept),
            grouped(c.number)
        )
    };
    if let (Some(rss), Some(t), Some(heap)) = (
        s.peak_rss_bytes,
        s.peak_rss_time_seconds,
        s.heap_at_peak_rss_bytes,
    ) {
        let approx = if s.sampled { "≈ " } else { "" };
        writeln!(
            out,
            "  peak RSS:       {} at {t:.3} s ({of}; heap then: {approx}{})",
            bytes(rss),
            bytes(heap)
        )?;
    }
    if c.rss_bytes > 0 && kept > 1 {
        writeln!(
            out,
            "  RSS last read:  {} at checkpoint {} ({:.3} s)",
            bytes(c.rss_bytes),
            c.number,
            cap.seconds(c.time)
        )?;
    }
    Ok(())
}

/// The figures of one capture.
fn print_summary(
    out: &mut impl Write,
    file: &Path,
    cap: &Capture,
    s: &Summary,
) -> std::io::Result<()> {
    writeln!(out, "memtrack summary of {}", file.display())?;
    let cmdline = if s.argv.is_empty() {
        s.executable.clone()
    } else {
        crate::shell_command(&s.argv)
    };
    writeln!(out, "  command:        {cmdline} (pid {})", s.pid)?;
    if let Some(a) = &cap.attached {
        writeln!(
            out,
            "  recording:      started {} at {}{}; allocations made before it are not included",
            match a.how {
                memtrack_format::AttachHow::Attach => "by memtrack attach",
                memtrack_format::AttachHow::InProcess => "by the program (memtrack_start)",
            },
            crate::utc_time_text(cap.header.start_unix_ns),
            match a.process_age_ms {
                0 => String::new(),
                ms => format!(", {} after the process started", crate::duration_text(ms)),
            }
        )?;
    }
    if !s.exec_chain.is_empty() {
        // A version manager's shims exec several wrappers (pyenv: six): the first and the
        // last say where it started and what ran.
        let chain = &s.exec_chain;
        if chain.len() > 3 {
            writeln!(
                out,
                "  exec chain:     {}  ->  ({} more)  ->  {}",
                chain[0],
                chain.len() - 2,
                chain[chain.len() - 1]
            )?;
        } else {
            writeln!(out, "  exec chain:     {}", chain.join("  ->  "))?;
        }
    }
    writeln!(
        out,
        "  duration:       {:.3} s, {} thread{}, {} events",
        s.duration_seconds,
        s.threads,
        if s.threads == 1 { "" } else { "s" },
        grouped(s.events)
    )?;
    // Asked once: it may wait a little for a lock.
    let live = super::being_written(cap);
    if s.complete && !live {
        writeln!(
            out,
            "  capture:        complete (ended by {})",
            s.end_reason.unwrap_or("exit")
        )?;
    } else if live {
        writeln!(out,
            "  capture:        still being written (no END record yet): its process is running; figures cover what it wrote so far ({:.3} s)",
            s.duration_seconds
        )?;
    } else {
        writeln!(out,
            "  capture:        INCOMPLETE: cut off after {:.3} s (the process was killed or crashed); read up to its last complete record",
            s.duration_seconds
        )?;
        let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        for w in &cap.warnings {
            if let crate::Warning::TornTail { offset } = w {
                writeln!(
                    out,
                    "                  (up to byte {} of {}: the last {} could not be read)",
                    grouped(*offset),
                    grouped(len),
                    bytes(len.saturating_sub(*offset))
                )?;
            }
        }
    }
    if fast_chunks(cap) && !live {
        let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        writeln!(
            out,
            "  encoding:       fast ({}): `memtrack compact {}` rewrites it in the compact encoding, same figures",
            crate::human_bytes(len),
            file.display()
        )?;
    }
    let approx = if s.sampled { "≈ " } else { "" };
    writeln!(
        out,
        "  peak heap:      {approx}{}{} in {approx}{}, at {:.3} s",
        bytes(s.peak_bytes),
        stderr_text(s, s.peak_stderr_bytes),
        count(s.peak_allocations, "allocation"),
        s.peak_time_seconds
    )?;
    if let Some(c) = &cap.checkpoint {
        print_checkpoint_rss(out, cap, c, s)?;
    } else if let (Some(rss), Some(t), Some(heap)) = (
        s.peak_rss_bytes,
        s.peak_rss_time_seconds,
        s.heap_at_peak_rss_bytes,
    ) {
        writeln!(
            out,
            "  peak RSS:       {} at {t:.3} s (heap then: {})",
            bytes(rss),
            bytes(heap)
        )?;
    }
    if s.peak_mapped_bytes > 0 {
        writeln!(
            out,
            "  peak mapped:    {} at {:.3} s, {} at {} (mmap, apart from the heap)",
            bytes(s.peak_mapped_bytes),
            s.peak_mapped_time_seconds,
            bytes(s.mapped_at_exit_bytes),
            if s.complete { "exit" } else { "cut-off" }
        )?;
    }
    let detached = s.end_reason == Some("detach");
    let leak_word = if live {
        "live so far:"
    } else if detached {
        "live at stop:"
    } else if s.complete {
        "leaked at exit:"
    } else {
        "live at cut-off:"
    };
    // A Python program's `--leaks` is its state when its code ended (see View::Leaks); the
    // heap at exit follows, after interpreter shutdown.
    let (left, at_exit) = match s.python_shutdown_seconds {
        Some(t) => {
            writeln!(
                out,
                "  leaked at end:  {approx}{}{} in {approx}{} (live when the Python program's code ended)",
                bytes(s.leaked_bytes),
                stderr_text(s, s.leaked_stderr_bytes),
                count(s.leaked_allocations, "allocation")
            )?;
            let note = format!(" (after {t:.3} s of interpreter shutdown)");
            ((s.leaked_at_exit_bytes, s.leaked_at_exit_allocations), note)
        }
        None => ((s.leaked_bytes, s.leaked_allocations), String::new()),
    };
    // The standard error goes with the figure `--leaks` reports.
    let left_se = if s.python_shutdown_seconds.is_none() {
        stderr_text(s, s.leaked_stderr_bytes)
    } else {
        String::new()
    };
    writeln!(
        out,
        "  {leak_word:<15} {approx}{}{left_se} in {approx}{}{at_exit}",
        bytes(left.0),
        count(left.1, "allocation")
    )?;
    writeln!(
        out,
        "  allocated:      {approx}{} in {approx}{}",
        bytes(s.total_bytes),
        count(s.total_allocations, "call")
    )?;
    writeln!(out, "  frees:          {approx}{}", grouped(s.total_frees))?;
    if let (true, Some(rate)) = (s.sampled, s.sample_rate_bytes) {
        // An aggregated capture counted its samples into the figures without keeping how many.
        let samples = if cap.aggregated() {
            "allocations".to_string()
        } else {
            count(s.sampled_allocations, "allocation")
        };
        writeln!(
            out,
            "  sampling:       heap figures are estimates from {samples} sampled at {} (each stands for the bytes and calls it represents); ± is one standard error; the peak is found with half of the sample and measured with the other half, so it is not biased by the sampling noise",
            human_bytes(rate),
        )?;
        if let Some(n) = s.peak_sampled_blocks.filter(|&n| n < 20) {
            writeln!(
                out,
                "  warning:        the peak estimate rests on {}: the heap is not much larger than the sampling rate; record with a --sample-rate of at most the peak / 100 for a figure worth reading",
                count(n, "sampled block")
            )?;
        }
    }
    if !cap.region_names.is_empty() {
        let mut names: Vec<&str> = cap.region_names.values().map(String::as_str).collect();
        names.sort_unstable();
        let n = names.len();
        names.truncate(4);
        writeln!(
            out,
            "  regions:        {} marked ({}{}): memtrack regions ranks them",
            grouped(n as u64),
            names.join(", "),
            if n > 4 { ", ..." } else { "" }
        )?;
    }
    if s.unmatched_frees > 0 || s.overlapping_allocations > 0 || s.corrupt_chunks > 0 {
        // Only what happened.
        let mut notes = Vec::new();
        if s.unmatched_frees > 0 {
            notes.push(format!(
                "{} of blocks allocated before recording began{}",
                count(s.unmatched_frees, "free"),
                if cap.attached.is_some() {
                    " (expected: the process ran before it)"
                } else {
                    ""
                }
            ));
        }
        if s.overlapping_allocations > 0 {
            notes.push(format!(
                "{} over a live block",
                count(s.overlapping_allocations, "allocation")
            ));
        }
        if s.corrupt_chunks > 0 {
            notes.push(count(s.corrupt_chunks as u64, "damaged chunk"));
        }
        writeln!(out, "  note:           {}", notes.join(", "))?;
    }
    for w in &cap.warnings {
        if let crate::Warning::BadRecord {
            offset,
            kind,
            error,
        } = w
        {
            writeln!(
                out,
                "  warning:        record of type {kind} at offset {offset} skipped: {error}"
            )?;
        }
    }
    Ok(())
}

/// Whether the capture holds chunks in the fast encoding (`memtrack run --encoding fast`, not
/// yet compacted).
fn fast_chunks(cap: &crate::Capture) -> bool {
    cap.chunks
        .iter()
        .any(|c| c.compact == Some(memtrack_format::ColumnEncoding::ZstdStream))
}
