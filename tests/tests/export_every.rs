//! `memtrack export --format pprof --every`: one profile per interval, read back (a small
//! profile.proto decoder here, and `go tool pprof` where installed), on a finished capture and on
//! one still being written, exported twice.

use memtrack_tests::*;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const EVERY_NS: u64 = 500_000_000;

/// Per leaf function: [alloc_objects, alloc_space, inuse_objects, inuse_space].
type Figures = BTreeMap<String, [u64; 4]>;

struct Profile {
    types: Vec<String>,
    time_nanos: u64,
    duration_nanos: u64,
    period_type: String,
    by_leaf: Figures,
    /// The profile's comments (`comment`, string indices resolved).
    comments: Vec<String>,
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*i];
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return v;
        }
        shift += 7;
    }
}

enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

fn fields(b: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        match key & 7 {
            0 => out.push((key >> 3, Field::Int(varint(b, &mut i)))),
            2 => {
                let n = varint(b, &mut i) as usize;
                out.push((key >> 3, Field::Bytes(&b[i..i + n])));
                i += n;
            }
            w => panic!("wire type {w} not written by memtrack"),
        }
    }
    out
}

fn packed(f: &Field<'_>) -> Vec<u64> {
    match f {
        Field::Int(v) => vec![*v],
        Field::Bytes(b) => {
            let mut i = 0;
            let mut v = Vec::new();
            while i < b.len() {
                v.push(varint(b, &mut i));
            }
            v
        }
    }
}

fn int(f: &Field<'_>) -> u64 {
    match f {
        Field::Int(v) => *v,
        Field::Bytes(_) => panic!("not an integer"),
    }
}

fn sub<'a>(f: &Field<'a>) -> Vec<(u64, Field<'a>)> {
    match f {
        Field::Bytes(b) => fields(b),
        Field::Int(_) => panic!("not a message"),
    }
}

/// Decodes a gzipped profile: its sample types, times, and values summed by leaf function.
fn decode(path: &Path) -> Profile {
    let gz = std::fs::read(path).unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{}: not gzip: {e}", path.display()));
    let top = fields(&raw);
    let strings: Vec<String> = top
        .iter()
        .filter(|(n, _)| *n == 6)
        .map(|(_, f)| match f {
            Field::Bytes(b) => String::from_utf8(b.to_vec()).unwrap(),
            Field::Int(_) => panic!("string"),
        })
        .collect();
    let mut function_name: HashMap<u64, String> = HashMap::new();
    let mut location_leaf: HashMap<u64, u64> = HashMap::new();
    let mut types = Vec::new();
    let mut samples = Vec::new();
    let (mut time_nanos, mut duration_nanos, mut period_type) = (0, 0, String::new());
    let mut comments = Vec::new();
    for (n, f) in &top {
        match n {
            1 => {
                let vt = sub(f);
                let ty = vt.iter().find(|(n, _)| *n == 1).map_or(0, |(_, f)| int(f));
                types.push(strings[ty as usize].clone());
            }
            2 => {
                let s = sub(f);
                let locs = s
                    .iter()
                    .filter(|(n, _)| *n == 1)
                    .flat_map(|(_, f)| packed(f))
                    .collect::<Vec<_>>();
                let values = s
                    .iter()
                    .filter(|(n, _)| *n == 2)
                    .flat_map(|(_, f)| packed(f))
                    .collect::<Vec<_>>();
                samples.push((locs, values));
            }
            4 => {
                let l = sub(f);
                let id = l.iter().find(|(n, _)| *n == 1).map_or(0, |(_, f)| int(f));
                // The innermost frame first.
                let first_line = l.iter().find(|(n, _)| *n == 4).map(|(_, f)| sub(f));
                let fid = first_line
                    .and_then(|line| line.iter().find(|(n, _)| *n == 1).map(|(_, f)| int(f)))
                    .unwrap_or(0);
                location_leaf.insert(id, fid);
            }
            5 => {
                let fm = sub(f);
                let id = fm.iter().find(|(n, _)| *n == 1).map_or(0, |(_, f)| int(f));
                let name = fm.iter().find(|(n, _)| *n == 2).map_or(0, |(_, f)| int(f));
                function_name.insert(id, strings[name as usize].clone());
            }
            9 => time_nanos = int(f),
            13 => comments.extend(packed(f).into_iter().map(|i| strings[i as usize].clone())),
            10 => duration_nanos = int(f),
            11 => {
                let vt = sub(f);
                let ty = vt.iter().find(|(n, _)| *n == 1).map_or(0, |(_, f)| int(f));
                let unit = vt.iter().find(|(n, _)| *n == 2).map_or(0, |(_, f)| int(f));
                period_type = format!("{}/{}", strings[ty as usize], strings[unit as usize]);
            }
            _ => {}
        }
    }
    let mut by_leaf = Figures::new();
    for (locs, values) in samples {
        let leaf = locs
            .first()
            .and_then(|l| location_leaf.get(l))
            .and_then(|f| function_name.get(f))
            .cloned()
            .unwrap_or_else(|| "?".into());
        let e = by_leaf.entry(leaf).or_default();
        for (slot, v) in e.iter_mut().zip(&values) {
            *slot += v;
        }
    }
    Profile {
        types,
        time_nanos,
        duration_nanos,
        period_type,
        by_leaf,
        comments,
    }
}

fn figures(rows: &[(&str, [u64; 4])]) -> Figures {
    rows.iter().map(|(f, v)| (f.to_string(), *v)).collect()
}

/// Each phase of `every.c` as one interval's profile.
fn p0() -> Figures {
    figures(&[
        ("keep_a", [1, 100000, 1, 100000]),
        ("temp_b", [1, 200000, 1, 200000]),
    ])
}
fn p1() -> Figures {
    figures(&[
        ("keep_a", [0, 0, 1, 100000]),
        ("alloc_c", [3, 90000, 2, 60000]),
    ])
}
/// An interval with nothing allocated: what was in use after the previous one.
fn waiting() -> Figures {
    figures(&[("keep_a", [0, 0, 1, 100000]), ("alloc_c", [0, 0, 2, 60000])])
}
fn last() -> Figures {
    figures(&[("keep_a", [0, 0, 1, 100000]), ("temp_d", [1, 5000, 0, 0])])
}

/// `date -u` of a time in nanoseconds: `20261206T170800.250Z`.
fn stamp(unix_ns: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d"])
        .arg(format!("@{}", unix_ns / 1_000_000_000))
        .arg("+%Y%m%dT%H%M%S")
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    format!("{}.{:03}Z", s.trim(), unix_ns / 1_000_000 % 1000)
}

fn export_every(capture: &Path, dir: &Path) -> std::process::Output {
    memtrack_ok(|c| {
        c.arg("export")
            .arg(capture)
            .args(["--format", "pprof", "--every", "500ms", "-o"])
            .arg(dir);
    })
}

/// The profiles in `dir`, in name order (which is time order).
fn profiles_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".pb.gz"))
        .collect();
    v.sort();
    v
}

/// Checks the profiles of `capture` in `dir` (stem `stem`): names and times from the start,
/// every 500 ms, the last one cut at the end; the figures of each are `expected`'s.
fn check_profiles(capture: &Path, dir: &Path, stem: &str, expected: &[Figures]) {
    let cap = open_capture(capture);
    let start = cap.header.start_unix_ns;
    let files = profiles_in(dir);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{stem}-")))
        .collect();
    let want: Vec<String> = (0..expected.len() as u64)
        .map(|k| format!("{stem}-{}.pb.gz", stamp(start + k * EVERY_NS)))
        .collect();
    assert_eq!(names, want);
    let end_ns = summary_json(capture)["duration_seconds"].as_f64().unwrap() * 1e9;
    for (k, (name, want)) in names.iter().zip(expected).enumerate() {
        let p = decode(&dir.join(name));
        assert_eq!(
            p.types,
            [
                "alloc_objects",
                "alloc_space",
                "inuse_objects",
                "inuse_space"
            ]
        );
        assert_eq!(p.period_type, "space/bytes");
        assert_eq!(&p.by_leaf, want, "interval {k} ({name})");
        assert_eq!(p.time_nanos, start + k as u64 * EVERY_NS, "{name}");
        if k + 1 < expected.len() {
            assert_eq!(p.duration_nanos, EVERY_NS, "{name}");
        } else {
            // The last interval ends with the capture.
            let covered = end_ns - (k as u64 * EVERY_NS) as f64;
            assert!(
                p.duration_nanos > 0
                    && p.duration_nanos <= EVERY_NS
                    && (p.duration_nanos as f64 - covered).abs() < 2e6,
                "{name}: duration {} ns, the capture's end {covered} ns after its start",
                p.duration_nanos
            );
        }
    }
}

fn state(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(".memtrack-every.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn wrote_lines(out: &std::process::Output) -> usize {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("memtrack: wrote "))
        .count()
}

#[test]
fn a_finished_capture_gives_one_exact_profile_per_interval() {
    let work = Work::new("every");
    let exe = work.compile("every.c");
    let t = run_traced_ok(&work, "e.cap", &exe, &[] as &[&str]);
    let dir = work.path("profiles");
    let out = export_every(&t.capture, &dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(wrote_lines(&out), 4, "{err}");
    assert!(
        err.contains("4 profiles (intervals 0 to 3) every 500ms written to")
            && err.contains("the capture is finished: 4 intervals in all"),
        "{err}"
    );
    check_profiles(&t.capture, &dir, "e", &[p0(), p1(), waiting(), last()]);
    let s = state(&dir);
    let entries = s["captures"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["next"], 4);
    assert_eq!(entries[0]["finished"], true);
    assert_eq!(entries[0]["every_ns"], EVERY_NS);

    // Again: nothing new, not an error, nothing rewritten.
    let before = std::fs::metadata(profiles_in(&dir)[0].clone())
        .unwrap()
        .modified()
        .unwrap();
    let again = export_every(&t.capture, &dir);
    assert_eq!(wrote_lines(&again), 0);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no new interval"));
    let after = std::fs::metadata(profiles_in(&dir)[0].clone())
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);

    // Another length into the same directory: refused, the state names the one it holds.
    let other = Command::new(&binaries().memtrack)
        .arg("export")
        .arg(&t.capture)
        .args(["--format", "pprof", "--every", "1s", "-o"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(2));
    let text = String::from_utf8_lossy(&other.stderr);
    assert!(text.contains("every 500ms (--every 500ms)"), "{text}");

    // go tool pprof reads them (CI installs it).
    if Command::new("go").arg("version").output().is_ok() {
        let second = &profiles_in(&dir)[1];
        let raw = Command::new("go")
            .args(["tool", "pprof", "-raw"])
            .arg(second)
            .env("HOME", work.dir())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&raw.stdout);
        assert!(
            raw.status.success(),
            "{}",
            String::from_utf8_lossy(&raw.stderr)
        );
        assert!(text.contains("Duration: 500m"), "{text}");
        // alloc_c's sample: 3 allocated (90,000 bytes), 2 in use (60,000 bytes).
        assert!(
            text.lines().any(|l| l
                .split_whitespace()
                .take(4)
                .eq(["3", "90000", "2", "60000:"])),
            "{text}"
        );
    }
}

/// Exported while the program runs (it waits at a mark until told to go on): only the
/// intervals that are over; exported again after it ended: only the new ones, the earlier
/// files untouched. A second capture in the same directory keeps a state of its own.
#[test]
fn a_capture_being_written_is_exported_in_steps() {
    let work = Work::new("every-resume");
    let exe = work.compile("every.c");
    let capture = work.path("w.cap");
    let signal = work.path("sig");
    let dir = work.path("profiles");
    let mut child = KillOnDrop(
        shim_command(&exe, &capture)
            .arg(&signal)
            .spawn()
            .expect("start every"),
    );
    let ready = PathBuf::from(format!("{}.ready", signal.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "every.c never got ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 2.1 s after the start: intervals 0 and 1 (to 1.0 s) are over by more than the time the
    // tracker may take to write an event (SETTLE_NS, 0.75 s).
    let start = open_capture(&capture).header.start_unix_ns;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let at = start + 2_100_000_000;
    if now() < at {
        std::thread::sleep(Duration::from_nanos(at - now()));
    }
    let first = export_every(&capture, &dir);
    let err = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the program waits for the go file"
    );
    assert!(err.contains("the capture is still being written"), "{err}");
    let n1 = wrote_lines(&first);
    assert!(n1 >= 2, "{err}");
    let early: Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> = profiles_in(&dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, bytes, m)
        })
        .collect();
    assert_eq!(early.len(), n1);
    assert_eq!(state(&dir)["captures"][0]["next"], n1 as u64);
    assert_eq!(state(&dir)["captures"][0]["finished"], false);

    std::fs::write(format!("{}.go", signal.display()), b"").unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let second = export_every(&capture, &dir);
    let err = String::from_utf8_lossy(&second.stderr).into_owned();
    let all = profiles_in(&dir);
    assert_eq!(wrote_lines(&second), all.len() - n1, "{err}");
    assert!(err.contains("the capture is finished"), "{err}");
    for (p, bytes, m) in &early {
        assert_eq!(
            &std::fs::read(p).unwrap(),
            bytes,
            "{} rewritten",
            p.display()
        );
        assert_eq!(&std::fs::metadata(p).unwrap().modified().unwrap(), m);
    }
    // P0, P1, then intervals of waiting (at least one: the go file is looked for at a mark
    // and acted on at the next), then the last phase.
    assert!(all.len() >= 4, "{all:?}");
    let mut expected = vec![p0(), p1()];
    expected.extend(std::iter::repeat_n(waiting(), all.len() - 3));
    expected.push(last());
    check_profiles(&capture, &dir, "w", &expected);

    // Another capture into the same directory: a state of its own, its own files.
    let t = run_traced_ok(&work, "e.cap", &exe, &[] as &[&str]);
    let third = export_every(&t.capture, &dir);
    assert_eq!(wrote_lines(&third), 4);
    check_profiles(&t.capture, &dir, "e", &[p0(), p1(), waiting(), last()]);
    assert_eq!(state(&dir)["captures"].as_array().unwrap().len(), 2);
    let last_run = export_every(&capture, &dir);
    assert_eq!(wrote_lines(&last_run), 0);
}

#[test]
fn bad_every_arguments_are_errors_with_exit_2() {
    let work = Work::new("every-bad");
    let file = work.path("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let capture = work.path("none.cap");
    let run = |args: &[&str]| {
        let out = Command::new(&binaries().memtrack)
            .arg("export")
            .arg(&capture)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let f = file.to_str().unwrap();
    let (code, err) = run(&["--format", "pprof", "--every", "1s", "-o", f]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{f}: not a directory")), "{err}");
    let (code, err) = run(&["--format", "json", "--every", "1s", "-o", "d"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("use it with --format pprof"), "{err}");
    let (code, err) = run(&["--format", "pprof", "--every", "0s", "-o", "d"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("must be longer than 0"), "{err}");
    let (code, err) = run(&["--format", "pprof", "--every", "1s"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("give their directory with -o DIR"), "{err}");
    let (code, err) = run(&["--format", "pprof", "--every", "1s", "--leaks", "-o", "d"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--every takes no view"), "{err}");
    // The missing capture is named.
    let d = work.path("d");
    let (code, err) = run(&[
        "--format",
        "pprof",
        "--every",
        "1s",
        "-o",
        d.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("none.cap"), "{err}");
}

/// `every.c`'s heap events in order, by leaf function: (function, bytes allocated, or the
/// allocation a free releases as a negative index into this list).
const EVERY_EVENTS: [(&str, i64); 11] = [
    ("keep_a", 100_000),
    ("temp_b", 200_000),
    ("temp_b", -1),
    ("alloc_c", 30_000),
    ("alloc_c", 30_000),
    ("alloc_c", 30_000),
    ("alloc_c", -5), // c[2]
    ("alloc_c", -3), // c[0]
    ("alloc_c", -4), // c[1]
    ("temp_d", 5_000),
    ("temp_d", -9),
];

/// The state after each prefix of `every.c`'s events (0 to 11 of them), as one profile's
/// figures would give it: allocated since the start, in use then. Stacks with nothing are
/// left out, as profiles leave them out.
fn every_prefix_states() -> Vec<Figures> {
    let mut states = vec![Figures::new()];
    let mut fig = Figures::new();
    for (i, &(f, v)) in EVERY_EVENTS.iter().enumerate() {
        let e = fig.entry(f.to_string()).or_default();
        if v > 0 {
            e[0] += 1;
            e[1] += v as u64;
            e[2] += 1;
            e[3] += v as u64;
        } else {
            let size = EVERY_EVENTS[(-v) as usize].1 as u64;
            assert!((-v) < i as i64);
            e[2] -= 1;
            e[3] -= size;
        }
        states.push(fig.clone());
    }
    states
}

/// Checks that the profiles `files` (in time order) of an aggregated capture of `every.c`
/// are exact: each one's in-use figures and its allocations added to those of the profiles
/// before it are the state after some prefix of the program's events, the prefixes grow, and
/// the last one is the whole program (its allocated sums are the program's totals, its in-use
/// the leak). Returns the prefix length of each.
fn check_exact_prefixes(files: &[PathBuf]) -> Vec<usize> {
    let states = every_prefix_states();
    let mut allocated = Figures::new();
    let mut seen = Vec::new();
    for path in files {
        let p = decode(path);
        let mut state = Figures::new();
        for (f, v) in &p.by_leaf {
            let a = allocated.entry(f.clone()).or_default();
            a[0] += v[0];
            a[1] += v[1];
        }
        for (f, a) in &allocated {
            let inuse = p.by_leaf.get(f).map_or([0, 0], |v| [v[2], v[3]]);
            state.insert(f.clone(), [a[0], a[1], inuse[0], inuse[1]]);
        }
        for (f, v) in &p.by_leaf {
            state.entry(f.clone()).or_insert([0, 0, v[2], v[3]]);
        }
        state.retain(|_, v| v.iter().any(|&x| x > 0));
        let n = states.iter().position(|s| *s == state).unwrap_or_else(|| {
            panic!(
                "{}: allocated so far and in use {state:?} is no state of the program",
                path.display()
            )
        });
        assert!(
            seen.last().is_none_or(|&m| m <= n),
            "{}: state {n} after {seen:?}",
            path.display()
        );
        assert!(
            p.comments
                .iter()
                .any(|c| c.contains("aggregated capture: in use at checkpoint")),
            "{:?}",
            p.comments
        );
        seen.push(n);
    }
    assert_eq!(seen.last(), Some(&EVERY_EVENTS.len()), "{seen:?}");
    // The program's totals, and its leak in the last profile.
    assert_eq!(
        allocated,
        figures(&[
            ("keep_a", [1, 100000, 0, 0]),
            ("temp_b", [1, 200000, 0, 0]),
            ("alloc_c", [3, 90000, 0, 0]),
            ("temp_d", [1, 5000, 0, 0]),
        ])
    );
    let last = decode(files.last().unwrap());
    let inuse: Vec<_> = last
        .by_leaf
        .iter()
        .filter(|(_, v)| v[2] > 0 || v[3] > 0)
        .map(|(f, v)| (f.as_str(), v[2], v[3]))
        .collect();
    assert_eq!(inuse, [("keep_a", 1, 100000)]);
    seen
}

fn export_every_ms(capture: &Path, dir: &Path, every: &str) -> std::process::Output {
    memtrack_ok(|c| {
        c.arg("export")
            .arg(capture)
            .args(["--format", "pprof", "--every", every, "-o"])
            .arg(dir);
    })
}

/// `memtrack run --aggregate --checkpoint-interval 200ms`.
fn run_aggregated(work: &Work, name: &str, exe: &Path) -> PathBuf {
    let capture = work.path(name);
    let out = Command::new(&binaries().memtrack)
        .args([
            "run",
            "--aggregate",
            "--checkpoint-interval",
            "200ms",
            "--force",
            "-o",
        ])
        .arg(&capture)
        .arg("--")
        .arg(exe)
        .current_dir(work.dir())
        .env_remove("MEMTRACK_SAMPLE_RATE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    capture
}

/// Interval numbers written (from the profiles' names) and those said to have no profile
/// (from the notes): together, every interval once.
fn intervals_accounted(capture: &Path, dir: &Path, stem: &str, err: &str, every_ns: u64) {
    let start = open_capture(capture).header.start_unix_ns;
    let mut k_of: HashMap<String, u64> = HashMap::new();
    for k in 0..200u64 {
        k_of.insert(format!("{stem}-{}.pb.gz", stamp(start + k * every_ns)), k);
    }
    let mut ks: Vec<u64> = profiles_in(dir)
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            *k_of
                .get(&name)
                .unwrap_or_else(|| panic!("{name}: no interval's name"))
        })
        .collect();
    for line in err
        .lines()
        .filter(|l| l.starts_with("memtrack: note: interval"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let n = |w: &str| w.parse::<u64>().unwrap();
        if words[2] == "interval" {
            ks.push(n(words[3]));
        } else {
            ks.extend(n(words[3])..=n(words[5]));
        }
    }
    ks.sort();
    let all: Vec<u64> = (0..ks.len() as u64).collect();
    assert_eq!(ks, all, "{err}");
}

/// An aggregated capture: profiles from its checkpoints, exact per function; an interval with
/// no checkpoint of its own is said to have no profile, its allocations counted in the next.
#[test]
fn an_aggregated_capture_gives_exact_profiles_from_its_checkpoints() {
    let work = Work::new("every-agg");
    let exe = work.compile("every.c");
    let capture = run_aggregated(&work, "a.cap", &exe);
    assert!(open_capture(&capture).aggregated());

    // 500 ms: two or more checkpoints in every interval, a profile for each.
    let dir = work.path("p500");
    let out = export_every_ms(&capture, &dir, "500ms");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("no profile"), "{err}");
    assert!(!err.contains("estimated"), "{err}");
    let files = profiles_in(&dir);
    assert_eq!(files.len(), 4, "{err}");
    assert_eq!(wrote_lines(&out), 4);
    let seen = check_exact_prefixes(&files);
    // The first phase is at 0.25 s: in interval 0 or (written late) 1; both ends exact.
    assert!(seen[0] == 0 || seen[0] == 2, "{seen:?}");
    check_profiles_named(&capture, &dir, "a", 4);

    // 100 ms: checkpoints every 200 ms leave intervals without one: no profile, said so, and
    // what they allocated is in the next profile (the sums stay the program's).
    let dir = work.path("p100");
    let out = export_every_ms(&capture, &dir, "100ms");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("no profile: no checkpoint was written in")
            && err.contains("is counted in interval"),
        "{err}"
    );
    let files = profiles_in(&dir);
    assert!(files.len() >= 6, "{err}");
    check_exact_prefixes(&files);
    intervals_accounted(&capture, &dir, "a", &err, 100_000_000);

    // Rerun: nothing new.
    let again = export_every_ms(&capture, &dir, "100ms");
    assert_eq!(wrote_lines(&again), 0);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no new interval"));
}

/// Profile names are the intervals' starts, in order from 0.
fn check_profiles_named(capture: &Path, dir: &Path, stem: &str, n: u64) {
    let start = open_capture(capture).header.start_unix_ns;
    let names: Vec<String> = profiles_in(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let want: Vec<String> = (0..n)
        .map(|k| format!("{stem}-{}.pb.gz", stamp(start + k * EVERY_NS)))
        .collect();
    assert_eq!(names, want);
}

/// Checkpoints gone from the capture (as compaction will leave it): the intervals they were
/// in have no profile, said so with the reason, and no figure is made up for them.
#[test]
fn compacted_checkpoints_leave_intervals_skipped_with_the_reason() {
    let work = Work::new("every-agg-compact");
    let exe = work.compile("every.c");
    let capture = run_aggregated(&work, "full.cap", &exe);
    let data = std::fs::read(&capture).unwrap();
    // Drops the CHECKPOINT records written from 0.5 s to 1.5 s after the start.
    let (h, mut off) = memtrack_format::Header::decode(&data).unwrap();
    let unit = h.clock_unit_ns.max(1);
    let mut kept = data[..off].to_vec();
    let mut dropped = Vec::new();
    while let memtrack_format::Next::Record(r) = memtrack_format::next_record(&data, off) {
        let end = r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
        let drop = r.kind == memtrack_format::record::CHECKPOINT && {
            let c = memtrack_format::Checkpoint::decode(r.payload).unwrap();
            let t = c.time * unit;
            let gone = (500_000_000..1_500_000_000).contains(&t);
            if gone {
                dropped.push(c.number);
            }
            gone
        };
        if !drop {
            kept.extend_from_slice(&data[r.offset..end]);
        }
        off = end;
    }
    assert!(dropped.len() >= 4, "{dropped:?}");
    let compacted = work.path("c.cap");
    std::fs::write(&compacted, &kept).unwrap();
    let n_cp = open_capture(&compacted).checkpoints().count();
    let n_full = open_capture(&capture).checkpoints().count();
    assert_eq!(n_cp + dropped.len(), n_full);

    let dir = work.path("p");
    let out = export_every_ms(&compacted, &dir, "500ms");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // Intervals 1 and 2 (0.5 s to 1.5 s) had only the dropped checkpoints.
    let want = format!(
        "memtrack: note: intervals 1 to 2 have no profile: checkpoints {} to {} are no longer in the capture (compacted); what was allocated in them is counted in interval 3's profile",
        dropped[0],
        dropped[dropped.len() - 1]
    );
    assert!(err.contains(&want), "{err}");
    let files = profiles_in(&dir);
    assert_eq!(files.len(), 2, "{err}");
    check_exact_prefixes(&files);
    intervals_accounted(&compacted, &dir, "c", &err, EVERY_NS);
    let last = decode(&files[1]);
    assert!(
        last.comments
            .iter()
            .any(|c| c.contains("intervals 1 to 2 having no checkpoint of their own")),
        "{:?}",
        last.comments
    );
}

/// An aggregated capture exported while written: only intervals a later checkpoint closed;
/// a rerun after the end writes only the rest, and all of them are exact.
#[test]
fn an_aggregated_capture_being_written_is_exported_in_steps() {
    let work = Work::new("every-agg-live");
    let exe = work.compile("every.c");
    let capture = work.path("w.cap");
    let signal = work.path("sig");
    let dir = work.path("profiles");
    let mut child = KillOnDrop(
        shim_command(&exe, &capture)
            .arg(&signal)
            .env("MEMTRACK_AGGREGATE", "1")
            .env("MEMTRACK_CHECKPOINT_INTERVAL", "200")
            .env_remove("MEMTRACK_SAMPLE_RATE")
            .spawn()
            .expect("start every"),
    );
    let ready = PathBuf::from(format!("{}.ready", signal.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "every.c never got ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1300));
    let first = export_every(&capture, &dir);
    let err = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(child.0.try_wait().unwrap().is_none());
    assert!(err.contains("the capture is still being written"), "{err}");
    let n1 = wrote_lines(&first);
    assert!(n1 >= 2, "{err}");
    let early: Vec<(PathBuf, Vec<u8>)> = profiles_in(&dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    assert_eq!(early.len(), n1);
    assert_eq!(state(&dir)["captures"][0]["next"], n1 as u64);
    // The checkpoint the next run counts from, kept in case the tracker compacts it away.
    let pid = child.0.id();
    let base = dir.join(format!(
        ".memtrack-every-{pid}-{}.base",
        open_capture(&capture).header.start_unix_ns
    ));
    let b = memtrack_format::Checkpoint::decode(&std::fs::read(&base).unwrap()).unwrap();
    assert!(b.number >= 2 && !b.last, "{b:?}");

    std::fs::write(format!("{}.go", signal.display()), b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    let second = export_every(&capture, &dir);
    let err = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(err.contains("the capture is finished"), "{err}");
    let all = profiles_in(&dir);
    assert_eq!(wrote_lines(&second), all.len() - n1, "{err}");
    for (p, b) in &early {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} rewritten", p.display());
    }
    check_exact_prefixes(&all);
    intervals_accounted(&capture, &dir, "w", &err, EVERY_NS);
}

/// A sampled capture: the profiles hold weighted estimates and say so; the last one's in-use
/// is the summary's leak estimate, within 4 standard errors of the truth; the allocations of
/// all the profiles sum to the summary's estimate of the total.
#[test]
fn a_sampled_capture_gives_profiles_of_estimates() {
    let work = Work::new("every-sampled");
    let exe = work.compile("sample_mix.c");
    let capture = work.path("s.cap");
    let out = Command::new(&binaries().memtrack)
        .args([
            "run",
            "--sample-rate",
            "512KiB",
            "--sample-seed",
            "3",
            "--force",
            "-o",
        ])
        .arg(&capture)
        .arg("--")
        .arg(&exe)
        .current_dir(work.dir())
        .env_remove("MEMTRACK_SAMPLE_RATE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = run_traced_ok(&work, "f.cap", &exe, &[] as &[&str]);
    let truth = summary_json(&full.capture);
    let j = summary_json(&capture);
    assert!(json_bool(&j, "sampled"), "{j}");

    let dir = work.path("p");
    let out = export_every_ms(&capture, &dir, "20ms");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let wrote: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("memtrack: wrote "))
        .collect();
    assert!(!wrote.is_empty(), "{err}");
    assert!(
        wrote.iter().all(|l| l.contains("(estimated: in use ")),
        "{err}"
    );
    let files = profiles_in(&dir);
    assert_eq!(files.len(), wrote.len());
    let (mut alloc_bytes, mut alloc_n) = (0u64, 0u64);
    for f in &files {
        let p = decode(f);
        assert!(
            p.comments.iter().any(|c| c
                .contains("values are ESTIMATES from allocations sampled at one per 524288 bytes")),
            "{:?}",
            p.comments
        );
        alloc_n += p.by_leaf.values().map(|v| v[0]).sum::<u64>();
        alloc_bytes += p.by_leaf.values().map(|v| v[1]).sum::<u64>();
    }
    let last = decode(files.last().unwrap());
    let inuse: u64 = last.by_leaf.values().map(|v| v[3]).sum();
    assert_eq!(inuse, json_u64(&j, "leaked_bytes"), "{j}");
    let (truth_leak, se) = (
        json_u64(&truth, "leaked_bytes") as f64,
        json_u64(&j, "leaked_stderr_bytes") as f64,
    );
    assert!(se > 0.0);
    assert!(
        (inuse as f64 - truth_leak).abs() <= 4.0 * se,
        "in use at the end {inuse} ± {se}, truth {truth_leak}"
    );
    assert_eq!(alloc_bytes, json_u64(&j, "total_bytes"), "{j}");
    assert_eq!(alloc_n, json_u64(&j, "total_allocations"), "{j}");
    // Every allocation recorded stands for at least itself: never below what was sampled.
    assert!(alloc_bytes >= json_u64(&truth, "total_bytes") / 2);
}
