//! Mapped memory (issue 22): `mmap`, `munmap` and `mremap` recorded apart from the heap, from
//! `mapped.c` (every kind of mapping, exact sizes) and `phases.c` (a 16 MiB map in time).

use memtrack_format::EventKind;
use memtrack_reader::StackTable;
use memtrack_tests::*;

const MIB: u64 = 1 << 20;
const FILE_BYTES: u64 = 12_288;

fn table_rows(capture: &std::path::Path, extra: &[&str]) -> Vec<(String, u64, u64)> {
    let out = memtrack_ok(|c| {
        c.arg("table").arg(capture).args(extra).arg("--json");
    });
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("table JSON");
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["function"].as_str().unwrap().to_string(),
                r["total_bytes"].as_u64().unwrap(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn rows(want: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
    want.iter()
        .map(|&(f, b, c)| (f.to_string(), b, c))
        .collect()
}

#[test]
fn every_kind_of_mapping_is_recorded_exactly_and_apart_from_the_heap() {
    let work = Work::new("mapped");
    let exe = work.compile("mapped.c");
    let file = work.path("mapped-file.bin");
    let t = run_traced_ok(&work, "mapped.cap", &exe, &[&file]);
    let cap = open_capture(&t.capture);
    assert!(cap.complete());

    // The events, in order: the PROT_NONE reservation and the failed mmap are not there, nor
    // is glibc's own mapping of the 64 MiB block.
    let mut stacks = StackTable::default();
    let mapped: Vec<EventKind> = cap
        .events(&mut stacks)
        .map(|e| e.kind)
        .filter(|k| k.is_mapped())
        .collect();
    let shape: Vec<String> = mapped
        .iter()
        .map(|k| match *k {
            EventKind::Map {
                size, file, shared, ..
            } => format!("map {size} file={} shared={shared}", file != 0),
            EventKind::Unmap { size, .. } => format!("unmap {size}"),
            EventKind::Remap { old_size, size, .. } => format!("remap {old_size} -> {size}"),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        shape,
        [
            format!("map {MIB} file=false shared=false"),
            format!("map {} file=false shared=true", 2 * MIB),
            format!("map {} file=false shared=false", 3 * MIB),
            format!("unmap {MIB}"),
            format!("map {MIB} file=false shared=false"),
            format!("remap {MIB} -> {}", 4 * MIB),
            format!("map {FILE_BYTES} file=true shared=false"),
            format!("unmap {}", 2 * MIB),
        ]
    );
    let names: Vec<&String> = cap.map_files.values().collect();
    assert_eq!(names, [&file.display().to_string()]);

    // The summary: the heap is the 64 MiB block alone; mapped memory peaks after map_file.
    let json = summary_json(&t.capture);
    assert_eq!(json_u64(&json, "peak_bytes"), 64 * MIB, "{json}");
    assert_eq!(json_u64(&json, "total_allocations"), 1, "{json}");
    assert_eq!(json_u64(&json, "events"), 2, "heap events only: {json}");
    assert_eq!(
        json_u64(&json, "peak_mapped_bytes"),
        9 * MIB + FILE_BYTES,
        "{json}"
    );
    assert_eq!(
        json_u64(&json, "mapped_at_exit_bytes"),
        7 * MIB + FILE_BYTES,
        "{json}"
    );
    // (The clock is the writer's tick: a run this short may map everything at 0.)
    let when = json["peak_mapped_time_seconds"].as_f64().unwrap();
    assert!((0.0..=json["duration_seconds"].as_f64().unwrap()).contains(&when));
    let text = memtrack_ok(|c| {
        c.arg("summary").arg(&t.capture);
    });
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("  peak mapped:    9,449,472 bytes (9.01 MiB) at ",)
            && text.contains("s, 7,352,320 bytes (7.01 MiB) at exit (mmap, apart from the heap)"),
        "{text}"
    );

    // At the mapped peak, by function: the moved mapping under mremap's caller, the cut one's
    // two pieces as one mapping.
    assert_eq!(
        table_rows(&t.capture, &["--mapped"]),
        rows(&[
            ("grow_moving", 4 * MIB, 1),
            ("cut_middle", 2 * MIB, 1),
            ("map_shared", 2 * MIB, 1),
            ("map_private", MIB, 1),
            ("map_file", FILE_BYTES, 1),
        ])
    );
    // At exit: the shared mapping is gone.
    assert_eq!(
        table_rows(&t.capture, &["--mapped", "--leaks"]),
        rows(&[
            ("grow_moving", 4 * MIB, 1),
            ("cut_middle", 2 * MIB, 1),
            ("map_private", MIB, 1),
            ("map_file", FILE_BYTES, 1),
        ])
    );
    // Every mapping made (the mremap counts as one of grow_moving's).
    assert_eq!(
        table_rows(&t.capture, &["--mapped", "--allocated"]),
        rows(&[
            ("grow_moving", 5 * MIB, 2),
            ("cut_middle", 3 * MIB, 1),
            ("map_shared", 2 * MIB, 1),
            ("map_private", MIB, 1),
            ("map_file", FILE_BYTES, 1),
        ])
    );
    // The heap views are the heap's alone.
    assert_eq!(
        table_rows(&t.capture, &["--peak"]),
        rows(&[("big_malloc", 64 * MIB, 1)])
    );
    assert!(table_rows(&t.capture, &["--leaks"]).is_empty());

    // stats lists the file-backed mapping by file.
    let out = memtrack_ok(|c| {
        c.arg("stats").arg(&t.capture).arg("--json");
    });
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        st["mapped_files"],
        serde_json::json!([{
            "file": file.display().to_string(),
            "mappings": 1,
            "mapped_bytes": FILE_BYTES,
            "peak_bytes": FILE_BYTES,
            "at_exit_bytes": FILE_BYTES,
        }])
    );
    let out = memtrack_ok(|c| {
        c.arg("stats").arg(&t.capture);
    });
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "     12.00 KiB     12.00 KiB     12.00 KiB           1  {}",
        file.display()
    );
    assert!(
        text.contains("\nfile-backed mappings (mmap)\n") && text.lines().any(|l| l == want),
        "{text}"
    );
}

#[test]
fn the_phases_fixture_maps_16_mib_from_map_16mb_and_keeps_its_heap_figures() {
    let work = Work::new("mapped-phases");
    let exe = work.compile("phases.c");
    let t = run_traced_ok(&work, "phases.cap", &exe, &[] as &[&str]);
    let json = summary_json(&t.capture);
    assert_eq!(json_u64(&json, "peak_bytes"), 8_388_608, "{json}");
    assert_eq!(json_u64(&json, "peak_allocations"), 1, "{json}");
    assert_eq!(json_u64(&json, "total_allocations"), 2, "{json}");
    assert_eq!(json_u64(&json, "total_bytes"), 12_582_912, "{json}");
    assert_eq!(json_u64(&json, "events"), 4, "{json}");
    assert_eq!(json_u64(&json, "peak_mapped_bytes"), 16_777_216, "{json}");
    assert_eq!(json_u64(&json, "mapped_at_exit_bytes"), 0, "{json}");
    let when = json["peak_mapped_time_seconds"].as_f64().unwrap();
    assert!((1.55..1.9).contains(&when), "mapped at {when} s");
    assert_eq!(
        table_rows(&t.capture, &["--mapped"]),
        rows(&[("map_16mb", 16_777_216, 1)])
    );
    assert!(table_rows(&t.capture, &["--mapped", "--leaks"]).is_empty());

    // The flamegraph and the folded export of the mapped view.
    let svg = work.path("mapped.svg");
    memtrack_ok(|c| {
        c.arg("flamegraph")
            .arg(&t.capture)
            .arg("--mapped")
            .arg("-o")
            .arg(&svg);
    });
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("map_16mb"), "the SVG names map_16mb");
    assert!(
        !svg.contains("hold_8mb"),
        "no heap function in the mapped view"
    );
    let out = memtrack_ok(|c| {
        c.arg("export")
            .arg(&t.capture)
            .args(["--format", "folded", "--mapped"]);
    });
    let folded = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = folded.lines().collect();
    assert_eq!(lines.len(), 1, "{folded}");
    assert!(
        lines[0].ends_with(";map_16mb 16777216") && lines[0].contains("main;"),
        "{folded}"
    );
}

#[test]
fn mapped_views_refuse_what_they_cannot_mean() {
    let work = Work::new("mapped-flags");
    let cap = work.path("none.cap");
    for args in [
        vec!["table", "--mapped", "--temporary"],
        vec!["table", "--mapped", "--region", "x"],
    ] {
        let out = std::process::Command::new(&binaries().memtrack)
            .args(&args[..1])
            .arg(&cap)
            .args(&args[1..])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// Four threads map and unmap at once; a forked child maps memory of its own, which its own
/// capture holds (the parent's mappings it inherits are the parent's).
#[test]
fn threads_and_a_forked_child_map_exactly() {
    let work = Work::new("mapped-threads");
    let exe = work.compile("mapped_threads.c");
    let cap = work.path("threads.cap");
    memtrack_ok(|c| {
        c.arg("run")
            .arg("-o")
            .arg(&cap)
            .args(["--force", "--keep-all", "--"])
            .arg(&exe)
            .current_dir(work.dir());
    });
    let json = summary_json(&cap);
    assert_eq!(json_u64(&json, "peak_mapped_bytes"), 16 * MIB, "{json}");
    assert_eq!(json_u64(&json, "mapped_at_exit_bytes"), 8 * MIB, "{json}");
    assert!(json_u64(&json, "threads") >= 4, "{json}");
    let parent = json_u64(&json, "pid").to_string();
    assert_eq!(
        table_rows(&cap, &["--mapped", "--pid", &parent]),
        rows(&[("map_region", 16 * MIB, 256)])
    );
    assert_eq!(
        table_rows(&cap, &["--mapped", "--leaks", "--pid", &parent]),
        rows(&[("map_region", 8 * MIB, 128)])
    );
    let children: Vec<u64> = json["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(children.len(), 1, "{json}");
    let child = children[0].to_string();
    assert_eq!(
        table_rows(&cap, &["--mapped", "--leaks", "--pid", &child]),
        rows(&[("child_map", 3 * MIB, 1)])
    );
}
