//! What a report is about: the whole recorded process tree, or one process of it (`--pid`).

use crate::{Capture, Process, ProcessTree, Span, View, ViewSites, Window};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The process tree of a capture and, with `--pid`, the one process of it a report is about.
pub struct Subject {
    pub tree: ProcessTree,
    /// The one process a report is about (`--pid`, or a tree of one process).
    only: Option<usize>,
    /// `--region NAME`: views hold only the allocations made inside occurrences of the region
    /// (see [`Capture::region_view`]).
    pub region: Option<String>,
    /// `--at` or `--between`: views are of that window of time (see [`Capture::window_view`]).
    pub window: Option<Window>,
}

/// One process's share of a view.
pub struct Part<'a> {
    /// The process's root frame (`python3 app.py [pid 42]`) when the view spans processes.
    pub label: Option<String>,
    pub process: &'a Process,
    pub cap: &'a Capture,
    pub view: ViewSites,
}

impl Subject {
    pub fn open(file: &Path, pid: Option<u32>) -> Result<Subject> {
        let tree = ProcessTree::open(file)?;
        let only = match pid {
            // Short helpers kept only as figures are not in a view: with none other recorded,
            // the report is about the launched process alone.
            None => (tree.processes.iter().filter(|p| p.has_capture()).count() <= 1).then_some(0),
            Some(pid) => {
                let Some(i) = tree.find(pid) else {
                    let pids: Vec<String> = tree
                        .processes
                        .iter()
                        .take(20)
                        .map(|p| p.pid.to_string())
                        .collect();
                    bail!(
                        "{}: no process with pid {pid} was recorded (its processes: {})",
                        file.display(),
                        pids.join(", ")
                    );
                };
                if tree.processes[i].capture.is_none() {
                    bail!(
                        "{}: pid {pid} ({}) was a short helper process: only its figures were kept (memtrack run --keep-all keeps every capture)",
                        file.display(),
                        tree.processes[i].command()
                    );
                }
                Some(i)
            }
        };
        Ok(Subject {
            tree,
            only,
            region: None,
            window: None,
        })
    }

    /// An error saying why `what` cannot be reported from an aggregated capture (none for a
    /// capture of events).
    pub fn refuse_aggregated(&self, what: &str) -> Result<()> {
        let agg = self
            .tree
            .processes
            .iter()
            .filter_map(|p| p.capture.as_ref())
            .find(|c| c.aggregated());
        if let Some(cap) = agg {
            bail!(
                "{}: an aggregated capture (memtrack run --aggregate) keeps per-stack figures (at the peak, live at its last checkpoint, allocated), not events: {what}",
                cap.path().display()
            );
        }
        Ok(())
    }

    /// True when the subject is a process tree (no `--pid`) with an aggregated capture: the
    /// processes' checkpoints cannot be lined up in time, so their combined peak is unknown.
    pub fn aggregated_tree(&self) -> bool {
        self.one().is_none()
            && self
                .tree
                .processes
                .iter()
                .filter_map(|p| p.capture.as_ref())
                .any(|c| c.aggregated())
    }

    /// [`Subject::refuse_aggregated`] for what needs the combined peak of a tree: an error
    /// only for an [aggregated tree](Subject::aggregated_tree).
    pub fn refuse_aggregated_tree(&self, what: &str) -> Result<()> {
        if !self.aggregated_tree() {
            return Ok(());
        }
        self.refuse_aggregated(&format!(
            "{what} needs the processes' events lined up in time (--pid PID reports one process's own peak)"
        ))
    }

    /// The subject with its views restricted to the region `name` (`--region`); an error
    /// naming the capture and its regions when none of its processes has that region.
    pub fn with_region(mut self, name: Option<String>) -> Result<Subject> {
        if let Some(name) = &name {
            self.refuse_aggregated("regions need the region marks among the events")?;
            let has = |c: &Capture| c.check_region(name).is_ok();
            let found = match self.one() {
                Some(p) => p.capture.as_ref().is_some_and(has),
                None => self
                    .tree
                    .processes
                    .iter()
                    .any(|p| p.capture.as_ref().is_some_and(has)),
            };
            if !found {
                if let Err(e) = self.main_capture().check_region(name) {
                    bail!("{e}");
                }
            }
        }
        self.region = name;
        Ok(self)
    }

    /// The subject with its views restricted to `window` (`--at`, `--between`) for `view`
    /// (`None`: a report without views, such as `summary`), its times brought within the
    /// capture; returns a note when they were past its end. An error when the view means
    /// nothing in the window, or with `--region`.
    pub fn with_window(
        &mut self,
        window: Option<Window>,
        view: Option<View>,
    ) -> Result<Option<String>> {
        let Some(w) = window else {
            return Ok(None);
        };
        self.refuse_aggregated(
            "a time window (--at, --between) needs the state at a moment it did not record",
        )?;
        if let Some(why) = view.and_then(|v| w.refusal(v)) {
            bail!("{why}");
        }
        if self.region.is_some() {
            bail!("--region and a time window (--at, --between) do not combine: a region's views are already its own occurrences' (see memtrack regions)");
        }
        let (w, note) = w.clamped(self.end_seconds());
        self.window = Some(w);
        Ok(note)
    }

    /// Seconds from the launched process's start to the end of the last capture of the
    /// subject.
    pub fn end_seconds(&self) -> f64 {
        let end = |i: usize| {
            let p = &self.tree.processes[i];
            p.capture
                .as_ref()
                .map_or(0.0, |c| self.offset_ns(i) as f64 / 1e9 + c.end_seconds())
        };
        match self.only {
            Some(i) => end(i),
            None => (0..self.tree.processes.len()).map(end).fold(0.0, f64::max),
        }
    }

    /// How long after the launched process the `i`th process started.
    fn offset_ns(&self, i: usize) -> i128 {
        self.tree.processes[i].start_mono_ns as i128 - self.tree.root().start_mono_ns as i128
    }

    /// The window on the clock of the subject's main capture (`--pid`'s, else the root's).
    pub fn span(&self) -> Option<Span> {
        let w = self.window?;
        Some(w.span(self.offset_ns(self.only.unwrap_or(0))))
    }

    /// The process the report is about, when it is about one.
    pub fn one(&self) -> Option<&Process> {
        self.only.map(|i| &self.tree.processes[i])
    }

    /// The capture whose reading a progress bar follows.
    pub fn main_capture(&self) -> &Capture {
        let p = self.one().unwrap_or(self.tree.root());
        p.capture.as_ref().expect("a process with a capture")
    }

    /// True when the report shows one process of a recorded tree (names and titles say which).
    pub fn is_one_of_many(&self) -> bool {
        self.one().is_some_and(|p| {
            self.tree
                .processes
                .iter()
                .filter(|p| p.has_capture())
                .count()
                > 1
                || p.parent_pid != 0
        })
    }

    /// The view, one part per process that has anything in it; each labelled with its process
    /// when there are several.
    pub fn parts(&self, view: View, with_max: bool) -> Vec<Part<'_>> {
        let raw: Vec<(usize, ViewSites)> = match (self.only, &self.region) {
            (None, None) if view == View::Peak && self.window.is_some_and(|w| !w.is_at()) => {
                // A tree's peak in a window is its combined high-water mark there.
                let w = self.window.expect("a window");
                let root = self.tree.root().start_mono_ns;
                let mono = |t: f64| root.saturating_add((t.max(0.0) * 1e9).round() as u64);
                let (mut views, at) = self.tree.peak_views_in(mono(w.start), mono(w.end));
                for (_, v) in &mut views {
                    v.at_seconds = Some(self.tree.seconds(at));
                }
                views
            }
            (only, None) if self.window.is_some() => {
                let w = self.window.expect("a window");
                self.tree
                    .processes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| only.is_none_or(|o| o == *i))
                    .filter_map(|(i, p)| {
                        let v = p
                            .capture
                            .as_ref()?
                            .window_view(view, &w.span(self.offset_ns(i)));
                        Some((i, v))
                    })
                    .filter(|(_, v)| only.is_some() || v.bytes > 0 || v.allocations > 0)
                    .collect()
            }
            (Some(i), Some(name)) => {
                let cap = self.tree.processes[i]
                    .capture
                    .as_ref()
                    .expect("a process with a capture");
                vec![(i, cap.region_view(view, name))]
            }
            (None, Some(name)) => self
                .tree
                .processes
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((i, p.capture.as_ref()?.region_view(view, name))))
                .filter(|(_, v)| v.bytes > 0 || v.allocations > 0)
                .collect(),
            (Some(i), None) => {
                let cap = self.tree.processes[i]
                    .capture
                    .as_ref()
                    .expect("a process with a capture");
                let v = if with_max {
                    cap.view_with_max(view)
                } else {
                    cap.view(view)
                };
                vec![(i, v)]
            }
            (None, None) => self.tree.views(view, with_max),
        };
        let labelled = raw.len() > 1;
        raw.into_iter()
            .map(|(i, v)| {
                let process = &self.tree.processes[i];
                Part {
                    label: labelled.then(|| process.label()),
                    process,
                    cap: process.capture.as_ref().expect("a process with a capture"),
                    view: v,
                }
            })
            .collect()
    }

    /// The base of default output names: the capture's name without its extension, and the pid
    /// when the report is about one process of a tree (`gu-23938`), so that no report of one
    /// process overwrites another's.
    pub fn stem(&self, file: &Path) -> String {
        let root = match self.one() {
            // A child's capture is `<launched capture>.<pid>`: named after the launched one.
            Some(p) if p.parent_pid != 0 => {
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let suffix = format!(".{}", p.pid);
                PathBuf::from(name.strip_suffix(&suffix).unwrap_or(&name).to_string())
            }
            _ => PathBuf::from(file.file_name().unwrap_or_default()),
        };
        let stem = root
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "memtrack".into());
        match self.one() {
            Some(p) if self.is_one_of_many() => format!("{stem}-{}", p.pid),
            _ => stem,
        }
    }

    /// Who the report is about, for titles: `python3 app.py [pid 42]`, or the launched
    /// command and the number of processes.
    pub fn about(&self) -> String {
        match self.one() {
            Some(p) if self.is_one_of_many() => p.label(),
            Some(p) => crate::shell_command(&p.argv),
            None => {
                let more = self
                    .tree
                    .processes
                    .iter()
                    .filter(|p| p.has_capture())
                    .count()
                    - 1;
                format!(
                    "{} and {more} more process{}",
                    self.tree.root().label(),
                    if more == 1 { "" } else { "es" }
                )
            }
        }
    }
}

/// True when `cap` has no final `END` yet because its process is still writing it (not killed): the
/// tracker holds a shared `flock` on the capture while it has it open, and the process of the
/// header is alive and no younger than the capture (not a reused pid; not a forked child that
/// still holds the descriptor after the writer died).
pub fn being_written(cap: &Capture) -> bool {
    use std::os::fd::AsRawFd;
    // An exec's END is the last record until the new image writes its first: the process
    // goes on.
    if cap
        .end
        .is_some_and(|e| e.reason != memtrack_format::EndReason::Exec)
    {
        return false;
    }
    if !process_started_by(cap.header.pid, cap.header.start_unix_ns) {
        return false;
    }
    // The process lives: is a tracker holding the file? Asked a few times: between an exec
    // and the new image's first allocation nobody does.
    for attempt in 0..4 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let Ok(f) = std::fs::File::open(cap.path()) else {
            return false;
        };
        // SAFETY: flock on a descriptor this function owns; LOCK_NB: never blocks. A lock
        // taken is released when `f` closes, at the end of this iteration.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            // Held (a tracker has it open), or locks unsupported here.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK);
        }
    }
    false
}

/// Whether process `pid` is alive here and started no later than `unix_ns` (a second's leeway
/// for the clocks' granularity): a process that took over the pid later started after it.
fn process_started_by(pid: u32, unix_ns: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The fields after the command name (which may hold spaces and parentheses): the state,
    // then 18 more, then the start time in clock ticks since boot.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return false;
    }
    let Some(start_ticks) = fields.get(19).and_then(|t| t.parse::<u64>().ok()) else {
        return false;
    };
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let (Some(uptime), Ok(now)) = (uptime, now) else {
        return false;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let started = now.as_secs_f64() - uptime + start_ticks as f64 / hz;
    started <= unix_ns as f64 / 1e9 + 1.0
}
