#!/usr/bin/env bash
# Benchmark: memtrack against no tracking, heaptrack and Memray, side by side: wall and CPU time as
# ratios to the plain run of the same interleaved round. Not part of the tests.
#   bench/run.sh [--runs N] [--long] [--only NAMES [--all-sections]] [--baseline DIR]
# Prints the tables and writes them to bench/RESULTS.md (with --only: target/bench/RESULTS-partial.md).
# A quick before/after: bench/run.sh --only churn,xthreads --runs 3 --baseline DIR, where DIR holds an
# earlier build's memtrack and libmemtrack.so.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
exec python3 bench/run.py "$@"
