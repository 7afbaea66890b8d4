//! One scenario: region marks made with `memtrack_tracker::region` while the program's own
//! `Tracker` records (`start`): names, nesting, and their order with the allocations of the
//! thread that made them. Runs without libtest's threads, so the figures are exact.
use memtrack_reader::{Capture, EventKind, StackTable};
use std::alloc::System;
use std::hint::black_box;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

#[inline(never)]
fn load_index() -> Vec<u8> {
    let _r = memtrack_tracker::region("load_index");
    black_box(Vec::with_capacity(3_000_000))
}

#[inline(never)]
fn rank() {
    let _r = memtrack_tracker::region("rank");
    black_box(Vec::<u8>::with_capacity(500_000));
}

#[inline(never)]
fn search(bytes: usize) {
    let _r = memtrack_tracker::region("search");
    let held: Vec<u8> = black_box(Vec::with_capacity(bytes));
    rank();
    drop(held);
}

/// One mark or heap event of a thread: `B name`, `E`, `A size`, `F`.
fn token(cap: &Capture, kind: &EventKind) -> String {
    match kind {
        EventKind::RegionBegin { region } => format!("B {}", cap.region_names[region]),
        EventKind::RegionEnd => "E".into(),
        EventKind::Alloc { size, .. } => format!("A {size}"),
        EventKind::Free { .. } => "F".into(),
        other => format!("{other:?}"),
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("memtrack-record-regions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("regions.cap");

    // Not recording: marks do nothing (and there is no preload library to reach).
    drop(memtrack_tracker::region("unrecorded"));

    let rec = memtrack_tracker::start(&path).expect("start");
    let index = load_index();
    for mb in 1..=3 {
        search(mb * 1_000_000);
    }
    let worker = std::thread::spawn(|| {
        let _r = memtrack_tracker::region("worker");
        black_box(Vec::<u8>::with_capacity(700_000));
    });
    worker.join().unwrap();
    let _open = memtrack_tracker::region("left_open");
    drop(rec);
    black_box(&index);

    let cap = Capture::open(&path).expect("open the capture");
    assert!(cap.complete());
    let mut names: Vec<&str> = cap.region_names.values().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        ["left_open", "load_index", "rank", "search", "worker"]
    );
    let main_tid = std::process::id();
    let mut stacks = StackTable::default();
    let mut main = Vec::new();
    let mut worker_marks = Vec::new();
    let mut last_seq = 0;
    for e in cap.events(&mut stacks) {
        assert!(e.seq > last_seq || last_seq == 0, "merged by seq");
        last_seq = e.seq;
        let t = token(&cap, &e.kind);
        if e.tid == main_tid {
            main.push(t);
        } else if !e.kind.is_heap() {
            worker_marks.push((e.tid, t));
        }
    }
    // The main thread's stream from the first mark on, exactly: each region's own
    // allocations between its begin and its end, nested regions inside.
    let first = main.iter().position(|t| t.starts_with('B')).unwrap();
    let mut want: Vec<String> = vec!["B load_index".into(), "A 3000000".into(), "E".into()];
    for mb in 1..=3 {
        for t in [
            "B search".to_string(),
            format!("A {}", mb * 1_000_000),
            "B rank".into(),
            "A 500000".into(),
            "F".into(),
            "E".into(),
            "F".into(),
            "E".into(),
        ] {
            want.push(t);
        }
    }
    let searches_end = first + want.len();
    assert_eq!(main[first..searches_end], want[..]);
    // The thread's begin and end are its own; the region left open has no end.
    assert_eq!(worker_marks.len(), 2, "{worker_marks:?}");
    assert_ne!(worker_marks[0].0, main_tid);
    assert_eq!(worker_marks[0].1, "B worker");
    assert_eq!(worker_marks[1].1, "E");
    let main_marks: Vec<&String> = main[searches_end..]
        .iter()
        .filter(|t| t.starts_with('B') || *t == "E")
        .collect();
    assert_eq!(main_marks, ["B left_open"]);
    // Ids are the FNV-1a hashes of the names.
    let id = cap
        .region_names
        .iter()
        .find(|(_, n)| *n == "search")
        .map(|(id, _)| *id)
        .unwrap();
    assert_eq!(id, 0x8033_28a9_u32, "fnv1a(\"search\") = {id:#x}");
    drop(_open);
    std::fs::remove_dir_all(&dir).unwrap();
    println!("record_regions: ok");
}
