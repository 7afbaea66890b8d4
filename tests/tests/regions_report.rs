//! `memtrack regions`, `--region` on the views, and `check --region`, on a capture whose truth
//! is known: it is written here, event by event, in the format's stream encoding.

use memtrack_format::{
    encode_stream, put_record, record, AllocKind, ChunkHeader, EndReason, EndRecord, EventKind,
    Header, Item, RegionNameRecord,
};
use memtrack_tests::*;
use std::path::Path;
use std::process::Command;

/// `memtrack args` in `dir`, frames as module+offset (the synthetic captures name no module).
fn memtrack(args: &[&str], dir: &Path) -> Run {
    run_memtrack(args, dir, false)
}

/// `memtrack args` in `dir`, symbolized (captures of the C fixture).
fn memtrack_sym(args: &[&str], dir: &Path) -> Run {
    run_memtrack(args, dir, true)
}

fn run_memtrack(args: &[&str], dir: &Path, symbolize: bool) -> Run {
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.args(args).current_dir(dir);
    if !symbolize {
        cmd.env("MEMTRACK_SYMBOLIZE", "0");
    }
    let out = cmd.output().expect("memtrack runs");
    Run {
        status: out.status,
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn alloc(addr: u64, size: u64, stack: u64) -> EventKind {
    EventKind::Alloc {
        kind: AllocKind::Malloc,
        addr,
        size,
        stack: stack as u32,
    }
}

/// Writes a capture of these region names and events `(seq, tid, kind)` (time: 10 ms × seq),
/// one chunk per thread; stack `n` (1..=7) is one frame at 0x1000 × n.
fn write_capture(path: &Path, names: &[(u32, &str)], events: &[(u64, u32, EventKind)]) {
    let mut file = Header {
        version: memtrack_format::FORMAT_VERSION,
        pid: 4242,
        clock_unit_ns: 1_000_000,
        executable: "/bin/pipeline".into(),
        argv: vec!["pipeline".into()],
        pointer_size: 8,
        machine: 62,
        ..Default::default()
    }
    .encode();
    for &(id, n) in names {
        let r = RegionNameRecord {
            id,
            name: n.as_bytes().to_vec(),
        };
        put_record(&mut file, record::REGION_NAME, &r.encode());
    }
    let mut tids: Vec<u32> = events.iter().map(|e| e.1).collect();
    tids.sort_unstable();
    tids.dedup();
    for (k, tid) in tids.into_iter().enumerate() {
        let mine: Vec<_> = events.iter().filter(|e| e.1 == tid).collect();
        let mut items = Vec::new();
        if k == 0 {
            for n in 1..=7u64 {
                items.push(Item::Node {
                    id: n,
                    parent: 0,
                    ip: 0x1000 * n,
                });
            }
        }
        for &&(seq, _, kind) in &mine {
            items.push(Item::Event {
                seq,
                time: seq * 10,
                kind,
            });
        }
        let first = mine[0].0 - 1;
        let h = ChunkHeader {
            tid,
            base_seq: first,
            base_time: first * 10,
        };
        put_record(&mut file, record::EVENTS, &encode_stream(&h, &items));
    }
    let last = events.iter().map(|e| e.0).max().unwrap_or(0);
    let end = EndRecord {
        seq: last + 1,
        time: last * 10,
        reason: EndReason::Exit,
        next_stack_id: 8,
    };
    file.extend_from_slice(&end.encode_framed());
    std::fs::write(path, file).unwrap();
}

/// load keeps 3,000 bytes; search (thread 1) allocates 2,000 (stack 3), a nested rank holds
/// 500 (stack 4) and frees them, the 2,000 are realloc'd to 4,000 (stack 3) and freed, then
/// 100 + 300 (stack 6), of which thread 2 frees the 100; thread 2's own search holds 700 + 50
/// (stack 7) and is left open at its last event; thread 1 then allocates 10,000 outside any
/// region (stack 1) and frees thread 2's 700.
fn pipeline(path: &Path) {
    let realloc = EventKind::Alloc {
        kind: AllocKind::Realloc,
        addr: 0x5000,
        size: 4000,
        stack: 3,
    };
    let (begin, end) = (
        |r| EventKind::RegionBegin { region: r },
        EventKind::RegionEnd,
    );
    let free = |addr| EventKind::Free { addr };
    write_capture(
        path,
        &[(11, "load"), (22, "search"), (33, "rank")],
        &[
            (1, 1, alloc(0x1000, 1000, 1)),
            (2, 1, begin(11)),
            (3, 1, alloc(0x2000, 3000, 2)),
            (4, 1, end),
            (5, 1, begin(22)),
            (6, 1, alloc(0x3000, 2000, 3)),
            (7, 1, begin(33)),
            (8, 1, alloc(0x4000, 500, 4)),
            (9, 1, free(0x4000)),
            (10, 1, end),
            (11, 1, EventKind::ReallocFree { addr: 0x3000 }),
            (12, 1, realloc),
            (13, 2, alloc(0x6000, 1000, 5)),
            (14, 1, free(0x5000)),
            (15, 1, alloc(0x7000, 100, 6)),
            (16, 1, alloc(0x8000, 300, 6)),
            (17, 2, free(0x7000)),
            (18, 1, end),
            (19, 2, begin(22)),
            (20, 2, alloc(0x9000, 700, 7)),
            (21, 2, alloc(0xa000, 50, 7)),
            (22, 1, alloc(0xb000, 10000, 1)),
            (23, 1, free(0x9000)),
        ],
    );
}

#[test]
fn regions_report_text_and_json() {
    let work = Work::new("regions_report");
    pipeline(&work.path("p.cap"));
    let r = memtrack(&["regions", "p.cap"], work.dir());
    assert_eq!(r.code(), Some(0), "{r:?}");
    let text = r.stdout_text();
    assert_eq!(
        text,
        concat!(
            "memtrack regions of p.cap: 3 regions, 4 occurrences\n",
            "Peak growth |   Max heap | Avg growth |  Allocated | Retained | Count | Time (s) | Region\n",
            "   3.91 KiB |   8.79 KiB |   2.32 KiB |   7.47 KiB | 1.03 KiB |     2 |    0.150 | search (1 left open)\n",
            "      500 B |   6.35 KiB |      500 B |      500 B |      0 B |     1 |    0.030 |   rank\n",
            "   2.93 KiB |   3.91 KiB |   2.93 KiB |   2.93 KiB | 2.93 KiB |     1 |    0.020 | load\n",
        )
    );
    let r = memtrack(&["regions", "p.cap", "--sort", "retained"], work.dir());
    let order: Vec<String> = r
        .stdout_text()
        .lines()
        .skip(2)
        .map(|l| l.rsplit(" | ").next().unwrap().to_string())
        .collect();
    assert_eq!(order, ["load", "search (1 left open)", "  rank"]);

    let r = memtrack(&["regions", "p.cap", "--json"], work.dir());
    assert_eq!(r.code(), Some(0), "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let keys = [
        "name",
        "path",
        "occurrences",
        "peak_growth_bytes",
        "avg_growth_bytes",
        "heap_peak_bytes",
        "allocated_bytes",
        "allocations",
        "retained_bytes",
        "total_seconds",
        "max_seconds",
        "top_locations",
    ];
    for row in rows {
        for k in keys {
            assert!(row.get(k).is_some(), "{k} missing in {row}");
        }
    }
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["search", "rank", "load"]);
    assert_eq!(
        region_rows("p.cap", work.dir()),
        rows_of(&[
            ("search", [2, 4000, 2375, 9000, 7650, 7, 1050, 1]),
            ("search/rank", [1, 500, 500, 6500, 500, 1, 0, 0]),
            ("load", [1, 3000, 3000, 4000, 3000, 1, 3000, 0]),
        ])
    );
    let secs: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            let s = |k: &str| (r[k].as_f64().unwrap() * 1000.0).round();
            (s("total_seconds"), s("max_seconds"))
        })
        .collect();
    assert_eq!(secs, [(150.0, 130.0), (30.0, 30.0), (20.0, 20.0)]);
    // At search's largest peak its own live block is the realloc'd 4,000 bytes of stack 3.
    let top = &rows[0]["top_locations"];
    println!("{top}");
    assert_eq!(top.as_array().unwrap().len(), 1);
    assert_eq!(top[0]["total_bytes"], 4000);
}

#[test]
fn a_capture_without_regions_says_so() {
    let work = Work::new("regions_none");
    write_capture(
        &work.path("n.cap"),
        &[],
        &[
            (1, 1, alloc(0x10, 8, 1)),
            (2, 1, EventKind::Free { addr: 0x10 }),
        ],
    );
    let r = memtrack(&["regions", "n.cap"], work.dir());
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(
        r.stdout_text()
            .starts_with("n.cap: no regions: the program marked none"),
        "{}",
        r.stdout_text()
    );
    let r = memtrack(&["regions", "n.cap", "--json"], work.dir());
    assert_eq!(r.stdout_text(), "[]\n");
    let r = memtrack(&["table", "n.cap", "--region", "search"], work.dir());
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains("n.cap: no region named \"search\": the capture has no regions"),
        "{}",
        r.stderr
    );
}

#[test]
fn region_views_attribute_the_regions_bytes() {
    let work = Work::new("regions_views");
    pipeline(&work.path("p.cap"));
    // Live at search's largest peak: its realloc'd block.
    let r = memtrack(
        &[
            "export", "p.cap", "--format", "folded", "--region", "search",
        ],
        work.dir(),
    );
    assert_eq!(
        (r.code(), r.stdout_text()),
        (Some(0), "0x3000 4000\n".into()),
        "{r:?}"
    );
    let r = memtrack(
        &[
            "export",
            "p.cap",
            "--format",
            "folded",
            "--region",
            "search",
            "--allocated",
        ],
        work.dir(),
    );
    assert_eq!(
        r.stdout_text(),
        "0x3000 6000\n0x4000 500\n0x6000 400\n0x7000 750\n"
    );
    let r = memtrack(
        &[
            "export", "p.cap", "--format", "folded", "--region", "search", "--leaks",
        ],
        work.dir(),
    );
    assert_eq!(r.stdout_text(), "0x6000 300\n0x7000 50\n");
    let r = memtrack(
        &["table", "p.cap", "--region", "search/rank", "--json"],
        work.dir(),
    );
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(
        (v[0]["function"].as_str(), v[0]["total_bytes"].as_u64()),
        (Some("0x4000"), Some(500))
    );
    assert_eq!(v.as_array().unwrap().len(), 1);
    let r = memtrack(&["table", "p.cap", "--region", "load"], work.dir());
    assert!(
        r.stdout_text()
            .starts_with("memtrack table of p.cap: live at the peak, region load, 3,000 bytes"),
        "{}",
        r.stdout_text()
    );
    let r = memtrack(
        &["flamegraph", "p.cap", "--region", "search/rank"],
        work.dir(),
    );
    assert_eq!(r.code(), Some(0), "{r:?}");
    let svg = std::fs::read_to_string(work.path("p-search-rank-peak.svg")).unwrap();
    assert!(svg.contains("0x4000") && !svg.contains("0x3000"));
    // The same capture on both sides: nothing grew.
    let r = memtrack(
        &[
            "diff", "p.cap", "p.cap", "--region", "search", "--format", "folded",
        ],
        work.dir(),
    );
    assert_eq!(
        (r.code(), r.stdout_text()),
        (Some(0), "0x3000 4000 4000\n".into()),
        "{r:?}"
    );
    // Unknown names are errors that list the capture's names.
    for cmd in ["table", "tree", "flamegraph"] {
        let r = memtrack(&[cmd, "p.cap", "--region", "index"], work.dir());
        assert_eq!(r.code(), Some(2), "{r:?}");
        assert!(
            r.stderr
                .contains("p.cap: no region named \"index\" (its regions: load, rank, search)"),
            "{}",
            r.stderr
        );
    }
    let r = memtrack(
        &["table", "p.cap", "--region", "load", "--temporary"],
        work.dir(),
    );
    assert_eq!(r.code(), Some(2), "{r:?}");
}

#[test]
fn check_applies_limits_after_each_region_to_it() {
    let work = Work::new("regions_check");
    pipeline(&work.path("p.cap"));
    let check = |args: &[&str]| {
        let mut a = vec!["check", "p.cap"];
        a.extend_from_slice(args);
        memtrack(&a, work.dir())
    };
    // search: peak growth 4,000, allocated 7,650, retained 1,050; load retains 3,000.
    let r = check(&[
        "--max-peak",
        "16050",
        "--region",
        "search",
        "--max-peak",
        "4000",
        "--max-total",
        "7650",
        "--region",
        "load",
        "--max-leaked",
        "3000",
    ]);
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(
        r.stdout_text().contains("result: all 4 limits hold"),
        "{}",
        r.stdout_text()
    );
    let r = check(&["--region", "search", "--max-peak", "3999", "--json"]);
    assert_eq!(r.code(), Some(1), "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let l = &v["limits"][0];
    assert_eq!(
        (
            l["region"].as_str(),
            l["name"].as_str(),
            l["measured"].as_u64(),
            l["exceeded"].as_bool()
        ),
        (Some("search"), Some("max_peak"), Some(4000), Some(true))
    );
    assert_eq!(l["top"][0]["frames"][0], "0x3000");
    let r = check(&["--region", "search", "--max-leaked", "1049"]);
    assert_eq!(r.code(), Some(1), "{r:?}");
    assert!(
        r.stdout_text()
            .contains("[search] max-leaked      1,050 bytes"),
        "{}",
        r.stdout_text()
    );
    // A limit before any --region is the process's, as before (the heap peak is 16,050).
    let r = check(&[
        "--max-peak",
        "16049",
        "--region",
        "load",
        "--max-peak",
        "3000",
    ]);
    assert_eq!(r.code(), Some(1), "{r:?}");
    assert!(
        r.stdout_text()
            .contains("[load] max-peak          3,000 bytes"),
        "{}",
        r.stdout_text()
    );
    for (args, message) in [
        (
            &["--region", "nope", "--max-peak", "1"][..],
            "no region named \"nope\"",
        ),
        (
            &["--region", "load"][..],
            "--region load has no limit after it",
        ),
        (
            &["--region", "load", "--max-peak", "1", "--max-peak", "2"][..],
            "--max-peak given twice for --region load",
        ),
        (
            &["--region", "load", "--max-leaked-allocations", "1"][..],
            "--max-leaked-allocations does not apply to a region",
        ),
    ] {
        let r = check(args);
        assert_eq!(r.code(), Some(2), "{args:?}: {r:?}");
        assert!(r.stderr.contains(message), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn plot_draws_a_band_per_region() {
    let work = Work::new("regions_plot");
    pipeline(&work.path("p.cap"));
    let r = memtrack(&["plot", "p.cap", "-o", "p.svg"], work.dir());
    assert_eq!(r.code(), Some(0), "{r:?}");
    let svg = std::fs::read_to_string(work.path("p.svg")).unwrap();
    assert!(svg.contains(">regions (largest peak growth first)</text>"));
    let labels: Vec<&str> = svg
        .split("font-size=\"11\">")
        .skip(1)
        .map(|s| s.split('<').next().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "search (peak +3.91 KiB)",
            "load (peak +2.93 KiB)",
            "search/rank (peak +500 B)"
        ]
    );
    // One span per occurrence; the capture spans 230 ms over 870 pixels from x = 100: load
    // runs from 20 to 40 ms.
    assert_eq!(svg.matches("<rect x=").count(), 4);
    assert!(
        svg.contains("<rect x=\"175.7\" y=\"508.0\" width=\"75.7\" height=\"12\""),
        "{svg}"
    );
}

/// `[path, occurrences, peak growth, avg growth, heap peak, allocated, allocations, retained,
/// unclosed]` per row of `memtrack regions --json`.
fn region_rows(cap: &str, dir: &Path) -> Vec<(String, Vec<u64>)> {
    let r = memtrack_sym(&["regions", cap, "--json"], dir);
    assert_eq!(r.code(), Some(0), "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let keys = [
                "occurrences",
                "peak_growth_bytes",
                "avg_growth_bytes",
                "heap_peak_bytes",
                "allocated_bytes",
                "allocations",
                "retained_bytes",
                "unclosed",
            ];
            (
                r["path"].as_str().unwrap().to_string(),
                keys.iter().map(|k| r[*k].as_u64().unwrap()).collect(),
            )
        })
        .collect()
}

fn rows_of(want: &[(&str, [u64; 8])]) -> Vec<(String, Vec<u64>)> {
    want.iter()
        .map(|(p, v)| (p.to_string(), v.to_vec()))
        .collect()
}

/// The C pipeline of the issue recorded for real: `load_index` keeps 3,000,000 bytes; `search_batch`
/// runs three times holding 1, 2 and 3 MB with `rank`'s 500,000 on top; `at_exit` is left open
/// by exit(0); nothing else allocates before them (the heap starts at 0).
#[test]
fn c_pipeline_regions_exact() {
    let work = Work::new("regions_c_pipeline");
    let exe = work.compile("regions_pipeline.c");
    run_traced_ok(&work, "p.cap", &exe, &[] as &[&str]);
    let pipeline = [
        (
            "search_batch",
            [3, 3_500_000, 2_500_000, 6_500_000, 7_500_000, 6, 0, 0],
        ),
        (
            "search_batch/rank",
            [3, 500_000, 500_000, 6_500_000, 1_500_000, 3, 0, 0],
        ),
        (
            "load_index",
            [
                1, 3_000_000, 3_000_000, 3_000_000, 3_000_000, 1, 3_000_000, 0,
            ],
        ),
    ];
    let mut want = rows_of(&pipeline);
    want.extend(rows_of(&[(
        "at_exit",
        [1, 250_000, 250_000, 3_250_000, 250_000, 1, 250_000, 1],
    )]));
    assert_eq!(region_rows("p.cap", work.dir()), want);
    // Figures wider than a head ("244.14 KiB" under "Retained") widen its column: every row's
    // separators stand under the header's.
    let r = memtrack_sym(&["regions", "p.cap"], work.dir());
    let text = String::from_utf8(r.stdout).unwrap();
    let bars = |l: &str| -> Vec<usize> { l.match_indices(" | ").map(|(i, _)| i).collect() };
    let mut lines = text.lines().skip(1);
    let head = lines.next().unwrap();
    assert!(head.contains("|   Retained |"), "{text}");
    assert!(lines.all(|l| bars(l) == bars(head)), "{text}");
    // The summary says the capture has regions, and where to look.
    let r = memtrack_sym(&["summary", "p.cap"], work.dir());
    assert!(
        String::from_utf8_lossy(&r.stdout).contains(
            "\n  regions:        4 marked (at_exit, load_index, rank, search_batch): memtrack regions ranks them\n"
        ),
        "{r:?}"
    );
    let r = memtrack_sym(&["regions", "p.cap", "--json"], work.dir());
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let top: Vec<(String, u64)> = v[0]["top_locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["function"].as_str().unwrap().to_string(),
                t["total_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        top,
        [
            ("search_batch".to_string(), 3_000_000),
            ("rank".to_string(), 500_000)
        ]
    );

    // --region attributes the region's bytes to the functions that allocated them.
    let table = |args: &[&str]| -> Vec<(String, u64, u64)> {
        let mut a = vec!["table", "p.cap", "--json"];
        a.extend_from_slice(args);
        let r = memtrack_sym(&a, work.dir());
        assert_eq!(r.code(), Some(0), "{r:?}");
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["function"].as_str().unwrap().to_string(),
                    t["total_bytes"].as_u64().unwrap(),
                    t["count"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let s = |f: &str, b, c| (f.to_string(), b, c);
    assert_eq!(
        table(&["--region", "search_batch"]),
        [s("search_batch", 3_000_000, 1), s("rank", 500_000, 1)]
    );
    assert_eq!(
        table(&["--region", "search_batch", "--allocated"]),
        [s("search_batch", 6_000_000, 3), s("rank", 1_500_000, 3)]
    );
    assert_eq!(
        table(&["--region", "rank", "--allocated"]),
        [s("rank", 1_500_000, 3)]
    );
    assert_eq!(
        table(&["--region", "load_index", "--leaks"]),
        [s("load_index", 3_000_000, 1)]
    );
    assert_eq!(
        table(&["--region", "at_exit", "--leaks"]),
        [s("main", 250_000, 1)]
    );
    let r = memtrack_sym(
        &[
            "export",
            "p.cap",
            "--format",
            "folded",
            "--region",
            "search_batch/rank",
        ],
        work.dir(),
    );
    let lines: Vec<&str> = r.stdout_text().leak().lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].ends_with(";search_batch;rank 500000"), "{lines:?}");

    // Budgets per region, then the whole process's, from one command line.
    let r = memtrack_sym(
        &[
            "check",
            "p.cap",
            "--max-peak",
            "6500000",
            "--region",
            "search_batch",
            "--max-peak",
            "3500000",
            "--max-total",
            "7500000",
            "--region",
            "load_index",
            "--max-leaked",
            "3000000",
        ],
        work.dir(),
    );
    assert_eq!(r.code(), Some(0), "{r:?}");
    let r = memtrack_sym(
        &[
            "check",
            "p.cap",
            "--region",
            "search_batch",
            "--max-peak",
            "3499999",
        ],
        work.dir(),
    );
    assert_eq!(r.code(), Some(1), "{r:?}");
    assert!(
        r.stdout_text()
            .contains("2.86 MiB in 1 allocation: search_batch (regions_pipeline.c:")
            && r.stdout_text()
                .contains("488.28 KiB in 1 allocation: rank (regions_pipeline.c:"),
        "{}",
        r.stdout_text()
    );

    // `run` takes the same budgets (reported on standard error).
    let exe_s = exe.to_str().unwrap();
    for (limit, code) in [("3500000", 0), ("3499999", 1)] {
        let r = memtrack_sym(
            &[
                "run",
                "-o",
                "r.cap",
                "--force",
                "--region",
                "search_batch",
                "--max-peak",
                limit,
                "--",
                exe_s,
            ],
            work.dir(),
        );
        assert_eq!(r.code(), Some(code), "{r:?}");
        assert!(
            r.stderr
                .contains("[search_batch] max-peak  3,500,000 bytes"),
            "{}",
            r.stderr
        );
    }
}

/// A second thread's regions are its own; one left open when the thread exits ends at its
/// last event. SIGKILL leaves a region open too.
#[test]
fn c_pipeline_regions_thread_and_kill() {
    let work = Work::new("regions_c_thread");
    let exe = work.compile("regions_pipeline.c");
    run_traced_ok(&work, "t.cap", &exe, &["thread"]);
    let got = region_rows("t.cap", work.dir());
    let find = |p: &str| {
        got.iter()
            .find(|r| r.0 == p)
            .unwrap_or_else(|| panic!("{p}: {got:?}"))
            .1
            .clone()
    };
    // The pipeline's figures are unchanged by the thread, which runs after it.
    assert_eq!(find("search_batch")[..3], [3, 3_500_000, 2_500_000]);
    let worker = find("worker");
    assert_eq!(
        (worker[0], worker[1], worker[4], worker[5], worker[6], worker[7]),
        (1, 700_000, 700_000, 1, 0, 0)
    );
    let tail = find("worker_tail");
    assert_eq!(
        (tail[0], tail[1], tail[4], tail[5], tail[6], tail[7]),
        (1, 100_000, 100_000, 1, 100_000, 1)
    );
    // The main thread's at_exit does not count the worker's 100,000 kept bytes.
    let at_exit = find("at_exit");
    assert_eq!(
        (at_exit[1], at_exit[4], at_exit[6], at_exit[7]),
        (250_000, 250_000, 250_000, 1)
    );

    let t = run_traced(&work, "k.cap", &exe, &["kill"]);
    assert_eq!(t.run.code(), Some(128 + 9), "killed: {:?}", t.run);
    assert_eq!(
        region_rows("k.cap", work.dir()),
        rows_of(&[
            (
                "load_index",
                [1, 3_000_000, 3_000_000, 3_000_000, 3_000_000, 1, 3_000_000, 0]
            ),
            (
                "doomed",
                [1, 1_000_000, 1_000_000, 4_000_000, 1_000_000, 1, 1_000_000, 1]
            ),
        ])
    );
}

/// A pre-fork server: only the workers mark regions. Without `--pid`, `regions` and
/// `check --region` read every process that marked them; peaks are the largest of any
/// process, totals add up.
#[test]
fn regions_of_forked_workers_are_reported_and_checked_together() {
    let work = Work::new("regions_fork");
    let exe = work.compile("regions_fork.c");
    run_traced_ok(&work, "f.cap", &exe, &[] as &[&str]);
    assert_eq!(
        region_rows("f.cap", work.dir()),
        rows_of(&[(
            "request",
            [2, 3_000_000, 2_500_000, 3_000_000, 5_000_000, 2, 0, 0]
        )])
    );
    let r = memtrack_sym(&["regions", "f.cap"], work.dir());
    assert!(
        r.stdout_text()
            .contains("1 region, 2 occurrences in 2 processes"),
        "{r:?}"
    );
    let check = |args: &[&str]| {
        let mut a = vec!["check", "f.cap", "--region", "request"];
        a.extend_from_slice(args);
        memtrack_sym(&a, work.dir())
    };
    let r = check(&["--max-peak", "3000000", "--max-total", "5000000"]);
    assert_eq!(r.code(), Some(0), "{r:?}");
    let r = check(&["--max-peak", "2999999"]);
    assert_eq!(r.code(), Some(1), "{r:?}");
    let text = r.stdout_text();
    assert!(
        text.contains("[request] max-peak       3,000,000 bytes"),
        "{text}"
    );
    // Both workers are named, the larger first, and the stacks are that worker's.
    let pids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("pid "))
        .collect();
    assert_eq!(pids.len(), 2, "{text}");
    assert!(pids[0].contains(": 3,000,000 bytes"), "{text}");
    assert!(pids[1].contains(": 2,000,000 bytes"), "{text}");
    assert!(
        text.contains("2.86 MiB in 1 allocation: handle (regions_fork.c:"),
        "{text}"
    );
}
