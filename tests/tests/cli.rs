//! The `memtrack` command's contract: output names, overwrite protection, errors, Python.

use memtrack_tests::*;
use std::process::Command;

fn memtrack(args: &[&str], dir: &std::path::Path) -> Run {
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.args(args).current_dir(dir);
    let out = cmd.output().expect("memtrack runs");
    Run {
        status: out.status,
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn run_refuses_to_overwrite_without_force_and_names_default_output() {
    let work = Work::new("cli_run");
    let exe = work.compile("errno_check.c");
    let exe_s = exe.to_str().unwrap();
    std::fs::write(work.path("taken.cap"), b"precious").unwrap();
    let r = memtrack(&["run", "-o", "taken.cap", "--", exe_s], work.dir());
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert!(
        r.stderr.contains("taken.cap") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(work.path("taken.cap")).unwrap(), b"precious");

    let r = memtrack(
        &["run", "-o", "taken.cap", "--force", "--", exe_s],
        work.dir(),
    );
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(open_capture(&work.path("taken.cap")).complete());

    // Default name: memtrack-<command>.<pid>.cap in the current directory.
    let r = memtrack(&["run", "--", exe_s], work.dir());
    assert_eq!(r.code(), Some(0), "{r:?}");
    let names: Vec<String> = std::fs::read_dir(work.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("memtrack-errno_check."))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let pid = names[0]
        .strip_prefix("memtrack-errno_check.")
        .and_then(|n| n.strip_suffix(".cap"))
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("unexpected name {}", names[0]));
    let cap = open_capture(&work.path(&names[0]));
    assert_eq!(cap.header.pid, pid);
    assert!(
        r.stderr.contains(&names[0]),
        "run names the capture: {}",
        r.stderr
    );
    assert!(r.stderr.contains("memtrack summary"), "{}", r.stderr);
}

#[test]
fn summary_errors_name_the_file_and_exit_2() {
    let work = Work::new("cli_errors");
    let missing = memtrack(&["summary", "nope.cap"], work.dir());
    assert_eq!(missing.code(), Some(2));
    assert!(missing.stderr.contains("nope.cap"), "{}", missing.stderr);

    std::fs::write(work.path("text.cap"), b"hello, not a capture\n").unwrap();
    let bad = memtrack(&["summary", "text.cap"], work.dir());
    assert_eq!(bad.code(), Some(2));
    assert!(
        bad.stderr.contains("text.cap") && bad.stderr.contains("not a memtrack capture"),
        "{}",
        bad.stderr
    );

    std::fs::write(work.path("empty.cap"), b"").unwrap();
    let empty = memtrack(&["summary", "empty.cap"], work.dir());
    assert_eq!(empty.code(), Some(2));
    assert!(empty.stderr.contains("empty.cap"), "{}", empty.stderr);
    assert!(!empty.stderr.contains("panicked"), "{}", empty.stderr);
}

#[test]
fn python_gets_pythonmalloc_unless_set() {
    let Ok(out) = Command::new("python3").arg("-c").arg("pass").output() else {
        eprintln!("no python3 here: skipped");
        return;
    };
    assert!(out.status.success());
    let work = Work::new("cli_python");
    let script = "import os; print(os.environ.get('PYTHONMALLOC'))";
    let r = memtrack(
        &["run", "-o", "py.cap", "--", "python3", "-c", script],
        work.dir(),
    );
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert_eq!(r.stdout_text(), "malloc\n");
    assert!(r.stderr.contains("PYTHONMALLOC=malloc"), "{}", r.stderr);
    let s = open_capture(&work.path("py.cap")).summary().unwrap();
    assert!(s.complete && s.total_allocations > 1000, "{s:?}");

    let mut cmd = Command::new(&binaries().memtrack);
    cmd.args(["run", "-o", "py2.cap", "--", "python3", "-c", script])
        .env("PYTHONMALLOC", "pymalloc")
        .current_dir(work.dir());
    let out = cmd.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pymalloc\n");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("setting PYTHONMALLOC"));
}

/// The progress bar shows on a terminal only, never in pipes or with --json.
#[test]
fn progress_bar_only_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "`script` (bsdutils) is missing in CI"
        );
        return;
    }
    let cap = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("captures/v2-threads.cap");
    let memtrack = binaries().memtrack.display().to_string();
    let in_pty = |args: &str| -> String {
        let out = Command::new("script")
            .args([
                "-qc",
                &format!("{memtrack} {args} {}", cap.display()),
                "/dev/null",
            ])
            .env("MEMTRACK_PROGRESS_AFTER_MS", "0")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tty = in_pty("summary");
    assert!(
        tty.contains("\rreading ") && tty.contains("\r\x1b[K"),
        "{tty:?}"
    );
    assert!(tty.contains("peak heap:"), "{tty:?}");
    let json = in_pty("summary --json");
    assert!(!json.contains("reading "), "{json:?}");

    let piped = Command::new(&binaries().memtrack)
        .arg("summary")
        .arg(&cap)
        .env("MEMTRACK_PROGRESS_AFTER_MS", "0")
        .output()
        .unwrap();
    assert!(piped.status.success());
    // Other lines may be there (the kept capture's binaries are gone: symbol warnings).
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains("reading ") && !stderr.contains('\r'),
        "{stderr:?}"
    );
}

#[test]
fn check_exits_0_1_2_and_names_the_top_stacks() {
    let work = Work::new("check");
    let exe = work.compile("reports.c");
    let t = run_traced_ok(&work, "r.cap", &exe, &[] as &[&str]);
    let cap = t.capture.to_str().unwrap().to_string();
    // reports.c: peak 53000 bytes, 3000 bytes leaked in 2 allocations, 3 allocations, 53000 total.
    let ok = memtrack(
        &[
            "check",
            &cap,
            "--max-peak",
            "53000",
            "--max-leaked",
            "3000",
            "--max-leaked-allocations",
            "2",
            "--max-allocations",
            "3",
            "--max-total",
            "51.8KiB",
        ],
        work.dir(),
    );
    assert_eq!(ok.code(), Some(0), "{}{}", ok.stdout_text(), ok.stderr);
    assert!(
        ok.stdout_text().contains("all 5 limits hold"),
        "{}",
        ok.stdout_text()
    );

    let over = memtrack(&["check", &cap, "--max-peak", "52999"], work.dir());
    assert_eq!(over.code(), Some(1));
    let text = over.stdout_text();
    assert!(
        text.contains("EXCEEDED") && text.contains("peak_site (reports.c:19) <- main"),
        "{text}"
    );

    let json = memtrack(
        &[
            "check",
            &cap,
            "--max-leaked",
            "0",
            "--max-peak",
            "1GiB",
            "--json",
        ],
        work.dir(),
    );
    assert_eq!(json.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let by_name = |n: &str| {
        v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == n)
            .unwrap()
            .clone()
    };
    let leaked = by_name("max_leaked");
    assert_eq!(
        (leaked["name"].as_str(), leaked["measured"].as_u64()),
        (Some("max_leaked"), Some(3000))
    );
    assert_eq!(leaked["top"].as_array().unwrap().len(), 2);
    assert!(leaked["top"][0]["frames"][0]
        .as_str()
        .unwrap()
        .starts_with("leaf_alloc"));
    assert_eq!(leaked["top"][0]["bytes"], 2000);
    assert_eq!(by_name("max_peak")["exceeded"], false);

    let bad = memtrack(&["check", &cap, "--max-peak", "12 parsecs"], work.dir());
    assert_eq!(bad.code(), Some(2));
    assert!(
        bad.stderr.contains("--max-peak") && bad.stderr.contains("parsecs"),
        "{}",
        bad.stderr
    );
    let missing = memtrack(&["check", "nope.cap", "--max-peak", "1"], work.dir());
    assert_eq!(missing.code(), Some(2));
    let none = memtrack(&["check", &cap], work.dir());
    assert_eq!(none.code(), Some(2), "no limit is an error");
}

#[test]
fn run_with_budgets_exits_with_the_commands_failure_first() {
    let work = Work::new("run_budget");
    let exe = work.compile("reports.c");
    let exe_s = exe.to_str().unwrap();
    let held = memtrack(
        &["run", "-o", "a.cap", "--max-peak", "64KiB", "--", exe_s],
        work.dir(),
    );
    assert_eq!(held.code(), Some(0), "{}", held.stderr);
    let over = memtrack(
        &["run", "-o", "b.cap", "--max-leaked", "0", "--", exe_s],
        work.dir(),
    );
    assert_eq!(over.code(), Some(1), "{}", over.stderr);
    assert!(
        over.stderr.contains("max-leaked"),
        "the check is printed on stderr"
    );
    assert!(over.stdout.is_empty(), "the program's stdout stays its own");
    // output.c exits with 7: the command's own failure is the exit code.
    let failing = work.compile("output.c");
    let f = memtrack(
        &[
            "run",
            "-o",
            "c.cap",
            "--max-leaked",
            "0",
            "--",
            failing.to_str().unwrap(),
        ],
        work.dir(),
    );
    assert_eq!(f.code(), Some(7), "{}", f.stderr);
}

/// What LD_PRELOAD cannot track is refused up front, naming the file and the reason, with
/// exit code 2 and nothing run.
#[test]
fn run_refuses_static_setuid_and_missing_commands() {
    use std::os::unix::fs::PermissionsExt;
    let work = Work::new("cli_refuse");
    let src = work.path("ran.c");
    // The program leaves a mark if it runs at all.
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void){FILE*f=fopen(\"ran.mark\",\"w\");return f?0:1;}\n",
    )
    .unwrap();
    let mut cases: Vec<(String, &str)> = Vec::new();
    for (name, flag) in [("static", "-static"), ("static_pie", "-static-pie")] {
        let out = Command::new("gcc")
            .arg(flag)
            .arg("-o")
            .arg(work.path(name))
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gcc {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cases.push((format!("./{name}"), "statically linked"));
    }
    let suid = work.path("suid");
    std::fs::copy(work.compile("errno_check.c"), &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    cases.push(("./suid".into(), "set-user-ID"));
    cases.push(("./missing".into(), "no such file"));
    cases.push(("memtrack-no-such-command".into(), "not found on PATH"));
    for (cmd, why) in &cases {
        let r = memtrack(&["run", "-o", "r.cap", "--", cmd], work.dir());
        assert_eq!(r.code(), Some(2), "{cmd}: {r:?}");
        let name = cmd.trim_start_matches("./");
        assert!(
            r.stderr.contains(name) && r.stderr.contains(why),
            "{cmd}: {}",
            r.stderr
        );
        assert!(!work.path("ran.mark").exists(), "{cmd} was run");
        assert!(!work.path("r.cap").exists());
    }
}

/// The capture holds addresses, paths and command lines: it is created mode 0600, never over
/// an existing file, and a symlink planted at its path is neither followed nor overwritten.
#[test]
fn capture_is_private_and_never_follows_a_planted_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let work = Work::new("cli_private");
    let exe = work.compile("errno_check.c");
    let exe_s = exe.to_str().unwrap();
    let r = memtrack(&["run", "-o", "a.cap", "--", exe_s], work.dir());
    assert_eq!(r.code(), Some(0), "{r:?}");
    let mode = std::fs::metadata(work.path("a.cap"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    let target = work.path("victim");
    std::os::unix::fs::symlink(&target, work.path("link.cap")).unwrap();
    let r = memtrack(&["run", "-o", "link.cap", "--", exe_s], work.dir());
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert!(
        r.stderr.contains("link.cap") && r.stderr.contains("already exists"),
        "{}",
        r.stderr
    );
    assert!(!target.exists(), "the link was followed");

    // By hand (no launcher to check): the tracker's exclusive create refuses the link too.
    let out = Command::new(&exe)
        .current_dir(work.dir())
        .env("LD_PRELOAD", &binaries().preload)
        .env("MEMTRACK_OUTPUT", work.path("link.cap"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!target.exists(), "the link was followed");

    // --force replaces the link itself with a new private file.
    let r = memtrack(
        &["run", "-o", "link.cap", "--force", "--", exe_s],
        work.dir(),
    );
    assert_eq!(r.code(), Some(0), "{r:?}");
    let meta = std::fs::symlink_metadata(work.path("link.cap")).unwrap();
    assert!(meta.is_file() && meta.permissions().mode() & 0o777 == 0o600);
    assert!(!target.exists());
}

/// `memtrack run` ignores SIGINT and SIGQUIT while it waits, but its command gets them as
/// memtrack was started with them: by default, raising SIGINT kills the command (and memtrack
/// exits 128 + 2, as the shell would); started with SIGINT and SIGPIPE ignored (as some launchers
/// do), the command finds them ignored and goes on.
#[test]
fn run_leaves_the_commands_signal_dispositions_as_they_were() {
    use std::os::unix::process::CommandExt;
    let work = Work::new("cli_signals");
    let exe = work.compile("sigint.c");
    let exe_s = exe.to_str().unwrap();
    let killed = memtrack(&["run", "-o", "a.cap", "--", exe_s], work.dir());
    assert_eq!(killed.code(), Some(130), "{}", killed.stderr);
    assert_eq!(
        String::from_utf8_lossy(&killed.stdout),
        "SIGINT default\nSIGQUIT default\nSIGPIPE default\n"
    );
    // Killed at once: a capture that reads as cut off (its last quarter second is lost).
    assert_eq!(summary_json(&work.path("a.cap"))["complete"], false);

    let mut cmd = Command::new(&binaries().memtrack);
    cmd.args(["run", "-o", "b.cap", "--", exe_s])
        .current_dir(work.dir());
    // SAFETY: runs in the forked child before exec; signal(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().expect("memtrack runs");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SIGINT ignored\nSIGQUIT default\nSIGPIPE ignored\n"
    );
}
