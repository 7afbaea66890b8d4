//! `memtrack run`: launches the command with the preload library, waits for it, then tidies
//! its process tree's captures and checks budgets.

mod launch;
mod process_tree;
mod signals;

pub(crate) use launch::find_preload;

use crate::args::Limits;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Which processes of the tree `memtrack run` records, and what it keeps of them.
pub(crate) struct RunTree {
    /// `--encoding fast` (`MEMTRACK_ENCODING`).
    pub(crate) fast: bool,
    /// `--aggregate`: checkpoints every this many milliseconds instead of events.
    pub(crate) aggregate: Option<u64>,
    /// Every process the command starts records (the default; `--no-follow-fork` turns it off).
    pub(crate) follow_fork: bool,
    /// `--keep-all`: short helpers' captures are kept rather than folded into the root capture.
    pub(crate) keep_all: bool,
    /// `--live`: the live view on the terminal, the command's output to a file.
    pub(crate) live: Option<Live>,
    /// `--sample-rate`: mean bytes between sampled allocations (`MEMTRACK_SAMPLE_RATE`).
    pub(crate) sample_rate: Option<u64>,
    /// `--sample-seed` (`MEMTRACK_SAMPLE_SEED`).
    pub(crate) sample_seed: Option<u64>,
}

/// `memtrack run --live`.
pub(crate) struct Live {
    /// `--live-output`.
    pub(crate) output: Option<PathBuf>,
}

/// The file the command's standard output and error go to under `--live`.
struct LogFile {
    file: std::fs::File,
    path: PathBuf,
    /// The name to give it once the command's pid is known (the capture's name has `%p`).
    named_after: Option<PathBuf>,
}

impl LogFile {
    /// Creates `given`, or the capture's name `out` with `.out` for `.cap`.
    fn create(given: Option<&Path>, out: &Path, force: bool) -> Result<LogFile> {
        let (path, named_after) = match given {
            Some(p) => (
                std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))?,
                None,
            ),
            None => {
                let s = out.to_string_lossy();
                let s = s.strip_suffix(".cap").unwrap_or(&s);
                let name = PathBuf::from(format!("{s}.out"));
                if s.contains("%p") {
                    let now = s.replace("%p", &format!("live-{}", std::process::id()));
                    (PathBuf::from(format!("{now}.out")), Some(name))
                } else {
                    (name, None)
                }
            }
        };
        if path == out {
            bail!(
                "--live-output {} is the capture itself; give another file",
                path.display()
            );
        }
        if path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            bail!(
                "cannot write the command's output to {}: it is a directory",
                path.display()
            );
        }
        if path.symlink_metadata().is_ok() && !force {
            bail!(
                "{} already exists; pass --force to overwrite it, or --live-output to choose another file",
                path.display()
            );
        }
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(LogFile {
            file,
            path,
            named_after,
        })
    }

    /// Names the file after the command's pid, like its capture.
    fn settle(&mut self, pid: u32) {
        if let Some(t) = self.named_after.take() {
            let to = process_tree::root_capture(&t, pid);
            if std::fs::rename(&self.path, &to).is_ok() {
                self.path = to;
            }
        }
    }
}

pub(crate) fn cmd_run(
    r: &mut memtrack_reader::report::Reporter,
    output: Option<PathBuf>,
    force: bool,
    tree: RunTree,
    limits: Limits,
    command: Vec<OsString>,
) -> Result<u8> {
    let lib = launch::find_preload()?;
    let program = PathBuf::from(&command[0]);
    launch::check_trackable(&launch::resolve(&program)?)?;
    let out = match output {
        Some(o) => {
            let o = std::path::absolute(&o)
                .with_context(|| format!("bad output path {}", o.display()))?;
            // symlink_metadata: a link planted at the path counts as existing (and is never
            // followed: the tracker creates the capture with O_EXCL).
            if o.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                bail!(
                    "cannot write the capture to {}: it is a directory; give a file name, e.g. -o {}",
                    o.display(),
                    o.join("app.cap").display()
                );
            }
            if o.symlink_metadata().is_ok() {
                if !force {
                    bail!(
                        "{} already exists; pass --force to overwrite it",
                        o.display()
                    );
                }
                std::fs::remove_file(&o)
                    .with_context(|| format!("cannot remove {}", o.display()))?;
            }
            o
        }
        None => {
            let name = program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "cmd".into());
            std::env::current_dir()?.join(format!("memtrack-{name}.%p.cap"))
        }
    };
    if out.to_string_lossy().contains("%p") && output_is_template_conflict(&out) {
        bail!("the output name may not contain %p twice");
    }
    // Before the command runs: else it would run untracked, every process of it saying that
    // it cannot create its capture.
    check_capture_dir(&out)?;
    let mut preload = lib.as_os_str().to_os_string();
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    let mut log = match &tree.live {
        Some(l) => Some(LogFile::create(l.output.as_deref(), &out, force)?),
        None => None,
    };
    let mut cmd = std::process::Command::new(&command[0]);
    if let Some(log) = &log {
        // The terminal is the view's: the command gets no input from it.
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.file.try_clone()?)
            .stderr(log.file.try_clone()?);
    }
    cmd.args(&command[1..])
        .env("LD_PRELOAD", preload)
        .env("MEMTRACK_OUTPUT", &out)
        .env("MEMTRACK_LAUNCHER_PID", std::process::id().to_string());
    // Sampling: the command's own setting, or none (an inherited one would surprise).
    match tree.sample_rate {
        Some(rate) => cmd.env("MEMTRACK_SAMPLE_RATE", rate.to_string()),
        None => cmd.env_remove("MEMTRACK_SAMPLE_RATE"),
    };
    match tree.sample_seed {
        Some(seed) => cmd.env("MEMTRACK_SAMPLE_SEED", seed.to_string()),
        None => cmd.env_remove("MEMTRACK_SAMPLE_SEED"),
    };
    if tree.fast {
        cmd.env("MEMTRACK_ENCODING", "fast");
    } else {
        cmd.env_remove("MEMTRACK_ENCODING");
    }
    match tree.aggregate {
        Some(ms) => cmd
            .env("MEMTRACK_AGGREGATE", "1")
            .env("MEMTRACK_CHECKPOINT_INTERVAL", ms.to_string()),
        None => cmd
            .env_remove("MEMTRACK_AGGREGATE")
            .env_remove("MEMTRACK_CHECKPOINT_INTERVAL"),
    };
    let mut unrecorded = None;
    if tree.follow_fork {
        cmd.env("MEMTRACK_FOLLOW_FORK", "1")
            .env_remove("MEMTRACK_UNRECORDED_SOCKET");
    } else {
        cmd.env_remove("MEMTRACK_FOLLOW_FORK");
        // Exec'd descendants, which do not record, say so through this socket.
        unrecorded = process_tree::Unrecorded::listen();
        match &unrecorded {
            Some(u) => cmd.env("MEMTRACK_UNRECORDED_SOCKET", u.name()),
            None => cmd.env_remove("MEMTRACK_UNRECORDED_SOCKET"),
        };
    }
    // A Python program anywhere in a recorded tree (under `uv run`, `sh -c`, `make`) allocates
    // through malloc too; said only when the command itself is Python.
    let python = launch::runs_python(&program);
    if python || tree.follow_fork {
        // `import memtrack` (region marks) works without installing the package, also in
        // Python programs started through a launcher (`gunicorn` is a shell shim under pyenv).
        // After the user's own entries, so that theirs win; non-Python programs ignore it.
        if let Some(dir) = launch::find_python_package() {
            let path = match std::env::var_os("PYTHONPATH").filter(|v| !v.is_empty()) {
                Some(existing) => {
                    let mut p = existing;
                    p.push(":");
                    p.push(dir);
                    p
                }
                None => dir.into_os_string(),
            };
            cmd.env("PYTHONPATH", path);
        }
    }
    if std::env::var_os("PYTHONMALLOC").is_none() {
        if python {
            eprintln!("memtrack: setting PYTHONMALLOC=malloc so that Python objects are allocated through malloc");
        }
        if python || tree.follow_fork {
            cmd.env("PYTHONMALLOC", "malloc");
        }
    }
    // Ctrl-C reaches the whole foreground process group, the command included: memtrack waits
    // for it to shut down. SIGTERM and SIGHUP sent to memtrack alone are passed on.
    // SAFETY: setting dispositions to SIG_IGN; the previous ones are kept for the command.
    let (int_was, quit_was) = unsafe {
        (
            libc::signal(libc::SIGINT, libc::SIG_IGN),
            libc::signal(libc::SIGQUIT, libc::SIG_IGN),
        )
    };
    // An ignored signal stays ignored across exec: the command gets back the dispositions
    // memtrack was started with (else Ctrl-C would not stop it, and Python, seeing SIGINT
    // ignored, would never raise KeyboardInterrupt); SIGPIPE too (see above).
    let pipe_ignored = signals::SIGPIPE_IGNORED_AT_START.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: the closure runs in the forked child before exec and only calls signal(2), which
    // is async-signal-safe; the values are dispositions signal(2) returned.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::signal(libc::SIGINT, int_was);
            libc::signal(libc::SIGQUIT, quit_was);
            if pipe_ignored {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    // SAFETY: installing handlers that only call async-signal-safe kill.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            signals::forward_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGHUP,
            signals::forward_signal as *const () as libc::sighandler_t,
        );
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => bail!("cannot run {}: {e}", program.display()),
    };
    signals::CHILD.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    let status = match log.as_mut() {
        Some(log) => {
            log.settle(child.id());
            watch(r, &out, &mut child, &log.path)?
        }
        None => child.wait().context("waiting for the command")?,
    };
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        _ => 1,
    };
    let unrecorded = unrecorded.map(process_tree::Unrecorded::finish);
    let cap = process_tree::root_capture(&out, child.id());
    if tree.aggregate.is_some() {
        remove_compaction_leftovers(&cap);
    }
    if cap.is_file() {
        let shown = process_tree::shown(&cap);
        eprintln!("memtrack: capture written to {shown}");
        if tree.follow_fork {
            let folded = process_tree::fold_helpers(&cap, tree.keep_all);
            process_tree::report(&cap, &folded);
        }
        process_tree::report_unrecorded(&cap, &unrecorded.unwrap_or_default());
        eprintln!("memtrack: report on it with: memtrack summary {shown}   (or flamegraph, table, tree, stats, plot)");
        if tree.fast {
            let all = if tree.follow_fork { "*" } else { "" };
            eprintln!("memtrack: recorded in the fast encoding; once the service is idle, `memtrack compact {shown}{all}` rewrites it in the compact one (smaller, same figures)");
        }
        if let Some(log) = &log {
            eprintln!(
                "memtrack: the command's output is in {}",
                log.path.display()
            );
        }
        if limits.any() {
            // The command's own failure wins; else the budgets decide.
            // On stderr: the program's standard output stays its own.
            let checked = crate::check(
                r,
                &cap,
                None,
                limits,
                None,
                false,
                &mut std::io::stderr().lock(),
            )?;
            return Ok(if code != 0 { code } else { checked });
        }
    } else {
        eprintln!(
            "memtrack: no capture was written to {}: the program may be statically linked (LD_PRELOAD cannot reach it) or it may have cleared LD_PRELOAD",
            cap.display()
        );
        if limits.any() && code == 0 {
            bail!("the budgets cannot be checked without a capture");
        }
    }
    Ok(code)
}

/// `--live`: the live view of the command's capture until q, then waits for the command if it
/// still runs (q leaves the view, it does not stop the command).
fn watch(
    r: &memtrack_reader::report::Reporter,
    out: &Path,
    child: &mut std::process::Child,
    log: &Path,
) -> Result<std::process::ExitStatus> {
    let cap = process_tree::root_capture(out, child.id());
    let mut running = crate::live::Running {
        child,
        log,
        status: None,
    };
    let shown = crate::live::live(&r.options, &cap, Some(&mut running));
    let status = running.status;
    if let Err(e) = shown {
        eprintln!("memtrack: the live view stopped: {e:#}");
    }
    match status {
        Some(st) => Ok(st),
        None => {
            eprintln!(
                "memtrack: left the live view; the command runs on (pid {}), its output going to {}; waiting for it to end (Ctrl-C stops it)",
                child.id(),
                log.display()
            );
            child.wait().context("waiting for the command")
        }
    }
}

/// That the tracker will be able to create `out` (absolute, `%p` standing for a pid): a file
/// of that name is created and removed again (what the user may do there, a read-only or
/// special file system, a name too long: only trying tells).
/// Removes the copies a compaction of an aggregated capture (or of its children's) left
/// beside it when its process was killed meanwhile (`.NAME.compacting`, `.NAME.PID.compacting`).
fn remove_compaction_leftovers(cap: &Path) {
    let (Some(dir), Some(name)) = (cap.parent(), cap.file_name()) else {
        return;
    };
    let prefix = format!(".{}", name.to_string_lossy());
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(&prefix) && n.ends_with(".compacting") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn check_capture_dir(out: &Path) -> Result<()> {
    let dir = out.parent().unwrap_or(Path::new("/"));
    let cannot = |why: String| {
        anyhow::anyhow!(
            "cannot write the capture to {}: {why}; choose another -o",
            out.display()
        )
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(cannot(format!(
                "the directory {} does not exist",
                dir.display()
            )))
        }
        Err(e) => return Err(cannot(format!("{}: {e}", dir.display()))),
        Ok(m) if !m.is_dir() => {
            return Err(cannot(format!("{} is not a directory", dir.display())))
        }
        Ok(_) => {}
    }
    let probe = PathBuf::from(
        out.to_string_lossy()
            .replace("%p", &std::process::id().to_string()),
    );
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        // Another run's capture of that pid: not a problem of the directory.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(cannot(format!("cannot create a file there: {e}"))),
    }
}

fn output_is_template_conflict(out: &Path) -> bool {
    out.to_string_lossy().matches("%p").count() > 1
}
