//! The churn workload with memtrack_tracker::Tracker as the global allocator (counters only).
include!("common/churn_workload.rs");

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<std::alloc::System> =
    memtrack_tracker::Tracker::new(std::alloc::System);

fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6_800_000);
    println!("{}", run(n));
    let s = memtrack_tracker::stats();
    eprintln!(
        "allocations {} frees {} peak {}",
        s.allocations, s.frees, s.peak_bytes
    );
}
