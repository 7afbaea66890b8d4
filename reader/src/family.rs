//! Process trees: `memtrack run` records every process the command starts, each into a capture
//! of its own (`<capture>.<pid>` beside the launched process's, with its parent's pid in its
//! header); short helpers are kept only as figures (`DROPPED` records in the launched process's
//! capture). [`ProcessTree`] reads them as one: each process's figures, and the combined peak,
//! the high-water mark of the sum of all heaps over time, with what each process held then.

use crate::capture::{Capture, Event, ReadError};
use crate::replay::{Replay, Summary};
use crate::views::{View, ViewSites};
use memtrack_format::{DroppedProcess, Header};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A capture written by a process forked (directly or further down) from a capture's process.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChildCapture {
    pub capture: PathBuf,
    pub pid: u32,
    /// The process it was forked from.
    pub parent_pid: u32,
    pub command: String,
}

/// The children's captures beside `capture` (`<capture>.<pid>`, with a parent pid in their
/// header), in order of pid. Files that are not captures are skipped.
pub fn child_captures(capture: &Path) -> Vec<ChildCapture> {
    let (Some(dir), Some(name)) = (capture.parent(), capture.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<ChildCapture> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = file_name.strip_prefix(&prefix)?.parse().ok()?;
            let path = dir.join(&file_name);
            let header = read_header(&path)?;
            (header.parent_pid != 0 && header.pid == pid).then(|| ChildCapture {
                capture: if capture.parent() == Some(Path::new("")) {
                    PathBuf::from(&file_name)
                } else {
                    path
                },
                pid,
                parent_pid: header.parent_pid,
                command: if header.argv.is_empty() {
                    header.executable.clone()
                } else {
                    shell_command(&header.argv)
                },
            })
        })
        .collect();
    out.sort_by_key(|c| c.pid);
    out
}

fn read_header(path: &Path) -> Option<Header> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut head)
        .ok()?;
    Header::decode(&head).ok().map(|(h, _)| h)
}

/// `arg` as a POSIX shell would need it quoted.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A command line, each argument quoted as a shell would need it.
pub fn shell_command(argv: &[String]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One clock tick of a process's heap: the most that was live in it (and at which event), and
/// what was live after its last event.
#[derive(Clone, Copy, Debug, Default)]
struct Tick {
    /// CLOCK_MONOTONIC, nanoseconds.
    mono_ns: u64,
    max_live: u64,
    max_seq: u64,
    end_live: u64,
    end_seq: u64,
}

/// Collects a process's heap tick by tick into `ticks` (`start`: its start, `unit`: its clock
/// unit in ns). A time earlier than the last tick's (a thread stamped the tick before) counts in
/// the last tick, so each tick ends a prefix of the sequence order.
fn tick_recorder(start: u64, unit: u64, ticks: &mut Vec<Tick>) -> impl FnMut(&Replay, &Event) + '_ {
    move |r: &Replay, ev: &Event| {
        let mono_ns = start.saturating_add(ev.time.saturating_mul(unit));
        let live = r.live_bytes;
        match ticks.last_mut() {
            Some(t) if t.mono_ns >= mono_ns => {
                if live > t.max_live {
                    t.max_live = live;
                    t.max_seq = ev.seq;
                }
                t.end_live = live;
                t.end_seq = ev.seq;
            }
            _ => ticks.push(Tick {
                mono_ns,
                max_live: live,
                max_seq: ev.seq,
                end_live: live,
                end_seq: ev.seq,
            }),
        }
    }
}

/// One process of a recorded tree.
pub struct Process {
    pub pid: u32,
    /// The process it was forked from; 0 for the launched process.
    pub parent_pid: u32,
    /// The program it ran last (after any exec).
    pub executable: String,
    pub argv: Vec<String>,
    /// Its capture, or `None` for a short helper kept only as figures.
    pub capture: Option<Capture>,
    /// Its figures (for a helper kept as figures: those of its `DROPPED` entry, the others 0).
    pub summary: Summary,
    /// CLOCK_MONOTONIC at its start and at its end (its last record), nanoseconds.
    pub start_mono_ns: u64,
    pub end_mono_ns: u64,
    /// Bytes it held at the tree's combined peak.
    pub held_at_combined_peak: u64,
    /// The last of its events that the combined peak includes.
    combined_seq: Option<u64>,
    ticks: Vec<Tick>,
}

impl Process {
    /// `python3.11 app.py [pid 4242]`: the program's name, its arguments (shortened), the pid.
    pub fn label(&self) -> String {
        format!("{} [pid {}]", self.name(), self.pid)
    }

    /// [`Process::label`] without the pid: what matches the same process of another run.
    pub fn name(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        if let Some(first) = self.argv.first() {
            words.push(
                Path::new(first)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| first.clone()),
            );
            // Paths shortened to their file names: a label is for telling processes apart.
            words.extend(self.argv[1..].iter().map(|a| {
                let short = match (a.starts_with('/'), Path::new(a).file_name()) {
                    (true, Some(n)) => n.to_string_lossy().into_owned(),
                    _ => a.clone(),
                };
                shell_quote(&short)
            }));
        } else {
            words.push(
                Path::new(&self.executable)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "?".into()),
            );
        }
        let mut cmd = words.join(" ");
        if cmd.chars().count() > 60 {
            cmd = cmd.chars().take(57).collect::<String>() + "...";
        }
        cmd
    }

    /// The command line, quoted as a shell would need it.
    pub fn command(&self) -> String {
        if self.argv.is_empty() {
            shell_quote(&self.executable)
        } else {
            shell_command(&self.argv)
        }
    }

    /// True when the process's own capture was kept (not only its figures).
    pub fn has_capture(&self) -> bool {
        self.capture.is_some()
    }
}

/// What `summary --json` says of each process.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProcessFigures {
    pub pid: u32,
    pub parent_pid: Option<u32>,
    pub argv: Vec<String>,
    pub executable: String,
    /// Its command line, quoted as a shell would need it.
    pub command: String,
    /// Its capture file, or null for a short helper kept only as figures.
    pub capture: Option<String>,
    pub complete: bool,
    pub peak_bytes: u64,
    pub peak_allocations: u64,
    /// Seconds since the launched process started.
    pub peak_time_seconds: f64,
    pub leaked_bytes: u64,
    pub leaked_allocations: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub total_frees: u64,
    pub start_seconds: f64,
    pub end_seconds: f64,
    /// What it held at the tree's combined peak.
    pub bytes_at_combined_peak: u64,
}

/// The launched process and every process it started that was recorded.
pub struct ProcessTree {
    /// The launched process first, then the others, largest peak first; helpers kept only as
    /// figures last.
    pub processes: Vec<Process>,
    /// The high-water mark of the sum of all processes' heaps, and when (CLOCK_MONOTONIC).
    pub combined_peak_bytes: u64,
    pub combined_peak_mono_ns: u64,
    /// False for a single process opened without replaying it: its `summary` and the combined
    /// figures are not filled in (reports on one process replay what they need).
    pub analyzed: bool,
    /// False when a process of the tree was recorded aggregated (no events to line the
    /// processes up in time): `combined_peak_bytes` is then the sum of each process's own
    /// peak, an upper bound, and each process's share its own peak.
    pub combined_known: bool,
}

impl ProcessTree {
    /// Opens the capture at `path` and, when it is a launched process's, the captures of the
    /// processes it started; replays each once.
    pub fn open(path: &Path) -> Result<ProcessTree, ReadError> {
        let root = Capture::open(path)?;
        let mut caps = vec![root];
        if caps[0].header.parent_pid == 0 {
            for c in child_captures(path) {
                match Capture::open(&c.capture) {
                    Ok(cap) => caps.push(cap),
                    // A child capture that cannot be read (a file cut before its header): the
                    // rest of the tree still reads.
                    Err(ReadError::TruncatedHeader { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let dropped = caps[0].dropped.clone();
        Ok(Self::from_captures(caps, dropped))
    }

    fn from_captures(caps: Vec<Capture>, dropped: Vec<DroppedProcess>) -> Self {
        let many = caps.len() > 1;
        if !many && dropped.is_empty() {
            // One process: nothing to combine, and each report replays what it needs itself.
            let cap = caps.into_iter().next().expect("one capture");
            let image = cap.last_image();
            let start_mono_ns = cap.header.start_mono_ns;
            return ProcessTree {
                processes: vec![Process {
                    pid: cap.header.pid,
                    parent_pid: cap.header.parent_pid,
                    executable: image.executable.clone(),
                    argv: image.argv.clone(),
                    summary: Summary::default(),
                    start_mono_ns,
                    end_mono_ns: start_mono_ns,
                    held_at_combined_peak: 0,
                    combined_seq: Some(u64::MAX),
                    ticks: Vec::new(),
                    capture: Some(cap),
                }],
                combined_peak_bytes: 0,
                combined_peak_mono_ns: 0,
                analyzed: false,
                combined_known: true,
            };
        }
        let mut processes: Vec<Process> = caps
            .into_iter()
            .map(|cap| Self::replayed(cap, many))
            .collect();
        processes[1..].sort_by(|a, b| {
            b.summary
                .peak_bytes
                .cmp(&a.summary.peak_bytes)
                .then(a.pid.cmp(&b.pid))
        });
        for d in dropped {
            processes.push(Process {
                pid: d.pid,
                parent_pid: d.parent_pid,
                executable: d.executable.clone(),
                argv: d.argv.clone(),
                capture: None,
                summary: Summary {
                    pid: d.pid,
                    executable: d.executable,
                    argv: d.argv,
                    exec_chain: Vec::new(),
                    peak_bytes: d.peak_bytes,
                    peak_allocations: 0,
                    peak_time_seconds: 0.0,
                    leaked_bytes: d.leaked_bytes,
                    leaked_allocations: 0,
                    leaks_measured_at: "exit",
                    leaked_at_exit_bytes: d.leaked_bytes,
                    leaked_at_exit_allocations: 0,
                    python_shutdown_seconds: None,
                    total_allocations: d.total_allocations,
                    total_bytes: d.total_bytes,
                    total_frees: 0,
                    threads: 0,
                    duration_seconds: d.end_mono_ns.saturating_sub(d.start_mono_ns) as f64 / 1e9,
                    complete: true,
                    end_reason: Some("exit"),
                    events: 0,
                    unmatched_frees: 0,
                    overlapping_allocations: 0,
                    corrupt_chunks: 0,
                    peak_rss_bytes: None,
                    peak_rss_time_seconds: None,
                    heap_at_peak_rss_bytes: None,
                    peak_mapped_bytes: 0,
                    peak_mapped_time_seconds: 0.0,
                    mapped_at_exit_bytes: 0,
                    ..Summary::default()
                },
                start_mono_ns: d.start_mono_ns,
                end_mono_ns: d.end_mono_ns,
                held_at_combined_peak: 0,
                combined_seq: None,
                ticks: Vec::new(),
            });
        }
        let mut tree = ProcessTree {
            processes,
            combined_peak_bytes: 0,
            combined_peak_mono_ns: 0,
            analyzed: true,
            combined_known: true,
        };
        tree.combine();
        tree
    }

    /// Replays one capture: its summary and, in a tree, its heap tick by tick.
    fn replayed(cap: Capture, ticks_wanted: bool) -> Process {
        let start = cap.header.start_mono_ns;
        let unit = cap.header.clock_unit_ns.max(1);
        let mut ticks: Vec<Tick> = Vec::new();
        let mut record = tick_recorder(start, unit, &mut ticks);
        let replayed = cap.replay_with(Replay::new(), u64::MAX, |r: &Replay, ev: &Event| {
            if ticks_wanted {
                record(r, ev);
            }
        });
        drop(record);
        let summary = cap.summarize(&replayed);
        let end_mono_ns = start.saturating_add((summary.duration_seconds * 1e9) as u64);
        if ticks_wanted && cap.complete() {
            // The process has exited: from then on it holds nothing.
            let end = ticks
                .last()
                .map_or(end_mono_ns, |t| t.mono_ns.max(end_mono_ns));
            ticks.push(Tick {
                mono_ns: end,
                max_live: 0,
                max_seq: 0,
                end_live: 0,
                end_seq: 0,
            });
        }
        let image = cap.last_image();
        Process {
            pid: cap.header.pid,
            parent_pid: cap.header.parent_pid,
            executable: image.executable.clone(),
            argv: image.argv.clone(),
            summary,
            start_mono_ns: start,
            end_mono_ns,
            held_at_combined_peak: 0,
            combined_seq: None,
            ticks,
            capture: Some(cap),
        }
    }

    /// The combined peak: events of all processes merged by time (the clock tick), those of
    /// one tick in process order, which is one order the clocks allow.
    fn combine(&mut self) {
        let aggregated = |p: &Process| p.capture.as_ref().is_some_and(|c| c.aggregated());
        if self.processes.len() > 1 && self.processes.iter().any(aggregated) {
            self.combined_known = false;
            self.combined_peak_bytes = self.processes.iter().map(|p| p.summary.peak_bytes).sum();
            let root = &self.processes[0];
            self.combined_peak_mono_ns = root
                .start_mono_ns
                .saturating_add((root.summary.peak_time_seconds * 1e9) as u64);
            for p in &mut self.processes {
                p.held_at_combined_peak = p.summary.peak_bytes;
                p.combined_seq = Some(u64::MAX);
                p.ticks = Vec::new();
            }
            return;
        }
        if self.processes.len() == 1 || self.processes[1..].iter().all(|p| p.ticks.is_empty()) {
            let p = &mut self.processes[0];
            self.combined_peak_bytes = p.summary.peak_bytes;
            self.combined_peak_mono_ns = p
                .start_mono_ns
                .saturating_add((p.summary.peak_time_seconds * 1e9) as u64);
            p.held_at_combined_peak = p.summary.peak_bytes;
            // The view at the combined peak is the process's own peak view.
            p.combined_seq = Some(u64::MAX);
            p.ticks = Vec::new();
            return;
        }
        let mut order: Vec<(u64, usize, usize)> = Vec::new();
        for (i, p) in self.processes.iter().enumerate() {
            order.extend(p.ticks.iter().enumerate().map(|(k, t)| (t.mono_ns, i, k)));
        }
        order.sort_unstable();
        let n = self.processes.len();
        let mut held = vec![0u64; n];
        let mut sum = 0u64;
        let mut best: Option<(u64, usize)> = None;
        for (at, &(_, i, k)) in order.iter().enumerate() {
            let t = self.processes[i].ticks[k];
            let here = sum - held[i] + t.max_live;
            match best {
                Some((b, _)) if here <= b => {}
                _ => best = Some((here, at)),
            }
            sum = sum - held[i] + t.end_live;
            held[i] = t.end_live;
        }
        let Some((bytes, at)) = best else { return };
        // Again up to the peak's tick, to know each process's state there.
        let mut seq: Vec<Option<u64>> = vec![None; n];
        held.iter_mut().for_each(|h| *h = 0);
        for &(_, i, k) in &order[..at] {
            let t = self.processes[i].ticks[k];
            held[i] = t.end_live;
            seq[i] = (t.end_live > 0).then_some(t.end_seq);
        }
        let (mono, i, k) = order[at];
        let t = self.processes[i].ticks[k];
        held[i] = t.max_live;
        seq[i] = (t.max_live > 0).then_some(t.max_seq);
        self.combined_peak_bytes = bytes;
        self.combined_peak_mono_ns = mono;
        for (p, (h, s)) in self.processes.iter_mut().zip(held.into_iter().zip(seq)) {
            p.held_at_combined_peak = h;
            p.combined_seq = s;
            p.ticks = Vec::new();
        }
    }

    /// Fills in the figures of a single process opened without replaying it (the caller
    /// replayed it): its summary is the tree's, its peak the combined peak.
    pub fn set_summary(&mut self, s: Summary) {
        let p = &mut self.processes[0];
        p.end_mono_ns = p
            .start_mono_ns
            .saturating_add((s.duration_seconds * 1e9) as u64);
        self.combined_peak_bytes = s.peak_bytes;
        self.combined_peak_mono_ns = p
            .start_mono_ns
            .saturating_add((s.peak_time_seconds * 1e9) as u64);
        p.held_at_combined_peak = s.peak_bytes;
        p.summary = s;
        self.analyzed = true;
    }

    /// The launched process.
    pub fn root(&self) -> &Process {
        &self.processes[0]
    }

    /// True when more than the launched process was recorded.
    pub fn is_tree(&self) -> bool {
        self.processes.len() > 1
    }

    /// Seconds since the launched process started.
    pub fn seconds(&self, mono_ns: u64) -> f64 {
        mono_ns.saturating_sub(self.root().start_mono_ns) as f64 / 1e9
    }

    /// The process with this pid.
    pub fn find(&self, pid: u32) -> Option<usize> {
        self.processes.iter().position(|p| p.pid == pid)
    }

    /// Sums over every process: leaked bytes and allocations, allocations, bytes allocated.
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        self.processes.iter().fold((0, 0, 0, 0), |a, p| {
            (
                a.0 + p.summary.leaked_bytes,
                a.1 + p.summary.leaked_allocations,
                a.2 + p.summary.total_allocations,
                a.3 + p.summary.total_bytes,
            )
        })
    }

    /// Each process's figures, for `summary --json`.
    pub fn figures(&self) -> Vec<ProcessFigures> {
        let rel = |ns: u64| self.seconds(ns);
        self.processes
            .iter()
            .map(|p| {
                let s = &p.summary;
                ProcessFigures {
                    pid: p.pid,
                    parent_pid: (p.parent_pid != 0).then_some(p.parent_pid),
                    argv: p.argv.clone(),
                    executable: p.executable.clone(),
                    command: p.command(),
                    capture: p.capture.as_ref().map(|c| c.path().display().to_string()),
                    complete: s.complete,
                    peak_bytes: s.peak_bytes,
                    peak_allocations: s.peak_allocations,
                    peak_time_seconds: if p.capture.is_some() {
                        rel(p.start_mono_ns) + s.peak_time_seconds
                    } else {
                        rel(p.start_mono_ns)
                    },
                    leaked_bytes: s.leaked_bytes,
                    leaked_allocations: s.leaked_allocations,
                    total_allocations: s.total_allocations,
                    total_bytes: s.total_bytes,
                    total_frees: s.total_frees,
                    start_seconds: rel(p.start_mono_ns),
                    end_seconds: rel(p.end_mono_ns),
                    bytes_at_combined_peak: p.held_at_combined_peak,
                }
            })
            .collect()
    }

    /// The combined high-water mark of the tree within `[from, to]` (monotonic ns), starting
    /// from what every process held at `from`: what each process held then, as views (empty
    /// ones left out), and when it was (monotonic ns). Every capture is replayed again, tick by
    /// tick, and then up to its state at the mark.
    pub fn peak_views_in(&self, from: u64, to: u64) -> (Vec<(usize, ViewSites)>, u64) {
        let mut ticks: Vec<Vec<Tick>> = Vec::new();
        for p in &self.processes {
            let mut t = Vec::new();
            if let Some(cap) = &p.capture {
                let unit = cap.header.clock_unit_ns.max(1);
                let mut record = tick_recorder(p.start_mono_ns, unit, &mut t);
                cap.replay_with(Replay::new(), u64::MAX, |r, ev| record(r, ev));
                drop(record);
                if cap.complete() {
                    // The process has exited: from then on it holds nothing.
                    let end = p
                        .start_mono_ns
                        .saturating_add((cap.end_seconds() * 1e9) as u64);
                    let end = t.last().map_or(end, |l: &Tick| l.mono_ns.max(end));
                    t.push(Tick {
                        mono_ns: end,
                        ..Tick::default()
                    });
                }
            }
            ticks.push(t);
        }
        let mut order: Vec<(u64, usize, usize)> = Vec::new();
        for (i, t) in ticks.iter().enumerate() {
            order.extend(t.iter().enumerate().map(|(k, t)| (t.mono_ns, i, k)));
        }
        order.sort_unstable();
        let n = self.processes.len();
        let mut held = vec![0u64; n];
        let mut sum = 0u64;
        let first = order.partition_point(|&(mono, _, _)| mono < from);
        for &(_, i, k) in &order[..first] {
            let t = ticks[i][k];
            sum = sum - held[i] + t.end_live;
            held[i] = t.end_live;
        }
        // `None`: the state at the window's start.
        let (mut best, mut best_at, mut best_mono) = (sum, None, from);
        for (at, &(mono, i, k)) in order.iter().enumerate().skip(first) {
            if mono > to {
                break;
            }
            let t = ticks[i][k];
            let here = sum - held[i] + t.max_live;
            if here > best {
                (best, best_at, best_mono) = (here, Some(at), mono);
            }
            sum = sum - held[i] + t.end_live;
            held[i] = t.end_live;
        }
        let mut seq: Vec<Option<u64>> = vec![None; n];
        for &(_, i, k) in &order[..best_at.unwrap_or(first)] {
            let t = ticks[i][k];
            seq[i] = (t.end_live > 0).then_some(t.end_seq);
        }
        if let Some(at) = best_at {
            let (_, i, k) = order[at];
            let t = ticks[i][k];
            seq[i] = (t.max_live > 0).then_some(t.max_seq);
        }
        let views = self
            .processes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let cap = p.capture.as_ref()?;
                let s = seq[i]?;
                let crate::Replayed {
                    replay: r, stacks, ..
                } = cap.replay_until(s);
                let v = ViewSites::new(View::Peak, r.live_by_stack(), stacks);
                (v.bytes > 0).then_some((i, v))
            })
            .collect();
        (views, best_mono)
    }

    /// One view of every process that has a capture, `(index into processes, its sites)`,
    /// empty ones left out. The peak view of a tree is what each process held at the combined
    /// peak; of a single process, its own peak. `with_max`: per-site largest allocations too.
    pub fn views(&self, view: View, with_max: bool) -> Vec<(usize, ViewSites)> {
        let mut out = Vec::new();
        for (i, p) in self.processes.iter().enumerate() {
            let Some(cap) = &p.capture else { continue };
            let v = match (view, p.combined_seq) {
                (View::Peak, None) => continue,
                (View::Peak, Some(u64::MAX)) if with_max => cap.view_with_max(view),
                (View::Peak, Some(u64::MAX)) => cap.view(view),
                (View::Peak, Some(seq)) => {
                    let crate::Replayed {
                        replay: r, stacks, ..
                    } = cap.replay_until(seq);
                    ViewSites::new(view, r.live_by_stack(), stacks)
                }
                _ if with_max => cap.view_with_max(view),
                _ => cap.view(view),
            };
            if v.bytes > 0 || v.allocations > 0 {
                out.push((i, v));
            }
        }
        out
    }
}
