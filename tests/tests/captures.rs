//! Old captures keep reading, and damaged captures never panic the reader.

use memtrack_reader::{Capture, ColumnEncoding};
use memtrack_tests::*;
use std::path::PathBuf;

fn kept(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("captures")
        .join(name)
}

const ALL_KEPT: [&str; 15] = [
    "v1-every-function.cap",
    "v1-threads.cap",
    "v1-exec-chain.cap",
    "v2-every-function.cap",
    "v2-threads.cap",
    "v2-exec-chain.cap",
    "v3-every-function.cap",
    "v3-threads.cap",
    "v3-exec-chain.cap",
    "v4-every-function.cap",
    "v4-threads.cap",
    "v4-exec-chain.cap",
    "v5-every-function.cap",
    "v5-threads.cap",
    "v5-exec-chain.cap",
];

fn figures(cap: &Capture) -> Figures {
    Figures::from_summary(&cap.summary().expect("summary"))
}

/// The truths of the kept captures (the same programs were captured with every version).
fn kept_cases() -> Vec<(&'static str, Figures, usize)> {
    vec![
        (
            "v1-every-function.cap",
            Figures {
                peak_bytes: 14022,
                peak_allocations: 10,
                leaked_bytes: 3350,
                leaked_allocations: 5,
                total_allocations: 13,
                total_bytes: 19200,
                total_frees: 5,
            },
            1,
        ),
        (
            "v1-threads.cap",
            Figures {
                peak_bytes: 3968,
                peak_allocations: 37,
                leaked_bytes: 1558,
                leaked_allocations: 8,
                total_allocations: 105,
                total_bytes: 9494,
                total_frees: 97,
            },
            5,
        ),
        ("v1-exec-chain.cap", EXEC_CHAIN_TRUTH, 1),
    ]
}

#[test]
fn captures_of_every_format_version_still_read_exactly() {
    for version in [1u16, 2, 3, 4, 5] {
        for (name, expected, threads) in kept_cases() {
            let name = name.replacen("v1", &format!("v{version}"), 1);
            check_kept(&name, version, expected, threads);
        }
    }
}

fn check_kept(name: &str, version: u16, expected: Figures, threads: usize) {
    {
        let cap = Capture::open(kept(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cap.header.version, version, "{name}");
        // Version 1 writes only stream chunks, 2 only EVENTS_Z, 3 only EVENTS_T, 4 only
        // EVENTS_R; the version 5 captures kept were recorded with the fast encoding (EVENTS_S).
        let encoding = match version {
            1 => None,
            2 => Some(ColumnEncoding::Varint),
            3 => Some(ColumnEncoding::Token),
            4 => Some(ColumnEncoding::Rank),
            _ => Some(ColumnEncoding::ZstdStream),
        };
        assert!(!cap.chunks.is_empty(), "{name}");
        assert!(cap.chunks.iter().all(|c| c.compact == encoding), "{name}");
        assert!(cap.complete(), "{name}");
        assert_eq!(cap.threads, threads, "{name}");
        assert_eq!(figures(&cap), expected, "{name}");
        let s = cap.summary().unwrap();
        assert_eq!(
            (
                s.unmatched_frees,
                s.overlapping_allocations,
                s.corrupt_chunks
            ),
            (0, 0, 0)
        );
        // And through the command line.
        assert_eq!(
            Figures::from_json(&summary_json(&kept(name))),
            expected,
            "{name}"
        );
    }
}

/// Cut at every byte: the reader never panics; before the end of the header it is a clear
/// error naming the file; after it, an incomplete capture whose figures never exceed the whole.
#[test]
fn a_capture_cut_at_any_byte_reads_up_to_its_last_complete_record() {
    let work = Work::new("truncate");
    for name in ALL_KEPT {
        let full = std::fs::read(kept(name)).unwrap();
        let whole = figures(&Capture::open(kept(name)).unwrap());
        let path = work.path(name);
        let mut last_events = 0;
        for cut in 0..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            match Capture::open(&path) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(name), "{name} cut at {cut}: {msg}");
                }
                Ok(cap) => {
                    let s = cap.summary().unwrap();
                    // Cut right after the END record the first image wrote at exec: a capture
                    // that ended by exec (the new image may simply not have been traced).
                    let ended_by_exec = s.end_reason == Some("exec");
                    assert!(
                        !cap.complete() || ended_by_exec,
                        "{name} cut at {cut} claims to be complete"
                    );
                    assert!(
                        s.total_allocations <= whole.total_allocations,
                        "{name} @{cut}"
                    );
                    assert!(s.total_bytes <= whole.total_bytes, "{name} @{cut}");
                    assert!(s.total_frees <= whole.total_frees, "{name} @{cut}");
                    // More of the file never means fewer events.
                    assert!(s.events >= last_events, "{name} @{cut}");
                    last_events = s.events;
                }
            }
        }
    }
}

/// Flip bytes anywhere: opening and replaying may report damage, but never panics or hangs.
#[test]
fn damaged_bytes_never_panic_the_reader() {
    let work = Work::new("damage");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for name in ALL_KEPT {
        let full = std::fs::read(kept(name)).unwrap();
        let path = work.path(name);
        for round in 0..400 {
            let mut data = full.clone();
            let flips = 1 + (rnd() % 4) as usize;
            for _ in 0..flips {
                let at = (rnd() as usize) % data.len();
                data[at] = match rnd() % 3 {
                    0 => data[at] ^ (1 << (rnd() % 8)),
                    1 => 0xff,
                    _ => rnd() as u8,
                };
            }
            std::fs::write(&path, &data).unwrap();
            let result = std::panic::catch_unwind(|| {
                if let Ok(cap) = Capture::open(&path) {
                    let _ = cap.summary();
                }
            });
            assert!(result.is_ok(), "{name}, round {round}: the reader panicked");
        }
    }
}

/// The one-pass peak view (per-stack figures kept at each new peak) equals a second replay
/// stopped at the peak, on every kept capture and on a multi-threaded run.
#[test]
fn one_pass_peak_view_equals_a_replay_up_to_the_peak() {
    let work = Work::new("peak_view");
    let exe = work.compile("threads.c");
    let t = run_traced_ok(&work, "threads.cap", &exe, &["200"]);
    let mut paths: Vec<PathBuf> = ALL_KEPT.iter().map(|n| kept(n)).collect();
    paths.push(t.capture.clone());
    for path in paths {
        let cap = Capture::open(&path).unwrap();
        let view = cap.view(memtrack_reader::View::Peak);
        let memtrack_reader::Replayed { replay: whole, .. } = cap.replay();
        let memtrack_reader::Replayed {
            replay: at_peak, ..
        } = cap.replay_until(whole.peak_seq);
        let key = |v: &[memtrack_reader::SiteTotal]| -> Vec<(u32, u64, u64)> {
            v.iter()
                .map(|s| (s.stack, s.bytes, s.allocations))
                .collect()
        };
        assert_eq!(
            key(&view.sites),
            key(&at_peak.live_by_stack()),
            "{}",
            path.display()
        );
        assert_eq!(view.bytes, whole.peak_bytes, "{}", path.display());
        assert_eq!(
            view.allocations,
            whole.peak_allocations,
            "{}",
            path.display()
        );
    }
}

/// A kept capture of a Python program (format 3 with PYCODE records): its figures, and its
/// Python frames with their files and lines, read the same forever.
#[test]
fn a_kept_python_capture_keeps_its_python_frames() {
    use memtrack_reader::{GroupBy, Symbolizer, View};
    let cap = Capture::open(kept("v3-python.cap")).unwrap();
    assert_eq!(
        figures(&cap),
        Figures {
            peak_bytes: 1_073_542,
            peak_allocations: 8431,
            leaked_bytes: 5484,
            leaked_allocations: 20,
            total_allocations: 23_702,
            total_bytes: 2_619_130,
            total_frees: 19_791,
        }
    );
    assert!(!cap.pycode.is_empty());
    let mut sym = Symbolizer::new(&cap);
    let rows = cap.view(View::Allocated).table(&mut sym, GroupBy::Line);
    let hold: Vec<_> = rows.iter().filter(|r| r.function == "hold").collect();
    assert_eq!(hold.len(), 1, "{hold:?}");
    // bytearray(100000): the object (56 bytes) and its buffer (100001), on line 3.
    assert_eq!(
        (hold[0].line, hold[0].total_bytes, hold[0].count),
        (Some(3), 100_057, 2)
    );
    assert!(hold[0].file.as_deref().unwrap().ends_with("kept_python.py"));
}

fn compact(path: &std::path::Path) -> String {
    let out = memtrack_ok(|c| {
        c.arg("compact").arg(path);
    });
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `memtrack compact` on the kept fast captures: every figure the same, every chunk `EVENTS_R`;
/// a second compaction leaves the file as it is.
#[test]
fn compacting_a_fast_capture_keeps_every_figure() {
    let work = Work::new("compact");
    for (name, expected, threads) in kept_cases() {
        let name = name.replacen("v1", "v5", 1);
        let path = work.path(&name);
        std::fs::copy(kept(&name), &path).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let said = compact(&path);
        assert!(said.contains("chunks transcoded"), "{name}: {said}");
        let after = std::fs::metadata(&path).unwrap().len();
        assert_ne!(after, before, "{name}");
        let cap = Capture::open(&path).unwrap();
        assert!(
            cap.chunks
                .iter()
                .all(|c| c.compact == Some(ColumnEncoding::Rank)),
            "{name}"
        );
        assert!(cap.complete(), "{name}");
        assert_eq!(cap.threads, threads, "{name}");
        assert_eq!(figures(&cap), expected, "{name}");
        let said = compact(&path);
        assert!(said.contains("already compact"), "{name}: {said}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), after, "{name}");
    }
}

/// A fast capture cut short (the process killed) compacts to the figures of what it holds, up
/// to its last complete record.
#[test]
fn a_cut_fast_capture_compacts_to_what_it_holds() {
    let work = Work::new("compact_cut");
    let full = std::fs::read(kept("v5-threads.cap")).unwrap();
    let mut compacted_some = false;
    for cut in (full.len() / 3..full.len()).step_by(19) {
        let path = work.path("cut.cap");
        std::fs::write(&path, &full[..cut]).unwrap();
        let Ok(cap) = Capture::open(&path) else {
            continue;
        };
        let want = figures(&cap);
        let out = memtrack_ok(|c| {
            c.arg("compact").arg(&path);
        });
        let said = String::from_utf8_lossy(&out.stderr);
        let cap = Capture::open(&path).unwrap();
        assert_eq!(figures(&cap), want, "cut at {cut}: {said}");
        assert!(!cap.complete(), "cut at {cut}");
        compacted_some |= said.contains("chunks transcoded");
    }
    assert!(compacted_some);
}

/// `memtrack run --encoding fast` writes EVENTS_S chunks only, with the exact figures; `memtrack
/// compact` then makes every chunk `EVENTS_R`, the same figures, in a file under half the size.
#[test]
fn a_fast_run_records_the_same_figures_and_compacts() {
    let work = Work::new("fast_run");
    let exe = work.compile("flat_heap.c");
    let path = work.path("fast.cap");
    memtrack_ok(|c| {
        c.args(["run", "--encoding", "fast", "-o"])
            .arg(&path)
            .arg("--")
            .arg(&exe)
            .arg("200000")
            .current_dir(work.dir());
    });
    // flat_heap.c: 65,536 blocks of 1,024 bytes, 200,000 replacements, everything freed.
    let truth = Figures {
        peak_bytes: 67_108_864,
        peak_allocations: 65_536,
        leaked_bytes: 0,
        leaked_allocations: 0,
        total_allocations: 265_536,
        total_bytes: 265_536 * 1024,
        total_frees: 265_536,
    };
    let cap = Capture::open(&path).unwrap();
    assert!(cap.chunks.len() > 1);
    assert!(cap
        .chunks
        .iter()
        .all(|c| c.compact == Some(ColumnEncoding::ZstdStream)));
    assert_eq!(figures(&cap), truth);
    assert_eq!(summary_json(&path)["encoding"], "fast");
    let text = memtrack_ok(|c| {
        c.arg("summary").arg(&path);
    });
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "  encoding:       fast ({}): `memtrack compact {}` rewrites it",
            memtrack_reader::human_bytes(std::fs::metadata(&path).unwrap().len()),
            path.display()
        )),
        "{text}"
    );
    let before = std::fs::metadata(&path).unwrap().len();
    let said = compact(&path);
    assert!(said.contains("chunks transcoded"), "{said}");
    let after = std::fs::metadata(&path).unwrap().len();
    // Random frees of 65,536 blocks carry 16 bits each in any encoding: smaller, not by much.
    assert!(after < before, "{before} -> {after} bytes");
    let cap = Capture::open(&path).unwrap();
    assert!(cap
        .chunks
        .iter()
        .all(|c| c.compact == Some(ColumnEncoding::Rank)));
    assert_eq!(figures(&cap), truth);
    let json = summary_json(&path);
    assert_eq!(Figures::from_json(&json), truth, "through the command line");
    assert_eq!(json["encoding"], "compact");
}
