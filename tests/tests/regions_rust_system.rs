//! A Rust program with the system allocator marks regions with `memtrack_tracker::region`;
//! under `memtrack run` the marks reach the preload library (looked up with dlsym). Runs as a
//! plain program (no libtest threads) so that the streams are exact.
mod regions_rust;

fn main() {
    regions_rust::main("system allocator");
}
