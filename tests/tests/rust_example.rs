//! The Rust example (`examples/sessions`) records itself through `memtrack_tracker::Tracker`, in
//! both ways (`start(path)` and `MEMTRACK_OUTPUT`), and every report reads its capture with the
//! program's known figures and demangled Rust names. Run under `memtrack run` instead, the
//! preload library records it and the in-process tracker stands down: no event is counted twice.
use memtrack_tests::*;
use std::process::Command;

/// Bytes of a folded export whose stack passes through `function`.
fn folded_bytes(capture: &std::path::Path, view: &str, function: &str) -> u64 {
    let out = memtrack_ok(|c| {
        c.args(["export", "--format", "folded", view]).arg(capture);
    });
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(stack, _)| stack.split(';').any(|f| f == function))
        .map(|(_, b)| b.parse::<u64>().unwrap())
        .sum()
}

fn run_sessions(cmd: &mut Command) {
    let out = cmd.output().expect("run the sessions example");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("sessions: 128 open"), "{stdout}");
}

#[test]
fn start_guard_records_exactly_the_session() {
    let work = Work::new("rust-start");
    let cap = work.path("sessions.cap");
    run_sessions(Command::new(&binaries().sessions).arg("--record").arg(&cap));
    // The truth stated in examples/sessions/src/main.rs.
    assert_figures(
        &cap,
        Figures {
            peak_bytes: 2_105_344,
            peak_allocations: 258,
            leaked_bytes: 533_480,
            leaked_allocations: 139,
            total_allocations: 268,
            total_bytes: 2_106_344,
            total_frees: 129,
        },
    );
    assert_eq!(
        folded_bytes(&cap, "--peak", "sessions::open_session"),
        1 << 20
    );
    assert_eq!(
        folded_bytes(&cap, "--peak", "sessions::render_report"),
        1 << 20
    );
    assert_eq!(
        folded_bytes(&cap, "--leaks", "sessions::remember_forever"),
        1000
    );
    assert_eq!(
        folded_bytes(&cap, "--leaks", "sessions::open_session"),
        128 * 4096
    );

    // The allocating functions are the program's, past Rust's Vec/RawVec/alloc frames.
    let out = memtrack_ok(|c| {
        c.args(["table", "--json"]).arg(&cap);
    });
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().expect("an array of rows");
    let named: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["function"].as_str().unwrap(),
                r["total_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        named,
        vec![
            ("sessions::open_session", 1 << 20),
            ("sessions::render_report", 1 << 20),
            ("sessions::main", 8192)
        ],
        "{rows:#?}"
    );

    memtrack_ok(|c| {
        c.arg("flamegraph")
            .arg(&cap)
            .arg("-o")
            .arg(work.path("s.svg"));
    });
    let svg = std::fs::read_to_string(work.path("s.svg")).unwrap();
    for name in [
        "sessions::open_session",
        "sessions::render_report",
        "sessions::main",
    ] {
        assert!(svg.contains(name), "{name} missing from the flamegraph");
    }
}

#[test]
fn memtrack_output_records_the_whole_run_and_preload_is_not_doubled() {
    let work = Work::new("rust-env");
    let env_cap = work.path("env.cap");
    run_sessions(Command::new(&binaries().sessions).env("MEMTRACK_OUTPUT", &env_cap));
    let preload_cap = work.path("preload.cap");
    let out = memtrack_ok(|c| {
        c.arg("run")
            .arg("-o")
            .arg(&preload_cap)
            .arg("--")
            .arg(&binaries().sessions);
    });
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sessions: 128 open"));
    for cap in [&env_cap, &preload_cap] {
        let json = summary_json(cap);
        assert_eq!(json["complete"], true, "{}", cap.display());
        assert_eq!(json["end_reason"], "exit");
        assert_eq!(json["unmatched_frees"], 0, "{}", cap.display());
        assert_eq!(json["overlapping_allocations"], 0);
        assert_eq!(
            folded_bytes(cap, "--peak", "sessions::open_session"),
            1 << 20
        );
        assert_eq!(
            folded_bytes(cap, "--allocated", "sessions::open_session"),
            1 << 20
        );
        assert_eq!(
            folded_bytes(cap, "--allocated", "sessions::render_report"),
            1 << 20
        );
        assert_eq!(
            folded_bytes(cap, "--leaks", "sessions::remember_forever"),
            1000
        );
        // The sessions left open are freed when main returns, before exit.
        assert_eq!(folded_bytes(cap, "--leaks", "sessions::open_session"), 0);
    }
}
