// Shared by churn_plain.rs and churn_counted.rs: Vec allocations of 16..4096 bytes through three
// call paths, freed in a ring (the churn workload of bench/churn.c, in Rust).
use std::hint::black_box;

#[inline(never)]
fn alloc_a(n: usize) -> Vec<u8> {
    Vec::with_capacity(n)
}
#[inline(never)]
fn alloc_b(n: usize) -> Vec<u8> {
    alloc_a(n)
}
#[inline(never)]
fn alloc_c(n: usize) -> Vec<u8> {
    alloc_b(n)
}

pub fn run(iterations: u64) -> usize {
    let mut slots: Vec<Vec<u8>> = (0..1024).map(|_| Vec::new()).collect();
    let mut state: u64 = 88172645463325252;
    for i in 0..iterations {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let slot = (state % 1024) as usize;
        let size = 16 + ((state >> 20) % 4081) as usize;
        slots[slot] = match i % 3 {
            0 => alloc_a(size),
            1 => alloc_b(size),
            _ => alloc_c(size),
        };
        black_box(&slots[slot]);
    }
    slots.iter().map(|s| s.capacity()).sum()
}
