//! Time windows (issue 22): `--at` and `--between` on every report, checked against
//! `phases.c` (4,194,304 bytes held by hold_4mb from 0.2 s to 0.6 s, 8,388,608 by hold_8mb from
//! 1.0 s to 1.4 s, nothing else on the heap; the program ends at 2.2 s).

use memtrack_tests::*;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

const MB4: u64 = 4_194_304;
const MB8: u64 = 8_388_608;

/// The fixture's capture, recorded once for every test (it runs 2.2 s).
fn capture() -> &'static (Work, PathBuf) {
    static CAP: OnceLock<(Work, PathBuf)> = OnceLock::new();
    CAP.get_or_init(|| {
        let work = Work::new("windows");
        let exe = work.compile("phases.c");
        let t = run_traced_ok(&work, "phases.cap", &exe, &[] as &[&str]);
        (work, t.capture)
    })
}

/// `memtrack ARGS` on the capture (it comes right after the subcommand): exit code, stdout,
/// stderr.
fn memtrack(sub: &str, args: &[&str]) -> (i32, String, String) {
    let (work, cap) = capture();
    let mut all = vec![sub, cap.to_str().unwrap()];
    all.extend(args);
    memtrack_in(work.dir(), &all)
}

/// `memtrack ARGS` in `dir`: exit code, stdout, stderr.
fn memtrack_in(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(&binaries().memtrack)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("memtrack runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(sub: &str, args: &[&str]) -> String {
    let (code, out, err) = memtrack(sub, args);
    assert_eq!(code, 0, "memtrack {sub} {args:?}: {err}");
    out
}

/// `table --json` rows as (function, total bytes, count).
fn rows(args: &[&str]) -> Vec<(String, u64, u64)> {
    let mut a = args.to_vec();
    a.push("--json");
    let v: serde_json::Value = serde_json::from_str(&ok("table", &a)).expect("JSON");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            (
                r["function"].as_str().unwrap().to_string(),
                json_u64(r, "total_bytes"),
                json_u64(r, "count"),
            )
        })
        .collect()
}

fn one(function: &str, bytes: u64) -> Vec<(String, u64, u64)> {
    vec![(function.to_string(), bytes, 1)]
}

#[test]
fn at_shows_what_was_live_at_that_moment() {
    assert_eq!(rows(&["--at", "0.4"]), one("hold_4mb", MB4));
    assert_eq!(rows(&["--at", "1.2s"]), one("hold_8mb", MB8));
    assert_eq!(rows(&["--at", "800ms"]), vec![]);
    let text = ok("table", &["--at", "1.2"]);
    assert!(
        text.starts_with(&format!(
            "memtrack table of {}: live at 1.200 s, 8,388,608 bytes (8.00 MiB) in 1 allocation",
            capture().1.display()
        )),
        "{text}"
    );
    let text = ok("table", &["--at", "0.8"]);
    assert!(
        text.contains("live at 0.800 s, 0 bytes in 0 allocations"),
        "{text}"
    );
}

#[test]
fn between_shows_the_high_water_mark_inside_the_window() {
    assert_eq!(rows(&["--between", "0.1", "0.7"]), one("hold_4mb", MB4));
    assert_eq!(rows(&["--between", "0.7", "1.5"]), one("hold_8mb", MB8));
    assert_eq!(rows(&["--between", "0", "3"]), one("hold_8mb", MB8));
    // The title says the window and when its peak was (hold_8mb's malloc, about 1.0 s).
    let text = ok("table", &["--between", "0.7", "1.5"]);
    let title = text.lines().next().unwrap();
    let at = title
        .split("live at the peak between 0.700 s and 1.500 s, at ")
        .nth(1)
        .and_then(|t| t.split(" s,").next())
        .and_then(|t| t.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no peak time in {title:?}"));
    assert!((0.98..1.1).contains(&at), "{title}");
    // A window that starts inside a phase starts from what was live then.
    assert_eq!(rows(&["--between", "1.2", "1.3"]), one("hold_8mb", MB8));
}

#[test]
fn times_past_the_end_are_clamped_with_a_note() {
    let (code, text, err) = memtrack("table", &["--between", "0", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("memtrack: note: 3.000 s past the end of the capture ("),
        "{err}"
    );
    let end: f64 = err
        .split("past the end of the capture (")
        .nth(1)
        .and_then(|t| t.split(" s)").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!((2.2..2.5).contains(&end), "{err}");
    assert!(
        text.contains(&format!("between 0.000 s and {end:.3} s")),
        "{text}"
    );
}

#[test]
fn other_views_count_the_allocations_made_in_the_window() {
    assert_eq!(
        rows(&["--allocated", "--between", "0.9", "1.5"]),
        one("hold_8mb", MB8)
    );
    let text = ok("table", &["--allocated", "--between", "0.9", "1.5"]);
    assert!(
        text.contains(
            "allocated between 0.900 s and 1.500 s, 8,388,608 bytes (8.00 MiB) in 1 allocation"
        ),
        "{text}"
    );
    let both = rows(&["--allocated", "--between", "0", "2"]);
    assert_eq!(
        both,
        vec![
            ("hold_8mb".to_string(), MB8, 1),
            ("hold_4mb".to_string(), MB4, 1)
        ]
    );
    // Each block is freed before its thread allocates again: temporary, in its window.
    assert_eq!(
        rows(&["--temporary", "--between", "0.1", "0.7"]),
        one("hold_4mb", MB4)
    );
    // Nothing made in any window is left live.
    assert_eq!(rows(&["--leaks", "--between", "0", "2"]), vec![]);
    assert_eq!(rows(&["--allocated", "--between", "1.5", "2"]), vec![]);
}

#[test]
fn summary_gives_the_window_figures() {
    let v: serde_json::Value =
        serde_json::from_str(&ok("summary", &["--between", "0.7", "1.5", "--json"])).unwrap();
    let w = &v["window"];
    assert_eq!(json_u64(w, "peak_bytes"), MB8);
    assert_eq!(json_u64(w, "peak_allocations"), 1);
    assert_eq!(json_u64(w, "allocated_bytes"), MB8);
    assert_eq!(json_u64(w, "allocations"), 1);
    assert_eq!(json_u64(w, "frees"), 1);
    assert_eq!(json_u64(w, "live_at_start_bytes"), 0);
    assert_eq!(json_u64(w, "live_at_end_bytes"), 0);
    let t = w["peak_time_seconds"].as_f64().unwrap();
    assert!((0.98..1.1).contains(&t), "{w}");
    assert_eq!(w["top_locations"][0]["function"], "hold_8mb");
    assert_eq!(json_u64(&w["top_locations"][0], "bytes"), MB8);
    // The whole capture's figures stay what they are.
    assert_eq!(json_u64(&v, "peak_bytes"), MB8);
    assert_eq!(json_u64(&v, "total_bytes"), MB4 + MB8);

    let v: serde_json::Value =
        serde_json::from_str(&ok("summary", &["--at", "0.4", "--json"])).unwrap();
    assert_eq!(json_u64(&v["window"], "live_at_end_bytes"), MB4);
    assert_eq!(json_u64(&v["window"], "live_at_end_allocations"), 1);

    let text = ok("summary", &["--at", "1.2"]);
    assert!(
        text.contains(
            "  at 1.200 s:\n    live:         8,388,608 bytes (8.00 MiB) in 1 allocation"
        ),
        "{text}"
    );
    assert!(text.contains("top locations live at 1.200 s:"), "{text}");
    let text = ok("summary", &["--between", "0.1", "0.7"]);
    assert!(text.contains("  between 0.100 s and 0.700 s:\n    peak heap:    4,194,304 bytes (4.00 MiB) in 1 allocation"), "{text}");
    assert!(
        text.contains("    allocated:    4,194,304 bytes (4.00 MiB) in 1 call"),
        "{text}"
    );
}

#[test]
fn flamegraph_and_tree_of_a_window() {
    let (work, _) = capture();
    let svg = work.path("at.svg");
    ok("flamegraph", &["--at", "1.2", "-o", svg.to_str().unwrap()]);
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(
        svg.contains("memtrack: live at 1.200 s, 8.00 MiB (") && svg.contains("hold_8mb"),
        "{svg}"
    );
    assert!(!svg.contains("hold_4mb"));
    let text = ok("tree", &["--between", "0.1", "0.7"]);
    assert!(
        text.contains(", 4,194,304 bytes (4.00 MiB) in 1 allocation"),
        "{text}"
    );
    assert!(
        text.contains("hold_4mb") && !text.contains("hold_8mb"),
        "{text}"
    );
}

#[test]
fn export_of_a_window() {
    let folded = ok("export", &["--format", "folded", "--at", "0.4"]);
    assert_eq!(folded.lines().count(), 1, "{folded}");
    assert!(folded.trim_end().ends_with(";hold_4mb 4194304"), "{folded}");
    let v: serde_json::Value = serde_json::from_str(&ok(
        "export",
        &["--format", "json", "--allocated", "--between", "0.9", "1.5"],
    ))
    .unwrap();
    assert_eq!(json_u64(&v, "bytes"), MB8);
    assert_eq!(json_u64(&v, "allocations"), 1);
    assert_eq!(v["window"]["start_seconds"], 0.9);
    assert_eq!(v["window"]["end_seconds"], 1.5);
    let (work, _) = capture();
    let pb = work.path("w.pb.gz");
    ok(
        "export",
        &[
            "--format",
            "pprof",
            "--at",
            "1.2",
            "-o",
            pb.to_str().unwrap(),
        ],
    );
    assert!(std::fs::metadata(&pb).unwrap().len() > 0);
}

#[test]
fn check_limits_within_a_window() {
    let (code, text, _) = memtrack(
        "check",
        &[
            "--between",
            "0.1",
            "0.7",
            "--max-peak",
            "4MiB",
            "--max-total",
            "4MiB",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with(&format!(
        "memtrack check of {}, between 0.100 s and 0.700 s",
        capture().1.display()
    )));
    let (code, text, _) = memtrack("check", &["--between", "0.7", "1.5", "--max-peak", "4MiB"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("max-peak                 8,388,608 bytes (8.00 MiB) > limit"),
        "{text}"
    );
    assert!(
        text.contains("8.00 MiB in 1 allocation: hold_8mb"),
        "{text}"
    );
    let (code, text, _) = memtrack(
        "check",
        &[
            "--between",
            "0.9",
            "1.5",
            "--max-allocations",
            "1",
            "--max-leaked",
            "0",
        ],
    );
    assert_eq!(code, 0, "{text}");
    let (code, text, _) = memtrack("check", &["--at", "0.4", "--max-peak", "4000000"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("hold_4mb"), "{text}");
}

#[test]
fn bad_windows_are_errors() {
    let refused = |args: &[&str], says: &str| {
        let (code, out, err) = memtrack("table", args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    };
    refused(
        &["--between", "1.5", "1.0"],
        "--between 1.500 s 1.000 s: the start is after the end",
    );
    refused(&["--at", "soon"], "'soon' is not a time");
    refused(&["--between", "1", "2x"], "unknown time unit 'x'");
    refused(&["--between", "1"], "--between");
    refused(&["--at", "1", "--between", "0", "2"], "cannot be used with");
    refused(
        &["--at", "1", "--leaks"],
        "--at shows what was live at one moment; --leaks needs a span of time",
    );
    let (code, _, err) = memtrack("check", &["--at", "1", "--max-total", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("only --max-peak"), "{err}");
}

#[test]
fn plot_draws_heap_mapped_and_resident_memory_each_on_its_own_scale() {
    let (work, _) = capture();
    let out = work.path("phases-plot.svg");
    ok("plot", &["-o", out.to_str().unwrap()]);
    let svg = std::fs::read_to_string(out).unwrap();
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>')?.1.split_once("</text>").map(|(x, _)| x))
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("memtrack: memory over time (") && t.ends_with("/phases)")),
        "{texts:?}"
    );
    assert!(texts.contains(&"heap in use") && texts.contains(&"resident (RSS)"));
    assert!(texts.contains(&"time (s)"), "{texts:?}");
    let heap_peak = texts
        .iter()
        .find(|t| t.starts_with("peak 8.00 MiB (8,388,608 bytes) at "))
        .unwrap_or_else(|| panic!("no heap peak: {texts:?}"));
    let at: f64 = heap_peak
        .rsplit(" at ")
        .next()
        .unwrap()
        .trim_end_matches(" s")
        .parse()
        .unwrap();
    assert!((0.98..1.1).contains(&at), "{heap_peak}");
    // The touched blocks are resident: RSS peaks above the 16 MiB mapping, on its own axis.
    let rss_peak = texts
        .iter()
        .find_map(|t| t.strip_prefix("peak RSS "))
        .unwrap_or_else(|| panic!("no RSS peak: {texts:?}"));
    let bytes: u64 = rss_peak
        .split(" (")
        .nth(1)
        .and_then(|b| b.split(" bytes").next())
        .map(|b| b.replace(',', "").parse().unwrap())
        .unwrap();
    assert!(bytes > 16_777_216, "{rss_peak}");
    // The heap's line: 1,000 points, its top at 8 MiB on an axis of 10 MiB (320 px from y 50).
    let heap: Vec<f64> = svg
        .split("points=\"")
        .nth(1)
        .and_then(|p| p.split('"').next())
        .unwrap()
        .split_whitespace()
        .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(heap.len(), 1000);
    let top = heap.iter().cloned().fold(f64::MAX, f64::min);
    assert!((top - (50.0 + 320.0 * (1.0 - 0.8))).abs() < 0.5, "{top}");
    // The 16 MiB mapping has a panel of its own, between the heap's and resident memory's.
    assert!(texts.contains(&"mapped memory"), "{texts:?}");
    let mapped_peak = texts
        .iter()
        .find_map(|t| t.strip_prefix("peak mapped 16.00 MiB (16,777,216 bytes) at "))
        .unwrap_or_else(|| panic!("no mapped peak: {texts:?}"));
    let at: f64 = mapped_peak.trim_end_matches(" s").parse().unwrap();
    assert!((1.58..1.9).contains(&at), "{mapped_peak}");
    let at = |t: &str| texts.iter().position(|x| *x == t).unwrap();
    assert!(at("heap in use") < at("mapped memory") && at("mapped memory") < at("resident (RSS)"));
    assert_eq!(
        svg.matches("<polyline").count(),
        3,
        "heap, mapped and RSS lines"
    );
}

#[test]
fn diff_of_a_window_compares_the_same_moment() {
    let (_, cap) = capture();
    let cap = cap.to_str().unwrap();
    let (code, text, err) = memtrack("diff", &[cap, "--at", "1.2", "--format", "table"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.starts_with("memtrack diff of live at 1.200 s: 8.00 MiB -> 8.00 MiB (+0 B"),
        "{text}"
    );
}

#[test]
fn windows_on_a_process_tree_use_the_launched_process_clock() {
    let work = Work::new("windows_tree");
    let exe = work.compile("window_fork.c");
    let t = run_traced_ok(&work, "wf.cap", &exe, &[] as &[&str]);
    let run = |args: &[&str]| memtrack_in(work.dir(), args);
    let cap = t.capture.to_str().unwrap();
    // At 0.45 s the parent holds its block and the child, started at 0.2 s, its own.
    let (code, text, err) = run(&["table", cap, "--at", "0.45"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("live at 0.450 s, 3,000,000 bytes (2.86 MiB) in 2 allocations"),
        "{text}"
    );
    assert!(
        text.contains("] child_block") && text.contains("] parent_block"),
        "{text}"
    );
    let (_, text, _) = run(&["table", cap, "--at", "0.1"]);
    assert!(
        text.contains("live at 0.100 s, 1,000,000 bytes (976.56 KiB) in 1 allocation"),
        "{text}"
    );
    assert!(!text.contains("child_block"), "{text}");
    // The combined high-water mark within a window: both blocks from 0.3 s to 0.6 s.
    let (code, text, err) = run(&["table", cap, "--between", "0", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("live at the combined peak between 0.000 s and ")
            && text.contains(", 3,000,000 bytes (2.86 MiB) in 2 allocations"),
        "{text}"
    );
    assert!(err.contains("1.000 s past the end of the capture"), "{err}");
    // After the child's exit only the parent's block is left.
    let (code, text, err) = run(&["table", cap, "--between", "0.62", "0.68"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("live at the combined peak between 0.620 s and 0.680 s, at 0.620 s, 1,000,000 bytes (976.56 KiB) in 1 allocation"),
        "{text}"
    );
    assert!(!text.contains("child_block"), "{text}");
    // One process's peak in a window, on the launched process's clock.
    let child = std::fs::read_dir(work.dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("wf.cap.").map(str::to_string))
        .expect("the child's capture");
    let (code, text, err) = run(&["table", cap, "--pid", &child, "--between", "0.25", "0.5"]);
    assert_eq!(code, 0, "{err}");
    let title = text.lines().next().unwrap();
    let at: f64 = title
        .split(", at ")
        .nth(1)
        .and_then(|t| t.split(" s,").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{title}"));
    assert!((0.29..0.4).contains(&at), "{title}");
    assert!(
        title
            .trim_end()
            .ends_with("2,000,000 bytes (1.91 MiB) in 1 allocation"),
        "{title}"
    );
}
