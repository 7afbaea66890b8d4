//! Recording started inside a running process: libmemtrack.so loaded with dlopen, then
//! memtrack_start / memtrack_stop (the mechanism of `memtrack attach` and `memtrack.Tracker`),
//! asserted through the captures of a C program whose allocations are known.

use memtrack_tests::{binaries, json_u64, memtrack_ok, summary_json, Work};
use std::process::Command;

fn memtrack_text(args: &[&std::ffi::OsStr]) -> String {
    String::from_utf8(
        memtrack_ok(|c| {
            c.args(args);
        })
        .stdout,
    )
    .unwrap()
}

/// Runs the fixture (built with `flags`) and checks both sessions' captures exactly.
fn two_sessions(flags: &[&str], expect_got: &str) {
    let w = Work::new("inproc");
    // The inner library sits in lib/ beside the program, found only through its RUNPATH.
    let lib_dir = w.path("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    let inner = w.compile_shared("dlopen_lib.c");
    std::fs::rename(&inner, lib_dir.join("libdlopen_lib.so")).unwrap();
    let mut flags = flags.to_vec();
    flags.push("-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib");
    let exe_rp = w.compile_with("inproc_start.c", None, &flags);
    let cap = w.path("c.cap");
    std::fs::write(&cap, b"not to be replaced").unwrap();
    let run = Command::new(&exe_rp)
        .arg(&binaries().preload)
        .arg(&cap)
        .arg("libdlopen_lib.so")
        .current_dir("/")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        run.status.code(),
        Some(3),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.ends_with("done\n"), "{stdout}");
    assert_eq!(
        stdout
            .matches("second start: this process is already being recorded")
            .count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches(&format!("got: {expect_got}\n")).count(),
        2,
        "{stdout}"
    );
    assert_eq!(std::fs::read(&cap).unwrap(), b"not to be replaced");

    for k in 0..2u64 {
        let c = w.path(&format!("c.cap.{k}"));
        let s = summary_json(&c);
        let size = 1000 + k;
        let lib = if k == 1 { 2 * 4096 } else { 0 } + 4321;
        assert_eq!(s["end_reason"], "detach", "{s:#}");
        assert_eq!(s["attached"]["how"], "in_process", "{s:#}");
        let peak = (10 * size).max(5 * size + 12 + lib);
        assert_eq!(json_u64(&s, "peak_bytes"), peak, "{s:#}");
        assert_eq!(json_u64(&s, "leaked_bytes"), 5 * size + 12 + lib, "{s:#}");
        assert_eq!(
            json_u64(&s, "leaked_allocations"),
            7 + if k == 1 { 2 } else { 0 },
            "{s:#}"
        );
        assert_eq!(
            json_u64(&s, "total_allocations"),
            12 + if k == 1 { 2 } else { 0 }
        );
        assert_eq!(json_u64(&s, "total_frees"), 5);
        assert_eq!(
            json_u64(&s["attached"], "frees_of_earlier_blocks"),
            1 - k,
            "{s:#}"
        );
        let t = memtrack_text(&[
            "table".as_ref(),
            "--leaks".as_ref(),
            "--by".as_ref(),
            "stack".as_ref(),
            c.as_ref(),
        ]);
        assert!(t.contains("work (inproc_start.c:"), "{t}");
        assert!(t.contains("dupit (inproc_start.c:"), "{t}");
        assert_eq!(t.contains("lib_site (dlopen_lib.c:"), k == 1, "{t}");
        // The 77-byte blocks after each stop are not recorded.
        assert!(!t.contains("77 B"), "{t}");
        let text = memtrack_text(&["summary".as_ref(), c.as_ref()]);
        assert!(
            text.contains("recording:      started by the program (memtrack_start) at ")
                && text.contains("allocations made before it are not included"),
            "{text}"
        );
        assert!(text.contains("live at stop:"), "{text}");
    }
}

#[test]
fn two_sessions_record_exactly_their_own_allocations() {
    two_sessions(&["-O1", "-Wl,-z,lazy,-z,norelro"], "rw-p");
}

#[test]
fn a_non_pie_program_calls_through_its_canonical_plt_entries() {
    two_sessions(&["-O1", "-no-pie", "-Wl,-z,lazy,-z,norelro"], "rw-p");
}

#[test]
fn full_relro_slots_are_read_only_again_after_the_stop() {
    two_sessions(&["-O1", "-Wl,-z,relro,-z,now"], "r--p");
}

#[test]
fn threads_allocating_while_recordings_start_and_stop() {
    let w = Work::new("inproc_threads");
    let exe = w.compile("inproc_threads.c");
    let prefix = w.path("t.cap");
    let run = Command::new(&exe)
        .arg(&binaries().preload)
        .arg(&prefix)
        .output()
        .unwrap();
    assert_eq!(
        (
            run.status.code(),
            String::from_utf8_lossy(&run.stdout).as_ref()
        ),
        (Some(0), "done\n"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut events = 0;
    for k in 0..20 {
        let s = summary_json(&w.path(&format!("t.cap.{k}")));
        assert_eq!(s["end_reason"], "detach", "{s:#}");
        // A missed free would show when its address is handed out again.
        assert_eq!(json_u64(&s, "overlapping_allocations"), 0, "{s:#}");
        // Each thread holds at most one block at any time.
        assert!(json_u64(&s, "leaked_allocations") <= 8, "{s:#}");
        assert!(json_u64(&s, "peak_allocations") <= 8, "{s:#}");
        events += json_u64(&s, "events");
    }
    assert!(events > 20_000, "only {events} events in 20 recordings");
}
