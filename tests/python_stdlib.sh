#!/usr/bin/env bash
# A deeper check than the test suite, run by hand (minutes per interpreter): CPython's own test
# files, plain and under `memtrack run`, for every supported CPython found (python3 if it is
# 3.11, and pyenv's 3.12 and 3.13). memtrack must not change their outcome. Prints one line per
# interpreter; exits 1 when a traced run's result differs from the plain one.
#   tests/python_stdlib.sh [TEST_FILE...]
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p memtrack -p memtrack-preload || exit 2
memtrack="$PWD/target/release/memtrack"
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(test_json test_threading test_generators test_coroutines test_zlib test_sqlite3 test_re
        test_dataclasses test_exceptions test_subprocess test_signal test_os test_gc test_weakref
        test_asyncio.test_tasks test_asyncio.test_subprocess test_ctypes test_pickle)
fi
work=$(mktemp -d /tmp/memtrack-stdlib-XXXXXX)
pythons=()
[ "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = 3.11 ] && pythons+=(python3)
for v in 3.12 3.13; do
    for c in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
        if "$c" -c pass >/dev/null 2>&1; then pythons+=("$c"); break; fi
    done
done
status=0
for py in "${pythons[@]}"; do
    v=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    "$py" -m test -q "${tests[@]}" >"$work/plain-$v.log" 2>&1
    plain=$?
    "$memtrack" run -o "$work/$v.cap" -- "$py" -m test -q "${tests[@]}" >"$work/traced-$v.log" 2>&1
    traced=$?
    result() { grep -E '^(Total tests|Result):' "$1" | tr '\n' ' '; }
    echo "CPython $v: plain exit $plain, $(result "$work/plain-$v.log")| traced exit $traced, $(result "$work/traced-$v.log")"
    if [ "$plain" != "$traced" ] || [ "$(result "$work/plain-$v.log")" != "$(result "$work/traced-$v.log")" ]; then
        status=1
    fi
done
echo "logs and captures in $work"
exit $status
