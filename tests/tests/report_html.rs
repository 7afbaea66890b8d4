//! `memtrack report` in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs) driven through the DevTools protocol over `--remote-debugging-pipe` (file
//! descriptors 3 and 4, NUL-separated JSON: no socket, no extra crate). A drag across the
//! timeline over each phase of `phases.c` must show that phase's function, with its exact bytes,
//! in the flamegraph and the table; and a report of 131,072 stacks and a million events must
//! load in under 3 seconds.

use memtrack_tests::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The flamegraph's frames and the table's rows as (name, bytes), and the line that says what
/// they show.
type Shown = (Vec<(String, u64)>, Vec<(String, u64)>, String);

/// A page in headless Chromium, spoken to through the DevTools protocol.
struct Browser {
    child: Child,
    to: std::fs::File,
    from: BufReader<std::fs::File>,
    next_id: u64,
    session: String,
}

/// A pipe's (read, write) ends, both close-on-exec.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors it is given room for.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both are new descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    /// Opens `url` in a 1200x800 headless window.
    fn open(browser: &str, profile: &Path, url: &str) -> Browser {
        use std::os::fd::AsRawFd;
        let (cmd_r, cmd_w) = pipe(); // we write commands, the browser reads fd 3
        let (ev_r, ev_w) = pipe(); // the browser writes fd 4, we read
        let (in_fd, out_fd) = (cmd_r.as_raw_fd(), ev_w.as_raw_fd());
        let mut cmd = Command::new(browser);
        cmd.args(CHROMIUM_FLAGS)
            .args(["--remote-debugging-pipe", "--window-size=1200,800"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2, close) on
        // descriptors this process owns: the pipe ends go to 3 and 4 by way of free numbers,
        // so that neither overwrites the other; dup2's copies are not close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(in_fd, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(out_fd, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(a);
                libc::close(b);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("chromium starts");
        drop((cmd_r, ev_w));
        let mut b = Browser {
            child,
            to: std::fs::File::from(cmd_w),
            from: BufReader::new(std::fs::File::from(ev_r)),
            next_id: 0,
            session: String::new(),
        };
        let target = b.call("Target.createTarget", json!({ "url": url }));
        let target = target["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b
    }

    /// Sends a command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .expect("the browser reads commands");
        loop {
            let mut buf = Vec::new();
            let n = self
                .from
                .read_until(0, &mut buf)
                .expect("the browser answers");
            assert!(n > 0, "the browser closed the pipe during {method}");
            buf.pop();
            let v: Value = serde_json::from_slice(&buf).expect("JSON from the browser");
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression (JSON-able).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits until the report's script has run (at most `secs` seconds).
    fn wait_ready(&mut self, secs: u64) {
        let start = std::time::Instant::now();
        while self.eval("document.body && document.body.dataset.ready === '1'") != json!(true) {
            assert!(
                start.elapsed().as_secs() < secs,
                "the report did not finish loading in {secs} s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn mouse(&mut self, kind: &str, x: f64, y: f64, buttons: u32, clicks: u32) {
        self.call(
            "Input.dispatchMouseEvent",
            json!({ "type": kind, "x": x, "y": y, "button": "left", "buttons": buttons,
                    "clickCount": clicks }),
        );
    }

    /// Drags the mouse across the timeline from `t0` to `t1` seconds.
    fn drag(&mut self, t0: f64, t1: f64) {
        let y = self.eval("memtrack.yMid()").as_f64().unwrap();
        let x0 = self.eval(&format!("memtrack.xOf({t0})")).as_f64().unwrap();
        let x1 = self.eval(&format!("memtrack.xOf({t1})")).as_f64().unwrap();
        self.mouse("mouseMoved", x0, y, 0, 0);
        self.mouse("mousePressed", x0, y, 1, 1);
        for i in 1..=5 {
            let x = x0 + (x1 - x0) * i as f64 / 5.0;
            self.mouse("mouseMoved", x, y, 1, 0);
        }
        self.mouse("mouseReleased", x1, y, 0, 1);
    }

    /// What the page shows: the flamegraph's frames and the table's rows, as (name, bytes).
    fn shown(&mut self) -> Shown {
        let v = self.eval(
            "JSON.stringify({ frames: [...document.querySelectorAll('#flame .fr')].map(d => [d.dataset.name, +d.dataset.bytes]), \
             rows: [...document.querySelectorAll('#table tbody tr')].map(r => [r.cells[0].textContent, +r.cells[1].dataset.bytes]), \
             what: document.getElementById('what').textContent })",
        );
        let v: Value = serde_json::from_str(v.as_str().unwrap()).unwrap();
        let pairs = |k: &str| -> Vec<(String, u64)> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
                .collect()
        };
        (
            pairs("frames"),
            pairs("rows"),
            v["what"].as_str().unwrap().to_string(),
        )
    }

    /// Every frame drawn (the path above a zoomed frame left out), by its folded path.
    fn paths(&mut self) -> Vec<(String, u64)> {
        let v = self.eval(
            "JSON.stringify([...document.querySelectorAll('#flame .fr:not(.up)')].map(d => [memtrack.path(+d.dataset.n), +d.dataset.bytes]))",
        );
        let v: Value = serde_json::from_str(v.as_str().unwrap()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
            .collect()
    }

    /// Sets a control's value as a user would and lets the page react.
    fn set(&mut self, selector: &str, value: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); if (e.type === 'checkbox') e.checked = {value}; else e.value = {value:?}; e.dispatchEvent(new Event('change')); }})()"
        ));
    }

    fn screenshot(&mut self, png: &Path) {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let data = r["data"].as_str().expect("screenshot data");
        std::fs::write(png, base64_decode(data)).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot's encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            _ => 63,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The one frame called `name` in the flamegraph, and its bytes.
fn frame_bytes(frames: &[(String, u64)], name: &str) -> Option<u64> {
    frames.iter().find(|(n, _)| n == name).map(|f| f.1)
}

#[test]
fn report_windows_show_each_phase_exactly() {
    let Some(browser) = chromium() else {
        return;
    };
    let work = Work::new("report_html");
    let exe = work.compile("phases.c");
    let t = run_traced_ok(&work, "phases.cap", &exe, &[] as &[&str]);
    memtrack_ok(|c| {
        c.arg("report").arg(&t.capture);
    });
    // The default name: the capture's stem and -report.html, beside it.
    let page = work.path("phases-report.html");
    assert!(page.is_file(), "no {}", page.display());
    let html = std::fs::read_to_string(&page).unwrap();
    for remote in ["http://", "https://", "//cdn"] {
        assert!(
            !html.contains(&format!("src=\"{remote}"))
                && !html.contains(&format!("href=\"{remote}")),
            "the page loads something from {remote}"
        );
    }
    let mut b = Browser::open(
        browser,
        &work.path("profile"),
        &format!("file://{}", page.display()),
    );
    b.wait_ready(20);

    // The timeline's mapped series: the 16 MiB map from 1.6 s to 2.0 s and nothing before,
    // drawn with its legend, and its peak in a header card.
    let mapped = b.eval(
        "(() => { const D = JSON.parse(document.getElementById('memtrack-data').textContent); \
         const at = (t) => D.mapped[Math.floor(t / D.span_seconds * D.mapped.length)]; \
         return [Math.max(...D.mapped), at(1.0), at(1.8), D.summary.peak_mapped_bytes, \
           [...document.querySelectorAll('#legend span')].map((s) => s.textContent), \
           document.querySelectorAll('#tsvg path').length, \
           [...document.querySelectorAll('.tile .k')].map((k) => k.textContent)]; })()",
    );
    assert_eq!(mapped[0], json!(16_777_216), "{mapped}");
    assert_eq!(mapped[1], json!(0), "{mapped}");
    assert_eq!(mapped[2], json!(16_777_216), "{mapped}");
    assert_eq!(mapped[3], json!(16_777_216), "{mapped}");
    assert_eq!(
        mapped[4],
        json!([
            "Heap (high-water mark)",
            "Mapped (mmap, high-water mark)",
            "Resident (RSS)"
        ]),
        "{mapped}"
    );
    assert_eq!(mapped[5], json!(3), "{mapped}");
    assert!(
        mapped[6]
            .as_array()
            .unwrap()
            .contains(&json!("Peak mapped")),
        "{mapped}"
    );

    // The whole run: the high-water mark is the 8 MiB phase.
    let (frames, rows, _) = b.shown();
    assert_eq!(frame_bytes(&frames, "all"), Some(8_388_608), "{frames:?}");
    assert_eq!(frame_bytes(&frames, "hold_8mb"), Some(8_388_608));
    assert_eq!(frame_bytes(&frames, "hold_4mb"), None);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].1, 8_388_608, "{rows:?}");

    // A window over each phase shows that phase alone, in both places.
    for (t0, t1, name, bytes) in [
        (0.25, 0.55, "hold_4mb", 4_194_304u64),
        (1.05, 1.35, "hold_8mb", 8_388_608),
    ] {
        b.drag(t0, t1);
        let (frames, rows, what) = b.shown();
        assert_eq!(
            frame_bytes(&frames, "all"),
            Some(bytes),
            "{t0}-{t1}: {frames:?}"
        );
        assert_eq!(
            frame_bytes(&frames, name),
            Some(bytes),
            "{t0}-{t1}: {frames:?}"
        );
        assert_eq!(frame_bytes(&frames, "main"), Some(bytes));
        assert_eq!(rows.len(), 1, "{t0}-{t1}: {rows:?}");
        assert!(
            rows[0].0.starts_with(&format!("{name} (phases.c:")),
            "{t0}-{t1}: {rows:?}"
        );
        assert_eq!(rows[0].1, bytes, "{rows:?}");
        assert!(what.contains("live at the high-water mark"), "{what}");
        b.screenshot(&work.path(&format!("{name}.png")));
    }
    // Between the phases nothing is live; what was allocated in a window around the first is
    // its block.
    b.drag(0.7, 0.9);
    let (frames, rows, _) = b.shown();
    assert!(frames.is_empty() && rows.is_empty(), "{frames:?} {rows:?}");
    b.drag(0.1, 0.7);
    b.eval("document.querySelector('[data-view=allocated]').click()");
    let (frames, rows, what) = b.shown();
    assert_eq!(
        frame_bytes(&frames, "hold_4mb"),
        Some(4_194_304),
        "{frames:?}"
    );
    assert_eq!(frame_bytes(&frames, "hold_8mb"), None, "{frames:?}");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(what.starts_with("allocated in the window"), "{what}");
    // Search highlights the matching frame and sums it.
    b.eval("const s = document.getElementById('search'); s.value = 'hold_'; s.dispatchEvent(new Event('input'))");
    std::thread::sleep(std::time::Duration::from_millis(400));
    let matched =
        b.eval("[...document.querySelectorAll('#flame .fr.m')].map(d => d.dataset.name).join()");
    assert_eq!(matched, json!("hold_4mb"));
    let details = b.eval("document.getElementById('details').textContent");
    assert!(
        details.as_str().unwrap().contains("4,194,304 bytes"),
        "{details}"
    );
    // Double-click: the whole run again; leaks: none.
    let (x, y) = (
        b.eval("memtrack.xOf(1.0)").as_f64().unwrap(),
        b.eval("memtrack.yMid()").as_f64().unwrap(),
    );
    b.mouse("mousePressed", x, y, 1, 2);
    b.mouse("mouseReleased", x, y, 0, 2);
    b.eval("document.querySelector('[data-view=leaks]').click()");
    let (frames, _, _) = b.shown();
    assert!(frames.is_empty(), "{frames:?}");
    b.eval("document.querySelector('[data-view=allocated]').click()");
    let (frames, _, _) = b.shown();
    assert_eq!(frame_bytes(&frames, "all"), Some(4_194_304 + 8_388_608));
    let png = work.path("hold_4mb.png");
    let shot = std::fs::read(&png).unwrap();
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 20_000,
        "{} bytes",
        shot.len()
    );
}

/// A report of 131,072 distinct stacks and about a million events opens in under 3 seconds
/// (the page's own clock: from navigation to its first complete render).
#[test]
fn large_report_loads_in_under_3_seconds() {
    let Some(browser) = chromium() else {
        return;
    };
    let work = Work::new("report_html_large");
    let exe = work.compile("many_stacks.c");
    let t = run_traced_ok(&work, "many.cap", &exe, &["17", "4"]);
    let page = work.path("many.html");
    let out = memtrack_ok(|c| {
        c.arg("report").arg(&t.capture).arg("-o").arg(&page);
    });
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("131,072 stacks"), "{said}");
    let size = std::fs::metadata(&page).unwrap().len();
    let mut b = Browser::open(
        browser,
        &work.path("profile"),
        &format!("file://{}", page.display()),
    );
    b.wait_ready(60);
    let ms = b.eval("memtrack.loadMs").as_f64().unwrap();
    eprintln!(
        "large report: {:.1} MB, loaded in {ms:.0} ms",
        size as f64 / 1e6
    );
    assert!(ms < 3000.0, "the large report took {ms:.0} ms to load");
    // A window picked is shown again within a second.
    let pick = b.eval("memtrack.select(1.0, 2.0)").as_f64().unwrap();
    eprintln!("large report: a window recomputed and drawn in {pick:.0} ms");
    assert!(pick < 1000.0, "a new window took {pick:.0} ms");
    let (frames, rows, _) = b.shown();
    assert!(frame_bytes(&frames, "left").is_some() && frame_bytes(&frames, "right").is_some());
    assert_eq!(
        rows[0].0,
        "place (many_stacks.c:20)".to_string(),
        "{rows:?}"
    );
}

/// The page's flamegraph of the whole run is `memtrack export --format folded`'s: the same
/// frame names, and every drawn path holds exactly the bytes of the folded lines under it.
fn assert_same_as_folded(b: &mut Browser, capture: &Path, args: &[&str]) {
    let out = memtrack_ok(|c| {
        c.arg("export")
            .arg(capture)
            .args(["--format", "folded"])
            .args(args);
    });
    let folded: Vec<(String, u64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (p, n) = l.rsplit_once(' ').unwrap();
            (p.to_string(), n.parse().unwrap())
        })
        .collect();
    assert!(!folded.is_empty());
    let drawn = b.paths();
    let total: u64 = folded.iter().map(|f| f.1).sum();
    assert!(
        drawn.contains(&(String::new(), total)),
        "{args:?}: the root is not {total}"
    );
    // Every path of the folded lines (and its prefixes) wide enough to be drawn (2 px or more
    // in a graph about 1,150 px wide): drawn with the bytes of all the lines under it.
    let mut under: std::collections::HashMap<String, u64> = Default::default();
    for (line, bytes) in &folded {
        let mut end = 0;
        while let Some(i) = line[end..].find(';').map(|i| i + end) {
            *under.entry(line[..i].to_string()).or_default() += bytes;
            end = i + 1;
        }
        *under.entry(line.clone()).or_default() += bytes;
    }
    let drawn: std::collections::HashMap<String, u64> = drawn.into_iter().collect();
    let mut checked = 0;
    for (path, bytes) in &under {
        if bytes * 500 >= total {
            checked += 1;
            assert_eq!(drawn.get(path), Some(bytes), "{args:?}: {path}");
        }
    }
    assert!(checked >= 5, "{args:?}: only {checked} paths compared");
}

/// Threads: each worker's own allocations under the thread filter, and the flamegraph the
/// same as the folded export.
#[test]
fn report_threads_and_names_match_the_cli() {
    let Some(browser) = chromium() else {
        return;
    };
    let work = Work::new("report_html_threads");
    let exe = work.compile("threads.c");
    let t = run_traced_ok(&work, "threads.cap", &exe, &["100"]);
    let page = work.path("threads.html");
    memtrack_ok(|c| {
        c.arg("report").arg(&t.capture).arg("-o").arg(&page);
    });
    let mut b = Browser::open(
        browser,
        &work.path("profile"),
        &format!("file://{}", page.display()),
    );
    b.wait_ready(20);
    assert_same_as_folded(&mut b, &t.capture, &[]);
    b.eval("document.querySelector('[data-view=allocated]').click()");
    assert_same_as_folded(&mut b, &t.capture, &["--allocated"]);

    // Per worker: 100 rounds of 8 blocks (640 bytes a round) and its leak of 100 + t bytes,
    // all from produce; main made none of them.
    let threads = b
        .eval("document.getElementById('thread').options.length")
        .as_u64()
        .unwrap();
    assert_eq!(threads, 1 + 5, "all threads, main and 4 workers");
    let mut produced = Vec::new();
    let mut leaked = Vec::new();
    for i in 0..5 {
        b.set("#thread", &i.to_string());
        b.eval("document.querySelector('[data-view=allocated]').click()");
        let (frames, _, what) = b.shown();
        assert!(what.contains("thread "), "{what}");
        b.eval("document.querySelector('[data-view=leaks]').click()");
        let (leaks, _, _) = b.shown();
        if let Some(p) = frame_bytes(&frames, "produce") {
            produced.push(p);
            leaked.push(frame_bytes(&leaks, "produce").unwrap());
        }
    }
    produced.sort();
    leaked.sort();
    assert_eq!(produced, [64_100, 64_101, 64_102, 64_103]);
    assert_eq!(leaked, [100, 101, 102, 103]);
}

/// A Python program: the Python-only switch draws what `--python-only` exports, and the
/// whole flamegraph what the export without it does.
#[test]
fn report_python_only_switch_matches_the_cli() {
    let Some(browser) = chromium() else {
        return;
    };
    // The interpreter itself, not a launcher script (pyenv's shims exec it through bash).
    let python = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output();
    let Some(python) = python
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 is not installed in CI"
        );
        eprintln!("python3 not installed here: skipped");
        return;
    };
    let work = Work::new("report_html_python");
    let cap = work.path("app.cap");
    memtrack_ok(|c| {
        c.arg("run")
            .arg("-o")
            .arg(&cap)
            .arg("--")
            .arg(&python)
            .arg(fixtures_dir().join("py_app.py"))
            .current_dir(work.dir());
    });
    let page = work.path("app.html");
    memtrack_ok(|c| {
        c.arg("report").arg(&cap).arg("-o").arg(&page);
    });
    let mut b = Browser::open(
        browser,
        &work.path("profile"),
        &format!("file://{}", page.display()),
    );
    b.wait_ready(20);
    assert_same_as_folded(&mut b, &cap, &[]);
    b.set("#python", "true");
    assert_same_as_folded(&mut b, &cap, &["--python-only"]);
    let (frames, rows, what) = b.shown();
    assert!(what.contains("Python frames only"), "{what}");
    assert!(frame_bytes(&frames, "checkpoint_notifier (py_app.py:13)").unwrap() >= 50 << 20);
    // The Python frames directly below the root: no interpreter frames between them.
    let top = "<module> (py_app.py:27);main (py_app.py:23);checkpoint_notifier (py_app.py:13)";
    let held = b.paths().into_iter().find(|p| p.0 == top).map(|p| p.1);
    assert!(held.is_some_and(|h| h >= 50 << 20), "{top}: {held:?}");
    assert!(
        rows[0].0.starts_with("checkpoint_notifier (py_app.py:13)"),
        "{rows:?}"
    );
}

/// Past its row budget the page merges the stacks that hold least into one, and every total
/// stays exact: reports.c's three stacks in a budget of two rows keep peak_site (the most
/// allocated) and merge the two that leak, whose 3,000 bytes stay leaked.
#[test]
fn pruned_stacks_keep_exact_totals() {
    use memtrack_reader::report::{html, ProgressGuard, ReportOptions, Reporter, Subject};
    let work = Work::new("report_html_pruned");
    let exe = work.compile("reports.c");
    let t = run_traced_ok(&work, "reports.cap", &exe, &[] as &[&str]);
    let subject = Subject::open(&t.capture, None).unwrap();
    let mut diag = Vec::new();
    let progress = |_: &memtrack_reader::Capture, _: bool| -> ProgressGuard { Box::new(()) };
    let mut r = Reporter {
        options: ReportOptions::default(),
        diag: &mut diag,
        progress: &progress,
    };
    let figures = |d: &html::Data| -> (u64, u64, usize) {
        let leaked_rows: Vec<usize> = d
            .row_flags
            .chunks(2)
            .filter(|p| p[1] & 2 != 0)
            .map(|p| p[0] as usize)
            .collect();
        let all: u64 = d.row_bytes.iter().sum();
        let leaked: u64 = leaked_rows.iter().map(|&i| d.row_bytes[i]).sum();
        (all, leaked, d.pruned_stacks)
    };
    let whole = html::report_with(&mut r, &subject, html::ROW_BUDGET).unwrap();
    let (all, leaked, pruned) = figures(whole.data());
    assert_eq!(pruned, 0);
    let stacks = whole.data().stack_node.len();
    assert!(stacks >= 3, "{stacks} stacks");
    let small = html::report_with(&mut r, &subject, 2).unwrap();
    let d = small.data();
    assert_eq!(figures(d), (all, leaked, stacks - 1), "{:?}", d.frames);
    assert!(leaked >= 3000, "{leaked}");
    // One stack kept (peak_site), the merged one last, named so on the page.
    assert_eq!(d.stack_node.len(), 2);
    assert!(
        d.frames.contains(&"peak_site".to_string()),
        "{:?}",
        d.frames
    );
    assert!(
        !d.frames.contains(&"leak_direct".to_string()),
        "{:?}",
        d.frames
    );
    let merged = d.frames[d.node_frame[*d.stack_node.last().unwrap() as usize] as usize].clone();
    assert_eq!(merged, format!("[{} smaller stacks]", stacks - 1));
}
