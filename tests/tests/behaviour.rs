//! The tracker must not change what a program prints or how it ends.

use memtrack_tests::*;

#[test]
fn output_and_exit_code_are_unchanged() {
    let work = Work::new("output");
    let exe = work.compile("output.c");
    let plain = run_plain(&exe, &[] as &[&str]);
    let traced = run_traced(&work, "output.cap", &exe, &[] as &[&str]);

    assert_eq!(plain.code(), Some(7), "plain run: {:?}", plain.status);
    assert_eq!(
        traced.run.code(),
        Some(7),
        "under memtrack: {:?}; stderr:\n{}",
        traced.run.status,
        traced.run.stderr
    );

    let mut expected_stdout = String::from("line one\nline two: 42\n");
    expected_stdout.push_str(&"x".repeat(10000));
    expected_stdout.push_str("\nlast line\n");
    assert_eq!(plain.stdout_text(), expected_stdout, "plain stdout");
    assert!(
        traced.run.stdout == plain.stdout,
        "stdout differs under memtrack:\n{}",
        traced.run.stdout_text()
    );

    assert_eq!(plain.stderr, "an error line\nlast error line\n");
    assert!(
        traced
            .run
            .stderr
            .lines()
            .any(|l| l.starts_with("memtrack:")),
        "memtrack said nothing on stderr: {:?}",
        traced.run.stderr
    );
    assert_eq!(
        strip_memtrack_lines(&traced.run.stderr),
        plain.stderr,
        "stderr under memtrack, without memtrack's own lines (whole stderr: {:?})",
        traced.run.stderr
    );

    // The run ended through exit(): the capture is complete.
    let json = summary_json(&traced.capture);
    assert!(json_bool(&json, "complete"), "{json}");
    assert_eq!(json["end_reason"], "exit", "{json}");
    assert_eq!(json_u64(&json, "threads"), 1, "{json}");
    // stdio's buffers for stdout and stderr are the only allocations (stderr is unbuffered
    // in glibc, so this is stdout's), never freed.
    assert!(json_u64(&json, "total_allocations") >= 1, "{json}");
    assert_eq!(json_u64(&json, "total_frees"), 0, "{json}");
}

#[test]
fn killed_by_a_signal_reports_128_plus_the_signal() {
    let work = Work::new("signals");
    let exe = work.compile("output.c");
    for (mode, signal) in [("abort", 6), ("segv", 11)] {
        let plain = run_plain(&exe, &[mode]);
        let traced = run_traced(&work, &format!("{mode}.cap"), &exe, &[mode]);
        assert_eq!(
            plain.signal(),
            Some(signal),
            "plain {mode}: {:?}",
            plain.status
        );
        assert_eq!(plain.shell_status(), 128 + signal);
        assert_eq!(
            traced.run.code(),
            Some(128 + signal),
            "memtrack run of {mode}: {:?}; stderr:\n{}",
            traced.run.status,
            traced.run.stderr
        );
        let said = format!("before {mode}\n");
        assert_eq!(plain.stdout_text(), said);
        assert_eq!(traced.run.stdout_text(), said, "{mode} under memtrack");
        assert_eq!(strip_memtrack_lines(&traced.run.stderr), plain.stderr);

        // The process died without running its exit handlers. After abort the capture was
        // finished first and says so; after SIGSEGV it is readable and says it is incomplete.
        let json = summary_json(&traced.capture);
        if mode == "abort" {
            assert!(json_bool(&json, "complete"), "{mode}: {json}");
            assert_eq!(json["end_reason"], "abort", "{mode}: {json}");
        } else {
            assert!(!json_bool(&json, "complete"), "{mode}: {json}");
            assert!(json["end_reason"].is_null(), "{mode}: {json}");
        }
        assert_eq!(json_u64(&json, "total_frees"), 0, "{mode}: {json}");
    }
}

#[test]
fn immediate_exit_is_a_complete_capture() {
    let work = Work::new("immediate_exit");
    let exe = work.compile("output.c");
    let plain = run_plain(&exe, &["_exit"]);
    let traced = run_traced(&work, "exit.cap", &exe, &["_exit"]);
    assert_eq!(plain.code(), Some(5), "{:?}", plain.status);
    assert_eq!(
        traced.run.code(),
        Some(5),
        "{:?}; stderr:\n{}",
        traced.run.status,
        traced.run.stderr
    );
    assert_eq!(plain.stdout_text(), "before _exit\n");
    assert_eq!(traced.run.stdout, plain.stdout);
    assert_eq!(strip_memtrack_lines(&traced.run.stderr), plain.stderr);

    let json = assert_figures(
        &traced.capture,
        Figures {
            peak_bytes: 96,
            peak_allocations: 2,
            leaked_bytes: 32,
            leaked_allocations: 1,
            total_allocations: 2,
            total_bytes: 96,
            total_frees: 1,
        },
    );
    assert!(json_bool(&json, "complete"), "{json}");
    assert_eq!(json["end_reason"], "_exit", "{json}");
}

#[test]
fn strip_memtrack_lines_keeps_the_programs_lines() {
    let s = "a\nmemtrack: capture written to x\nmemtrack: report on it with: memtrack summary x\n";
    assert_eq!(strip_memtrack_lines(s), "a\n");
    assert_eq!(
        strip_memtrack_lines("  indented\nmemtrack: x\nb\n  c\n"),
        "  indented\nb\n  c\n"
    );
}
