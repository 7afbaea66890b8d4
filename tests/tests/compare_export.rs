//! `memtrack diff` between two captures, and exports for other tools: pprof (read back by `go
//! tool pprof`) and JSON.

use memtrack_tests::*;
use std::process::Command;

fn two_versions(work: &Work) -> (std::path::PathBuf, std::path::PathBuf) {
    let exe = work.compile("grows.c");
    let base = run_traced_ok(work, "base.cap", &exe, &["2"]).capture;
    let new = run_traced_ok(work, "new.cap", &exe, &["5"]).capture;
    (base, new)
}

#[test]
fn diff_names_what_grew_and_gates_on_growth() {
    let work = Work::new("diff");
    let (base, new) = two_versions(&work);

    // Stacks are matched by function names (the two runs loaded at different addresses).
    let folded = memtrack_ok(|c| {
        c.arg("diff")
            .arg(&base)
            .arg(&new)
            .args(["--format", "folded"]);
    });
    let text = String::from_utf8(folded.stdout).unwrap();
    let find = |f: &str| {
        text.lines()
            .find(|l| l.split(' ').next().unwrap().ends_with(&format!(";{f}")))
            .unwrap_or_else(|| panic!("no {f} in\n{text}"))
            .split(' ')
            .skip(1)
            .map(|v| v.parse::<u64>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(find("grows"), vec![2000, 5000]);
    assert_eq!(find("shrinks"), vec![800, 500]);
    assert_eq!(find("stable"), vec![10000, 10000]);

    let json = memtrack_ok(|c| {
        c.arg("diff")
            .arg(&base)
            .arg(&new)
            .args(["--format", "json"]);
    });
    let d: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        (d["before_bytes"].as_u64(), d["after_bytes"].as_u64()),
        (Some(12800), Some(15500))
    );
    let locs = d["locations"].as_array().unwrap();
    assert_eq!(locs[0]["function"], "grows");
    assert_eq!(
        (
            locs[0]["before"].as_u64(),
            locs[0]["after"].as_u64(),
            locs[0]["delta"].as_i64()
        ),
        (Some(2000), Some(5000), Some(3000))
    );
    assert_eq!(locs[0]["percent"].as_f64(), Some(150.0));
    assert_eq!(locs[1]["function"], "shrinks");
    assert_eq!(locs[1]["delta"].as_i64(), Some(-300));

    let table = memtrack_ok(|c| {
        c.arg("diff")
            .arg(&base)
            .arg(&new)
            .args(["--format", "table"]);
    });
    let table = String::from_utf8(table.stdout).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(
        rows.len(),
        2,
        "stable did not change, so it is not listed:\n{table}"
    );
    assert!(
        rows[0].contains("+2.93 KiB")
            && rows[0].contains("+150.0%")
            && rows[0].contains("grows (grows.c:"),
        "{table}"
    );
    assert!(
        rows[1].contains("-300 B") && rows[1].contains("-37.5%") && rows[1].contains("shrinks"),
        "{table}"
    );

    // The differential flamegraph: default name beside the new capture.
    memtrack_ok(|c| {
        c.arg("diff").arg(&base).arg(&new);
    });
    let svg = std::fs::read_to_string(work.path("base-vs-new-peak.svg")).expect("the diff svg");
    assert!(
        svg.contains("grows") && svg.contains("shrinks"),
        "functions in the svg"
    );

    // The gate: 2700 bytes is 21.1% of 12800.
    for (limit, code) in [("10%", 1), ("25%", 0), ("2KiB", 1), ("3KiB", 0)] {
        let out = Command::new(&binaries().memtrack)
            .arg("diff")
            .arg(&base)
            .arg(&new)
            .args(["--format", "table", "--fail-on-growth", limit])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{limit}: {stderr}");
        assert!(stderr.contains("+2.64 KiB (+21.1%)"), "{limit}: {stderr}");
        if code == 1 {
            // The stack that grew most comes first, leaf first.
            let first = stderr
                .lines()
                .skip_while(|l| !l.contains("grew most"))
                .nth(1)
                .unwrap();
            assert!(first.contains("+2.93 KiB"), "{stderr}");
            assert!(stderr.contains("    grows\n    <- main"), "{stderr}");
        }
    }
    let bad = Command::new(&binaries().memtrack)
        .arg("diff")
        .arg(&base)
        .arg(&new)
        .args(["--fail-on-growth", "lots"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--fail-on-growth"));
}

fn go() -> bool {
    let found = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        // CI installs it (.ci/run): there, its absence is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "go is not installed in CI"
        );
        eprintln!("go not installed here: skipped (install Debian's golang-go to run it)");
    }
    found
}

/// `go tool pprof -top` of the exported profile: its total and its top function equal
/// memtrack's own `table` of the same capture, for the in-use (peak) and allocated values.
#[test]
fn pprof_export_reads_back_in_go_tool_pprof() {
    if !go() {
        return;
    }
    let work = Work::new("pprof");
    let exe = work.compile("reports.c");
    let t = run_traced_ok(&work, "r.cap", &exe, &[] as &[&str]);
    let pb = work.path("r.pb.gz");
    memtrack_ok(|c| {
        c.arg("export")
            .arg(&t.capture)
            .args(["--format", "pprof", "-o"])
            .arg(&pb);
    });
    let gz = std::fs::read(&pb).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip");
    for (index, view) in [("inuse_space", "--peak"), ("alloc_space", "--allocated")] {
        let table = memtrack_ok(|c| {
            c.args(["table", "--json", view]).arg(&t.capture);
        });
        let rows: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
        let rows = rows.as_array().unwrap();
        let total: u64 = rows
            .iter()
            .map(|r| r["total_bytes"].as_u64().unwrap())
            .sum();
        let out = Command::new("go")
            .args([
                "tool",
                "pprof",
                "-top",
                "-unit=B",
                &format!("-sample_index={index}"),
            ])
            .arg(&pb)
            .env("HOME", work.dir())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("of {total}B total")),
            "{index}: total {total}\n{text}"
        );
        // The first row after the column names: the top function with its flat bytes.
        let top = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("flat"))
            .nth(1)
            .unwrap();
        let cols: Vec<&str> = top.split_whitespace().collect();
        assert_eq!(cols[0], format!("{}B", rows[0]["total_bytes"]), "{text}");
        assert_eq!(cols[5], rows[0]["function"].as_str().unwrap(), "{text}");
    }
}

/// `export --format json`: the view's totals and its stacks with symbolized frames.
#[test]
fn json_export_has_totals_and_symbolized_stacks() {
    let work = Work::new("json_export");
    let exe = work.compile("reports.c");
    let t = run_traced_ok(&work, "r.cap", &exe, &[] as &[&str]);
    let out = memtrack_ok(|c| {
        c.arg("export")
            .arg(&t.capture)
            .args(["--format", "json", "--leaks"]);
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["view"], "leaks");
    let stacks = v["stacks"].as_array().unwrap();
    let sum: u64 = stacks.iter().map(|s| s["bytes"].as_u64().unwrap()).sum();
    assert_eq!(v["bytes"].as_u64(), Some(sum));
    let site = stacks
        .iter()
        .find(|s| s["bytes"] == 2000)
        .expect("the 2000-byte leak");
    let frames: Vec<&str> = site["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap())
        .collect();
    assert_eq!(
        &frames[frames.len() - 4..],
        ["main", "outer", "helper", "leaf_alloc"]
    );
    let leaf = site["frames"].as_array().unwrap().last().unwrap();
    assert_eq!(leaf["line"], 12);
    assert!(leaf["file"].as_str().unwrap().ends_with("reports.c"));
}
