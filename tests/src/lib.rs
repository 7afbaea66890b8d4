//! Harness for memtrack's end-to-end tests.
//!
//! **What**: builds `memtrack` and `libmemtrack.so` once per test process, compiles the C and
//! C++ fixtures of `tests/fixtures/` at test time, runs them plain and under `memtrack run`,
//! and reads the results both through the reader library and through `memtrack summary --json`.
//! **Why**: every fixture states an exact truth (peak, leaks, totals); the tests compare the
//! tracker's figures with it, so a number that is off by one allocation fails.
//! **How**: the binaries come from a nested `cargo build --release` (guarded by a `OnceLock`);
//! fixtures are built with `gcc`/`g++ -O1 -g -pthread` (no frame pointers: the tracker must
//! unwind from DWARF) into a per-test directory under the system temp dir, which is removed
//! when the test passes and kept (its path printed) when it fails. Every helper panics with a
//! message that includes the stderr of whatever failed.

use memtrack_reader::{Capture, EventKind, Module, Replay, StackTable, Summary};
use std::ffi::OsStr;
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub use memtrack_reader as reader;

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root when
/// relative), else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

/// The directory of the fixtures' sources.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The tracker's binaries.
#[derive(Debug)]
pub struct Binaries {
    /// The `memtrack` command.
    pub memtrack: PathBuf,
    /// The `LD_PRELOAD` shim.
    pub preload: PathBuf,
    /// The Rust example that records itself (`examples/sessions`).
    pub sessions: PathBuf,
}

/// Builds the binaries (once per test process) and returns their paths.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let out = Command::new(&cargo)
            .args([
                "build",
                "--release",
                "-p",
                "memtrack",
                "-p",
                "memtrack-preload",
                "-p",
                "memtrack-example-sessions",
            ])
            .current_dir(workspace_root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
        if !out.status.success() {
            panic!(
                "`cargo build --release -p memtrack -p memtrack-preload -p memtrack-example-sessions` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let release = target_dir().join("release");
        let b = Binaries {
            memtrack: release.join("memtrack"),
            preload: release.join("libmemtrack.so"),
            sessions: release.join("sessions"),
        };
        for p in [&b.memtrack, &b.preload, &b.sessions] {
            assert!(
                p.is_file(),
                "{} is missing after a successful build",
                p.display()
            );
        }
        b
    })
}

/// A per-test scratch directory. Removed on drop when the test passed; kept (and its path
/// printed) when the test is panicking, for inspection.
pub struct Work {
    dir: PathBuf,
}

impl Work {
    /// Creates `<tmp>/memtrack-tests-<pid>-<n>-<name>`.
    pub fn new(name: &str) -> Work {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("memtrack-tests-{}-{n}-{name}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot clear {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Work { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Compiles `tests/fixtures/<source>` (`.c` with gcc, `.cpp` with g++) with
    /// `-O1 -g -pthread` into this directory and returns the executable's path.
    pub fn compile(&self, source: &str) -> PathBuf {
        self.compile_with(source, None, &["-O1"])
    }

    /// Compiles like [`Work::compile`], with `flags` instead of `-O1`, into `name` (the
    /// source's stem when None): one fixture built several ways.
    pub fn compile_with(&self, source: &str, name: Option<&str>, flags: &[&str]) -> PathBuf {
        let src = fixtures_dir().join(source);
        assert!(src.is_file(), "no fixture {}", src.display());
        let (compiler, stem) = if let Some(stem) = source.strip_suffix(".cpp") {
            ("g++", stem)
        } else if let Some(stem) = source.strip_suffix(".c") {
            ("gcc", stem)
        } else {
            panic!("fixture {source} is neither .c nor .cpp");
        };
        let exe = self.path(name.unwrap_or(stem));
        let out = Command::new(compiler)
            .args(flags)
            .args(["-g", "-pthread", "-Wall", "-Wextra", "-o"])
            .arg(&exe)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
        if !out.status.success() {
            panic!(
                "{compiler} failed on {} ({}):\n{}",
                src.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        exe
    }

    /// Compiles the C fixture `source` into a shared library `lib<stem>.so` (for dlopen).
    pub fn compile_shared(&self, source: &str) -> PathBuf {
        let src = fixtures_dir().join(source);
        let stem = source.strip_suffix(".c").expect("a .c fixture");
        let lib = self.path(&format!("lib{stem}.so"));
        let out = Command::new("gcc")
            .args(["-O1", "-g", "-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run gcc: {e}"));
        assert!(
            out.status.success(),
            "gcc -shared failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        lib
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a finished process left.
#[derive(Debug)]
pub struct Run {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Run {
    /// The exit code, None when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The signal that killed the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// The status as a shell reports it: the exit code, or 128 + the signal.
    pub fn shell_status(&self) -> i32 {
        match (self.status.code(), self.status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => panic!("status {:?} is neither an exit nor a signal", self.status),
        }
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics (with stderr) unless the process exited with code 0.
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} ended with {:?}; stderr:\n{}",
            self.status,
            self.stderr
        );
    }
}

fn run_command(mut cmd: Command, what: &str) -> Run {
    // A test process that itself runs under memtrack must not make its children record.
    cmd.env_remove("MEMTRACK_LAUNCHER_PID")
        .env_remove("MEMTRACK_OUTPUT")
        .env_remove("LD_PRELOAD");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Run {
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status,
    }
}

/// Runs a program without the tracker, in the directory of the executable (so that a core
/// dump, if the system writes one, lands in the test's scratch directory).
pub fn run_plain<S: AsRef<OsStr>>(exe: &Path, args: &[S]) -> Run {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if let Some(dir) = exe.parent() {
        cmd.current_dir(dir);
    }
    run_command(cmd, &exe.display().to_string())
}

/// A run under `memtrack run`.
#[derive(Debug)]
pub struct Traced {
    pub run: Run,
    pub capture: PathBuf,
}

/// Runs `exe args` under `memtrack run -o <work>/<capture_name> --force`, in the scratch
/// directory. Does not check the exit status (the caller does); panics if no capture was
/// written.
pub fn run_traced<S: AsRef<OsStr>>(
    work: &Work,
    capture_name: &str,
    exe: &Path,
    args: &[S],
) -> Traced {
    let capture = work.path(capture_name);
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.arg("run")
        .arg("-o")
        .arg(&capture)
        .arg("--force")
        .arg("--")
        .arg(exe)
        .args(args)
        .current_dir(work.dir());
    let run = run_command(cmd, &format!("memtrack run -- {}", exe.display()));
    assert!(
        capture.is_file(),
        "memtrack run -- {} wrote no capture at {} ({:?}); stderr:\n{}",
        exe.display(),
        capture.display(),
        run.status,
        run.stderr
    );
    Traced { run, capture }
}

/// Like [`run_traced`], and panics (with stderr) unless the program exited with code 0.
pub fn run_traced_ok<S: AsRef<OsStr>>(
    work: &Work,
    capture_name: &str,
    exe: &Path,
    args: &[S],
) -> Traced {
    let t = run_traced(work, capture_name, exe, args);
    t.run
        .assert_success(&format!("memtrack run -- {}", exe.display()));
    t
}

/// Runs `memtrack` with the arguments `args` adds, and panics (with its stderr) unless it
/// succeeded.
pub fn memtrack_ok(args: impl FnOnce(&mut Command)) -> std::process::Output {
    let mut cmd = Command::new(&binaries().memtrack);
    args(&mut cmd);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run memtrack: {e}"));
    assert!(
        out.status.success(),
        "memtrack {:?} failed ({}):\n{}",
        cmd.get_args().collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `memtrack summary <capture> --json`, parsed.
pub fn summary_json(capture: &Path) -> serde_json::Value {
    let out = Command::new(&binaries().memtrack)
        .arg("summary")
        .arg(capture)
        .arg("--json")
        .output()
        .unwrap_or_else(|e| panic!("cannot run memtrack summary: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "memtrack summary {} --json failed ({}):\n{}",
        capture.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "memtrack summary {} --json printed invalid JSON ({e}):\n{stdout}",
            capture.display()
        )
    })
}

/// An unsigned field of a JSON summary; panics naming the field when absent or not a u64.
pub fn json_u64(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("summary JSON has no unsigned field {key:?}: {v}"))
}

/// A boolean field of a JSON summary.
pub fn json_bool(v: &serde_json::Value, key: &str) -> bool {
    v.get(key)
        .and_then(|x| x.as_bool())
        .unwrap_or_else(|| panic!("summary JSON has no boolean field {key:?}: {v}"))
}

/// Opens a capture with the reader library.
pub fn open_capture(capture: &Path) -> Capture {
    Capture::open(capture)
        .unwrap_or_else(|e| panic!("cannot open capture {}: {e}", capture.display()))
}

/// The figures a fixture's truth is stated in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    pub peak_bytes: u64,
    pub peak_allocations: u64,
    pub leaked_bytes: u64,
    pub leaked_allocations: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub total_frees: u64,
}

/// `exec_chain.c`'s truth: image 2's heap (image 1's vanished with the exec).
pub const EXEC_CHAIN_TRUTH: Figures = Figures {
    peak_bytes: 2300,
    peak_allocations: 2,
    leaked_bytes: 2000,
    leaked_allocations: 1,
    total_allocations: 4,
    total_bytes: 2900,
    total_frees: 2,
};

impl Figures {
    pub fn from_summary(s: &Summary) -> Figures {
        Figures {
            peak_bytes: s.peak_bytes,
            peak_allocations: s.peak_allocations,
            leaked_bytes: s.leaked_bytes,
            leaked_allocations: s.leaked_allocations,
            total_allocations: s.total_allocations,
            total_bytes: s.total_bytes,
            total_frees: s.total_frees,
        }
    }

    pub fn from_replay(r: &Replay) -> Figures {
        Figures {
            peak_bytes: r.peak_bytes,
            peak_allocations: r.peak_allocations,
            leaked_bytes: r.live_bytes,
            leaked_allocations: r.live_allocations(),
            total_allocations: r.total_allocations,
            total_bytes: r.total_bytes,
            total_frees: r.total_frees,
        }
    }

    pub fn from_json(v: &serde_json::Value) -> Figures {
        Figures {
            peak_bytes: json_u64(v, "peak_bytes"),
            peak_allocations: json_u64(v, "peak_allocations"),
            leaked_bytes: json_u64(v, "leaked_bytes"),
            leaked_allocations: json_u64(v, "leaked_allocations"),
            total_allocations: json_u64(v, "total_allocations"),
            total_bytes: json_u64(v, "total_bytes"),
            total_frees: json_u64(v, "total_frees"),
        }
    }

    /// These figures with `base` added, where `base` stands for allocations that are live for
    /// the whole run of the program (made before its own first allocation, never freed), so
    /// that they add to the peak as well.
    pub fn on_top_of(self, base: Figures) -> Figures {
        assert_eq!(
            base.peak_bytes, base.leaked_bytes,
            "the base allocations are not all live for the whole run: {base:?}"
        );
        assert_eq!(
            base.total_frees, 0,
            "the base allocations include frees: {base:?}"
        );
        Figures {
            peak_bytes: self.peak_bytes + base.peak_bytes,
            peak_allocations: self.peak_allocations + base.peak_allocations,
            leaked_bytes: self.leaked_bytes + base.leaked_bytes,
            leaked_allocations: self.leaked_allocations + base.leaked_allocations,
            total_allocations: self.total_allocations + base.total_allocations,
            total_bytes: self.total_bytes + base.total_bytes,
            total_frees: self.total_frees,
        }
    }
}

/// The figures of a capture through both routes: the reader library (`Capture::summary` and a
/// `replay`, which must agree) and `memtrack summary --json`. Returns (reader, json summary).
pub fn figures_both_ways(capture: &Path) -> (Figures, serde_json::Value) {
    let cap = open_capture(capture);
    let s = cap
        .summary()
        .unwrap_or_else(|e| panic!("summary of {} failed: {e}", capture.display()));
    let from_summary = Figures::from_summary(&s);
    let memtrack_reader::Replayed {
        replay,
        stacks: _stacks,
        corrupt_chunks: corrupt,
    } = cap.replay();
    assert_eq!(corrupt, 0, "{}: corrupt chunks", capture.display());
    assert_eq!(
        Figures::from_replay(&replay),
        from_summary,
        "Capture::replay and Capture::summary disagree"
    );
    let json = summary_json(capture);
    (from_summary, json)
}

/// Asserts the figures of a capture, through the reader library and through
/// `memtrack summary --json`, and that nothing odd was met (no unmatched frees, no allocation
/// over a live block, no damaged chunk). Returns the JSON summary for further checks.
pub fn assert_figures(capture: &Path, expected: Figures) -> serde_json::Value {
    let json = assert_figures_only(capture, expected);
    for key in [
        "unmatched_frees",
        "overlapping_allocations",
        "corrupt_chunks",
    ] {
        if key == "overlapping_allocations" && json["aggregated"] == true {
            // Aggregated recording does not count them: unknown, never a made-up 0.
            assert!(json[key].is_null(), "{key} in {json}");
            continue;
        }
        assert_eq!(json_u64(&json, key), 0, "{key} in {json}");
    }
    json
}

/// [`assert_figures`] without the checks for oddities (unmatched frees and the like).
pub fn assert_figures_only(capture: &Path, expected: Figures) -> serde_json::Value {
    let (reader, json) = figures_both_ways(capture);
    assert_eq!(reader, expected, "figures through the reader library");
    assert_eq!(
        Figures::from_json(&json),
        expected,
        "figures through `memtrack summary --json`"
    );
    json
}

/// A symbol of an executable, as `nm` lists it.
#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    /// Address in the file (`st_value`): for a PIE, relative to the load bias.
    pub addr: u64,
    pub size: u64,
}

/// The sized, defined symbols of `exe` (`nm -C --defined-only -S`).
pub fn symbols(exe: &Path) -> Vec<Symbol> {
    let out = Command::new("nm")
        .args(["-C", "--defined-only", "-S"])
        .arg(exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nm: {e}"));
    assert!(
        out.status.success(),
        "nm {} failed:\n{}",
        exe.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "<addr> <size> <type> <name...>"; symbols without a size have 3 fields.
            let mut it = line.splitn(4, ' ');
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let size = u64::from_str_radix(it.next()?, 16).ok()?;
            let _kind = it.next()?;
            let name = it.next()?.to_string();
            Some(Symbol { name, addr, size })
        })
        .collect()
}

/// The address range (file addresses) of function `name` in `exe`.
pub fn function_range(exe: &Path, name: &str) -> Range<u64> {
    let syms = symbols(exe);
    let mut found = syms.iter().filter(|s| s.name == name && s.size > 0);
    let s = found
        .next()
        .unwrap_or_else(|| panic!("no function {name:?} in `nm {}`", exe.display()));
    assert!(
        found.next().is_none(),
        "function {name:?} is defined more than once in {}",
        exe.display()
    );
    s.addr..s.addr + s.size
}

/// The module record of the executable `exe` in the first module snapshot of the capture.
pub fn exe_module<'a>(cap: &'a Capture, exe: &Path) -> &'a Module {
    let snapshot = cap
        .modules
        .first()
        .unwrap_or_else(|| panic!("{}: no modules record", cap.path().display()));
    let want = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    snapshot
        .modules
        .iter()
        .find(|m| {
            let p = Path::new(&m.path);
            p == want || std::fs::canonicalize(p).is_ok_and(|c| c == want)
        })
        .unwrap_or_else(|| {
            panic!(
                "{} is not among the modules of {}: {:?}",
                exe.display(),
                cap.path().display(),
                snapshot.modules.iter().map(|m| &m.path).collect::<Vec<_>>()
            )
        })
}

/// Frames of a stack as addresses relative to `module` (file addresses), None for frames
/// outside the module's segments.
pub fn module_frames(stacks: &StackTable, stack: u32, module: &Module) -> Vec<Option<u64>> {
    stacks
        .frames(stack)
        .into_iter()
        .map(|a| {
            let rel = a.wrapping_sub(module.base);
            module
                .segments
                .iter()
                .any(|s| rel >= s.vaddr && rel < s.vaddr + s.memsz)
                .then_some(rel)
        })
        .collect()
}

/// Asserts that the innermost frames of `stack` lie, in order, in the functions `names` of
/// `exe` (e.g. `["site_malloc", "main"]`: the caller of malloc is `site_malloc`, called from
/// `main`).
pub fn assert_stack_starts_in(
    cap: &Capture,
    stacks: &StackTable,
    stack: u32,
    exe: &Path,
    names: &[&str],
) {
    let module = exe_module(cap, exe);
    let frames = module_frames(stacks, stack, module);
    let raw = stacks.frames(stack);
    assert!(
        frames.len() >= names.len(),
        "stack {stack} has {} frames ({raw:#x?}), expected at least {} in {names:?}",
        frames.len(),
        names.len()
    );
    for (i, name) in names.iter().enumerate() {
        let range = function_range(exe, name);
        let ok = frames[i].is_some_and(|rel| range.contains(&rel));
        assert!(
            ok,
            "frame {i} of stack {stack} is {:#x} ({:?} relative to {} at base {:#x}), not in {name} {range:#x?}; whole stack {raw:#x?}",
            raw[i],
            frames[i],
            module.path,
            module.base
        );
    }
}

/// Removes memtrack's own messages (lines that start with `memtrack:`) from the stderr of
/// `memtrack run`.
pub fn strip_memtrack_lines(stderr: &str) -> String {
    stderr
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("memtrack:"))
        .collect()
}

/// Each thread's region marks and heap events in sequence order, as tokens: `B name` (a
/// region begins), `E` (the innermost ends), `A size` (an allocation), `F` (a free); checks
/// that the merge is ordered by sequence number.
pub fn thread_streams(cap: &Capture) -> std::collections::BTreeMap<u32, Vec<String>> {
    let mut stacks = StackTable::default();
    let mut out: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
    let mut last = 0;
    for e in cap.events(&mut stacks) {
        assert!(e.seq > last, "events merged by seq: {} after {last}", e.seq);
        last = e.seq;
        let t = match e.kind {
            EventKind::RegionBegin { region } => format!("B {}", cap.region_names[&region]),
            EventKind::RegionEnd => "E".into(),
            EventKind::Alloc { size, .. } => format!("A {size}"),
            EventKind::Free { .. } => "F".into(),
            other => format!("{other:?}"),
        };
        out.entry(e.tid).or_default().push(t);
    }
    out
}

/// A thread's tokens ([`thread_streams`]) from its first region mark on.
pub fn from_first_mark(s: &[String]) -> &[String] {
    let first = s.iter().position(|t| t.starts_with("B ")).expect("a mark");
    &s[first..]
}

/// Only the region marks of a thread's tokens.
pub fn marks_only(s: &[String]) -> Vec<&str> {
    s.iter()
        .map(String::as_str)
        .filter(|t| t.starts_with("B ") || *t == "E")
        .collect()
}

/// The region names a capture holds, sorted.
pub fn region_names(cap: &Capture) -> Vec<&str> {
    let mut n: Vec<&str> = cap.region_names.values().map(String::as_str).collect();
    n.sort();
    n
}

/// The browser of the page tests, or None (the test is skipped) when none is installed outside
/// CI.
pub fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        // CI installs it (.ci/run): there, its absence is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed in CI"
        );
        eprintln!("chromium not installed here: skipped (install Debian's chromium to run it)");
    }
    found
}

/// Headless, and quiet: no network, updates, sync or first-run pages.
pub const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];
/// A child process killed (and reaped) on drop, so that a failing test leaves none behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `exe` set to run with the shim preloaded directly (not under `memtrack run`, so that signals
/// reach the traced process itself), recording into `capture`, in the executable's directory.
pub fn shim_command(exe: &Path, capture: &Path) -> Command {
    let mut cmd = Command::new(exe);
    if let Some(dir) = exe.parent() {
        cmd.current_dir(dir);
    }
    cmd.env("LD_PRELOAD", &binaries().preload)
        .env("MEMTRACK_OUTPUT", capture)
        .env_remove("MEMTRACK_LAUNCHER_PID");
    cmd
}

/// An interpreter to run the fixtures with: its version ("3.12") and program.
pub struct Py {
    pub version: String,
    pub program: PathBuf,
}

impl Py {
    /// A work directory for test `name` under this interpreter, which the test's output names.
    pub fn work(&self, name: &str) -> Work {
        eprintln!("CPython {}: {}", self.version, self.program.display());
        Work::new(&format!("{name}_{}", self.version))
    }
}

fn version_of(program: &Path) -> Option<String> {
    let out = Command::new(program)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The supported interpreters on this machine: `python3` when it is 3.11 (CI's machines have
/// it: there, its absence is a failure), and 3.12 and 3.13 as `python3.12` / `python3.13` on
/// the PATH or in pyenv's versions folder. An empty list means the tests say so and pass.
/// `sys.executable` of `program` (itself when it cannot say).
fn real_executable(program: &str) -> PathBuf {
    std::process::Command::new(program)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(program))
}

pub fn pythons() -> Vec<Py> {
    let mut found = Vec::new();
    match version_of(Path::new("python3")) {
        // The interpreter itself, not a launcher (pyenv's shim is a bash script that execs
        // several helpers: on a loaded machine they outlive the short-helper threshold and
        // the capture becomes a tree, which these tests are not about).
        Some(v) if v == "3.11" => found.push(Py {
            version: v,
            program: real_executable("python3"),
        }),
        v => {
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 is {v:?} in CI, not 3.11"
            );
            eprintln!("python3 is {v:?}, not 3.11: not tested");
        }
    }
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    for minor in ["3.12", "3.13"] {
        let name = format!("python{minor}");
        let mut candidates = vec![PathBuf::from(&name)];
        if let Some(root) = &pyenv {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            dirs.sort();
            candidates.extend(
                dirs.iter()
                    .rev()
                    .filter(|d| {
                        d.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&format!("{minor}.")))
                    })
                    .map(|d| d.join("bin").join(&name)),
            );
        }
        match candidates
            .into_iter()
            .find(|c| version_of(c).as_deref() == Some(minor))
        {
            Some(program) => found.push(Py {
                version: minor.to_string(),
                program,
            }),
            None => eprintln!("no CPython {minor} found: not tested"),
        }
    }
    found
}
