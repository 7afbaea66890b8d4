#!/usr/bin/env bash
# Quick start: build memtrack, build the bundled example service, track it, print the summary.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release --workspace
mkdir -p target/examples
gcc -O1 -g -pthread -o target/examples/kvcache examples/kvcache.c
./target/release/memtrack run -o target/examples/kvcache.cap --force -- ./target/examples/kvcache 200000
./target/release/memtrack summary target/examples/kvcache.cap
# The Rust example records itself (no LD_PRELOAD): memtrack_tracker::Tracker is its global allocator.
rm -f target/examples/sessions.cap
MEMTRACK_OUTPUT=target/examples/sessions.cap ./target/release/sessions
./target/release/memtrack summary target/examples/sessions.cap
