#!/usr/bin/env bash
# Process trees: a make-like loop of N short programs, each allocating 2,000,000 bytes (so none is
# folded as a helper). Prints the loop's time plain and under `memtrack run`, the files left, and how
# long `summary` and `flamegraph` of the whole tree take. Usage: bench/tree.sh [N] (default 500).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-500}
cargo build --release -q
m=$PWD/target/release/memtrack
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/big.c" <<'C'
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) void *grab(size_t n) { void *p = malloc(n); memset(p, 1, n); return p; }
int main(void) { void *volatile p = grab(2000000); free(p); return 0; }
C
gcc -O1 -o "$dir/big" "$dir/big.c"
printf '#!/bin/sh\ni=0\nwhile [ $i -lt %d ]; do ./big; i=$((i+1)); done\n' "$n" > "$dir/loop.sh"
chmod +x "$dir/loop.sh"
cd "$dir"
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
plain=$(secs ./loop.sh)
traced=$(secs "$m" run -o t.cap -- ./loop.sh)
files=$(ls t.cap* | wc -l)
summary=$(secs "$m" summary t.cap)
flame=$(secs "$m" flamegraph t.cap)
procs=$("$m" summary --json t.cap | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["processes"]))')
echo "| processes | plain | memtrack run | ratio | capture files | summary | flamegraph |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
printf '| %d | %.2f s | %.2f s | %.2fx | %d | %.2f s | %.2f s |\n' "$procs" "$plain" "$traced" \
    "$(echo "$traced / $plain" | bc -l)" "$files" "$summary" "$flame"
