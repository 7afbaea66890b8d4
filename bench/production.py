"""Benchmark of memtrack's production modes (issue 23); see production.sh. Standard library only.

Three tables:
  1. cost: wall and CPU time (user + sys of the whole process tree, all threads) of each mode as
     a ratio to the plain run in the same interleaved round, capture size, bytes per event and
     capture bytes per hour at the workload's own (plain) rate;
  2. accuracy: the sampled estimate of the peak against the exact peak (a full capture of the
     same deterministic program), over N seeded runs per rate;
  3. the projection the issue asks for: capture bytes of a day at 500,000 allocations a second.
"""
import argparse
import json, os, statistics, subprocess, sys, tempfile, time

# The paths, the timing and Memray's virtual environment are bench/run.py's.
from run import BIN, MEMTRACK, MEMRAY_VERSION, ROOT, memray_python, sh, timed

RATES = [("64 KiB", "64KiB", 64 << 10), ("512 KiB", "512KiB", 512 << 10), ("2 MiB", "2MiB", 2 << 20)]


def compile_workloads():
    os.makedirs(BIN, exist_ok=True)
    for name, extra in [("churn", []), ("xthreads", ["-pthread"]), ("bigheap", [])]:
        sh(["gcc", "-O2", "-g", *extra, "-o", os.path.join(BIN, name), os.path.join(ROOT, "bench", name + ".c")])


def summary(cap):
    out = subprocess.run([MEMTRACK, "summary", "--json", cap], check=True, capture_output=True).stdout
    return json.loads(out)


def modes_for(name, cmd, work, heaptrack, memray_py):
    """(mode, argv, capture path or None). The capture is what the mode leaves behind."""
    cap = lambda m: os.path.join(work, f"{name}-{m}.cap")
    ms = [("plain", cmd, None), ("full", [MEMTRACK, "run", "--force", "-o", cap("full"), "--", *cmd], cap("full"))]
    for label, arg, _ in RATES:
        m = f"sampled {label}"
        ms.append((m, [MEMTRACK, "run", "--force", "--sample-rate", arg, "-o", cap(arg), "--", *cmd], cap(arg)))
    ms.append(("aggregated", [MEMTRACK, "run", "--force", "--aggregate", "-o", cap("agg"), "--", *cmd], cap("agg")))
    ms.append((f"sampled 512 KiB + aggregated",
               [MEMTRACK, "run", "--force", "--aggregate", "--sample-rate", "512KiB", "-o", cap("sagg"), "--", *cmd],
               cap("sagg")))
    if heaptrack:
        ms.append(("heaptrack", ["heaptrack", "-o", os.path.join(work, f"{name}.heaptrack"), *cmd],
                   os.path.join(work, f"{name}.heaptrack")))
    if memray_py and cmd[0] == memray_py:
        mb = os.path.join(work, f"{name}.memray")
        ms.append(("Memray --aggregate", [memray_py, "-m", "memray", "run", "--aggregate", "-f", "-q", "-o", mb, *cmd[1:]], mb))
        mbn = os.path.join(work, f"{name}-native.memray")
        ms.append(("Memray --aggregate --native",
                   [memray_py, "-m", "memray", "run", "--aggregate", "--native", "-f", "-q", "-o", mbn, *cmd[1:]], mbn))
    return ms


def existing(path):
    """heaptrack appends .zst/.gz to the name it is given."""
    if path is None:
        return None
    d, base = os.path.split(path)
    for f in sorted(os.listdir(d)):
        if f.startswith(base):
            return os.path.join(d, f)
    return None


def clear(path):
    if path is None:
        return
    d, base = os.path.split(path)
    for f in os.listdir(d):
        if f.startswith(base):
            os.remove(os.path.join(d, f))


def cost(name, cmd, env_extra, runs, work, heaptrack, memray_py):
    env = dict(os.environ, **env_extra)
    ms = modes_for(name, cmd, work, heaptrack, memray_py)
    wall = {m: [] for m, _, _ in ms}
    cpu = {m: [] for m, _, _ in ms}
    rss = {m: [] for m, _, _ in ms}
    sizes = {}
    for _ in range(runs):
        for m, argv, cap in ms:
            clear(cap)
            w, c, k = timed(argv, env)
            wall[m].append(w)
            cpu[m].append(c)
            rss[m].append(k)
            f = existing(cap)
            if f:
                sizes[m] = os.path.getsize(f)
    full = summary(os.path.join(work, f"{name}-full.cap"))
    return {"wall": wall, "cpu": cpu, "rss": rss, "sizes": sizes, "events": full["events"],
            "allocations": full["total_allocations"], "peak": full["peak_bytes"]}


def accuracy(name, cmd, env_extra, runs, work, exact_peak, exact_leaked):
    rows = []
    for label, arg, rate in RATES:
        ratios, ses = [], []
        for seed in range(1, runs + 1):
            env = dict(os.environ, MEMTRACK_SAMPLE_SEED=str(seed), **env_extra)
            cap = os.path.join(work, f"{name}-acc.cap")
            sh([MEMTRACK, "run", "--force", "--sample-rate", arg, "-o", cap, "--", *cmd], env=env,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            s = summary(cap)
            ratios.append(s["peak_bytes"] / exact_peak)
            ses.append(s.get("peak_stderr_bytes") or 0)
        within = sum(1 for r in ratios if abs(r - 1) <= 0.05)
        rows.append((label, ratios, statistics.median(ses) / exact_peak, within))
    return rows


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs, base):
    r = [x / base for x in xs]
    return f"{med(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--accuracy-runs", type=int, default=10)
    ap.add_argument("--only", help="comma-separated workload names")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS-production.md"))
    args = ap.parse_args()
    compile_workloads()
    heaptrack = subprocess.run(["sh", "-c", "command -v heaptrack"], capture_output=True).returncode == 0
    memray_py = memray_python()
    py = memray_py or sys.executable
    workloads = [
        ("churn", [os.path.join(BIN, "churn"), "6800000"], {}, "single thread, 16..4096 B, 1024 live blocks (2 MiB)"),
        ("xthreads", [os.path.join(BIN, "xthreads"), "1000000"], {}, "4 threads, cross-thread frees (2 MiB live)"),
        ("bigheap", [os.path.join(BIN, "bigheap"), "3000000"], {}, "128 MiB cache of 16..4096 B blocks, request temporaries"),
        ("python", [py, os.path.join(ROOT, "bench", "py_alloc.py"), "300000"], {"PYTHONMALLOC": "malloc"},
         "python3, PYTHONMALLOC=malloc, Python frames"),
    ]
    if args.only:
        keep = set(args.only.split(","))
        workloads = [w for w in workloads if w[0] in keep]
    out = [
        "# Production modes: sampled and aggregated recording",
        "",
        f"Made by `bench/production.sh` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores. "
        f"Each cell: median ratio to the plain run of the same round (min-max), {args.runs} interleaved rounds. "
        "CPU is user + sys of the whole process tree (every thread, the writer's included).",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="memtrack-prod-") as work:
        for name, cmd, env, desc in workloads:
            print(f"{name}: cost, {args.runs} rounds", file=sys.stderr)
            r = cost(name, cmd, env, args.runs, work, heaptrack, memray_py)
            plain_w, plain_c = med(r["wall"]["plain"]), med(r["cpu"]["plain"])
            out += [f"## {name}: {desc}", "",
                    f"{r['events']:,} events ({r['allocations']:,} allocations) in a full capture; plain run "
                    f"{plain_w:.2f} s wall, {plain_c:.2f} s CPU; exact peak {r['peak']:,} bytes.", "",
                    "| mode | wall | CPU | max RSS | capture | bytes/event | capture per hour at this rate |",
                    "|---|---:|---:|---:|---:|---:|---:|"]
            for m in r["wall"]:
                ws = [w / p for w, p in zip(r["wall"][m], r["wall"]["plain"])]
                cs = [c / p for c, p in zip(r["cpu"][m], r["cpu"]["plain"])]
                size = r["sizes"].get(m)
                cap = f"{size / 1e6:.2f} MB" if size is not None else ""
                bpe = f"{size / r['events']:.3f}" if size is not None else ""
                hour = f"{size / plain_w * 3600 / 1e6:,.0f} MB" if size is not None else ""
                if "aggregat" in m and size is not None:
                    # Checkpoints are compacted: the file grows with stacks, not with time.
                    hour = "bounded (stacks, not time)"
                mem = f"{med(r['rss'][m]) / 1024:,.0f} MiB"
                if m == "plain":
                    out.append(f"| plain | {plain_w:.2f} s | {plain_c:.2f} s | {mem} | | | |")
                else:
                    out.append(f"| {m} | {med(ws):.2f}x ({min(ws):.2f}-{max(ws):.2f}) | "
                               f"{med(cs):.2f}x ({min(cs):.2f}-{max(cs):.2f}) | {mem} | {cap} | {bpe} | {hour} |")
            day = []
            for label, arg, _ in RATES:
                size = r["sizes"].get(f"sampled {label}")
                if size:
                    per_alloc = size / r["allocations"]
                    day.append(f"{label}: {per_alloc * 500_000 * 86_400 / 1e6:,.0f} MB")
            out += ["", "A day at 500,000 allocations a second with this workload's sizes, sampled: " + "; ".join(day) + ".", ""]
            full = summary(os.path.join(work, f"{name}-full.cap"))
            if args.accuracy_runs > 0:
                print(f"{name}: accuracy, {args.accuracy_runs} seeded runs per rate", file=sys.stderr)
                acc = accuracy(name, cmd, env, args.accuracy_runs, work, full["peak_bytes"], full["leaked_bytes"])
                out += [f"Estimated peak over exact peak, {args.accuracy_runs} seeded runs per rate:", "",
                        "| rate | median | min | max | within 5% | stated standard error (median, of the peak) |",
                        "|---|---:|---:|---:|---:|---:|"]
                for label, ratios, se, within in acc:
                    out.append(f"| {label} | {med(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} | "
                               f"{within}/{len(ratios)} | {se * 100:.1f}% |")
                out.append("")
    text = "\n".join(out) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
