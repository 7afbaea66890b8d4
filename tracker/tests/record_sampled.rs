//! One scenario: `MEMTRACK_SAMPLE_RATE` samples a Rust program's allocations through the
//! `Tracker` (the test runs itself again as the recorded child): a block far above the rate is
//! always recorded, most small ones are not, frees of unsampled blocks never reach the capture,
//! and its reallocs (old block sampled or not) leave the replay consistent.
use memtrack_reader::{Capture, Symbolizer, View};
use std::alloc::System;
use std::hint::black_box;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

const RATE: u64 = 64 * 1024;
const BIG: usize = 16 << 20;

#[inline(never)]
fn big_leak() {
    std::mem::forget(black_box(vec![1u8; BIG]));
}

#[inline(never)]
fn small_churn() {
    for i in 0..200_000u32 {
        black_box(vec![i as u8; 32]);
    }
}

#[inline(never)]
fn growing() {
    let mut v: Vec<u8> = Vec::new();
    for i in 0..(1u32 << 20) {
        v.push(i as u8);
    }
    black_box(&v);
}

fn child() {
    big_leak();
    small_churn();
    growing();
    assert!(memtrack_tracker::is_recording());
}

fn main() {
    if std::env::var_os("MEMTRACK_OUTPUT").is_some() {
        return child();
    }
    let dir = std::env::temp_dir().join(format!("memtrack-record-smp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("smp.cap");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env("MEMTRACK_OUTPUT", &path)
        .env("MEMTRACK_SAMPLE_RATE", RATE.to_string())
        .env("MEMTRACK_SAMPLE_SEED", "3")
        .status()
        .unwrap();
    assert!(status.success(), "{status}");

    let cap = Capture::open(&path).expect("open the capture");
    assert!(cap.complete(), "ended by exit");
    assert_eq!(cap.sample_rate(), Some(RATE));
    let s = cap.summary().unwrap();
    assert!(s.sampled);
    assert_eq!((s.unmatched_frees, s.overlapping_allocations), (0, 0));
    // 200,000 small blocks (6.4 MB) at one sample per 64 KiB: about 100 recorded, not 200,000.
    assert!(
        s.sampled_allocations > 20 && s.sampled_allocations < 1000,
        "{}",
        s.sampled_allocations
    );
    let mut sym = Symbolizer::new(&cap);
    let leaked_big: u64 = cap
        .view(View::Leaks)
        .folded(&mut sym)
        .iter()
        .filter(|(l, _)| l.split(';').any(|fr| fr == "record_sampled::big_leak"))
        .map(|(_, b)| b)
        .sum();
    assert_eq!(
        leaked_big, BIG as u64,
        "always sampled, standing for itself"
    );
    // What leaked is the big block and at most a sampled block or two of the runtime's own
    // (the growing vector and the small ones were freed).
    assert!(
        s.leaked_bytes >= BIG as u64 && s.leaked_bytes < BIG as u64 + (1 << 20),
        "{}",
        s.leaked_bytes
    );
    assert!(s.leaked_stderr_bytes < 1 << 20, "{}", s.leaked_stderr_bytes);
    let _ = std::fs::remove_dir_all(&dir);
    println!("record_sampled: ok");
}
