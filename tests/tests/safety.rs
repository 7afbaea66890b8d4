//! The user's data and time: reports end quietly when their reader goes away, never write
//! over a capture, `run` refuses an output it cannot create before the command runs, a
//! capture still being written is called so, and the install script gives a working memtrack.

use memtrack_tests::*;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn memtrack(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(&binaries().memtrack)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("memtrack runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A capture with many distinct stacks (outputs far beyond a pipe's 64 KiB buffer).
fn varied_capture(work: &Work) -> std::path::PathBuf {
    let exe = work.compile("varied_stacks.c");
    run_traced_ok(work, "v.cap", &exe, &["1", "3000"]).capture
}

/// The write end of a pipe whose read end is already closed.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two new descriptors, each owned once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds are fresh descriptors from pipe(2), owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    write_end
}

/// Every command that writes to standard output, on `cap` (`base` for diff).
fn stdout_commands<'a>(cap: &'a str, base: &'a str) -> Vec<Vec<&'a str>> {
    vec![
        vec!["summary", cap],
        vec!["summary", cap, "--json"],
        vec![
            "table",
            cap,
            "--allocated",
            "--by",
            "stack",
            "--top",
            "100000",
        ],
        vec!["table", cap, "--json", "--allocated", "--top", "100000"],
        vec![
            "tree",
            cap,
            "--allocated",
            "--depth",
            "50",
            "--min-percent",
            "0",
        ],
        vec!["stats", cap],
        vec!["dump", cap],
        vec!["export", cap, "--format", "folded", "--allocated"],
        vec!["export", cap, "--format", "json", "--allocated"],
        vec![
            "diff",
            base,
            cap,
            "--format",
            "table",
            "--allocated",
            "--top",
            "100000",
        ],
        vec!["diff", base, cap, "--format", "folded", "--allocated"],
    ]
}

#[test]
fn reports_end_quietly_when_the_reader_of_their_output_goes_away() {
    let work = Work::new("safety_pipe");
    let cap = varied_capture(&work);
    let base = work.path("base.cap");
    std::fs::copy(&cap, &base).unwrap();
    let (cap, base) = (cap.to_str().unwrap(), base.to_str().unwrap());
    for args in stdout_commands(cap, base) {
        // `| head -c1`: one byte read, then the pipe closed while memtrack still writes.
        let mut child = Command::new(&binaries().memtrack)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut one = [0u8; 1];
        child.stdout.take().unwrap().read_exact(&mut one).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} wrote to stderr: {stderr}");

        // The reader gone before the first write (`| head -c0`): the first line fails.
        let write_end = closed_pipe();
        let out = Command::new(&binaries().memtrack)
            .args(&args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} (closed pipe): {stderr}"
        );
        assert!(stderr.is_empty(), "{args:?} (closed pipe): {stderr}");
    }
    // `check` keeps its verdict: a budget exceeded is exit 1 whoever reads the report.
    let write_end = closed_pipe();
    let out = Command::new(&binaries().memtrack)
        .args(["check", cap, "--max-peak", "1"])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

#[test]
fn a_full_disk_on_standard_output_is_an_error_not_a_panic() {
    let work = Work::new("safety_full");
    let exe = work.compile("reports.c");
    let cap = run_traced_ok(&work, "r.cap", &exe, &[] as &[&str]).capture;
    let out = Command::new(&binaries().memtrack)
        .arg("summary")
        .arg(&cap)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "memtrack: error: cannot write to standard output: No space left on device (os error 28)"
    );
}

#[test]
fn no_report_writes_over_a_capture() {
    let work = Work::new("safety_overwrite");
    let exe = work.compile("forks.c");
    let t = run_traced_ok(&work, "g.cap", &exe, &[] as &[&str]);
    // The tree's other captures (FILE.<pid>), kept with --keep-all.
    let kept = work.path("k.cap");
    let run = Command::new(&binaries().memtrack)
        .args(["run", "--keep-all", "-o"])
        .arg(&kept)
        .arg("--")
        .arg(&exe)
        .current_dir(work.dir())
        .output()
        .unwrap();
    assert!(run.status.success());
    let child = std::fs::read_dir(work.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("k.cap."))
        .expect("a child capture k.cap.<pid>");
    std::os::unix::fs::symlink("g.cap", work.path("link.cap")).unwrap();
    std::fs::copy(&t.capture, work.path("other.cap")).unwrap();
    let before: Vec<(String, Vec<u8>)> = ["g.cap", "k.cap", child.as_str(), "other.cap"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(work.path(n)).unwrap()))
        .collect();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["flamegraph", "g.cap", "-o", "g.cap"],
            "g.cap, the capture it reads",
        ),
        (
            vec!["export", "g.cap", "--format", "folded", "-o", "./g.cap"],
            "./g.cap, the capture it reads",
        ),
        (
            vec!["plot", "g.cap", "-o", "link.cap"],
            "link.cap, the capture it reads",
        ),
        (
            vec!["export", "g.cap", "--format", "json", "-o", "other.cap"],
            "other.cap: it is a memtrack capture",
        ),
        (
            vec!["flamegraph", "k.cap", "-o", child.as_str()],
            "it is a memtrack capture",
        ),
        (
            vec![
                "diff",
                "g.cap",
                "other.cap",
                "--format",
                "table",
                "-o",
                "other.cap",
            ],
            "other.cap, the capture it reads",
        ),
        (
            vec!["diff", "g.cap", "other.cap", "-o", "g.cap"],
            "g.cap, the capture it reads",
        ),
    ];
    for (args, why) in cases {
        let (code, stdout, stderr) = memtrack(&args, work.dir());
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("memtrack: error: refusing to write the report over ")
                && stderr.contains(why)
                && stderr.trim_end().ends_with("; choose another -o"),
            "{args:?}: {stderr}"
        );
    }
    for (name, bytes) in &before {
        assert!(
            std::fs::read(work.path(name)).unwrap() == *bytes,
            "{name} changed"
        );
    }
    // A new file and `-` are fine.
    let (code, _, stderr) = memtrack(
        &["export", "g.cap", "--format", "folded", "-o", "g.folded"],
        work.dir(),
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn run_refuses_an_output_it_cannot_create_before_the_command_runs() {
    let work = Work::new("safety_run_output");
    let marker = work.path("marker");
    let script = format!("touch {}", marker.display());
    let missing = work.path("no-such-dir/x.cap");
    let (code, _, stderr) = memtrack(
        &[
            "run",
            "-o",
            missing.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
        work.dir(),
    );
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "memtrack: error: cannot write the capture to {}: the directory {} does not exist; choose another -o\n",
            missing.display(),
            work.path("no-such-dir").display()
        )
    );
    assert!(!marker.exists(), "the command ran");

    // A directory, with --force too.
    let dir = work.dir().to_str().unwrap();
    let (code, _, stderr) = memtrack(
        &["run", "-o", dir, "--force", "--", "sh", "-c", &script],
        work.dir(),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("{dir}: it is a directory")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!marker.exists(), "the command ran");

    // A file system where nothing can be created.
    let (code, _, stderr) = memtrack(
        &["run", "-o", "/proc/x.cap", "--", "sh", "-c", &script],
        work.dir(),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot create a file there"), "{stderr}");
    assert!(!marker.exists(), "the command ran");
}

#[test]
fn a_misspelled_option_before_the_command_is_an_error_and_arguments_pass_through() {
    let work = Work::new("safety_args");
    for args in [
        &["run", "--follow-forks", "--", "true"][..],
        &["run", "--follow-forks", "true"][..],
    ] {
        let (code, _, stderr) = memtrack(args, work.dir());
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.starts_with("error: unexpected argument '--follow-forks' found"),
            "{stderr}"
        );
        assert!(!stderr.contains("not found on PATH"), "{stderr}");
    }
    // After the command's name everything is the command's, options and `--` included.
    let printf = r#"printf '%s|' "$@""#;
    for args in [
        &[
            "run", "-o", "a.cap", "--", "sh", "-c", printf, "x", "-la", "--force", "--", "-o",
        ][..],
        &[
            "run", "-o", "b.cap", "sh", "-c", printf, "x", "-la", "--force", "--", "-o",
        ][..],
    ] {
        let (code, stdout, stderr) = memtrack(args, work.dir());
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout, "-la|--force|--|-o|");
    }
}

#[test]
fn a_directory_given_as_a_capture_is_named_so() {
    let work = Work::new("safety_dir");
    let dir = work.dir().to_str().unwrap();
    let (code, _, stderr) = memtrack(&["summary", dir], work.dir());
    assert_eq!(code, 2);
    assert_eq!(
        stderr,
        format!("memtrack: error: {dir}: this is a directory; give a capture file (a .cap written by `memtrack run`)\n")
    );
}

fn capture_line(cap: &Path) -> String {
    let (code, stdout, stderr) =
        memtrack(&["summary", cap.to_str().unwrap()], cap.parent().unwrap());
    assert_eq!(code, 0, "{stderr}");
    stdout
        .lines()
        .filter(|l| l.contains("capture:") || l.contains("live "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the capture holds more than `n` allocations.
fn wait_for_allocations(cap: &Path, n: u64) {
    let start = Instant::now();
    loop {
        let got = memtrack_reader::Capture::open(cap)
            .ok()
            .and_then(|c| c.summary().ok())
            .map_or(0, |s| s.total_allocations);
        if got > n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no allocations recorded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_capture_still_being_written_is_not_called_killed() {
    let work = Work::new("safety_live");
    let exe = work.compile("killed.c");
    let cap = work.path("live.cap");
    let mut child = Command::new(&exe)
        .arg("loop")
        .env("LD_PRELOAD", &binaries().preload)
        .env("MEMTRACK_OUTPUT", &cap)
        .env_remove("MEMTRACK_LAUNCHER_PID")
        .spawn()
        .unwrap();
    wait_for_allocations(&cap, 20);
    let live = capture_line(&cap);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        live.contains("capture:        still being written (no END record yet)")
            && live.contains("  live so far:    "),
        "{live}"
    );
    let dead = capture_line(&cap);
    assert!(
        dead.contains("(the process was killed or crashed)")
            && dead.contains("  live at cut-off: "),
        "{dead}"
    );
}

#[test]
fn a_forked_child_holding_the_capture_open_does_not_keep_it_alive() {
    // The parent is killed; its forked child (no exec) still holds the capture's descriptor.
    // python3 may be pyenv's shim: bash images that exec, then Python, all into one capture.
    let work = Work::new("safety_forked_holder");
    let cap = work.path("py.cap");
    let script = "import os, time\nx = [bytearray(100) for _ in range(300)]\nif os.fork() == 0:\n    time.sleep(20)\n    os._exit(0)\ntime.sleep(60)\n";
    let mut parent = Command::new("python3")
        .args(["-c", script])
        .env("LD_PRELOAD", &binaries().preload)
        .env("MEMTRACK_OUTPUT", &cap)
        .env("PYTHONMALLOC", "malloc")
        .env_remove("MEMTRACK_LAUNCHER_PID")
        .env_remove("MEMTRACK_FOLLOW_FORK")
        .spawn()
        .unwrap();
    // Until the child is forked (after Python's start-up and the 300 blocks).
    let start = Instant::now();
    let children = loop {
        // Python's own fork, not a pyenv shell's helpers.
        let python = std::fs::read_link(format!("/proc/{}/exe", parent.id()))
            .is_ok_and(|e| e.to_string_lossy().contains("python"));
        let c = children_of(parent.id());
        if python && !c.is_empty() {
            break c;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no fork");
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for_allocations(&cap, 300);
    let live = capture_line(&cap);
    parent.kill().unwrap();
    parent.wait().unwrap();
    let dead = capture_line(&cap);
    for c in children {
        // SAFETY: kill(2) of the child this test's program forked.
        unsafe { libc::kill(c as i32, libc::SIGKILL) };
    }
    assert!(live.contains("still being written"), "{live}");
    assert!(
        dead.contains("(the process was killed or crashed)"),
        "{dead}"
    );
}

#[test]
fn install_script_puts_a_working_memtrack_in_a_prefix() {
    let work = Work::new("safety_install");
    binaries();
    let prefix = work.path("prefix");
    let out = Command::new(workspace_root().join("install.sh"))
        .arg("--no-build")
        .arg(&prefix)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(prefix.join("lib/memtrack/libmemtrack.so").is_file());
    // The whole package: __init__ imports its other modules.
    for m in ["__init__.py", "_lib.py", "_cli.py", "pytest_plugin.py"] {
        assert!(prefix
            .join("lib/memtrack/python/memtrack")
            .join(m)
            .is_file());
    }
    let installed = prefix.join("bin/memtrack");
    let exe = work.compile("reports.c");
    let run = Command::new(&installed)
        .args(["run", "-o", "i.cap", "--"])
        .arg(&exe)
        .current_dir(work.dir())
        .env_remove("MEMTRACK_PRELOAD")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(work.path("i.cap").is_file());

    // Alone, without the library: says where it looked and how to fix it.
    let lone = work.path("lone");
    std::fs::create_dir(&lone).unwrap();
    std::fs::copy(&installed, lone.join("memtrack")).unwrap();
    let run = Command::new(lone.join("memtrack"))
        .args(["run", "--", "true"])
        .current_dir(work.dir())
        .env_remove("MEMTRACK_PRELOAD")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "looked in {}",
            lone.join("libmemtrack.so").display()
        )) && stderr.contains("lib/memtrack/libmemtrack.so")
            && stderr.contains("./install.sh [PREFIX]"),
        "{stderr}"
    );
}

#[test]
fn plot_has_titled_axes_with_round_ticks() {
    let work = Work::new("safety_plot");
    let exe = work.compile("reports.c");
    let cap = run_traced_ok(&work, "p.cap", &exe, &[] as &[&str]).capture;
    let (code, _, stderr) = memtrack(&["plot", cap.to_str().unwrap(), "-o", "p.svg"], work.dir());
    assert_eq!(code, 0, "{stderr}");
    let svg = std::fs::read_to_string(work.path("p.svg")).unwrap();
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| {
            t.split_once('>')
                .and_then(|(_, r)| r.split_once("</text>"))
                .map(|(x, _)| x)
        })
        .collect();
    assert!(texts.contains(&"heap in use"), "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| *t == "time (ms)" || *t == "time (s)" || *t == "events, in order"),
        "{texts:?}"
    );
    // The peak is 53,000 bytes (51.76 KiB): ticks 0, 20, 40, 60 KiB, a round top above it.
    for t in ["0", "20 KiB", "40 KiB", "60 KiB"] {
        assert!(texts.contains(&t), "no tick {t}: {texts:?}");
    }
    assert!(!texts.contains(&"80 KiB"), "{texts:?}");
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}
