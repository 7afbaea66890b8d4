//! A Rust program whose global allocator is `memtrack_tracker::Tracker` marks regions; under
//! `memtrack run` its own recorder stands down and the marks go to the preload library, as its
//! allocations do (each recorded once). Runs as a plain program (no libtest threads).
mod regions_rust;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<std::alloc::System> =
    memtrack_tracker::Tracker::new(std::alloc::System);

fn main() {
    regions_rust::main("Tracker allocator");
}
