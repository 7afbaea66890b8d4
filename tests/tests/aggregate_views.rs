//! Views of aggregated captures (issue 23, `memtrack run --aggregate`): memory over time from
//! the checkpoints (`plot`), and no made-up figures where a checkpoint does not keep one
//! (`table`'s Max, `summary`'s sampling count, mapped memory), from fixtures whose truth is
//! known: `agg_steps.c` (heap of 0, then 10 MiB, then 30 MiB, then 0) and `sample_mix.c`.

use memtrack_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// `agg_steps.c`'s blocks.
const TEN: u64 = 10 * MIB;
const TWENTY: u64 = 20 * MIB;
const THIRTY: u64 = TEN + TWENTY;

/// `memtrack run [--aggregate --checkpoint-interval 100ms] -o <name> [extra] -- exe`.
fn record(work: &Work, name: &str, exe: &Path, aggregate: bool, extra: &[&str]) -> PathBuf {
    let capture = work.path(name);
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.arg("run").arg("-o").arg(&capture).arg("--force");
    if aggregate {
        cmd.args(["--aggregate", "--checkpoint-interval", "100ms"]);
    }
    cmd.args(extra).arg("--").arg(exe).current_dir(work.dir());
    cmd.env_remove("MEMTRACK_LAUNCHER_PID")
        .env_remove("MEMTRACK_OUTPUT")
        .env_remove("LD_PRELOAD")
        .env_remove("MEMTRACK_SAMPLE_RATE")
        .env_remove("MEMTRACK_AGGREGATE");
    let out = cmd.output().expect("memtrack run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    capture
}

/// `memtrack ARGS` in `dir`: (exit code, stdout, stderr).
fn memtrack(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(&binaries().memtrack)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("memtrack");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `<title>` texts of an SVG, in order.
fn titles(svg: &str) -> Vec<&str> {
    svg.split("<title>")
        .skip(1)
        .filter_map(|s| s.split_once("</title>").map(|(t, _)| t))
        .collect()
}

#[test]
fn plot_of_an_aggregated_capture_draws_its_checkpoints() {
    let work = Work::new("agg_plot");
    let exe = work.compile("agg_steps.c");
    let capture = record(&work, "p.cap", &exe, true, &[]);
    let cap = open_capture(&capture);
    let c = cap.checkpoint.clone().expect("an aggregated capture");
    assert!(c.last, "the last checkpoint is written at exit");
    let points = cap.checkpoint_series();
    // About 1.2 s at one checkpoint per 100 ms (or a little more): none thinned.
    assert_eq!(points.len() as u64, c.number, "{points:?}");
    assert!(points.len() >= 8, "{points:?}");
    assert_eq!(*points.last().unwrap(), c.point());

    // The heap at each checkpoint is exactly one of the phases', in the phases' order; the
    // peak so far is the highest heap the writer had applied by then.
    let phase = |b: u64| match b {
        0 => 0,
        TEN => 1,
        THIRTY => 2,
        _ => panic!("heap {b} at a checkpoint is no phase's: {points:?}"),
    };
    let heaps: Vec<u64> = points.iter().map(|p| p.heap_bytes).collect();
    let mut stage = 0; // 0: before 10 MiB, 1: 10 MiB, 2: 30 MiB, 3: freed
    for &h in &heaps {
        stage = match (stage, phase(h)) {
            (s, 0) if s <= 0 => 0,
            (s, 1) if s <= 1 => 1,
            (s, 2) if s <= 2 => 2,
            (s, 0) if s >= 2 => 3,
            _ => panic!("heaps out of the phases' order: {heaps:?}"),
        };
    }
    assert_eq!(stage, 3, "{heaps:?}");
    assert!(heaps.contains(&TEN), "no checkpoint saw 10 MiB: {heaps:?}");
    assert!(
        heaps.contains(&THIRTY),
        "no checkpoint saw 30 MiB: {heaps:?}"
    );
    let (mut highest, mut peak) = (0, 0);
    for p in &points {
        highest = highest.max(p.heap_bytes);
        phase(p.peak_bytes);
        assert!(p.peak_bytes >= highest, "{points:?}");
        assert!(p.peak_bytes >= peak, "{points:?}");
        peak = p.peak_bytes;
    }
    assert_eq!(points.last().unwrap().heap_bytes, 0);
    assert_eq!(points.last().unwrap().peak_bytes, THIRTY);
    // Times rise; between checkpoints at least the interval, the last (at exit) apart.
    for w in points[..points.len() - 1].windows(2) {
        assert!(cap.seconds(w[1].time - w[0].time) >= 0.1, "{points:?}");
    }
    assert!(points.windows(2).all(|w| w[1].time >= w[0].time));

    // The figures: exact.
    let s = cap.summary().expect("summary");
    assert_eq!((s.peak_bytes, s.peak_allocations), (THIRTY, 2));
    assert_eq!((s.leaked_bytes, s.leaked_allocations), (0, 0));
    assert_eq!(
        (s.total_bytes, s.total_allocations, s.total_frees),
        (THIRTY, 2, 2)
    );

    // The chart says what its points are and draws each with its figures.
    let (code, _, stderr) = memtrack(&["plot", "p.cap", "-o", "p.svg"], work.dir());
    assert_eq!(code, 0, "{stderr}");
    let n = points.len();
    assert!(
        stderr.contains(&format!("memory over time from {n} checkpoints written to")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "heap peak 30.00 MiB at {:.3} s",
            cap.seconds(c.peak_time)
        )),
        "{stderr}"
    );
    let svg = std::fs::read_to_string(work.path("p.svg")).expect("p.svg");
    assert!(svg.contains("memtrack: memory over time ("), "{svg}");
    assert!(
        svg.contains("aggregated capture: one point per checkpoint, about every "),
        "{svg}"
    );
    assert!(svg.contains(&format!(" ms ({n} checkpoints)")), "{svg}");
    assert!(!svg.contains("estimates"), "not sampled: {svg}");
    assert!(svg.contains(&format!(
        "peak 30.00 MiB (31,457,280 bytes) at {:.3} s",
        cap.seconds(c.peak_time)
    )));
    assert!(svg.contains("heap in use at each checkpoint"));
    assert!(svg.contains("peak so far at each checkpoint"));
    // The heap line's dots (the first n tooltips), one per checkpoint, with its exact heap.
    let tips = titles(&svg);
    assert!(tips.len() >= n, "{tips:?}");
    for (i, (tip, p)) in tips.iter().zip(&points).enumerate() {
        let which = if i + 1 == n {
            format!("checkpoint {} (the last read)", c.number)
        } else {
            format!("checkpoint {}", i + 1)
        };
        let heap = match p.heap_bytes {
            0 => "0 bytes (0 B)".to_string(),
            TEN => "10,485,760 bytes (10.00 MiB)".to_string(),
            _ => "31,457,280 bytes (30.00 MiB)".to_string(),
        };
        let want = format!(
            "{which} at {:.3} s: heap in use {heap}, peak so far",
            cap.seconds(p.time)
        );
        assert!(tip.starts_with(&want), "{tip:?} is not {want:?}");
    }
    // Resident memory, read at each checkpoint: 30 MiB were written while both blocks lived.
    let rss = cap.checkpoint_peak_rss().expect("checkpoints read RSS");
    assert!(rss.rss_bytes >= THIRTY, "{rss:?}");
    assert!(svg.contains("resident (RSS)"));
    assert!(svg.contains(&format!(
        "highest RSS at a checkpoint {} ({} bytes) at {:.3} s",
        memtrack_reader::human_bytes(rss.rss_bytes),
        memtrack_reader::grouped(rss.rss_bytes),
        cap.seconds(rss.time)
    )));
}

#[test]
fn aggregated_reports_say_unknown_rather_than_zero() {
    let work = Work::new("agg_unknown");
    let exe = work.compile("agg_steps.c");
    let full = record(&work, "full.cap", &exe, false, &[]);
    let agg = record(&work, "agg.cap", &exe, true, &[]);

    // table: the full capture knows each site's largest block; the aggregated one does not.
    let rows = |cap: &Path| -> serde_json::Value {
        let (code, out, err) = memtrack(&["table", cap.to_str().unwrap(), "--json"], work.dir());
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).expect("table JSON")
    };
    let site = |rows: &serde_json::Value, f: &str| -> serde_json::Value {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["function"] == f)
            .unwrap_or_else(|| panic!("no {f} in {rows}"))
            .clone()
    };
    let f = rows(&full);
    assert_eq!(site(&f, "hold_20mb")["max_bytes"], TWENTY);
    assert_eq!(site(&f, "hold_10mb")["max_bytes"], TEN);
    let a = rows(&agg);
    for (name, bytes) in [("hold_20mb", TWENTY), ("hold_10mb", TEN)] {
        let r = site(&a, name);
        assert_eq!(r["total_bytes"], bytes, "{r}");
        assert_eq!(r["count"], 1, "{r}");
        assert_eq!(r["avg_bytes"], bytes, "{r}");
        assert!(r["max_bytes"].is_null(), "{r}");
    }
    let (code, text, err) = memtrack(&["table", "agg.cap"], work.dir());
    assert_eq!(code, 0, "{err}");
    let line = |f: &str| {
        text.lines()
            .find(|l| l.ends_with(f))
            .unwrap_or_else(|| panic!("no {f} row in:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line("hold_20mb"),
        "20.00 MiB - 20.00 MiB 1 hold_20mb",
        "{text}"
    );
    assert_eq!(
        line("hold_10mb"),
        "10.00 MiB - 10.00 MiB 1 hold_10mb",
        "{text}"
    );
    let (_, text, _) = memtrack(&["table", "full.cap"], work.dir());
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "20.00",
                    "MiB",
                    "20.00",
                    "MiB",
                    "20.00",
                    "MiB",
                    "1",
                    "hold_20mb"
                ]),
        "{text}"
    );

    // summary --json: what aggregated recording does not keep is null; RSS is the
    // checkpoints'.
    let j = summary_json(&agg);
    assert_eq!(j["aggregated"], true, "{j}");
    for key in [
        "overlapping_allocations",
        "peak_mapped_bytes",
        "peak_mapped_time_seconds",
        "mapped_at_exit_bytes",
    ] {
        assert!(j[key].is_null(), "{key} in {j}");
    }
    // Not sampled: every allocation was counted.
    assert_eq!(json_u64(&j, "sampled_allocations"), 2, "{j}");
    let cap = open_capture(&agg);
    let points = cap.checkpoint_series();
    let best = points
        .iter()
        .filter(|p| p.rss_bytes > 0)
        .copied()
        .reduce(|b, p| if p.rss_bytes > b.rss_bytes { p } else { b })
        .expect("RSS read at checkpoints");
    assert_eq!(json_u64(&j, "peak_rss_bytes"), best.rss_bytes, "{j}");
    assert_eq!(
        json_u64(&j, "heap_at_peak_rss_bytes"),
        best.heap_bytes,
        "{j}"
    );
    assert_eq!(
        json_u64(&j, "checkpoint_rss_bytes"),
        cap.checkpoint.as_ref().unwrap().rss_bytes,
        "{j}"
    );
    let (code, text, err) = memtrack(&["summary", "agg.cap"], work.dir());
    assert_eq!(code, 0, "{err}");
    let n = points.len();
    assert!(
        text.contains(&format!(
            "  peak RSS:       {} bytes ({}) at {:.3} s (the highest read at {n} checkpoints; heap then: ",
            memtrack_reader::grouped(best.rss_bytes),
            memtrack_reader::human_bytes(best.rss_bytes),
            cap.seconds(best.time)
        )),
        "{text}"
    );
    assert!(
        text.contains("  RSS last read:  ") && text.contains(&format!("at checkpoint {n} (")),
        "{text}"
    );
    // Tree and flamegraph: the exact per-stack bytes.
    let (code, text, err) = memtrack(&["tree", "agg.cap"], work.dir());
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("31,457,280 bytes (30.00 MiB) in 2 allocations"),
        "{text}"
    );
    let (code, _, err) = memtrack(&["flamegraph", "agg.cap", "-o", "f.svg"], work.dir());
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(work.path("f.svg")).unwrap();
    assert!(
        svg.contains("hold_20mb (20,971,520 bytes, 66.67%)"),
        "{svg}"
    );
    assert!(
        svg.contains("hold_10mb (10,485,760 bytes, 33.33%)"),
        "{svg}"
    );
}

#[test]
fn sampled_aggregated_summary_states_sampling_once() {
    let work = Work::new("agg_sampled");
    let exe = work.compile("sample_mix.c");
    let capture = record(
        &work,
        "s.cap",
        &exe,
        true,
        &["--sample-rate", "512KiB", "--sample-seed", "3"],
    );
    let (code, text, err) = memtrack(&["summary", "s.cap"], work.dir());
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        text.matches("512.00 KiB").count() + text.matches("524,288").count(),
        1,
        "one statement of the sampling:\n{text}"
    );
    assert!(
        text.contains("  sampling:       heap figures are estimates from allocations sampled at 512.00 KiB (each stands for"),
        "{text}"
    );
    assert!(!text.contains("from 0 allocations"), "{text}");
    assert!(
        text.contains("  aggregated:     from checkpoint "),
        "{text}"
    );
    assert!(text.contains("  peak RSS:       "), "{text}");
    let j = summary_json(&capture);
    assert!(json_bool(&j, "sampled"), "{j}");
    assert_eq!(json_u64(&j, "sample_rate_bytes"), 512 * 1024);
    assert!(j["sampled_allocations"].is_null(), "{j}");

    // The plot says its figures are estimates, at which rate.
    let (code, _, err) = memtrack(&["plot", "s.cap", "-o", "s.svg"], work.dir());
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(work.path("s.svg")).unwrap();
    assert!(
        svg.contains("heap figures are estimates from allocations sampled at 512.00 KiB"),
        "{svg}"
    );
    assert!(svg.contains("peak \u{2248} "), "{svg}");
    // The table's Max stays unknown here too.
    let (_, out, _) = memtrack(&["table", "s.cap", "--json"], work.dir());
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["max_bytes"].is_null()),
        "{rows}"
    );
}

#[test]
fn an_aggregated_process_tree_has_no_made_up_combined_peak() {
    let work = Work::new("agg_tree");
    let exe = work.compile("forks.c");
    record(&work, "t.cap", &exe, true, &["--keep-all"]);
    let j = summary_json(&work.path("t.cap"));
    assert!(j["combined_peak_bytes"].is_null(), "{j}");
    assert!(j["combined_peak_time_seconds"].is_null(), "{j}");
    let procs = j["processes"].as_array().expect("processes");
    assert_eq!(procs.len(), 4, "{j}");
    assert!(
        procs.iter().all(|p| p["bytes_at_combined_peak"].is_null()),
        "{j}"
    );
    // Each process's own figures are exact (forks.c's truth).
    let mut leaked: Vec<u64> = procs.iter().map(|p| json_u64(p, "leaked_bytes")).collect();
    leaked.sort_unstable();
    assert_eq!(leaked, [1000, 2000, 4000, 7000], "{j}");
    let (code, text, err) = memtrack(&["summary", "t.cap"], work.dir());
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("  combined peak:  at most 14,800 bytes"),
        "{text}"
    );
    assert!(!text.contains("0 bytes at "), "{text}");

    // The tree's peak views are each process's own peak, summed: a bound, said so; check
    // --max-peak compares that bound.
    let (code, text, err) = memtrack(&["table", "t.cap", "--json"], work.dir());
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
    let total: u64 = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["total_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 14_800, "{rows}");
    let (code, out, err) = memtrack(&["check", "t.cap", "--max-peak", "14800"], work.dir());
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = memtrack(&["check", "t.cap", "--max-peak", "14799"], work.dir());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the sum of their peaks"), "{out}");

    // What needs the processes lined up in time refuses, naming --pid.
    for args in [
        &["diff", "t.cap", "t.cap", "--format", "table"][..],
        &["plot", "t.cap", "-o", "p.svg"],
    ] {
        let (code, _, err) = memtrack(args, work.dir());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("aggregated capture") && err.contains("--pid PID"),
            "{args:?}: {err}"
        );
    }
    let (code, text, err) = memtrack(&["table", "t.cap", "--leaks", "--json"], work.dir());
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
    let total: u64 = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["total_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 14_000, "{rows}");
    let (code, _, err) = memtrack(&["check", "t.cap", "--max-leaked", "14000"], work.dir());
    assert_eq!(code, 0, "{err}");
    // One process of the tree plots from its own checkpoints.
    let child = procs
        .iter()
        .find(|p| json_u64(p, "leaked_bytes") == 7000)
        .map(|p| json_u64(p, "pid"))
        .unwrap();
    let pid = child.to_string();
    let (code, _, err) = memtrack(&["plot", "t.cap", "--pid", &pid, "-o", "c.svg"], work.dir());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("from its one checkpoint written to"), "{err}");
    let svg = std::fs::read_to_string(work.path("c.svg")).unwrap();
    assert!(
        svg.contains("aggregated capture: a single checkpoint, at "),
        "{svg}"
    );
}
