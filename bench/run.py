"""memtrack benchmark driver (see run.sh). Standard library only.

Each workload runs in interleaved rounds: once plainly, then once under each tool (memtrack, an
earlier memtrack build given with --baseline, heaptrack, and for the Python workload Memray).
Every run's wall and CPU time is divided by the plain run's of the same round; the tables give
the medians of those per-round ratios. A full run (no --only) rewrites bench/RESULTS.md, keeping
the notes below its marker line; a run with --only prints its tables and writes them to
target/bench/RESULTS-partial.md.
"""
import argparse
import glob, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
MEMTRACK = os.path.join(REL, "memtrack")
BIN = os.path.join(ROOT, "target", "bench")
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
PARTIAL = os.path.join(BIN, "RESULTS-partial.md")
NOTES_MARK = "<!-- bench/run.py writes everything above this line and keeps the notes below it. -->"
MEMRAY_VERSION = "1.20.0"
PY_SCRIPT = [os.path.join(ROOT, "bench", "py_alloc.py"), "300000"]
BEFORE = "memtrack (before)"
FAST = "memtrack `--encoding fast`"
COMPACTED = "fast, then `memtrack compact`"
MEMRAY_NATIVE, MEMRAY_PY = "Memray `--native`", "Memray (Python frames)"
TOOLS = ["memtrack", FAST, BEFORE, "heaptrack", MEMRAY_NATIVE, MEMRAY_PY]  # column order
# Issue 25's limits on memtrack's ratio to plain: (workload, 0 wall / 1 CPU, limit).
TARGETS = [("churn", 1, 2.0), ("churn", 0, 1.5), ("xthreads", 1, 2.5), ("python", 1, 2.5)]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def compile_workloads():
    os.makedirs(BIN, exist_ok=True)
    for name, extra in [("churn", []), ("churn_varied", []), ("xthreads", ["-pthread"]), ("deep", [])]:
        sh(["gcc", "-O2", "-g", *extra, "-o", os.path.join(BIN, name), os.path.join(ROOT, "bench", name + ".c")])


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time: (wall seconds, CPU seconds, max RSS in KiB of the largest
    process). CPU is time's %U + %S: user and system time of every thread of the process and of
    every child it waited for (`memtrack run`'s command, heaptrack's helper processes)."""
    with tempfile.NamedTemporaryFile("r") as tf:
        full = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf.name, *cmd]
        t0 = time.perf_counter()
        r = subprocess.run(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.decode(errors='replace')}")
        f = tf.read().split()
        return wall, float(f[-3]) + float(f[-2]), int(f[-1])


def memray_python():
    """A virtual environment of our own with Memray from PyPI; None when it cannot be made."""
    venv = os.path.join(ROOT, "target", "bench-venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "bin", "memray")):
        try:
            sh([sys.executable, "-m", "venv", venv])
            sh([py, "-m", "pip", "install", "-q", f"memray=={MEMRAY_VERSION}"])
        except subprocess.CalledProcessError as e:
            print(f"memray could not be installed ({e}): its columns are left out", file=sys.stderr)
            return None
    return py


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def existing(path):
    """The file a tool wrote for `path` (heaptrack appends .zst or .gz to the name it is given)."""
    d, base = os.path.split(path)
    found = sorted(f for f in os.listdir(d) if f.startswith(base))
    return os.path.join(d, found[0]) if found else None


def clear(path):
    d, base = os.path.split(path)
    for f in os.listdir(d):
        if f.startswith(base):
            os.remove(os.path.join(d, f))


def tools_for(cmd, work, peers, full=True):
    """(label, argv, capture path or None) of each run of a round, plain first. Without `full`,
    memtrack's builds only (no heaptrack, no Memray)."""
    tools = [("plain", cmd, None)]
    for i, (label, exe) in enumerate(peers.memtracks):
        cap = os.path.join(work, f"memtrack-{i}.cap")
        tools.append((label, [exe, "run", "--force", "-o", cap, "--", *cmd], cap))
        if label == "memtrack" and full:
            fast = os.path.join(work, "memtrack-fast.cap")
            tools.append((FAST, [exe, "run", "--encoding", "fast", "--force", "-o", fast, "--", *cmd], fast))
    if full and peers.heaptrack:
        hp = os.path.join(work, "heaptrack")
        tools.append(("heaptrack", ["heaptrack", "-o", hp, *cmd], hp))
    if full and peers.memray_py and cmd[0] == peers.memray_py:
        for label, extra, file in [(MEMRAY_NATIVE, ["--native"], "native.memray"), (MEMRAY_PY, [], "python.memray")]:
            mb = os.path.join(work, file)
            tools.append((label, [cmd[0], "-m", "memray", "run", *extra, "-f", "-q", "-o", mb, *cmd[1:]], mb))
    return tools


def rounds(tools, runs, env=None):
    """Every tool once per round, in order, `runs` rounds: {label: [(wall, cpu, rss), ...]}."""
    samples = {label: [] for label, _, _ in tools}
    for _ in range(runs):
        for label, argv, cap in tools:
            if cap:
                clear(cap)
            samples[label].append(timed(argv, env))
    return samples


def ratios(samples, label, i):
    """Field i (0 wall, 1 CPU) of each of a tool's runs over the plain run's of the same round."""
    return [s[i] / p[i] for s, p in zip(samples.get(label, []), samples["plain"]) if p[i] > 0]


def cell(rs, spread=False):
    """Median ratio; with `spread`, the lowest and highest in parentheses."""
    if not rs:
        return "-"
    text = f"{median(rs):.2f}x"
    if spread and len(rs) > 1:
        text += f" ({min(rs):.2f}-{max(rs):.2f})"
    return text


def plain_s(samples, i):
    return median([s[i] for s in samples["plain"]])


def events_of(exe, cap):
    out = subprocess.run([exe, "summary", "--json", cap], check=True, capture_output=True).stdout
    return json.loads(out)["events"]


def run_workload(name, cmd, env_extra, runs, work, peers, full=True):
    work = os.path.join(work, name)
    os.makedirs(work, exist_ok=True)
    tools = tools_for(cmd, work, peers, full)
    samples = rounds(tools, runs, dict(os.environ, **env_extra))
    files = {label: existing(cap) for label, _, cap in tools if cap}
    cap = files["memtrack"]
    res = {
        "name": name,
        "samples": samples,
        "sizes": {label: os.path.getsize(f) for label, f in files.items() if f},
        "events": {label: events_of(exe, files[label]) for label, exe in peers.memtracks},
    }
    if files.get(FAST):
        # The fast capture compacted afterwards: its size, and the time compacting takes.
        compacted = files[FAST] + ".compacted"
        clear(compacted)
        res["compact_s"] = timed([MEMTRACK, "compact", files[FAST], "-o", compacted])[0]
        res["sizes"][COMPACTED] = os.path.getsize(compacted)
    # The readers: median of 3 summaries (and their max RSS), 3 flamegraphs of the peak view.
    summaries = [timed([MEMTRACK, "summary", cap]) for _ in range(3)]
    res["summary_s"] = median([s[0] for s in summaries])
    res["summary_rss_kib"] = max(s[2] for s in summaries)
    res["flamegraph_s"] = median([timed([MEMTRACK, "flamegraph", cap, "-o", os.path.join(work, "peak.svg")])[0]
                                  for _ in range(3)])
    if files.get("heaptrack"):
        res["heaptrack_print_s"] = timed(["heaptrack_print", files["heaptrack"]])[0]
    if files.get(MEMRAY_NATIVE):
        res["memray_stats_s"] = timed([os.path.join(os.path.dirname(peers.memray_py), "memray"), "stats",
                                       files[MEMRAY_NATIVE]])[0]
    return res


def main():
    ap = argparse.ArgumentParser(description="memtrack against no tracking, heaptrack and Memray, interleaved.")
    ap.add_argument("--runs", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--long", action="store_true", help="also the 200 M event churn (one round, memtrack only)")
    ap.add_argument("--only", metavar="NAMES",
                    help="comma-separated workloads; skips the other sections unless --all-sections, and writes "
                         "target/bench/RESULTS-partial.md instead of bench/RESULTS.md")
    ap.add_argument("--all-sections", action="store_true",
                    help="with --only: still run the Rust allocator and thread fixture sections")
    ap.add_argument("--baseline", metavar="DIR",
                    help="an earlier build's memtrack and libmemtrack.so, side by side: run as "
                         f"'{BEFORE}' in the same rounds")
    args = ap.parse_args()
    memtracks = [("memtrack", MEMTRACK)]
    if args.baseline:
        base = os.path.abspath(args.baseline)
        for f in ("memtrack", "libmemtrack.so"):
            if not os.path.isfile(os.path.join(base, f)):
                sys.exit(f"--baseline {args.baseline}: no {f} there")
        memtracks.append((BEFORE, os.path.join(base, "memtrack")))
    compile_workloads()
    workloads = [
        ("churn", [os.path.join(BIN, "churn"), "6800000"], {}, "single thread, 16..4096 B, 3 call paths"),
        ("churn-varied", [os.path.join(BIN, "churn_varied"), "3000000"], {},
         "single thread, 16..4096 B, 4096 slots, stacks 2..31 calls deep"),
        ("xthreads", [os.path.join(BIN, "xthreads"), "1000000"], {}, "4 threads, cross-thread frees"),
        ("deep", [os.path.join(BIN, "deep"), "3000000"], {}, "malloc 64 frames deep"),
        # The interpreter is chosen below: the venv's, with Memray, when it can be made.
        ("python", None, {"PYTHONMALLOC": "malloc"}, "python3, PYTHONMALLOC=malloc, no frame pointers"),
    ]
    # The same script under CPython 3.12 and 3.13 when the machine has them (pyenv's versions).
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for minor in ("3.12", "3.13"):
        found = sorted(glob.glob(os.path.join(pyenv, "versions", minor + ".*", "bin", "python" + minor)))
        if found:
            workloads.append((f"python{minor}", [found[-1], *PY_SCRIPT], {"PYTHONMALLOC": "malloc"},
                              f"the same under CPython {minor}"))
    if args.only:
        keep = args.only.split(",")
        unknown = set(keep) - {w[0] for w in workloads} - ({"churn-200M"} if args.long else set())
        if unknown:
            sys.exit(f"--only: no workload {', '.join(sorted(unknown))} "
                     f"(there are {', '.join(w[0] for w in workloads)})")
        workloads = [w for w in workloads if w[0] in keep]
    memray_py = memray_python() if any(w[0] == "python" for w in workloads) else None
    workloads = [(n, cmd or [memray_py or sys.executable, *PY_SCRIPT], env, desc) for n, cmd, env, desc in workloads]
    peers = SimpleNamespace(memtracks=memtracks, memray_py=memray_py, heaptrack=shutil.which("heaptrack") is not None)
    results = []
    with tempfile.TemporaryDirectory(prefix="memtrack-bench-") as work:
        for name, cmd, env, desc in workloads:
            print(f"running {name} ({args.runs} rounds)...", file=sys.stderr)
            results.append(dict(run_workload(name, cmd, env, args.runs, work, peers), desc=desc))
        if args.long and (not args.only or "churn-200M" in args.only.split(",")):
            print("running the 200 M event churn...", file=sys.stderr)
            r = run_workload("churn-200M", [os.path.join(BIN, "churn"), "100000000"], {}, 1, work, peers, full=False)
            results.append(dict(r, desc="single thread, 200 M events"))
    lines = report(results, args, memray_py is not None)
    if not args.only or args.all_sections:
        lines += rust_allocator(args.runs)
        lines += threads_and_memory(args.runs, peers)
    lines += [
        "",
        "## Noise",
        "",
        "This machine's timings vary by about +-30% from run to run (the same build measured 1.9x and 2.7x on",
        "the churn loop within minutes; in one table the 200 M event churn, the same loop, gave 1.88x while",
        "the short churn gave 2.69x). Compare medians across several runs before drawing conclusions; the",
        "capture sizes and bytes per event are exact and repeatable.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.only:
        with open(PARTIAL, "w") as f:
            f.write(text)
        print(f"(partial run: written to {os.path.relpath(PARTIAL, ROOT)}, bench/RESULTS.md left as it was)",
              file=sys.stderr)
        return
    write_results(text)


def write_results(text):
    """bench/RESULTS.md: this run's text, then the marker and the notes that followed it."""
    notes = ""
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            old = f.read()
        if NOTES_MARK in old:
            notes = old.split(NOTES_MARK, 1)[1]
    with open(RESULTS, "w") as f:
        f.write(text + "\n" + NOTES_MARK + notes)


def rust_allocator(runs):
    """The Rust global allocator: the counters-only Tracker against the system allocator, and the
    same program recording itself (MEMTRACK_OUTPUT: full tracking in process)."""
    print("running the Rust global allocator examples...", file=sys.stderr)
    sh(["cargo", "build", "--release", "-q", "-p", "memtrack-tracker", "--examples"], cwd=ROOT,
       env=dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target")))
    ex = os.path.join(REL, "examples")
    with tempfile.TemporaryDirectory(prefix="memtrack-bench-rust-") as work:
        rcap = os.path.join(work, "rust.cap")
        s = rounds([("plain", [os.path.join(ex, "churn_plain")], None),
                    ("counters", [os.path.join(ex, "churn_counted")], None),
                    ("recording", ["env", f"MEMTRACK_OUTPUT={rcap}", os.path.join(ex, "churn_counted")], rcap)], runs)
        rbytes = os.path.getsize(rcap)
    pair = lambda label: f"{cell(ratios(s, label, 0))} / {cell(ratios(s, label, 1), True)}"
    return [
        "",
        "## Rust `#[global_allocator]`: counters, and recording in process",
        "",
        "| workload | system allocator, wall / CPU | `Tracker`, counters only "
        "| `Tracker` recording (`MEMTRACK_OUTPUT`) | capture |",
        "|---|---:|---:|---:|---:|",
        f"| churn in Rust (`tracker/examples/churn_*.rs`, 13.6 M events) | {plain_s(s, 0):.2f} / {plain_s(s, 1):.2f} s "
        f"| {pair('counters')} | {pair('recording')} | {rbytes / 1e6:.1f} MB |",
    ]


def threads_and_memory(runs, peers):
    """The tracker's memory and time where threads are many: the tests' fixtures that hold it to
    the 64 MiB budget."""
    print("running the thread fixtures...", file=sys.stderr)
    fixtures = [
        ("thread_churn", ["3000"], "3,000 short-lived threads, 4 at a time"),
        ("many_threads", ["256", "20000"], "256 threads alive at once, 40 k events each"),
        ("varied_stacks", ["8", "50000"], "8 threads, stacks that hardly repeat (2 M stack nodes)"),
    ]
    labels = [label for label, _ in peers.memtracks]
    rows = []
    with tempfile.TemporaryDirectory(prefix="memtrack-bench-threads-") as work:
        for name, argv, desc in fixtures:
            exe = os.path.join(work, name)
            sh(["gcc", "-O2", "-g", "-pthread", "-o", exe, os.path.join(ROOT, "tests", "fixtures", name + ".c")])
            s = rounds(tools_for([exe, *argv], work, peers, full=False), runs)
            rss = lambda label: median([x[2] for x in s[label]]) / 1024
            cols = [f"{cell(ratios(s, l, 0))} / {cell(ratios(s, l, 1))} | +{rss(l) - rss('plain'):.1f} MiB"
                    for l in labels]
            rows.append(f"| {name}: {desc} | {plain_s(s, 0):.2f} / {plain_s(s, 1):.2f} s | {rss('plain'):.1f} MiB | "
                        + " | ".join(cols) + " |")
    return [
        "",
        "## Threads: the tracker's memory",
        "",
        "The tests' fixtures (`tests/fixtures`) that hold the tracker to the issue's 64 MiB over the program's own; "
        "*tracker RSS* is the traced run's peak RSS (under `memtrack run`) minus the plain run's. These programs run "
        "for hundredths of a second, near the 0.01 s resolution of the CPU times.",
        "",
        "| fixture | plain wall / CPU | plain max RSS | "
        + " | ".join(f"{l} wall / CPU | tracker RSS" for l in labels) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(labels),
        *rows,
    ]


def report(results, args, memray):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    labels = [l for l in TOOLS if any(l in r["samples"] for r in results)]
    partial = f" Partial run (`--only {args.only}`)." if args.only else ""
    out = [
        "# Benchmark results",
        "",
        f"Made by `bench/run.sh` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores ({cpu}), "
        f"{platform.system()} {platform.release()}.{partial}",
        "",
        f"Each workload ran in {args.runs} interleaved round{'s' if args.runs != 1 else ''}: once without "
        "tracking (*plain*), then once under each tool. Every run's time is divided by the plain run's of the "
        "same round, and each cell is the median of these per-round ratios; CPU cells add the lowest and "
        "highest in parentheses. *Wall* is elapsed time. *CPU* is user + system time of the whole process "
        "tree, every thread (`/usr/bin/time`'s %U + %S, which count the children it waited for): memtrack's "
        "writer thread and the `memtrack run` process, heaptrack's script, `heaptrack_interpret` and "
        "compressor, Memray's threads.",
    ]
    if args.baseline:
        out += ["", f"*{BEFORE}* is the build in `{args.baseline}`, run in the same rounds."]
    if memray:
        out += ["", f"The Python workload runs in a virtual environment the benchmark makes (`target/bench-venv`, "
                    f"Memray {MEMRAY_VERSION} from PyPI), the same interpreter for every tool, with "
                    "`PYTHONMALLOC=malloc` (every object through malloc). memtrack records Python and native frames "
                    "(as Memray's `--native`); Memray without `--native` records Python frames only."]
    out += [
        "",
        "## Overhead of full tracking (every event, full native stack)",
        "",
        "Wall time, ratio to plain:",
        "",
        "| workload | events | plain | " + " | ".join(labels) + " |",
        "|---|---:|---:|" + "---:|" * len(labels),
    ]
    for r in results:
        s = r["samples"]
        out.append(f"| {r['name']}: {r['desc']} | {r['events']['memtrack']:,} | {plain_s(s, 0):.2f} s | "
                   + " | ".join(cell(ratios(s, l, 0)) for l in labels) + " |")
    out += ["", "CPU time (user + sys, whole process tree), ratio to plain, median (min-max):", "",
            "| workload | plain | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for r in results:
        s = r["samples"]
        out.append(f"| {r['name']} | {plain_s(s, 1):.2f} s | "
                   + " | ".join(cell(ratios(s, l, 1), spread=True) for l in labels) + " |")
    out += targets(results, [l for l in ("memtrack", FAST, BEFORE) if l in labels])
    out += captures(results, labels)
    out += readers(results, labels)
    return out


def targets(results, labels):
    by_name = {r["name"]: r["samples"] for r in results}
    rows = []
    for name, i, limit in TARGETS:
        if name in by_name:
            meds = [median(ratios(by_name[name], l, i)) for l in labels]
            rows.append(f"| {name} {('wall', 'CPU')[i]} at most {limit}x | "
                        + " | ".join(f"{m:.2f}x ({'met' if m <= limit else 'missed'})" for m in meds) + " |")
    if not rows:
        return []
    return ["", "Issue 25's targets (medians above):", "",
            "| target | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels), *rows]


def captures(results, labels):
    if FAST in labels:
        labels = [*labels[:labels.index(FAST) + 1], COMPACTED, *labels[labels.index(FAST) + 1:]]
    caps = [l for l in labels if any(l in r["sizes"] for r in results)]
    flag = "heaptrack" in caps
    head = [f"{l}: bytes/event (capture)" for l in caps]
    if flag:
        head.insert(caps.index("heaptrack") + 1, "memtrack <= heaptrack")
    out = ["", "## Captures", "",
           "| workload | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for r in results:
        cells = []
        for l in caps:
            size = r["sizes"].get(l)
            events = r["events"].get(l, r["events"]["memtrack"])
            cells.append(f"{size / max(events, 1):.2f} ({size / 1e6:.1f} MB)" if size is not None else "-")
            if l == "heaptrack":
                h = r["sizes"].get("heaptrack")
                cells.append("-" if h is None else ("yes" if r["sizes"]["memtrack"] <= h else "**no**"))
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    out += ["", "Each capture is the last round's. heaptrack's is its zstd-compressed file; heaptrack's and Memray's "
                "bytes/event divide by memtrack's event count for the same workload (each memtrack build counts its "
                "own events)."]
    timed_compact = [r for r in results if "compact_s" in r]
    if timed_compact:
        out += ["", "`memtrack compact` of the fast capture (one core, after the run): "
                + "; ".join(f"{r['name']} {r['compact_s']:.2f} s "
                            f"({r['compact_s'] * 1e9 / max(r['events']['memtrack'], 1):.0f} ns/event)"
                            for r in timed_compact) + "."]
    return out


def readers(results, labels):
    before = BEFORE in labels
    out = ["", "## Reports, and the tracker's memory", "",
           "| workload | `summary` | events/s | `flamegraph` (x summary) | reader max RSS | `heaptrack_print` | "
           "`memray stats` (native) | tracker RSS in process |" + (" tracker RSS (before) |" if before else ""),
           "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if before else "")]
    for r in results:
        s = r["samples"]
        rss = lambda label: (median([x[2] for x in s[label]]) - median([x[2] for x in s["plain"]])) / 1024
        ev = r["events"]["memtrack"]
        opt = lambda key: f"{r[key]:.2f} s" if key in r else "-"
        out.append(
            f"| {r['name']} | {r['summary_s']:.2f} s | {ev / r['summary_s'] / 1e6:.1f} M | "
            f"{r['flamegraph_s']:.2f} s ({r['flamegraph_s'] / r['summary_s']:.2f}x) | "
            f"{r['summary_rss_kib'] / 1024:.0f} MiB | {opt('heaptrack_print_s')} | {opt('memray_stats_s')} | "
            f"{rss('memtrack'):+.1f} MiB |" + (f" {rss(BEFORE):+.1f} MiB |" if before else ""))
    out += ["", "The readers are this build's, on memtrack's capture (median of 3). *tracker RSS in process* is the "
                "traced run's max RSS (the largest process) minus the plain run's, medians."]
    return out


if __name__ == "__main__":
    main()
