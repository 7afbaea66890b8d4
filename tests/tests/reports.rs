//! Report views through symbolization: folded stacks and flamegraphs attribute exact bytes to
//! the fixtures' functions, with inlined frames, file and line, and demangled C++ names.

use memtrack_reader::{Symbolizer, View};
use memtrack_tests::*;
use std::process::Command;

fn export(capture: &std::path::Path, view: &str) -> Vec<(String, u64)> {
    let out = memtrack_ok(|c| {
        c.args(["export"])
            .arg(capture)
            .args(["--format", "folded", view]);
    });
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (path, bytes) = l.rsplit_once(' ').expect("folded line");
            (path.to_string(), bytes.parse().expect("bytes"))
        })
        .collect()
}

/// reports.c compiled and run under memtrack (capture `reports.cap`) in a fresh scratch dir.
fn traced_reports(name: &str) -> (Work, std::path::PathBuf, Traced) {
    let work = Work::new(name);
    let exe = work.compile("reports.c");
    let t = run_traced_ok(&work, "reports.cap", &exe, &[] as &[&str]);
    (work, exe, t)
}

/// Bytes of the lines whose path ends with `suffix` (the frames below main).
fn bytes_ending(lines: &[(String, u64)], suffix: &str) -> u64 {
    lines
        .iter()
        .filter(|(p, _)| p.ends_with(suffix))
        .map(|(_, b)| b)
        .sum()
}

#[test]
fn folded_views_attribute_exact_bytes_to_functions() {
    let (_work, _exe, t) = traced_reports("reports");

    let peak = export(&t.capture, "--peak");
    assert_eq!(bytes_ending(&peak, ";main;leak_direct"), 1000, "{peak:#?}");
    assert_eq!(
        bytes_ending(&peak, ";main;outer;helper;leaf_alloc"),
        2000,
        "{peak:#?}"
    );
    assert_eq!(bytes_ending(&peak, ";main;peak_site"), 50000, "{peak:#?}");
    // Every line starts at the process's root.
    assert!(
        peak.iter().all(|(p, _)| p.starts_with("_start;")),
        "{peak:#?}"
    );

    let leaks = export(&t.capture, "--leaks");
    assert_eq!(
        bytes_ending(&leaks, ";main;leak_direct"),
        1000,
        "{leaks:#?}"
    );
    assert_eq!(bytes_ending(&leaks, ";main;outer;helper;leaf_alloc"), 2000);
    assert_eq!(bytes_ending(&leaks, ";main;peak_site"), 0);

    let all = export(&t.capture, "--allocated");
    assert_eq!(bytes_ending(&all, ";main;peak_site"), 50000);

    // File and line of the innermost frames, through the library.
    let cap = open_capture(&t.capture);
    let v = cap.view(View::Leaks);
    let mut sym = Symbolizer::new(&cap);
    let site = v
        .sites
        .iter()
        .find(|s| s.bytes == 2000)
        .expect("the 2000-byte site");
    let frames = sym.stack_frames(&v.stacks, site.stack);
    let n = frames.len();
    assert!(n >= 4, "{frames:#?}");
    let leaf = &frames[n - 1];
    assert_eq!(leaf.function, "leaf_alloc");
    assert_eq!(leaf.location().as_deref(), Some("reports.c:12"), "{leaf:?}");
    assert_eq!(frames[n - 2].function, "helper");
    assert_eq!(frames[n - 2].location().as_deref(), Some("reports.c:14"));
    assert_eq!(frames[n - 3].function, "outer");
    assert_eq!(frames[n - 3].location().as_deref(), Some("reports.c:18"));
    assert_eq!(frames[n - 4].function, "main");
    assert_eq!(frames[n - 4].location().as_deref(), Some("reports.c:23"));
    assert_eq!(
        v.folded(&mut sym).iter().map(|(_, b)| b).sum::<u64>(),
        v.bytes
    );
}

#[test]
fn flamegraph_svg_names_the_functions_and_the_total() {
    let (work, _exe, t) = traced_reports("flamegraph");
    memtrack_ok(|c| {
        c.arg("flamegraph").arg(&t.capture);
    });
    // Default name: beside the capture, from its name and the view.
    let svg = std::fs::read_to_string(work.path("reports-peak.svg")).expect("reports-peak.svg");
    assert!(svg.starts_with("<?xml"), "{}", &svg[..100.min(svg.len())]);
    for name in ["leak_direct", "leaf_alloc", "helper", "peak_site", "main"] {
        assert!(svg.contains(name), "{name} missing from the SVG");
    }
    assert!(
        svg.contains("memtrack: live at the peak, 51.76 KiB"),
        "title with the total"
    );
    assert!(svg.contains("53,000 bytes"), "the root's count");
}

#[test]
fn cxx_names_are_demangled() {
    let work = Work::new("cxx_names");
    let exe = work.compile("cxx_new_delete.cpp");
    let t = run_traced_ok(&work, "cxx.cap", &exe, &[] as &[&str]);
    let lines = export(&t.capture, "--allocated");
    assert!(
        lines.iter().any(|(p, _)| p.contains(";make_names")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|(p, _)| p.contains("operator new")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|(p, _)| p.contains(";_Z")),
        "mangled names left: {lines:#?}"
    );
}

#[test]
fn table_ranks_sites_with_exact_totals_max_avg_count() {
    let (_work, _exe, t) = traced_reports("table");
    let run = |args: &[&str]| -> serde_json::Value {
        let out = memtrack_ok(|c| {
            c.arg("table").arg(&t.capture).args(args).arg("--json");
        });
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let row = |v: &serde_json::Value, f: &str| -> (u64, u64, u64, u64) {
        let r = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["function"] == f)
            .unwrap_or_else(|| panic!("no row for {f}: {v:#}"));
        let n = |k: &str| r[k].as_u64().unwrap();
        (n("total_bytes"), n("max_bytes"), n("avg_bytes"), n("count"))
    };
    let peak = run(&["--peak"]);
    assert_eq!(
        peak[0]["function"], "peak_site",
        "ranked by total: {peak:#}"
    );
    assert_eq!(row(&peak, "peak_site"), (50000, 50000, 50000, 1));
    assert_eq!(row(&peak, "leaf_alloc"), (2000, 2000, 2000, 1));
    assert_eq!(row(&peak, "leak_direct"), (1000, 1000, 1000, 1));

    let lines = run(&["--leaks", "--by", "line"]);
    let leaf = lines
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["function"] == "leaf_alloc")
        .unwrap();
    assert_eq!(leaf["line"], 12);
    assert!(leaf["file"].as_str().unwrap().ends_with("reports.c"));
    assert!(!lines
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["function"] == "peak_site"));

    let top1 = run(&["--allocated", "--top", "1"]);
    assert_eq!(top1.as_array().unwrap().len(), 1);
}

#[test]
fn stats_histogram_functions_and_temporary_allocations_are_exact() {
    let (_work, _exe, t) = traced_reports("stats");
    let out = memtrack_ok(|c| {
        c.arg("stats").arg(&t.capture).arg("--json");
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_allocations"], 3, "{v:#}");
    assert_eq!(v["total_bytes"], 53000);
    let hist: Vec<(u64, u64, u64)> = v["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["min"].as_u64().unwrap(),
                b["max"].as_u64().unwrap(),
                b["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(hist, [(513, 1024, 1), (1025, 2048, 1), (32769, 65536, 1)]);
    assert_eq!(v["by_function"][0]["function"], "malloc");
    assert_eq!(v["by_function"][0]["count"], 3);
    assert_eq!(v["by_function"].as_array().unwrap().len(), 1);
    // peak_site's block is freed before main allocates again: the one temporary allocation.
    assert_eq!(v["temporary_allocations"], 1);
    assert_eq!(v["temporary_bytes"], 50000);
    assert_eq!(v["top_temporary"][0]["function"], "peak_site");
    assert_eq!(v["top_by_bytes"][0]["function"], "peak_site");

    let temp = export(&t.capture, "--temporary");
    assert_eq!(temp.len(), 1, "{temp:?}");
    assert!(
        temp[0].0.ends_with(";main;peak_site") && temp[0].1 == 50000,
        "{temp:?}"
    );
}

#[test]
fn plot_marks_the_peak_with_its_size() {
    let (work, _exe, t) = traced_reports("plot");
    memtrack_ok(|c| {
        c.arg("plot").arg(&t.capture);
    });
    let svg = std::fs::read_to_string(work.path("reports-plot.svg")).expect("reports-plot.svg");
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("peak 51.76 KiB (53,000 bytes)"),
        "no peak label"
    );
    let points = svg
        .split("points=\"")
        .nth(1)
        .and_then(|p| p.split('"').next())
        .expect("a polyline");
    assert_eq!(points.split_whitespace().count(), 1000);
    // The line reaches the peak, 53,000 bytes on an axis of 60 KiB (320 px from y 50 down),
    // and ends lower (50000 bytes freed).
    let ys: Vec<f64> = points
        .split_whitespace()
        .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    let top = ys.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        (top - (50.0 + 320.0 * (1.0 - 53000.0 / 61440.0))).abs() < 0.5,
        "the peak is drawn at 53,000 bytes: {top}"
    );
    assert!(
        *ys.last().unwrap() > top + 100.0,
        "after the free the heap is lower"
    );
}

#[test]
fn call_tree_has_inclusive_bytes_along_the_paths() {
    let (_work, _exe, t) = traced_reports("tree");
    let cap = open_capture(&t.capture);
    let v = cap.view(View::Peak);
    let mut sym = Symbolizer::new(&cap);
    let root = v.call_tree(&mut sym);
    assert_eq!((root.bytes, root.allocations), (53000, 3));
    // Down the single path to main.
    let mut node = &root;
    while node.name != "main" {
        assert_eq!(
            node.children.len(),
            1,
            "below {}: {:?}",
            node.name,
            node.children
        );
        node = &node.children[0];
    }
    let kids: Vec<(&str, u64)> = node
        .children
        .iter()
        .map(|c| (c.name.as_str(), c.bytes))
        .collect();
    assert_eq!(
        kids,
        [("peak_site", 50000), ("outer", 2000), ("leak_direct", 1000)]
    );
    let outer = &node.children[1];
    assert_eq!(outer.children[0].name, "helper");
    assert_eq!(outer.children[0].children[0].name, "leaf_alloc");
    assert_eq!(outer.children[0].children[0].bytes, 2000);

    let out = memtrack_ok(|c| {
        c.arg("tree")
            .arg(&t.capture)
            .args(["--leaks", "--depth", "30"]);
    });
    let text = String::from_utf8(out.stdout).unwrap();
    let leaf = text
        .lines()
        .find(|l| l.ends_with("leaf_alloc"))
        .expect("leaf_alloc line");
    assert!(
        leaf.contains("66.67%") && leaf.contains("1.95 KiB"),
        "{leaf}"
    );
    assert!(!text.contains("peak_site"), "freed before exit: {text}");
}

#[test]
fn summary_names_the_top_locations_at_the_peak() {
    let (_work, _exe, t) = traced_reports("summary_top");
    let v = summary_json(&t.capture);
    let top: Vec<(String, u64, u64)> = v["top_peak_locations"]
        .as_array()
        .expect("top_peak_locations")
        .iter()
        .map(|l| {
            (
                l["function"].as_str().unwrap().to_string(),
                l["line"].as_u64().unwrap(),
                l["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        top,
        [
            ("peak_site".to_string(), 19, 50000),
            ("leaf_alloc".to_string(), 12, 2000),
            ("leak_direct".to_string(), 11, 1000)
        ]
    );
}

/// `mangling`: "default" (rustc's own choice) or "v0".
fn rustc(work: &Work, mangling: &str) -> std::path::PathBuf {
    let exe = work.path(&format!("rust_fixture_{mangling}"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args(["-g", "-C", "opt-level=1"]);
    if mangling != "default" {
        cmd.arg("-C")
            .arg(format!("symbol-mangling-version={mangling}"));
    }
    let out = cmd
        .arg("-o")
        .arg(&exe)
        .arg(fixtures_dir().join("rust_fixture.rs"))
        .output()
        .expect("rustc runs");
    assert!(
        out.status.success(),
        "rustc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

#[test]
fn rust_names_are_demangled_default_and_v0() {
    let work = Work::new("rust_names");
    for mangling in ["default", "v0"] {
        let exe = rustc(&work, mangling);
        let t = run_traced_ok(&work, &format!("rust-{mangling}.cap"), &exe, &[] as &[&str]);
        let leaks = export(&t.capture, "--leaks");
        let with = |f: &str| -> u64 {
            leaks
                .iter()
                .filter(|(p, _)| p.contains(f))
                .map(|(_, b)| b)
                .sum()
        };
        assert_eq!(
            with("rust_fixture::make_buffer"),
            4096,
            "{mangling}: {leaks:#?}"
        );
        // v0 demangling writes inherent methods as `<rust_fixture::Store>::insert`.
        let insert = with("rust_fixture::Store::insert") + with("<rust_fixture::Store>::insert");
        assert_eq!(insert, 100, "{mangling}: {leaks:#?}");
        assert!(
            with("rust_fixture::main") >= 4096 + 100 + 32,
            "{mangling}: {leaks:#?}"
        );
        assert!(
            !leaks
                .iter()
                .any(|(p, _)| p.contains("_ZN") || p.contains("_R")),
            "{mangling}: mangled names left: {leaks:#?}"
        );
        // memtrack's own frames never appear.
        assert!(
            !leaks.iter().any(|(p, _)| p.contains("memtrack")),
            "{leaks:#?}"
        );
    }
}

#[test]
fn frames_in_dlopened_code_are_symbolized() {
    let work = Work::new("dl_symbols");
    let lib = work.compile_shared("dlopen_lib.c");
    let exe = work.compile("dlopen_main.c");
    let t = run_traced_ok(&work, "dl.cap", &exe, &[lib.to_str().unwrap()]);
    let leaks = export(&t.capture, "--leaks");
    assert_eq!(
        bytes_ending(&leaks, ";main;call_lib;lib_alloc;lib_site"),
        4096 + 8192,
        "{leaks:#?}"
    );
}

#[test]
fn a_rebuilt_binary_is_reported_once_and_shown_as_offsets() {
    let (_work, exe, t) = traced_reports("stale");
    // Rebuild the same path from other code: its build-id changes.
    let out = Command::new("gcc")
        .args(["-O1", "-g", "-DSTALE_VARIANT", "-x", "c", "-o"])
        .arg(&exe)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"int main(void) { return 42; }\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let out = memtrack_ok(|c| {
        c.arg("export")
            .arg(&t.capture)
            .args(["--format", "folded", "--leaks"]);
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("build-id differs").count(), 1, "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(";reports+0x"),
        "offsets for the stale binary: {text}"
    );
    assert!(
        !text.contains("leak_direct"),
        "no names from the wrong binary: {text}"
    );
}

#[test]
fn flamegraph_of_an_empty_view_is_a_valid_svg_saying_so() {
    let work = Work::new("empty_fg");
    let exe = work.compile("errno_check.c"); // frees everything: nothing leaks
    let t = run_traced_ok(&work, "e.cap", &exe, &[] as &[&str]);
    memtrack_ok(|c| {
        c.arg("flamegraph").arg(&t.capture).arg("--leaks");
    });
    let svg = std::fs::read_to_string(work.path("e-leaks.svg")).unwrap();
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("no allocations in this view"), "{svg}");
}
