//! `memtrack export --format pprof --every DURATION -o DIR`: the files of the periodic export
//! (the profiles are the reader's, `Capture::periodic_profiles`). Owns the output directory,
//! the names, and the state file that lets a rerun pick up where the last run stopped.
//!
//! State: `DIR/.memtrack-every.json` holds one entry per capture (pid and start time, so a
//! new run of the same program is another capture), with its interval length and the next
//! interval to write. A profile file already there is never written again (a run cut off
//! before it saved its state leaves files the next run keeps). For an aggregated capture,
//! `DIR/.memtrack-every-PID-START.base` holds the checkpoint the next interval's allocations
//! count from (an encoded `CHECKPOINT` payload): the tracker may compact it out of the capture
//! before the next run.

use anyhow::{bail, Context, Result};
use memtrack_reader::report::Reporter;
use memtrack_reader::{Capture, Every, Until};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The state file's name in the output directory.
pub(crate) const STATE_FILE: &str = ".memtrack-every.json";

/// Exports `file`'s process (or `pid`'s, a child of the tree) every `every_ns` into `dir`.
pub(crate) fn export_every(
    r: &mut Reporter,
    file: &Path,
    pid: Option<u32>,
    every_ns: u64,
    dir: &Path,
) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{}: not a directory (--every writes one file per interval into the directory given with -o)",
            dir.display()
        );
    }
    // Taken before the capture is read: an interval that ended SETTLE_NS before this is
    // whole in the file the read will see.
    let now_mono = mono_ns();
    let (cap, stem) = open_process(file, pid)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let state_path = dir.join(STATE_FILE);
    let mut state = read_state(&state_path)?;
    let key = json!({"pid": cap.header.pid, "start_unix_ns": cap.header.start_unix_ns});
    let entries = state["captures"].as_array_mut().expect("an array");
    let at = entries
        .iter()
        .position(|e| e["pid"] == key["pid"] && e["start_unix_ns"] == key["start_unix_ns"]);
    let (first, done) = match at.map(|i| &entries[i]) {
        Some(e) => {
            let had = e["every_ns"].as_u64().unwrap_or(0);
            if had != every_ns {
                bail!(
                    "{}: holds profiles of this capture every {} (--every {}): use that, or another directory",
                    dir.display(),
                    duration_text(had),
                    duration_text(had)
                );
            }
            (
                e["next"].as_u64().unwrap_or(0),
                e["finished"].as_bool().unwrap_or(false),
            )
        }
        None => (0, false),
    };
    if pid.is_none() {
        let children = memtrack_reader::child_captures(file).len();
        if children > 0 {
            r.note(format_args!(
                "memtrack: note: {children} child process capture{} not exported: --every exports the launched process (--pid PID for another)\n",
                if children == 1 { "" } else { "s" }
            ));
        }
    }
    if done {
        r.note(format_args!(
            "memtrack: no new interval: the capture is finished and all its {first} profiles are in {}\n",
            dir.display()
        ));
        return Ok(());
    }
    let finished = !memtrack_reader::report::being_written(&cap);
    let until = if finished {
        Until::End
    } else {
        Until::Before(
            now_mono
                .saturating_sub(cap.header.start_mono_ns)
                .saturating_sub(memtrack_reader::SETTLE_NS),
        )
    };
    // An aggregated capture's base: what the next interval's allocations count from, kept
    // beside the state because the tracker may compact that checkpoint away from the capture.
    let base_path = dir.join(format!(
        ".memtrack-every-{}-{}.base",
        cap.header.pid, cap.header.start_unix_ns
    ));
    let base = if first > 0 && cap.aggregated() {
        match std::fs::read(&base_path) {
            Ok(b) => Some(memtrack_reader::Checkpoint::decode(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a checkpoint ({e}); remove it and {STATE_FILE} to start over",
                    base_path.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", base_path.display()))
            }
        }
    } else {
        None
    };
    let every = Every {
        every_ns,
        first,
        until,
        base,
    };
    let mut sym = r.symbolizer(&cap);
    let mut written: Vec<u64> = Vec::new();
    let mut kept = 0u64;
    let outcome = cap.periodic_profiles(every, &mut sym, |p| {
        let name = format!(
            "{stem}-{}.pb.gz",
            utc_stamp(p.time.start_unix_ns, every_ns < 1_000_000_000)
        );
        let path = dir.join(&name);
        if path.exists() {
            kept += 1;
            return Ok(());
        }
        // Complete or absent: whoever watches the directory never sees half a file.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &p.gz)?;
        std::fs::rename(&tmp, &path)?;
        written.push(p.index);
        r.note(format_args!(
            "memtrack: wrote {} ({}in use {}, allocated {})\n",
            path.display(),
            if p.estimated { "estimated: " } else { "" },
            memtrack_reader::human_bytes(p.inuse_bytes),
            memtrack_reader::human_bytes(p.alloc_bytes)
        ));
        Ok(())
    });
    let outcome = outcome.with_context(|| format!("cannot write into {}", dir.display()))?;
    r.warn(&sym.warnings);
    if outcome.no_checkpoint_yet {
        r.note(format_args!(
            "memtrack: note: {}: an aggregated capture with no checkpoint yet (one is written every --checkpoint-interval of memtrack run): no profile until there is one; run again later\n",
            file.display()
        ));
    }
    // A week's run may skip thousands: the first ones, then a count.
    const SHOWN: usize = 20;
    for s in outcome.skipped.iter().take(SHOWN) {
        r.note(format_args!("memtrack: note: {}\n", s.text()));
    }
    if outcome.skipped.len() > SHOWN {
        let more: u64 = outcome.skipped[SHOWN..]
            .iter()
            .map(|s| s.last - s.first + 1)
            .sum();
        r.note(format_args!(
            "memtrack: note: {more} more interval{} after interval {} have no profile, for the same reasons\n",
            if more == 1 { "" } else { "s" },
            outcome.skipped[SHOWN - 1].last
        ));
    }
    if outcome
        .skipped
        .iter()
        .any(|s| s.reason == memtrack_reader::SkipReason::NoCheckpoint)
    {
        r.note(format_args!(
            "memtrack: note: an aggregated capture has figures only at its checkpoints: an --every longer than run's --checkpoint-interval gives every interval one\n"
        ));
    }
    if let Some(b) = &outcome.base {
        let tmp = dir.join(format!(
            ".memtrack-every-{}-{}.base.tmp",
            cap.header.pid, cap.header.start_unix_ns
        ));
        std::fs::write(&tmp, b.encode())
            .and_then(|()| std::fs::rename(&tmp, &base_path))
            .with_context(|| format!("cannot write {}", base_path.display()))?;
    }
    let entry = json!({
        "pid": cap.header.pid,
        "start_unix_ns": cap.header.start_unix_ns,
        "capture": file.display().to_string(),
        "every_ns": every_ns,
        "next": outcome.next,
        "finished": outcome.finished,
    });
    let entries = state["captures"].as_array_mut().expect("an array");
    match at {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
    write_state(&state_path, &state)?;
    let kept_text = if kept > 0 {
        format!(" ({kept} already there kept)")
    } else {
        String::new()
    };
    let what = match (written.first(), written.last()) {
        (Some(a), Some(b)) if a == b => format!("1 profile (interval {a})"),
        (Some(a), Some(b)) => format!("{} profiles (intervals {a} to {b})", written.len()),
        _ => "no new profile".to_string(),
    };
    let unprofiled: u64 = outcome.skipped.iter().map(|s| s.last - s.first + 1).sum();
    let rest = if outcome.finished {
        format!(
            "the capture is finished: {} interval{} in all",
            outcome.next,
            if outcome.next == 1 { "" } else { "s" }
        )
    } else {
        format!(
            "the capture is still being written: run again for the intervals from {} on",
            outcome.next
        )
    };
    let rest = if unprofiled > 0 {
        format!(
            "{rest} ({unprofiled} interval{} of this run without a profile: see the notes above)",
            if unprofiled == 1 { "" } else { "s" }
        )
    } else {
        rest
    };
    r.note(format_args!(
        "memtrack: {what} every {} written to {}{kept_text}; {rest}\n",
        duration_text(every_ns),
        dir.display()
    ));
    Ok(())
}

/// The capture of the launched process, or of `pid` in its tree, and the files' name stem.
fn open_process(file: &Path, pid: Option<u32>) -> Result<(Capture, String)> {
    let root = Capture::open(file)?;
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "memtrack".into());
    match pid {
        Some(p) if p != root.header.pid => {
            let Some(child) = memtrack_reader::child_captures(file)
                .into_iter()
                .find(|c| c.pid == p)
            else {
                bail!(
                    "{}: no capture of a process with pid {p} beside it (child captures are {}.<pid>)",
                    file.display(),
                    file.display()
                );
            };
            let cap = Capture::open(&child.capture)?;
            Ok((cap, format!("{stem}-{p}")))
        }
        _ => Ok((root, stem)),
    }
}

fn read_state(path: &Path) -> Result<Value> {
    let fresh = json!({"version": 1, "captures": []});
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(fresh),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a state file of memtrack export --every (remove it to start over)",
            path.display()
        )
    })?;
    if !v["captures"].is_array() {
        bail!(
            "{}: not a state file of memtrack export --every (remove it to start over)",
            path.display()
        );
    }
    Ok(v)
}

fn write_state(path: &Path, state: &Value) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let text = serde_json::to_string_pretty(state)? + "\n";
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// CLOCK_MONOTONIC now, nanoseconds: the clock of the capture's times.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which lives on this stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `60s`, `500ms`, `1.5s`: an interval's length as it may be given back to --every.
fn duration_text(ns: u64) -> String {
    if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else {
        format!("{}s", ns as f64 / 1e9)
    }
}

/// `20261206T170800Z` (UTC), with milliseconds (`20261206T170800.250Z`) when `millis`.
pub(crate) fn utc_stamp(unix_ns: u64, millis: bool) -> String {
    let secs = unix_ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let base = format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}");
    if millis {
        format!("{base}.{:03}Z", unix_ns / 1_000_000 % 1000)
    } else {
        format!("{base}Z")
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::utc_stamp;

    #[test]
    fn stamps_in_utc() {
        // 2026-12-06 17:08:00 UTC.
        let t = 1_796_576_880u64 * 1_000_000_000;
        assert_eq!(utc_stamp(t, false), "20261206T170800Z");
        assert_eq!(utc_stamp(t + 250_000_000, true), "20261206T170800.250Z");
        assert_eq!(utc_stamp(0, false), "19700101T000000Z");
        // A leap day.
        assert_eq!(
            utc_stamp(951_782_400 * 1_000_000_000, false),
            "20000229T000000Z"
        );
    }
}
