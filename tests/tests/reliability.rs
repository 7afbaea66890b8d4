//! Reliability: a failing capture file, abort, and stress under concurrency. Every traced run has
//! a time limit, so a hang fails the test instead of stalling the suite.

use memtrack_tests::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `memtrack run -o cap -- exe`, arguments to follow.
fn memtrack_run(cap: &std::path::Path, exe: &std::path::Path) -> Command {
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.arg("run").arg("-o").arg(cap).arg("--").arg(exe);
    cmd
}

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

/// memtrack's writer thread never reads the environment: a program may rewrite it at any moment
/// (bash frees its old array as it goes), and glibc's getenv is no safer against that than any
/// other read. The fixture keeps `environ` pointing at an inaccessible page while the writer
/// starts, with a locale set as bash sets it; the writer's symbol lookups used to take their
/// error message with dlerror(), whose translation reads LANGUAGE, and about every other run
/// died of SIGSEGV in that thread.
#[test]
fn the_writer_thread_never_reads_the_environment() {
    let work = Work::new("environ_swap");
    let exe = work.compile("environ_swap.c");
    for i in 0..10 {
        let cap = work.path(&format!("e{i}.cap"));
        let mut cmd = memtrack_run(&cap, &exe);
        cmd.arg("50");
        let out = run_limited(cmd, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(0), "run {i}: {out:?}");
        assert_eq!(out.stdout, b"ok\n", "run {i}");
        let json = summary_json(&cap);
        assert_eq!(json["complete"], true, "run {i}: {json}");
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
    let mut cmd = memtrack_run(&cap, &exe);
    cmd.current_dir(work.dir());
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
    let cmd = memtrack_run(&cap, &exe);
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

/// Runs the stress fixture in `mode` under `memtrack run` (time-limited); checks it said "ok",
/// and that its capture is complete and balanced.
fn stress(work: &Work, mode: &str, args: &[&str]) -> (String, std::path::PathBuf) {
    stress_with(work, mode, args, &[])
}

/// `stress` with extra environment variables for the traced program.
fn stress_with(
    work: &Work,
    mode: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (String, std::path::PathBuf) {
    let exe = work.compile("stress.c");
    let cap = work.path(&format!("{mode}.cap"));
    let mut cmd = memtrack_run(&cap, &exe);
    cmd.arg(mode).args(args).current_dir(work.dir());
    cmd.envs(env.iter().copied());
    let out = run_limited(cmd, Duration::from_secs(240));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{mode}: {out:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.ends_with("ok\n"), "{mode}: {stdout}");
    let json = summary_json(&cap);
    assert_eq!(json["complete"], true, "{mode}: {json}");
    assert_eq!(json["unmatched_frees"], 0, "{mode}: {json}");
    assert_eq!(json["overlapping_allocations"], 0, "{mode}: {json}");
    assert_eq!(json["corrupt_chunks"], 0, "{mode}: {json}");
    (stdout, cap)
}

/// The row of `table --json` (allocated view, by function) for `function`: (bytes, count).
fn allocated_by(cap: &std::path::Path, function: &str) -> (u64, u64) {
    let out = memtrack_ok(|c| {
        c.args(["table", "--allocated", "--json", "--top", "1000"])
            .arg(cap);
    });
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["function"] == function)
        .map(|r| {
            (
                r["total_bytes"].as_u64().unwrap(),
                r["count"].as_u64().unwrap(),
            )
        })
        .unwrap_or((0, 0))
}

/// 8 threads x 1 M operations, nearly every free made by another thread than the allocation:
/// every event is recorded in order, so the totals balance exactly.
#[test]
fn eight_threads_freeing_each_others_blocks_balance_exactly() {
    xfree_balances("stress_xfree", &[]);
}

/// The same with the buffer handshake and the switch to atomic sequence numbers on plain fences
/// instead of `membarrier` (what a sandbox that refuses the syscall gets).
#[test]
fn eight_threads_balance_exactly_without_membarrier() {
    xfree_balances("stress_xfree_fences", &[("MEMTRACK_NO_MEMBARRIER", "1")]);
}

/// The same with every chunk transcoded by the thread that filled it rather than the writer
/// (what threads do when the writer falls behind), as far as the one helper is free.
#[test]
fn eight_threads_balance_exactly_when_threads_transcode_their_chunks() {
    xfree_balances("stress_xfree_helper", &[("MEMTRACK_WRITER_BEHIND", "0")]);
}

fn xfree_balances(name: &str, env: &[(&str, &str)]) {
    let work = Work::new(name);
    let (stdout, cap) = stress_with(&work, "xfree", &["1000000"], env);
    let bytes: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("allocated "))
        .and_then(|l| l.strip_suffix(" bytes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {stdout}"));
    assert_eq!(allocated_by(&cap, "stress_alloc"), (bytes, 8_000_000));
    let out = memtrack_ok(|c| {
        c.args(["table", "--leaks", "--json"]).arg(&cap);
    });
    let leaks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !leaks
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["function"] == "stress_alloc"),
        "{leaks}"
    );
}

/// dlopen/dlclose in a loop while other threads allocate: the module list changes under the
/// unwinder 300 times; nothing deadlocks and every free finds its allocation.
#[test]
fn dlopen_and_dlclose_in_a_loop_while_threads_allocate() {
    let work = Work::new("stress_dlopen");
    let lib = work.compile_shared("dlopen_lib.c");
    let (_, cap) = stress(&work, "dlopen", &[lib.to_str().unwrap()]);
    // lib_alloc's blocks (100..399 bytes) were recorded through the library's frames.
    let (bytes, count) = allocated_by(&cap, "lib_site");
    assert_eq!(count, 300);
    assert_eq!(bytes, (100..400).sum::<u64>());
}

/// fork while other threads allocate (and may hold the allocator's locks): every child runs,
/// allocates and exits normally; the parent's capture stays whole and its own.
#[test]
fn fork_while_threads_allocate_leaves_working_children() {
    let work = Work::new("stress_fork");
    let (_, cap) = stress(&work, "fork", &[]);
    // The children's allocations are not in the parent's capture.
    assert_eq!(allocated_by(&cap, "main").1, 0);
}

/// SIGTERM sent to `memtrack run`, and Ctrl-C (SIGINT to the whole process group), reach the
/// service, which shuts down as it would without memtrack: exit code 0, its own output, and a
/// complete capture with nothing leaked.
#[test]
fn sigterm_and_ctrl_c_reach_the_service_which_shuts_down_cleanly() {
    use std::io::BufRead;
    let work = Work::new("service");
    let exe = work.compile("service.c");
    for (name, sig, whole_group) in [("term", libc::SIGTERM, false), ("int", libc::SIGINT, true)] {
        let cap = work.path(&format!("{name}.cap"));
        let mut cmd = memtrack_run(&cap, &exe);
        // Its own process group, as a shell gives a foreground job: Ctrl-C reaches all of it.
        cmd.process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signals to the child (or its group) started above.
        unsafe {
            if whole_group {
                libc::killpg(pid, sig);
            } else {
                libc::kill(pid, sig);
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                // SAFETY: kill of the group started above.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
                panic!("{name}: the service did not shut down");
            })
            .unwrap();
        assert_eq!(status.code(), Some(0), "{name}: {status:?}");
        assert_eq!(lines.next().unwrap().unwrap(), "shutdown", "{name}");
        let json = summary_json(&cap);
        assert_eq!(json["complete"], true, "{name}: {json}");
        assert_eq!(json["end_reason"], "exit", "{name}: {json}");
        assert_eq!(json["leaked_bytes"], 0, "{name}: {json}");
        assert_eq!(json["unmatched_frees"], 0, "{name}: {json}");
    }
}

/// `exit` while other threads are still allocating: the capture is finished cleanly, every
/// event before the end is in it, and nothing is half-written.
#[test]
fn exit_with_threads_still_allocating_finishes_the_capture() {
    let work = Work::new("stress_running");
    let (_, cap) = stress(&work, "running", &[]);
    let (bytes, count) = allocated_by(&cap, "stress_alloc");
    assert!(count > 100 && bytes > 0, "{count} {bytes}");
    assert_eq!(summary_json(&cap)["end_reason"], "exit");
}
