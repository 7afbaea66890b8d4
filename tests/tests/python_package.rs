//! The Python package (issue 24): the wheel built from the repository (root pyproject.toml,
//! setuptools-rust) installed into a fresh virtual environment gives the `memtrack` command,
//! `<venv>/lib/memtrack/libmemtrack.so` and `import memtrack`; `memtrack.Tracker` records a
//! block of a running Python program; the pytest plugin's `limit_memory` / `limit_leaks`
//! markers pass and fail tests whose figures are known.
//!
//! Needs `python3` 3.11 with `setuptools_rust`, `wheel` and `pytest` (.ci/run installs them):
//! in CI their absence is a failure, elsewhere the tests say so and pass.

use memtrack_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// `sys.executable` of `python3` when it is 3.11 and imports `modules`; None (outside CI)
/// when not, after saying why.
fn python(modules: &str) -> Option<PathBuf> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sys\nimport {modules}\nassert sys.version_info[:2] == (3, 11), sys.version\nprint(sys.executable)"
        ))
        .output();
    match out {
        Ok(o) if o.status.success() => Some(PathBuf::from(
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 3.11 with {modules} is required in CI (.ci/run installs them): {why}"
            );
            eprintln!("python3 3.11 with {modules} not found: not tested ({why})");
            None
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` with memtrack's own variables removed (the installed files must be found by
/// themselves), and panics unless it exits with `code`.
fn run_expect(mut cmd: Command, code: i32) -> Output {
    for v in [
        "MEMTRACK_PRELOAD",
        "MEMTRACK_CLI",
        "LD_PRELOAD",
        "PYTHONPATH",
        "PYTHONMALLOC",
        "PYTEST_ADDOPTS",
        "PYTEST_PLUGINS",
    ] {
        cmd.env_remove(v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert_eq!(
        out.status.code(),
        Some(code),
        "{:?} {:?}:\nstdout:\n{}\nstderr:\n{}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>(),
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// The wheel, built once per test process with `pip wheel --no-build-isolation` (no network;
/// the workspace's target directory is reused).
fn wheel(py: &Path) -> &'static Path {
    static WHEEL: OnceLock<PathBuf> = OnceLock::new();
    WHEEL.get_or_init(|| {
        let dist = target_dir().join("python-wheel");
        let _ = std::fs::remove_dir_all(&dist);
        let mut cmd = Command::new(py);
        cmd.args([
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
        ])
        .arg(&dist)
        .arg(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir())
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
        run_expect(cmd, 0);
        let wheels: Vec<PathBuf> = std::fs::read_dir(&dist)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "whl"))
            .collect();
        assert_eq!(wheels.len(), 1, "{wheels:?}");
        let name = wheels[0].file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.starts_with("memtrack-0.1.0-py3-none-linux_x86_64"),
            "{name}"
        );
        wheels[0].clone()
    })
}

/// A new virtual environment in `work` with the wheel installed (from the file, no index).
/// `system_site` lets it see python3's packages (pytest).
fn venv(work: &Work, py: &Path, system_site: bool) -> PathBuf {
    let wheel = wheel(py);
    let dir = work.path("venv");
    let mut cmd = Command::new(py);
    cmd.args(["-m", "venv"]);
    if system_site {
        cmd.arg("--system-site-packages");
    }
    cmd.arg(&dir);
    run_expect(cmd, 0);
    let mut cmd = Command::new(dir.join("bin/python"));
    cmd.args(["-m", "pip", "install", "--no-deps", "--no-index"])
        .arg(wheel)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
    run_expect(cmd, 0);
    dir
}

/// The 1-based number of the line of `file` (a fixture) that contains `needle`.
fn line_of(file: &Path, needle: &str) -> usize {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {}", file.display()))
        + 1
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

#[test]
fn wheel_installs_into_a_fresh_venv_and_its_memtrack_runs_python() {
    let Some(py) = python("setuptools_rust, wheel") else {
        return;
    };
    let work = Work::new("pkg_wheel");
    let venv = venv(&work, &py, false);
    let exe = venv.join("bin/memtrack");
    let lib = venv.join("lib/memtrack/libmemtrack.so");
    assert!(exe.is_file(), "{} missing", exe.display());
    assert!(lib.is_file(), "{} missing", lib.display());
    // The CLI itself, not a Python launcher script.
    let head = std::fs::read(&exe).unwrap();
    assert_eq!(
        &head[..4],
        b"\x7fELF",
        "{} is not an executable",
        exe.display()
    );

    // The venv's command finds the venv's library by itself (../lib/memtrack/).
    let script = work.path("grow.py");
    std::fs::write(
        &script,
        "def grow():\n    return bytearray(10_000_000)\nkeep = grow()\nprint('done')\n",
    )
    .unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args(["run", "-o", "x.cap", "--"])
        .arg(venv.join("bin/python"))
        .arg(&script)
        .current_dir(work.dir());
    let out = run_expect(cmd, 0);
    assert_eq!(text(&out.stdout), "done\n");
    let mut cmd = Command::new(&exe);
    cmd.args(["summary", "x.cap", "--json"])
        .current_dir(work.dir());
    let s = json(&run_expect(cmd, 0));
    assert!(json_u64(&s, "leaked_bytes") >= 10_000_001, "{s}");
    let mut cmd = Command::new(&exe);
    cmd.args([
        "table", "x.cap", "--leaks", "--by", "line", "--json", "--top", "1",
    ])
    .current_dir(work.dir());
    let rows = json(&run_expect(cmd, 0));
    let top = &rows[0];
    assert_eq!(top["function"], "grow", "{rows}");
    assert_eq!(top["line"], 2, "{rows}");
    assert_eq!(top["max_bytes"], 10_000_001, "{rows}");

    // `import memtrack` from the venv: Tracker, the installed library (found first through the
    // wheel's RECORD), the CLI, the plugin's entry point.
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg("-c").arg(
        "import importlib.metadata as m, memtrack, memtrack._lib as l, memtrack._cli as c\n\
         print(memtrack.Tracker.__name__)\n\
         print(l.find_library())\n\
         print(l._installed_candidates()[0])\n\
         print(c.find_cli())\n\
         print([e.value for e in m.entry_points(group='pytest11') if e.name == 'memtrack'])\n",
    );
    let out = run_expect(cmd, 0);
    assert_eq!(
        text(&out.stdout),
        format!(
            "Tracker\n{}\n{}\n{}\n['memtrack.pytest_plugin']\n",
            lib.display(),
            lib.display(),
            exe.display()
        )
    );
}

/// The supported CPythons found for the in-process tests (see `memtrack_tests::pythons`).
fn interpreters() -> Vec<PathBuf> {
    memtrack_tests::pythons()
        .into_iter()
        .map(|p| p.program)
        .collect()
}

/// `tracker_block.py CAP1 CAP2` from the source tree under each CPython found, the library and
/// CLI of the harness's build given by the environment.
#[test]
fn tracker_records_blocks_of_a_running_python_program() {
    for py in interpreters() {
        eprintln!("{}", py.display());
        tracker_blocks(&py);
    }
}

fn tracker_blocks(py: &Path) {
    let work = Work::new("pkg_tracker");
    let b = binaries();
    let fixture = fixtures_dir().join("tracker_block.py");
    let (cap1, cap2) = (work.path("one.cap"), work.path("two.cap"));
    let out = Command::new(py)
        .arg(&fixture)
        .arg(&cap1)
        .arg(&cap2)
        .current_dir(work.dir())
        .env_remove("LD_PRELOAD")
        .env_remove("PYTHONMALLOC")
        .env("PYTHONPATH", workspace_root().join("python"))
        .env("MEMTRACK_PRELOAD", &b.preload)
        .env("MEMTRACK_CLI", &b.memtrack)
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("block one done"), "{stdout}");
    assert_eq!(lines.next(), Some("block two done"), "{stdout}");
    let refused = lines.next().unwrap_or_default();
    assert!(
        refused.starts_with(&format!(
            "exists: memtrack cannot start recording into {}: ",
            cap1.display()
        )),
        "{stdout}"
    );

    // Block one: the 10,000,000-byte bytearray (10,000,001 bytes of malloc) from grow(); the
    // 20,000,000 bytes allocated before the block and freed in it are not the block's.
    let s1 = summary_json(&cap1);
    let peak = json_u64(&s1, "peak_bytes");
    assert!(
        (10_000_001..10_000_001 + (256 << 10)).contains(&peak),
        "{}: peak {peak}: {s1}",
        py.display()
    );
    // Its stack, with all frames and with Python frames only (the plugin's failure text).
    let grow_line = line_of(&fixture, "return bytearray(n)");
    let grow = format!("tracker_block.py:{grow_line})");
    for only in [false, true] {
        let out = memtrack_ok(|c| {
            if only {
                c.arg("--python-only");
            }
            c.args(["table", "--peak", "--by", "stack", "--json", "--top", "1"])
                .arg(&cap1);
        });
        let rows = json(&out);
        assert_eq!(rows[0]["max_bytes"], 10_000_001, "{rows}");
        let stack: Vec<&str> = rows[0]["stack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let python: Vec<&str> = stack
            .iter()
            .copied()
            .filter(|f| f.contains(".py:"))
            .collect();
        assert!(
            python
                .last()
                .is_some_and(|f| f.starts_with("grow (") && f.ends_with(&grow)),
            "{} (python_only {only}): {stack:?}",
            py.display()
        );
        if only {
            assert_eq!(python.len(), stack.len(), "{}: {stack:?}", py.display());
        }
    }
    // The region mark inside the block was recorded.
    let out = memtrack_ok(|c| {
        c.args(["regions", "--json"]).arg(&cap1);
    });
    let regions = json(&out);
    assert_eq!(regions[0]["name"], "step", "{regions}");
    assert!(
        regions[0]["allocated_bytes"].as_u64().unwrap() >= 10_000_001,
        "{regions}"
    );

    // Block two, a second recording in the same process: its 6,000,000 bytes, freed.
    let s2 = summary_json(&cap2);
    let peak = json_u64(&s2, "peak_bytes");
    assert!(
        (6_000_001..6_000_001 + (256 << 10)).contains(&peak),
        "{}: peak {peak}: {s2}",
        py.display()
    );
    assert!(json_u64(&s2, "leaked_bytes") < 256 << 10, "{s2}");
}

#[test]
fn tracker_refuses_under_memtrack_run() {
    let Some(py) = python("ctypes") else {
        return;
    };
    let work = Work::new("pkg_tracker_run");
    let t = run_traced_ok(
        &work,
        "run.cap",
        &py,
        &[
            "-c",
            "import memtrack\ntry:\n    memtrack.Tracker('t.cap').__enter__()\nexcept RuntimeError as e:\n    print(e)\n",
        ],
    );
    assert_eq!(
        t.run.stdout_text(),
        "already recording under memtrack run\n"
    );
    assert!(!work.path("t.cap").exists());
}

/// pytest's outcome per test of tests/python/test_limits.py: (name, passed).
fn outcomes(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test_limits.py::"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(' ')?;
            // Not a failure's first line (`test_limits.py::test_x: peak ...`).
            if name.ends_with(':') {
                return None;
            }
            let status = rest
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Some((name.to_string(), status))
        })
        .collect()
}

/// The figure in bytes of a failure line (`... peak 32.0 MiB (33,554,561 bytes) is over ...`).
fn bytes_after(line: &str, word: &str) -> u64 {
    let rest = &line[line
        .find(word)
        .unwrap_or_else(|| panic!("{word} in {line}"))
        + word.len()..];
    let open = rest.find('(').unwrap();
    let close = rest.find(" bytes)").unwrap();
    rest[open + 1..close].replace(',', "").parse().unwrap()
}

/// The failure text of `test` in pytest's output: its FAILURES section.
/// The failure text of `test` and its first line, `test_limits.py::TEST: WHAT N ...`, whose
/// figure N must be `key` of the test's capture, and lie within 256 KiB above `least` (the
/// test's own block; the rest is its small objects).
fn failure_figure<'a>(
    stdout: &'a str,
    test: &str,
    what: &str,
    cap: &Path,
    key: &str,
    least: u64,
) -> (&'a str, &'a str) {
    let text = failure_of(stdout, test);
    let start = format!("test_limits.py::{test}: {what} ");
    let head = text
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("{text}"));
    let n = bytes_after(head, &format!("{what} "));
    assert_eq!(n, json_u64(&summary_json(cap), key));
    assert!((least..least + (256 << 10)).contains(&n), "{head}");
    (text, head)
}

fn failure_of<'a>(stdout: &'a str, test: &str) -> &'a str {
    let head = format!("_ {test} _");
    let start = stdout
        .find(&head)
        .unwrap_or_else(|| panic!("no failure section for {test}:\n{stdout}"));
    let body = &stdout[start + head.len()..];
    let end = body.find("\n___").or_else(|| body.find("\n===")).unwrap();
    &body[..end]
}

#[test]
fn pytest_plugin_limits_pass_and_fail_with_figures_and_stacks() {
    let Some(py) = python("setuptools_rust, wheel, pytest") else {
        return;
    };
    let work = Work::new("pkg_pytest");
    let venv = venv(&work, &py, true);
    let src = workspace_root().join("tests/python/test_limits.py");
    std::fs::copy(&src, work.path("test_limits.py")).unwrap();
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.args([
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        "--junitxml=r.xml",
        "--memtrack",
        "--memtrack-bin-path",
        "caps",
        "test_limits.py",
    ])
    .current_dir(work.dir());
    let out = run_expect(cmd, 1);
    let stdout = text(&out.stdout);
    let mut got = outcomes(&stdout);
    got.sort();
    let want = [
        ("test_leak_filtered", "PASSED"),
        ("test_leak_over", "MEMORY PROBLEMS"),
        ("test_leak_per_location", "PASSED"),
        ("test_leak_under", "PASSED"),
        ("test_peak_over", "MEMORY PROBLEMS"),
        ("test_peak_under", "PASSED"),
        ("test_unlimited", "PASSED"),
    ];
    let got_ref: Vec<(&str, &str)> = got
        .iter()
        .map(|(n, s)| (n.as_str(), s.split(" [").next().unwrap()))
        .collect();
    assert_eq!(got_ref, want, "{stdout}");
    let xml = std::fs::read_to_string(work.path("r.xml")).unwrap();
    assert!(
        xml.contains("failures=\"2\"") && xml.contains("tests=\"7\""),
        "{xml}"
    );
    assert_eq!(
        xml.matches("<property name=\"memtrack\" value=\"memory problems\" />")
            .count(),
        2,
        "{xml}"
    );

    let cap = |test: &str| work.path(&format!("caps/test_limits.py-{test}.cap"));
    let alloc_line = line_of(&src, "return bytearray(n)");

    // limit_memory over: 32 MiB + 1 byte, plus the test's small objects.
    let (text_over, head) = failure_figure(
        &stdout,
        "test_peak_over",
        "peak",
        &cap("test_peak_over"),
        "peak_bytes",
        (32 << 20) + 1,
    );
    assert!(
        head.starts_with("test_limits.py::test_peak_over: peak 32.0 MiB (")
            && head
                .ends_with(" bytes) is over limit_memory(\"24 MB\") = 24.0 MiB (25,165,824 bytes)"),
        "{head}"
    );
    let stacks: Vec<&str> = text_over
        .lines()
        .skip_while(|l| !l.contains("top stacks at the peak:"))
        .skip(1)
        .take_while(|l| !l.contains("capture: "))
        .collect();
    assert_eq!(stacks.len(), 3, "{text_over}");
    assert!(
        stacks[0].contains("32.0 MiB in ")
            && stacks[0].contains("allocate (")
            && stacks[0].contains(&format!("test_limits.py:{alloc_line}) <- test_peak_over (")),
        "{text_over}"
    );

    // limit_leaks over: 2 MiB + 1 byte kept by the module's list.
    let (text_leak, head) = failure_figure(
        &stdout,
        "test_leak_over",
        "leaked",
        &cap("test_leak_over"),
        "leaked_bytes",
        (2 << 20) + 1,
    );
    assert!(
        head.ends_with(
            " bytes) live at its end is over limit_leaks(\"1 MB\") = 1.0 MiB (1,048,576 bytes)"
        ),
        "{head}"
    );
    assert!(
        text_leak.contains(&format!("test_limits.py:{alloc_line}) <- test_leak_over (")),
        "{text_leak}"
    );

    // The passing tests' captures hold their truth (so the passes are not vacuous).
    let s = summary_json(&cap("test_peak_under"));
    let p = json_u64(&s, "peak_bytes");
    assert!(
        ((8 << 20) + 1..(8 << 20) + 1 + (256 << 10)).contains(&p),
        "{s}"
    );
    let s = summary_json(&cap("test_leak_under"));
    let (p, l) = (json_u64(&s, "peak_bytes"), json_u64(&s, "leaked_bytes"));
    assert!(p > 4 << 20, "{s}");
    assert!(
        ((256 << 10) + 1..(256 << 10) + 1 + (128 << 10)).contains(&l),
        "{s}"
    );
    let s = summary_json(&cap("test_leak_per_location"));
    let l = json_u64(&s, "leaked_bytes");
    assert!(l > 3 * (512 << 10), "{s}");

    // The --memtrack table: largest peaks first.
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("memtrack: tests with the largest peaks"))
        .skip(2)
        .take(5)
        .collect();
    assert!(
        table[0].trim_start().starts_with("64.0 MiB")
            && table[0].contains("test_limits.py::test_unlimited"),
        "{stdout}"
    );
    assert!(
        table[1].trim_start().starts_with("32.0 MiB")
            && table[1].contains("test_limits.py::test_peak_over"),
        "{stdout}"
    );

    // Markers it cannot apply fail the test with the reason, not as memory problems.
    std::fs::copy(
        workspace_root().join("tests/python/test_limit_errors.py"),
        work.path("test_limit_errors.py"),
    )
    .unwrap();
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.args([
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        "test_limit_errors.py",
    ])
    .current_dir(work.dir());
    let stdout = text(&run_expect(cmd, 1).stdout);
    for (test, why) in [
        (
            "test_bad_size",
            "invalid memory size '24 XB': give a number and a unit",
        ),
        (
            "test_current_thread_only",
            "limit_memory(current_thread_only=True) is not supported",
        ),
        ("test_no_limit", "limit_memory needs a size"),
    ] {
        assert!(
            stdout.contains(&format!("test_limit_errors.py::{test} FAILED")),
            "{stdout}"
        );
        assert!(
            failure_of(&stdout, test).contains(&format!(
                "test_limit_errors.py::{test}: memtrack could not check the limits: {why}"
            )),
            "{stdout}"
        );
    }

    // --fail-on-increase: 4 MiB passes (and is remembered in pytest's cache), 8 MiB fails
    // against it, 2 MiB passes.
    let inc = work.path("increase");
    std::fs::create_dir(&inc).unwrap();
    std::fs::copy(
        workspace_root().join("tests/python/test_increase.py"),
        inc.join("test_increase.py"),
    )
    .unwrap();
    for (mib, code) in [(4, 0), (8, 1), (2, 0)] {
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.args([
            "-m",
            "pytest",
            "-q",
            "--fail-on-increase",
            "test_increase.py",
        ])
        .env("MEMTRACK_TEST_MIB", mib.to_string())
        .current_dir(&inc);
        let stdout = text(&run_expect(cmd, code).stdout);
        if code == 1 {
            let line = stdout
                .lines()
                .find(|l| l.starts_with("test_increase.py::test_grows: peak 8.0 MiB ("))
                .unwrap_or_else(|| panic!("{stdout}"));
            assert!(
                line.contains(" bytes) is above the last passing run's 4.0 MiB (")
                    && line.ends_with(" bytes) (--fail-on-increase)"),
                "{line}"
            );
        }
    }

    // Under `memtrack run` the run is recorded as a whole: the limits are not checked, and the
    // output says so.
    let mut cmd = Command::new(venv.join("bin/memtrack"));
    cmd.args(["run", "-o", "whole.cap", "--"])
        .arg(venv.join("bin/python"))
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_limits.py",
        ])
        .current_dir(work.dir());
    let stdout = text(&run_expect(cmd, 0).stdout);
    assert!(
        stdout
            .contains("memtrack did not record the tests: already recording under memtrack run\n")
            && stdout.contains("the memory limits of 6 tests were not checked\n")
            && stdout.contains("7 passed"),
        "{stdout}"
    );
}

#[test]
fn size_strings_read_as_pytest_memray_reads_them() {
    let Some(py) = python("pytest") else {
        return;
    };
    let out = Command::new(py)
        .arg("-c")
        .arg(
            "from memtrack.pytest_plugin import parse_size as p\n\
             print(p('24 MB'), p('1.5KB'), p('100 B'), p('2 MiB'), p(7), p('.5 gb'))\n\
             for bad in ['24 XB', '24', 'MB', '-1 MB', '1 iB']:\n\
             \x20   try:\n\
             \x20       p(bad)\n\
             \x20       print('accepted', bad)\n\
             \x20   except ValueError:\n\
             \x20       pass\n",
        )
        .env("PYTHONPATH", workspace_root().join("python"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "25165824 1536 100 2097152 7 536870912\n");
}
