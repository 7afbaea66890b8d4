//! The churn workload with the system allocator (baseline for churn_counted).
include!("common/churn_workload.rs");

fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6_800_000);
    println!("{}", run(n));
}
