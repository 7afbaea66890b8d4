//! Bodies of the `LD_PRELOAD` hooks. `memtrack-preload` exports the C symbols and calls these.
//!
//! The real functions come from `dlsym(RTLD_NEXT, ..)`, so a program that links another
//! allocator keeps it. `dlsym` itself may call `calloc` before it returns: such calls, and any
//! made while the table is being filled, are served from a static bootstrap pool whose blocks
//! are never handed to the real `free`.

use crate::guard::{IgnoreAllocs, SaveErrno};
use crate::recorder::{self, Config, Ev, Origin, ACTIVE, DISABLED, INITIALIZING, STATE, UNINIT};
pub use crate::unwind::Caller;
use memtrack_format::{AllocKind, EndReason, Header, FORMAT_VERSION};
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

// ---------------------------------------------------------------- real functions

const MALLOC: usize = 0;
const FREE: usize = 1;
const CALLOC: usize = 2;
const REALLOC: usize = 3;
const REALLOCARRAY: usize = 4;
const POSIX_MEMALIGN: usize = 5;
const ALIGNED_ALLOC: usize = 6;
const MEMALIGN: usize = 7;
const VALLOC: usize = 8;
const PVALLOC: usize = 9;
const USABLE_SIZE: usize = 10;
const DLCLOSE: usize = 11;
const EXECVE: usize = 12;
const EXECV: usize = 13;
const EXECVP: usize = 14;
const EXECVPE: usize = 15;
const FEXECVE: usize = 16;
const EXIT_: usize = 17;
const EXIT_UPPER: usize = 18;
const ABORT: usize = 19;
const NREAL: usize = 20;

const NAMES: [&CStr; NREAL] = [
    c"malloc",
    c"free",
    c"calloc",
    c"realloc",
    c"reallocarray",
    c"posix_memalign",
    c"aligned_alloc",
    c"memalign",
    c"valloc",
    c"pvalloc",
    c"malloc_usable_size",
    c"dlclose",
    c"execve",
    c"execv",
    c"execvp",
    c"execvpe",
    c"fexecve",
    c"_exit",
    c"_Exit",
    c"abort",
];

#[allow(clippy::declare_interior_mutable_const)]
const NONE: AtomicUsize = AtomicUsize::new(0);
static REAL: [AtomicUsize; NREAL] = [NONE; NREAL];
static RESOLVE: AtomicU8 = AtomicU8::new(0);

#[cold]
fn resolve() {
    if RESOLVE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    for (i, name) in NAMES.iter().enumerate() {
        // SAFETY: dlsym with a valid NUL-terminated name.
        let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        REAL[i].store(f as usize, Ordering::Release);
    }
    RESOLVE.store(2, Ordering::Release);
}

#[inline(always)]
fn real(i: usize) -> usize {
    let f = REAL[i].load(Ordering::Acquire);
    if f != 0 {
        return f;
    }
    resolve();
    REAL[i].load(Ordering::Acquire)
}

macro_rules! real_fn {
    ($i:expr, $t:ty) => {{
        let f = real($i);
        // SAFETY: REAL[$i] holds the address dlsym returned for NAMES[$i], whose C signature
        // is $t; zero (not resolved yet) is checked by every caller before the call.
        (f != 0).then(|| unsafe { std::mem::transmute::<usize, $t>(f) })
    }};
}

type Malloc = unsafe extern "C" fn(usize) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void);
type Calloc = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type Realloc = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type ReallocArray = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type PosixMemalign = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
type Memalign = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type UsableSize = unsafe extern "C" fn(*mut c_void) -> usize;
type Dlclose = unsafe extern "C" fn(*mut c_void) -> c_int;
type Execve =
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
type Execv = unsafe extern "C" fn(*const c_char, *const *const c_char) -> c_int;
type Fexecve = unsafe extern "C" fn(c_int, *const *const c_char, *const *const c_char) -> c_int;
type Exit = unsafe extern "C" fn(c_int) -> !;

// ---------------------------------------------------------------- bootstrap pool

const POOL_SIZE: usize = 1 << 20;
#[repr(C, align(64))]
struct Pool(std::cell::UnsafeCell<[u8; POOL_SIZE]>);
// SAFETY: disjoint ranges are handed out by an atomic bump pointer.
unsafe impl Sync for Pool {}
static POOL: Pool = Pool(std::cell::UnsafeCell::new([0; POOL_SIZE]));
static POOL_NEXT: AtomicUsize = AtomicUsize::new(0);
const POOL_HDR: usize = 16;

fn pool_base() -> usize {
    POOL.0.get() as usize
}

fn in_pool(p: *mut c_void) -> bool {
    let a = p as usize;
    a >= pool_base() && a < pool_base() + POOL_SIZE
}

#[cold]
fn pool_alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.max(16);
    let mut cur = POOL_NEXT.load(Ordering::Relaxed);
    loop {
        let start = (pool_base() + cur + POOL_HDR).next_multiple_of(align);
        let end = match start.checked_add(size) {
            Some(e) if e <= pool_base() + POOL_SIZE => e,
            _ => return std::ptr::null_mut(),
        };
        match POOL_NEXT.compare_exchange(
            cur,
            end - pool_base(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                // SAFETY: [start - 8, end) lies inside the pool range just reserved.
                unsafe { *((start - 8) as *mut usize) = size };
                return start as *mut c_void;
            }
            Err(now) => cur = now,
        }
    }
}

fn pool_size(p: *mut c_void) -> usize {
    // SAFETY: every pool pointer has its size stored in the 8 bytes before it.
    unsafe { *((p as usize - 8) as *const usize) }
}

// ---------------------------------------------------------------- initialisation

static CONSTRUCTED: AtomicBool = AtomicBool::new(false);

/// Decides, once, whether this process records. Called lazily from the first hook (the program
/// may allocate before any constructor has run) and from the library constructor.
#[cold]
fn init() -> bool {
    if STATE
        .compare_exchange(UNINIT, INITIALIZING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return STATE.load(Ordering::Acquire) == ACTIVE;
    }
    let Some(g) = IgnoreAllocs::enter() else {
        STATE.store(UNINIT, Ordering::Release);
        return false;
    };
    let _errno = SaveErrno::new();
    resolve();
    let next = match open_from_env(true) {
        Some(true) => ACTIVE,
        Some(false) => DISABLED,
        // The environment is not readable yet (very early in start-up): decide later.
        None if !CONSTRUCTED.load(Ordering::Acquire) => UNINIT,
        None => DISABLED,
    };
    STATE.store(next, Ordering::Release);
    drop(g);
    next == ACTIVE
}

pub(crate) fn getenv(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: getenv with a NUL-terminated name; the result lives as long as the environment.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: non-null results of getenv are NUL-terminated strings.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

fn stderr_line(msg: &str) {
    // SAFETY: plain write of a byte slice to fd 2.
    unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
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
            stderr_line(&format!("memtrack: cannot create capture {path}: {e}\n"));
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
        }
    }
}

/// The header of a capture of this process.
fn new_header(pid: i32, parent_pid: u32) -> Header {
    Header {
        parent_pid,
        version: FORMAT_VERSION,
        pid: pid as u32,
        start_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        clock_unit_ns: recorder::CLOCK_UNIT_NS,
        start_mono_ns: recorder::now_mono_ns(),
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
    modules: Option<Vec<crate::unwind::LoadedModule>>,
) -> std::io::Result<bool> {
    let cpath = std::ffi::CString::new(path)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open with a valid path; O_EXCL: the first process to claim the name records (and
    // a symlink planted at the path is never followed).
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    lock_while_writing(fd);
    // SAFETY: getpid has no preconditions.
    let header = new_header(unsafe { libc::getpid() }, launch.parent_pid);
    if !crate::writer::write_all(fd, &header.encode()) {
        return Ok(false);
    }
    let mut cfg = launch.config(fd, 1, 1);
    cfg.replace = modules.is_some();
    cfg.modules = modules;
    Ok(recorder::start(cfg, header.start_mono_ns))
}

/// Holds an advisory lock on the capture for as long as the process has it open, so that a
/// reader (`memtrack summary`) can tell a capture still being written from one whose writer
/// died: the kernel drops the lock with the last descriptor. Shared: after an exec the new
/// image locks again while a forked child may still hold the old descriptor. Best effort:
/// the result is ignored, errno kept.
fn lock_while_writing(fd: i32) {
    let _errno = SaveErrno::new();
    // SAFETY: flock on the descriptor the tracker just opened; LOCK_NB: never blocks. The lock
    // is on the tracker's own file, which the program does not use.
    unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
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
    let Ok(cpath) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: open with a valid path.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return false;
    }
    lock_while_writing(fd);
    // Times stay relative to the capture's start, on the same monotonic clock.
    header.start_mono_ns = old.start_mono_ns;
    let mut image = Vec::new();
    put_record(&mut image, record::IMAGE, &header.encode());
    if !crate::writer::write_all(fd, &image) {
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
    let (Some(old), ACTIVE) = (old, STATE.load(Ordering::Acquire)) else {
        STATE.store(DISABLED, Ordering::Release);
        return;
    };
    STATE.store(INITIALIZING, Ordering::Release);
    let Some(g) = IgnoreAllocs::enter() else {
        STATE.store(DISABLED, Ordering::Release);
        return;
    };
    let _errno = SaveErrno::new();
    recorder::leave_parent(old, &g);
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
            stderr_line(&format!("memtrack: cannot create capture {path}: {e}\n"));
            false
        }
    };
    STATE.store(if started { ACTIVE } else { DISABLED }, Ordering::Release);
}

/// The library constructor: decide about recording if no hook has yet, start the writer.
pub fn constructor() {
    CONSTRUCTED.store(true, Ordering::Release);
    resolve();
    if STATE.load(Ordering::Acquire) == UNINIT {
        init();
    }
    if STATE.load(Ordering::Acquire) == ACTIVE {
        recorder::start_writer();
        // SAFETY: registers a handler that only stores to an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(atfork_child)) };
    }
}

/// The library destructor: runs late in `exit` (libraries are finalised in reverse order of
/// initialisation, and this one is initialised first), after the program's atexit handlers.
pub fn destructor() {
    recorder::finish(EndReason::Exit);
}

// ---------------------------------------------------------------- recording helpers

/// Entered at the top of a hook: `Some` when this call is to be recorded. The guard is held
/// across the real call, so allocation functions the real one calls through the PLT (glibc's
/// `reallocarray` calls `realloc`) are not recorded a second time.
#[inline(always)]
fn enter() -> Option<IgnoreAllocs> {
    match STATE.load(Ordering::Relaxed) {
        ACTIVE => IgnoreAllocs::enter(),
        UNINIT if init() => IgnoreAllocs::enter(),
        _ => None,
    }
}

/// After the real call: record the block it handed out, if any, keeping its errno.
#[inline(always)]
fn done_alloc(
    g: Option<IgnoreAllocs>,
    kind: AllocKind,
    p: *mut c_void,
    size: usize,
    caller: Caller,
) {
    if let Some(g) = g {
        if !p.is_null() {
            recorder::record(
                Ev::Alloc(kind, p as u64, size as u64),
                Origin::Caller(caller),
                &g,
            );
        }
    }
}

// ---------------------------------------------------------------- the hooks

/// # Safety
/// C `malloc` contract.
#[inline]
pub unsafe fn malloc(size: usize, caller: Caller) -> *mut c_void {
    let Some(f) = real_fn!(MALLOC, Malloc) else {
        return pool_alloc(size, 16);
    };
    let g = enter();
    // SAFETY: forwarding the caller's arguments to the real function.
    let p = unsafe { f(size) };
    done_alloc(g, AllocKind::Malloc, p, size, caller);
    p
}

/// # Safety
/// C `free` contract.
#[inline]
pub unsafe fn free(p: *mut c_void) {
    if p.is_null() || in_pool(p) {
        return;
    }
    let Some(f) = real_fn!(FREE, Free) else {
        return;
    };
    let g = enter();
    if let Some(g) = &g {
        // Recorded before the block goes back: no other thread can be handed it first.
        recorder::record(Ev::Free(p as u64), Origin::Unknown, g);
    }
    // SAFETY: forwarding a pointer the program obtained from the real allocator.
    unsafe { f(p) };
    drop(g);
}

/// # Safety
/// C `calloc` contract.
#[inline]
pub unsafe fn calloc(n: usize, m: usize, caller: Caller) -> *mut c_void {
    let Some(f) = real_fn!(CALLOC, Calloc) else {
        // The pool is zero-initialised static memory, never reused.
        return n
            .checked_mul(m)
            .map_or(std::ptr::null_mut(), |s| pool_alloc(s, 16));
    };
    let g = enter();
    // SAFETY: forwarding.
    let p = unsafe { f(n, m) };
    done_alloc(g, AllocKind::Calloc, p, n.wrapping_mul(m), caller);
    p
}

#[cold]
unsafe fn realloc_from_pool(p: *mut c_void, size: usize, caller: Caller) -> *mut c_void {
    // SAFETY: malloc contract; copies at most the old block's size.
    unsafe {
        let q = malloc(size, caller);
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, size.min(pool_size(p)));
        }
        q
    }
}

/// realloc and reallocarray share this: `size` is None when `n * m` overflowed.
#[inline]
fn realloc_common(
    kind: AllocKind,
    p: *mut c_void,
    size: Option<usize>,
    caller: Caller,
    call: impl FnOnce() -> *mut c_void,
) -> *mut c_void {
    let g = enter();
    if let (Some(g), false) = (&g, p.is_null()) {
        if size == Some(0) {
            // glibc frees the block and returns NULL.
            recorder::record(Ev::Free(p as u64), Origin::Unknown, g);
        } else {
            recorder::record(Ev::ReallocFree(p as u64), Origin::Unknown, g);
        }
    }
    let q = call();
    if let Some(g) = &g {
        if !q.is_null() {
            let ev = Ev::Alloc(kind, q as u64, size.unwrap_or(0) as u64);
            recorder::record(ev, Origin::Caller(caller), g);
        } else if !p.is_null() && size != Some(0) {
            recorder::record(Ev::ReallocFailed, Origin::Unknown, g);
        }
    }
    q
}

/// # Safety
/// C `realloc` contract.
#[inline]
pub unsafe fn realloc(p: *mut c_void, size: usize, caller: Caller) -> *mut c_void {
    if in_pool(p) {
        // SAFETY: p came from the pool.
        return unsafe { realloc_from_pool(p, size, caller) };
    }
    let Some(f) = real_fn!(REALLOC, Realloc) else {
        return pool_alloc(size, 16);
    };
    // SAFETY: forwarding.
    realloc_common(AllocKind::Realloc, p, Some(size), caller, || unsafe {
        f(p, size)
    })
}

/// # Safety
/// C `reallocarray` contract.
#[inline]
pub unsafe fn reallocarray(p: *mut c_void, n: usize, m: usize, caller: Caller) -> *mut c_void {
    if in_pool(p) {
        return match n.checked_mul(m) {
            // SAFETY: p came from the pool.
            Some(s) => unsafe { realloc_from_pool(p, s, caller) },
            None => std::ptr::null_mut(),
        };
    }
    let Some(f) = real_fn!(REALLOCARRAY, ReallocArray) else {
        return std::ptr::null_mut();
    };
    // SAFETY: forwarding.
    realloc_common(
        AllocKind::ReallocArray,
        p,
        n.checked_mul(m),
        caller,
        || unsafe { f(p, n, m) },
    )
}

/// # Safety
/// C `posix_memalign` contract.
#[inline]
pub unsafe fn posix_memalign(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
    caller: Caller,
) -> c_int {
    let Some(f) = real_fn!(POSIX_MEMALIGN, PosixMemalign) else {
        let p = pool_alloc(size, align);
        if p.is_null() {
            return libc::ENOMEM;
        }
        // SAFETY: out is the caller's valid out-pointer.
        unsafe { *out = p };
        return 0;
    };
    let g = enter();
    // SAFETY: forwarding.
    let rc = unsafe { f(out, align, size) };
    let p = if rc == 0 {
        // SAFETY: on success the real function stored the block in *out.
        unsafe { *out }
    } else {
        std::ptr::null_mut()
    };
    done_alloc(g, AllocKind::PosixMemalign, p, size, caller);
    rc
}

macro_rules! aligned_hook {
    ($name:ident, $idx:expr, $kind:expr) => {
        /// # Safety
        /// The C function's contract.
        #[inline]
        pub unsafe fn $name(align: usize, size: usize, caller: Caller) -> *mut c_void {
            let Some(f) = real_fn!($idx, Memalign) else {
                return pool_alloc(size, align);
            };
            let g = enter();
            // SAFETY: forwarding.
            let p = unsafe { f(align, size) };
            done_alloc(g, $kind, p, size, caller);
            p
        }
    };
}
aligned_hook!(aligned_alloc, ALIGNED_ALLOC, AllocKind::AlignedAlloc);
aligned_hook!(memalign, MEMALIGN, AllocKind::Memalign);

macro_rules! page_hook {
    ($name:ident, $idx:expr, $kind:expr) => {
        /// # Safety
        /// The C function's contract.
        #[inline]
        pub unsafe fn $name(size: usize, caller: Caller) -> *mut c_void {
            let Some(f) = real_fn!($idx, Malloc) else {
                return pool_alloc(size, 4096);
            };
            let g = enter();
            // SAFETY: forwarding.
            let p = unsafe { f(size) };
            done_alloc(g, $kind, p, size, caller);
            p
        }
    };
}
page_hook!(valloc, VALLOC, AllocKind::Valloc);
page_hook!(pvalloc, PVALLOC, AllocKind::Pvalloc);

/// # Safety
/// C `malloc_usable_size` contract.
pub unsafe fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if in_pool(p) {
        return pool_size(p);
    }
    match real_fn!(USABLE_SIZE, UsableSize) {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(p) },
        None => 0,
    }
}

/// # Safety
/// C `dlclose` contract.
pub unsafe fn dlclose(handle: *mut c_void) -> c_int {
    let Some(f) = real_fn!(DLCLOSE, Dlclose) else {
        return -1;
    };
    let active = STATE.load(Ordering::Acquire) == ACTIVE;
    let rec = recorder::recorder().filter(|_| active);
    if let Some(r) = rec {
        // Stop unwinding through tables that may be unmapped, before they are.
        let _g = IgnoreAllocs::enter();
        let _errno = SaveErrno::new();
        r.invalidate_modules();
    }
    // SAFETY: forwarding.
    let rc = unsafe { f(handle) };
    if let Some(r) = rec {
        if let Some(_g) = IgnoreAllocs::enter() {
            let _errno = SaveErrno::new();
            r.refresh_modules();
        }
    }
    rc
}

/// True in the process that records, false in a vfork child sharing its memory.
fn is_owner() -> bool {
    // SAFETY: getpid has no preconditions.
    recorder::recorder().is_some_and(|r| r.pid == unsafe { libc::getpid() })
}

fn before_exec() {
    if is_owner() {
        recorder::finish(EndReason::Exec);
    }
}

/// # Safety
/// C `execve` contract.
pub unsafe fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(f) = real_fn!(EXECVE, Execve) else {
        return -1;
    };
    before_exec();
    // SAFETY: forwarding.
    let rc = unsafe { f(path, argv, envp) };
    recorder::resume();
    rc
}

macro_rules! exec2_hook {
    ($name:ident, $idx:expr) => {
        /// # Safety
        /// The C function's contract.
        pub unsafe fn $name(path: *const c_char, argv: *const *const c_char) -> c_int {
            let Some(f) = real_fn!($idx, Execv) else {
                return -1;
            };
            before_exec();
            // SAFETY: forwarding.
            let rc = unsafe { f(path, argv) };
            recorder::resume();
            rc
        }
    };
}
exec2_hook!(execv, EXECV);
exec2_hook!(execvp, EXECVP);

/// Which of the `execl` family a call was (its arguments end differently, and it calls a
/// different `execv` form).
pub const EXECL: u32 = 0;
pub const EXECLE: u32 = 1;
pub const EXECLP: u32 = 2;

/// Argument lists longer than this are copied to mapped memory rather than the stack.
const EXECL_ON_STACK: usize = 256;
/// More arguments than this: E2BIG (the kernel's own limit on argv is far lower).
const EXECL_MAX_ARGS: usize = 1 << 21;

/// `execl`, `execle` and `execlp`, whose arguments come as C varargs (which stable Rust cannot
/// take): gathers them into an argv array and calls the `execv`, `execve` or `execvp` hook, so
/// the capture is finished before the image goes. Without this, a program that used them lost
/// every event its image had recorded.
///
/// # Safety
/// `regs` holds the six integer argument registers of an x86-64 System V call of the function
/// `kind` names, and `stack` points at that call's stack arguments: together, its arguments in
/// order (all pointers). The C function's contract holds: a null pointer ends the argument list
/// (for `execle`, the environment pointer follows it).
pub unsafe extern "C" fn execl_va(regs: *const usize, stack: *const usize, kind: u32) -> c_int {
    // SAFETY: the caller's guarantee: argument i is in a register below 6, else on the stack.
    let arg = |i: usize| unsafe {
        if i < 6 {
            *regs.add(i)
        } else {
            *stack.add(i - 6)
        }
    };
    let path = arg(0) as *const c_char;
    // argv runs from argument 1 to the null pointer that ends it.
    let mut n = 0;
    while arg(1 + n) != 0 {
        n += 1;
        if n > EXECL_MAX_ARGS {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = libc::E2BIG };
            return -1;
        }
    }
    let envp = if kind == EXECLE {
        arg(2 + n) as *const *const c_char
    } else {
        std::ptr::null()
    };
    let mut small = [std::ptr::null::<c_char>(); EXECL_ON_STACK];
    let bytes = (n + 1) * std::mem::size_of::<*const c_char>();
    let mapped = if n < EXECL_ON_STACK {
        None
    } else {
        // SAFETY: an anonymous private mapping (not an allocation the program could see).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return -1; // errno: mmap's (ENOMEM)
        }
        Some(p as *mut *const c_char)
    };
    let argv: *mut *const c_char = mapped.unwrap_or(small.as_mut_ptr());
    for i in 0..=n {
        // SAFETY: argv has room for n + 1 pointers; argument 1 + n is the null that ends them.
        unsafe { *argv.add(i) = arg(1 + i) as *const c_char };
    }
    // SAFETY: forwarding the gathered arguments to the hooks of the array forms.
    let rc = unsafe {
        match kind {
            EXECLE => execve(path, argv, envp),
            EXECLP => execvp(path, argv),
            _ => execv(path, argv),
        }
    };
    if let Some(p) = mapped {
        let _errno = SaveErrno::new();
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p as *mut c_void, bytes) };
    }
    rc
}

/// # Safety
/// C `execvpe` contract.
pub unsafe fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(f) = real_fn!(EXECVPE, Execve) else {
        return -1;
    };
    before_exec();
    // SAFETY: forwarding.
    let rc = unsafe { f(file, argv, envp) };
    recorder::resume();
    rc
}

/// # Safety
/// C `fexecve` contract.
pub unsafe fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let Some(f) = real_fn!(FEXECVE, Fexecve) else {
        return -1;
    };
    before_exec();
    // SAFETY: forwarding.
    let rc = unsafe { f(fd, argv, envp) };
    recorder::resume();
    rc
}

/// `abort` called by the program (through the PLT: glibc's own internal aborts, such as
/// `assert` failures and heap corruption reports, do not pass here): the capture is finished
/// with reason `abort`, then the real `abort` raises SIGABRT.
pub fn abort_now() -> ! {
    if is_owner() {
        recorder::finish(EndReason::Abort);
    }
    type Abort = unsafe extern "C" fn() -> !;
    if let Some(f) = real_fn!(ABORT, Abort) {
        // SAFETY: forwarding to libc's abort.
        unsafe { f() }
    }
    // SAFETY: what abort does, without it: SIGABRT with the default action, then an exit.
    unsafe {
        libc::signal(libc::SIGABRT, libc::SIG_DFL);
        libc::raise(libc::SIGABRT);
        libc::syscall(libc::SYS_exit_group, 127 as libc::c_long);
    }
    loop {
        std::hint::spin_loop();
    }
}

/// # Safety
/// C `_exit` contract.
pub unsafe fn exit_now(status: c_int, upper: bool) -> ! {
    if is_owner() {
        recorder::finish(EndReason::ImmediateExit);
    }
    let f = if upper {
        real_fn!(EXIT_UPPER, Exit)
    } else {
        real_fn!(EXIT_, Exit)
    };
    match f {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(status) },
        // SAFETY: the raw syscall ends the process whatever the libc state.
        None => unsafe {
            libc::syscall(libc::SYS_exit_group, status as libc::c_long);
            std::process::abort()
        },
    }
}
