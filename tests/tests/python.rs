//! Python frames in stacks (CPython 3.11, 3.12 and 3.13, `PYTHONMALLOC=malloc` set by
//! `memtrack run`): the allocations of a Python program are attributed to the Python functions,
//! files and lines that made them, with native frames kept where extension code ran. Each test
//! runs under every supported interpreter found on the machine.

use memtrack_tests::*;
use std::path::Path;
use std::process::Command;

fn traced_python(work: &Work, py: &Py, script: &str, cap: &str) -> std::path::PathBuf {
    let path = work.path(cap);
    let out = memtrack_ok(|c| {
        c.arg("run")
            .arg("-o")
            .arg(&path)
            .arg("--")
            .arg(&py.program)
            .arg(fixtures_dir().join(script))
            .current_dir(work.dir());
    });
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("frames are not read"),
        "{}: {}",
        py.version,
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// `table --by line --json` of a view: (function, file name, line, bytes) per row.
fn rows(cap: &std::path::Path, view: &str) -> Vec<(String, String, u64, u64)> {
    let out = memtrack_ok(|c| {
        c.args(["table", "--by", "line", "--json", "--top", "1000", view])
            .arg(cap);
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["function"].as_str().unwrap().to_string(),
                r["file"]
                    .as_str()
                    .map(|f| f.rsplit('/').next().unwrap().to_string())
                    .unwrap_or_default(),
                r["line"].as_u64().unwrap_or(0),
                r["total_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Bytes of the rows of `rows` for `function` at `file:line`.
fn bytes_at(rows: &[(String, String, u64, u64)], function: &str, file: &str, line: u64) -> u64 {
    rows.iter()
        .filter(|r| r.0 == function && r.1 == file && r.2 == line)
        .map(|r| r.3)
        .sum()
}

/// Folded stacks with Python frames by name alone (`main`, not `main (app.py:12)`), summed by
/// the resulting path.
fn folded(cap: &std::path::Path, args: &[&str]) -> Vec<(String, u64)> {
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    for (s, b) in folded_labels(cap, args) {
        let names: Vec<&str> = s
            .split(';')
            .map(|f| match f.rsplit_once(" (") {
                Some((name, _)) if f.ends_with(')') => name,
                _ => f,
            })
            .collect();
        *by.entry(names.join(";")).or_default() += b;
    }
    by.into_iter().collect()
}

/// Folded stacks as exported: Python frames labelled `qualname (file.py:LINE)`.
fn folded_labels(cap: &std::path::Path, args: &[&str]) -> Vec<(String, u64)> {
    let out = memtrack_ok(|c| {
        c.args(["export", "--format", "folded"]).args(args).arg(cap);
    });
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (s, b) = l.rsplit_once(' ').unwrap();
            (s.to_string(), b.parse().unwrap())
        })
        .collect()
}

#[test]
fn python_functions_files_and_lines_get_their_bytes() {
    for py in pythons() {
        functions_files_and_lines(&py);
    }
}

fn functions_files_and_lines(py: &Py) {
    let work = py.work("python_app");
    let cap = traced_python(&work, py, "py_app.py", "app.cap");
    let json = summary_json(&cap);
    assert_eq!(json["end_reason"], "_exit", "{json}");

    // At the peak: the 50 MiB bytearray, to checkpoint_notifier on line 13 (>= 99% of it).
    let peak = rows(&cap, "--peak");
    let (f, file, line, bytes) = &peak[0];
    assert_eq!(
        (f.as_str(), file.as_str(), *line),
        ("checkpoint_notifier", "py_app.py", 13),
        "{peak:?}"
    );
    let want: u64 = 50 << 20;
    assert!(
        *bytes >= want * 99 / 100 && *bytes <= want + 4096,
        "{bytes}"
    );

    // At exit: leaky_cache's 100 x 10033 bytes, on line 19.
    let leaks = rows(&cap, "--leaks");
    let leaked = bytes_at(&leaks, "leaky_cache", "py_app.py", 19);
    assert!(
        (1_003_300..1_003_300 + 2048).contains(&leaked),
        "{leaked}: {leaks:?}"
    );

    // Folded stacks: Python frames in place of the eval loop, in call order, and the native
    // callee below them; `--python-only` keeps just the Python frames.
    let all = folded(&cap, &["--peak"]);
    let (stack, b) = all.iter().max_by_key(|(_, b)| *b).unwrap();
    assert!(*b >= want, "{stack}");
    let frames: Vec<&str> = stack.split(';').collect();
    let i = frames
        .iter()
        .position(|f| *f == "checkpoint_notifier")
        .expect(stack);
    assert_eq!(
        &frames[i - 2..=i],
        ["<module>", "main", "checkpoint_notifier"],
        "{stack}"
    );
    assert!(
        frames[i + 1..].iter().any(|f| f.contains("bytearray")),
        "native callee: {stack}"
    );
    assert!(!frames.contains(&"_PyEval_EvalFrameDefault"), "{stack}");
    let py = folded(&cap, &["--peak", "--python-only"]);
    let in_py: u64 = py
        .iter()
        .filter(|(s, _)| s == "<module>;main;checkpoint_notifier")
        .map(|(_, b)| b)
        .sum();
    assert!(in_py >= want * 99 / 100, "{py:?}");
    assert!(
        py.iter().all(|(s, _)| !s.contains("PyByteArray")),
        "only Python frames"
    );

    // pprof gets the same hybrid stacks (go tool pprof is installed by CI).
    let pb = work.path("app.pb.gz");
    memtrack_ok(|c| {
        c.arg("export")
            .arg(&cap)
            .args(["--format", "pprof", "-o"])
            .arg(&pb);
    });
    if let Ok(out) = Command::new("go")
        .args(["tool", "pprof", "-traces"])
        .arg(&pb)
        .env("HOME", work.dir())
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let trace: Vec<&str> = text
            .split("-----------+")
            .find(|t| t.contains("checkpoint_notifier") && t.contains("PyByteArray_Resize"))
            .expect("the 50 MiB buffer's trace")
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .rfind(|w| *w != "(inline)")
                    .unwrap_or("")
            })
            .collect();
        let i = trace
            .iter()
            .position(|f| *f == "checkpoint_notifier")
            .unwrap();
        assert_eq!(
            &trace[i..i + 3],
            ["checkpoint_notifier", "main", "(module)"],
            "{trace:?}"
        );
        assert!(trace[..i].contains(&"PyByteArray_Resize"), "{trace:?}");
        assert!(!trace.contains(&"_PyEval_EvalFrameDefault"), "{trace:?}");
    }
}

#[test]
fn threads_and_c_extensions_show_both_python_and_native_frames() {
    for py in pythons() {
        threads_and_c_extensions(&py);
    }
}

fn threads_and_c_extensions(py: &Py) {
    let work = py.work("python_threads");
    let cap = traced_python(&work, py, "py_threads.py", "threads.cap");
    let json = summary_json(&cap);
    assert!(json["threads"].as_u64().unwrap() >= 2, "{json}");
    // zlib's deflate state and output, allocated in C under the Python frame that called it,
    // on the thread started by `threading`.
    let all = folded(&cap, &["--allocated"]);
    let zlib: Vec<&(String, u64)> = all
        .iter()
        .filter(|(s, _)| s.contains(";compress_worker;") && s.contains("zlib_compress"))
        .collect();
    assert!(!zlib.is_empty(), "no zlib stack under compress_worker");
    let bytes: u64 = zlib.iter().map(|(_, b)| b).sum();
    // deflate's state: its window, hash chains and pending buffer (256 KiB at level 6).
    assert!(bytes >= 256 << 10, "zlib allocated {bytes}");
    let stack = &zlib[0].0;
    // threading's frames, then (through the interpreter's call machinery) the target.
    let at = |f: &str| stack.find(f).unwrap_or_else(|| panic!("no {f} in {stack}"));
    assert!(at("Thread._bootstrap;") < at("Thread.run;"), "{stack}");
    assert!(at("Thread.run;") < at(";compress_worker;"), "{stack}");
    assert!(
        at(";compress_worker;") < at(";zlib_compress_impl"),
        "{stack}"
    );
    // Line 14 calls zlib.compress; line 13 built the 4 MiB input.
    let rows = rows(&cap, "--allocated");
    let line = |n: u64| bytes_at(&rows, "compress_worker", "py_threads.py", n);
    assert!(line(13) >= 4 << 20, "{:?}", &rows[..5]);
    assert!(line(14) >= 256 << 10, "{:?}", &rows[..5]);
}

/// `python3 -m module` and a console script (an executable whose `#!` line names Python) are
/// traced as `python3 script.py` is: `PYTHONMALLOC=malloc`, Python frames, lines.
#[test]
fn python_dash_m_and_console_scripts_are_traced_alike() {
    for py in pythons() {
        dash_m_and_console_scripts(&py);
    }
}

fn dash_m_and_console_scripts(py: &Py) {
    use std::os::unix::fs::PermissionsExt;
    let work = py.work("python_launchers");
    let src = std::fs::read_to_string(fixtures_dir().join("py_app.py")).unwrap();
    std::fs::write(work.path("py_app.py"), &src).unwrap();
    // The console script: the same code, one line lower. `python3` through env, as pip writes
    // them, where that is the interpreter; else its path.
    let shebang = if py.program == Path::new("python3") {
        "/usr/bin/env python3".to_string()
    } else {
        py.program.display().to_string()
    };
    let tool = work.path("app-tool");
    std::fs::write(&tool, format!("#!{shebang}\n{src}")).unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = py.program.to_str().unwrap();
    for (name, cmd, file, line) in [
        ("m.cap", vec![program, "-m", "py_app"], "py_app.py", 13),
        ("tool.cap", vec!["./app-tool"], "app-tool", 14),
    ] {
        let cap = work.path(name);
        let out = memtrack_ok(|c| {
            c.arg("run")
                .arg("-o")
                .arg(&cap)
                .arg("--")
                .args(&cmd)
                .current_dir(work.dir());
        });
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("PYTHONMALLOC=malloc"),
            "{name}"
        );
        let peak = rows(&cap, "--peak");
        let (f, fl, l, bytes) = &peak[0];
        assert_eq!(
            (f.as_str(), fl.as_str(), *l),
            ("checkpoint_notifier", file, line),
            "{name}: {:?}",
            &peak[..3]
        );
        assert!(*bytes >= (50 << 20) * 99 / 100, "{name}: {bytes}");
    }
}

/// An interpreter whose frames memtrack cannot read still gets native stacks, with exactly one
/// warning line: here a fake CPython 3.14, and a fake free-threaded 3.13 (a supported version
/// whose object header is not the default build's: its frames must not be read with 3.13's
/// offsets; the fake aborts if they were).
#[test]
fn an_unsupported_python_gets_native_stacks_and_one_warning() {
    for (name, flags, says) in [
        ("fake_python", &["-O1", "-rdynamic"][..], "Python 3.14:"),
        (
            "fake_python_ft",
            &["-O1", "-rdynamic", "-DFREE_THREADED"][..],
            "Python 3.13 (a build with another object layout)",
        ),
    ] {
        let work = Work::new(name);
        let exe = work.compile_with("fake_python.c", Some(name), flags);
        let t = run_traced_ok(&work, "fake.cap", &exe, &[] as &[&str]);
        let warnings: Vec<&str> = t
            .run
            .stderr
            .lines()
            .filter(|l| l.contains("frames are not read"))
            .collect();
        assert_eq!(warnings.len(), 1, "{name}: {}", t.run.stderr);
        assert!(warnings[0].contains(says), "{name}: {}", warnings[0]);
        let rows = rows(&t.capture, "--allocated");
        assert!(
            rows.iter().any(|r| r.0 == "make_buffer" && r.3 == 4321),
            "{name}: {:?}",
            &rows[..rows.len().min(5)]
        );
    }
}

/// Python called back from C (`sorted`'s key function): the callback's frames sit where its
/// evaluation loop ran, under the C function that called it, and the outer Python frames are
/// one trie node for every native path below them.
#[test]
fn python_called_from_c_nests_in_place_and_shares_outer_frames() {
    for py in pythons() {
        called_from_c(&py);
    }
}

fn called_from_c(py: &Py) {
    let work = py.work("python_nested");
    let cap = traced_python(&work, py, "py_nested.py", "nested.cap");
    let all = folded(&cap, &["--allocated"]);
    let big: Vec<&(String, u64)> = all.iter().filter(|(s, _)| s.contains(";inner;")).collect();
    let rows = rows(&cap, "--allocated");
    let line = |n: u64| bytes_at(&rows, "inner", "py_nested.py", n);
    // Three calls; each block also carries its object's header (tens of bytes).
    let (a, b) = (line(11), line(12));
    assert!(
        (3 * (20 << 20)..3 * (20 << 20) + 3 * 256).contains(&a),
        "{a}"
    );
    assert!(
        (3 * (10 << 20)..3 * (10 << 20) + 3 * 256).contains(&b),
        "{b}"
    );
    // By default the interpreter's C frames between `outer` and `inner` (sorted's, which
    // called `inner` as its key) are left out; `--all-frames` shows them in place.
    for (stack, _) in big.iter().filter(|(_, b)| *b >= 10 << 20) {
        assert!(stack.starts_with("<module>;outer;inner;"), "{stack}");
    }
    let every = folded(&cap, &["--allocated", "--all-frames"]);
    let big_every: Vec<&(String, u64)> = every
        .iter()
        .filter(|(s, b)| s.contains(";inner;") && *b >= 10 << 20)
        .collect();
    assert!(!big_every.is_empty(), "{every:?}");
    for (stack, _) in big_every {
        let at = |f: &str| stack.find(f).unwrap_or_else(|| panic!("no {f} in {stack}"));
        assert!(at(";<module>;") < at(";outer;"), "{stack}");
        assert!(at(";outer;") < at(";builtin_sorted"), "{stack}");
        assert!(at(";builtin_sorted") < at(";inner;"), "{stack}");
        assert!(!stack.contains("_PyEval_EvalFrameDefault"), "{stack}");
    }
    // In the trie: the large blocks' stacks reach `outer` through one and the same node,
    // though the bytearray and the bytes object come from different native paths.
    let capture = open_capture(&cap);
    let outer_id = capture
        .pycode
        .values()
        .find(|c| c.qualname == "outer")
        .expect("outer's code object")
        .id;
    let mut stacks = reader::StackTable::default();
    let sizes: Vec<(u64, u32)> = capture
        .events(&mut stacks)
        .filter_map(|e| match e.kind {
            reader::EventKind::Alloc { size, stack, .. } if size >= 10 << 20 => Some((size, stack)),
            _ => None,
        })
        .collect();
    assert_eq!(sizes.len(), 6, "{sizes:?}");
    let mut outer_nodes = std::collections::BTreeSet::new();
    for &(_, stack) in &sizes {
        let mut id = stack;
        while let Some((parent, ip)) = stacks.node(id) {
            if memtrack_format::pyframe::is_python(ip)
                && memtrack_format::pyframe::decode(ip).0 == outer_id
            {
                outer_nodes.insert(id);
            }
            id = parent;
        }
    }
    assert_eq!(outer_nodes.len(), 1, "{outer_nodes:?}");
}

/// Generators and coroutines: a generator's frames sit under whatever resumed it (a generator
/// expression in Python, `list` in C), and a coroutine's under asyncio's event loop, in every
/// version (3.12 changed how generator frames are linked and entered).
#[test]
fn generators_and_coroutines_sit_under_what_resumed_them() {
    for py in pythons() {
        generators_and_coroutines(&py);
    }
}

fn generators_and_coroutines(py: &Py) {
    let work = py.work("python_gen");
    let cap = traced_python(&work, py, "py_gen.py", "gen.cap");
    let stacks = folded(&cap, &["--allocated", "--python-only"]);
    let bytes = |want: &str| -> u64 {
        stacks
            .iter()
            .filter(|(s, _)| s == want)
            .map(|(_, b)| b)
            .sum()
    };
    let mib: u64 = 1 << 20;
    // Each block also carries its object's header (tens of bytes).
    let by_genexpr = bytes("<module>;main;consume_gen;consume_gen.<locals>.<genexpr>;produce");
    assert!(
        (8 * mib..8 * mib + 8 * 256).contains(&by_genexpr),
        "{by_genexpr}: {stacks:?}"
    );
    let by_list = bytes("<module>;main;produce");
    assert!(
        (2 * mib..2 * mib + 2 * 256).contains(&by_list),
        "{by_list}: {stacks:?}"
    );
    let coroutine = bytes(
        "<module>;main;run;Runner.run;BaseEventLoop.run_until_complete;\
         BaseEventLoop.run_forever;BaseEventLoop._run_once;Handle._run;handler;fetch",
    );
    assert!(
        (3 * mib..3 * mib + 256).contains(&coroutine),
        "{coroutine}: {stacks:?}"
    );
    let rows = rows(&cap, "--allocated");
    let line = |f: &str, n: u64| bytes_at(&rows, f, "py_gen.py", n);
    assert!(
        (10 * mib..10 * mib + 10 * 256).contains(&line("produce", 12)),
        "{:?}",
        &rows[..5]
    );
    assert!(
        (3 * mib..3 * mib + 256).contains(&line("fetch", 21)),
        "{:?}",
        &rows[..5]
    );
}

#[test]
fn python_frames_carry_file_and_line_and_hide_the_interpreter() {
    for py in pythons() {
        labels_and_plumbing(&py);
    }
}

/// tests/fixtures/py_labels: two `build` functions in two files, `twice` allocating at two
/// lines, and module-level blocks in both files (their sizes are in main.py's docstring).
fn labels_and_plumbing(py: &Py) {
    let work = py.work("python_labels");
    let cap = traced_python(&work, py, "py_labels/main.py", "labels.cap");

    // Each of the four allocations has a folded stack of its own, told apart by file:line (the
    // files relative to the script's folder), with exactly its bytes.
    let all = folded_labels(&cap, &["--peak"]);
    let exactly = |label: &str, bytes: u64| {
        let hits: Vec<&(String, u64)> = all
            .iter()
            .filter(|(s, _)| s.split(';').any(|f| f == label))
            .collect();
        assert!(
            hits.iter().any(|(_, b)| *b == bytes),
            "{}: no stack of {label} holds {bytes} bytes: {hits:?}",
            py.version
        );
    };
    exactly("build (main.py:15)", 3_000_001);
    exactly("build (other.py:7)", 2_000_001);
    exactly("twice (main.py:19)", 1_100_001);
    exactly("twice (main.py:20)", 1_200_001);
    exactly("<module> (main.py:23)", 600_001);
    exactly("<module> (other.py:3)", 700_001);
    // The interpreter's frames around Python frames are left out by default...
    let plumbing = [
        "_PyEval_EvalFrameDefault",
        "_PyEval_Vector",
        "PyEval_EvalCode",
        "Py_RunMain",
        "Py_BytesMain",
        "__libc_start_main",
        "_start",
        "main",
    ];
    let (stack, _) = all
        .iter()
        .find(|(s, b)| *b == 3_000_001 && s.contains("build (main.py:15)"))
        .unwrap();
    let frames: Vec<&str> = stack.split(';').collect();
    assert_eq!(
        &frames[..2],
        &["<module> (main.py:25)", "build (main.py:15)"],
        "{}: {stack}",
        py.version
    );
    for p in plumbing {
        assert!(!frames.contains(&p), "{}: {p} in {stack}", py.version);
    }
    // ...and the allocator path below the innermost Python frame stays.
    assert!(
        frames[2..].contains(&"bytearray___init__") || frames[2..].contains(&"type_call"),
        "{}: {stack}",
        py.version
    );
    // `--all-frames` gives them back: the same allocation under Py_RunMain and the C start.
    let every = folded_labels(&cap, &["--peak", "--all-frames"]);
    let (stack, _) = every
        .iter()
        .find(|(s, b)| *b == 3_000_001 && s.contains("build (main.py:15)"))
        .unwrap();
    let frames: Vec<&str> = stack.split(';').collect();
    for p in ["Py_RunMain", "_PyEval_Vector", "_start"] {
        assert!(frames.contains(&p), "{}: {p} not in {stack}", py.version);
    }

    // The table by function keeps the two `build`s and the two `<module>`s apart by file.
    let out = memtrack_ok(|c| {
        c.args(["table", "--json", "--top", "1000", "--peak"])
            .arg(&cap);
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |function: &str, file: &str| -> u64 {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["function"] == function && r["file"] == file)
            .map(|r| r["total_bytes"].as_u64().unwrap())
            .sum()
    };
    let near = |got: u64, want: u64, what: &str| {
        // The bytearray objects themselves (57 bytes each, or so) sit beside their buffers.
        assert!(
            (want..want + 400).contains(&got),
            "{}: {what}: {got}, want {want} (+ object headers): {v}",
            py.version
        );
    };
    near(row("build", "main.py"), 3_000_001, "build in main.py");
    near(row("build", "other.py"), 2_000_001, "build in other.py");
    near(row("twice", "main.py"), 2_300_002, "twice");
    let text = String::from_utf8(
        memtrack_ok(|c| {
            c.args(["table", "--peak"]).arg(&cap);
        })
        .stdout,
    )
    .unwrap();
    assert!(text.contains("build (main.py)"), "{text}");
    assert!(text.contains("build (other.py)"), "{text}");

    // `tree` at its default depth reaches the Python frames and their bytes.
    let tree = String::from_utf8(
        memtrack_ok(|c| {
            c.args(["tree", "--peak"]).arg(&cap);
        })
        .stdout,
    )
    .unwrap();
    for label in [
        "build (main.py:15)",
        "build (other.py:7)",
        "twice (main.py:19)",
        "twice (main.py:20)",
    ] {
        assert!(
            tree.contains(label),
            "{}: {label} not in\n{tree}",
            py.version
        );
    }
    // A tree cut by --depth says so.
    let shallow = String::from_utf8(
        memtrack_ok(|c| {
            c.args(["tree", "--peak", "--depth", "1"]).arg(&cap);
        })
        .stdout,
    )
    .unwrap();
    assert!(
        shallow.contains("more levels below: --depth"),
        "{}: {shallow}",
        py.version
    );
}
