#!/usr/bin/env bash
# The cost of a region begin/end pair (include/memtrack.h) against one allocation event pair
# (malloc + free) and to one allocation event (malloc alone), in one loop of N iterations each, plain and under memtrack (LD_PRELOAD +
# MEMTRACK_OUTPUT, as `memtrack run` sets them). Best of R runs, ns per pair.
# Usage: bench/regions.sh [N] [R]   (default 1000000 7)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
runs=${2:-7}
cargo build --release -q
lib=$PWD/target/release/libmemtrack.so
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/pairs.c" <<'C'
#include "memtrack.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    long n = atol(argv[2]);
    void *volatile sink;
    double t0 = now();
    if (strcmp(argv[1], "region") == 0) {
        for (long i = 0; i < n; i++) { memtrack_region_begin("step"); memtrack_region_end(); }
    } else if (strcmp(argv[1], "malloc") == 0) {
        /* One allocation event per iteration: the frees come after the timed loop. */
        void **keep = malloc(n * sizeof *keep);
        t0 = now();
        for (long i = 0; i < n; i++) keep[i] = malloc(64);
        double t = now() - t0;
        for (long i = 0; i < n; i++) free(keep[i]);
        printf("%.1f\n", t * 1e9 / n);
        return 0;
    } else {
        for (long i = 0; i < n; i++) { sink = malloc(64); free(sink); }
    }
    printf("%.1f\n", (now() - t0) * 1e9 / n);
    return 0;
}
C
gcc -O2 -I include -o "$dir/pairs" "$dir/pairs.c"
best() { # mode, traced(0/1)
    local b=""
    for _ in $(seq "$runs"); do
        local v
        if [ "$2" = 1 ]; then
            rm -f "$dir/p.cap"
            v=$(env LD_PRELOAD="$lib" MEMTRACK_OUTPUT="$dir/p.cap" "$dir/pairs" "$1" "$n")
        else
            v=$("$dir/pairs" "$1" "$n")
        fi
        b=$(python3 -c "print(min(float('$v'), float('${b:-1e18}')))")
    done
    echo "$b"
}
echo "| pair ($n iterations, best of $runs) | plain, ns | under memtrack, ns |"
echo "|---|---:|---:|"
echo "| region begin + end | $(best region 0) | $(best region 1) |"
echo "| malloc(64) alone (one allocation event) | $(best malloc 0) | $(best malloc 1) |"
echo "| malloc(64) + free | $(best pair 0) | $(best pair 1) |"
