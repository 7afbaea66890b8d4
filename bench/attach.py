#!/usr/bin/env python3
"""Benchmark of `memtrack attach` (issue 24): how long attaching and detaching take, and how
fast a running program goes before, while and after it is recorded, against the same program
under `memtrack run`. Prints a table and writes it to bench/RESULTS-attach.md.

    bench/attach.sh [--runs N]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMTRACK = os.path.join(ROOT, "target", "release", "memtrack")


def rates_of(proc, out):
    for line in proc.stdout:
        if line.startswith("rate "):
            out.append((time.monotonic(), int(line.split()[1])))


def one_run(exe, work):
    """Phases: 3 s plain, attached for 3 s, 3 s after the detach."""
    proc = subprocess.Popen([exe, "10"], stdout=subprocess.PIPE, text=True)
    rates = []
    reader = threading.Thread(target=rates_of, args=(proc, rates))
    reader.start()
    time.sleep(3)
    cap = os.path.join(work, "a.cap")
    if os.path.exists(cap):
        os.remove(cap)
    t0 = time.monotonic()
    att = subprocess.Popen(
        [MEMTRACK, "attach", str(proc.pid), "-o", cap, "--duration", "3"],
        stderr=subprocess.PIPE,
        text=True,
    )
    recording = stopped = None
    for line in att.stderr:
        if line.startswith("memtrack: recording "):
            recording = time.monotonic()
        elif line.startswith("memtrack: capture written"):
            stopped = time.monotonic()
    if att.wait() != 0 or recording is None:
        sys.exit("attach failed")
    t1 = recording + 3
    proc.wait()
    reader.join()
    # Until recording: the injection; after the 3 s: the stop and the one-line summary (which
    # reads the whole capture back).
    overhead = (recording - t0, stopped - t1, os.path.getsize(cap) / 1e6)
    before = [r for t, r in rates if t < t0 - 0.3]
    during = [r for t, r in rates if t0 + 0.5 < t < t1 - 0.3]
    after = [r for t, r in rates if t > t1 + 0.5]
    return overhead, statistics.median(before), statistics.median(during), statistics.median(after)


def under_run(exe, work):
    cap = os.path.join(work, "r.cap")
    p = subprocess.run(
        [MEMTRACK, "run", "--force", "-o", cap, "--", exe, "3"],
        capture_output=True,
        text=True,
    )
    rates = [int(l.split()[1]) for l in p.stdout.splitlines() if l.startswith("rate ")]
    return statistics.median(rates[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        exe = os.path.join(work, "attach_rate")
        subprocess.run(
            ["gcc", "-O2", "-g", "-o", exe, os.path.join(ROOT, "bench", "attach_rate.c")],
            check=True,
        )
        rows = []
        for _ in range(a.runs):
            rows.append(one_run(exe, work) + (under_run(exe, work),))
    inject = statistics.median(r[0][0] for r in rows)
    stop = statistics.median(r[0][1] for r in rows)
    size = statistics.median(r[0][2] for r in rows)
    before, during, after, run = [statistics.median(c) for c in list(zip(*rows))[1:]]
    lines = [
        "| runs | attach until recording | stop + summary | capture (3 s) | pairs/s before | while attached | after detach | under `memtrack run` |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {a.runs} | {inject:.3f} s | {stop:.3f} s | {size:.0f} MB | {before:,.0f} | {during:,.0f} ({before / during:.2f}x slower) "
        f"| {after:,.0f} ({after / before:.2f} of before) | {run:,.0f} ({before / run:.2f}x slower) |",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "bench", "RESULTS-attach.md"), "w") as f:
        f.write(
            "# memtrack attach: cost of attaching (bench/attach.sh)\n\n"
            "A C program making malloc/free pairs (16-4111 bytes, 64 live slots) prints its rate "
            "every 250 ms; `memtrack attach --duration 3` records it for 3 s. Medians of the runs. "
            "\"attach until recording\": from the command's start to its `recording` line (preflight, "
            "ptrace, dlopen, memtrack_start); \"stop + summary\": from the end of the 3 s to the "
            "command's last line, which reads the whole capture back for its one-line summary.\n\n"
            + text
            + "\n"
        )


main()
