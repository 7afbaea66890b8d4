#!/usr/bin/env bash
# A/B of tracker builds: runs a program plainly and under each given libmemtrack.so (LD_PRELOAD,
# MEMTRACK_OUTPUT), interleaved, and prints the median wall and CPU (user + system) time of each.
# For judging a change to the tracker on this noisy machine: copy target/release/libmemtrack.so
# aside before and after the change, then compare the copies in one run.
#   bench/ab.sh [-n RUNS] LIB.so[,VAR=VALUE...] [...] -- PROGRAM [ARGS...]
# Each library may carry environment settings of its own (the same library twice compares them).
# Examples:
#   bench/ab.sh -n 11 /tmp/before.so /tmp/after.so -- target/bench/xthreads 1000000
#   bench/ab.sh target/release/libmemtrack.so target/release/libmemtrack.so,MEMTRACK_ENCODING=fast -- target/bench/churn 6800000
set -euo pipefail
runs=9
if [ "${1:-}" = "-n" ]; then
    runs=$2
    shift 2
fi
libs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    lib=${1%%,*}
    settings=${1#"$lib"}
    libs+=("$(realpath "$lib")$settings")
    shift
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] && [ ${#libs[@]} -ge 1 ] || {
    echo "usage: bench/ab.sh [-n RUNS] LIB.so[,VAR=VALUE...] [...] -- PROGRAM [ARGS...]" >&2
    exit 2
}
shift
work=$(mktemp -d /tmp/memtrack-ab-XXXXXX)
trap 'rm -rf "$work"' EXIT
names=(plain "${libs[@]}")
for i in $(seq "$runs"); do
    for k in "${!names[@]}"; do
        if [ "$k" -eq 0 ]; then
            /usr/bin/time -f "%e %U %S" -a -o "$work/$k" "$@" >/dev/null
        else
            rm -f "$work/cap"
            IFS=, read -r -a parts <<< "${names[$k]}"
            /usr/bin/time -f "%e %U %S" -a -o "$work/$k" \
                env MEMTRACK_OUTPUT="$work/cap" "${parts[@]:1}" LD_PRELOAD="${parts[0]}" "$@" >/dev/null
        fi
    done
done
for k in "${!names[@]}"; do
    python3 - "$work/$k" "${names[$k]}" <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l[:1].isdigit()]
wall = statistics.median(r[0] for r in rows)
cpu = statistics.median(r[1] + r[2] for r in rows)
print(f"{sys.argv[2]:<40} wall {wall:.3f} s   cpu {cpu:.3f} s   ({len(rows)} runs)")
EOF
done
