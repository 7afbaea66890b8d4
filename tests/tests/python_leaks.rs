//! `--leaks` of a Python program is what its code left live when it ended, before interpreter
//! shutdown freed its modules (the tracker's `PYTHON_END` mark); `--leaks-at-exit` is the heap
//! at process exit. Other programs keep one figure. Each Python test runs under every CPython
//! 3.11 / 3.12 / 3.13 found (`python3`, `python3.1x` on the PATH, pyenv's versions), Debian's
//! `/usr/bin/python3.11` (built with LTO) included.

use memtrack_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (version, program) of each supported interpreter found, each program once.
fn interpreters() -> Vec<(String, PathBuf)> {
    let mut candidates: Vec<PathBuf> =
        ["python3", "/usr/bin/python3.11", "python3.12", "python3.13"]
            .iter()
            .map(PathBuf::from)
            .collect();
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(Ok(dirs)) = root.map(|r| std::fs::read_dir(r.join("versions"))) {
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if let Some(minor) = ["3.11", "3.12", "3.13"]
                .iter()
                .find(|m| name.starts_with(&format!("{m}.")))
            {
                candidates.push(d.path().join("bin").join(format!("python{minor}")));
            }
        }
    }
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut seen = Vec::new();
    for c in candidates {
        // A version manager's shim runs the interpreter in a tree of helpers: `sys.executable`
        // is the interpreter.
        let Ok(out) = Command::new(&c)
            .args([
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)",
            ])
            .output()
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some((version, exe)) = text.trim().split_once(' ') else {
            continue;
        };
        let real = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.into());
        // The interpreter itself, not a version manager's shim: one process, one capture.
        if ["3.11", "3.12", "3.13"].contains(&version) && !seen.contains(&real) {
            seen.push(real);
            found.push((version.to_string(), PathBuf::from(exe)));
        }
    }
    if found.is_empty() {
        eprintln!("no CPython 3.11-3.13 found: not tested");
    }
    found
}

fn traced(work: &Work, program: &Path, script: &str) -> PathBuf {
    let cap = work.path("py.cap");
    memtrack_ok(|c| {
        c.args(["run", "-o"])
            .arg(&cap)
            .arg("--")
            .arg(program)
            .arg(fixtures_dir().join(script))
            .current_dir(work.dir());
    });
    cap
}

fn folded(cap: &Path, view: &str) -> String {
    let out = memtrack_ok(|c| {
        c.args(["export", "--format", "folded", view]).arg(cap);
    });
    String::from_utf8(out.stdout).unwrap()
}

/// Bytes of the folded lines that pass through `frame`.
fn bytes_through(folded: &str, frame: &str) -> u64 {
    folded
        .lines()
        .filter(|l| l.split(';').any(|f| f == frame))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The `table --json` row of `function` in a view: (bytes, count, largest), if it has one.
fn table_row(cap: &Path, view: &str, function: &str) -> Option<(u64, u64, u64)> {
    let out = memtrack_ok(|c| {
        c.args(["table", "--json", "--top", "100000", view])
            .arg(cap);
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let mut matching = rows.iter().filter(|r| r["function"] == function);
    let row = matching.next()?;
    assert!(matching.next().is_none(), "two rows of {function}: {v}");
    let n = |k: &str| row[k].as_u64().unwrap();
    Some((n("total_bytes"), n("count"), n("max_bytes")))
}

/// py_shutdown.py's `fill_cache` leaves three bytearrays of 1, 2 and 3 MB in a module-level
/// list: three objects of `bytearray.__basicsize__` bytes and three buffers of n + 1 bytes,
/// still referenced when the program's code ends. CPython frees them while it shuts down.
#[test]
fn a_module_cache_is_leaked_at_the_programs_end_and_gone_at_exit() {
    for (version, program) in interpreters() {
        eprintln!("CPython {version}: {}", program.display());
        let work = Work::new(&format!(
            "py_leaks_{version}_{}",
            program.to_string_lossy().replace('/', "_")
        ));
        let basic: u64 = {
            let out = Command::new(&program)
                .args(["-c", "print(bytearray.__basicsize__)"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let cap = traced(&work, &program, "py_shutdown.py");
        let buffers = 1_000_001 + 2_000_001 + 3_000_001;

        let leaks = folded(&cap, "--leaks");
        let frame = "fill_cache (py_shutdown.py:13)";
        assert_eq!(
            bytes_through(&leaks, frame),
            buffers + 3 * basic,
            "{version}\n{leaks}"
        );
        assert_eq!(
            bytes_through(&leaks, "churn (py_shutdown.py:20)"),
            0,
            "{version}"
        );
        assert_eq!(
            table_row(&cap, "--leaks", "fill_cache"),
            Some((buffers + 3 * basic, 6, 3_000_001)),
            "{version}"
        );

        let at_exit = folded(&cap, "--leaks-at-exit");
        assert_eq!(bytes_through(&at_exit, frame), 0, "{version}\n{at_exit}");
        assert_eq!(table_row(&cap, "--leaks-at-exit", "fill_cache"), None);

        // The summary gives both, says which `--leaks` is, and agrees with the views.
        let s = summary_json(&cap);
        assert_eq!(s["leaks_measured_at"], "python_program_end", "{s}");
        let leaked = json_u64(&s, "leaked_bytes");
        let at_exit_bytes = json_u64(&s, "leaked_at_exit_bytes");
        let sum = |text: &str| -> u64 {
            text.lines()
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum()
        };
        assert_eq!(leaked, sum(&leaks), "{version}");
        assert_eq!(at_exit_bytes, sum(&at_exit), "{version}");
        assert!(at_exit_bytes < buffers && leaked > buffers, "{s}");
        assert!(s["python_shutdown_seconds"].as_f64().is_some(), "{s}");

        // check --max-leaked judges the program's leaks.
        let out = Command::new(&binaries().memtrack)
            .args(["check", "--max-leaked", &format!("{}", leaked - 1)])
            .arg(&cap)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{version}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("fill_cache (py_shutdown.py:13)"), "{text}");
        memtrack_ok(|c| {
            c.args(["check", "--max-leaked", &format!("{leaked}")])
                .arg(&cap);
        });
    }
}

/// A C program has one figure: `--leaks` and `--leaks-at-exit` agree, and the summary says the
/// leaks were measured at exit (every_function.c: 5 blocks, 3,350 bytes left).
#[test]
fn a_c_programs_leaks_are_those_at_exit() {
    let work = Work::new("py_leaks_c");
    let exe = work.compile("every_function.c");
    let traced = run_traced_ok(&work, "c.cap", &exe, &[] as &[&str]);
    let s = summary_json(&traced.capture);
    assert_eq!(
        (
            json_u64(&s, "leaked_bytes"),
            json_u64(&s, "leaked_allocations"),
            json_u64(&s, "leaked_at_exit_bytes"),
            json_u64(&s, "leaked_at_exit_allocations"),
        ),
        (3350, 5, 3350, 5),
        "{s}"
    );
    assert_eq!(s["leaks_measured_at"], "exit", "{s}");
    assert!(s["python_shutdown_seconds"].is_null(), "{s}");
    let leaks = folded(&traced.capture, "--leaks");
    assert!(!leaks.is_empty());
    assert_eq!(leaks, folded(&traced.capture, "--leaks-at-exit"));
}
