//! Recordings started in a process already running: `libmemtrack.so` loaded with `dlopen`
//! (by `memtrack attach`'s injector, or by `memtrack.Tracker` through ctypes), then
//! `memtrack_start` / `memtrack_stop` (`docs/design/issue24-abi.md`). Each recording is a capture
//! of its own with a fresh recorder and writer thread; the hooks are reached through rewritten
//! relocation slots (`got`), removed again at the stop.
//!
//! Must never: start while another recording of this process runs (`memtrack run`'s, or one not
//! stopped), or be on the per-event path.

use crate::capture_file;
use crate::got;
use crate::guard::{IgnoreAllocs, SaveErrno};
use crate::lifecycle::{self, State};
use crate::recorder::{self, Config};
use memtrack_format::{put_record, record, AttachHow, AttachRecord, EndReason};
use std::ffi::CStr;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

/// `memtrack_start` flags.
pub const START_OVERWRITE: u32 = 1;
pub const START_ATTACHED: u32 = 2;
pub const START_PYMALLOC: u32 = 4;
/// Record in the fast encoding (`EVENTS_S`), as `MEMTRACK_ENCODING=fast` does.
pub const START_FAST: u32 = 8;

/// `memtrack_status` values.
pub const STATUS_NONE: u32 = 0;
pub const STATUS_RECORDING: u32 = 1;
pub const STATUS_STOPPED: u32 = 2;
pub const STATUS_PRELOADED: u32 = 3;

/// The preload library's exported words (`memtrack_control`, `memtrack_status`).
static CONTROL: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());
static STATUS: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());
/// Set by the library constructor: loaded into a running process (not preloaded).
static LOADED_LATE: AtomicBool = AtomicBool::new(false);
/// When the recording stops by itself (monotonic ns; 0: never).
static DEADLINE_NS: AtomicU64 = AtomicU64::new(0);
/// The recording installed Python's allocator wrappers.
static PYMALLOC_ON: AtomicBool = AtomicBool::new(false);
/// One stop at a time (a program's `memtrack_stop` against the writer's own).
static STOPPING: AtomicBool = AtomicBool::new(false);
/// The writer stopped the recording (control word, duration) and no `memtrack_stop` has
/// answered for it yet: the program's own stop then succeeds.
static SELF_STOPPED: AtomicBool = AtomicBool::new(false);
/// The writer thread of this recording made its symbol lookups.
static PREPARED: AtomicBool = AtomicBool::new(false);
/// The reason of the last failure, NUL-terminated.
static LAST_ERROR: Mutex<[u8; 512]> = Mutex::new([0; 512]);

/// The preload library's exported control and status words.
pub fn register_words(control: &'static AtomicU32, status: &'static AtomicU32) {
    CONTROL.store(
        control as *const AtomicU32 as *mut AtomicU32,
        Ordering::Release,
    );
    STATUS.store(
        status as *const AtomicU32 as *mut AtomicU32,
        Ordering::Release,
    );
}

fn word(p: &AtomicPtr<AtomicU32>) -> Option<&'static AtomicU32> {
    let p = p.load(Ordering::Acquire);
    // SAFETY: a non-null pointer is a `&'static` registered above.
    (!p.is_null()).then(|| unsafe { &*p })
}

pub(crate) fn set_status(v: u32) {
    if let Some(w) = word(&STATUS) {
        w.store(v, Ordering::Release);
    }
}

fn status() -> u32 {
    word(&STATUS).map_or(STATUS_NONE, |w| w.load(Ordering::Acquire))
}

/// Whether `libmemtrack.so` was preloaded, decided by the constructor before any table is
/// filled: preloaded libraries come before the C library in the loader's list (the program's
/// dependencies are loaded after `LD_PRELOAD`'s), a library loaded with `dlopen` after it. When
/// in doubt, preloaded (the mode of `memtrack run`; a late start is then refused, never
/// wrongly recorded).
pub(crate) fn detect_preloaded() -> bool {
    struct Seen {
        own: usize,
        libc_first: Option<bool>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `Seen` passed below; `info` is valid for this call.
        let (seen, info) = unsafe { (&mut *(data as *mut Seen), &*info) };
        if seen.libc_first.is_some() {
            return 1;
        }
        let name = if info.dlpi_name.is_null() {
            &b""[..]
        } else {
            // SAFETY: a NUL-terminated string owned by the loader.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        let file = name.rsplit(|&c| c == b'/').next().unwrap_or(name);
        // SAFETY: the loader guarantees dlpi_phdr points to dlpi_phnum entries.
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let ours = phdrs.iter().any(|ph| {
            let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
            ph.p_type == libc::PT_LOAD
                && seen.own >= start
                && seen.own < start.wrapping_add(ph.p_memsz as usize)
        });
        if ours {
            seen.libc_first = Some(false);
        } else if file.starts_with(b"libc.so.") {
            seen.libc_first = Some(true);
        }
        0
    }
    let mut seen = Seen {
        own: detect_preloaded as *const () as usize,
        libc_first: None,
    };
    // SAFETY: the callback reads only what the loader hands it and `seen`.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut seen as *mut Seen as *mut libc::c_void) };
    let late = seen.libc_first == Some(true);
    LOADED_LATE.store(late, Ordering::Release);
    !late
}

/// A stop of the recording has begun (its slots are being put back).
pub(crate) fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire)
}

/// The library was loaded into a running process (its slots are redirected while recording).
pub(crate) fn loaded_late() -> bool {
    LOADED_LATE.load(Ordering::Relaxed)
}

/// The reason of the last failure.
pub fn last_error() -> *const c_char {
    match LAST_ERROR.lock() {
        // The buffer is static: the pointer stays valid after the lock is released.
        Ok(b) => b.as_ptr() as *const c_char,
        Err(_) => c"".as_ptr(),
    }
}

fn fail(msg: &str) -> i32 {
    if let Ok(mut b) = LAST_ERROR.lock() {
        let n = msg.len().min(b.len() - 1);
        b[..n].copy_from_slice(&msg.as_bytes()[..n]);
        b[n] = 0;
    }
    -1
}

/// How a recording records: every event (the default), a sample, or aggregated figures
/// (`memtrack run --sample-rate`, `--aggregate`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Mean gap between sampled bytes; 0 records every allocation.
    pub sample_rate: u64,
    /// The sampling seed plus one; 0 for a seed of the process's own.
    pub sample_seed_plus_one: u64,
    /// Aggregated recording with a checkpoint this often; 0 records events.
    pub checkpoint_interval_ms: u64,
}

/// `memtrack_start`: 0, or -1 with the reason in [`last_error`].
///
/// # Safety
/// `path` is null or a NUL-terminated string.
pub unsafe fn start(path: *const c_char, flags: u32, duration_ms: std::os::raw::c_ulong) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { start_with(path, flags, duration_ms, Options::default()) }
}

/// `memtrack_start_with`: [`start`] with [`Options`].
///
/// # Safety
/// `path` is null or a NUL-terminated string.
pub unsafe fn start_with(
    path: *const c_char,
    flags: u32,
    duration_ms: std::os::raw::c_ulong,
    options: Options,
) -> i32 {
    let Some(g) = IgnoreAllocs::enter() else {
        return fail("memtrack_start called from inside memtrack");
    };
    let _errno = SaveErrno::new();
    if path.is_null() {
        return fail("no capture path given");
    }
    // SAFETY: the caller's contract.
    let path = unsafe { CStr::from_ptr(path) }
        .to_string_lossy()
        .into_owned();
    if !LOADED_LATE.load(Ordering::Acquire) {
        return fail(if lifecycle::is_recording() {
            "this process runs under `memtrack run` (libmemtrack.so is preloaded): it is recorded from its start already"
        } else {
            "libmemtrack.so is preloaded in this process but `memtrack run` does not record it (a program its command started, with --no-follow-fork): record it with `memtrack run`, or run it without LD_PRELOAD"
        });
    }
    if preloaded_elsewhere() {
        return fail(
            "this process runs under `memtrack run` (another copy of libmemtrack.so is preloaded): it is recorded from its start already",
        );
    }
    if !got::hooks_registered() {
        return fail("the hooks are not registered (libmemtrack.so is incomplete)");
    }
    if !lifecycle::begin_session() {
        return fail(
            "this process is already being recorded (memtrack attach, or a memtrack.Tracker block)",
        );
    }
    crate::sampling::configure(
        options.sample_rate,
        options.sample_seed_plus_one.checked_sub(1),
    );
    // Blocks an earlier recording sampled are not this one's (the old set stays mapped: a
    // thread may still be reading it).
    crate::sampling::reset_after_fork();
    crate::aggregate::configure(options.checkpoint_interval_ms);
    match open(&path, flags, &g) {
        Ok(()) => {}
        Err(msg) => {
            lifecycle::end_init(State::Disabled);
            return fail(&msg);
        }
    }
    let now = crate::clock::now_mono_ns();
    DEADLINE_NS.store(
        if duration_ms == 0 {
            0
        } else {
            now + duration_ms.saturating_mul(1_000_000)
        },
        Ordering::Release,
    );
    if let Some(c) = word(&CONTROL) {
        c.store(0, Ordering::Release);
    }
    STOPPING.store(false, Ordering::Release);
    SELF_STOPPED.store(false, Ordering::Release);
    PREPARED.store(false, Ordering::Release);
    recorder::start_writer();
    wait_prepared();
    static ATFORK: std::sync::Once = std::sync::Once::new();
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that never unwinds.
        unsafe { libc::pthread_atfork(None, None, Some(crate::session::atfork_child)) };
    });
    lifecycle::end_init(State::Active);
    set_status(STATUS_RECORDING);
    got::patch_all();
    if flags & START_PYMALLOC != 0 {
        PYMALLOC_ON.store(crate::pymem::install(), Ordering::Release);
    } else if flags & START_ATTACHED != 0 {
        // Injected into a running CPython: no GIL here; its main thread wraps the object
        // allocator at its next check for pending calls.
        crate::pymem::later(true);
    }
    0
}

/// Called by the writer thread once ready: the symbol lookups a recording needs before its
/// first event (is this a Python interpreter? which functions do the slots hold?) are made
/// there, because a lookup that fails leaves an error message in the calling thread, which
/// that thread's program would read from its next `dlerror()` (and free, unrecorded).
pub(crate) fn writer_prepared() {
    if LOADED_LATE.load(Ordering::Acquire) {
        got::prepare();
    }
    PREPARED.store(true, Ordering::Release);
}

/// Waits (at most 2 s) for [`writer_prepared`], so that the first events have their Python
/// frames.
fn wait_prepared() {
    for _ in 0..20_000 {
        if PREPARED.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
}

/// The object allocator's wrappers were installed (by a pending call).
pub(crate) fn pymalloc_installed(on: bool) {
    if on {
        PYMALLOC_ON.store(true, Ordering::Release);
    }
}

fn open(path: &str, flags: u32, _g: &IgnoreAllocs) -> Result<(), String> {
    if flags & START_OVERWRITE != 0 {
        let _ = std::fs::remove_file(path);
    }
    let fd = capture_file::create(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{path} exists (pass overwrite to replace it)")
        } else {
            format!("cannot create {path}: {e}")
        }
    })?;
    // SAFETY: getpid has no preconditions.
    let header = crate::session::new_header(unsafe { libc::getpid() }, 0);
    let attach = AttachRecord {
        how: if flags & START_ATTACHED != 0 {
            AttachHow::Attach
        } else {
            AttachHow::InProcess
        },
        process_age_ms: process_age_ms(),
    };
    let mut bytes = header.encode();
    put_record(&mut bytes, record::ATTACH, &attach.encode());
    if !capture_file::write_all(fd, &bytes) || !crate::session::write_sampling(fd) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        return Err(format!("cannot write {path}"));
    }
    crate::writer::set_fast(flags & START_FAST != 0);
    let cfg = Config {
        fd,
        skip_own_module: true,
        first_seq: 1,
        first_stack_id: 1,
        root_path: path.to_owned(),
        follow_fork: false,
        modules: None,
        replace: false,
        new_session: true,
    };
    if !recorder::start(cfg, header.start_mono_ns) {
        return Err(format!("cannot start recording into {path}"));
    }
    Ok(())
}

/// Another copy of the library, preloaded, records this process.
fn preloaded_elsewhere() -> bool {
    // SAFETY: dlsym with a valid name; a non-null result is that library's exported word.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"memtrack_status".as_ptr()) };
    let ours = STATUS.load(Ordering::Acquire) as *mut libc::c_void;
    if p.is_null() || p == ours {
        return false;
    }
    // SAFETY: as above: an AtomicU32 exported by a libmemtrack.so.
    unsafe { (*(p as *const AtomicU32)).load(Ordering::Acquire) == STATUS_PRELOADED }
}

/// How long this process had run, from `/proc/self/stat` (field 22, in clock ticks since boot)
/// and `/proc/uptime`; 0 when unknown.
fn process_age_ms() -> u64 {
    let (Ok(stat), Ok(up)) = (
        std::fs::read_to_string("/proc/self/stat"),
        std::fs::read_to_string("/proc/uptime"),
    ) else {
        return 0;
    };
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let start_ticks: u64 = rest
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let up_s: f64 = up
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ((up_s - start_ticks as f64 / hz) * 1000.0).max(0.0) as u64
}

/// `memtrack_stop`: removes the hooks and ends the capture before it returns. 0, or -1 when
/// nothing was recording.
pub fn stop() -> i32 {
    let Some(g) = IgnoreAllocs::enter() else {
        return fail("memtrack_stop called from inside memtrack");
    };
    let _errno = SaveErrno::new();
    if SELF_STOPPED.swap(false, Ordering::AcqRel) {
        // The writer stopped it (control word or duration): wait for the end.
        wait_stopped();
        return 0;
    }
    if lifecycle::current() != State::Active {
        return fail("nothing is being recorded");
    }
    if STOPPING.swap(true, Ordering::AcqRel) {
        // The writer is stopping it this very moment.
        SELF_STOPPED.store(false, Ordering::Release);
        wait_stopped();
        return 0;
    }
    unhook(true);
    settle();
    drop(g);
    recorder::finish(EndReason::Detached);
    set_status(STATUS_STOPPED);
    0
}

fn wait_stopped() {
    for _ in 0..100_000 {
        if status() != STATUS_RECORDING {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
}

/// Removes the hooks. Python's allocator wrappers need the GIL to be removed: without it
/// (the writer thread) the interpreter's main thread removes them later; meanwhile they
/// forward only.
fn unhook(holds_gil: bool) {
    if PYMALLOC_ON.swap(false, Ordering::AcqRel) {
        if holds_gil {
            crate::pymem::uninstall();
        } else {
            crate::pymem::later(false);
        }
    }
    got::restore_all();
}

/// A thread that read a hook's address from a slot just before it was restored is still to
/// record its call: it gets this long while the recording is still on.
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(2));
}

/// Polled by the writer thread: true when this recording is to stop now (asked through the
/// control word, or its duration is over) and the caller is the one to stop it.
pub(crate) fn writer_stop_due() -> bool {
    if !LOADED_LATE.load(Ordering::Relaxed) {
        return false;
    }
    let asked = word(&CONTROL).is_some_and(|c| c.load(Ordering::Acquire) != 0);
    let deadline = DEADLINE_NS.load(Ordering::Acquire);
    let over = deadline != 0 && crate::clock::now_mono_ns() >= deadline;
    if !(asked || over) || STOPPING.swap(true, Ordering::AcqRel) {
        return false;
    }
    SELF_STOPPED.store(true, Ordering::Release);
    unhook(false);
    settle();
    lifecycle::finish()
}

/// The capture ended (any reason): outside processes see it stopped.
pub(crate) fn ended() {
    if LOADED_LATE.load(Ordering::Relaxed) && status() == STATUS_RECORDING {
        set_status(STATUS_STOPPED);
    }
}
