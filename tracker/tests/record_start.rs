//! One scenario: `memtrack_tracker::start(path)` records a Rust program's allocations, with
//! native stacks, until the guard drops. Runs without libtest's threads, so the figures are
//! exact.
use memtrack_reader::{Capture, Symbolizer, View};
use std::alloc::System;
use std::hint::black_box;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

#[inline(never)]
fn keep_blocks(out: &mut Vec<Vec<u8>>) {
    for _ in 0..3 {
        out.push(black_box(Vec::with_capacity(1000)));
    }
}

#[inline(never)]
fn temporary() {
    let v: Vec<u8> = Vec::with_capacity(5000);
    black_box(&v);
}

#[inline(never)]
fn leak() {
    std::mem::forget(black_box(Box::new([7u8; 777])));
}

#[inline(never)]
fn grow() -> Vec<u8> {
    let mut v: Vec<u8> = Vec::with_capacity(100);
    v.resize(100, 1);
    v.reserve_exact(300); // a realloc to 400 bytes
    black_box(v)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("memtrack-record-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("session.cap");

    let rec = memtrack_tracker::start(&path).expect("start");
    assert!(memtrack_tracker::is_recording());
    let mut kept: Vec<Vec<u8>> = Vec::with_capacity(3); // 72 bytes
    keep_blocks(&mut kept);
    temporary();
    leak();
    let grown = grow();
    drop(rec);
    assert!(!memtrack_tracker::is_recording());
    // Once per process.
    assert!(matches!(
        memtrack_tracker::start(dir.join("again.cap")),
        Err(memtrack_tracker::StartError::AlreadyRecorded)
    ));
    black_box((&kept, &grown));

    let cap = Capture::open(&path).expect("open the capture");
    assert!(cap.complete());
    let s = cap.summary().unwrap();
    // 72 + 3 x 1000 + 5000 + 777 + 100 + 400 (realloc) in 8 calls; the 5000 freed.
    assert_eq!(
        (s.total_allocations, s.total_bytes, s.total_frees),
        (8, 9349, 1)
    );
    assert_eq!((s.peak_bytes, s.peak_allocations), (8072, 5));
    // Live when the recording stopped: the kept blocks, the leak, the grown vector.
    assert_eq!((s.leaked_bytes, s.leaked_allocations), (4249, 6));
    assert_eq!((s.unmatched_frees, s.overlapping_allocations), (0, 0));

    // Stacks start at the program's code, with demangled Rust names.
    let mut sym = Symbolizer::new(&cap);
    let leaks = cap.view(View::Leaks);
    let lines = leaks.folded(&mut sym);
    let bytes_in = |f: &str| -> u64 {
        lines
            .iter()
            .filter(|(l, _)| l.split(';').any(|fr| fr == f))
            .map(|(_, b)| b)
            .sum()
    };
    assert_eq!(bytes_in("record_start::keep_blocks"), 3000, "{lines:#?}");
    assert_eq!(bytes_in("record_start::leak"), 777, "{lines:#?}");
    assert_eq!(bytes_in("record_start::grow"), 400, "{lines:#?}");
    assert_eq!(bytes_in("record_start::main"), 4249, "{lines:#?}");
    let peak = cap.view(View::Peak);
    let peak_lines = peak.folded(&mut sym);
    assert!(
        peak_lines
            .iter()
            .any(|(l, b)| *b == 5000 && l.split(';').any(|f| f == "record_start::temporary")),
        "{peak_lines:#?}"
    );
    // No tracker frame in any stack: the innermost frames are the allocator's callers.
    for site in &leaks.sites {
        for f in sym.stack_frames(&leaks.stacks, site.stack) {
            assert!(
                !f.function.contains("memtrack_tracker"),
                "tracker frame {f:?} in {lines:#?}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("record_start: ok");
}
