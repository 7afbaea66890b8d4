//! `memtrack attach` and `memtrack detach`.
//!
//! The injector is tested on its own with a stand-in library (`attach_stub.c`, built as
//! `libmemtrack.so` and named by `MEMTRACK_PRELOAD`): it logs the `memtrack_start` call it
//! receives into the output file and ends its "recording" as the real library does, so these
//! tests show what the injection does to the target (nothing visible: same output, same exit
//! code, blocked calls returning normally) whatever the real library records. Each refusal
//! this machine can set up is checked for its message and exit code 2.

use memtrack_tests::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The stand-in library, built as `<work>/stub/libmemtrack.so`; memtrack built too, before
/// any fixture starts its clock.
fn stub(work: &Work) -> PathBuf {
    binaries();
    let dir = work.path("stub");
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libmemtrack.so");
    let out = Command::new("gcc")
        .args([
            "-O1", "-g", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-o",
        ])
        .arg(&lib)
        .arg(fixtures_dir().join("attach_stub.c"))
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "gcc failed on attach_stub.c:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// A started fixture whose "ready" line has been read.
struct Started {
    child: KillOnDrop,
    stdout: BufReader<ChildStdout>,
    ready_at: Instant,
}

impl Started {
    fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }

    /// Waits for the end; returns the rest of standard output and the exit code.
    fn finish(mut self) -> (String, Option<i32>) {
        drop(self.child.0.stdin.take());
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let status = self.child.0.wait().unwrap();
        (rest, status.code())
    }
}

/// Starts `cmd` (stdin and stdout piped) and waits for its first line, "ready".
fn start(mut cmd: Command) -> Started {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .env_remove("LD_PRELOAD")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let child = KillOnDrop(child);
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "{cmd:?} did not say ready");
    Started {
        child,
        stdout,
        ready_at: Instant::now(),
    }
}

fn target(exe: &Path, mode: &str) -> Started {
    let mut cmd = Command::new(exe);
    cmd.arg(mode);
    start(cmd)
}

/// `memtrack ARGS` with `MEMTRACK_PRELOAD=lib`, killed after 30 s.
fn memtrack(lib: &Path, args: &[&str], prefix: &[&str]) -> Output {
    let mut cmd = if prefix.is_empty() {
        Command::new(&binaries().memtrack)
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(&binaries().memtrack);
        c
    };
    cmd.args(args)
        .env("MEMTRACK_PRELOAD", lib)
        .env_remove("LD_PRELOAD")
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("memtrack");
    wait_output(child, &format!("memtrack {args:?}"))
}

fn wait_output(mut child: Child, what: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not end within 30 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The stub's log: `start flags=F duration_ms=N tid=T main=M` and how it stopped.
fn stub_log(path: &Path) -> (String, i32, i32, String) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no stub log at {}: {e}", path.display()));
    let mut lines = text.lines();
    let start = lines.next().expect("a start line");
    let field = |name: &str| -> String {
        start
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {start:?}"))
            .to_string()
    };
    let head = format!(
        "start flags={} duration_ms={}",
        field("flags="),
        field("duration_ms=")
    );
    (
        head,
        field("tid=").parse().unwrap(),
        field("main=").parse().unwrap(),
        lines.collect::<Vec<_>>().join("\n"),
    )
}

/// Attaches for 0.5 s with the stub; checks memtrack's report and the stub's log; returns the
/// thread the calls ran on.
fn attach_briefly(work: &Work, lib: &Path, pid: i32) -> i32 {
    let log = work.path(&format!("attach-{pid}.log"));
    let out = memtrack(
        lib,
        &[
            "attach",
            &pid.to_string(),
            "-o",
            log.to_str().unwrap(),
            "--duration",
            "0.5",
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "attach failed:\n{err}");
    assert!(
        err.contains(&format!(
            "memtrack: recording {pid} into {} for 0.5 s",
            log.display()
        )),
        "{err}"
    );
    let (head, tid, main, rest) = stub_log(&log);
    assert_eq!(head, "start flags=2 duration_ms=500");
    assert_eq!(main, pid);
    assert_eq!(rest, "stop duration");
    tid
}

#[test]
fn attach_to_a_read_leaves_the_read_intact() {
    let work = Work::new("attach-read");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let mut t = target(&exe, "read");
    std::thread::sleep(Duration::from_millis(200));
    // The main thread waits in read(2): an idle system call, chosen.
    assert_eq!(attach_briefly(&work, &lib, t.pid()), t.pid());
    t.child
        .0
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"hello\n")
        .unwrap();
    let (rest, code) = t.finish();
    assert_eq!(rest, "read returned 6 errno 0: hello\n");
    assert_eq!(code, Some(3));
}

#[test]
fn attach_to_an_epoll_wait_leaves_it_intact() {
    let work = Work::new("attach-epoll");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let mut t = target(&exe, "epoll");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(attach_briefly(&work, &lib, t.pid()), t.pid());
    t.child.0.stdin.as_mut().unwrap().write_all(b"x\n").unwrap();
    let (rest, code) = t.finish();
    assert_eq!(rest, "epoll_wait returned 1 errno 0 data 7\n");
    assert_eq!(code, Some(3));
}

/// A sleep interrupted by the attach 1.5 s into its 3 s ends at its time: restarted with the
/// time left (a restart from the beginning would end 1.5 s late), never with EINTR.
fn sleep_kept(mode: &str) {
    let work = Work::new(&format!("attach-{mode}"));
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, mode);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(attach_briefly(&work, &lib, t.pid()), t.pid());
    let ready = t.ready_at;
    let (rest, code) = t.finish();
    let took = ready.elapsed();
    assert_eq!(rest, "sleep returned 0 errno 0, full time yes\n");
    assert_eq!(code, Some(3));
    assert!(
        took < Duration::from_millis(4000),
        "the sleep took {took:?}: restarted from the beginning?"
    );
}

#[test]
fn attach_to_a_nanosleep_keeps_its_time() {
    sleep_kept("sleep");
}

#[test]
fn attach_to_a_clock_nanosleep_keeps_its_time() {
    sleep_kept("cnsleep");
}

#[test]
fn attach_to_a_busy_loop_keeps_its_registers() {
    let work = Work::new("attach-busy");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, "busy");
    std::thread::sleep(Duration::from_millis(500));
    // No thread is in a system call: the main thread, stopped outside the C library.
    assert_eq!(attach_briefly(&work, &lib, t.pid()), t.pid());
    let (rest, code) = t.finish();
    assert_eq!(rest, "busy state kept: yes\n");
    assert_eq!(code, Some(3));
}

/// `memtrack attach PID` without --duration, in the background; returns once the stub logged
/// its start.
/// `memtrack attach PID -o OUT` with `MEMTRACK_PRELOAD=lib`, running in the background.
fn spawn_attach(lib: &Path, pid: i32, out: &Path) -> Child {
    Command::new(&binaries().memtrack)
        .args(["attach", &pid.to_string(), "-o"])
        .arg(out)
        .env("MEMTRACK_PRELOAD", lib)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("memtrack attach")
}

fn attach_in_background(lib: &Path, pid: i32, log: &Path) -> Child {
    let child = spawn_attach(lib, pid, log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log).is_ok_and(|s| s.contains('\n')) {
        assert!(Instant::now() < deadline, "the stub never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn detach_stops_the_recording_and_refuses_when_none_runs() {
    let work = Work::new("attach-detach");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, "wait");
    let pid = t.pid();
    let log = work.path("detach.log");
    let attach = attach_in_background(&lib, pid, &log);

    // A second attach while the first records.
    let again = memtrack(
        &lib,
        &["attach", &pid.to_string(), "-o", "/tmp/never.cap"],
        &[],
    );
    assert_eq!(
        stderr(&again),
        format!(
            "memtrack: cannot attach to {pid}: the process is already being recorded (by an earlier `memtrack attach`)\n\
             fix: memtrack detach {pid} stops that recording; then attach again\n"
        )
    );
    assert_eq!(again.status.code(), Some(2));

    let out = memtrack(&lib, &["detach", &pid.to_string()], &[]);
    assert_eq!(
        stderr(&out),
        format!("memtrack: process {pid} stopped recording; its capture is complete\n")
    );
    assert_eq!(out.status.code(), Some(0));
    let attach = wait_output(attach, "memtrack attach");
    assert_eq!(attach.status.code(), Some(0), "{}", stderr(&attach));
    let (head, _, _, rest) = stub_log(&log);
    assert_eq!(head, "start flags=2 duration_ms=0");
    assert_eq!(rest, "stop control");

    let out = memtrack(&lib, &["detach", &pid.to_string()], &[]);
    assert_eq!(
        stderr(&out),
        format!(
            "memtrack: cannot detach from {pid}: the process is not recording (its recording has ended, or never started)\n\
             fix: memtrack attach {pid} starts recording it\n"
        )
    );
    assert_eq!(out.status.code(), Some(2));
    // The library stays loaded; attaching again starts a new recording.
    attach_briefly(&work, &lib, pid);
}

#[test]
fn ctrl_c_on_attach_stops_the_recording() {
    let work = Work::new("attach-sigint");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, "wait");
    let log = work.path("sigint.log");
    let attach = attach_in_background(&lib, t.pid(), &log);
    // SAFETY: kill with a child's pid and a signal number.
    unsafe {
        libc::kill(attach.id() as i32, libc::SIGINT);
    }
    let out = wait_output(attach, "memtrack attach");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("memtrack: stopping the recording\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stub_log(&log).3, "stop control");
}

#[test]
fn a_start_the_library_refuses_is_reported_with_its_reason() {
    let work = Work::new("attach-lib-refuses");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, "read");
    let pid = t.pid();
    let out = memtrack(
        &lib,
        &["attach", &pid.to_string(), "-o", "/tmp/refuse-this.cap"],
        &[],
    );
    assert_eq!(
        stderr(&out),
        format!(
            "memtrack: cannot attach to {pid}: the library refused to start: stub refuses this path\n\
             fix: see the reason; `memtrack detach` stops an earlier recording\n"
        )
    );
    assert_eq!(out.status.code(), Some(2));
    t.child
        .0
        .stdin
        .as_ref()
        .unwrap()
        .write_all(b"ok\n")
        .unwrap();
    let (rest, code) = t.finish();
    assert_eq!(rest, "read returned 3 errno 0: ok\n");
    assert_eq!(code, Some(3));
}

/// `memtrack attach PID` (with `prefix` before memtrack) is refused with exactly this reason
/// and fix, exit 2.
fn assert_refused(lib: &Path, pid: i32, prefix: &[&str], reason: &str, fix: &str) {
    let out = memtrack(
        lib,
        &["attach", &pid.to_string(), "-o", "/tmp/never-written.cap"],
        prefix,
    );
    let expected = format!("memtrack: cannot attach to {pid}: {reason}\nfix: {fix}\n");
    let err = stderr(&out);
    // A process under seccomp gets a note first.
    let err = err
        .strip_prefix(&format!("memtrack: note: process {pid} runs under a seccomp filter; if it forbids what dlopen does, the attach fails and says so\n"))
        .unwrap_or(&err);
    assert_eq!(err, expected);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn refuses_a_process_that_does_not_exist() {
    let work = Work::new("attach-nopid");
    let lib = stub(&work);
    // A pid just freed: its process was reaped.
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    assert_refused(
        &lib,
        pid,
        &[],
        "no such process",
        &format!("check the process id (ps -p {pid})"),
    );
}

#[test]
fn refuses_a_stopped_process_and_leaves_it_stopped() {
    let work = Work::new("attach-stopped");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, "wait");
    let pid = t.pid();
    // SAFETY: kill with a child's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") T ")
    {
        assert!(Instant::now() < deadline, "the fixture never stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_refused(
        &lib,
        pid,
        &[],
        "the process is stopped; attaching would make it run",
        &format!("kill -CONT {pid} first, then attach"),
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(stat.contains(") T "), "no longer stopped: {stat}");
}

/// A process killed on drop: a fixture under a tracer or `memtrack run` outlives their kill.
struct KillPid(i32);

impl Drop for KillPid {
    fn drop(&mut self) {
        // SAFETY: kill with a pid this test started (through another program).
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// The pid of the only child of `parent`.
fn child_of(parent: u32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(p) = c.split_whitespace().next() {
            return p.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "{parent} has no child");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn refuses_a_process_being_traced() {
    let work = Work::new("attach-traced");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-o", "/dev/null"]).arg(&exe).arg("wait");
    let t = start(cmd);
    let strace = t.pid();
    let pid = child_of(strace as u32);
    let _kill = KillPid(pid);
    assert_refused(
        &lib,
        pid,
        &[],
        &format!("the process is being traced by process {strace} (strace), a debugger or tracer; a process has one tracer at a time"),
        &format!("detach the debugger or stop the tracer (process {strace}) first"),
    );
}

#[test]
fn refuses_a_static_executable() {
    let work = Work::new("attach-static");
    let lib = stub(&work);
    let exe = work.compile_with(
        "attach_target.c",
        Some("static_target"),
        &["-O1", "-static"],
    );
    let t = target(&exe, "wait");
    assert_refused(
        &lib,
        t.pid(),
        &[],
        "the process is statically linked: it has no dynamic loader to load memtrack into",
        "run it under `memtrack run` (which records what LD_PRELOAD can reach), or link it dynamically",
    );
}

#[test]
fn refuses_a_process_in_another_mount_namespace_without_the_library() {
    let work = Work::new("attach-mntns");
    let stub_lib = stub(&work);
    let exe = work.compile("attach_target.c");
    // The library sits in a directory the target's namespace covers with an empty tmpfs.
    let dir = work.path("hidden");
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libmemtrack.so");
    std::fs::copy(&stub_lib, &lib).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c"]).arg(format!(
        "mount -t tmpfs none '{}' && exec '{}' wait",
        dir.display(),
        exe.display()
    ));
    let t = start(cmd);
    assert_refused(
        &lib,
        t.pid(),
        &[],
        &format!("the process runs in another mount namespace (a container), where {} is not this library", lib.display()),
        "run memtrack inside the container, or from a sidecar sharing its process namespace (kubectl debug -it POD --image=IMG --target=CONTAINER) with libmemtrack.so at the same path in the target (MEMTRACK_PRELOAD names the path)",
    );
}

#[test]
fn refuses_a_process_recorded_by_memtrack_run() {
    let work = Work::new("attach-under-run");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.args(["run", "-o"])
        .arg(work.path("run.cap"))
        .arg("--")
        .arg(&exe)
        .arg("wait")
        .env_remove("MEMTRACK_PRELOAD");
    let t = start(cmd);
    let pid = child_of(t.pid() as u32);
    let _kill = KillPid(pid);
    assert_refused(
        &lib,
        pid,
        &[],
        "the process is already being recorded: it was started under `memtrack run` (its LD_PRELOAD names libmemtrack.so)",
        "report on the capture `memtrack run` writes; it records until the process exits",
    );
}

/// A refusal for want of ptrace permission, checked as root only: the target started in
/// `mode`, memtrack run through `wrapper`; `reason` is given the target's pid.
fn assert_ptrace_refused(name: &str, mode: &str, wrapper: &[&str], reason: impl Fn(i32) -> String) {
    let work = Work::new(name);
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("not root: the permission refusal is checked only as root");
        return;
    }
    let t = target(&exe, mode);
    let pid = t.pid();
    assert_refused(
        &lib,
        pid,
        wrapper,
        &reason(pid),
        &format!("run memtrack as the process's user or as root (sudo memtrack attach {pid}); in a container, add the SYS_PTRACE capability (docker run --cap-add=SYS_PTRACE, or securityContext.capabilities.add: [SYS_PTRACE])"),
    );
}

#[test]
fn refuses_without_ptrace_permission() {
    // The fixture is root's and memtrack runs as nobody, who must be able to reach the library
    // and the binary.
    assert_ptrace_refused(
        "attach-eperm",
        "wait",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        |_| {
            "ptrace is not permitted: the process runs as uid 0, memtrack as uid 65534 without CAP_SYS_PTRACE".to_string()
        },
    );
}

/// What a capture of `attach_loop.c` holds whatever the window: the loop keeps 64 blocks live
/// (each freed 64 iterations after its allocation), so the 64 live at the attach are freed in
/// the window as blocks made before it, and 64 recorded ones (63 when the stop cuts an
/// iteration between its free and its malloc) are live at the stop.
/// Starts `attach_loop`, and lets it fill its ring of 64 blocks before an attach.
fn loop_target(work: &Work) -> Started {
    let exe = work.compile("attach_loop.c");
    let t = start(Command::new(&exe));
    std::thread::sleep(Duration::from_millis(300));
    t
}

fn assert_loop_window(cap: &Path, seconds: std::ops::Range<f64>) -> u64 {
    let s = summary_json(cap);
    assert_eq!(s["attached"]["how"], "attach", "{s:#}");
    assert_eq!(s["attached"]["frees_of_earlier_blocks"], 64, "{s:#}");
    assert_eq!(s["end_reason"], "detach", "{s:#}");
    assert!(json_bool(&s, "complete"));
    let total = json_u64(&s, "total_allocations");
    // 64 live at the stop, or 63 when the stop came between an iteration's free and its
    // malloc: the loop wakes from its 1 ms sleep on the same timer ticks as the writer that
    // applies the stop, so that moment is not rare (seen twice in one run of the suite).
    let leaked = json_u64(&s, "leaked_allocations");
    assert!((63..=64).contains(&leaked), "{leaked} live at the stop");
    assert_eq!(json_u64(&s, "peak_allocations"), 64);
    assert_eq!(json_u64(&s, "total_frees"), total - leaked);
    let d = s["duration_seconds"].as_f64().unwrap();
    assert!(seconds.contains(&d), "recorded for {d} s");
    // One allocation a millisecond at most.
    assert!(
        (64..=(d * 1000.0) as u64).contains(&total),
        "{total} allocations in {d} s"
    );
    total
}

/// `memtrack attach PID -o CAPTURE --duration SECONDS EXTRA...`, which must succeed.
fn attach_ok(pid: i32, cap: &Path, seconds: &str, extra: &[&str]) -> Output {
    let pid = pid.to_string();
    let mut args = vec![
        "attach",
        &pid,
        "-o",
        cap.to_str().unwrap(),
        "--duration",
        seconds,
    ];
    args.extend_from_slice(extra);
    let out = memtrack(&binaries().preload, &args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    out
}

/// [`attach_ok`] on a fresh loop target. Returns the target, still running, the capture and
/// the command's output.
fn attach_loop(
    work: &Work,
    capture: &str,
    seconds: &str,
    extra: &[&str],
) -> (Started, PathBuf, Output) {
    let t = loop_target(work);
    let cap = work.path(capture);
    let out = attach_ok(t.pid(), &cap, seconds, extra);
    (t, cap, out)
}

#[test]
fn attach_records_a_running_loop_for_its_duration() {
    let work = Work::new("attach-e2e");
    let (t, cap, out) = attach_loop(&work, "loop.cap", "2", &[]);
    let err = stderr(&out);
    let total = assert_loop_window(&cap, 1.9..2.5);
    assert!(
        err.contains(&format!(
            "memtrack: capture written to {}: {} allocations",
            cap.display(),
            memtrack_reader::grouped(total)
        )),
        "{err}"
    );
    let (rest, code) = t.finish();
    assert_eq!(rest, "done\n");
    assert_eq!(code, Some(3));
}

/// `--encoding fast` reaches the library (`START_FAST`): every chunk is `EVENTS_S`, with the
/// loop's exact window as in the compact encoding.
#[test]
fn attach_records_in_the_fast_encoding() {
    let work = Work::new("attach-e2e-fast");
    let (t, cap, _) = attach_loop(&work, "loop.cap", "1", &["--encoding", "fast"]);
    assert_loop_window(&cap, 0.9..1.5);
    let c = open_capture(&cap);
    assert!(!c.chunks.is_empty());
    assert!(c
        .chunks
        .iter()
        .all(|ch| ch.compact == Some(memtrack_reader::ColumnEncoding::ZstdStream)));
    let (rest, code) = t.finish();
    assert_eq!(rest, "done\n");
    assert_eq!(code, Some(3));
}

#[test]
fn detach_ends_a_recording_and_a_second_attach_records_again() {
    let work = Work::new("attach-e2e-detach");
    let lib = binaries().preload.clone();
    let t = loop_target(&work);
    let pid = t.pid();
    let first = work.path("first.cap");
    let attach = spawn_attach(&lib, pid, &first);
    std::thread::sleep(Duration::from_millis(1000));
    let again = memtrack(
        &lib,
        &["attach", &pid.to_string(), "-o", "/tmp/never.cap"],
        &[],
    );
    assert!(
        stderr(&again)
            .contains("the process is already being recorded (by an earlier `memtrack attach`)"),
        "{}",
        stderr(&again)
    );
    assert_eq!(again.status.code(), Some(2));
    let out = memtrack(&lib, &["detach", &pid.to_string()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let attach = wait_output(attach, "memtrack attach");
    assert_eq!(attach.status.code(), Some(0), "{}", stderr(&attach));
    assert_loop_window(&first, 0.5..3.0);

    // The library stays loaded, its recording over: a new attach starts a new one.
    let second = work.path("second.cap");
    let out = memtrack(
        &lib,
        &[
            "attach",
            &pid.to_string(),
            "-o",
            second.to_str().unwrap(),
            "--duration",
            "1",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_loop_window(&second, 0.9..1.5);
    let (rest, code) = t.finish();
    assert_eq!(rest, "done\n");
    assert_eq!(code, Some(3));
}

#[test]
fn a_process_that_exits_while_recorded_leaves_a_complete_capture() {
    let work = Work::new("attach-e2e-exit");
    let lib = binaries().preload.clone();
    let t = loop_target(&work);
    let pid = t.pid();
    let cap = work.path("exit.cap");
    // Without --duration: attach waits for the process, which ends after its 5 s.
    let attach = spawn_attach(&lib, pid, &cap);
    let (rest, code) = t.finish();
    assert_eq!(rest, "done\n");
    assert_eq!(code, Some(3));
    let out = wait_output(attach, "memtrack attach");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "memtrack: process {pid} exited while recording; the capture holds what it wrote until then\n"
        )),
        "{err}"
    );
    // The loop frees every block before it returns.
    let s = summary_json(&cap);
    assert_eq!(s["attached"]["frees_of_earlier_blocks"], 64, "{s:#}");
    assert_eq!(s["end_reason"], "exit", "{s:#}");
    assert_eq!(json_u64(&s, "leaked_allocations"), 0);
    assert_eq!(
        json_u64(&s, "total_frees"),
        json_u64(&s, "total_allocations")
    );
}

#[test]
fn attach_to_python_shows_python_frames() {
    for py in pythons() {
        let work = py.work("attach-py");
        let lib = binaries().preload.clone();
        let mut cmd = Command::new(&py.program);
        cmd.arg(fixtures_dir().join("attach_py.py"));
        let t = start(cmd);
        std::thread::sleep(Duration::from_millis(500));
        let cap = work.path("py.cap");
        let out = memtrack(
            &lib,
            &[
                "attach",
                &t.pid().to_string(),
                "-o",
                cap.to_str().unwrap(),
                "--duration",
                "2",
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let table = memtrack_ok(|c| {
            c.arg("table")
                .arg(&cap)
                .args(["--by", "stack", "--python-only", "--top", "1"]);
        });
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table.contains("grow (attach_py.py:6) <- <module> (attach_py.py:12)"),
            "{table}"
        );
        let (rest, code) = t.finish();
        assert_eq!(rest, "done\n");
        assert_eq!(code, Some(3));
    }
}

#[test]
fn attach_to_busy_threads_chooses_a_running_one() {
    let work = Work::new("attach-threads");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, "threads");
    std::thread::sleep(Duration::from_millis(500));
    // The main thread waits in pthread_join, inside the C library (a futex, not an idle
    // call): a worker running its own code is held instead.
    let tid = attach_briefly(&work, &lib, t.pid());
    assert_ne!(tid, t.pid());
    let (rest, code) = t.finish();
    assert_eq!(rest, "busy state kept: yes\nbusy state kept: yes\n");
    assert_eq!(code, Some(3));
}

#[test]
fn refuses_when_seccomp_blocks_dlopen_and_leaves_the_loader_usable() {
    let work = Work::new("attach-seccomp");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let mut t = target(&exe, "seccomp");
    let pid = t.pid();
    std::thread::sleep(Duration::from_millis(200));
    assert_refused(
        &lib,
        pid,
        &[],
        &format!(
            "a seccomp filter blocks system calls dlopen makes (the thread got SIGSYS; dlopen failed: {}: cannot open shared object file: Operation not permitted)",
            lib.display()
        ),
        "run the program under `memtrack run`, or without that seccomp filter (docker: --security-opt seccomp=unconfined)",
    );
    // dlopen returned through its error path: the loader's lock is free for another thread.
    t.child
        .0
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let (rest, code) = t.finish();
    assert_eq!(rest, "dlopen in a thread: ok\n");
    assert_eq!(code, Some(3));
}

#[test]
fn detach_without_permission_is_refused() {
    let work = Work::new("detach-eperm");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("not root: the permission refusal is checked only as root");
        return;
    }
    let t = target(&exe, "wait");
    let pid = t.pid();
    let out = memtrack(
        &lib,
        &["detach", &pid.to_string()],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    assert_eq!(
        stderr(&out),
        format!(
            "memtrack: cannot detach from {pid}: ptrace is not permitted (cannot read /proc/{pid}/maps: Permission denied (os error 13))\n\
             fix: run memtrack as the process's user or as root (sudo memtrack detach {pid}); in a container, add the SYS_PTRACE capability (docker run --cap-add=SYS_PTRACE, or securityContext.capabilities.add: [SYS_PTRACE])\n"
        )
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn attach_with_gdb_records_the_loop_and_reports_refusals() {
    let work = Work::new("attach-gdb");
    let (t, cap, _) = attach_loop(&work, "gdb.cap", "1", &["--method", "gdb"]);
    assert_loop_window(&cap, 0.9..1.5);
    let (rest, code) = t.finish();
    assert_eq!(rest, "done\n");
    assert_eq!(code, Some(3));

    // The library's reason comes back through gdb too.
    let stub_lib = stub(&work);
    let t = target(&work.compile("attach_target.c"), "wait");
    let pid = t.pid();
    let out = memtrack(
        &stub_lib,
        &[
            "attach",
            &pid.to_string(),
            "-o",
            "/tmp/refuse-gdb.cap",
            "--method",
            "gdb",
        ],
        &[],
    );
    assert_eq!(
        stderr(&out),
        format!(
            "memtrack: cannot attach to {pid}: the library refused to start: stub refuses this path\n\
             fix: see the reason; `memtrack detach` stops an earlier recording\n"
        )
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn refuses_a_process_that_is_not_dumpable_without_cap_sys_ptrace() {
    // Same user (root), but memtrack runs without CAP_SYS_PTRACE.
    assert_ptrace_refused(
        "attach-nodump",
        "nodump",
        &["setpriv", "--bounding-set=-sys_ptrace"],
        |pid| {
            format!("ptrace is not permitted (/proc/{pid}/exe is unreadable to memtrack: a process that is not dumpable, such as a set-user-ID one, needs CAP_SYS_PTRACE)")
        },
    );
}

/// The exact window: `attach_window` logs, for each call, whether it went through the hook
/// (it calls through the value its GOT slot holds at that moment). The capture holds exactly
/// the hooked calls: every allocation, its size, and the frees, matched or of earlier blocks.
#[test]
fn attach_records_exactly_the_calls_made_through_the_hooks() {
    let s = attach_to_the_window(&[]);
    assert_eq!(s["aggregated"], serde_json::Value::Null, "{s:#}");
}

/// Aggregated by the tracker, the attached recording's figures are as exact.
#[test]
fn attach_aggregated_records_exactly_the_same() {
    let s = attach_to_the_window(&["--aggregate", "--checkpoint-interval", "500ms"]);
    assert_eq!(s["aggregated"], true, "{s:#}");
    assert_eq!(s["checkpoint_final"], true, "{s:#}");
}

/// Attaches to `attach_window` for 2 s with `extra` arguments and checks the capture against
/// the calls it logged; returns its summary.
fn attach_to_the_window(extra: &[&str]) -> serde_json::Value {
    let work = Work::new("attach-window");
    let exe = work.compile("attach_window.c");
    let log = work.path("calls.log");
    let mut cmd = Command::new(&exe);
    cmd.arg(&log).arg("5");
    let t = start(cmd);
    std::thread::sleep(Duration::from_millis(500));
    let cap = work.path("window.cap");
    attach_ok(t.pid(), &cap, "2", extra);
    let (rest, code) = t.finish();
    assert_eq!(code, Some(3));

    // The log: "m I SIZE HOOKED T_US" and "f I HOOKED T_US".
    let text = std::fs::read_to_string(&log).unwrap();
    let (mut hooked_allocs, mut hooked_bytes, mut all_bytes) = (0u64, 0u64, 0u64);
    let (mut matched_frees, mut earlier_frees) = (0u64, 0u64);
    let mut hooked_block = std::collections::HashMap::new();
    let (mut first, mut last) = (u64::MAX, 0u64);
    let mut after_detach = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "m" => {
                let (size, hooked): (u64, bool) = (f[2].parse().unwrap(), f[3] == "1");
                let t: u64 = f[4].parse().unwrap();
                all_bytes += size;
                hooked_block.insert(f[1].to_string(), hooked);
                if hooked {
                    hooked_allocs += 1;
                    hooked_bytes += size;
                    first = first.min(t);
                    last = last.max(t);
                } else if hooked_allocs > 0 {
                    after_detach += 1;
                }
            }
            "f" if f[2] == "1" => {
                if hooked_block[f[1]] {
                    matched_frees += 1;
                } else {
                    earlier_frees += 1;
                }
            }
            _ => {}
        }
    }
    assert_eq!(rest, format!("checksum {all_bytes}\n"));
    assert!(hooked_allocs > 500, "{hooked_allocs} hooked calls");
    assert!(
        after_detach > 500,
        "the slots were not put back: {after_detach} calls after"
    );
    let span = (last - first) as f64 / 1e6;
    assert!((1.8..2.2).contains(&span), "hooked for {span} s");

    let s = summary_json(&cap);
    assert_eq!(json_u64(&s, "total_allocations"), hooked_allocs, "{s:#}");
    assert_eq!(json_u64(&s, "total_bytes"), hooked_bytes, "{s:#}");
    assert_eq!(json_u64(&s, "total_frees"), matched_frees, "{s:#}");
    assert_eq!(
        json_u64(&s["attached"], "frees_of_earlier_blocks"),
        earlier_frees,
        "{s:#}"
    );
    assert!(
        s["overlapping_allocations"].is_null() || s["overlapping_allocations"] == 0,
        "{s:#}"
    );
    assert_eq!(
        json_u64(&s, "leaked_allocations"),
        hooked_allocs - matched_frees,
        "{s:#}"
    );
    s
}

/// The sampling and aggregation options reach the library's `memtrack_start_with`.
#[test]
fn attach_passes_sampling_and_aggregation_to_the_library() {
    let work = Work::new("attach-how");
    let lib = stub(&work);
    let exe = work.compile("attach_target.c");
    let t = target(&exe, "sleep");
    let log = work.path("how.log");
    let pid = t.pid().to_string();
    let out = memtrack(
        &lib,
        &[
            "attach",
            &pid,
            "-o",
            log.to_str().unwrap(),
            "--duration",
            "0.3",
            "--sample-rate",
            "64KiB",
            "--sample-seed",
            "3",
            "--aggregate",
            "--checkpoint-interval",
            "2s",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap()
            .ends_with(" rate=65536 seed=4 checkpoints=2000"),
        "{text}"
    );
    drop(t);
}
