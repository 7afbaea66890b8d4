"""Where the CPU of full tracking goes, per event: a workload run under `memtrack run` inside
`perf record` (cpu-clock samples of every thread), each sample put in a stage by its thread,
function and source file, and each stage's CPU time divided by the capture's event count.
Standard library only; needs perf. Not part of the tests.

    python3 bench/profile.py [--memtrack PATH] [--runs N] [--encoding compact|fast] [WORKLOAD ...]

The writer's stages (reading the stream, transcoding, zstd) are counted wherever they run: a
program thread transcodes its own chunk when the writer falls behind.

WORKLOAD is churn, churn-varied, xthreads or python (default: churn). --memtrack names another
build's CLI (its libmemtrack.so beside it), for a before/after breakdown.
"""
import argparse, collections, json, os, re, shutil, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "bench")

WRITER = "writer's work"
PROGRAM = "program threads"

# (thread side, stage) in the order the table prints them.
STAGES = [
    (PROGRAM, "hook entry, thread state, guard"),
    (PROGRAM, "stack walk and interning (unwind, reuse check, trie)"),
    (PROGRAM, "Python frames"),
    (PROGRAM, "stream encoding (varints into the buffer)"),
    (PROGRAM, "hand-off (slot lock, sequence number, full chunks)"),
    (PROGRAM, "kernel (page faults, futex)"),
    (WRITER, "reading the stream chunk"),
    (WRITER, "transcoding (rank encoding, tokens)"),
    (WRITER, "zstd"),
    (WRITER, "writes and other system time"),
    (WRITER, "other (sweeps, copies, allocation)"),
]


def workloads():
    py = sys.executable
    return {
        "churn": ([os.path.join(BIN, "churn"), "6800000"], {}),
        "churn-varied": ([os.path.join(BIN, "churn_varied"), "3000000"], {}),
        "xthreads": ([os.path.join(BIN, "xthreads"), "1000000"], {}),
        "python": ([py, os.path.join(ROOT, "bench", "py_alloc.py"), "300000"], {"PYTHONMALLOC": "malloc"}),
    }


def compile_workloads():
    os.makedirs(BIN, exist_ok=True)
    for name, extra in [("churn", []), ("xthreads", ["-pthread"]), ("churn_varied", [])]:
        src = os.path.join(ROOT, "bench", name + ".c")
        if os.path.exists(src):
            subprocess.run(["gcc", "-O2", "-g", *extra, "-o", os.path.join(BIN, name), src], check=True)


def writer_work(sym, src):
    """The writer's stages, wherever they run: a program thread transcodes its own chunk when
    the writer's queue is long (`Writer::transcode_aside`)."""
    if "zstd" in src or re.match(r"(ZSTD|HUF|FSE|HIST)_", sym) or "FastEncoder" in sym:
        # The fast encoding's framing around zstd counts as zstd.
        return (WRITER, "zstd")
    if "Transcoder::transcode" in sym or "chunk::stream::StreamDecoder" in sym:
        if re.search(r"(chunk/stream|/cursor|/varint)\.rs$", src) or "StreamDecoder" in sym:
            return (WRITER, "reading the stream chunk")
        return (WRITER, "transcoding (rank encoding, tokens)")
    return None


def stage_of(comm, dso, sym, src):
    """The stage of one perf report row, or None for what the program itself spends."""
    w = writer_work(sym, src)
    if w is not None:
        return w
    if comm.startswith("memtrack-w"):
        if dso.startswith("[kernel"):
            return (WRITER, "writes and other system time")
        return (WRITER, "other (sweeps, copies, allocation)")
    if comm == "memtrack":
        return None  # the CLI waiting for the child: counted in the total, not per stage
    if dso.startswith("[kernel"):
        return (PROGRAM, "kernel (page faults, futex)")
    if "libmemtrack" not in dso and "tls_get_addr" not in sym:
        return None  # the program and its allocator
    if re.search(r"stack/python\.rs$", src) and "stack_id" not in sym or "interleaved" in sym:
        return (PROGRAM, "Python frames")
    if re.search(r"stack/(walker|unwind|trie|mod)\.rs$", src) or "framehop" in src or "Walker::" in sym \
            or "unwind" in sym or "stack_id" in sym or "ThreadStacks" in sym:
        return (PROGRAM, "stack walk and interning (unwind, reuse check, trie)")
    if re.search(r"(chunk/stream|/varint|/mapbuf)\.rs$", src):
        return (PROGRAM, "stream encoding (varints into the buffer)")
    if re.search(r"handoff/", src) or "handoff" in sym:
        return (PROGRAM, "hand-off (slot lock, sequence number, full chunks)")
    return (PROGRAM, "hook entry, thread state, guard")


def profile(memtrack, name, cmd, env_extra, work, encoding):
    cap = os.path.join(work, f"{name}.cap")
    data = os.path.join(work, f"{name}.perf")
    env = dict(os.environ, **env_extra)
    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-o", data, "--",
                    memtrack, "run", "--force", "--encoding", encoding, "-o", cap, "--", *cmd],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = json.loads(subprocess.run([memtrack, "summary", "--json", cap], check=True,
                                       capture_output=True).stdout)["events"]
    rep = subprocess.run(["perf", "report", "-i", data, "--sort", "comm,dso,sym,srcfile",
                          "--full-source-path", "--stdio", "-g", "none", "--percent-limit", "0",
                          "-F", "period,comm,dso,sym,srcfile", "--field-separator", "\t"],
                         check=True, capture_output=True, text=True).stdout
    totals = collections.Counter()
    program_ns = 0
    all_ns = 0
    for line in rep.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        f = line.split("\t")
        if len(f) < 5:
            continue
        period, comm, dso, sym, src = int(f[0]), f[1].strip(), f[2].strip(), f[3].strip(), f[4].strip()
        sym = re.sub(r"^\[[.k]\]\s*", "", sym)
        all_ns += period
        st = stage_of(comm, dso, sym, src)
        if st is None:
            if comm != "memtrack":
                program_ns += period
        else:
            totals[st] += period
    return events, totals, program_ns, all_ns


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memtrack", default=os.path.join(ROOT, "target", "release", "memtrack"))
    ap.add_argument("--runs", type=int, default=3, help="profiles per workload; the median of each stage")
    ap.add_argument("--encoding", choices=["compact", "fast"], default="compact",
                    help="memtrack run --encoding (the build must know the option)")
    ap.add_argument("workloads", nargs="*", default=["churn"])
    args = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("perf is needed (Debian: linux-perf)")
    compile_workloads()
    wl = workloads()
    for name in args.workloads:
        cmd, env = wl[name]
        runs = []
        with tempfile.TemporaryDirectory(prefix="memtrack-profile-") as work:
            for _ in range(args.runs):
                runs.append(profile(args.memtrack, name, cmd, env, work, args.encoding))
        events = runs[0][0]
        med = lambda xs: sorted(xs)[len(xs) // 2]
        ns = lambda v: v / events
        print(f"\n### {name}: {events:,} events, {args.memtrack} --encoding {args.encoding} "
              f"(median of {args.runs} profiles)\n")
        print("| thread | stage | ns/event |")
        print("|---|---|---:|")
        side_sum = collections.Counter()
        for side, stage in STAGES:
            v = med([r[1][(side, stage)] for r in runs])
            side_sum[side] += v
            print(f"| {side} | {stage} | {ns(v):.1f} |")
        for side in (PROGRAM, WRITER):
            print(f"| **{side}** | **tracking, in all** | **{ns(side_sum[side]):.1f}** |")
        prog = med([r[2] for r in runs])
        print(f"| program threads | the program and its allocator (not tracking) | {ns(prog):.1f} |")
        print(f"| all | CPU per event, everything sampled | {ns(med([r[3] for r in runs])):.1f} |")


if __name__ == "__main__":
    main()
