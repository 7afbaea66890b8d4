//! Python region marks (the `memtrack` package in python/) under `memtrack run`, which makes
//! it importable without installing: `regions_py.py` uses the decorator, with blocks, the
//! trace alias, a thread and asyncio tasks. The large allocations (100,000 bytes or more, the
//! fixture's own) are checked against the marks of each thread, in sequence order.

use memtrack_tests::*;

/// Marks and allocations of 100,000 bytes or more.
fn large_and_marks(s: &[String]) -> Vec<&str> {
    s.iter()
        .map(String::as_str)
        .filter(|t| {
            t.starts_with("B ")
                || *t == "E"
                || t.strip_prefix("A ")
                    .is_some_and(|n| n.parse::<u64>().unwrap() >= 100_000)
        })
        .collect()
}

#[test]
fn python_regions_decorator_with_thread_and_asyncio() {
    let work = Work::new("regions-python");
    let src = fixtures_dir().join("regions_py.py");
    let python = std::path::Path::new("python3");
    let t = run_traced_ok(&work, "py.cap", python, &[src.as_os_str()]);
    let cap = open_capture(&t.capture);
    assert_eq!(
        region_names(&cap),
        [
            "load_index",
            "rank",
            "search",
            "slow_task",
            "traced",
            "worker"
        ]
    );
    let s = thread_streams(&cap);
    let marked: Vec<(u32, Vec<&str>)> = s
        .iter()
        .filter(|(_, v)| v.iter().any(|t| t.starts_with("B ")))
        .map(|(&tid, v)| (tid, large_and_marks(v)))
        .collect();
    assert_eq!(marked.len(), 2, "{marked:?}");
    let (main, worker): (Vec<_>, Vec<_>) = marked
        .into_iter()
        .partition(|(_, v)| v.contains(&"B load_index"));
    let mut want = vec!["B load_index", "A 3000001", "E"];
    for held in ["A 1000001", "A 2000001", "A 3000001"] {
        want.extend(["B search", held, "B rank", "A 500001", "E", "E"]);
    }
    want.extend(["B traced", "A 200001", "E"]);
    // The coroutine's region is open while it awaits: the other task's 600,000 falls inside.
    want.extend(["B slow_task", "A 400001", "A 600001", "E"]);
    let main = &main[0].1;
    let first = main.iter().position(|t| t.starts_with("B ")).unwrap();
    assert_eq!(main[first..], want[..]);
    // The thread's region is its own.
    let worker = &worker[0].1;
    assert_eq!(worker[..], ["B worker", "A 700001", "E"]);

    // The report names the Python functions that hold each region's bytes at its peak: a
    // bytearray of n bytes is its buffer (n + 1) and its object (56 bytes) at the same line;
    // the interpreter's small objects come after, below 100,000 bytes.
    let out = std::process::Command::new(&binaries().memtrack)
        .args(["regions", "--json"])
        .arg(&t.capture)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let top = |path: &str| -> Vec<(String, u64)> {
        let r = v.as_array().unwrap().iter().find(|r| r["path"] == path);
        let r = r.unwrap_or_else(|| panic!("no region {path} in {v}"));
        r["top_locations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["function"].as_str().unwrap().to_string(),
                    l["total_bytes"].as_u64().unwrap(),
                )
            })
            .filter(|l| l.1 >= 100_000)
            .collect()
    };
    let l = |f: &str, b: u64| (f.to_string(), b);
    assert_eq!(top("load_index"), [l("load_index", 3_000_057)]);
    assert_eq!(top("search"), [l("search", 3_000_057), l("rank", 500_057)]);
    assert_eq!(top("worker"), [l("worker", 700_057)]);
    // What the asyncio section of the README says: the other task's block is in the region.
    assert_eq!(
        top("slow_task"),
        [l("other", 600_057), l("slow_task", 400_057)]
    );
}

#[test]
fn python_marks_do_nothing_without_memtrack() {
    let py = fixtures_dir().join("../../python");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import memtrack\n\
             assert not memtrack.enabled()\n\
             @memtrack.region('f')\n\
             def f(x): return x + 1\n\
             async def c(): return 2\n\
             import asyncio\n\
             with memtrack.region('w'): v = f(1) + asyncio.run(memtrack.trace('t')(c)())\n\
             print(v, f.__name__)\n",
        )
        .env("PYTHONPATH", &py)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "4 f\n");
}
