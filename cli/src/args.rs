//! The command line: every subcommand, option and help text, and the parsers of sizes and
//! growth limits. Nothing here reads a capture.

use clap::{Parser, Subcommand};
use memtrack_reader::report::diff::Growth;
use memtrack_reader::{View, Window};
use std::ffi::OsString;
use std::path::PathBuf;

pub(crate) const EXAMPLES: &str = "\
EXAMPLES:
    memtrack run -o svc.cap -- ./my-service --port 8080
    memtrack run --live -- ./my-service        # watch its heap while it runs
    memtrack run --sample-rate 512KiB -o svc.cap -- ./my-service   # production: sampled
    memtrack summary svc.cap
    memtrack summary svc.cap --json | jq .peak_bytes
    memtrack flamegraph svc.cap -o peak.svg
    memtrack table svc.cap --at 1.5s              # what was live 1.5 s after the start
    memtrack flamegraph svc.cap --between 10 20   # the high-water mark between 10 s and 20 s
    memtrack report svc.cap                       # interactive HTML: svc-report.html
    memtrack export svc.cap --format folded --leaks -o leaks.folded
    memtrack export svc.cap --format pprof -o heap.pb.gz
    memtrack diff base.cap svc.cap --fail-on-growth 5%
    memtrack regions svc.cap                   # memory per marked region, largest first
    memtrack flamegraph svc.cap --region search -o search.svg
    memtrack check svc.cap --region search --max-peak 3MiB --region load --max-leaked 4MB
    memtrack attach 4242 --duration 30 -o svc.cap   # record a running process for 30 s

EXIT CODES:
    run: the command's own exit code (128+N when it was killed by signal N)
    others: 0 ok, 1 a check failed, 2 an error";

#[derive(Parser)]
#[command(name = "memtrack", version, about = "Track every native allocation of a program; report peak heap, leaks and where they came from", after_help = EXAMPLES)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
    /// In reports of Python programs, show only the Python frames of each stack.
    #[arg(long, global = true)]
    pub(crate) python_only: bool,
    /// In reports of Python programs, keep the interpreter's own frames (the C frames of
    /// CPython and libc between and above Python frames, hidden by default).
    #[arg(long, global = true)]
    pub(crate) all_frames: bool,
    /// In reports on a process tree, report on this process alone (its pid, as `memtrack
    /// summary` lists them). Default: the whole tree.
    #[arg(long, global = true, value_name = "PID")]
    pub(crate) pid: Option<u32>,
    /// Never name this function as the allocating location (an allocation wrapper: its caller
    /// is named instead). A glob over the whole function name (`*`, `?`); repeatable.
    #[arg(long, global = true, value_name = "PATTERN")]
    pub(crate) skip_function: Vec<String>,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run a command with every allocation recorded into a capture file.
    #[command(
        after_help = "EXAMPLES:\n    memtrack run -- ./my-service --port 8080\n    memtrack run -o svc.cap --force -- python3 app.py\n    memtrack run --live -- ./my-service --port 8080     # watch it; output in memtrack-my-service.<pid>.out\n    memtrack run --sample-rate 512KiB -- ./my-service   # sampled: cheap enough for production\n    memtrack run --encoding fast -o svc.cap -- ./my-service   # less CPU, larger capture\n    memtrack compact svc.cap                             # afterwards: as small as the default"
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
        /// Show the live view (see `memtrack live`) on the terminal while the command runs;
        /// its standard output and error go to a file (`--live-output`), its standard input is
        /// empty. Ctrl-C is passed to the command as without `--live`; q leaves the view and
        /// memtrack waits for the command as usual (it is not stopped). Not with `--aggregate`
        /// (the view follows events; `memtrack summary` reads an aggregated capture's latest
        /// checkpoint while it runs).
        #[arg(long, conflicts_with = "aggregate")]
        live: bool,
        /// With `--live`: where the command's standard output and error go [default: the
        /// capture's name with `.out` for `.cap`].
        #[arg(long, value_name = "FILE", requires = "live")]
        live_output: Option<PathBuf>,
        #[command(flatten)]
        mode: RecordingMode,
        /// Budgets checked when the command has finished (see `memtrack check`).
        #[command(flatten)]
        limits: LimitArgs,
        /// The command and its arguments.
        // Not `allow_hyphen_values`: a misspelled option before the command (`--follow-forks`)
        // is an error, not a command; everything after the command's name passes untouched.
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Start recording a running process (glibc, x86-64): loads libmemtrack.so into it
    /// through ptrace and records new allocations and their frees until --duration ends,
    /// Ctrl-C, `memtrack detach PID`, or the process exits. Allocations made before the attach
    /// are not in the capture. Needs ptrace permission over the process (same user, or root /
    /// CAP_SYS_PTRACE; see kernel.yama.ptrace_scope). Refusals exit 2 with the reason and a fix.
    #[command(
        after_help = "EXAMPLES:\n    memtrack attach 4242                     # until Ctrl-C: memtrack-<name>.4242.cap\n    memtrack attach 4242 --duration 30 -o svc.cap\n    memtrack detach 4242                     # from another shell: stop recording\n\nThe process opens the capture itself (its user, its current file system): the path is\nmade absolute first."
    )]
    Attach {
        /// The process id.
        #[arg(id = "process_id", value_name = "PID", value_parser = parse_pid)]
        pid: i32,
        /// Capture file to write [default: memtrack-<name>.<pid>.cap in the current directory]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Stop recording after this many seconds (the process stops by itself; memtrack
        /// waits for it). Default: until Ctrl-C or `memtrack detach`.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
        /// How to load the library into the process: `ptrace` calls dlopen in one thread,
        /// stopped at a safe point, with system calls only (no debugger needed); `gdb` has gdb
        /// make the same calls (it stops every thread and allocates the string arguments in
        /// the process, so a thread stopped inside malloc can deadlock it). `auto` is ptrace.
        #[arg(long, value_enum, default_value = "auto")]
        method: AttachMethod,
        /// As `memtrack run`'s: a sample, or aggregated figures (for a busy production process
        /// or a long recording).
        #[command(flatten)]
        mode: RecordingMode,
    },
    /// Rewrite captures recorded with `--encoding fast` in the compact encoding (2.5 to 3.4
    /// times smaller on the benchmark's workloads), in place: the events, figures and every report stay the same. A capture
    /// still being written is refused.
    #[command(
        after_help = "EXAMPLES:\n    memtrack compact svc.cap\n    memtrack compact svc.cap.*            # every capture of a process tree\n    memtrack compact svc.cap -o small.cap # keep the original"
    )]
    Compact {
        /// The captures.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Write the compacted capture here instead of replacing FILE (one FILE only).
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
    },
    /// Stop the recording `memtrack attach` started in a process (the process keeps running;
    /// its capture is complete when this returns).
    Detach {
        /// The process id.
        #[arg(id = "process_id", value_name = "PID", value_parser = parse_pid)]
        pid: i32,
    },
    /// Follow a capture while it is written: heap and RSS over the last minutes, the locations
    /// holding the most live bytes, growth since the view started; refreshed every second.
    /// Keys: l live, a allocated since the view started, b by function / by line, q quit.
    /// For a process tree, the launched process's capture is followed (not its children's).
    #[command(
        after_help = "EXAMPLES:\n    memtrack live svc.cap                       # while `memtrack run -o svc.cap` runs elsewhere\n    memtrack run --live -- ./my-service         # run and watch; its output goes to a file\n    memtrack run --live --live-output svc.log -o svc.cap -- python3 app.py\n\nA finished capture shows its final state. The view reads only what was appended since its\nlast refresh, so it stays cheap on a capture that grows for hours."
    )]
    Live {
        /// The capture file (being written, or finished).
        file: PathBuf,
    },
    /// Peak heap, leaks at exit, totals.
    #[command(
        after_help = "EXAMPLES:\n    memtrack summary svc.cap\n    memtrack summary svc.cap --json\n    memtrack summary svc.cap --between 10 20     # peak, allocated and frees within the window"
    )]
    Summary {
        /// The capture file.
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// With --at or --between: the window's figures too (live then; peak, allocated and
        /// frees within it) and its top locations.
        #[command(flatten)]
        window: WindowArgs,
    },
    /// Memory flamegraph (interactive SVG) of one view, bytes as the count: an icicle graph
    /// (root at the top, so the widest frames open on the first screen) unless `--flame`.
    #[command(
        after_help = "EXAMPLES:\n    memtrack flamegraph svc.cap                # svc-peak.svg: live at the peak\n    memtrack flamegraph svc.cap --leaks -o leaks.svg\n    memtrack flamegraph svc.cap --allocated --inverted\n    memtrack flamegraph svc.cap --mapped       # svc-mapped.svg: mmap at its peak\n    memtrack flamegraph svc.cap --flame        # root at the bottom"
    )]
    Flamegraph {
        file: PathBuf,
        #[command(flatten)]
        view: ViewArgs,
        #[command(flatten)]
        window: WindowArgs,
        /// Only the allocations made inside occurrences of this region (a name, or a path
        /// `parent/child`); the peak view is what the region held at the high-water mark of its
        /// largest occurrence. See `memtrack regions`.
        #[arg(long, value_name = "NAME")]
        region: Option<String>,
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
        after_help = "EXAMPLES:\n    memtrack table svc.cap                        # by function, live at the peak\n    memtrack table svc.cap --leaks --by line --top 20\n    memtrack table svc.cap --allocated --by stack --json\n    memtrack table svc.cap --mapped --leaks       # mmap still mapped at exit"
    )]
    Table {
        file: PathBuf,
        #[command(flatten)]
        view: ViewArgs,
        #[command(flatten)]
        window: WindowArgs,
        /// Only the allocations made inside occurrences of this region (a name, or a path
        /// `parent/child`); the peak view is what the region held at the high-water mark of its
        /// largest occurrence. See `memtrack regions`.
        #[arg(long, value_name = "NAME")]
        region: Option<String>,
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
        after_help = "EXAMPLES:\n    memtrack check svc.cap --max-peak 512MiB --max-leaked 0\n    memtrack check svc.cap --max-allocations 1000000 --max-total 10GB --json\n    memtrack check svc.cap --max-peak 1GiB --region search --max-peak 3MiB --region load --max-leaked 4MB\n    memtrack check svc.cap --between 30s 60s --max-peak 200MiB --max-leaked 0   # the steady state\n\nSIZE: plain bytes or a number with a unit: 1048576, 512KiB, 1.5GiB, 10M (binary), 10MB (decimal)."
    )]
    Check {
        file: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// With --between: the limits apply to the window (its peak, the allocations made in
        /// it, those of them leaked); with --at: --max-peak is what was live then.
        #[command(flatten)]
        window: WindowArgs,
    },
    /// Call tree with inclusive bytes and counts, largest branches first.
    #[command(
        after_help = "EXAMPLES:\n    memtrack tree svc.cap\n    memtrack tree svc.cap --leaks --depth 20 --min-percent 0.1"
    )]
    Tree {
        file: PathBuf,
        #[command(flatten)]
        view: ViewArgs,
        #[command(flatten)]
        window: WindowArgs,
        /// Only the allocations made inside occurrences of this region (a name, or a path
        /// `parent/child`); the peak view is what the region held at the high-water mark of its
        /// largest occurrence. See `memtrack regions`.
        #[arg(long, value_name = "NAME")]
        region: Option<String>,
        /// Levels to show.
        #[arg(long, default_value_t = 12)]
        depth: usize,
        /// Fold branches holding less than this share of the view.
        #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
        min_percent: f64,
    },
    /// Memory over time as an SVG chart: the heap in use and resident memory (RSS), each in a
    /// panel of its own scale on one time axis, each peak marked with its size and time;
    /// regions as bands below.
    #[command(
        after_help = "EXAMPLES:\n    memtrack plot svc.cap                 # svc-plot.svg beside the capture\n    memtrack plot svc.cap -o heap.svg"
    )]
    Plot {
        file: PathBuf,
        /// Output SVG [default: <capture>-plot.svg beside the capture].
        #[arg(short, long, value_name = "OUT.svg")]
        output: Option<PathBuf>,
    },
    /// An interactive HTML report: memory over time, and the flamegraph and table of any time
    /// window (one self-contained file; no network needed to view it).
    #[command(
        after_help = "EXAMPLES:\n    memtrack report svc.cap               # svc-report.html beside the capture\n    memtrack report svc.cap -o report.html\n    memtrack report tree.cap --pid 4242   # one process of a recorded tree"
    )]
    Report {
        file: PathBuf,
        /// Output HTML [default: <capture>-report.html beside the capture, without the
        /// capture's extension: svc.cap gives svc-report.html].
        #[arg(short, long, value_name = "OUT.html")]
        output: Option<PathBuf>,
    },
    /// Export a view for other tools.
    #[command(
        after_help = "EXAMPLES:\n    memtrack export svc.cap --format folded > peak.folded     # for flamegraph.pl, speedscope\n    memtrack export svc.cap --format folded --leaks -o leaks.folded\n    memtrack export svc.cap --format pprof -o heap.pb.gz      # go tool pprof, Pyroscope, Parca\n    memtrack export svc.cap --format pprof --every 60s -o profiles/   # one profile a minute; rerun to add new ones\n    memtrack export svc.cap --format json --leaks > leaks.json"
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
        #[command(flatten)]
        window: WindowArgs,
        /// Only the allocations made inside occurrences of this region (a name, or a path
        /// `parent/child`); the peak view is what the region held at the high-water mark of its
        /// largest occurrence. See `memtrack regions`.
        #[arg(long, value_name = "NAME")]
        region: Option<String>,
        /// JSON: each stack with its frames written out in full (`frames`) rather than as
        /// indexes (`frame_ids`) into the one table of frames; many times larger.
        #[arg(long)]
        inline_frames: bool,
        /// pprof: one profile per interval of this length (`60s`, `500ms`, `5m`) from the
        /// capture's start, into the directory given with -o, each named by its start
        /// (`<capture>-20261206T170800Z.pb.gz`, UTC; with milliseconds for intervals under a
        /// second): in use at the end of the interval, allocated during it. On a capture still
        /// being written, only the intervals that are over; run again to add the new ones (a
        /// state file in the directory, `.memtrack-every.json`, says what was written). One
        /// process: the launched one, or --pid's.
        #[arg(long, value_name = "DURATION", value_parser = parse_every)]
        every: Option<u64>,
        /// Output file, `-` for standard output [default: -]; with --every, a directory
        /// (created if missing).
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
        #[command(flatten)]
        window: WindowArgs,
        /// Only the allocations made inside occurrences of this region (a name, or a path
        /// `parent/child`); the peak view is what the region held at the high-water mark of its
        /// largest occurrence. See `memtrack regions`.
        #[arg(long, value_name = "NAME")]
        region: Option<String>,
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
    /// Memory per marked region: each region's own peak growth, the heap's high-water mark while
    /// it ran, allocated and retained bytes, occurrences and time; nested regions under their
    /// parent.
    #[command(
        after_help = "EXAMPLES:\n    memtrack regions svc.cap\n    memtrack regions svc.cap --sort allocated\n    memtrack regions svc.cap --json | jq '.[] | {path, peak_growth_bytes}'\n\nPeak growth: the high-water mark of the bytes the region's own thread allocated inside it and\nhad not freed (nested regions included), over its largest occurrence. Max heap: the process's\nheap high-water mark while an occurrence was open. Avg growth: the mean over occurrences.\nRetained: own bytes still live when each occurrence ended, summed. A region left open (the\nthread exited, the process was killed) ends at its thread's last event and is flagged."
    )]
    Regions {
        file: PathBuf,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
        /// Rank by: peak growth, allocated bytes, retained bytes, occurrences, or total time.
        #[arg(long, value_enum, default_value = "peak")]
        sort: RegionSortArg,
    },
    /// Print every record and event in order (for debugging captures).
    #[command(hide = true)]
    Dump { file: PathBuf },
}

/// Which allocations a report covers (default: `--peak`), of the heap or (`--mapped`) of
/// mapped memory.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct ViewArgs {
    #[command(flatten)]
    which: WhichView,
    /// Mapped memory (anonymous and file-backed `mmap`, apart from the heap) instead of the
    /// heap: what was mapped at the mapped-memory peak; with --leaks (or --leaks-at-exit),
    /// what was still mapped at exit; with --allocated, every mapping made.
    #[arg(long, conflicts_with = "temporary")]
    mapped: bool,
}

/// The heap views, one at a time.
#[derive(clap::Args, Clone, Copy)]
#[group(multiple = false)]
struct WhichView {
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
    /// Whether a view was asked for (any of the flags).
    pub(crate) fn given(self) -> bool {
        let w = self.which;
        self.mapped || w.peak || w.leaks || w.leaks_at_exit || w.allocated || w.temporary
    }

    pub(crate) fn view(self) -> View {
        let w = self.which;
        if self.mapped {
            return match (w.leaks || w.leaks_at_exit, w.allocated) {
                (true, _) => View::MappedLeaks,
                (_, true) => View::MappedAllocated,
                _ => View::Mapped,
            };
        }
        match (w.leaks, w.allocated, w.temporary) {
            _ if w.leaks_at_exit => View::LeaksAtExit,
            (true, _, _) => View::Leaks,
            (_, true, _) => View::Allocated,
            (_, _, true) => View::Temporary,
            _ => View::Peak,
        }
    }
}

/// A window of time. Times are seconds since the launched process started (in a process tree,
/// the root's start; `memtrack summary` shows each process's start), as `1.5`, `1.5s`,
/// `1500ms`; a time past the end of the capture is brought back to its end, with a note.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct WindowArgs {
    /// What was live at this moment: the state after the last event at or before it.
    #[arg(long, value_name = "SECONDS", value_parser = parse_time, conflicts_with = "between")]
    at: Option<f64>,
    /// Only the window from A to B: the peak view is the high-water mark within it (from
    /// what was live at A); --allocated the allocations made in it; --leaks, --leaks-at-exit
    /// and --temporary those of them leaked or freed at once.
    #[arg(long, num_args = 2, value_names = ["A", "B"], value_parser = parse_time, allow_negative_numbers = false)]
    between: Option<Vec<f64>>,
}

impl WindowArgs {
    /// Whether --at or --between was given.
    pub(crate) fn given(&self) -> bool {
        self.at.is_some() || self.between.is_some()
    }

    /// The window asked for, if any; an error when its start is after its end.
    pub(crate) fn window(&self) -> std::result::Result<Option<Window>, String> {
        match (self.at, self.between.as_deref()) {
            (Some(t), _) => Ok(Some(Window::at(t))),
            (None, Some(&[a, b])) => Window::between(a, b).map(Some).map_err(|e| e.to_string()),
            _ => Ok(None),
        }
    }
}

/// The length of `--every`'s intervals, nanoseconds: at least a millisecond.
pub(crate) fn parse_every(s: &str) -> std::result::Result<u64, String> {
    let secs = memtrack_reader::parse_seconds(s)?;
    if secs <= 0.0 {
        return Err(format!(
            "'{s}': the intervals must be longer than 0 (e.g. 60s, 500ms, 5m)"
        ));
    }
    let ns = (secs * 1e9).round();
    if ns < 1e6 {
        return Err(format!("'{s}': the intervals must be at least 1ms"));
    }
    if ns > 1e18 {
        return Err(format!("'{s}' is too long"));
    }
    Ok(ns as u64)
}

/// A time: seconds (`1.5`, `1.5s`) or with a unit (`1500ms`).
fn parse_time(s: &str) -> std::result::Result<f64, String> {
    memtrack_reader::parse_seconds(s)
}

/// `memtrack run --encoding`.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Encoding {
    Compact,
    Fast,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub(crate) enum ExportFormat {
    Folded,
    Pprof,
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiffFormat {
    Svg,
    Table,
    Folded,
    Json,
}

pub(crate) fn parse_growth(s: &str) -> std::result::Result<Growth, String> {
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
pub(crate) enum RegionSortArg {
    Peak,
    Allocated,
    Retained,
    Count,
    Time,
}

/// A process id: a positive number.
fn parse_pid(s: &str) -> Result<i32, String> {
    match s.parse::<i32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("`{s}` is not a process id (a positive number)")),
    }
}

/// How `memtrack attach` loads the library into the process.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AttachMethod {
    Auto,
    Ptrace,
    Gdb,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub(crate) enum By {
    Function,
    Line,
    Stack,
}

/// Parses a size: plain bytes or a number with a unit. `KiB`, `MiB`, `GiB`, `TiB` and the bare
/// `K`, `M`, `G`, `T` are binary (1024); `kB`/`KB`, `MB`, `GB`, `TB` are decimal (1000).
pub(crate) fn parse_size(s: &str) -> std::result::Result<u64, String> {
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

/// Budgets checked against a capture, as given: each limit may follow a `--region`, which it
/// then applies to (see [`LimitArgs::resolve`]).
#[derive(clap::Args, Clone, Default)]
pub(crate) struct LimitArgs {
    /// Peak heap at most SIZE (after --region: the region's peak growth).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, action = clap::ArgAction::Append)]
    pub(crate) max_peak: Vec<u64>,
    /// Bytes still live at exit at most SIZE (after --region: the bytes its occurrences
    /// retained).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, action = clap::ArgAction::Append)]
    pub(crate) max_leaked: Vec<u64>,
    /// Allocations still live at exit at most N.
    #[arg(long, value_name = "N", action = clap::ArgAction::Append)]
    pub(crate) max_leaked_allocations: Vec<u64>,
    /// Allocation calls at most N (after --region: the region's).
    #[arg(long, value_name = "N", action = clap::ArgAction::Append)]
    pub(crate) max_allocations: Vec<u64>,
    /// Bytes allocated in all at most SIZE (after --region: the region's allocated bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, action = clap::ArgAction::Append)]
    pub(crate) max_total: Vec<u64>,
    /// The limits that follow apply to this region's figures (a name, or a path
    /// `parent/child`; see `memtrack regions`); repeatable, each with its own limits. Limits
    /// before any --region apply to the whole process.
    #[arg(long, value_name = "NAME", action = clap::ArgAction::Append)]
    pub(crate) region: Vec<String>,
}

/// Budgets checked against a capture: the process's, and each `--region`'s.
#[derive(Clone, Default)]
pub(crate) struct Limits {
    pub(crate) max_peak: Option<u64>,
    pub(crate) max_leaked: Option<u64>,
    pub(crate) max_leaked_allocations: Option<u64>,
    pub(crate) max_allocations: Option<u64>,
    pub(crate) max_total: Option<u64>,
    pub(crate) regions: Vec<memtrack_reader::RegionBudget>,
}

impl Limits {
    pub(crate) fn any(&self) -> bool {
        self.max_peak.is_some()
            || self.max_leaked.is_some()
            || self.max_leaked_allocations.is_some()
            || self.max_allocations.is_some()
            || self.max_total.is_some()
            || !self.regions.is_empty()
    }
}

impl LimitArgs {
    /// Sorts the limits by the `--region` each follows, from where they stood on the command
    /// line (`m`: the subcommand's matches). A limit given twice for the same subject, a
    /// `--region` without a limit, or `--max-leaked-allocations` after one is an error.
    pub(crate) fn resolve(self, m: &clap::ArgMatches) -> std::result::Result<Limits, String> {
        let at =
            |id: &str| -> Vec<usize> { m.indices_of(id).map(|i| i.collect()).unwrap_or_default() };
        let regions_at = at("region");
        // Which subject an option at index `i` belongs to: 0 the process, k the k-th region.
        let subject = |i: usize| regions_at.iter().filter(|&&r| r < i).count();
        let mut out = Limits {
            regions: self
                .region
                .iter()
                .map(|name| memtrack_reader::RegionBudget {
                    name: name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut place = |id: &str, flag: &str, values: &[u64]| -> std::result::Result<(), String> {
            for (&v, i) in values.iter().zip(at(id)) {
                let k = subject(i);
                let slot = if k == 0 {
                    match id {
                        "max_peak" => &mut out.max_peak,
                        "max_leaked" => &mut out.max_leaked,
                        "max_leaked_allocations" => &mut out.max_leaked_allocations,
                        "max_allocations" => &mut out.max_allocations,
                        _ => &mut out.max_total,
                    }
                } else {
                    let r = &mut out.regions[k - 1];
                    match id {
                        "max_peak" => &mut r.max_peak,
                        "max_leaked" => &mut r.max_leaked,
                        "max_allocations" => &mut r.max_allocations,
                        "max_total" => &mut r.max_total,
                        _ => {
                            return Err(format!(
                                "{flag} does not apply to a region (use --max-peak, --max-total, --max-leaked or --max-allocations after --region {})",
                                r.name
                            ))
                        }
                    }
                };
                if slot.replace(v).is_some() {
                    return Err(match k {
                        0 => format!(
                            "{flag} given twice (a limit for a region follows its --region NAME)"
                        ),
                        k => format!(
                            "{flag} given twice for --region {}",
                            out.regions[k - 1].name
                        ),
                    });
                }
            }
            Ok(())
        };
        place("max_peak", "--max-peak", &self.max_peak)?;
        place("max_leaked", "--max-leaked", &self.max_leaked)?;
        place(
            "max_leaked_allocations",
            "--max-leaked-allocations",
            &self.max_leaked_allocations,
        )?;
        place(
            "max_allocations",
            "--max-allocations",
            &self.max_allocations,
        )?;
        place("max_total", "--max-total", &self.max_total)?;
        if let Some(r) = out.regions.iter().find(|r| {
            r.max_peak.is_none()
                && r.max_total.is_none()
                && r.max_leaked.is_none()
                && r.max_allocations.is_none()
        }) {
            return Err(format!(
                "--region {} has no limit after it (e.g. --region {} --max-peak 100MiB)",
                r.name, r.name
            ));
        }
        Ok(out)
    }
}

/// A duration (`250ms`, `5s`, `2m`, `1h`; a bare number is seconds) in milliseconds.
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 5s, 2m)"))?;
    let ms = match unit {
        "ms" => v,
        "s" => v * 1e3,
        "m" | "min" => v * 60e3,
        "h" => v * 3600e3,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if ms.is_nan() || ms < 1.0 {
        return Err(format!("`{s}`: at least 1ms"));
    }
    Ok(ms.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_every, parse_size};

    #[test]
    fn every_in_each_unit() {
        assert_eq!(parse_every("60s"), Ok(60_000_000_000));
        assert_eq!(parse_every("500ms"), Ok(500_000_000));
        assert_eq!(parse_every("5m"), Ok(300_000_000_000));
        assert_eq!(parse_every("1.5"), Ok(1_500_000_000));
        assert!(parse_every("0s").unwrap_err().contains("longer than 0"));
        assert!(parse_every("10us").unwrap_err().contains("at least 1ms"));
        assert!(parse_every("soon").is_err());
    }

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

/// How a recording records (`run`, `attach`): every event, a sample, or aggregated figures.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct RecordingMode {
    /// Record a sample of the allocations: on average one per SIZE bytes allocated
    /// (exponential gaps, as tcmalloc and jemalloc sample; a block much larger than SIZE
    /// is always recorded). Reports then give estimates with their standard error.
    /// `run` sets MEMTRACK_SAMPLE_RATE for the command. SIZE: 524288, 512KiB, 2MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub sample_rate: Option<u64>,
    /// With `--sample-rate`: the seed of the sampling's random gaps, for reproducible
    /// runs (MEMTRACK_SAMPLE_SEED). Default: from the clock.
    #[arg(long, value_name = "N", requires = "sample_rate")]
    pub sample_seed: Option<u64>,
    /// Aggregated recording for long runs: no event stream; the tracker keeps per-stack
    /// figures (live, allocated, at the peak) and writes a checkpoint every
    /// `--checkpoint-interval` and at exit. The capture grows with stacks, not events, and a
    /// killed process leaves its last checkpoint. Temporary allocations and exact `--at`
    /// cannot be reported from it.
    #[arg(long)]
    pub aggregate: bool,
    /// How the capture holds the events. `compact` (the default): the tracker's writer
    /// thread transcodes every chunk into the rank encoding, about 2 bytes per event. `fast`:
    /// it only compresses the chunks at a low zstd level, which takes a third to a half of the
    /// writer's CPU per event and makes the capture 2.5 to 3.4 times larger; `memtrack compact
    /// FILE` makes it compact afterwards. Every report reads both.
    /// `run` sets MEMTRACK_ENCODING for the command.
    #[arg(long, value_enum, default_value = "compact")]
    pub encoding: Encoding,
    /// With `--aggregate`: time between checkpoints (`500ms`, `5s`, `2m`).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration_ms, requires = "aggregate")]
    pub checkpoint_interval: u64,
}
