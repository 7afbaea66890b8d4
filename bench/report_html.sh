#!/bin/sh
# The size and load time of a large `memtrack report` page (issue 22): tests/fixtures/many_stacks.c
# makes 131,072 distinct stacks and about a million events; the page is opened in headless Chromium
# N times (default 5) and its own clock read (navigation to first complete render, in its footer).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/memtrack
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
gcc -O1 -g -o "$dir/many" "$root/tests/fixtures/many_stacks.c"
"$bin" run -o "$dir/many.cap" --force -- "$dir/many" 17 4 2>/dev/null
start=$(date +%s.%N)
"$bin" report "$dir/many.cap" -o "$dir/many.html"
end=$(date +%s.%N)
echo "capture $(stat -c %s "$dir/many.cap") bytes; report made in $(echo "$end - $start" | bc) s; page $(stat -c %s "$dir/many.html") bytes"
for i in $(seq "${N:-5}"); do
    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --user-data-dir="$dir/profile" \
        --window-size=1200,800 --virtual-time-budget=30000 --dump-dom "file://$dir/many.html" 2>/dev/null |
        grep -o 'shown in [0-9]* ms'
done
