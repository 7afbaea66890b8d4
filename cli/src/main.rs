//! The `memtrack` command: parses the command line and hands each subcommand to the reader's
//! reports, or, for `memtrack run`, to the launcher.
//!
//! **Why so little here**: what a report says and how it is laid out belongs beside the
//! figures it shows, in `memtrack_reader::report`, where it can be tested without a process.
//! The command owns what only a command can: argument parsing ([`args`]), standard output and
//! output files ([`output`]: a closed pipe is success, no report is written over a capture),
//! the progress bar ([`progress`]), the environment (`MEMTRACK_SYMBOLIZE`), launching a
//! command under the preload library ([`run`]), and the exit code: each subcommand returns its
//! code or an error, and [`main`] alone turns errors into codes: 0 ok, 1 a check failed, 2 an
//! error (`run`: the command's own). The one exception is standard output failing in the middle
//! of a text report, which ends the process where it happens (see `output::Stdout`).

mod args;
mod attach;
mod every;
mod live;
mod output;
mod progress;
mod run;

use anyhow::{bail, Context, Result};
use args::{By, Cli, Cmd, DiffFormat, ExportFormat, Limits, RegionSortArg};
use clap::{CommandFactory, FromArgMatches};
use memtrack_reader::report::{self, ProgressGuard, ReportOptions, Reporter, Subject};
use memtrack_reader::{human_bytes, Budget, Capture, GroupBy, RegionSort, View};
use output::{check_output, is_broken_pipe, write_out, ClosedIsFine, Stdout};
use progress::Progress;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Where each limit stood on the command line says which `--region` it follows.
    let limits_at = match matches.subcommand() {
        Some(("check" | "run", m)) => Some(m.clone()),
        _ => None,
    };
    let options = ReportOptions {
        python_only: cli.python_only,
        all_frames: cli.all_frames,
        skip_functions: cli.skip_function.clone(),
        // No file is read: frames show as module+offset (the golden tests' output).
        no_symbols: std::env::var_os("MEMTRACK_SYMBOLIZE").is_some_and(|v| v == "0"),
    };
    // No report writes over what it reads, nor over any capture.
    let outputs = match &cli.cmd {
        // A directory, checked by the export itself.
        Cmd::Export { every: Some(_), .. } => Ok(()),
        Cmd::Flamegraph { file, output, .. }
        | Cmd::Export { file, output, .. }
        | Cmd::Plot { file, output }
        | Cmd::Report { file, output } => check_output(output.as_deref(), &[file]),
        Cmd::Diff {
            base, new, output, ..
        } => check_output(output.as_deref(), &[base, new]),
        _ => Ok(()),
    };
    let result = outputs.and_then(|()| {
        let mut diag = std::io::stderr();
        let progress =
            |cap: &Capture, quiet: bool| -> ProgressGuard { Box::new(Progress::start(cap, quiet)) };
        let mut r = Reporter {
            options,
            diag: &mut diag,
            progress: &progress,
        };
        dispatch(&mut r, cli.cmd, cli.pid, limits_at.as_ref())
    });
    match result {
        Ok(code) => ExitCode::from(code),
        // `memtrack export ... | head`: the reader had what it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<attach::Refusal>().is_some() => {
            eprintln!("memtrack: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("memtrack: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one subcommand; returns its exit code.
fn dispatch(
    r: &mut Reporter,
    cmd: Cmd,
    pid: Option<u32>,
    limits_at: Option<&clap::ArgMatches>,
) -> Result<u8> {
    let resolve = |limits: args::LimitArgs| -> Result<Limits> {
        match limits_at {
            Some(m) => limits.resolve(m).map_err(anyhow::Error::msg),
            None => Ok(Limits::default()),
        }
    };
    match cmd {
        Cmd::Run {
            output,
            force,
            follow_fork: _,
            no_follow_fork,
            keep_all,
            live,
            live_output,
            mode,
            limits,
            command,
        } => {
            let tree = run::RunTree {
                fast: mode.encoding == args::Encoding::Fast,
                sample_rate: mode.sample_rate,
                sample_seed: mode.sample_seed,
                aggregate: mode.aggregate.then_some(mode.checkpoint_interval),
                follow_fork: !no_follow_fork,
                keep_all,
                live: live.then_some(run::Live {
                    output: live_output,
                }),
            };
            run::cmd_run(r, output, force, tree, resolve(limits)?, command)
        }
        Cmd::Attach {
            pid,
            output,
            duration,
            method,
            mode,
        } => {
            let how = attach::How {
                sample_rate: mode.sample_rate.unwrap_or(0),
                sample_seed_plus_one: mode.sample_seed.map_or(0, |s| s.wrapping_add(1)),
                checkpoint_interval_ms: if mode.aggregate {
                    mode.checkpoint_interval
                } else {
                    0
                },
                fast: mode.encoding == args::Encoding::Fast,
            };
            attach::cmd_attach(pid, output, duration, method, how)
        }
        Cmd::Detach { pid } => attach::cmd_detach(pid),
        Cmd::Compact { files, output } => compact(&files, output.as_deref()),
        Cmd::Live { file } => {
            live::live(&r.options, &file, None)?;
            Ok(0)
        }
        Cmd::Check {
            file,
            limits,
            json,
            window,
        } => {
            let mut out = ClosedIsFine(std::io::stdout().lock());
            let window = window.window().map_err(anyhow::Error::msg)?;
            check(r, &file, pid, resolve(limits)?, window, json, &mut out)
        }
        Cmd::Summary { file, json, window } => {
            let mut subject = Subject::open(&file, pid)?;
            let window = window.window().map_err(anyhow::Error::msg)?;
            note_clamped(r, subject.with_window(window, None)?);
            report::summary::summary(r, &mut subject, &file, pid, json, &mut Stdout)?;
            Ok(0)
        }
        Cmd::Regions { file, json, sort } => {
            let subject = Subject::open(&file, pid)?;
            subject.refuse_aggregated("regions need the region marks among the events")?;
            let sort = match sort {
                RegionSortArg::Peak => RegionSort::Peak,
                RegionSortArg::Allocated => RegionSort::Allocated,
                RegionSortArg::Retained => RegionSort::Retained,
                RegionSortArg::Count => RegionSort::Count,
                RegionSortArg::Time => RegionSort::Time,
            };
            report::regions::regions(r, &subject, &file, sort, json, &mut Stdout)?;
            Ok(0)
        }
        Cmd::Dump { file } => {
            let cap = Capture::open(&file)?;
            if cap.aggregated() {
                bail!(
                    "{}: an aggregated capture (memtrack run --aggregate) holds no events to dump (memtrack summary shows its last checkpoint)",
                    file.display()
                );
            }
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            report::dump::dump(&cap, &mut out)?;
            Ok(0)
        }
        Cmd::Stats { file, json } => {
            let subject = Subject::open(&file, pid)?;
            subject.refuse_aggregated(
                "stats (sizes, lifetimes, temporary allocations) need every event",
            )?;
            report::stats::stats(r, &subject, json, &mut Stdout)?;
            Ok(0)
        }
        Cmd::Tree {
            file,
            view,
            window,
            region,
            depth,
            min_percent,
        } => {
            let view = view.view();
            let subject = open_in(r, &file, pid, region, view, &window)?;
            report::tree::tree(r, &subject, &file, view, depth, min_percent, &mut Stdout)?;
            Ok(0)
        }
        Cmd::Plot { file, output } => {
            plot(r, &file, pid, output)?;
            Ok(0)
        }
        Cmd::Report { file, output } => {
            html_report(r, &file, pid, output)?;
            Ok(0)
        }
        Cmd::Table {
            file,
            view,
            window,
            region,
            by,
            top,
            json,
        } => {
            let subject = open_in(r, &file, pid, region, view.view(), &window)?;
            let group = match by {
                By::Function => GroupBy::Function,
                By::Line => GroupBy::Line,
                By::Stack => GroupBy::Stack,
            };
            let view = view.view();
            report::table::table(r, &subject, &file, view, group, top, json, &mut Stdout)?;
            Ok(0)
        }
        Cmd::Flamegraph {
            file,
            view,
            window,
            region,
            inverted,
            flame,
            icicle: _,
            output,
        } => {
            let view = view.view();
            let name = region.clone();
            let subject = open_in(r, &file, pid, region, view, &window)?;
            let graph = report::flamegraph::flamegraph(r, &subject, view, inverted, flame);
            let out = output.unwrap_or_else(|| {
                let stem = match &name {
                    Some(n) => format!("{}-{}", subject.stem(&file), n.replace('/', "-")),
                    None => subject.stem(&file),
                };
                file.with_file_name(format!("{stem}-{}.svg", view.name()))
            });
            let what = graph.what.clone();
            graph_to(&out, |w| graph.write(w, &out))?;
            eprintln!(
                "memtrack: flamegraph of {what} written to {}",
                out.display()
            );
            Ok(0)
        }
        Cmd::Export {
            file,
            format,
            view,
            window,
            region,
            inline_frames,
            every,
            output,
        } => {
            if let Some(every) = every {
                if !matches!(format, ExportFormat::Pprof) {
                    bail!("--every writes pprof profiles: use it with --format pprof");
                }
                if view.given() || window.given() || region.is_some() || inline_frames {
                    bail!("--every takes no view, window or region: each profile holds what was in use at the end of its interval and what was allocated during it");
                }
                let Some(dir) = output.filter(|o| o.as_os_str() != "-") else {
                    bail!("--every writes one file per interval: give their directory with -o DIR");
                };
                every::export_every(r, &file, pid, every, &dir)?;
                return Ok(0);
            }
            let subject = open_in(r, &file, pid, region, view.view(), &window)?;
            export(
                r,
                &file,
                subject,
                format,
                view.view(),
                inline_frames,
                output,
            )?;
            Ok(0)
        }
        Cmd::Diff {
            base,
            new,
            view,
            window,
            region,
            format,
            output,
            fail_on_growth,
            top,
        } => {
            let view = view.view();
            no_temporary(&region, view)?;
            let window = window.window().map_err(anyhow::Error::msg)?;
            let d = report::diff::compare_in(r, &base, &new, pid, view, region.as_deref(), window)?;
            diff_to(r, &d, view, &base, &new, format, output, top)?;
            Ok(match fail_on_growth {
                Some(limit) => report::diff::verdict(r, &d, view, limit),
                None => 0,
            })
        }
    }
}

/// The subject of a view report, restricted to `region` when one is given (`--region`), and to
/// a window of time (`--at`, `--between`).
fn open_in(
    r: &mut Reporter,
    file: &Path,
    pid: Option<u32>,
    region: Option<String>,
    view: View,
    window: &args::WindowArgs,
) -> Result<Subject> {
    no_temporary(&region, view)?;
    let window = window.window().map_err(anyhow::Error::msg)?;
    let subject = Subject::open(file, pid)?;
    if view == View::Temporary {
        subject.refuse_aggregated(
            "temporary allocations need the order of each thread's events, which it did not keep",
        )?;
    }
    if view.is_mapped() {
        subject.refuse_aggregated("mapped memory (mmap) is not aggregated")?;
    }
    let mut subject = subject.with_region(region)?;
    note_clamped(r, subject.with_window(window, Some(view))?);
    Ok(subject)
}

/// Says that a window's times were brought within the capture.
fn note_clamped(r: &mut Reporter, note: Option<String>) {
    if let Some(note) = note {
        r.note(format_args!("memtrack: note: {note}\n"));
    }
}

/// The temporary and mapped views have no region counterpart.
fn no_temporary(region: &Option<String>, view: View) -> Result<()> {
    if region.is_some() && view == View::Temporary {
        bail!("--region does not apply to --temporary (use --peak, --leaks or --allocated)");
    }
    if region.is_some() && view.is_mapped() {
        bail!("--region does not apply to --mapped (regions measure the heap)");
    }
    Ok(())
}

/// Creates the SVG `out` and has `draw` write it. The buffer is flushed as it is dropped, as
/// every SVG of memtrack's has been.
fn graph_to(
    out: &Path,
    draw: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let f =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    draw(&mut std::io::BufWriter::new(f))
}

/// `memtrack check` (and the budgets of `memtrack run`): the report to `out`, the verdict as
/// the exit code.
/// `memtrack compact`: each capture in turn, one line each on standard error; a capture that
/// cannot be compacted is named and the others still are (exit 2 at the end).
fn compact(files: &[PathBuf], output: Option<&Path>) -> Result<u8> {
    if output.is_some() && files.len() > 1 {
        bail!("-o/--output takes one capture, not {}", files.len());
    }
    if let Some(out) = output.filter(|o| o.exists()) {
        bail!(
            "{} exists; choose another -o (compact never writes over a file it did not make)",
            out.display()
        );
    }
    let mut failed = 0;
    for file in files {
        let started = std::time::Instant::now();
        let done = match memtrack_reader::compact_file(file, output) {
            Ok(done) => done,
            Err(e) if files.len() > 1 => {
                eprintln!("memtrack: error: {e}");
                failed += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let shown = output.unwrap_or(file).display();
        if done.chunks == 0 {
            eprintln!(
                "memtrack: {}: already compact ({}), left as it was",
                file.display(),
                human_bytes(done.bytes_before)
            );
            continue;
        }
        let torn = if done.torn_bytes > 0 {
            format!(
                "; the unfinished last record ({} bytes, unreadable) was left out",
                done.torn_bytes
            )
        } else {
            String::new()
        };
        eprintln!(
            "memtrack: {shown}: {} -> {} ({} chunks transcoded, {:.1} s){torn}",
            human_bytes(done.bytes_before),
            human_bytes(done.bytes_after),
            done.chunks,
            started.elapsed().as_secs_f64(),
        );
    }
    if failed > 0 {
        bail!(
            "{failed} of {} captures could not be compacted",
            files.len()
        );
    }
    Ok(0)
}

fn check(
    r: &mut Reporter,
    file: &Path,
    pid: Option<u32>,
    limits: Limits,
    window: Option<memtrack_reader::Window>,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    if !limits.any() {
        bail!("no limit given: use --max-peak, --max-leaked, --max-leaked-allocations, --max-allocations or --max-total (after --region NAME: limits on that region)");
    }
    let mut subject = Subject::open(file, pid)?;
    note_clamped(r, subject.with_window(window, None)?);
    let budget = Budget {
        max_peak: limits.max_peak,
        max_leaked: limits.max_leaked,
        max_leaked_allocations: limits.max_leaked_allocations,
        max_allocations: limits.max_allocations,
        max_total: limits.max_total,
    };
    report::check::check_with_regions(r, &subject, file, &budget, &limits.regions, json, out)
}

fn plot(r: &mut Reporter, file: &Path, pid: Option<u32>, output: Option<PathBuf>) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    // One process's checkpoints plot; a tree's combined heap needs every event's time.
    subject.refuse_aggregated_tree("the combined memory over time of a process tree")?;
    let plot = report::plot::plot(r, &subject);
    let out =
        output.unwrap_or_else(|| file.with_file_name(format!("{}-plot.svg", subject.stem(file))));
    std::fs::write(&out, plot.svg).with_context(|| format!("cannot write {}", out.display()))?;
    let rss = plot
        .peak_rss
        .map(|(b, t)| {
            let what = match plot.checkpoints {
                Some(_) => "highest resident memory at a checkpoint",
                None => "resident memory peak",
            };
            format!("; {what} {} at {t:.3} s", human_bytes(b))
        })
        .unwrap_or_default();
    let from = plot
        .checkpoints
        .map(|n| match n {
            1 => " from its one checkpoint".to_string(),
            n => format!(" from {n} checkpoints"),
        })
        .unwrap_or_default();
    eprintln!(
        "memtrack: memory over time{from} written to {} (heap peak {} at {:.3} s{rss})",
        out.display(),
        human_bytes(plot.peak_bytes),
        plot.peak_seconds
    );
    Ok(())
}

/// `memtrack report`: the HTML page, written once it is computed.
fn html_report(
    r: &mut Reporter,
    file: &Path,
    pid: Option<u32>,
    output: Option<PathBuf>,
) -> Result<()> {
    let subject = Subject::open(file, pid)?;
    subject.refuse_aggregated(
        "the HTML report's timeline and temporary allocations need every event",
    )?;
    let page = report::html::report(r, &subject)?;
    let out = output
        .unwrap_or_else(|| file.with_file_name(format!("{}-report.html", subject.stem(file))));
    graph_to(&out, |w| page.write(w, &out))?;
    eprintln!(
        "memtrack: report written to {} ({})",
        out.display(),
        page.describe()
    );
    Ok(())
}

fn export(
    r: &mut Reporter,
    file: &Path,
    subject: Subject,
    format: ExportFormat,
    view: View,
    inline_frames: bool,
    output: Option<PathBuf>,
) -> Result<()> {
    let parts = r.parts(&subject, view, false, true);
    let to_file = output.as_deref().filter(|o| o.as_os_str() != "-");
    match format {
        ExportFormat::Folded => {
            let lines = r.folded_parts(&parts);
            drop(parts);
            let write = report::export::write_folded;
            match to_file {
                Some(o) => {
                    let mut f = std::fs::File::create(o)
                        .with_context(|| format!("cannot create {}", o.display()))?;
                    write(&lines, &mut f).with_context(|| format!("cannot write {}", o.display()))
                }
                None => Ok(write(&lines, &mut std::io::stdout().lock())?),
            }
        }
        ExportFormat::Pprof => {
            let gz = report::export::pprof(r, &parts)?;
            write_out(output.as_deref(), &gz)
        }
        ExportFormat::Json => {
            let export = report::export::json(r, &parts, subject.window);
            drop(parts);
            // Written as it goes: a large view's text is never held whole.
            let capture = file.display().to_string();
            match to_file {
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
            }
        }
    }
}

/// Writes a diff in `format` to `output` (an SVG beside the new capture by default, standard
/// output otherwise).
#[allow(clippy::too_many_arguments)] // one per command-line option
fn diff_to(
    r: &mut Reporter,
    d: &memtrack_reader::Diff,
    view: View,
    base: &Path,
    new: &Path,
    format: DiffFormat,
    output: Option<PathBuf>,
    top: usize,
) -> Result<()> {
    let mut text = Vec::new();
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
            graph_to(&out, |w| report::diff::svg(r, d, view, base, new, w))?;
            eprintln!(
                "memtrack: differential flamegraph written to {}",
                out.display()
            );
            return Ok(());
        }
        DiffFormat::Folded => report::diff::folded(d, &mut text)?,
        DiffFormat::Json => {
            serde_json::to_writer_pretty(&mut text, d)?;
            text.push(b'\n');
        }
        DiffFormat::Table => report::diff::table(d, view, top, &mut text)?,
    }
    write_out(output.as_deref(), &text)
}
