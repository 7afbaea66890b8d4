//! `memtrack run` records the whole process tree by default (issue 18): a program started by a
//! launcher (fork + exec, as `uv run` does) or by `sh -c` gets a capture of its own with exact
//! figures; short helper processes are folded into the launched process's capture as a
//! `DROPPED` record (their files removed) unless `--keep-all`; `--no-follow-fork` records the
//! launched process alone and names the programs that ran unrecorded.

use memtrack_tests::*;
use std::path::{Path, PathBuf};

/// `tree_child.c`'s truth.
const CHILD_TRUTH: Figures = Figures {
    peak_bytes: 2_500_000,
    peak_allocations: 3,
    leaked_bytes: 1_500_000,
    leaked_allocations: 1,
    total_allocations: 3,
    total_bytes: 2_500_000,
    total_frees: 2,
};

/// `memtrack run ARGS -o <work>/<name> -- CMD...` in the scratch directory; must succeed.
/// Returns (root capture, stderr).
fn run(work: &Work, name: &str, flags: &[&str], cmd: &[&std::ffi::OsStr]) -> (PathBuf, String) {
    let cap = work.path(name);
    let out = memtrack_ok(|c| {
        c.arg("run")
            .args(flags)
            .arg("-o")
            .arg(&cap)
            .arg("--")
            .args(cmd)
            .current_dir(work.dir())
            .env_remove("MEMTRACK_LAUNCHER_PID")
            .env_remove("MEMTRACK_OUTPUT")
            .env_remove("LD_PRELOAD")
            .env_remove("PYTHONMALLOC");
    });
    (cap, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The files `<name>.<pid>` in the scratch directory.
fn child_files(work: &Work, name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}.");
    let mut v: Vec<PathBuf> = std::fs::read_dir(work.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|p| p.parse::<u32>().is_ok())
        })
        .map(|n| work.path(&n))
        .collect();
    v.sort();
    v
}

fn only_child(work: &Work, name: &str, stderr: &str) -> PathBuf {
    let files = child_files(work, name);
    assert_eq!(files.len(), 1, "{files:?}; stderr:\n{stderr}");
    files.into_iter().next().unwrap()
}

fn os(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

#[test]
fn a_launchers_child_is_recorded_without_flags() {
    let work = Work::new("tree_launcher");
    let launcher = work.compile("launcher.c");
    let child = work.compile("tree_child.c");
    let (cap, stderr) = run(&work, "x.cap", &[], &[os(&launcher), os(&child)]);
    let child_cap = only_child(&work, "x.cap", &stderr);
    let json = assert_figures(&child_cap, CHILD_TRUTH);
    assert_eq!(json["complete"], true, "{json}");
    let root = summary_json(&cap);
    assert_eq!(json["parent_pid"], root["pid"], "{json}");
    assert_eq!(
        format!("x.cap.{}", json["pid"]),
        child_cap.file_name().unwrap().to_string_lossy()
    );
    // The launcher allocated nothing; its capture is complete, no helper was folded into it.
    assert_eq!(root["complete"], true, "{root}");
    assert_eq!(root["total_allocations"], 0, "{root}");
    assert!(open_capture(&cap).dropped.is_empty());
    assert!(
        stderr.contains("memtrack: 1 child process recorded into a capture of its own")
            && stderr.contains(&format!("x.cap.{}", json["pid"]))
            && stderr.contains("tree_child"),
        "{stderr}"
    );
    assert!(!stderr.contains("helper"), "{stderr}");
}

#[test]
fn without_follow_fork_the_unrecorded_program_is_named() {
    let work = Work::new("tree_no_follow");
    let launcher = work.compile("launcher.c");
    let child = work.compile("tree_child.c");
    let (cap, stderr) = run(
        &work,
        "x.cap",
        &["--no-follow-fork"],
        &[os(&launcher), os(&child)],
    );
    assert!(cap.is_file());
    assert_eq!(
        child_files(&work, "x.cap"),
        Vec::<PathBuf>::new(),
        "{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("ran programs that were not recorded"))
        .unwrap_or_else(|| panic!("no line about unrecorded programs:\n{stderr}"));
    assert!(
        line.starts_with("memtrack: 1 process started by the command")
            && line.ends_with(&format!("{} ×1", child.display())),
        "{line}"
    );
    assert!(
        stderr.contains("memtrack: run without --no-follow-fork to record each into x.cap.<pid>"),
        "{stderr}"
    );
    // --follow-fork, the old flag, is still accepted and is the default.
    let (_, stderr) = run(
        &work,
        "y.cap",
        &["--follow-fork"],
        &[os(&launcher), os(&child)],
    );
    assert_figures(&only_child(&work, "y.cap", &stderr), CHILD_TRUTH);
    assert!(!stderr.contains("not recorded"), "{stderr}");
}

#[test]
fn a_shell_wrappers_child_is_recorded() {
    let work = Work::new("tree_sh");
    let child = work.compile("tree_child.c");
    let script = format!("'{}'; true", child.display());
    let (cap, stderr) = run(
        &work,
        "x.cap",
        &[],
        &[os(Path::new("sh")), os(Path::new("-c")), script.as_ref()],
    );
    // The shell's child ran the program after the exec: its heap is the program's (what the
    // shell's forked copy did before the exec vanished with it).
    let child_cap = only_child(&work, "x.cap", &stderr);
    let json = summary_json(&child_cap);
    assert_eq!(json["complete"], true, "{json}");
    for (key, want) in [
        ("peak_bytes", CHILD_TRUTH.peak_bytes),
        ("peak_allocations", CHILD_TRUTH.peak_allocations),
        ("leaked_bytes", CHILD_TRUTH.leaked_bytes),
        ("leaked_allocations", CHILD_TRUTH.leaked_allocations),
    ] {
        assert_eq!(json_u64(&json, key), want, "{key}: {json}");
    }
    assert_eq!(
        json["executable"].as_str(),
        Some(child.to_str().unwrap()),
        "{json}"
    );
    assert!(summary_json(&cap)["complete"] == true);
}

/// `helpers.c`: 20 helpers (figures by index) and one worker.
fn helper_truth(i: u64) -> (u64, u64, u64, u64) {
    // (peak_bytes, leaked_bytes, total_allocations, total_bytes)
    let kept = (i + 1) * 1000;
    (kept + 500, kept, 2, kept + 500)
}

#[test]
fn short_helpers_are_folded_into_the_launched_capture() {
    let work = Work::new("tree_helpers");
    let exe = work.compile("helpers.c");
    let (cap, stderr) = run(&work, "h.cap", &[], &[os(&exe)]);
    // Only the worker's capture is left.
    let worker = only_child(&work, "h.cap", &stderr);
    assert_figures(
        &worker,
        Figures {
            peak_bytes: 4_000_000,
            peak_allocations: 2,
            leaked_bytes: 3_000_000,
            leaked_allocations: 1,
            total_allocations: 2,
            total_bytes: 4_000_000,
            total_frees: 1,
        },
    );
    // The parent's capture: its own figures unchanged, still complete, the 20 helpers in it.
    assert_figures(
        &cap,
        Figures {
            peak_bytes: 100,
            peak_allocations: 1,
            leaked_bytes: 100,
            leaked_allocations: 1,
            total_allocations: 1,
            total_bytes: 100,
            total_frees: 0,
        },
    );
    let c = open_capture(&cap);
    assert!(c.complete());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let root_pid = c.header.pid;
    assert_eq!(c.dropped.len(), 20, "{:?}", c.dropped);
    let mut got: Vec<(u64, u64, u64, u64)> = c
        .dropped
        .iter()
        .map(|d| {
            assert_eq!(d.parent_pid, root_pid, "{d:?}");
            assert_eq!(d.executable, exe.to_str().unwrap(), "{d:?}");
            assert_eq!(d.argv, vec![exe.to_str().unwrap().to_string()], "{d:?}");
            assert!(d.start_mono_ns >= c.header.start_mono_ns, "{d:?}");
            assert!(d.end_mono_ns >= d.start_mono_ns, "{d:?}");
            assert!(d.end_mono_ns - d.start_mono_ns < 2_000_000_000, "{d:?}");
            assert!(!work.path(&format!("h.cap.{}", d.pid)).exists());
            (
                d.peak_bytes,
                d.leaked_bytes,
                d.total_allocations,
                d.total_bytes,
            )
        })
        .collect();
    got.sort();
    let want: Vec<_> = (0..20).map(helper_truth).collect();
    assert_eq!(got, want);
    let mut pids: Vec<u32> = c.dropped.iter().map(|d| d.pid).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 20);
    assert!(
        stderr.contains(
            "memtrack: 20 short helper processes (helpers ×20) kept only as figures in h.cap; --keep-all keeps their captures"
        ),
        "{stderr}"
    );
    // The summary still reads the capture.
    assert_eq!(summary_json(&cap)["complete"], true);

    // --keep-all: every capture stays, nothing is folded.
    let (cap, stderr) = run(&work, "k.cap", &["--keep-all"], &[os(&exe)]);
    assert_eq!(child_files(&work, "k.cap").len(), 21, "{stderr}");
    assert!(open_capture(&cap).dropped.is_empty());
    assert!(!stderr.contains("short helper"), "{stderr}");
}

#[test]
fn python_under_a_launcher_allocates_through_malloc() {
    // PYTHONMALLOC=malloc reaches the whole tree (set silently when the command is no Python).
    let work = Work::new("tree_pythonmalloc");
    let launcher = work.compile("launcher.c");
    let out = work.path("env.txt");
    let script = format!("env > '{}'", out.display());
    let (_, stderr) = run(
        &work,
        "p.cap",
        &["--keep-all"],
        &[
            os(&launcher),
            os(Path::new("/bin/sh")),
            os(Path::new("-c")),
            script.as_ref(),
        ],
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.lines().any(|l| l == "PYTHONMALLOC=malloc"), "{text}");
    assert!(!stderr.contains("PYTHONMALLOC"), "{stderr}");
    // With --no-follow-fork only a Python command gets it.
    let (_, _) = run(
        &work,
        "q.cap",
        &["--no-follow-fork"],
        &[
            os(&launcher),
            os(Path::new("/bin/sh")),
            os(Path::new("-c")),
            script.as_ref(),
        ],
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        !text.lines().any(|l| l.starts_with("PYTHONMALLOC=")),
        "{text}"
    );
}

#[test]
fn a_process_that_outlives_the_command_keeps_its_capture() {
    // `sleep` is a short helper by its figures, but still running when `sh` exits: its capture
    // is not complete yet, and is never folded away under it.
    let work = Work::new("tree_outlives");
    let (cap, stderr) = run(
        &work,
        "s.cap",
        &[],
        &[
            os(Path::new("sh")),
            os(Path::new("-c")),
            // The shell lingers 0.3 s so the forked child has made its capture when memtrack looks.
            os(Path::new("sleep 1 & exec sleep 0.3")),
        ],
    );
    let child = only_child(&work, "s.cap", &stderr);
    // Listed with what it ran last when memtrack looked: `sleep 1`, or the shell's forked copy
    // if the exec had not happened yet.
    let name = child.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stderr.contains(&format!("memtrack:   {name}  ")),
        "{stderr}"
    );
    assert!(open_capture(&cap).dropped.is_empty());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(summary_json(&child)["complete"], true);
}
