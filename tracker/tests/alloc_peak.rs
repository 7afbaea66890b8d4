//! One scenario per file: reset_peak and a budget asserted the way a test would.
use std::alloc::System;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

#[inline(never)]
fn work() -> usize {
    let big = vec![1u8; 3 << 20]; // 3 MiB, freed before returning
    let small = vec![2u8; 1000];
    big.len() + small.len()
}

fn a_closure_stays_under_its_budget_and_reset_peak_restarts() {
    let (n, s) = memtrack_tracker::measure(work);
    assert_eq!(n, (3 << 20) + 1000);
    assert!(s.peak_bytes < 10 << 20, "peak {} over 10 MiB", s.peak_bytes);
    assert_eq!(s.peak_bytes, (3 << 20) + 1000);
    assert_eq!((s.allocations, s.frees, s.live_bytes), (2, 2, 0));

    let before = memtrack_tracker::stats();
    assert!(before.peak_bytes >= (3 << 20) + 1000);
    memtrack_tracker::reset_peak();
    let after = memtrack_tracker::stats();
    assert_eq!(after.peak_bytes, after.live_bytes);
    assert!(after.peak_bytes < before.peak_bytes);
}

// No libtest harness: its threads allocate too, and the counters are process-wide.
fn main() {
    a_closure_stays_under_its_budget_and_reset_peak_restarts();
    println!("alloc_peak: ok");
}
