//! `memtrack diff` between two captures, and exports for other tools: pprof (read back by `go
//! tool pprof`) and JSON.

use memtrack_tests::*;
use std::path::Path;
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
            assert!(first.contains(")  grows <- main <- "), "{stderr}");
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
    // Frames are written once, in `frames`; stacks refer to them by index.
    let table = v["frames"].as_array().unwrap();
    let frames_of = |stack: &serde_json::Value| -> Vec<serde_json::Value> {
        stack["frame_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| table[i.as_u64().unwrap() as usize].clone())
            .collect()
    };
    let frames = frames_of(site);
    let names: Vec<&str> = frames
        .iter()
        .map(|f| f["function"].as_str().unwrap())
        .collect();
    assert_eq!(
        &names[names.len() - 4..],
        ["main", "outer", "helper", "leaf_alloc"]
    );
    let leaf = frames.last().unwrap();
    assert_eq!(leaf["line"], 12);
    assert!(leaf["file"].as_str().unwrap().ends_with("reports.c"));
    let mut distinct = table.clone();
    distinct.sort_by_key(|f| f.to_string());
    distinct.dedup();
    assert_eq!(distinct.len(), table.len(), "a frame written twice");

    // `--inline-frames`: the layout with each stack's frames in full, the same frames.
    let out = memtrack_ok(|c| {
        c.arg("export")
            .arg(&t.capture)
            .args(["--format", "json", "--leaks", "--inline-frames"]);
    });
    let inline: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(inline.get("frames").is_none());
    assert_eq!(inline["bytes"], v["bytes"]);
    for (a, b) in inline["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .zip(stacks.iter())
    {
        assert_eq!(a["frames"].as_array().unwrap(), &frames_of(b));
        assert_eq!(a["bytes"], b["bytes"]);
    }
}

/// `python3 --version` is 3.11, the interpreter the figures below are of (elsewhere: skipped,
/// except in CI).
fn python311() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("Python 3.11."));
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 is not 3.11 in CI"
        );
        eprintln!("python3 is not 3.11 here: skipped");
    }
    ok
}

/// One script run from two checkouts (`a/` and `checkout-b/src/`): `diff` matches its frames by
/// function and a path relative to the program's directory, so each of its lines is one row
/// with both figures, none gone (-100%) and again new. `--fail-on-growth` names the stacks
/// that grew one line each, innermost first.
#[test]
fn diff_matches_a_python_script_from_two_checkouts() {
    if !python311() {
        return;
    }
    let work = Work::new("diff_checkouts");
    let mut runs = Vec::new();
    for (dir, n) in [("a", "1"), ("checkout-b/src", "3")] {
        let d = work.path(dir);
        std::fs::create_dir_all(&d).unwrap();
        let script = d.join("diff_svc.py");
        std::fs::copy(fixtures_dir().join("diff_svc.py"), &script).unwrap();
        let name = format!("{}.cap", dir.replace('/', "-"));
        let t = run_traced_ok(
            &work,
            &name,
            Path::new("python3"),
            &[script.to_str().unwrap(), n],
        );
        runs.push(t.capture);
    }
    let (base, new) = (&runs[0], &runs[1]);
    let json = memtrack_ok(|c| {
        c.arg("diff").arg(base).arg(new).args(["--format", "json"]);
    });
    let d: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let mut rows: Vec<(String, u64, u64, u64)> = d["locations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["file"] == "diff_svc.py")
        .map(|r| {
            (
                r["function"].as_str().unwrap().to_string(),
                r["line"].as_u64().unwrap(),
                r["before"].as_u64().unwrap(),
                r["after"].as_u64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    let row = |f: &str, l: u64, b: u64, a: u64| (f.to_string(), l, b, a);
    assert_eq!(
        rows,
        [
            // The module's globals: KEEP, steady, grow.
            row("<module>", 5, 400, 400),
            row("<module>", 8, 152, 152),
            row("<module>", 12, 152, 152),
            // range(n)'s iterator; bytearray(1_000_000): 1,000,001 bytes and a 56-byte object.
            row("grow", 13, 48, 48),
            row("grow", 14, 1_000_057, 3_000_171),
            // The same buffer and object, and KEEP's first 32-byte array.
            row("steady", 9, 1_000_089, 1_000_089),
        ],
        "{}",
        String::from_utf8_lossy(&json.stdout)
    );
    // No stack of the script is only on one side.
    for s in d["stacks"].as_array().unwrap() {
        let stack = s["stack"].as_str().unwrap();
        if stack.contains("diff_svc.py") {
            assert!(s["before"] != 0 && s["after"] != 0, "{s}");
            assert!(
                !stack.contains("/a/") && !stack.contains("checkout-b"),
                "{s}"
            );
        }
    }

    let table = memtrack_ok(|c| {
        c.arg("diff").arg(base).arg(new).args(["--format", "table"]);
    });
    let table = String::from_utf8(table.stdout).unwrap();
    let ours: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("diff_svc.py"))
        .collect();
    assert_eq!(
        ours,
        ["  976.62 KiB     2.86 MiB     +1.91 MiB  +200.0%  grow (diff_svc.py:14)"],
        "{table}"
    );

    // The gate's message: at most ten stacks, one line each, innermost first.
    for (python_only, top) in [
        (true, "  +1.91 MiB (976.62 KiB -> 2.86 MiB)  grow (diff_svc.py:14) <- <module> (diff_svc.py:18)"),
        (false, "  +1.91 MiB (976.56 KiB -> 2.86 MiB)  PyByteArray_Resize <- bytearray___init___impl <- ... <- grow (diff_svc.py:14) <- <module> (diff_svc.py:18)"),
    ] {
        let mut cmd = Command::new(&binaries().memtrack);
        cmd.arg("diff")
            .arg(base)
            .arg(new)
            .args(["--format", "table", "--fail-on-growth", "1MiB"]);
        if python_only {
            cmd.arg("--python-only");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .skip_while(|l| !l.contains("the stacks that grew most:"))
            .skip(1)
            .collect();
        assert_eq!(lines.len(), 10, "{stderr}");
        assert_eq!(lines[0], top, "{stderr}");
        assert!(lines.iter().all(|l| l.starts_with("  +")), "{stderr}");
    }
}
