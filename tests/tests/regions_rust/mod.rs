//! The Rust region scenario, shared by the test files of each global allocator: the test binary
//! runs itself under `memtrack run` (argument `child`), where the preload library records it,
//! and reads the marks `memtrack_tracker::region` left, in sequence order with the allocations.
//!
//! The child: region "load_index" keeps 3,000,000 bytes; "search" three times holds 1, 2 and 3
//! MB with "rank" nested (500,000 allocated and freed); a thread's "worker" allocates and frees
//! 700,000; "at_exit" is open when the program calls `exit`.

use memtrack_reader::Capture;
use memtrack_tests::*;
use std::hint::black_box;
use std::process::Command;

#[inline(never)]
fn load_index() -> Vec<u8> {
    let _r = memtrack_tracker::region("load_index");
    black_box(Vec::with_capacity(3_000_000))
}

#[inline(never)]
fn rank() {
    let _r = memtrack_tracker::region("rank");
    black_box(Vec::<u8>::with_capacity(500_000));
}

#[inline(never)]
fn search(bytes: usize) {
    let _r = memtrack_tracker::region("search");
    let held: Vec<u8> = black_box(Vec::with_capacity(bytes));
    rank();
    drop(held);
}

fn child() -> ! {
    let index = load_index();
    for mb in 1..=3 {
        search(mb * 1_000_000);
    }
    std::thread::spawn(|| {
        let _r = memtrack_tracker::region("worker");
        black_box(Vec::<u8>::with_capacity(700_000));
    })
    .join()
    .unwrap();
    let _open = memtrack_tracker::region("at_exit");
    black_box(&index);
    std::process::exit(0)
}

/// Runs the scenario: as the child when asked, else runs the child under `memtrack run` and
/// checks its marks. `what` names the global allocator in messages.
pub fn main(what: &str) {
    if std::env::args().nth(1).as_deref() == Some("child") {
        child();
    }
    let work = Work::new(&format!("regions-rust-{what}"));
    let capture = work.path("rust.cap");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(&binaries().memtrack)
        .arg("run")
        .arg("-o")
        .arg(&capture)
        .args(["--force", "--"])
        .arg(&exe)
        .arg("child")
        .env_remove("MEMTRACK_OUTPUT")
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cap = Capture::open(&capture).unwrap();
    assert!(cap.complete());
    assert_eq!(
        region_names(&cap),
        ["at_exit", "load_index", "rank", "search", "worker"],
        "{what}"
    );
    let s = thread_streams(&cap);
    let pid = cap.header.pid;
    let main = from_first_mark(&s[&pid]);
    let mut want: Vec<String> = vec!["B load_index".into(), "A 3000000".into(), "E".into()];
    for k in 1..=3 {
        want.push("B search".into());
        want.push(format!("A {}", k * 1_000_000));
        for t in ["B rank", "A 500000", "F", "E", "F", "E"] {
            want.push(t.into());
        }
    }
    assert_eq!(main[..want.len()], want[..], "{what}");
    // The thread's region is its own; at_exit stays open.
    assert_eq!(marks_only(&main[want.len()..]), ["B at_exit"], "{what}");
    let others: Vec<&Vec<String>> = s
        .iter()
        .filter(|(&tid, v)| tid != pid && v.iter().any(|t| t.starts_with("B ")))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(others.len(), 1, "{what}");
    let w = from_first_mark(others[0]);
    assert_eq!(w[..4], ["B worker", "A 700000", "F", "E"], "{what}");
    assert_eq!(marks_only(&w[4..]), Vec::<&str>::new(), "{what}");
    check_figures(&capture, what);
    println!("regions under memtrack run, {what}: ok");
}

/// The figures `memtrack regions --json` gives for the scenario: own allocations are exact;
/// heap peaks are the process's heap (runtime allocations included), so they are checked
/// against the summary's peak and each other.
fn check_figures(capture: &std::path::Path, what: &str) {
    let out = Command::new(&binaries().memtrack)
        .arg("regions")
        .arg(capture)
        .arg("--json")
        .env("MEMTRACK_SYMBOLIZE", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |path: &str| -> Vec<u64> {
        let r = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("{what}: no region {path} in {v}"));
        [
            "occurrences",
            "peak_growth_bytes",
            "avg_growth_bytes",
            "allocated_bytes",
            "allocations",
            "retained_bytes",
            "unclosed",
            "heap_peak_bytes",
        ]
        .iter()
        .map(|k| r[*k].as_u64().unwrap())
        .collect()
    };
    let (search, rank, load, worker) = (
        row("search"),
        row("search/rank"),
        row("load_index"),
        row("worker"),
    );
    // occurrences, peak growth, avg growth, allocated, allocations, retained, left open
    assert_eq!(
        search[..7],
        [3, 3_500_000, 2_500_000, 7_500_000, 6, 0, 0],
        "{what}"
    );
    assert_eq!(
        rank[..7],
        [3, 500_000, 500_000, 1_500_000, 3, 0, 0],
        "{what}"
    );
    assert_eq!(
        load[..7],
        [1, 3_000_000, 3_000_000, 3_000_000, 1, 3_000_000, 0],
        "{what}"
    );
    assert_eq!(
        worker[..7],
        [1, 700_000, 700_000, 700_000, 1, 0, 0],
        "{what}"
    );
    // The process's peak is during the third search, with rank's block on top of its 3 MB;
    // load_index's own peak came 3,500,000 bytes lower (nothing else allocates between them).
    let peak = summary_json(capture)["peak_bytes"].as_u64().unwrap();
    assert_eq!(search[7], peak, "{what}");
    assert_eq!(rank[7], peak, "{what}");
    assert_eq!(load[7], peak - 3_500_000, "{what}");
}
