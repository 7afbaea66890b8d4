//! `memtrack live` (issue 22): the follower against captures that grow in steps, and the
//! terminal view driven in tmux against a running fixture (`live_grow.c`: one 1 MiB block per
//! 300 ms from `live_view_grows_here`).

use memtrack_reader::{Capture, Follower, Horizon, Replayed, SiteTotal};
use memtrack_tests::*;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Offsets just past each record of a capture's bytes.
fn record_ends(data: &[u8]) -> Vec<usize> {
    let (_, mut off) = memtrack_format::Header::decode(data).unwrap();
    let mut ends = Vec::new();
    while let memtrack_format::Next::Record(r) = memtrack_format::next_record(data, off) {
        off = r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
        ends.push(off);
    }
    ends
}

/// Feeds `capture` to a follower in steps (half of each record, then the rest): after each
/// record its figures are those of a full read of the same prefix up to the last event it
/// applied (all of it once the capture is finished), and nothing arrived out of order.
fn grows_in_steps(work: &Work, capture: &Path) {
    let data = std::fs::read(capture).unwrap();
    let name = capture.file_name().unwrap().to_string_lossy().into_owned();
    let growing = work.path(&format!("{name}.growing"));
    let prefix = work.path(&format!("{name}.prefix"));
    let (_, first) = memtrack_format::Header::decode(&data).unwrap();
    std::fs::write(&growing, &data[..first]).unwrap();
    let mut f = Follower::open(&growing).unwrap();
    let mut written = first;
    let ends = record_ends(&data);
    assert!(ends.len() > 3, "{name}: {} records", ends.len());
    let mut compared = 0;
    for (i, &end) in ends.iter().enumerate() {
        for step in [written + (end - written) / 2, end] {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&growing)
                .unwrap();
            std::io::Write::write_all(&mut file, &data[written..step]).unwrap();
            written = step;
            // Only events whose every predecessor is in (the file's times are too short to bridge).
            f.poll(Horizon::Safe, 1 << 20).unwrap();
        }
        assert_eq!(f.offset() as usize, end, "{name}: record {i}");
        if f.replay().events == 0 && !f.finished() {
            continue;
        }
        std::fs::write(&prefix, &data[..end]).unwrap();
        let full = Capture::open(&prefix).unwrap();
        let until = if f.finished() {
            u64::MAX
        } else {
            f.replay().last_seq
        };
        let Replayed { replay, stacks, .. } = full.replay_until(until);
        let r = f.replay();
        let what = format!("{name} after record {i} (offset {end})");
        assert_eq!(r.events, replay.events, "{what}");
        assert_eq!(r.live_bytes, replay.live_bytes, "{what}");
        assert_eq!(r.live_allocations(), replay.live_allocations(), "{what}");
        assert_eq!(r.peak_bytes, replay.peak_bytes, "{what}");
        assert_eq!(r.total_allocations, replay.total_allocations, "{what}");
        assert_eq!(r.total_bytes, replay.total_bytes, "{what}");
        assert_eq!(r.total_frees, replay.total_frees, "{what}");
        assert_eq!(r.unmatched_frees, replay.unmatched_frees, "{what}");
        // Per stack (the live figures keep no largest block).
        let whole: Vec<SiteTotal> = replay
            .live_by_stack()
            .into_iter()
            .map(|s| SiteTotal { max: 0, ..s })
            .collect();
        assert_eq!(f.live_sites(), whole, "{what}");
        for s in f.live_sites() {
            assert_eq!(f.stacks().frames(s.stack), stacks.frames(s.stack), "{what}");
        }
        assert_eq!(f.capture().modules.len(), full.modules.len(), "{what}");
        assert_eq!(f.capture().pycode.len(), full.pycode.len(), "{what}");
        let last = full
            .end
            .is_some_and(|e| e.reason != memtrack_format::EndReason::Exec);
        assert_eq!(f.finished(), last, "{what}");
        compared += 1;
    }
    assert_eq!(written, data.len());
    assert!(f.finished(), "{name}");
    assert_eq!(f.late_events, 0, "{name}");
    assert!(compared >= 2, "{name}: {compared} steps compared");
    // The end state is the whole capture's.
    let whole = Capture::open(capture).unwrap().summary().unwrap();
    assert_eq!(f.replay().peak_bytes, whole.peak_bytes, "{name}");
    assert_eq!(f.replay().live_bytes, whole.leaked_at_exit_bytes, "{name}");
    assert_eq!(f.replay().total_allocations, whole.total_allocations);
}

#[test]
fn a_capture_followed_as_it_grows_matches_a_full_read_of_each_prefix() {
    let work = Work::new("live-follow");
    // Stored captures: threads, an exec chain, a Python program; the fast encoding's too.
    let stored = workspace_root().join("tests/captures");
    for name in [
        "v4-threads.cap",
        "v4-exec-chain.cap",
        "v3-python.cap",
        "v5-threads.cap",
        "v5-exec-chain.cap",
    ] {
        grows_in_steps(&work, &stored.join(name));
    }
    // A fresh one of five threads freeing each other's blocks, in many chunks.
    let exe = work.compile("threads.c");
    let t = run_traced_ok(&work, "threads.cap", &exe, &["20000"]);
    let cap = open_capture(&t.capture);
    assert!(cap.chunks.len() > 20, "{} chunks", cap.chunks.len());
    assert_eq!(cap.threads, 5);
    grows_in_steps(&work, &t.capture);
}

/// tmux, or None (the test is skipped) when it is not installed outside CI.
fn tmux() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("tmux"))
            .find(|t| t.is_file())
    });
    if found.is_none() {
        // CI installs it (.ci/run): there, its absence is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "tmux is not installed in CI"
        );
        eprintln!("tmux not installed here: skipped (install Debian's tmux to run it)");
    }
    found
}

/// A tmux server of its own (not the user's), killed on drop.
struct Tmux {
    exe: PathBuf,
    socket: String,
}

impl Tmux {
    /// Starts `command` (a shell command line) in a 120x40 window.
    fn start(exe: PathBuf, name: &str, command: &str) -> Tmux {
        let t = Tmux {
            exe,
            socket: format!("memtrack-test-{}-{name}", std::process::id()),
        };
        let st = t
            .cmd()
            .args(["new-session", "-d", "-x", "120", "-y", "40", command])
            .status()
            .unwrap();
        assert!(st.success(), "tmux new-session: {st:?}");
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(["-L", &self.socket, "-f", "/dev/null"])
            .env_remove("TMUX")
            .env("TERM", "xterm-256color");
        c
    }

    fn screen(&self) -> String {
        let out = self.cmd().args(["capture-pane", "-p"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let st = self.cmd().args(["send-keys", keys]).status().unwrap();
        assert!(st.success());
    }

    /// Waits until `f` holds for the screen (or panics after `limit`, with the screen).
    fn wait_for(&self, limit: Duration, what: &str, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "after {limit:?}, no {what} on the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// The heap figure of the view (`heap 5.00 MiB`), in MiB.
fn heap_mib(screen: &str) -> Option<f64> {
    let rest = &screen[screen.find("heap ")? + 5..];
    rest.strip_prefix(|c: char| c == '+' || c == '-')
        .unwrap_or(rest)
        .split(" MiB")
        .next()?
        .parse()
        .ok()
}

/// Waits for a file written by the shell in tmux when memtrack ended: its exit status.
fn status_in(path: &Path) -> i32 {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s.trim().parse().unwrap();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "memtrack did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

#[test]
fn live_view_shows_the_top_location_and_the_growing_heap_within_two_seconds() {
    let Some(tmux) = tmux() else { return };
    let work = Work::new("live-tmux");
    let exe = work.compile("live_grow.c");
    let capture = work.path("grow.cap");
    let b = binaries();
    // Started with the shim directly: its standard output tells when each block is allocated.
    let child = shim_command(&exe, &capture)
        .arg("200")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let k: u64 = line.trim().parse().unwrap();
            if tx.send((k, Instant::now())).is_err() {
                return;
            }
        }
    });
    // The first block: the capture has its header.
    let (k0, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(k0, 1);

    let status = work.path("status");
    let session = Tmux::start(
        tmux,
        "live",
        &format!(
            "{} live {}; echo $? > {}; sleep 60",
            sh_quote(&b.memtrack),
            sh_quote(&capture),
            sh_quote(&status)
        ),
    );
    session.wait_for(Duration::from_secs(5), "view", |s| {
        s.contains("memtrack live")
    });
    let started = Instant::now();
    // Blocks allocated from now on: each is on the screen within 2 s (the heap figure at least
    // that many MiB, the location named), the growth since the view started counted.
    let mut checked = 0;
    let mut worst = Duration::ZERO;
    while checked < 6 {
        let (k, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        if at < started {
            continue;
        }
        let screen = session.wait_for(
            Duration::from_secs(2).saturating_sub(at.elapsed()),
            &format!(
                "heap of {k} MiB (block {k}, allocated {:?} ago)",
                at.elapsed()
            ),
            |s| heap_mib(s).is_some_and(|h| h >= k as f64) && s.contains("live_view_grows_here"),
        );
        worst = worst.max(at.elapsed());
        // The table's top row: the fixture's function, holding every block.
        let row = screen
            .lines()
            .find(|l| l.contains("live_view_grows_here"))
            .unwrap();
        assert!(row.contains(" MiB"), "{row}");
        assert!(
            screen.contains("since the view started: heap +"),
            "{screen}"
        );
        assert!(screen.contains("running"), "{screen}");
        checked += 1;
    }
    eprintln!("slowest block to show: {worst:?}");
    // Keys: allocated since the view started, by line; then q.
    session.keys("a");
    session.wait_for(Duration::from_secs(2), "allocated view", |s| {
        s.contains("allocated since the view started")
    });
    session.keys("b");
    let s = session.wait_for(Duration::from_secs(2), "line view", |s| {
        s.contains("live_view_grows_here (live_grow.c:")
    });
    assert!(s.contains("by line"), "{s}");
    session.keys("q");
    assert_eq!(status_in(&status), 0);
    // The fixture runs on: q leaves the view only.
    assert!(child.0.try_wait().unwrap().is_none());
}

#[test]
fn run_live_passes_the_exit_code_through_and_keeps_the_output() {
    let Some(tmux) = tmux() else { return };
    let work = Work::new("run-live");
    let exe = work.compile("live_grow.c");
    let capture = work.path("run.cap");
    let output = work.path("run.out");
    let status = work.path("status");
    let b = binaries();
    let session = Tmux::start(
        tmux,
        "run",
        &format!(
            "cd {} && {} run --live --live-output {} -o {} -- {} 5 7; echo $? > {}; sleep 60",
            sh_quote(work.dir()),
            sh_quote(&b.memtrack),
            sh_quote(&output),
            sh_quote(&capture),
            sh_quote(&exe),
            sh_quote(&status)
        ),
    );
    // The command ends after 5 blocks (1.5 s); the view stays with its last state until q.
    let s = session.wait_for(Duration::from_secs(10), "end of the command", |s| {
        s.contains("ended (exit code 7)")
    });
    assert_eq!(heap_mib(&s), Some(5.0), "{s}");
    assert!(s.contains("live_view_grows_here"), "{s}");
    assert!(
        s.contains(&format!(
            "the command's output goes to {}",
            output.display()
        )),
        "{s}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!status.exists(), "the view waits for q");
    session.keys("q");
    assert_eq!(status_in(&status), 7);
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "1\n2\n3\n4\n5\n");
    let json = summary_json(&capture);
    assert_eq!(json_u64(&json, "leaked_bytes"), 5 << 20, "{json}");
}
