//! The `memtrack` command: thin glue over `memtrack-reader` and the preload shim.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use memtrack_reader::{
    call_tree, folded, grouped, human_bytes, render_tree, table, Capture, GroupBy, Summary,
    Symbolizer, View,
};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

// Every report line goes through these instead of std's `println!`/`print!`, which panic when
// standard output fails ("failed printing to stdout: Broken pipe" under `| head`).
macro_rules! println {
    () => {
        $crate::stdout_write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout_write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::stdout_write(format_args!($($arg)*))
    };
}

/// Writes to standard output. When it cannot: the reader of a pipe went away (`| head`), so
/// memtrack stops quietly with exit 0 (as `cat` would have, killed by SIGPIPE, without the
/// status); any other error (a full disk) is one message and exit 2.
fn stdout_write(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e);
    }
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("memtrack: error: cannot write to standard output: {e}");
    std::process::exit(2);
}

/// Whether an error comes from a reader of standard output that went away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    })
}

mod launch;
mod subject;
use subject::{Part, Subject};
mod process_tree;

const EXAMPLES: &str = "\
EXAMPLES:
    memtrack run -o svc.cap -- ./my-service --port 8080
    memtrack summary svc.cap
    memtrack summary svc.cap --json | jq .peak_bytes
    memtrack flamegraph svc.cap -o peak.svg
    memtrack export svc.cap --format folded --leaks -o leaks.folded
    memtrack export svc.cap --format pprof -o heap.pb.gz
    memtrack diff base.cap svc.cap --fail-on-growth 5%

EXIT CODES:
    run: the command's own exit code (128+N when it was killed by signal N)
    others: 0 ok, 1 a check failed, 2 an error";

#[derive(Parser)]
#[command(name = "memtrack", version, about = "Track every native allocation of a program; report peak heap, leaks and where they came from", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// In reports of Python programs, show only the Python frames of each stack.
    #[arg(long, global = true)]
    python_only: bool,
    /// In reports of Python programs, keep the interpreter's own frames (the C frames of
    /// CPython and libc between and above Python frames, hidden by default).
    #[arg(long, global = true)]
    all_frames: bool,
    /// In reports on a process tree, report on this process alone (its pid, as `memtrack
    /// summary` lists them). Default: the whole tree.
    #[arg(long, global = true, value_name = "PID")]
    pid: Option<u32>,
    /// Never name this function as the allocating location (an allocation wrapper: its caller
    /// is named instead). A glob over the whole function name (`*`, `?`); repeatable.
    #[arg(long, global = true, value_name = "PATTERN")]
    skip_function: Vec<String>,
}

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

#[derive(Subcommand)]
enum Cmd {
    /// Run a command with every allocation recorded into a capture file.
    #[command(
        after_help = "EXAMPLES:\n    memtrack run -- ./my-service --port 8080\n    memtrack run -o svc.cap --force -- python3 app.py"
    )]
    Run {
        /// Capture file to write [default: memtrack-<command>.<pid>.cap in the current directory]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Overwrite the output file if it exists.
        #[arg(long)]
        force: bool,
        /// Record the processes the command starts (fork, with or without exec), each into a
        /// capture of its own: FILE.<pid>. The default; accepted for scripts that pass it.
        #[arg(long, overrides_with = "no_follow_fork")]
        follow_fork: bool,
        /// Record the launched process alone (and what it becomes through exec); say at the
        /// end which programs its children ran unrecorded.
        #[arg(long, overrides_with = "follow_fork")]
        no_follow_fork: bool,
        /// Keep the captures of short helper processes (ended cleanly, peak under 1 MiB, under
        /// 2 s), which are otherwise removed and kept only as figures in FILE.
        #[arg(long)]
        keep_all: bool,
        /// Budgets checked when the command has finished (see `memtrack check`).
        #[command(flatten)]
        limits: Limits,
        /// The command and its arguments.
        // Not `allow_hyphen_values`: a misspelled option before the command (`--follow-forks`)
        // is an error, not a command; everything after the command's name passes untouched.
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Peak heap, leaks at exit, totals.
    #[command(
        after_help = "EXAMPLES:\n    memtrack summary svc.cap\n    memtrack summary svc.cap --json"
    )]
    Summary {
        /// The capture file.
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Memory flamegraph (interactive SVG) of one view, bytes as the count: an icicle graph
    /// (root at the top, so the widest frames open on the first screen) unless `--flame`.
    #[command(
        after_help = "EXAMPLES:\n    memtrack flamegraph svc.cap                # svc-peak.svg: live at the peak\n    memtrack flamegraph svc.cap --leaks -o leaks.svg\n    memtrack flamegraph svc.cap --allocated --inverted\n    memtrack flamegraph svc.cap --flame        # root at the bottom"
    )]
    Flamegraph {
        file: PathBuf,
        #[command(flatten)]
        view: ViewArgs,
        /// Allocation sites at the root, their callers next to them.
        #[arg(long)]
        inverted: bool,
        /// Classic flame graph: root at the bottom, callees above.
        #[arg(long, overrides_with = "icicle")]
        flame: bool,
        /// Icicle graph: root at the top, callees below (the default).
        #[arg(long, overrides_with = "flame")]
        icicle: bool,
        /// Output SVG [default: <capture>-<view>.svg beside the capture].
        #[arg(short, long, value_name = "OUT.svg")]
        output: Option<PathBuf>,
    },
    /// Ranked table of allocation sites: Total | Max | Avg | Count | Location.
    #[command(
        after_help = "EXAMPLES:\n    memtrack table svc.cap                        # by function, live at the peak\n    memtrack table svc.cap --leaks --by line --top 20\n    memtrack table svc.cap --allocated --by stack --json"
    )]
    Table {
        file: PathBuf,
        #[command(flatten)]
        view: ViewArgs,
        /// Group by the allocating function, its file:line, or the whole stack.
        #[arg(long, value_enum, default_value = "function")]
        by: By,
        /// Rows to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Allocation statistics: sizes, allocator functions, top locations, temporary allocations.
    #[command(
        after_help = "EXAMPLES:\n    memtrack stats svc.cap\n    memtrack stats svc.cap --json"
    )]
    Stats {
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check budgets: exit 0 when every limit holds, 1 when one is exceeded, 2 on an error.
    #[command(
        after_help = "EXAMPLES:\n    memtrack check svc.cap --max-peak 512MiB --max-leaked 0\n    memtrack check svc.cap --max-allocations 1000000 --max-total 10GB --json\n\nSIZE: plain bytes or a number with a unit: 1048576, 512KiB, 1.5GiB, 10M (binary), 10MB (decimal)."
    )]
    Check {
        file: PathBuf,
        #[command(flatten)]
        limits: Limits,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Call tree with inclusive bytes and counts, largest branches first.
    #[command(
        after_help = "EXAMPLES:\n    memtrack tree svc.cap\n    memtrack tree svc.cap --leaks --depth 20 --min-percent 0.1"
    )]
    Tree {
        file: PathBuf,
        #[command(flatten)]
        view: ViewArgs,
        /// Levels to show.
        #[arg(long, default_value_t = 12)]
        depth: usize,
        /// Fold branches holding less than this share of the view.
        #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
        min_percent: f64,
    },
    /// Heap in use over time as an SVG chart, the peak marked.
    #[command(
        after_help = "EXAMPLES:\n    memtrack plot svc.cap                 # svc-plot.svg beside the capture\n    memtrack plot svc.cap -o heap.svg"
    )]
    Plot {
        file: PathBuf,
        /// Output SVG [default: <capture>-plot.svg beside the capture].
        #[arg(short, long, value_name = "OUT.svg")]
        output: Option<PathBuf>,
    },
    /// Export a view for other tools.
    #[command(
        after_help = "EXAMPLES:\n    memtrack export svc.cap --format folded > peak.folded     # for flamegraph.pl, speedscope\n    memtrack export svc.cap --format folded --leaks -o leaks.folded\n    memtrack export svc.cap --format pprof -o heap.pb.gz      # go tool pprof, Pyroscope, Parca\n    memtrack export svc.cap --format json --leaks > leaks.json"
    )]
    Export {
        file: PathBuf,
        /// Output format: `folded` (`root;...;leaf bytes`, one line per stack); `pprof` (gzipped
        /// profile.proto with Go heap-profile sample types; in use = the view, peak by default);
        /// `json` (the view's totals and stacks, frames outermost first).
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[command(flatten)]
        view: ViewArgs,
        /// JSON: each stack with its frames written out in full (`frames`) rather than as
        /// indexes (`frame_ids`) into the one table of frames; many times larger.
        #[arg(long)]
        inline_frames: bool,
        /// Output file, `-` for standard output [default: -].
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
    },
    /// Compare a view of two captures: what grew, what shrank (differential flamegraph, table,
    /// folded), and fail when the total grew too much.
    #[command(
        after_help = "EXAMPLES:\n    memtrack diff base.cap new.cap                       # base-vs-new-peak.svg: red grew, blue shrank\n    memtrack diff base.cap new.cap --leaks --format table\n    memtrack diff base.cap new.cap --fail-on-growth 5%   # CI: exit 1 when the peak grew more than 5%\n    memtrack diff base.cap new.cap --fail-on-growth 1MiB"
    )]
    Diff {
        /// The baseline capture.
        base: PathBuf,
        /// The capture to compare with it.
        new: PathBuf,
        #[command(flatten)]
        view: ViewArgs,
        /// `svg` (differential flamegraph), `table` (locations whose bytes changed most),
        /// `folded` (`stack before after` lines), `json`.
        #[arg(long, value_enum, default_value = "svg")]
        format: DiffFormat,
        /// Output file [default: <base>-vs-<new>-<view>.svg for svg, standard output otherwise].
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        /// Exit 1 when the view's total grew by more than this: a percentage of the base's total
        /// (`5%`) or a size (`1MiB`).
        #[arg(long, value_name = "PERCENT|SIZE", value_parser = parse_growth)]
        fail_on_growth: Option<Growth>,
        /// Rows of the table.
        #[arg(long, default_value_t = 20)]
        top: usize,
    },
    /// Print every record and event in order (for debugging captures).
    #[command(hide = true)]
    Dump { file: PathBuf },
}

/// Which allocations a report covers (default: `--peak`).
#[derive(clap::Args, Clone, Copy)]
#[group(multiple = false)]
struct ViewArgs {
    /// What was live at the high-water mark (the default).
    #[arg(long)]
    peak: bool,
    /// What the program left live: for a Python program, when its code ended, before the
    /// interpreter's shutdown freed its modules; for others, at exit.
    #[arg(long)]
    leaks: bool,
    /// What was still live when the process exited (Python: after interpreter shutdown).
    #[arg(long)]
    leaks_at_exit: bool,
    /// Everything ever allocated.
    #[arg(long)]
    allocated: bool,
    /// Allocations freed again before the same thread allocated anything else.
    #[arg(long)]
    temporary: bool,
}

impl ViewArgs {
    fn view(self) -> View {
        match (self.leaks, self.allocated, self.temporary) {
            _ if self.leaks_at_exit => View::LeaksAtExit,
            (true, _, _) => View::Leaks,
            (_, true, _) => View::Allocated,
            (_, _, true) => View::Temporary,
            _ => View::Peak,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum ExportFormat {
    Folded,
    Pprof,
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum DiffFormat {
    Svg,
    Table,
    Folded,
    Json,
}

/// A growth limit of `diff --fail-on-growth`.
#[derive(Clone, Copy, Debug)]
enum Growth {
    Percent(f64),
    Bytes(u64),
}

fn parse_growth(s: &str) -> std::result::Result<Growth, String> {
    if let Some(p) = s.trim().strip_suffix('%') {
        return p
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(Growth::Percent)
            .ok_or_else(|| format!("bad percentage {s:?} (expected e.g. 5%)"));
    }
    parse_size(s).map(Growth::Bytes)
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum By {
    Function,
    Line,
    Stack,
}

/// Parses a size: plain bytes or a number with a unit. `KiB`, `MiB`, `GiB`, `TiB` and the bare
/// `K`, `M`, `G`, `T` are binary (1024); `kB`/`KB`, `MB`, `GB`, `TB` are decimal (1000).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: it should start with a number (1048576, 512KiB, 1.5GiB, 10MB)"
        ));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{num}' is not a number"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{s}' (use B, KiB, MiB, GiB, TiB, K, M, G, T, or decimal kB, MB, GB, TB)"
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("'{s}' is too large"));
    }
    if value.fract() != 0.0 && mult == 1.0 {
        return Err(format!("'{s}': a number of bytes must be whole"));
    }
    Ok(bytes.round() as u64)
}

/// Budgets checked against a capture.
#[derive(clap::Args, Clone, Copy, Default)]
struct Limits {
    /// Peak heap at most SIZE.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_peak: Option<u64>,
    /// Bytes still live at exit at most SIZE.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_leaked: Option<u64>,
    /// Allocations still live at exit at most N.
    #[arg(long, value_name = "N")]
    max_leaked_allocations: Option<u64>,
    /// Allocation calls at most N.
    #[arg(long, value_name = "N")]
    max_allocations: Option<u64>,
    /// Bytes allocated in all at most SIZE.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_total: Option<u64>,
}

impl Limits {
    fn any(&self) -> bool {
        self.max_peak.is_some()
            || self.max_leaked.is_some()
            || self.max_leaked_allocations.is_some()
            || self.max_allocations.is_some()
            || self.max_total.is_some()
    }
}

/// A progress bar on stderr for long reads: only when stderr is a terminal, and only once the
/// read has taken a second (`MEMTRACK_PROGRESS_AFTER_MS` changes that, for tests). Dropping it
/// clears the line.
struct Progress {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(cap: &Capture, quiet: bool) -> Progress {
        use std::io::IsTerminal;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if quiet || !std::io::stderr().is_terminal() || cap.chunks.is_empty() {
            return Progress { done, thread: None };
        }
        let after = std::env::var("MEMTRACK_PROGRESS_AFTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let (d, counter, total) = (done.clone(), cap.progress(), cap.chunks.len());
        let name = cap.path().display().to_string();
        let draw = move |n: usize| {
            let filled = n * 30 / total;
            eprint!(
                "\rreading {name} [{}{}] {:>3}%",
                "#".repeat(filled),
                " ".repeat(30 - filled),
                n * 100 / total
            );
        };
        // With no delay the bar is drawn at once, whatever the scheduler does with the thread.
        let mut drawn = after == 0;
        if drawn {
            draw(0);
        }
        let thread = std::thread::spawn(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let start = std::time::Instant::now();
            let mut first = true;
            while !d.load(Relaxed) {
                if !first {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                first = false;
                if start.elapsed().as_millis() < after {
                    continue;
                }
                draw(counter.load(Relaxed).min(total));
                drawn = true;
            }
            if drawn {
                eprint!("\r\x1b[K");
            }
        });
        Progress {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
        } => cmd_run(
            output,
            force,
            RunTree {
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

/// Refuses an `-o` that would destroy data: one of the command's `inputs` (the same file by
/// device and inode, so links and `./` spellings count), any memtrack capture (a process
/// tree's FILE.<pid> included), or a directory. `-` (standard output) and new files pass.
fn check_output(output: Option<&Path>, inputs: &[&PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(out) = output.filter(|o| o.as_os_str() != "-") else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(out) else {
        return Ok(());
    };
    if meta.is_dir() {
        bail!("cannot write {}: it is a directory", out.display());
    }
    for input in inputs {
        if std::fs::metadata(input).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()) {
            bail!(
                "refusing to write the report over {}, the capture it reads; choose another -o",
                out.display()
            );
        }
    }
    let mut head = [0u8; 8];
    // Regular files only: opening a FIFO or `/dev/stdout` to read would block or steal input.
    let is_capture = meta.is_file()
        && std::fs::File::open(out)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok()
        && &head == memtrack_format::MAGIC;
    if is_capture {
        bail!(
            "refusing to write the report over {}: it is a memtrack capture; choose another -o",
            out.display()
        );
    }
    Ok(())
}

/// Finds `libmemtrack.so`: `MEMTRACK_PRELOAD`, else beside this executable (a cargo build's
/// target/release), else in `../lib/memtrack/` or `../lib/` from it (`install.sh PREFIX`
/// puts them in PREFIX/bin and PREFIX/lib/memtrack).
fn find_preload() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MEMTRACK_PRELOAD") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "MEMTRACK_PRELOAD names {}, which is not a file",
                p.display()
            );
        }
        return Ok(std::path::absolute(&p)?);
    }
    let exe = std::env::current_exe().context("cannot locate the memtrack executable")?;
    // Through a symlink (~/bin/memtrack -> the build) too.
    let real = std::fs::canonicalize(&exe).unwrap_or_else(|_| exe.clone());
    let mut tried = Vec::new();
    for e in [&exe, &real] {
        let Some(dir) = e.parent() else { continue };
        for cand in [
            dir.join("libmemtrack.so"),
            dir.join("../lib/memtrack/libmemtrack.so"),
            dir.join("../lib/libmemtrack.so"),
        ] {
            if cand.is_file() {
                return Ok(cand);
            }
            if !tried.contains(&cand) {
                tried.push(cand);
            }
        }
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "libmemtrack.so (the library memtrack preloads into the command) not found; looked in {}. Install memtrack with `./install.sh [PREFIX]` from its source tree (it puts both in place), or build it with `cargo build --release` and run target/release/memtrack, or set MEMTRACK_PRELOAD=/path/to/libmemtrack.so",
        tried.join(", ")
    )
}

fn is_python(cmd: &Path) -> bool {
    let name = cmd.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_prefix("python")
        .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// A Python interpreter, or a script run by one (a console script: `#!/usr/bin/python3`,
/// `#!/usr/bin/env python3`).
fn runs_python(cmd: &Path) -> bool {
    if is_python(cmd) {
        return true;
    }
    let Ok(exe) = launch::resolve(cmd) else {
        return false;
    };
    let mut head = [0u8; 256];
    let n = std::fs::File::open(exe)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    let Some(line) = head[..n].strip_prefix(b"#!") else {
        return false;
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let words: Vec<&[u8]> = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    let interp = match words.as_slice() {
        [env, prog, ..] if env.ends_with(b"/env") => prog,
        [prog, ..] => prog,
        [] => return false,
    };
    is_python(Path::new(&*String::from_utf8_lossy(interp)))
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Whether SIGPIPE was ignored when memtrack started. Rust's runtime ignores it before `main`,
/// and `Command` resets it to the default in a child: the command gets back what memtrack was
/// started with (a program that ignores SIGPIPE sees EPIPE where it would otherwise die).
static SIGPIPE_IGNORED_AT_START: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Runs before Rust's runtime (from `.init_array`), single-threaded.
extern "C" fn read_sigpipe_at_start() {
    // SAFETY: a zeroed sigaction is a valid out-parameter; the call only reads the disposition.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut sa) == 0 {
            SIGPIPE_IGNORED_AT_START.store(
                sa.sa_sigaction == libc::SIG_IGN,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

#[used]
#[link_section = ".init_array"]
static READ_SIGPIPE_AT_START: extern "C" fn() = read_sigpipe_at_start;

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Which processes of the tree `memtrack run` records, and what it keeps of them.
struct RunTree {
    /// Every process the command starts records (the default; `--no-follow-fork` turns it off).
    follow_fork: bool,
    /// `--keep-all`: short helpers' captures are kept rather than folded into the root capture.
    keep_all: bool,
}

fn cmd_run(
    output: Option<PathBuf>,
    force: bool,
    tree: RunTree,
    limits: Limits,
    command: Vec<OsString>,
) -> Result<u8> {
    let lib = find_preload()?;
    let program = PathBuf::from(&command[0]);
    launch::check_trackable(&launch::resolve(&program)?)?;
    let out = match output {
        Some(o) => {
            let o = std::path::absolute(&o)
                .with_context(|| format!("bad output path {}", o.display()))?;
            // symlink_metadata: a link planted at the path counts as existing (and is never
            // followed: the tracker creates the capture with O_EXCL).
            if o.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                bail!(
                    "cannot write the capture to {}: it is a directory; give a file name, e.g. -o {}",
                    o.display(),
                    o.join("app.cap").display()
                );
            }
            if o.symlink_metadata().is_ok() {
                if !force {
                    bail!(
                        "{} already exists; pass --force to overwrite it",
                        o.display()
                    );
                }
                std::fs::remove_file(&o)
                    .with_context(|| format!("cannot remove {}", o.display()))?;
            }
            o
        }
        None => {
            let name = program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "cmd".into());
            std::env::current_dir()?.join(format!("memtrack-{name}.%p.cap"))
        }
    };
    if out.to_string_lossy().contains("%p") && output_is_template_conflict(&out) {
        bail!("the output name may not contain %p twice");
    }
    // Before the command runs: else it would run untracked, every process of it saying that
    // it cannot create its capture.
    check_capture_dir(&out)?;
    let mut preload = lib.as_os_str().to_os_string();
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("LD_PRELOAD", preload)
        .env("MEMTRACK_OUTPUT", &out)
        .env("MEMTRACK_LAUNCHER_PID", std::process::id().to_string());
    let mut unrecorded = None;
    if tree.follow_fork {
        cmd.env("MEMTRACK_FOLLOW_FORK", "1")
            .env_remove("MEMTRACK_UNRECORDED_SOCKET");
    } else {
        cmd.env_remove("MEMTRACK_FOLLOW_FORK");
        // Exec'd descendants, which do not record, say so through this socket.
        unrecorded = process_tree::Unrecorded::listen();
        match &unrecorded {
            Some(u) => cmd.env("MEMTRACK_UNRECORDED_SOCKET", u.name()),
            None => cmd.env_remove("MEMTRACK_UNRECORDED_SOCKET"),
        };
    }
    // A Python program anywhere in a recorded tree (under `uv run`, `sh -c`, `make`) allocates
    // through malloc too; said only when the command itself is Python.
    if std::env::var_os("PYTHONMALLOC").is_none() {
        let python = runs_python(&program);
        if python {
            eprintln!("memtrack: setting PYTHONMALLOC=malloc so that Python objects are allocated through malloc");
        }
        if python || tree.follow_fork {
            cmd.env("PYTHONMALLOC", "malloc");
        }
    }
    // Ctrl-C reaches the whole foreground process group, the command included: memtrack waits
    // for it to shut down. SIGTERM and SIGHUP sent to memtrack alone are passed on.
    // SAFETY: setting dispositions to SIG_IGN; the previous ones are kept for the command.
    let (int_was, quit_was) = unsafe {
        (
            libc::signal(libc::SIGINT, libc::SIG_IGN),
            libc::signal(libc::SIGQUIT, libc::SIG_IGN),
        )
    };
    // An ignored signal stays ignored across exec: the command gets back the dispositions
    // memtrack was started with (else Ctrl-C would not stop it, and Python, seeing SIGINT
    // ignored, would never raise KeyboardInterrupt); SIGPIPE too (see above).
    let pipe_ignored = SIGPIPE_IGNORED_AT_START.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: the closure runs in the forked child before exec and only calls signal(2), which
    // is async-signal-safe; the values are dispositions signal(2) returned.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::signal(libc::SIGINT, int_was);
            libc::signal(libc::SIGQUIT, quit_was);
            if pipe_ignored {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    // SAFETY: installing handlers that only call async-signal-safe kill.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            forward_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGHUP,
            forward_signal as *const () as libc::sighandler_t,
        );
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => bail!("cannot run {}: {e}", program.display()),
    };
    CHILD.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    let status = child.wait().context("waiting for the command")?;
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        _ => 1,
    };
    let unrecorded = unrecorded.map(process_tree::Unrecorded::finish);
    let cap = process_tree::root_capture(&out, child.id());
    if cap.is_file() {
        let shown = process_tree::shown(&cap);
        eprintln!("memtrack: capture written to {shown}");
        if tree.follow_fork {
            let folded = process_tree::fold_helpers(&cap, tree.keep_all);
            process_tree::report(&cap, &folded);
        }
        process_tree::report_unrecorded(&cap, &unrecorded.unwrap_or_default());
        eprintln!("memtrack: report on it with: memtrack summary {shown}   (or flamegraph, table, tree, stats, plot)");
        if limits.any() {
            // The command's own failure wins; else the budgets decide.
            // On stderr: the program's standard output stays its own.
            let checked = check_report(&cap, limits, false, &mut std::io::stderr().lock())?;
            return Ok(if code != 0 { code } else { checked });
        }
    } else {
        eprintln!(
            "memtrack: no capture was written to {}: the program may be statically linked (LD_PRELOAD cannot reach it) or it may have cleared LD_PRELOAD",
            cap.display()
        );
        if limits.any() && code == 0 {
            bail!("the budgets cannot be checked without a capture");
        }
    }
    Ok(code)
}

/// That the tracker will be able to create `out` (absolute, `%p` standing for a pid): a file
/// of that name is created and removed again (what the user may do there, a read-only or
/// special file system, a name too long: only trying tells).
fn check_capture_dir(out: &Path) -> Result<()> {
    let dir = out.parent().unwrap_or(Path::new("/"));
    let cannot = |why: String| {
        anyhow::anyhow!(
            "cannot write the capture to {}: {why}; choose another -o",
            out.display()
        )
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(cannot(format!(
                "the directory {} does not exist",
                dir.display()
            )))
        }
        Err(e) => return Err(cannot(format!("{}: {e}", dir.display()))),
        Ok(m) if !m.is_dir() => {
            return Err(cannot(format!("{} is not a directory", dir.display())))
        }
        Ok(_) => {}
    }
    let probe = PathBuf::from(
        out.to_string_lossy()
            .replace("%p", &std::process::id().to_string()),
    );
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        // Another run's capture of that pid: not a problem of the directory.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(cannot(format!("cannot create a file there: {e}"))),
    }
}

fn output_is_template_conflict(out: &Path) -> bool {
    out.to_string_lossy().matches("%p").count() > 1
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

/// Writes `bytes` to `output`, or to standard output when it is absent or `-`.
fn write_out(output: Option<&Path>, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    match output.filter(|o| o.as_os_str() != "-") {
        Some(o) => {
            std::fs::write(o, bytes).with_context(|| format!("cannot write {}", o.display()))
        }
        None => Ok(std::io::stdout().lock().write_all(bytes)?),
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_in_every_accepted_form() {
        assert_eq!(parse_size("1048576"), Ok(1048576));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1.5GiB"), Ok(1536 * 1024 * 1024));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("10M"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2kB"), Ok(2000));
        assert!(parse_size("10XB")
            .unwrap_err()
            .contains("unknown unit 'xb'"));
        assert!(parse_size("MiB")
            .unwrap_err()
            .contains("start with a number"));
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("1e30TB").is_err());
    }
}
