//! Aggregated recording (issue 23): `memtrack run --aggregate` keeps per-stack figures in the
//! tracker and writes checkpoints, not events. Its figures must be the full capture's, exactly;
//! a SIGKILL leaves the last checkpoint readable; a long steady run stays small.

use memtrack_tests::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn run_cmd(work: &Work, name: &str, flags: &[&str], exe: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.arg("run")
        .arg("-o")
        .arg(work.path(name))
        .arg("--force")
        .args(flags)
        .arg("--")
        .arg(exe)
        .args(args)
        .current_dir(work.dir());
    for v in [
        "MEMTRACK_LAUNCHER_PID",
        "MEMTRACK_OUTPUT",
        "LD_PRELOAD",
        "MEMTRACK_SAMPLE_RATE",
        "MEMTRACK_AGGREGATE",
        "MEMTRACK_CHECKPOINT_INTERVAL",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// Runs `memtrack run`, which must succeed; its output.
fn run_ok(mut cmd: Command) -> std::process::Output {
    let out = cmd.output().expect("memtrack run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn record(work: &Work, name: &str, flags: &[&str], exe: &Path, args: &[&str]) -> PathBuf {
    run_ok(run_cmd(work, name, flags, exe, args));
    work.path(name)
}

fn memtrack(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(&binaries().memtrack)
        .args(args)
        .output()
        .expect("memtrack");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `memtrack table FILE --json --by stack VIEW`, without the largest-block column (an
/// aggregated capture does not know it).
fn table(capture: &Path, view: &str) -> Vec<(Vec<String>, u64, u64)> {
    let (code, out, err) = memtrack(&[
        "table",
        capture.to_str().unwrap(),
        "--json",
        "--by",
        "stack",
        "--top",
        "1000",
        view,
    ]);
    assert_eq!(code, 0, "table {view}: {err}");
    let rows: Vec<Value> = serde_json::from_str(&out).expect("table JSON");
    let mut v: Vec<_> = rows
        .iter()
        .map(|r| {
            let stack = r["stack"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (
                stack,
                r["total_bytes"].as_u64().unwrap(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

const VIEWS: [&str; 3] = ["--peak", "--leaks", "--allocated"];

/// The aggregated capture `agg` has the heap figures of `other` (a capture of events of the
/// same run or seed), the `extra` summary keys too, and the same stacks in every view.
fn assert_same_figures(agg: &Path, other: &Path, extra: &[&str]) {
    let (a, o) = (summary_json(agg), summary_json(other));
    let keys = [
        "peak_bytes",
        "peak_allocations",
        "leaked_bytes",
        "leaked_allocations",
        "total_allocations",
        "total_bytes",
        "total_frees",
    ];
    for key in keys.iter().chain(extra) {
        assert_eq!(json_u64(&a, key), json_u64(&o, key), "{key}");
    }
    for view in VIEWS {
        assert_eq!(table(agg, view), table(other, view), "{view}");
    }
}

/// Peak, leaks, totals and every stack's figures of an aggregated capture are those of a full
/// capture of the same deterministic program, which match the truth computed from its sizes.
#[test]
fn aggregated_figures_are_exact_per_stack() {
    let work = Work::new("aggregate_exact");
    let exe = work.compile("sample_mix.c");
    let full = record(&work, "full.cap", &[], &exe, &[]);
    let agg = record(&work, "agg.cap", &["--aggregate"], &exe, &[]);
    let (f, a) = (summary_json(&full), summary_json(&agg));
    assert!(json_bool(&a, "aggregated"));
    assert_ne!(f.get("aggregated"), Some(&Value::Bool(true)));
    assert!(json_bool(&a, "checkpoint_final"));
    assert_eq!(json_u64(&a, "peak_bytes"), 96_114_019);
    assert_eq!(json_u64(&a, "leaked_bytes"), 8_251_247);
    assert_eq!(json_u64(&a, "leaked_allocations"), 25_051);
    for view in VIEWS {
        assert!(table(&full, view).len() >= 3, "{view}");
    }
    assert_same_figures(&agg, &full, &["events"]);
    let peak = table(&agg, "--peak");
    let big = peak
        .iter()
        .find(|r| r.0.last().unwrap().starts_with("big_block"))
        .expect("big_block at the peak");
    assert_eq!((big.1, big.2), (64 << 20, 1));
    // The capture holds no events: a few kilobytes against the full capture's megabyte.
    let (fs, as_) = (
        std::fs::metadata(&full).unwrap().len(),
        std::fs::metadata(&agg).unwrap().len(),
    );
    assert!(as_ < 16 * 1024 && fs > 500_000, "{as_} vs {fs}");
}

/// Reports that need events say they cannot be made from an aggregated capture, exit 2.
#[test]
fn aggregated_refuses_what_needs_events() {
    let work = Work::new("aggregate_refusals");
    let exe = work.compile("sample_mix.c");
    let agg = record(&work, "agg.cap", &["--aggregate"], &exe, &[]);
    let cap = agg.to_str().unwrap();
    for (args, says) in [
        (vec!["table", cap, "--temporary"], "temporary"),
        (
            vec!["flamegraph", cap, "--at", "0.01", "-o", "x.svg"],
            "--at",
        ),
        (vec!["table", cap, "--between", "0.0", "0.01"], "--between"),
        (vec!["stats", cap], "stats"),
    ] {
        let (code, _, err) = memtrack(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("aggregated capture") && err.contains(says),
            "{args:?}: {err}"
        );
    }
}

/// A process killed with SIGKILL leaves its last checkpoint: the figures of the state it held
/// (known from the fixture), and the summary says which checkpoint it read.
#[test]
fn sigkill_leaves_the_last_checkpoint() {
    let work = Work::new("aggregate_sigkill");
    let exe = work.compile("agg_phases.c");
    let mut child = run_cmd(
        &work,
        "killed.cap",
        &["--aggregate", "--checkpoint-interval", "100ms"],
        &exe,
        &["kill"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("memtrack run");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line
        .trim()
        .strip_prefix("held ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("fixture said {line:?}"));
    // Checkpoints come every 100 ms; wait for a few after the state was reached.
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: SIGKILL to the fixture's own pid, which it printed.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = child.wait().unwrap();
    assert!(!status.success());
    let cap = work.path("killed.cap");
    let s = summary_json(&cap);
    assert!(json_bool(&s, "aggregated"));
    assert!(!json_bool(&s, "complete"));
    assert!(!json_bool(&s, "checkpoint_final"));
    assert!(json_u64(&s, "checkpoint") >= 3, "{s}");
    assert_eq!(json_u64(&s, "peak_bytes"), 25_000_000);
    assert_eq!(json_u64(&s, "peak_allocations"), 70);
    assert_eq!(json_u64(&s, "leaked_bytes"), 25_000_000);
    assert_eq!(json_u64(&s, "leaked_allocations"), 70);
    assert_eq!(json_u64(&s, "total_bytes"), 30_000_000);
    assert_eq!(json_u64(&s, "total_allocations"), 120);
    assert_eq!(json_u64(&s, "total_frees"), 50);
    let peak = table(&cap, "--peak");
    let by_fn: Vec<(String, u64, u64)> = peak
        .iter()
        .map(|r| {
            (
                r.0.last().unwrap().split(' ').next().unwrap().to_string(),
                r.1,
                r.2,
            )
        })
        .collect();
    assert_eq!(
        by_fn,
        vec![
            ("phase_a".to_string(), 5_000_000, 50),
            ("phase_b".to_string(), 20_000_000, 20)
        ]
    );
    let (code, text, err) = memtrack(&["summary", cap.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("aggregated:     from checkpoint ") && text.contains("did not end cleanly"),
        "{text}"
    );
    let (code, _, err) = memtrack(&[
        "flamegraph",
        cap.to_str().unwrap(),
        "-o",
        work.path("k.svg").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(work.path("k.svg")).unwrap();
    assert!(svg.contains("phase_b") && svg.contains("phase_a"));
}

/// Checkpoints a steady service writes over what stands for ten minutes at the default
/// interval (120 of them, here every 100 ms) are compacted: the capture stays far below what
/// they would take, under 1 MB, with the final figures exact.
#[test]
fn steady_service_capture_stays_small() {
    let work = Work::new("aggregate_steady");
    let exe = work.compile("agg_phases.c");
    let out = run_ok(run_cmd(
        &work,
        "steady.cap",
        &["--aggregate", "--checkpoint-interval", "100ms"],
        &exe,
        &["steady", "13", "12"],
    ));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<u64> = said
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [requests, bytes, kept, kept_bytes] = f[..] else {
        panic!("fixture said {said:?}");
    };
    let cap = work.path("steady.cap");
    let s = summary_json(&cap);
    assert_eq!(json_u64(&s, "total_allocations"), requests);
    assert_eq!(json_u64(&s, "total_bytes"), bytes);
    assert_eq!(json_u64(&s, "total_frees"), requests - kept);
    assert_eq!(json_u64(&s, "leaked_allocations"), kept);
    assert_eq!(json_u64(&s, "leaked_bytes"), kept_bytes);
    let checkpoints = json_u64(&s, "checkpoint");
    assert!(checkpoints >= 100, "{checkpoints} checkpoints");
    let size = std::fs::metadata(&cap).unwrap().len();
    // 4,096 stacks: each checkpoint takes tens of kilobytes; uncompacted they would take
    // several megabytes.
    let in_file = checkpoint_records(&cap);
    assert!(
        in_file.len() <= 20,
        "{} checkpoints in the file",
        in_file.len()
    );
    let one = *in_file.last().unwrap();
    assert!(one * checkpoints > 4 * size, "{one} B each, file {size} B");
    assert!(size < 1_000_000, "{size} bytes");
    let leftovers: Vec<_> = std::fs::read_dir(work.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("compacting"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Sizes of the CHECKPOINT records in the file, in order.
fn checkpoint_records(capture: &Path) -> Vec<u64> {
    use memtrack_format::{next_record, record, Header, Next};
    let bytes = std::fs::read(capture).unwrap();
    let (_, mut at) = Header::decode(&bytes).expect("header");
    let mut out = Vec::new();
    while let Next::Record(r) = next_record(&bytes, at) {
        if r.kind == record::CHECKPOINT {
            out.push(r.payload.len() as u64);
        }
        at = r.payload.as_ptr() as usize - bytes.as_ptr() as usize + r.payload.len();
    }
    assert!(matches!(next_record(&bytes, at), Next::End));
    out
}

/// A process tree recorded aggregated: every process's own figures are exact, and the
/// combined peak, which needs events to line the processes up in time, is given as what it
/// is: at most the sum of their peaks.
#[test]
fn aggregated_tree_gives_each_process_and_a_bound() {
    let work = Work::new("aggregate_tree");
    let exe = work.compile("forks.c");
    let cap = record(&work, "tree.cap", &["--aggregate", "--keep-all"], &exe, &[]);
    let s = summary_json(&cap);
    let procs = s["processes"].as_array().expect("processes");
    let mut peaks: Vec<u64> = procs.iter().map(|p| json_u64(p, "peak_bytes")).collect();
    peaks.sort();
    // Parent 1,000 + 300; child A 2,000 + 500; grandchild C 4,000; child B (exec) 7,000.
    assert_eq!(peaks, vec![1_300, 2_500, 4_000, 7_000], "{s}");
    assert!(s["combined_peak_bytes"].is_null(), "{s}");
    assert_eq!(json_u64(&s, "combined_peak_at_most_bytes"), 14_800);
    let (code, text, err) = memtrack(&["summary", cap.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("combined peak:  at most 14,800 bytes"),
        "{text}"
    );
}

/// Through `exec`: the earlier image's final checkpoint stays in the capture and counts (its
/// totals; its peak when higher), its live blocks vanish with it, as in a full capture.
#[test]
fn aggregated_exec_chain_counts_every_image() {
    let work = Work::new("aggregate_exec");
    let exe = work.compile("exec_chain.c");
    let full = record(&work, "full.cap", &[], &exe, &[]);
    let agg = record(&work, "agg.cap", &["--aggregate"], &exe, &[]);
    let (f, a) = (summary_json(&full), summary_json(&agg));
    // exec_chain.c's truth: peak 2,300 (image 2), leaked 2,000 in 1, 4 allocations of 2,900
    // bytes, 2 frees.
    assert_eq!(json_u64(&a, "peak_bytes"), 2_300);
    assert_eq!(json_u64(&a, "leaked_bytes"), 2_000);
    assert_eq!(json_u64(&a, "leaked_allocations"), 1);
    assert_eq!(json_u64(&a, "total_allocations"), 4);
    assert_eq!(json_u64(&a, "total_bytes"), 2_900);
    assert_eq!(json_u64(&a, "total_frees"), 2);
    for key in ["peak_bytes", "total_bytes", "events"] {
        assert_eq!(json_u64(&a, key), json_u64(&f, key), "{key}");
    }
    assert_eq!(table(&agg, "--allocated"), table(&full, "--allocated"));
}

/// bash brings its own `getenv`, which stops showing the environment once the tracker's
/// `setenv` (of the launched process's capture name) has run: the settings are read before.
#[test]
fn bash_records_aggregated() {
    let work = Work::new("aggregate_bash");
    let cap = record(
        &work,
        "bash.cap",
        &["--aggregate"],
        Path::new("bash"),
        &["-c", "x=$(echo 1); true"],
    );
    let s = summary_json(&cap);
    assert!(json_bool(&s, "aggregated"), "{s}");
    assert!(json_u64(&s, "total_allocations") > 100, "{s}");
}

/// Sampling and aggregation combine: with the same seed the same blocks are sampled, so the
/// aggregated capture's estimates are exactly those of the sampled event capture, and its
/// standard errors too, the peak (found by one half of the sample, measured by the other) included.
#[test]
fn sampled_aggregated_equals_sampled_events() {
    let work = Work::new("aggregate_sampled");
    let exe = work.compile("sample_mix.c");
    let sampling = ["--sample-rate", "512KiB", "--sample-seed", "7"];
    let events = record(&work, "events.cap", &sampling, &exe, &[]);
    let mut flags = vec!["--aggregate"];
    flags.extend(sampling);
    let agg = record(&work, "agg.cap", &flags, &exe, &[]);
    let a = summary_json(&agg);
    assert!(
        json_bool(&a, "aggregated") && json_bool(&a, "sampled"),
        "{a}"
    );
    assert_same_figures(&agg, &events, &["peak_stderr_bytes", "leaked_stderr_bytes"]);
    // The 64 MiB block is always sampled and stands for itself.
    let big = table(&agg, "--peak")
        .into_iter()
        .find(|r| r.0.last().unwrap().starts_with("big_block"))
        .expect("big_block at the peak");
    assert_eq!(big.2, 1);
    assert!(big.1.abs_diff(64 << 20) < 64, "{}", big.1);
}

/// Eight threads freeing each other's blocks: the aggregator applies the threads' chunks in
/// sequence order, so no free comes before its allocation and every block balances, as in a
/// full capture (stress.c's truth: 8 x 300,000 calls, the bytes it prints, nothing left).
#[test]
fn cross_thread_frees_balance_aggregated() {
    let work = Work::new("aggregate_xfree");
    let exe = work.compile("stress.c");
    let out = run_ok(run_cmd(
        &work,
        "x.cap",
        &["--aggregate", "--checkpoint-interval", "100ms"],
        &exe,
        &["xfree", "300000"],
    ));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let bytes: u64 = said
        .split_whitespace()
        .skip_while(|w| *w != "allocated")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("fixture said {said:?}"));
    let s = summary_json(&work.path("x.cap"));
    assert_eq!(json_u64(&s, "unmatched_frees"), 0, "{s}");
    let stress_alloc = table(&work.path("x.cap"), "--allocated")
        .into_iter()
        .filter(|r| r.0.iter().any(|f| f.starts_with("stress_alloc")))
        .fold((0, 0), |a, r| (a.0 + r.1, a.1 + r.2));
    assert_eq!(stress_alloc, (bytes, 8 * 300_000));
    let leaks = table(&work.path("x.cap"), "--leaks");
    assert!(
        leaks
            .iter()
            .all(|r| !r.0.iter().any(|f| f.starts_with("stress_alloc"))),
        "{leaks:?}"
    );
}

/// A compaction's copy left behind by a process killed during it is removed when the run ends.
#[test]
fn run_removes_compaction_leftovers() {
    let work = Work::new("aggregate_leftovers");
    let exe = work.compile("exec_chain.c");
    let leftovers = [".x.cap.compacting", ".x.cap.4242.compacting"];
    for l in leftovers {
        std::fs::write(work.path(l), b"half a copy").unwrap();
    }
    std::fs::write(work.path(".other.cap.compacting"), b"not ours").unwrap();
    record(&work, "x.cap", &["--aggregate"], &exe, &[]);
    for l in leftovers {
        assert!(!work.path(l).exists(), "{l} left");
    }
    assert!(work.path(".other.cap.compacting").exists());
    assert!(json_bool(&summary_json(&work.path("x.cap")), "aggregated"));
}
