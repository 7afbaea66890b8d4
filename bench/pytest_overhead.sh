#!/usr/bin/env bash
# Benchmark: the cost of memtrack's pytest plugin. Generates a suite of small tests (each builds
# a few thousand Python objects; a fifth of them carry a limit_memory or limit_leaks marker),
# runs it plainly, with the markers checked (the default: only marked tests are recorded), and
# with --memtrack (every test recorded, the peaks table printed), interleaved; prints the median
# wall time of each. Not part of the tests.
#   bench/pytest_overhead.sh [RUNS] [TESTS]      (defaults 5 and 200)
# Uses the wheel built from this tree, installed into target/bench-pytest-venv (which sees
# python3's pytest: `python3 -m pip install pytest` first).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
tests=${2:-200}
venv=$PWD/target/bench-pytest-venv
python3 -m pip wheel -q --no-build-isolation --no-deps . -w target/bench-pytest-dist
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps --no-index \
    target/bench-pytest-dist/memtrack-*.whl
work=$(mktemp -d /tmp/memtrack-pytest-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT

"$venv/bin/python" - "$work/test_suite.py" "$tests" <<'EOF'
import sys

path, n = sys.argv[1], int(sys.argv[2])
out = ["import pytest", "", "_kept = []", ""]
for i in range(n):
    if i % 10 == 0:
        out.append('@pytest.mark.limit_memory("64 MB")')
    elif i % 10 == 5:
        out.append('@pytest.mark.limit_leaks("1 MB")')
    out += [
        "def test_%d():" % i,
        "    d = {k: str(k) * 3 for k in range(%d)}" % (1000 + 10 * i),
        "    b = bytearray(%d)" % (4096 * (i % 50 + 1)),
        "    assert len(d) > 0 and len(b) > 0",
        "",
    ]
open(path, "w").write("\n".join(out))
EOF

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
timed() {
    local t0 t1
    t0=$(date +%s.%N)
    (cd "$work" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" test_suite.py \
        >"$work/out.txt" 2>&1) || { cat "$work/out.txt" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}
plain=() marked=() full=()
for _ in $(seq "$runs"); do
    plain+=("$(timed -p no:memtrack)")
    marked+=("$(timed)")
    full+=("$(timed --memtrack)")
done
p=$(printf '%s\n' "${plain[@]}" | median)
m=$(printf '%s\n' "${marked[@]}" | median)
f=$(printf '%s\n' "${full[@]}" | median)
echo "pytest overhead: $tests tests, median of $runs runs, $(nproc) cores"
echo
echo "| run | recorded tests | wall time | ratio | per recorded test |"
echo "|---|---:|---:|---:|---:|"
printf '| plain (`-p no:memtrack`) | 0 | %.2f s | 1.00x | |\n' "$p"
printf '| markers only (default) | %d | %.2f s | %.2fx | +%.0f ms |\n' "$((tests / 5))" "$m" \
    "$(echo "$m / $p" | bc -l)" "$(echo "($m - $p) * 1000 / ($tests / 5)" | bc -l)"
printf '| `--memtrack` | %d | %.2f s | %.2fx | +%.0f ms |\n' "$tests" "$f" \
    "$(echo "$f / $p" | bc -l)" "$(echo "($f - $p) * 1000 / $tests" | bc -l)"
