#!/usr/bin/env bash
# Benchmark of memtrack attach (issue 24); not part of the tests. See bench/attach.py.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p memtrack -p memtrack-preload
exec python3 bench/attach.py "$@"
