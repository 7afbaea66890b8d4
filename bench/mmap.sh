#!/usr/bin/env bash
# Benchmark: the cost of recording mapped memory. bench/mmap.c maps, touches (one byte a
# page) and unmaps anonymous memory in a loop (an mremap growth every 8th round), plainly and
# under `memtrack run`; prints the median CPU nanoseconds per map/unmap pair of each (all the
# process's threads), and the difference: what recording adds to one pair. The first row maps
# without touching (the calls alone). Not part of the tests.
#   bench/mmap.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -q
mkdir -p target/bench
gcc -O2 -g -o target/bench/mmap bench/mmap.c
work=$(mktemp -d /tmp/memtrack-mmap-XXXXXX)
trap 'rm -rf "$work"' EXIT
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
echo "| mapping size | pages written | rounds | plain ns/pair | memtrack ns/pair | added ns/pair | ratio |"
echo "|---:|---|---:|---:|---:|---:|---:|"
for spec in 4096:100000:notouch 4096:100000:touch 65536:20000:touch 1048576:2000:touch \
    16777216:200:touch; do
    IFS=: read -r size rounds touch <<<"$spec"
    plain=() traced=()
    for _ in $(seq "$runs"); do
        plain+=("$(target/bench/mmap "$size" "$rounds" "$touch")")
        traced+=("$(target/release/memtrack run -o "$work/m.cap" --force -- \
            target/bench/mmap "$size" "$rounds" "$touch" 2>/dev/null)")
    done
    p=$(printf '%s\n' "${plain[@]}" | median)
    t=$(printf '%s\n' "${traced[@]}" | median)
    written=$([ "$touch" = touch ] && echo every || echo none)
    awk -v s="$size" -v w="$written" -v r="$rounds" -v p="$p" -v t="$t" 'BEGIN {
        printf "| %s | %s | %d | %d | %d | %+d | %.2fx |\n", s, w, r, p, t, t - p, t / p }'
done
