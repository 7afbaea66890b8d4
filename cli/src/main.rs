//! The `memtrack` command: thin glue over `memtrack-reader` and the preload shim.

#[macro_use]
mod output;
mod args;
mod progress;
mod run;
mod subject;

use anyhow::{bail, Context, Result};
use args::{By, Cli, Cmd, DiffFormat, ExportFormat, Growth, Limits};
use clap::Parser;
use memtrack_reader::{
    call_tree, folded, grouped, human_bytes, render_tree, table, Capture, GroupBy, Summary,
    Symbolizer, View,
};
use output::{check_output, is_broken_pipe, write_out};
use progress::Progress;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use subject::{Part, Subject};

/// `--python-only`, for every report.
static PYTHON_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// `--all-frames`, for every report.
static ALL_FRAMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// `--skip-function`, for every report.
static SKIP_FUNCTIONS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// `function (file.c:12)`, an absolute file shortened to its name (a relative one, such as a
/// Python file's `pkg/mod.py`, kept: its folders tell files apart); `function (file)` without a
/// line; the function alone without a file.
fn location_label(function: &str, file: Option<&str>, line: Option<u32>) -> String {
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

/// The symbolizer's warnings (a binary changed since the capture, say), on stderr.
fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("memtrack: warning: {w}");
    }
}

/// The symbolizer of a report, with the command line's options.
fn symbolizer(cap: &Capture) -> Symbolizer {
    let mut sym = Symbolizer::new(cap);
    sym.python_only = PYTHON_ONLY.load(std::sync::atomic::Ordering::Relaxed);
    sym.all_frames = ALL_FRAMES.load(std::sync::atomic::Ordering::Relaxed);
    sym.skip_functions = SKIP_FUNCTIONS.get().cloned().unwrap_or_default();
    sym
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    PYTHON_ONLY.store(cli.python_only, std::sync::atomic::Ordering::Relaxed);
    ALL_FRAMES.store(cli.all_frames, std::sync::atomic::Ordering::Relaxed);
    let _ = SKIP_FUNCTIONS.set(cli.skip_function.clone());
    let pid = cli.pid;
    // No report writes over what it reads, nor over any capture.
    let outputs = match &cli.cmd {
        Cmd::Flamegraph { file, output, .. }
        | Cmd::Export { file, output, .. }
        | Cmd::Plot { file, output } => check_output(output.as_deref(), &[file]),
        Cmd::Diff {
            base, new, output, ..
        } => check_output(output.as_deref(), &[base, new]),
        _ => Ok(()),
    };
    if let Err(e) = outputs {
        eprintln!("memtrack: error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.cmd {
        Cmd::Run {
            output,
            force,
            follow_fork: _,
            no_follow_fork,
            keep_all,
            limits,
            command,
        } => run::cmd_run(
            output,
            force,
            run::RunTree {
                follow_fork: !no_follow_fork,
                keep_all,
            },
            limits,
            command,
        ),
        Cmd::Check { file, limits, json } => cmd_check(&file, pid, limits, json),
        Cmd::Summary { file, json } => cmd_summary(&file, pid, json).map(|()| 0),
        Cmd::Dump { file } => cmd_dump(&file).map(|()| 0),
        Cmd::Stats { file, json } => cmd_stats(&file, pid, json).map(|()| 0),
        Cmd::Tree {
            file,
            view,
            depth,
            min_percent,
        } => cmd_tree(&file, pid, view.view(), depth, min_percent).map(|()| 0),
        Cmd::Plot { file, output } => cmd_plot(&file, pid, output).map(|()| 0),
        Cmd::Table {
            file,
            view,
            by,
            top,
            json,
        } => cmd_table(&file, pid, view.view(), by, top, json).map(|()| 0),
        Cmd::Flamegraph {
            file,
            view,
            inverted,
            flame,
            icicle: _,
            output,
        } => cmd_flamegraph(&file, pid, view.view(), inverted, flame, output).map(|()| 0),
        Cmd::Export {
            file,
            format,
            view,
            inline_frames,
            output,
        } => cmd_export(&file, pid, format, view.view(), inline_frames, output).map(|()| 0),
        Cmd::Diff {
            base,
            new,
            view,
            format,
            output,
            fail_on_growth,
            top,
        } => cmd_diff(
            &base,
            &new,
            pid,
            view.view(),
            format,
            output,
            fail_on_growth,
            top,
        ),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        // `memtrack export ... | head`: the reader had what it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memtrack: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn cmd_summary(file: &Path, pid: Option<u32>, json: bool) -> Result<()> {
    let mut subject = Subject::open(file, pid)?;
    let cap = subject.main_capture();
    let shown_file = cap.path().to_path_buf();
    let progress = Progress::start(cap, json);
    // One replay gives the figures and what each stack held at the peak.
    let (r, stacks, errors) = cap.replay_into(memtrack_reader::Replay::tracking_sites(), u64::MAX);
    drop(progress);
    let s = cap.summarize(&r, errors);
    let view = memtrack_reader::ViewSites::new(View::Peak, r.peak_by_stack(), stacks);
    let mut sym = symbolizer(cap);
    let top = memtrack_reader::top_locations(&view, &mut sym, 5);
    warn(&sym.warnings);
    let parent_pid = cap.header.parent_pid;
    let chosen = cap.header.pid;
    let children = if parent_pid == 0 && pid.is_none() {
        memtrack_reader::child_captures(file)
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
        v["parent_pid"] = match parent_pid {
            0 => serde_json::Value::Null,
            p => p.into(),
        };
        v["children"] = serde_json::to_value(&children)?;
        v["top_peak_locations"] = serde_json::to_value(
            top.iter()
                .map(|t| {
                    serde_json::json!({
                        "function": t.function, "file": t.file, "line": t.line,
                        "bytes": t.total_bytes, "allocations": t.count,
                    })
                })
                .collect::<Vec<_>>(),
        )?;
        v["processes"] = serde_json::to_value(tree.figures())?;
        v["combined_peak_bytes"] = tree.combined_peak_bytes.into();
        v["combined_peak_time_seconds"] = tree.seconds(tree.combined_peak_mono_ns).into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_summary(&shown_file, cap, &s);
    if parent_pid != 0 {
        println!("  forked from:    pid {parent_pid}");
    }
    if !children.is_empty() {
        println!(
            "  children:       {} captures of processes it started ({}.<pid>)",
            children.len(),
            file.display()
        );
    }
    if tree.is_tree() {
        print_tree_summary(tree, chosen);
    }
    // Of a tree: where the memory was at the combined peak, in every process.
    let recorded = tree.processes.iter().filter(|p| p.has_capture()).count();
    let (top, heading) = if recorded > 1 && pid.is_none() {
        let mut rows = Vec::new();
        for part in subject.parts(View::Peak, false) {
            let mut sym = symbolizer(part.cap);
            let mut r = memtrack_reader::top_locations(&part.view, &mut sym, 5);
            warn(&sym.warnings);
            if part.label.is_some() {
                r.iter_mut()
                    .for_each(|row| row.pid = Some(part.process.pid));
            }
            rows.extend(r);
        }
        rows.sort_by(|a, b| b.total_bytes.cmp(&a.total_bytes).then(a.pid.cmp(&b.pid)));
        rows.truncate(5);
        (rows, "top locations at the combined peak:")
    } else {
        (top, "top locations at the peak:")
    };
    if !top.is_empty() {
        println!("  {heading}");
        for t in &top {
            let mut location = location_label(&t.function, t.file.as_deref(), t.line);
            if let Some(pid) = t.pid {
                location = format!("[pid {pid}] {location}");
            }
            println!(
                "    {:>11} in {:>9} {}  {location}",
                human_bytes(t.total_bytes),
                grouped(t.count),
                plural(t.count, "allocation")
            );
        }
    }
    Ok(())
}

/// The processes of a tree, the combined peak and what each held then; `chosen` is marked.
fn print_tree_summary(tree: &memtrack_reader::ProcessTree, chosen: u32) {
    let recorded = tree.processes.iter().filter(|p| p.has_capture()).count();
    println!(
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
    );
    // One recorded process (and helpers kept as figures): its own figures above say it all.
    let table = recorded > 1;
    if table {
        println!(
            "  combined peak:  {} at {:.3} s (the most all processes' heaps held at once)",
            bytes(tree.combined_peak_bytes),
            tree.seconds(tree.combined_peak_mono_ns)
        );
        println!(
            "  {:>9} {:>9} {:>11} {:>11} {:>11}  command",
            "pid", "parent", "peak", "at comb.pk", "leaked"
        );
    }
    const ROWS: usize = 25;
    let captured: Vec<&memtrack_reader::Process> =
        tree.processes.iter().filter(|p| p.has_capture()).collect();
    for p in captured.iter().take(if table { ROWS } else { 0 }) {
        println!(
            "{} {:>9} {:>9} {:>11} {:>11} {:>11}  {}",
            if p.pid == chosen { " *" } else { "  " },
            p.pid,
            if p.parent_pid == 0 {
                "-".to_string()
            } else {
                p.parent_pid.to_string()
            },
            human_bytes(p.summary.peak_bytes),
            human_bytes(p.held_at_combined_peak),
            human_bytes(p.summary.leaked_bytes),
            p.command()
        );
    }
    if captured.len() > ROWS {
        let rest = &captured[ROWS..];
        println!(
            "    ... and {} more processes, peaks up to {} (memtrack summary --json lists them all)",
            rest.len(),
            human_bytes(rest.iter().map(|p| p.summary.peak_bytes).max().unwrap_or(0))
        );
    }
    let helpers: Vec<&memtrack_reader::Process> =
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
        println!(
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
        );
    }
}

/// `1 allocation`, `2,048 allocations`: a count with its noun (plural with an `s`).
fn count(n: u64, noun: &str) -> String {
    format!("{} {}", grouped(n), plural(n, noun))
}

/// The noun for `n` of it, padded to the plural's width (for columns).
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{noun} ")
    } else {
        format!("{noun}s")
    }
}

fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{} bytes", grouped(n))
    } else {
        format!("{} bytes ({})", grouped(n), human_bytes(n))
    }
}

fn print_summary(file: &Path, cap: &Capture, s: &Summary) {
    println!("memtrack summary of {}", file.display());
    let cmdline = if s.argv.is_empty() {
        s.executable.clone()
    } else {
        memtrack_reader::shell_command(&s.argv)
    };
    println!("  command:        {cmdline} (pid {})", s.pid);
    if !s.exec_chain.is_empty() {
        // A version manager's shims exec several wrappers (pyenv: six): the first and the
        // last say where it started and what ran.
        let chain = &s.exec_chain;
        if chain.len() > 3 {
            println!(
                "  exec chain:     {}  ->  ({} more)  ->  {}",
                chain[0],
                chain.len() - 2,
                chain[chain.len() - 1]
            );
        } else {
            println!("  exec chain:     {}", chain.join("  ->  "));
        }
    }
    println!(
        "  duration:       {:.3} s, {} thread{}, {} events",
        s.duration_seconds,
        s.threads,
        if s.threads == 1 { "" } else { "s" },
        grouped(s.events)
    );
    // Asked once: it may wait a little for a lock.
    let live = subject::being_written(cap);
    if s.complete && !live {
        println!(
            "  capture:        complete (ended by {})",
            s.end_reason.unwrap_or("exit")
        );
    } else if live {
        println!(
            "  capture:        still being written (no END record yet): its process is running; figures cover what it wrote so far ({:.3} s)",
            s.duration_seconds
        );
    } else {
        println!(
            "  capture:        INCOMPLETE: cut off after {:.3} s (the process was killed or crashed); read up to its last complete record",
            s.duration_seconds
        );
        let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        for w in &cap.warnings {
            if let memtrack_reader::Warning::TornTail { offset } = w {
                println!(
                    "                  (up to byte {} of {}: the last {} could not be read)",
                    grouped(*offset),
                    grouped(len),
                    bytes(len.saturating_sub(*offset))
                );
            }
        }
    }
    println!(
        "  peak heap:      {} in {}, at {:.3} s",
        bytes(s.peak_bytes),
        count(s.peak_allocations, "allocation"),
        s.peak_time_seconds
    );
    let leak_word = if live {
        "live so far:"
    } else if s.complete {
        "leaked at exit:"
    } else {
        "live at cut-off:"
    };
    // A Python program's `--leaks` is its state when its code ended (see View::Leaks); the
    // heap at exit follows, after interpreter shutdown.
    let (left, at_exit) = match s.python_shutdown_seconds {
        Some(t) => {
            println!(
                "  leaked at end:  {} in {} (live when the Python program's code ended)",
                bytes(s.leaked_bytes),
                count(s.leaked_allocations, "allocation")
            );
            let note = format!(" (after {t:.3} s of interpreter shutdown)");
            ((s.leaked_at_exit_bytes, s.leaked_at_exit_allocations), note)
        }
        None => ((s.leaked_bytes, s.leaked_allocations), String::new()),
    };
    println!(
        "  {leak_word:<15} {} in {}{at_exit}",
        bytes(left.0),
        count(left.1, "allocation")
    );
    println!(
        "  allocated:      {} in {}",
        bytes(s.total_bytes),
        count(s.total_allocations, "call")
    );
    println!("  frees:          {}", grouped(s.total_frees));
    if s.unmatched_frees > 0 || s.overlapping_allocations > 0 || s.corrupt_chunks > 0 {
        // Only what happened.
        let mut notes = Vec::new();
        if s.unmatched_frees > 0 {
            notes.push(format!(
                "{} of blocks allocated before recording began",
                count(s.unmatched_frees, "free")
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
        println!("  note:           {}", notes.join(", "));
    }
    for w in &cap.warnings {
        if let memtrack_reader::Warning::BadRecord {
            offset,
            kind,
            error,
        } = w
        {
            println!("  warning:        record of type {kind} at offset {offset} skipped: {error}");
        }
    }
}

fn cmd_dump(file: &Path) -> Result<()> {
    use std::io::Write;
    let cap = Capture::open(file)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
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
    let mut stacks = memtrack_reader::StackTable::default();
    let events: Vec<_> = cap.events(&mut stacks).collect();
    for ev in events {
        write!(
            out,
            "{:>8} {:>10} tid {:>7} {:?}",
            ev.seq, ev.time, ev.tid, ev.kind
        )?;
        if let memtrack_reader::EventKind::Alloc { stack, .. } = ev.kind {
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

/// The parts' folded stacks, each below its process's root frame when there are several, with
/// the symbolizers' warnings sent to stderr.
fn folded_parts(parts: &[Part<'_>]) -> Vec<(String, u64)> {
    let mut lines = Vec::new();
    for part in parts {
        let mut sym = symbolizer(part.cap);
        let mut l = folded(&part.view, &mut sym);
        warn(&sym.warnings);
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

/// A report's view of its subject, with a progress bar while it is computed.
fn subject_parts(subject: &Subject, view: View, with_max: bool, quiet: bool) -> Vec<Part<'_>> {
    let progress = Progress::start(subject.main_capture(), quiet);
    let parts = subject.parts(view, with_max);
    drop(progress);
    parts
}

/// The view's words for a title: the peak of a tree is its combined peak.
fn view_title(view: View, subject: &Subject) -> String {
    let words = match (view, subject.one()) {
        (View::Peak, None) => "live at the combined peak",
        _ => view_words(view),
    };
    if PYTHON_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        format!("{words}, Python frames only")
    } else {
        words.into()
    }
}

fn cmd_export(
    file: &Path,
    pid: Option<u32>,
    format: ExportFormat,
    view: View,
    inline_frames: bool,
    output: Option<PathBuf>,
) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    let parts = subject_parts(&subject, view, false, true);
    let bytes = match format {
        ExportFormat::Folded => {
            let lines = folded_parts(&parts);
            drop(parts);
            // Written line by line: the text (hundreds of MB for deep stacks) is never held
            // twice.
            let write = |w: &mut dyn std::io::Write| -> std::io::Result<()> {
                use std::io::Write;
                let mut w = std::io::BufWriter::new(w);
                for (path, bytes) in &lines {
                    writeln!(w, "{path} {bytes}")?;
                }
                w.flush()
            };
            return match output.as_deref().filter(|o| o.as_os_str() != "-") {
                Some(o) => {
                    let mut f = std::fs::File::create(o)
                        .with_context(|| format!("cannot create {}", o.display()))?;
                    write(&mut f).with_context(|| format!("cannot write {}", o.display()))
                }
                None => Ok(write(&mut std::io::stdout().lock())?),
            };
        }
        ExportFormat::Pprof => {
            let mut pieces = Vec::new();
            let mut syms: Vec<Symbolizer> = parts.iter().map(|p| symbolizer(p.cap)).collect();
            for (part, sym) in parts.iter().zip(syms.iter_mut()) {
                pieces.push(memtrack_reader::pprof::Piece {
                    cap: part.cap,
                    inuse: &part.view,
                    label: part.label.clone(),
                    pid: part.process.pid,
                    sym,
                });
            }
            let gz = memtrack_reader::pprof::profile_gz_of(pieces)?;
            for sym in &syms {
                warn(&sym.warnings);
            }
            gz
        }
        ExportFormat::Json => {
            let mut export = memtrack_reader::JsonExport::default();
            for part in &parts {
                let mut sym = symbolizer(part.cap);
                let process = part.label.clone().map(|l| (part.process.pid, l));
                export.add(&part.view, &mut sym, process);
                warn(&sym.warnings);
            }
            drop(parts);
            // Written as it goes: a large view's text is never held whole.
            let capture = file.display().to_string();
            return match output.as_deref().filter(|o| o.as_os_str() != "-") {
                Some(o) => {
                    let f = std::fs::File::create(o)
                        .with_context(|| format!("cannot create {}", o.display()))?;
                    export
                        .write(&capture, view, inline_frames, std::io::BufWriter::new(f))
                        .with_context(|| format!("cannot write {}", o.display()))
                }
                None => Ok(export.write(
                    &capture,
                    view,
                    inline_frames,
                    std::io::BufWriter::new(std::io::stdout().lock()),
                )?),
            };
        }
    };
    write_out(output.as_deref(), &bytes)
}

#[allow(clippy::too_many_arguments)] // one per command-line option
fn cmd_diff(
    base: &Path,
    new: &Path,
    pid: Option<u32>,
    view: View,
    format: DiffFormat,
    output: Option<PathBuf>,
    limit: Option<Growth>,
    top: usize,
) -> Result<u8> {
    // `--pid` picks a process of the new capture's tree; the base's tree is compared whole
    // unless it has a process of the same command.
    let (sb, sn) = (Subject::open(base, None)?, Subject::open(new, pid)?);
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
    let (pb, pn) = (sb.parts(view, false), sn.parts(view, false));
    let mut syms: Vec<Symbolizer> = pb
        .iter()
        .chain(pn.iter())
        .map(|p| symbolizer(p.cap))
        .collect();
    let (syms_b, syms_n) = syms.split_at_mut(pb.len());
    fn side<'a>(
        parts: Vec<Part<'_>>,
        syms: &'a mut [Symbolizer],
    ) -> Vec<memtrack_reader::DiffSide<'a>> {
        parts
            .into_iter()
            .zip(syms.iter_mut())
            .map(|(p, sym)| memtrack_reader::DiffSide {
                label: p.label.as_ref().map(|_| p.process.name()),
                view: p.view,
                sym,
            })
            .collect()
    }
    let d = memtrack_reader::diff_sides(side(pb, syms_b), side(pn, syms_n), view);
    warn(&d.warnings);
    match format {
        DiffFormat::Svg => {
            let out = output.unwrap_or_else(|| {
                let stem = |p: &Path| {
                    p.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "capture".into())
                };
                new.with_file_name(format!(
                    "{}-vs-{}-{}.svg",
                    stem(base),
                    stem(new),
                    view.name()
                ))
            });
            write_diff_svg(&d, view, base, new, &out)?;
            eprintln!(
                "memtrack: differential flamegraph written to {}",
                out.display()
            );
        }
        DiffFormat::Folded => {
            let mut text = String::new();
            for s in &d.stacks {
                text.push_str(&format!("{} {} {}\n", s.stack, s.before, s.after));
            }
            write_out(output.as_deref(), text.as_bytes())?;
        }
        DiffFormat::Json => {
            let mut text = serde_json::to_string_pretty(&d)?;
            text.push('\n');
            write_out(output.as_deref(), text.as_bytes())?;
        }
        DiffFormat::Table => {
            let mut text = format!(
                "memtrack diff of {}: {} -> {} ({}{})\n{:>12} {:>12} {:>13} {:>8}  Location\n",
                view_words(view),
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
            );
            for r in d.locations.iter().filter(|r| r.delta != 0).take(top) {
                // The file is already short (Python's relative to the program's directory).
                let location = match (&r.file, r.line) {
                    (Some(f), Some(l)) => format!("{} ({f}:{l})", r.function),
                    _ => r.function.clone(),
                };
                text.push_str(&format!(
                    "{:>12} {:>12} {:>13} {:>8}  {location}\n",
                    human_bytes(r.before),
                    human_bytes(r.after),
                    signed_bytes(r.delta),
                    r.percent
                        .map(|p| format!("{p:+.1}%"))
                        .unwrap_or_else(|| "new".into())
                ));
            }
            write_out(output.as_deref(), text.as_bytes())?;
        }
    }
    let Some(limit) = limit else { return Ok(0) };
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
    let grew = format!(
        "{}{}",
        signed_bytes(d.growth()),
        d.growth_percent()
            .map(|p| format!(" ({p:+.1}%)"))
            .unwrap_or_default()
    );
    if !exceeded {
        eprintln!(
            "memtrack: {} grew by {grew}: within {said}",
            view_words(view)
        );
        return Ok(0);
    }
    eprintln!(
        "memtrack: {} grew by {grew}, more than {said}; the stacks that grew most:",
        view_words(view)
    );
    // One line a stack, innermost frame first.
    for s in d.grown(10) {
        eprintln!(
            "  {} ({} -> {})  {}",
            signed_bytes(s.after as i64 - s.before as i64),
            human_bytes(s.before),
            human_bytes(s.after),
            s.one_line(6)
        );
    }
    Ok(1)
}

/// An SVG that shows `title` and `note`: inferno refuses to draw a profile without counts.
fn empty_svg(w: &mut impl std::io::Write, title: &str, note: &str) -> std::io::Result<()> {
    let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;");
    write!(
        w,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"80\" font-family=\"Verdana, sans-serif\"><text x=\"600\" y=\"30\" text-anchor=\"middle\" font-size=\"16\">{}</text><text x=\"600\" y=\"60\" text-anchor=\"middle\" font-size=\"13\">{}</text></svg>\n",
        esc(title),
        esc(note)
    )
}

fn signed_bytes(n: i64) -> String {
    if n < 0 {
        format!("-{}", human_bytes(n.unsigned_abs()))
    } else {
        format!("+{}", human_bytes(n as u64))
    }
}

/// inferno's differential flamegraph: widths are the new capture's bytes; red grew, blue shrank.
fn write_diff_svg(
    d: &memtrack_reader::Diff,
    view: View,
    base: &Path,
    new: &Path,
    out: &Path,
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
    let what = if PYTHON_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        format!("{}, Python frames only", view_words(view))
    } else {
        view_words(view).to_string()
    };
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
    let f =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(f);
    if lines.trim().is_empty() || d.after_bytes == 0 {
        empty_svg(
            &mut w,
            &opts.title,
            "no allocations in this view of the new capture",
        )?;
        return Ok(());
    }
    inferno::flamegraph::from_lines(&mut opts, lines.lines(), &mut w)
        .map_err(|e| anyhow::anyhow!("cannot draw the flamegraph: {e}"))?;
    Ok(())
}

fn cmd_flamegraph(
    file: &Path,
    pid: Option<u32>,
    view: View,
    inverted: bool,
    flame: bool,
    output: Option<PathBuf>,
) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    let parts = subject_parts(&subject, view, false, false);
    let lines = folded_parts(&parts);
    let total: u64 = parts.iter().map(|p| p.view.bytes).sum();
    let out = output.unwrap_or_else(|| {
        file.with_file_name(format!("{}-{}.svg", subject.stem(file), view.name()))
    });
    let what = view_title(view, &subject);
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
    let f =
        std::fs::File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(f);
    if text.is_empty() {
        // inferno refuses a profile without counts: say so in an SVG of our own.
        empty_svg(&mut w, &opts.title, "no allocations in this view")
            .with_context(|| format!("cannot write {}", out.display()))?;
    } else {
        inferno::flamegraph::from_lines(&mut opts, text.iter().map(String::as_str), &mut w)
            .map_err(|e| anyhow::anyhow!("cannot draw the flamegraph: {e}"))?;
    }
    eprintln!(
        "memtrack: flamegraph of {what} written to {}",
        out.display()
    );
    Ok(())
}

fn view_words(view: View) -> &'static str {
    match view {
        View::Peak => "live at the peak",
        View::Leaks => "leaked (left live by the program)",
        View::LeaksAtExit => "live at exit",
        View::Allocated => "allocated",
        View::Temporary => "temporary (freed before the thread allocated again)",
    }
}

fn cmd_table(
    file: &Path,
    pid: Option<u32>,
    view: View,
    by: By,
    top: usize,
    json: bool,
) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    let parts = subject_parts(&subject, view, true, json);
    let group = match by {
        By::Function => GroupBy::Function,
        By::Line => GroupBy::Line,
        By::Stack => GroupBy::Stack,
    };
    let mut rows = Vec::new();
    for part in &parts {
        let mut sym = symbolizer(part.cap);
        let mut r = table(&part.view, &mut sym, group);
        warn(&sym.warnings);
        if part.label.is_some() {
            for row in &mut r {
                row.pid = Some(part.process.pid);
            }
        }
        rows.extend(r);
    }
    rows.sort_by(|a, b| {
        b.total_bytes
            .cmp(&a.total_bytes)
            .then(a.pid.cmp(&b.pid))
            .then(a.function.cmp(&b.function))
    });
    rows.truncate(top);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "memtrack table of {}: {}, {} in {}",
        file.display(),
        view_title(view, &subject),
        bytes(parts.iter().map(|p| p.view.bytes).sum()),
        count(parts.iter().map(|p| p.view.allocations).sum(), "allocation")
    );
    if parts.len() > 1 {
        println!("  processes:");
        for part in &parts {
            println!(
                "    pid {:<8} {:>11}  {}",
                part.process.pid,
                human_bytes(part.view.bytes),
                part.process.command()
            );
        }
    }
    println!(
        "{:>12} {:>12} {:>12} {:>9}  Location",
        "Total", "Max", "Avg", "Count"
    );
    for r in &rows {
        let mut location = match by {
            // Innermost first: `f <- g` reads "f, called from g".
            By::Stack => r
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
        println!(
            "{:>12} {:>12} {:>12} {:>9}  {location}",
            human_bytes(r.total_bytes),
            human_bytes(r.max_bytes),
            human_bytes(r.avg_bytes),
            grouped(r.count)
        );
    }
    Ok(())
}

fn cmd_stats(file: &Path, pid: Option<u32>, json: bool) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    let cap = subject.main_capture();
    if subject.one().is_none() && !json {
        eprintln!(
            "memtrack: stats of the launched process {}; --pid PID for another process of the tree",
            subject.tree.root().label()
        );
    }
    let progress = Progress::start(cap, json);
    let st = cap.stats();
    drop(progress);
    let mut sym = symbolizer(cap);
    let mut by_count = table(&st.allocated, &mut sym, GroupBy::Function);
    let by_bytes: Vec<_> = by_count.iter().take(5).cloned().collect();
    by_count.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.total_bytes.cmp(&a.total_bytes))
    });
    by_count.truncate(5);
    let temporary = table(&st.temporary, &mut sym, GroupBy::Function);
    warn(&sym.warnings);
    if json {
        let v = serde_json::json!({
            "capture": cap.path().display().to_string(),
            "pid": cap.header.pid,
            "total_allocations": st.allocated.allocations,
            "total_bytes": st.allocated.bytes,
            "histogram": st.histogram,
            "by_function": st.by_function,
            "top_by_count": by_count,
            "top_by_bytes": by_bytes,
            "temporary_allocations": st.temporary.allocations,
            "temporary_bytes": st.temporary.bytes,
            "top_temporary": temporary.iter().take(5).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("memtrack stats of {}", cap.path().display());
    println!(
        "  {}, {} requested; {} temporary ({})",
        count(st.allocated.allocations, "allocation"),
        bytes(st.allocated.bytes),
        grouped(st.temporary.allocations),
        bytes(st.temporary.bytes)
    );
    println!("\nallocation sizes");
    let most = st
        .histogram
        .iter()
        .map(|b| b.count)
        .max()
        .unwrap_or(1)
        .max(1);
    for b in &st.histogram {
        let bar = "#".repeat(((b.count * 40).div_ceil(most)) as usize);
        println!(
            "  {:>10} .. {:<10} {:>12}  {bar}",
            human_bytes(b.min),
            human_bytes(b.max),
            grouped(b.count)
        );
    }
    println!("\nby allocator function");
    for k in &st.by_function {
        println!(
            "  {:<16} {:>12} {}  {}",
            k.function,
            grouped(k.count),
            plural(k.count, "call"),
            bytes(k.bytes)
        );
    }
    println!("\ntop locations by count");
    for r in &by_count {
        println!(
            "  {:>12} {}  {:>12}  {}",
            grouped(r.count),
            plural(r.count, "call"),
            human_bytes(r.total_bytes),
            r.function
        );
    }
    println!("\ntop locations by bytes");
    for r in &by_bytes {
        println!(
            "  {:>12}  {:>12} {}  {}",
            human_bytes(r.total_bytes),
            grouped(r.count),
            plural(r.count, "call"),
            r.function
        );
    }
    println!("\ntemporary allocations");
    for r in temporary.iter().take(5) {
        println!(
            "  {:>12} {}  {:>12}  {}",
            grouped(r.count),
            plural(r.count, "call"),
            human_bytes(r.total_bytes),
            r.function
        );
    }
    Ok(())
}

fn cmd_plot(file: &Path, pid: Option<u32>, output: Option<PathBuf>) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    let progress = Progress::start(subject.main_capture(), false);
    let plot = match subject.one() {
        Some(_) => subject.main_capture().plot(),
        None => subject.tree.plot(),
    };
    drop(progress);
    let out =
        output.unwrap_or_else(|| file.with_file_name(format!("{}-plot.svg", subject.stem(file))));
    std::fs::write(&out, plot.svg).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "memtrack: heap over time written to {} (peak {} at {:.3} s)",
        out.display(),
        human_bytes(plot.peak_bytes),
        plot.peak_seconds
    );
    Ok(())
}

fn cmd_tree(
    file: &Path,
    pid: Option<u32>,
    view: View,
    depth: usize,
    min_percent: f64,
) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    let parts = subject_parts(&subject, view, false, false);
    let mut root = memtrack_reader::TreeNode {
        name: "[all]".into(),
        ..Default::default()
    };
    for part in &parts {
        let mut sym = symbolizer(part.cap);
        let mut t = call_tree(&part.view, &mut sym);
        warn(&sym.warnings);
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
    println!(
        "memtrack tree of {}: {}, {} in {}",
        file.display(),
        view_title(view, &subject),
        bytes(root.bytes),
        count(root.allocations, "allocation")
    );
    println!("{:>8} {:>11} {:>10}  call path", "share", "bytes", "count");
    print!("{}", render_tree(&root, depth, min_percent / 100.0));
    Ok(())
}

fn cmd_check(file: &Path, pid: Option<u32>, limits: Limits, json: bool) -> Result<u8> {
    // The verdict is the exit code: a reader that went away must not turn 1 into 0.
    struct ClosedIsFine<W>(W);
    impl<W: std::io::Write> std::io::Write for ClosedIsFine<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
                r => r,
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            match self.0.flush() {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r,
            }
        }
    }
    let mut out = ClosedIsFine(std::io::stdout().lock());
    check_report_for(file, pid, limits, json, &mut out)
}

/// Checks the budgets of the whole tree and writes the report to `out`.
fn check_report(
    file: &Path,
    limits: Limits,
    json: bool,
    out: &mut dyn std::io::Write,
) -> Result<u8> {
    check_report_for(file, None, limits, json, out)
}

/// Checks the budgets and writes the report to `out`; returns the exit code (0 held, 1 exceeded).
fn check_report_for(
    file: &Path,
    pid: Option<u32>,
    limits: Limits,
    json: bool,
    out: &mut dyn std::io::Write,
) -> Result<u8> {
    if !limits.any() {
        bail!("no limit given: use --max-peak, --max-leaked, --max-leaked-allocations, --max-allocations or --max-total");
    }
    let subject = Subject::open(file, pid)?;
    let cap = subject.main_capture();
    let budget = memtrack_reader::Budget {
        max_peak: limits.max_peak,
        max_leaked: limits.max_leaked,
        max_leaked_allocations: limits.max_leaked_allocations,
        max_allocations: limits.max_allocations,
        max_total: limits.max_total,
    };
    let progress = Progress::start(cap, json);
    let (results, complete) = match subject.one() {
        Some(_) => {
            let mut sym = symbolizer(cap);
            let r = cap.check(&budget, &mut sym);
            warn(&sym.warnings);
            (r, cap.complete())
        }
        None => (
            subject.tree.check(&budget, symbolizer),
            subject.tree.processes.iter().all(|p| p.summary.complete),
        ),
    };
    drop(progress);
    let exceeded = results.iter().filter(|r| r.exceeded).count();
    if json {
        let v = serde_json::json!({
            "capture": file.display().to_string(),
            "ok": exceeded == 0,
            "complete": complete,
            "pid": subject.one().map(|p| p.pid),
            "processes": subject.tree.processes.len(),
            "limits": results,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        match subject.one() {
            Some(p) if subject.is_one_of_many() => writeln!(
                out,
                "memtrack check of {}, process {}",
                file.display(),
                p.label()
            )?,
            Some(_) => writeln!(out, "memtrack check of {}", file.display())?,
            None => writeln!(
                out,
                "memtrack check of {}: {} processes, their combined peak and the sums of the rest",
                file.display(),
                subject.tree.processes.len()
            )?,
        }
        for r in &results {
            let show = |n: u64| {
                if r.unit == "bytes" {
                    bytes(n)
                } else {
                    count(n, "allocation")
                }
            };
            writeln!(
                out,
                "  {:<24} {} {} limit {}  {}",
                r.name.replace('_', "-"),
                show(r.measured),
                if r.exceeded { ">" } else { "<=" },
                show(r.limit),
                if r.exceeded { "EXCEEDED" } else { "ok" }
            )?;
            for p in &r.processes {
                writeln!(
                    out,
                    "      pid {}: {}  {}",
                    p.pid,
                    show(p.measured),
                    p.command
                )?;
            }
            for c in &r.top {
                let frames: Vec<&str> = c.frames.iter().take(10).map(String::as_str).collect();
                writeln!(
                    out,
                    "      {} in {}{}: {}{}",
                    human_bytes(c.bytes),
                    count(c.allocations, "allocation"),
                    c.pid.map(|p| format!(" [pid {p}]")).unwrap_or_default(),
                    frames.join(" <- "),
                    if c.frames.len() > 10 { " <- ..." } else { "" }
                )?;
            }
        }
        if !complete && subject::being_written(cap) {
            writeln!(out, "  note: the capture is still being written (no END record yet); figures cover what was recorded so far")?;
        } else if !complete {
            writeln!(out, "  note: the capture is incomplete (the process was killed or crashed); figures cover what was recorded")?;
        }
        writeln!(
            out,
            "result: {}",
            if exceeded == 0 {
                format!("all {} limits hold", results.len())
            } else {
                format!("{exceeded} of {} limits exceeded", results.len())
            }
        )?;
    }
    Ok(if exceeded == 0 { 0 } else { 1 })
}
