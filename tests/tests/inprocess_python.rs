//! A recording started inside a running CPython (libmemtrack.so loaded through ctypes): small
//! objects, which live in pymalloc's arenas, are recorded one by one with their Python frames,
//! both when the start holds the GIL (`memtrack.Tracker`) and when it does not (an attach's
//! injected call, where the main thread wraps the allocator through a pending call), and
//! aggregated by the tracker.

use memtrack_tests::{binaries, memtrack_ok, pythons, Py};
use std::process::Command;

fn objects_recorded(mode: &str) {
    for py in pythons() {
        objects_recorded_by(&py, mode);
    }
}

fn objects_recorded_by(py: &Py, mode: &str) {
    let w = py.work("inproc_py");
    let cap = w.path("py.cap");
    let script = memtrack_tests::fixtures_dir().join("inproc_py.py");
    let out = Command::new(&py.program)
        .arg(&script)
        .arg(&binaries().preload)
        .arg(&cap)
        .arg(mode)
        .env_remove("PYTHONMALLOC")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("object "))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(stdout.contains("status 2"), "{stdout}");
    let line = std::fs::read_to_string(&script)
        .unwrap()
        .lines()
        .position(|l| l.contains("# the object line"))
        .unwrap()
        + 1;
    let table = memtrack_ok(|c| {
        c.args(["table", "--leaks", "--by", "line", "--json"])
            .arg(&cap);
    });
    let rows: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["function"] == "fill" && r["line"] == line as u64)
        .unwrap_or_else(|| panic!("no row for fill (inproc_py.py:{line}): {rows:#}"));
    assert_eq!(row["count"], 1000, "{row:#}");
    assert_eq!(row["total_bytes"], 1000 * size, "{row:#}");
    assert_eq!(row["file"], "inproc_py.py");
    let s = memtrack_tests::summary_json(&cap);
    assert_eq!(s["aggregated"] == true, mode == "aggregate", "{s:#}");
    let fast = memtrack_tests::open_capture(&cap)
        .chunks
        .iter()
        .any(|c| c.compact == Some(memtrack_reader::ColumnEncoding::ZstdStream));
    assert_eq!(fast, mode == "fast");
    assert_eq!(s["end_reason"], "detach", "{s:#}");
}

#[test]
fn objects_with_the_gil() {
    objects_recorded("gil");
}

#[test]
fn objects_through_a_pending_call() {
    objects_recorded("pending");
}

#[test]
fn objects_aggregated() {
    objects_recorded("aggregate");
}

/// `memtrack.Tracker(encoding="fast")`'s flag: the same objects, in `EVENTS_S` chunks.
#[test]
fn objects_in_the_fast_encoding() {
    objects_recorded("fast");
}
