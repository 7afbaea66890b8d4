//! Times the reader's phases on a capture: `cargo run --release --example readspeed -- FILE`.
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("usage: readspeed FILE");
    let t = Instant::now();
    let cap = memtrack_reader::Capture::open(&path).expect("open");
    println!(
        "open+index: {:?} ({} chunks), {}",
        t.elapsed(),
        cap.chunks.len(),
        hwm()
    );
    for _ in 0..3 {
        let t = Instant::now();
        let mut stacks = memtrack_reader::StackTable::default();
        let n = cap.events(&mut stacks).count();
        let e = t.elapsed();
        println!(
            "decode+merge: {e:?}, {n} events, {:.1} M/s",
            n as f64 / e.as_secs_f64() / 1e6
        );
        let t = Instant::now();
        let memtrack_reader::Replayed { replay: r, .. } = cap.replay();
        let e = t.elapsed();
        println!(
            "replay: {e:?}, {:.1} M/s, {}",
            r.events as f64 / e.as_secs_f64() / 1e6,
            hwm()
        );
    }
}

/// Peak and current resident memory, from /proc/self/status.
fn hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}
