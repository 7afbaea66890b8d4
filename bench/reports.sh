#!/usr/bin/env bash
# Reports of a Python service: records an asyncio server answering 5 x 40 concurrent requests (a
# growing per-request history), then times each report and measures its output and peak memory.
# `export --format json` writes each frame once (`frames` + `frame_ids`); `--inline-frames` is the
# old layout, for comparison. Usage: bench/reports.sh [PYTHON] (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
cargo build --release -q
m=$PWD/target/release/memtrack
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/svc.py" <<'PY'
import asyncio, json

history = []

async def notify_checkpoint(i):
    history.append(bytearray(256 * 1024))
    await asyncio.sleep(0.001)
    return json.dumps({"n": i, "size": len(history)})

async def handle(reader, writer):
    data = await reader.readline()
    body = await notify_checkpoint(len(data))
    writer.write(body.encode() + b"\n")
    await writer.drain()
    writer.close()

async def client(port, i):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"x" * i + b"\n")
    await w.drain()
    await r.readline()
    w.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for _ in range(5):
        await asyncio.gather(*(client(port, i) for i in range(40)))
    server.close()
    await server.wait_closed()

asyncio.run(main())
PY
cd "$dir"
"$m" run -o svc.cap -- "$py" svc.py >/dev/null 2>&1
cap_bytes=$(stat -c %s svc.cap)
echo "capture: $cap_bytes bytes, $("$m" summary --json svc.cap | python3 -c 'import json,sys; print(json.load(sys.stdin)["events"])') events"
echo
echo "| report | wall (s) | peak RSS (MiB) | output (bytes) |"
echo "|---|---:|---:|---:|"
row() {
    local name=$1; shift
    rm -f out.txt
    /usr/bin/time -f "%e %M" -o t.txt "$@" >> out.txt 2>/dev/null
    read -r wall rss < t.txt
    printf '| %s | %s | %.0f | %s |\n' "$name" "$wall" "$(echo "$rss / 1024" | bc -l)" "$(stat -c %s out.txt)"
}
row "summary" "$m" summary svc.cap
row "tree" "$m" tree svc.cap
row "table" "$m" table svc.cap
row "flamegraph (peak)" "$m" flamegraph svc.cap -o out.txt
row "export folded --allocated" "$m" export svc.cap --format folded --allocated
row "export folded --allocated --all-frames" "$m" export svc.cap --format folded --allocated --all-frames
row "export json (peak)" "$m" export svc.cap --format json
row "export json --allocated" "$m" export svc.cap --format json --allocated
row "export json --allocated --inline-frames" "$m" export svc.cap --format json --allocated --inline-frames
