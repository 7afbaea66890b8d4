//! A traced process killed with SIGKILL leaves a capture that reads as incomplete and
//! consistent.

use memtrack_reader::Capture;
use memtrack_tests::*;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Allocations in the capture so far, read while the process still writes it (a torn tail is
/// expected and fine).
fn allocations_so_far(path: &std::path::Path) -> u64 {
    Capture::open(path)
        .ok()
        .and_then(|c| c.summary().ok())
        .map_or(0, |s| s.total_allocations)
}

#[test]
fn sigkill_mid_run_leaves_a_readable_incomplete_capture() {
    let work = Work::new("killed");
    let exe = work.compile("killed.c");
    let capture = work.path("killed.cap");
    // The fixture is started directly with the shim, so that the SIGKILL reaches the traced
    // process itself (not `memtrack run`).
    let child = shim_command(&exe, &capture)
        .arg("loop")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    let mut child = KillOnDrop(child);

    // Let it run for at least 1 s, until the capture on disk holds more than 60 allocations
    // (one per 10 ms; the writer collects buffered events within ~250 ms).
    let start = Instant::now();
    let seen = loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!("the fixture ended on its own with {st:?}");
        }
        let n = allocations_so_far(&capture);
        if n > 60 && start.elapsed() >= Duration::from_secs(1) {
            break n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "after 20 s the capture holds only {n} allocations"
        );
    };
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");

    let json = summary_json(&capture);
    assert!(!json_bool(&json, "complete"), "{json}");
    assert!(json["end_reason"].is_null(), "{json}");
    assert!(json_u64(&json, "events") > 0, "{json}");
    let n = json_u64(&json, "total_allocations");
    assert!(
        n >= seen && n > 50,
        "{n} allocations after the kill, {seen} seen before it"
    );
    // Every allocation is a 1000-byte block that is still live.
    assert_figures(
        &capture,
        Figures {
            peak_bytes: 1000 * n,
            peak_allocations: n,
            leaked_bytes: 1000 * n,
            leaked_allocations: n,
            total_allocations: n,
            total_bytes: 1000 * n,
            total_frees: 0,
        },
    );
    assert_eq!(json_u64(&json, "events"), n);

    // The reader library says the same, and the blocks all come from grow(), called by main.
    let cap = open_capture(&capture);
    assert!(!cap.complete());
    assert!(cap.end.is_none());
    let memtrack_reader::Replayed {
        replay: r, stacks, ..
    } = cap.replay();
    let sites = r.live_by_stack();
    assert_eq!(sites.len(), 1, "{sites:?}");
    assert_eq!((sites[0].bytes, sites[0].allocations), (1000 * n, n));
    assert_stack_starts_in(&cap, &stacks, sites[0].stack, &exe, &["grow", "main"]);

    // The text summary reads it too and says it is incomplete.
    let out = Command::new(&binaries().memtrack)
        .arg("summary")
        .arg(&capture)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("INCOMPLETE"), "{text}");
}

/// `memtrack run` of a program that SIGKILLs itself once its events are written: exit code
/// 137 like a shell's, and the capture holds every allocation.
#[test]
fn sigkill_under_memtrack_run_exact() {
    let work = Work::new("killed_self");
    let exe = work.compile("killed.c");
    let args = ["self", "100"];
    // Both runs sleep 1.5 s before the kill: run them side by side.
    let (traced, plain) = std::thread::scope(|s| {
        let plain = s.spawn(|| run_plain(&exe, &args));
        let traced = run_traced(&work, "self.cap", &exe, &args);
        (traced, plain.join().unwrap())
    });
    assert_eq!(plain.signal(), Some(9), "{:?}", plain.status);
    assert_eq!(plain.shell_status(), 137);
    assert_eq!(
        traced.run.code(),
        Some(137),
        "memtrack run: {:?}; stderr:\n{}",
        traced.run.status,
        traced.run.stderr
    );
    let json = assert_figures(
        &traced.capture,
        Figures {
            peak_bytes: 100_000,
            peak_allocations: 100,
            leaked_bytes: 100_000,
            leaked_allocations: 100,
            total_allocations: 100,
            total_bytes: 100_000,
            total_frees: 0,
        },
    );
    assert!(!json_bool(&json, "complete"), "{json}");
    assert!(json["end_reason"].is_null(), "{json}");
}
