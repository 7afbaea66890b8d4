//! Names in binaries without debug information, and allocation wrappers: a stripped function is
//! not named after the exported symbol before it, and a wrapper's caller is the location.

use memtrack_tests::*;
use std::path::Path;

/// `memtrack table <capture> [extra...] --json`: (function, total bytes, count) per row.
fn table(capture: &Path, extra: &[&str]) -> Vec<(String, u64, u64)> {
    let out = memtrack_ok(|c| {
        c.arg("table").arg(capture).args(extra).arg("--json");
    });
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("table JSON");
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["function"].as_str().expect("function").to_string(),
                json_u64(r, "total_bytes"),
                json_u64(r, "count"),
            )
        })
        .collect()
}

/// The folded export of the peak has a line ending with `end`.
fn assert_folded_line(capture: &Path, end: &str) {
    let out = memtrack_ok(|c| {
        c.args(["export"])
            .arg(capture)
            .args(["--format", "folded", "--peak"]);
    });
    let folded = String::from_utf8_lossy(&out.stdout);
    assert!(folded.lines().any(|l| l.ends_with(end)), "{end}: {folded}");
}

fn rows(expected: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
    expected
        .iter()
        .map(|&(f, b, n)| (f.to_string(), b, n))
        .collect()
}

/// Flags of stripped.c: functions in source order, exported symbols kept in .dynsym.
const STRIPPED_FLAGS: &[&str] = &["-O1", "-fno-toplevel-reorder", "-rdynamic"];

#[test]
fn a_stripped_function_is_not_named_after_the_symbol_before_it() {
    let work = Work::new("symbols-stripped");
    let mut flags = STRIPPED_FLAGS.to_vec();
    flags.push("-Wl,--strip-all");
    let exe = work.compile_with("stripped.c", Some("stripped"), &flags);
    // The same code with its symbol table: where build_table starts, and that tiny_exported
    // is the symbol just before it (what the nearest-symbol rule named it).
    let full = work.compile_with("stripped.c", Some("stripped-full"), STRIPPED_FLAGS);
    let build_table = function_range(&full, "build_table");
    let tiny = function_range(&full, "tiny_exported");
    assert!(
        tiny.end <= build_table.start && build_table.start - tiny.end < 16,
        "tiny_exported {tiny:x?} is not just before build_table {build_table:x?}"
    );
    assert!(
        symbols(&exe).iter().all(|s| s.name != "build_table"),
        "the stripped binary still names build_table"
    );
    let t = run_traced_ok(&work, "stripped.cap", &exe, &[] as &[&str]);
    let label = format!("unknown@stripped+{:#x}", build_table.start);
    assert_eq!(table(&t.capture, &[]), rows(&[(&label, 6000, 3)]));
    let summary = memtrack_ok(|c| {
        c.arg("summary").arg(&t.capture);
    });
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(text.contains(&label), "{text}");
    assert!(!text.contains("tiny_exported"), "{text}");
    // Exported functions keep their names: main called build_table.
    assert_folded_line(&t.capture, &format!(";main;{label} 6000"));
}

/// wrapper.c's allocating functions, largest first (its header has the truth).
fn wrapper_truth(pool_get: &str) -> Vec<(String, u64, u64)> {
    let mut r = rows(&[
        ("make_index", 8000, 2),
        (pool_get, 2100, 3),
        ("make_names", 1500, 5),
        ("make_table", 1000, 4),
        ("main", 100, 1),
    ]);
    r.sort_by_key(|row| std::cmp::Reverse(row.1));
    r
}

#[test]
fn an_xmalloc_wrapper_gives_the_location_to_its_caller() {
    let work = Work::new("symbols-wrapper");
    // -O1 and -O2 lay the wrapper out differently (-O2 may split its failure path off).
    // At -O2 pool_get's call is a tail call (`jmp malloc`): it leaves no frame.
    for (name, opt, pool) in [
        ("wrapper-o1", "-O1", "pool_get"),
        ("wrapper-o2", "-O2", "load_config"),
    ] {
        let exe = work.compile_with("wrapper.c", Some(name), &[opt]);
        let t = run_traced_ok(&work, &format!("{name}.cap"), &exe, &[] as &[&str]);
        assert_eq!(table(&t.capture, &[]), wrapper_truth(pool), "{opt}");
        // The wrapper stays in the stacks.
        assert_folded_line(&t.capture, ";main;make_index;xmalloc 8000");
        // check's contributors start at the location.
        let check = std::process::Command::new(&binaries().memtrack)
            .arg("check")
            .arg(&t.capture)
            .args(["--max-peak", "1000", "--json"])
            .output()
            .expect("memtrack check");
        assert_eq!(check.status.code(), Some(1), "{opt}");
        let v: serde_json::Value = serde_json::from_slice(&check.stdout).expect("JSON");
        let top = &v["limits"][0]["top"][0];
        assert_eq!(top["bytes"], 4000, "{opt}: {v}");
        assert!(
            top["frames"][0].as_str().unwrap().starts_with("make_index"),
            "{opt}: {v}"
        );
    }
}

#[test]
fn a_stripped_wrapper_is_recognised_too() {
    let work = Work::new("symbols-wrapper-stripped");
    let flags = ["-O2", "-fno-toplevel-reorder"];
    let exe = work.compile_with(
        "wrapper.c",
        Some("wrapper"),
        &[&flags[..], &["-Wl,--strip-all"]].concat(),
    );
    let full = work.compile_with("wrapper.c", Some("wrapper-full"), &flags);
    let t = run_traced_ok(&work, "wrapper.cap", &exe, &[] as &[&str]);
    // No function of its own has a name: the wrappers are known by their code alone (malloc
    // and calloc named through the PLT, out_of_memory by never returning). At -O2 pool_get's
    // call is a tail call: it leaves no frame.
    let label = |f: &str| format!("unknown@wrapper+{:#x}", function_range(&full, f).start);
    let expected: Vec<(String, u64, u64)> = wrapper_truth("load_config")
        .into_iter()
        .map(|(f, b, n)| (label(&f), b, n))
        .collect();
    assert_eq!(table(&t.capture, &[]), expected);
}

#[test]
fn skip_function_names_the_caller_of_a_plain_wrapper() {
    let work = Work::new("symbols-skip");
    let exe = work.compile_with("wrapper.c", Some("wrapper"), &["-O1"]);
    let t = run_traced_ok(&work, "wrapper.cap", &exe, &[] as &[&str]);
    // pool_get only returns malloc's result (no failure path): a location of its own.
    assert_eq!(table(&t.capture, &[]), wrapper_truth("pool_get"));
    for pattern in ["pool_get", "pool_*", "p?ol_g*"] {
        assert_eq!(
            table(&t.capture, &["--skip-function", pattern]),
            wrapper_truth("load_config"),
            "{pattern}"
        );
    }
    // A glob matches the whole name: `pool` alone names nothing.
    assert_eq!(
        table(&t.capture, &["--skip-function", "pool"]),
        wrapper_truth("pool_get")
    );
    // Repeatable, and also before the command; summary's top locations follow.
    let out = memtrack_ok(|c| {
        c.args(["--skip-function", "nothing", "summary"])
            .arg(&t.capture)
            .args(["--skip-function", "pool_get"]);
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("3 allocations") && l.ends_with("load_config (wrapper.c:53)")),
        "{text}"
    );
    assert!(!text.contains("pool_get"), "{text}");
}
