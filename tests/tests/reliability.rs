//! Reliability: a failing capture file, abort, and stress under concurrency. Every traced run has
//! a time limit, so a hang fails the test instead of stalling the suite.

use memtrack_tests::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
fn run_limited(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for the command"),
        Err(_) => {
            // SAFETY: kill of the child we started (it has not been reaped: no recv yet).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {limit:?}: a hang");
        }
    }
}

/// A write error while recording (here: the file size limit, EFBIG): tracking stops, the
/// program goes on unharmed, one line on stderr says why, and the capture reads as incomplete.
#[test]
fn a_failing_capture_file_stops_tracking_and_harms_nothing() {
    let work = Work::new("write_error");
    let exe = work.compile("write_error.c");
    let plain = run_plain(&exe, &[] as &[&str]);
    let cap = work.path("w.cap");
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.arg("run")
        .arg("-o")
        .arg(&cap)
        .arg("--")
        .arg(&exe)
        .current_dir(work.dir());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Writes past 64 KiB fail with EFBIG instead of raising SIGXFSZ.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    let out = run_limited(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(out.stdout, plain.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("writing the capture failed"))
        .collect();
    assert_eq!(ours.len(), 1, "{stderr}");
    assert!(ours[0].contains("File too large"), "{stderr}");
    let size = std::fs::metadata(&cap).unwrap().len();
    assert!(size <= 64 * 1024, "{size}");
    let json = summary_json(&cap);
    assert_eq!(json["complete"], false, "{json}");
    assert!(json["total_allocations"].as_u64().unwrap() > 0, "{json}");
    assert!(
        json["total_allocations"].as_u64().unwrap() < 300_000,
        "{json}"
    );
}

/// `abort`: the capture is finished first, says it ended by abort, and holds every event; the
/// process still dies of SIGABRT (exit code 134 through `memtrack run`).
#[test]
fn abort_finishes_the_capture_and_says_so() {
    let work = Work::new("aborts");
    let exe = work.compile("aborts.c");
    let cap = work.path("a.cap");
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.arg("run").arg("-o").arg(&cap).arg("--").arg(&exe);
    let out = run_limited(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(134), "{out:?}");
    assert_eq!(out.stdout, b"aborting\n");
    let json = assert_figures(
        &cap,
        Figures {
            peak_bytes: 1250,
            peak_allocations: 3,
            leaked_bytes: 1200,
            leaked_allocations: 2,
            total_allocations: 3,
            total_bytes: 1250,
            total_frees: 1,
        },
    );
    assert_eq!(json["complete"], true, "{json}");
    assert_eq!(json["end_reason"], "abort", "{json}");
    let text = memtrack_ok(|c| {
        c.arg("summary").arg(&cap);
    });
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("ended by abort"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}
