//! The process tree of `memtrack run`, after the command has exited: short helper processes
//! folded into the launched process's capture (their captures removed, their figures kept in a
//! `DROPPED` record), and, with `--no-follow-fork`, the programs that ran unrecorded.

use memtrack_format::{put_record, record, DroppedProcess, DroppedRecord};
use memtrack_reader::{child_captures, Capture, ChildCapture};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A child capture is a helper's, and dropped, when its process ended cleanly with a peak
/// under this...
pub const HELPER_PEAK_BYTES: u64 = 1 << 20;
/// ...after running for less than this.
pub const HELPER_SECONDS: f64 = 2.0;
/// Captures larger than this are never read to decide (a helper's is a few KiB).
const HELPER_FILE_BYTES: u64 = 4 << 20;

/// What became of the children's captures.
#[derive(Default)]
pub struct Folded {
    /// Child captures left in place, in order of pid.
    pub kept: Vec<ChildCapture>,
    /// Processes whose captures were removed, their figures now in the root capture.
    pub dropped: Vec<DroppedProcess>,
    /// Why nothing was folded although helpers might have been, when that is worth saying.
    pub note: Option<String>,
}

/// Folds the captures of short helper processes beside `root` into it: a child capture that
/// ended cleanly, peaked under [`HELPER_PEAK_BYTES`] and ran under [`HELPER_SECONDS`] becomes
/// one entry of a `DROPPED` record appended to `root`, and its file is removed. Nothing is
/// changed unless `root` is complete and intact, and the append is undone unless `root` reads
/// back complete with every entry.
pub fn fold_helpers(root: &Path, keep_all: bool) -> Folded {
    let children = child_captures(root);
    let mut out = Folded::default();
    if keep_all || children.is_empty() {
        out.kept = children;
        return out;
    }
    let root_dropped = Capture::open(root)
        .ok()
        .filter(|c| c.complete() && c.warnings.is_empty())
        .map(|c| c.dropped.len());
    let Some(root_dropped) = root_dropped else {
        out.note = Some(format!(
            "{} did not end cleanly, so the captures of its {} child processes are all kept",
            shown(root),
            children.len()
        ));
        out.kept = children;
        return out;
    };
    let mut helpers = Vec::new();
    for c in children {
        match helper_figures(&c) {
            Some(d) => helpers.push((c, d)),
            None => out.kept.push(c),
        }
    }
    if helpers.is_empty() {
        return out;
    }
    let rec = DroppedRecord {
        processes: helpers.iter().map(|(_, d)| d.clone()).collect(),
    };
    if let Err(e) = append_dropped(root, &rec, root_dropped) {
        out.note = Some(format!(
            "could not note the short helper processes in {} ({e}), so their captures are kept",
            shown(root)
        ));
        out.kept.extend(helpers.into_iter().map(|(c, _)| c));
        out.kept.sort_by_key(|c| c.pid);
        return out;
    }
    for (c, d) in helpers {
        if let Err(e) = std::fs::remove_file(&c.capture) {
            eprintln!(
                "memtrack: cannot remove {} (its figures are in {} too): {e}",
                c.capture.display(),
                shown(root)
            );
        }
        out.dropped.push(d);
    }
    out
}

/// The figures of a helper's capture, or None when the capture is to be kept.
fn helper_figures(c: &ChildCapture) -> Option<DroppedProcess> {
    // A process still alive (one that outlived the command) may yet write more, even after an
    // END: an exec's END is followed by the next image's records.
    if alive(c.pid) {
        return None;
    }
    let meta = std::fs::symlink_metadata(&c.capture).ok()?;
    if !meta.is_file() || meta.len() > HELPER_FILE_BYTES {
        return None;
    }
    let cap = Capture::open(&c.capture).ok()?;
    if !cap.complete() || !cap.warnings.is_empty() {
        return None;
    }
    let s = cap.summary().ok()?;
    if s.corrupt_chunks != 0
        || s.peak_bytes >= HELPER_PEAK_BYTES
        || s.duration_seconds.is_nan()
        || s.duration_seconds >= HELPER_SECONDS
    {
        return None;
    }
    let image = cap.last_image();
    let start = cap.header.start_mono_ns;
    Some(DroppedProcess {
        pid: cap.header.pid,
        parent_pid: cap.header.parent_pid,
        start_mono_ns: start,
        end_mono_ns: start + (s.duration_seconds * 1e9).round() as u64,
        executable: image.executable.clone(),
        argv: image.argv.clone(),
        peak_bytes: s.peak_bytes,
        leaked_bytes: s.leaked_bytes,
        total_allocations: s.total_allocations,
        total_bytes: s.total_bytes,
    })
}

/// True when process `pid` exists (or might: pid 0, or no permission to signal it).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    // A zombie has ended (where no init reaps orphans, as in some containers, it stays).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}

/// Appends `rec` to `root` after its `END`, syncs it, and reads the capture back: it must still
/// be complete and hold the new entries; else the file is cut back to its old length.
/// `before`: the processes its DROPPED records held already.
fn append_dropped(root: &Path, rec: &DroppedRecord, before: usize) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    put_record(&mut bytes, record::DROPPED, &rec.encode());
    let mut f = std::fs::OpenOptions::new().append(true).open(root)?;
    let len = f.metadata()?.len();
    let written = f.write_all(&bytes).and_then(|()| f.sync_all());
    let read_back = written.and_then(|()| {
        let cap = Capture::open(root).map_err(std::io::Error::other)?;
        if cap.complete()
            && cap.warnings.is_empty()
            && cap.dropped.len() == before + rec.processes.len()
        {
            Ok(())
        } else {
            Err(std::io::Error::other("it did not read back whole"))
        }
    });
    if read_back.is_err() {
        let _ = f.set_len(len).and_then(|()| f.sync_all());
    }
    read_back
}

/// `path` relative to the current directory when inside it.
pub fn shown(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    path.strip_prefix(&cwd)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The program a dropped process ran last, by name.
fn program_name(d: &DroppedProcess) -> String {
    let exe = if d.executable.is_empty() {
        d.argv.first().map(String::as_str).unwrap_or("?")
    } else {
        d.executable.as_str()
    };
    Path::new(exe)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| exe.to_string())
}

/// `bash ×34, sed ×2`: the most frequent names first (at most `max`, then `N others`).
pub fn counted<'a>(names: impl IntoIterator<Item = &'a str>, max: usize) -> String {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for n in names {
        *counts.entry(n).or_default() += 1;
    }
    let mut v: Vec<(&str, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut parts: Vec<String> = v
        .iter()
        .take(max)
        .map(|(n, c)| format!("{} ×{c}", printable(n)))
        .collect();
    if v.len() > max {
        let rest: usize = v[max..].iter().map(|(_, c)| c).sum();
        parts.push(format!("{rest} other{}", if rest == 1 { "" } else { "s" }));
    }
    parts.join(", ")
}

/// Control characters (from a file name or a datagram) shown escaped, never sent to a terminal.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The end-of-run lines about the tree (after "capture written to ...").
pub fn report(root: &Path, folded: &Folded) {
    let root_shown = shown(root);
    if !folded.kept.is_empty() {
        let n = folded.kept.len();
        eprintln!(
            "memtrack: {} ({root_shown}.<pid>):",
            if n == 1 {
                "1 child process recorded into a capture of its own".to_string()
            } else {
                format!("{n} child processes recorded, each into a capture of its own")
            }
        );
        const LISTED: usize = 8;
        for c in folded.kept.iter().take(LISTED) {
            // What it ran last (a shim's child exec'd into the interpreter), as a shell would
            // need it quoted.
            let command = Capture::open(&c.capture)
                .ok()
                .map(|cap| {
                    let image = cap.last_image();
                    if image.argv.is_empty() {
                        shell_quote(std::slice::from_ref(&image.executable))
                    } else {
                        shell_quote(&image.argv)
                    }
                })
                .unwrap_or_else(|| c.command.clone());
            eprintln!(
                "memtrack:   {}  {}",
                shown(&c.capture),
                printable(&shorten(&command, 100))
            );
        }
        if n > LISTED {
            eprintln!(
                "memtrack:   and {} more (memtrack summary {root_shown} lists them all)",
                n - LISTED
            );
        }
    }
    if let Some(note) = &folded.note {
        eprintln!("memtrack: {note}");
    }
    if !folded.dropped.is_empty() {
        let n = folded.dropped.len();
        let names: Vec<String> = folded.dropped.iter().map(program_name).collect();
        eprintln!(
            "memtrack: {n} short helper process{} ({}) kept only as figures in {root_shown}; --keep-all keeps their captures",
            if n == 1 { "" } else { "es" },
            counted(names.iter().map(String::as_str), 5)
        );
    }
}

/// A command line as a POSIX shell would need it: words with anything but safe characters in
/// single quotes.
pub fn shell_quote(argv: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(safe) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

/// With `--no-follow-fork`: an abstract unix datagram socket that exec'd descendants of the
/// command, which do not record, write their pid and executable to (see the tracker's
/// `tell_unrecorded`). A thread drains it while the command runs (the kernel queues only a few
/// datagrams); only datagrams from this user are counted. Nothing is inherited: the socket is
/// close-on-exec and only its name is passed on, in `MEMTRACK_UNRECORDED_SOCKET`.
pub struct Unrecorded {
    name: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u32, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Unrecorded {
    /// None when no socket could be set up (the run goes on without the message).
    pub fn listen() -> Option<Unrecorded> {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return None;
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut bound = None;
        for _ in 0..4 {
            let name = format!("memtrack-run-{}-{:016x}", std::process::id(), random());
            if bind_abstract(&fd, &name) {
                bound = Some(name);
                break;
            }
        }
        let name = bound?;
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: setsockopt with pointers to values of the sizes given.
        let ok = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
                && libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &timeout as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                ) == 0
        };
        if !ok {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::Builder::new()
                .name("unrecorded".into())
                .spawn(move || loop {
                    let stopping = stop.load(Ordering::Acquire);
                    // Once stopping: what is queued, without waiting.
                    while let Some(m) = receive(&fd, stopping) {
                        if let Some(m) = m {
                            seen.lock().unwrap_or_else(|e| e.into_inner()).push(m);
                        }
                    }
                    if stopping {
                        return;
                    }
                })
                .ok()?
        };
        Some(Unrecorded {
            name,
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// The value of `MEMTRACK_UNRECORDED_SOCKET`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// After the command has exited: the (pid, executable) of every unrecorded program.
    pub fn finish(mut self) -> Vec<(u32, String)> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The end-of-run line about programs that ran unrecorded, if any did.
pub fn report_unrecorded(root: &Path, seen: &[(u32, String)]) {
    if seen.is_empty() {
        return;
    }
    let pids: std::collections::HashSet<u32> = seen.iter().map(|(p, _)| *p).collect();
    let n = pids.len();
    eprintln!(
        "memtrack: {n} process{} started by the command ran programs that were not recorded: {}",
        if n == 1 { "" } else { "es" },
        counted(seen.iter().map(|(_, e)| e.as_str()), 5),
    );
    eprintln!(
        "memtrack: run without --no-follow-fork to record each into {}.<pid>",
        shown(root)
    );
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a buffer of the length given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ (std::process::id() as u64) << 32
    }
}

fn bind_abstract(fd: &OwnedFd, name: &str) -> bool {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() + 1 >= addr.sun_path.len() {
        return false;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path[1..].iter_mut().zip(name.as_bytes()) {
        *d = b as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len();
    // SAFETY: bind with an address valid for the length given.
    unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        ) == 0
    }
}

/// One datagram: `Some(Some(..))` a message from this user, `Some(None)` one to ignore, `None`
/// nothing (more) to read now. `now`: do not wait for one.
fn receive(fd: &OwnedFd, now: bool) -> Option<Option<(u32, String)>> {
    let mut buf = [0u8; 4200];
    let mut cmsg = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    let flags = libc::MSG_CMSG_CLOEXEC | if now { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg points at buffers valid for the lengths it gives.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return (e.kind() == std::io::ErrorKind::Interrupted).then_some(None);
    }
    // The sender's credentials, which the kernel adds (SO_PASSCRED).
    let mut cred = None;
    // SAFETY: walking the control messages recvmsg filled in, with libc's macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                cred = Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(c) as *const libc::ucred
                ));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let Some(cred) = cred.filter(|c| c.uid == me) else {
        return Some(None);
    };
    let data = &buf[..n as usize];
    let exe = data
        .iter()
        .position(|&b| b == 0)
        .map(|i| String::from_utf8_lossy(&data[i + 1..]).into_owned())
        .unwrap_or_default();
    Some(Some((cred.pid as u32, exe)))
}

/// For a capture path template: the root capture of the launched process `pid`.
pub fn root_capture(out: &Path, pid: u32) -> PathBuf {
    PathBuf::from(out.to_string_lossy().replace("%p", &pid.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_name_the_most_frequent_first() {
        let names = ["sed", "bash", "bash", "bash", "sed", "cut"];
        assert_eq!(counted(names, 5), "bash ×3, sed ×2, cut ×1");
        assert_eq!(counted(names, 1), "bash ×3, 3 others");
        assert_eq!(counted(names, 2), "bash ×3, sed ×2, 1 other");
        let argv = ["python3", "-c", "x=[0]*10", "it's"].map(String::from);
        assert_eq!(shell_quote(&argv), r"python3 -c 'x=[0]*10' 'it'\''s'");
        assert_eq!(counted(["a\x1b[2J"], 5), "a\\u{1b}[2J ×1");
    }

    #[test]
    fn a_datagram_reaches_the_listener_with_the_senders_pid() {
        let u = Unrecorded::listen().expect("a socket");
        // SAFETY: socket(2) with constant arguments; closed below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0);
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, &b) in addr.sun_path[1..].iter_mut().zip(u.name().as_bytes()) {
            *d = b as libc::c_char;
        }
        let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + u.name().len();
        let msg = b"1\0/usr/bin/true";
        // SAFETY: msg and addr are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd,
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                libc::MSG_DONTWAIT,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len as libc::socklen_t,
            )
        };
        assert_eq!(sent, msg.len() as isize);
        // SAFETY: the fd made above, no longer used.
        unsafe { libc::close(fd) };
        let seen = u.finish();
        assert_eq!(
            seen,
            vec![(std::process::id(), "/usr/bin/true".to_string())]
        );
    }
}
