//! Issue 18's "must show": real programs that start other processes, recorded as a tree by
//! `memtrack run`. `uv run` (a native launcher that probes the interpreter, then runs the
//! script), `sh -c` around a Python script, gunicorn with two forked workers serving requests,
//! and a pyenv shim (a bash script that ends in the interpreter). Every test reads concrete
//! facts back from `memtrack summary --json` and the folded export. uv and gunicorn are
//! installed by `.ci/run`: with `CI` set, their absence is a failure; otherwise the test says
//! why it skips and passes.

use memtrack_tests::*;
use serde_json::Value;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The script of tests 1 and 2: a known big object built in a named function, held a moment.
const APP_PY: &str = "import time\n\
def build_table():\n    return [bytes(1000) for _ in range(20000)]\n\
table = build_table()\n\
time.sleep(0.2)\n\
print(len(table))\n";

/// Skips (returns None) with a printed reason, or fails when `CI` is set.
fn missing(what: &str) -> Option<PathBuf> {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is missing in CI (.ci/run installs it)"
    );
    eprintln!("{what} is missing: test skipped");
    None
}

/// The interpreter the tests use: `python3`'s real executable (not a pyenv shim).
fn python3() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    match out {
        Some(o) => Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        None => missing("python3"),
    }
}

/// A Python console tool: in python3's scripts folder (the real program, not a shim), else
/// on the PATH.
fn tool(name: &str) -> Option<PathBuf> {
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join(name));
    if let Some(p) = scripts.filter(|p| p.is_file()) {
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    match std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        Some(p) => Some(p),
        None => missing(name),
    }
}

/// `memtrack run -o <work>/<cap> -- cmd`, in the scratch directory; must succeed.
fn run(work: &Work, cap: &str, cmd: &[&OsStr], env: &[(&str, &OsStr)]) -> (PathBuf, String) {
    let path = work.path(cap);
    let out = memtrack_ok(|c| {
        c.arg("run")
            .arg("-o")
            .arg(&path)
            .arg("--")
            .args(cmd)
            .current_dir(work.dir())
            .envs(env.iter().copied())
            .env_remove("MEMTRACK_LAUNCHER_PID")
            .env_remove("MEMTRACK_OUTPUT")
            .env_remove("LD_PRELOAD")
            .env_remove("PYTHONMALLOC");
    });
    (path, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn processes(summary: &Value) -> &Vec<Value> {
    summary["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no processes array: {summary}"))
}

fn argv(p: &Value) -> Vec<&str> {
    p["argv"]
        .as_array()
        .unwrap_or_else(|| panic!("no argv: {p}"))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

fn folded_text(cap: &Path) -> String {
    let out = memtrack_ok(|c| {
        c.args(["export", "--format", "folded"]).arg(cap);
    });
    String::from_utf8(out.stdout).unwrap()
}

/// The recorded process running app.py: it has a capture of its own, a peak above the
/// 20 MB table, and its folded stacks start at `[pid N]` and pass through `build_table`.
fn assert_app_py_recorded(cap: &Path, summary: &Value, stderr: &str) -> u64 {
    let procs = processes(summary);
    let app = procs
        .iter()
        .find(|p| {
            p["capture"].is_string()
                && p["executable"]
                    .as_str()
                    .is_some_and(|e| e.contains("python"))
                && argv(p).last().is_some_and(|a| *a == "app.py")
        })
        .unwrap_or_else(|| panic!("no recorded process runs app.py: {summary}\n{stderr}"));
    let pid = json_u64(app, "pid");
    let peak = json_u64(app, "peak_bytes");
    assert!(peak > 20_000_000, "app.py's peak {peak}: {app}");
    assert!(
        app["parent_pid"].is_u64(),
        "app.py was not the launched process: {app}"
    );
    assert!(
        json_u64(summary, "combined_peak_bytes") >= peak,
        "{summary}"
    );
    let folded = folded_text(cap);
    let root = format!("[pid {pid}];");
    let line = folded
        .lines()
        .find(|l| l.contains(&root) && l.contains(";build_table"))
        .unwrap_or_else(|| panic!("no folded stack of pid {pid} through build_table:\n{folded}"));
    assert!(line.split(';').next().unwrap().contains("app.py"), "{line}");
    eprintln!(
        "app.py pid {pid}: peak {peak}, {} processes, combined peak {}",
        procs.len(),
        summary["combined_peak_bytes"]
    );
    peak
}

#[test]
fn uv_run_records_the_script_with_its_python_frames() {
    let (Some(py), Some(uv)) = (python3(), tool("uv")) else {
        return;
    };
    let work = Work::new("tree_uv");
    std::fs::write(work.path("app.py"), APP_PY).unwrap();
    let cache = work.path("uv-cache");
    let (cap, stderr) = run(
        &work,
        "u.cap",
        &[
            uv.as_os_str(),
            OsStr::new("run"),
            OsStr::new("--no-project"),
            OsStr::new("--python"),
            py.as_os_str(),
            OsStr::new("python"),
            OsStr::new("app.py"),
        ],
        &[
            ("UV_OFFLINE", OsStr::new("1")),
            ("UV_PYTHON_DOWNLOADS", OsStr::new("never")),
            ("UV_CACHE_DIR", cache.as_os_str()),
            ("UV_PYTHON", py.as_os_str()),
        ],
    );
    let summary = summary_json(&cap);
    let procs = processes(&summary);
    assert!(procs.len() >= 2, "{summary}\n{stderr}");
    assert!(procs[0]["parent_pid"].is_null(), "{summary}");
    assert!(
        argv(&procs[0])[0].ends_with("uv"),
        "the launched process is not uv: {}",
        procs[0]
    );
    assert_app_py_recorded(&cap, &summary, &stderr);
}

#[test]
fn sh_c_records_the_python_child() {
    let Some(py) = python3() else {
        return;
    };
    let work = Work::new("tree_sh");
    std::fs::write(work.path("app.py"), APP_PY).unwrap();
    let script = format!("'{}' app.py; true", py.display());
    let (cap, stderr) = run(
        &work,
        "s.cap",
        &[
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new(script.as_str()),
        ],
        &[],
    );
    let summary = summary_json(&cap);
    let procs = processes(&summary);
    assert!(procs.len() >= 2, "{summary}\n{stderr}");
    assert!(procs[0]["parent_pid"].is_null(), "{summary}");
    assert!(
        argv(&procs[0])[0].ends_with("sh"),
        "the launched process is not sh: {}",
        procs[0]
    );
    assert_app_py_recorded(&cap, &summary, &stderr);
}

/// The WSGI app: every request keeps 100 KB in a module global.
const WSGI_APP: &str = "KEPT = []
def app(environ, start_response):
    KEPT.append(bytes(100_000))
    body = b'%d\\n' % len(KEPT)
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
    return [body]
";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One GET / to 127.0.0.1:port with bounded timeouts; true when it got `200 OK`.
fn get(port: u16) -> bool {
    let addr = ([127, 0, 0, 1], port).into();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200")
}

#[test]
fn gunicorn_master_and_two_workers_are_recorded() {
    let Some(gunicorn) = tool("gunicorn") else {
        return;
    };
    let has_module = Command::new("python3")
        .args(["-c", "import gunicorn"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_module {
        missing("the gunicorn module");
        return;
    }
    let work = Work::new("tree_gunicorn");
    std::fs::write(work.path("app.py"), WSGI_APP).unwrap();
    let port = free_port();
    let cap = work.path("g.cap");
    let mut child = Command::new(&binaries().memtrack)
        .arg("run")
        .arg("-o")
        .arg(&cap)
        .arg("--")
        .arg(&gunicorn)
        .args(["-w", "2", "-b", &format!("127.0.0.1:{port}"), "app:app"])
        .current_dir(work.dir())
        .env_remove("MEMTRACK_LAUNCHER_PID")
        .env_remove("MEMTRACK_OUTPUT")
        .env_remove("LD_PRELOAD")
        .env_remove("PYTHONMALLOC")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start memtrack run");
    // Reads stderr on a thread so a full pipe cannot block gunicorn's logging.
    let mut err_pipe = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let stop = |child: &mut std::process::Child| {
        // SAFETY: kill(2) on the pid of our own child, which is not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Both workers must be up before the requests: wait for the port, then a little more
    // (gunicorn listens before it forks the workers; the backlog holds early connections).
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_err()
    {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let status = stop(&mut child);
            panic!(
                "gunicorn never answered on port {port} ({status:?}):\n{}",
                err_reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let listening = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let requests: Vec<_> = (0..40)
        .map(|_| std::thread::spawn(move || get(port)))
        .collect();
    let ok = requests
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|&ok| ok)
        .count();
    // A worker that served nothing and lived under 2 s would be folded as a short helper (its
    // capture removed): on a loaded machine one worker can boot late and get no request.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(listening.elapsed()));
    let status = stop(&mut child);
    let stderr = err_reader.join().unwrap();
    assert_eq!(ok, 40, "requests answered; stderr:\n{stderr}");
    let status = status.unwrap_or_else(|| panic!("memtrack run did not end:\n{stderr}"));
    assert!(status.success(), "memtrack run: {status}\n{stderr}");

    let summary = summary_json(&cap);
    let procs = processes(&summary);
    let recorded: Vec<&Value> = procs.iter().filter(|p| p["capture"].is_string()).collect();
    assert!(recorded.len() >= 3, "{summary}\n{stderr}");
    let master = &procs[0];
    assert!(master["parent_pid"].is_null(), "{summary}");
    let master_pid = json_u64(master, "pid");
    let workers: Vec<&Value> = recorded
        .iter()
        .copied()
        .filter(|p| p["parent_pid"].as_u64() == Some(master_pid))
        .collect();
    assert_eq!(workers.len(), 2, "{summary}\n{stderr}");
    let mut worker_bytes = 0;
    for w in &workers {
        assert!(json_u64(w, "total_allocations") > 0, "{w}");
        let cap = PathBuf::from(w["capture"].as_str().unwrap());
        let cap = if cap.is_absolute() {
            cap
        } else {
            work.path(cap.to_str().unwrap())
        };
        worker_bytes += json_u64(&summary_json(&cap), "total_bytes");
    }
    assert!(
        worker_bytes >= 40 * 100_000,
        "workers allocated {worker_bytes} bytes in all: {summary}"
    );
    let largest = procs
        .iter()
        .map(|p| json_u64(p, "peak_bytes"))
        .max()
        .unwrap();
    let combined = json_u64(&summary, "combined_peak_bytes");
    assert!(combined >= largest, "{summary}");
    let (worker, worker_peak) = workers
        .iter()
        .map(|w| (json_u64(w, "pid"), json_u64(w, "peak_bytes")))
        .max_by_key(|w| w.1)
        .unwrap();
    eprintln!(
        "gunicorn: {} processes ({} recorded), workers allocated {worker_bytes} bytes, \
         largest worker peak {worker_peak} (pid {worker}), largest peak {largest}, \
         combined peak {combined}",
        procs.len(),
        recorded.len()
    );
    let out = Command::new(&binaries().memtrack)
        .arg("check")
        .arg(&cap)
        .arg("--max-peak")
        .arg((worker_peak - 1).to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&worker.to_string()),
        "the check does not name worker {worker}:\n{text}"
    );
}

#[test]
fn a_pyenv_shim_leaves_the_interpreters_capture() {
    let Some(home) = std::env::var_os("HOME") else {
        eprintln!("no HOME: test skipped");
        return;
    };
    let shim = Path::new(&home).join(".pyenv/shims/python3");
    if !shim.is_file() {
        eprintln!("no pyenv shim {}: test skipped", shim.display());
        return;
    }
    let work = Work::new("tree_pyenv");
    let (cap, stderr) = run(
        &work,
        "p.cap",
        &[
            shim.as_os_str(),
            OsStr::new("-c"),
            OsStr::new("x = [bytes(1000) for _ in range(5000)]"),
        ],
        &[],
    );
    let files: Vec<String> = std::fs::read_dir(work.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("p.cap"))
        .collect();
    // pyenv's bash helpers are folded as short helpers when they end within 2 s; on a loaded
    // machine they may take longer and keep captures of their own, but never the interpreter.
    for f in files.iter().filter(|f| f.as_str() != "p.cap") {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("{f} ")))
            .unwrap_or_else(|| panic!("{f} is not listed:\n{stderr}"));
        assert!(
            line.contains("pyenv") && !line.contains("python"),
            "a capture other than pyenv's helpers beside the interpreter's: {line}\n{stderr}"
        );
    }
    let summary = summary_json(&cap);
    let procs = processes(&summary);
    let first = &procs[0];
    assert!(
        first["executable"]
            .as_str()
            .is_some_and(|e| e.contains("python")),
        "the first process is not the interpreter: {summary}\n{stderr}"
    );
    let peak = json_u64(first, "peak_bytes");
    assert!(peak > 5_000_000, "{first}");
    eprintln!(
        "pyenv shim: {} files, {} processes, interpreter peak {peak}",
        files.len(),
        procs.len()
    );
}
