//! One scenario: `MEMTRACK_OUTPUT` in the environment records a Rust program from its first
//! allocation to its exit, threads included. The test runs itself again as the recorded child.
use memtrack_reader::{Capture, Symbolizer, View};
use std::alloc::System;
use std::hint::black_box;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

#[inline(never)]
fn env_leak() {
    std::mem::forget(black_box(vec![1u8; 4321]));
}

#[inline(never)]
fn worker_alloc() -> Vec<u8> {
    black_box(vec![2u8; 2048])
}

#[inline(never)]
fn churn() {
    for i in 0..100u8 {
        black_box(vec![i; 64]);
    }
}

fn child() {
    env_leak();
    churn();
    let kept = std::thread::spawn(worker_alloc).join().unwrap();
    std::mem::forget(kept);
    assert!(memtrack_tracker::is_recording());
    // Leaving main: the capture is finished at exit.
}

fn main() {
    if std::env::var_os("MEMTRACK_OUTPUT").is_some() {
        return child();
    }
    let dir = std::env::temp_dir().join(format!("memtrack-record-env-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("env.cap");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env("MEMTRACK_OUTPUT", &path)
        .status()
        .unwrap();
    assert!(status.success(), "{status}");

    let cap = Capture::open(&path).expect("open the capture");
    assert!(cap.complete(), "ended by exit");
    assert_eq!(cap.threads, 2);
    let s = cap.summary().unwrap();
    // Recorded from the first allocation on: every free has its allocation.
    assert_eq!((s.unmatched_frees, s.overlapping_allocations), (0, 0));

    let mut sym = Symbolizer::new(&cap);
    let bytes_in = |view: View, f: &str, sym: &mut Symbolizer| -> u64 {
        cap.view(view)
            .folded(sym)
            .iter()
            .filter(|(l, _)| l.split(';').any(|fr| fr == f))
            .map(|(_, b)| b)
            .sum()
    };
    assert_eq!(
        bytes_in(View::Leaks, "record_env::env_leak", &mut sym),
        4321
    );
    assert_eq!(
        bytes_in(View::Leaks, "record_env::worker_alloc", &mut sym),
        2048
    );
    assert_eq!(bytes_in(View::Leaks, "record_env::churn", &mut sym), 0);
    assert_eq!(
        bytes_in(View::Allocated, "record_env::churn", &mut sym),
        6400
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("record_env: ok");
}
