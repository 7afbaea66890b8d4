#!/usr/bin/env bash
# Benchmark of the production modes (issue 23): plain, full, sampled, aggregated, heaptrack and
# Memray's --aggregate, side by side, interleaved. Not part of the tests.
#   bench/production.sh [--runs N] [--accuracy-runs N] [--only churn,python]
# Prints tables and writes them to bench/RESULTS-production.md (bench/RESULTS.md links to it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
exec python3 bench/production.py "$@"
