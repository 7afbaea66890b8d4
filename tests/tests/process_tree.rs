//! Reports over a process tree (issue 18): the combined peak of a pre-fork server and what each
//! process held then, each process's own figures, `--pid`, default output names per process,
//! `check` over the tree; and a launcher's child reported without flags.

use memtrack_tests::*;
use serde_json::Value;
use std::path::PathBuf;

/// `memtrack run -o <work>/<name> -- exe args` in the scratch directory.
fn run_tree(work: &Work, name: &str, exe: &std::path::Path, args: &[&std::ffi::OsStr]) -> PathBuf {
    let cap = work.path(name);
    memtrack_ok(|c| {
        c.args(["run", "-o"])
            .arg(&cap)
            .arg("--")
            .arg(exe)
            .args(args)
            .current_dir(work.dir())
            .env_remove("MEMTRACK_LAUNCHER_PID")
            .env_remove("MEMTRACK_OUTPUT")
            .env_remove("LD_PRELOAD");
    });
    cap
}

fn memtrack_text(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(&binaries().memtrack)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Folded lines `path bytes` as (path, bytes).
fn folded(args: &[&str]) -> Vec<(String, u64)> {
    let (code, text) = memtrack_text(args);
    assert_eq!(code, 0, "{text}");
    text.lines()
        .filter(|l| !l.starts_with("memtrack:"))
        .map(|l| {
            let (p, b) = l.rsplit_once(' ').unwrap();
            (p.to_string(), b.parse().unwrap())
        })
        .collect()
}

fn process(json: &Value, pred: impl Fn(&Value) -> bool) -> &Value {
    json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| pred(p))
        .unwrap_or_else(|| panic!("no such process in {json}"))
}

#[test]
fn prefork_combined_peak_and_each_worker_exact() {
    let work = Work::new("tree_prefork");
    let exe = work.compile("prefork.c");
    let cap = run_tree(&work, "pf.cap", &exe, &[]);
    let json = summary_json(&cap);
    // The launched process's own keys are as before: its own peak, later than the combined one.
    assert_eq!(json["peak_bytes"], 10_000_000, "{json}");
    assert_eq!(json["combined_peak_bytes"], 11_500_000, "{json}");
    let t = json["combined_peak_time_seconds"].as_f64().unwrap();
    assert!((0.2..0.36).contains(&t), "combined peak at {t} s");
    let procs = json["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 4, "{json}");
    let root_pid = json["pid"].as_u64().unwrap();
    assert_eq!(procs[0]["pid"], root_pid);
    assert!(procs[0]["parent_pid"].is_null());
    assert_eq!(procs[0]["peak_bytes"], 10_000_000);
    assert_eq!(procs[0]["bytes_at_combined_peak"], 4_000_000);
    // Workers, largest peak first: each its own block, held in full at the combined peak.
    let mut worker_pids = Vec::new();
    for (p, size) in procs[1..].iter().zip([3_500_000u64, 2_500_000, 1_500_000]) {
        assert_eq!(p["parent_pid"], root_pid, "{p}");
        assert_eq!(p["peak_bytes"], size, "{p}");
        assert_eq!(p["bytes_at_combined_peak"], size, "{p}");
        assert_eq!(p["leaked_bytes"], 0, "{p}");
        assert_eq!(p["total_allocations"], 1, "{p}");
        assert!(p["capture"]
            .as_str()
            .unwrap()
            .ends_with(&format!(".{}", p["pid"])));
        worker_pids.push(p["pid"].as_u64().unwrap().to_string());
    }
    let capo = cap.to_str().unwrap();
    // The tree's peak view: one root frame per process, what each held at the combined peak.
    let lines = folded(&["export", capo, "--format", "folded"]);
    let mut by_root: Vec<(String, u64, bool)> = lines
        .iter()
        .map(|(p, b)| {
            let root = p.split(';').next().unwrap().to_string();
            (
                root,
                *b,
                p.ends_with("worker_alloc") || p.ends_with("preallocate"),
            )
        })
        .collect();
    by_root.sort();
    assert_eq!(by_root.len(), 4, "{lines:?}");
    assert!(by_root.iter().all(|(_, _, leaf)| *leaf), "{lines:?}");
    let total: u64 = by_root.iter().map(|r| r.1).sum();
    assert_eq!(total, 11_500_000);
    for (pid, size) in worker_pids.iter().zip([3_500_000u64, 2_500_000, 1_500_000]) {
        let root = format!("prefork [pid {pid}]");
        assert!(
            by_root.contains(&(root.clone(), size, true)),
            "{root} in {lines:?}"
        );
    }
    // --pid: one process, its own peak, no root frames.
    let w2 = &worker_pids[1];
    let one = folded(&["export", capo, "--format", "folded", "--pid", w2.as_str()]);
    assert_eq!(one.len(), 1, "{one:?}");
    assert!(one[0].0.starts_with("_start;") && one[0].0.ends_with(";worker;worker_alloc"));
    assert_eq!(one[0].1, 2_500_000);
    // The launched process alone: its own peak, at 0.7 s.
    let own = folded(&[
        "export",
        capo,
        "--format",
        "folded",
        "--pid",
        &root_pid.to_string(),
    ]);
    assert_eq!(own.iter().map(|l| l.1).sum::<u64>(), 10_000_000, "{own:?}");
    // A budget below the largest worker's peak: exceeded, the worker named with its stack.
    let (code, text) = memtrack_text(&["check", capo, "--max-peak", "3499999"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("11,500,000 bytes"), "{text}");
    assert!(
        text.contains(&format!("pid {}: 3,500,000 bytes", worker_pids[0])),
        "{text}"
    );
    assert!(
        text.contains(&format!("[pid {}]: worker_alloc", worker_pids[0])),
        "{text}"
    );
    let (code, text) = memtrack_text(&[
        "check",
        capo,
        "--pid",
        worker_pids[0].as_str(),
        "--max-peak",
        "3499999",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("3,500,000 bytes"), "{text}");
    let (code, text) = memtrack_text(&[
        "check",
        capo,
        "--pid",
        worker_pids[2].as_str(),
        "--max-peak",
        "3499999",
    ]);
    assert_eq!(code, 0, "{text}");
    // Default names: the tree's and each process's flamegraph apart, none overwritten.
    for pid in [None, Some(&worker_pids[0]), Some(&worker_pids[1])] {
        let mut args: Vec<&str> = vec!["flamegraph", capo];
        if let Some(p) = pid {
            args.extend(["--pid", p.as_str()]);
        }
        let (code, text) = memtrack_text(&args);
        assert_eq!(code, 0, "{text}");
    }
    for name in [
        "pf-peak.svg".to_string(),
        format!("pf-{}-peak.svg", worker_pids[0]),
        format!("pf-{}-peak.svg", worker_pids[1]),
    ] {
        let svg = std::fs::read_to_string(work.path(&name)).unwrap();
        assert!(svg.contains("worker_alloc"), "{name}");
    }
    // A child's capture given directly names its report after the tree and the pid too.
    let child = work.path(&format!("pf.cap.{}", worker_pids[2]));
    let (code, text) = memtrack_text(&["plot", child.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(work
        .path(&format!("pf-{}-plot.svg", worker_pids[2]))
        .is_file());
    let (code, text) = memtrack_text(&["plot", capo]);
    assert_eq!(code, 0, "{text}");
    let svg = std::fs::read_to_string(work.path("pf-plot.svg")).unwrap();
    assert!(
        svg.contains("combined peak 10.97 MiB (11,500,000 bytes)"),
        "{svg}"
    );
    // An unknown pid is an error naming the file.
    let (code, text) = memtrack_text(&["summary", capo, "--pid", "1"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no process with pid 1"), "{text}");
}

#[test]
fn a_launchers_child_is_reported_without_flags() {
    let work = Work::new("tree_launcher");
    let launcher = work.compile("launcher.c");
    let child = work.compile("tree_child.c");
    let cap = run_tree(&work, "l.cap", &launcher, &[child.as_os_str()]);
    let json = summary_json(&cap);
    let c = process(&json, |p| {
        p["argv"][0]
            .as_str()
            .is_some_and(|a| a.ends_with("tree_child"))
    });
    assert_eq!(c["parent_pid"], json["pid"], "{c}");
    assert_eq!(c["peak_bytes"], 2_500_000, "{c}");
    assert_eq!(c["leaked_bytes"], 1_500_000, "{c}");
    assert_eq!(c["total_allocations"], 3, "{c}");
    assert_eq!(c["total_bytes"], 2_500_000, "{c}");
    assert_eq!(c["bytes_at_combined_peak"], 2_500_000, "{c}");
    assert_eq!(json["combined_peak_bytes"], 2_500_000, "{json}");
    // The tree's folded export: the child's stacks (the launcher holds nothing at the peak).
    let lines = folded(&["export", cap.to_str().unwrap(), "--format", "folded"]);
    let leaf = |name: &str| -> u64 {
        lines
            .iter()
            .filter(|(p, _)| p.ends_with(name))
            .map(|l| l.1)
            .sum()
    };
    assert_eq!(leaf("big_alloc"), 1_500_000, "{lines:?}");
    assert_eq!(leaf("mid_alloc"), 700_000, "{lines:?}");
    assert_eq!(leaf("small_alloc"), 300_000, "{lines:?}");
    let leaks = folded(&[
        "export",
        cap.to_str().unwrap(),
        "--format",
        "folded",
        "--leaks",
    ]);
    assert_eq!(
        leaks
            .iter()
            .filter(|(p, _)| p.ends_with("big_alloc"))
            .map(|l| l.1)
            .sum::<u64>(),
        1_500_000,
        "{leaks:?}"
    );
    // The summary's text shows the tree with the child's command.
    let (code, text) = memtrack_text(&["summary", cap.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("combined peak:  2,500,000 bytes"), "{text}");
    assert!(text.contains("tree_child"), "{text}");
}
