//! One scenario per file: this binary's global allocator is the tracker.
use std::alloc::System;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

fn counters_are_exact_for_known_allocations() {
    // The test harness's own threads may allocate concurrently: measure the closure only.
    let (v, s) = memtrack_tracker::measure(|| {
        // black_box: an unused allocation may be optimised away with its free.
        let a: Vec<u8> = std::hint::black_box(Vec::with_capacity(1000)); // 1 allocation of 1000
        let b = Box::new([0u64; 16]); // 128 bytes
        drop(a); // free 1000
        let mut c: Vec<u32> = Vec::with_capacity(10); // 40 bytes
        c.reserve_exact(90); // len 0 + 90: realloc to 90 * 4 = 360 bytes, one more allocation call
        (b, c)
    });
    assert_eq!(s.allocations, 4, "{s:?}");
    assert_eq!(s.frees, 1, "{s:?}");
    // Peak: 1000 + 128 live together.
    assert_eq!(s.peak_bytes, 1128, "{s:?}");
    // Still live at the end: the Box (128) and the grown Vec (360).
    assert_eq!(s.live_bytes, 488, "{s:?}");
    drop(v);
}

// No libtest harness: its threads allocate too, and the counters are process-wide.
fn main() {
    counters_are_exact_for_known_allocations();
    println!("alloc_counts: ok");
}
