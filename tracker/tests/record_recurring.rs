//! One scenario: the tracker linked into a Rust program records stacks that recur after others.
//! The walk reuses earlier walks (`caller_above`'s memo and the walker's recent walks); this
//! holds it to exact stacks when one function allocates for two callers whose frames are the
//! same size (only the return address above it tells them apart), and at six depths in turn
//! (more than the memo keeps). Runs without libtest's threads, so the figures are exact.
use memtrack_reader::{Capture, Symbolizer, View};
use std::alloc::System;
use std::collections::BTreeMap;
use std::hint::black_box;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

#[inline(never)]
fn leaf(n: usize) {
    black_box(Vec::<u8>::with_capacity(n));
}

// The call is not the last thing each does: no tail call, so each keeps its frame.
#[inline(never)]
fn via_x() {
    leaf(1000);
    black_box(());
}

#[inline(never)]
fn via_y() {
    leaf(3000);
    black_box(());
}

#[inline(never)]
fn drive(depth: usize, size: usize) {
    if depth > 0 {
        drive(depth - 1, size);
        black_box(());
        return;
    }
    black_box(Vec::<u8>::with_capacity(size));
}

const ROUNDS: usize = 600;
const DEPTHS: usize = 6;

fn main() {
    let dir = std::env::temp_dir().join(format!("memtrack-recurring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("recurring.cap");

    let rec = memtrack_tracker::start(&path).expect("start");
    for i in 0..ROUNDS {
        if i % 2 == 1 {
            via_x();
        } else {
            via_y();
        }
        // 100 bytes at depth 0, 101 at depth 1, ...: a size says where it came from.
        let depth = i % DEPTHS;
        drive(depth, 100 + depth);
    }
    drop(rec);

    let cap = Capture::open(&path).expect("open the capture");
    let mut sym = Symbolizer::new(&cap);
    let lines = cap.view(View::Allocated).folded(&mut sym);
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, bytes) in &lines {
        let frames: Vec<&str> = stack.split(';').collect();
        let Some(main) = frames.iter().position(|f| *f == "record_recurring::main") else {
            continue;
        };
        // What the program's frames below main say, the allocating function last.
        let ours: Vec<&str> = frames[main + 1..]
            .iter()
            .filter_map(|f| f.strip_prefix("record_recurring::"))
            .collect();
        *got.entry(ours.join(";")).or_insert(0) += bytes;
    }
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    want.insert("via_x;leaf".into(), (ROUNDS / 2 * 1000) as u64);
    want.insert("via_y;leaf".into(), (ROUNDS / 2 * 3000) as u64);
    for depth in 0..DEPTHS {
        let stack = vec!["drive"; depth + 1].join(";");
        want.insert(stack, (ROUNDS / DEPTHS * (100 + depth)) as u64);
    }
    assert_eq!(got, want, "{lines:#?}");
    let _ = std::fs::remove_dir_all(&dir);
    println!("record_recurring: ok");
}
