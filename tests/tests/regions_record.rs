//! Recording regions (issue 21): the marks `include/memtrack.h` writes, read back from the
//! capture in sequence order with each thread's allocations. `regions_pipeline.c` documents the
//! figures; here the raw marks are checked: names, begin and end order per thread, nesting, and
//! the begins left without an end by `exit`, a thread's exit and SIGKILL.

use memtrack_tests::*;
use std::path::Path;

fn tokens(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// load_index, then search_batch three times (1, 2, 3 MB held) with rank nested in each.
fn pipeline() -> Vec<String> {
    let mut want = tokens(&["B load_index", "A 3000000", "E"]);
    for k in 1..=3 {
        want.push("B search_batch".into());
        want.push(format!("A {}", k * 1_000_000));
        want.extend(tokens(&["B rank", "A 500000", "F", "E", "F", "E"]));
    }
    want
}

/// The main thread's stream: the pipeline, then `at_exit` left open (with, in the thread mode,
/// pthread_create's own allocation between them).
fn assert_main_thread(main: &[String], exe: &Path) {
    let s = from_first_mark(main);
    let want = pipeline();
    assert_eq!(s[..want.len()], want[..], "{}", exe.display());
    let rest = &s[want.len()..];
    // Nothing ends at_exit: exit() leaves it open.
    assert_eq!(marks_only(rest), ["B at_exit"], "{}", exe.display());
    let at = rest.iter().position(|t| t == "B at_exit").unwrap();
    assert_eq!(rest[at + 1], "A 250000", "{}", exe.display());
}

#[test]
fn c_pipeline_marks_nest_and_interleave_with_allocations_pie_and_non_pie_c_and_cxx() {
    let work = Work::new("regions-record");
    let builds = [
        ("pie", &["-O1"][..]),
        ("nopie", &["-O1", "-no-pie", "-fno-pie"][..]),
        ("cxx", &["-O1", "-x", "c++", "-fno-exceptions"][..]),
        (
            "cxx-nopie",
            &["-O0", "-x", "c++", "-fno-exceptions", "-no-pie", "-fno-pie"][..],
        ),
    ];
    for (name, flags) in builds {
        let exe = work.compile_with("regions_pipeline.c", Some(name), flags);
        // Without memtrack the marks do nothing.
        run_plain(&exe, &[] as &[&str]).assert_success(name);
        let t = run_traced_ok(&work, &format!("{name}.cap"), &exe, &[] as &[&str]);
        let cap = open_capture(&t.capture);
        assert!(cap.complete());
        assert_eq!(
            region_names(&cap),
            ["at_exit", "load_index", "rank", "search_batch"]
        );
        let s = thread_streams(&cap);
        let marked: Vec<_> = s
            .iter()
            .filter(|(_, v)| v.iter().any(|t| t.starts_with("B ")))
            .collect();
        assert_eq!(marked.len(), 1, "{name}: one thread marks");
        assert_main_thread(marked[0].1, &exe);
    }
}

#[test]
fn a_second_thread_marks_its_own_regions_and_exits_with_one_open() {
    let work = Work::new("regions-record-thread");
    let exe = work.compile("regions_pipeline.c");
    let t = run_traced_ok(&work, "thread.cap", &exe, &["thread"]);
    let cap = open_capture(&t.capture);
    assert_eq!(
        region_names(&cap),
        [
            "at_exit",
            "load_index",
            "rank",
            "search_batch",
            "worker",
            "worker_tail"
        ]
    );
    let s = thread_streams(&cap);
    let pid = cap.header.pid;
    assert_main_thread(&s[&pid], &exe);
    let others: Vec<_> = s
        .iter()
        .filter(|(&tid, v)| tid != pid && v.iter().any(|t| t.starts_with("B ")))
        .collect();
    assert_eq!(others.len(), 1);
    let w = from_first_mark(others[0].1);
    let want = tokens(&[
        "B worker",
        "A 700000",
        "F",
        "E",
        "B worker_tail",
        "A 100000",
    ]);
    assert_eq!(w[..want.len()], want[..]);
    // The thread exited with worker_tail open.
    assert_eq!(marks_only(&w[want.len()..]), Vec::<&str>::new());
}

#[test]
fn sigkill_leaves_the_open_region_without_an_end() {
    let work = Work::new("regions-record-kill");
    let exe = work.compile("regions_pipeline.c");
    let t = run_traced(&work, "kill.cap", &exe, &["kill"]);
    assert_eq!(t.run.shell_status(), 128 + 9, "{}", t.run.stderr);
    let cap = open_capture(&t.capture);
    assert!(!cap.complete(), "a killed process's capture has no END");
    assert_eq!(region_names(&cap), ["doomed", "load_index"]);
    let s = thread_streams(&cap);
    let main = from_first_mark(&s[&cap.header.pid]);
    let want = tokens(&["B load_index", "A 3000000", "E", "B doomed", "A 1000000"]);
    assert_eq!(main, &want[..]);
}
