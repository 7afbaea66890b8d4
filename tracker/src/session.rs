//! Session set-up: whether this process records, and into which capture. Reads the
//! environment, creates the capture (or continues the one an earlier image of this process
//! finished with `exec`), gives a child forked under `--follow-fork` a capture of its own, and
//! ends the capture at exit, exec and abort.
//!
//! Used by the preload hooks and by the Rust allocator wrapper alike; must never be on the
//! per-event path (everything here runs once per process image, or per exec, fork or exit).

use crate::capture_file;
use crate::env::{getenv, stderr_bytes};
use crate::guard::{IgnoreAllocs, SaveErrno};
use crate::lifecycle::{self, State};
use crate::recorder::{self, Config};
use memtrack_format::{EndReason, Header, FORMAT_VERSION};
use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

static CONSTRUCTED: AtomicBool = AtomicBool::new(false);

/// Decides, once, whether this process records. Called lazily from the first hook (the program
/// may allocate before any constructor has run) and from the library constructor.
#[cold]
pub(crate) fn init() -> bool {
    if !lifecycle::begin_init() {
        return lifecycle::is_recording();
    }
    let Some(g) = IgnoreAllocs::enter() else {
        lifecycle::end_init(State::Uninit);
        return false;
    };
    let _errno = SaveErrno::new();
    crate::real::resolve();
    let next = match open_from_env(true) {
        Some(true) => State::Active,
        Some(false) => State::Disabled,
        // The environment is not readable yet (very early in start-up): decide later.
        None if !CONSTRUCTED.load(Ordering::Acquire) => State::Uninit,
        None => State::Disabled,
    };
    lifecycle::end_init(next);
    drop(g);
    next == State::Active
}

/// Some(true): recording; Some(false): not wanted here; None: environment not readable yet.
/// `preloaded`: the tracker runs as the preload library (else linked into a Rust program).
pub(crate) fn open_from_env(preloaded: bool) -> Option<bool> {
    let out = getenv(c"MEMTRACK_OUTPUT")?;
    if !preloaded
        && getenv(c"LD_PRELOAD").is_some_and(|p| {
            p.to_bytes()
                .split(|&c| c == b':' || c == b' ')
                .any(|lib| lib.ends_with(b"libmemtrack.so"))
        })
    {
        // `memtrack run` launched this Rust program: the preload library records every
        // allocation (ours reach it through the system allocator), so this copy stands down.
        return Some(false);
    }
    let follow_fork = getenv(c"MEMTRACK_FOLLOW_FORK").is_some_and(|v| v.to_bytes() == b"1");
    crate::sampling::configure_from_env();
    crate::aggregate::configure_from_env();
    // SAFETY: getpid/getppid have no preconditions.
    let (pid, ppid) = unsafe { (libc::getpid(), libc::getppid()) };
    let mut root = out.to_string_lossy().replace("%p", &pid.to_string());
    let mut path = root.clone();
    let mut parent_pid = 0;
    if let Some(launcher) = getenv(c"MEMTRACK_LAUNCHER_PID") {
        if launcher.to_str().ok().and_then(|s| s.parse::<i32>().ok()) == Some(ppid) {
            if follow_fork {
                // Descendants find the launched process's capture here (`%p` expanded); the
                // process is single-threaded this early (first allocation or constructor).
                if let Ok(v) = std::ffi::CString::new(root.as_str()) {
                    // SAFETY: setenv with valid NUL-terminated strings.
                    unsafe { libc::setenv(c"MEMTRACK_OUTPUT".as_ptr(), v.as_ptr(), 1) };
                }
            }
        } else if follow_fork {
            // A descendant started through exec or posix_spawn: a capture of its own.
            root = out.to_string_lossy().into_owned();
            path = format!("{root}.{pid}");
            parent_pid = ppid as u32;
        } else {
            // Only the process `memtrack run` started records; its exec'd descendants run
            // untracked, and say so to it.
            tell_unrecorded(pid);
            return Some(false);
        }
    }
    let launch = Launch {
        preloaded,
        root_path: root,
        follow_fork,
        parent_pid,
    };
    match create_capture(&path, &launch, None) {
        Ok(started) => Some(started),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Either this process's previous image, which ended with exec: continue its
            // capture; or another process's capture (or, for a Rust program run by `memtrack
            // run`, the preload library's): leave it alone and run untracked.
            Some(continue_after_exec(
                &path,
                new_header(pid, parent_pid),
                &launch,
            ))
        }
        Err(e) => {
            stderr_bytes(format!("memtrack: cannot create capture {path}: {e}\n").as_bytes());
            Some(false)
        }
    }
}

/// `memtrack run --no-follow-fork`: tells it, through one datagram to the abstract unix socket
/// named in `MEMTRACK_UNRECORDED_SOCKET`, that this program ran unrecorded (`<pid>\0<exe>`), so
/// that its end-of-run message can say which programs were missed. Never blocks and never
/// fails the program: a datagram that cannot go (nobody listening, queue full, no sockets
/// allowed) is dropped; errno is kept and the socket is closed before this returns.
fn tell_unrecorded(pid: i32) {
    let Some(name) = getenv(c"MEMTRACK_UNRECORDED_SOCKET").map(CStr::to_bytes) else {
        return;
    };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // The abstract namespace: sun_path[0] stays 0, the name follows.
    if name.is_empty() || name.len() >= addr.sun_path.len() {
        return;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path[1..].iter_mut().zip(name) {
        *d = b as c_char;
    }
    let addr_len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len();
    let _errno = SaveErrno::new();
    let mut msg = pid.to_string().into_bytes();
    msg.push(0);
    if let Ok(exe) = std::fs::read_link("/proc/self/exe") {
        msg.extend_from_slice(exe.as_os_str().as_encoded_bytes());
    }
    msg.truncate(4096);
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: msg and addr are valid for the lengths given; MSG_DONTWAIT: never blocks,
    // MSG_NOSIGNAL: never raises SIGPIPE.
    unsafe {
        libc::sendto(
            fd,
            msg.as_ptr() as *const c_void,
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            addr_len as libc::socklen_t,
        );
        libc::close(fd);
    }
}

/// How this process's recording came about.
pub(crate) struct Launch {
    /// The tracker runs as the preload library (else linked into a Rust program).
    pub preloaded: bool,
    /// The launched process's capture (children of `--follow-fork` are named after it).
    pub root_path: String,
    pub follow_fork: bool,
    /// The process this one was forked from, when it records into a capture of its own.
    pub parent_pid: u32,
}

impl Launch {
    fn config(&self, fd: i32, first_seq: u64, first_stack_id: u32) -> Config {
        Config {
            fd,
            skip_own_module: self.preloaded,
            first_seq,
            first_stack_id,
            root_path: self.root_path.clone(),
            follow_fork: self.follow_fork,
            modules: None,
            replace: false,
            new_session: false,
        }
    }
}

/// The header of a capture of this process.
pub(crate) fn new_header(pid: i32, parent_pid: u32) -> Header {
    Header {
        parent_pid,
        version: FORMAT_VERSION,
        pid: pid as u32,
        start_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        clock_unit_ns: crate::clock::CLOCK_UNIT_NS,
        start_mono_ns: crate::clock::now_mono_ns(),
        executable: std::fs::read_link("/proc/self/exe")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        argv: std::fs::read("/proc/self/cmdline")
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        pointer_size: 8,
        machine: 62,
    }
}

/// Creates a new capture at `path` (never an existing file) and starts recording into it.
/// `Ok(false)`: created, but recording could not start. `modules`: a forked child's, known.
pub(crate) fn create_capture(
    path: &str,
    launch: &Launch,
    modules: Option<Vec<crate::stack::unwind::LoadedModule>>,
) -> std::io::Result<bool> {
    let fd = capture_file::create(path)?;
    // SAFETY: getpid has no preconditions.
    let header = new_header(unsafe { libc::getpid() }, launch.parent_pid);
    if !capture_file::write_all(fd, &header.encode()) {
        return Ok(false);
    }
    if !write_sampling(fd) {
        return Ok(false);
    }
    let mut cfg = launch.config(fd, 1, 1);
    cfg.replace = modules.is_some();
    cfg.modules = modules;
    Ok(recorder::start(cfg, header.start_mono_ns))
}

/// The `SAMPLING` record, right after the header (or an exec'd image's `IMAGE` record), when
/// this image samples.
pub(crate) fn write_sampling(fd: i32) -> bool {
    crate::sampling::record().is_none_or(|r| capture_file::write_all(fd, &r))
}

/// Appends this image to the capture its previous image (same pid) finished with `END(exec)`.
fn continue_after_exec(path: &str, mut header: Header, launch: &Launch) -> bool {
    use memtrack_format::{put_record, record, EndRecord, END_RECORD_LEN};
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    // The header only: its fixed part says how long the body is.
    let mut head = vec![0u8; memtrack_format::FIXED_HEADER_LEN];
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    let body = u32::from_le_bytes([head[10], head[11], head[12], head[13]]) as usize;
    head.resize(head.len() + body.min(1 << 20), 0);
    if f.read_exact(&mut head[memtrack_format::FIXED_HEADER_LEN..])
        .is_err()
    {
        return false;
    }
    let Ok((old, _)) = Header::decode(&head) else {
        return false;
    };
    if old.pid != header.pid {
        return false;
    }
    let mut tail = [0u8; END_RECORD_LEN];
    if f.seek(SeekFrom::End(-(END_RECORD_LEN as i64))).is_err() || f.read_exact(&mut tail).is_err()
    {
        return false;
    }
    let Some(end) = EndRecord::from_tail(&tail).filter(|e| e.reason == EndReason::Exec) else {
        return false;
    };
    let Some(fd) = capture_file::reopen(path) else {
        return false;
    };
    // Times stay relative to the capture's start, on the same monotonic clock.
    header.start_mono_ns = old.start_mono_ns;
    let mut image = Vec::new();
    put_record(&mut image, record::IMAGE, &header.encode());
    if !capture_file::write_all(fd, &image) || !write_sampling(fd) {
        return false;
    }
    // The header of the capture stays the first image's (its parent_pid included).
    header.parent_pid = old.parent_pid;
    let cfg = launch.config(fd, end.seq, end.next_stack_id);
    recorder::start(cfg, old.start_mono_ns)
}

pub(crate) extern "C" fn atfork_child() {
    // The child has one thread and copies of locks other threads may have held. Without
    // `--follow-fork` it stops recording and never touches the parent's capture; with it, it
    // records into a capture of its own through a fresh recorder.
    let old = recorder::recorder().filter(|r| r.follow_fork);
    let (Some(old), State::Active) = (old, lifecycle::current()) else {
        lifecycle::disable();
        // A recording started late belongs to the parent: the child has no writer to stop.
        if crate::inproc::loaded_late() {
            crate::inproc::set_status(crate::inproc::STATUS_NONE);
        }
        return;
    };
    lifecycle::begin_child_init();
    let Some(g) = IgnoreAllocs::enter() else {
        lifecycle::end_init(State::Disabled);
        return;
    };
    let _errno = SaveErrno::new();
    recorder::leave_parent(&g);
    crate::sampling::reset_after_fork();
    // SAFETY: getpid/getppid have no preconditions.
    let (pid, ppid) = unsafe { (libc::getpid(), libc::getppid()) };
    let launch = Launch {
        preloaded: old.preloaded(),
        root_path: old.root_path.clone(),
        follow_fork: true,
        parent_pid: ppid as u32,
    };
    let path = format!("{}.{pid}", old.root_path);
    let started = match create_capture(&path, &launch, Some(old.modules_snapshot())) {
        Ok(s) => s,
        Err(e) => {
            stderr_bytes(format!("memtrack: cannot create capture {path}: {e}\n").as_bytes());
            false
        }
    };
    lifecycle::end_init(if started {
        State::Active
    } else {
        State::Disabled
    });
}

/// The library constructor: decide about recording if no hook has yet, start the writer.
pub(crate) fn constructor() {
    CONSTRUCTED.store(true, Ordering::Release);
    if lifecycle::current() == State::Uninit && !crate::inproc::detect_preloaded() {
        // Loaded into a running process (attach, `memtrack.Tracker`): nothing reaches the
        // hooks until `memtrack_start` redirects the program's relocation slots to them, and
        // the real functions are those the program was bound to.
        crate::real::resolve_default();
        if lifecycle::begin_init() {
            lifecycle::end_init(State::Disabled);
        }
        return;
    }
    crate::real::resolve();
    if lifecycle::current() == State::Uninit {
        init();
    }
    if lifecycle::is_recording() {
        crate::inproc::set_status(crate::inproc::STATUS_PRELOADED);
        recorder::start_writer();
        // SAFETY: registers a handler that only stores to an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(atfork_child)) };
    }
}

/// True in the process that records, false in a vfork child sharing its memory.
pub(crate) fn is_owner() -> bool {
    // SAFETY: getpid has no preconditions.
    recorder::recorder().is_some_and(|r| r.pid == unsafe { libc::getpid() })
}

/// Ends the capture before an `exec` replaces the image (the next image continues it).
pub(crate) fn before_exec() {
    if is_owner() {
        recorder::finish(EndReason::Exec);
    }
}

/// After an `exec` that failed: recording goes on in the same capture.
pub(crate) fn after_failed_exec() {
    lifecycle::resume();
}

/// Ends the capture because the process ends now (`_exit`, `abort`), if this process owns it.
pub(crate) fn end_now(reason: EndReason) {
    if is_owner() {
        recorder::finish(reason);
    }
}

/// A capture was created for a Rust program that has the tracker as its allocator: the writer
/// thread, fork and exit handling.
pub(crate) fn began_in_program() {
    recorder::start_writer();
    extern "C" fn at_exit() {
        recorder::finish(EndReason::Exit);
    }
    // SAFETY: registers handlers that never unwind.
    unsafe {
        libc::pthread_atfork(None, None, Some(atfork_child));
        libc::atexit(at_exit);
    }
}

/// A new capture at `path` for a Rust program that asked for one (`memtrack_tracker::start`).
pub(crate) fn create_program_capture(path: &str) -> std::io::Result<bool> {
    crate::sampling::configure_from_env();
    crate::aggregate::configure_from_env();
    let launch = Launch {
        preloaded: false,
        root_path: path.to_owned(),
        follow_fork: false,
        parent_pid: 0,
    };
    create_capture(path, &launch, None)
}
