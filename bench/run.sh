#!/usr/bin/env bash
# Benchmark: memtrack against no tracking and heaptrack, side by side. Not part of the tests.
#   bench/run.sh [--runs N] [--long]
# Prints a table and writes it to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
exec python3 bench/run.py "$@"
