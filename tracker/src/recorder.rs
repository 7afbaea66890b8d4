//! Global recording state, per-thread buffers and the event encoder.

use crate::clock;
use crate::guard::{IgnoreAllocs, SaveErrno};
use crate::lifecycle;
use crate::mapbuf::MapBuf;
use crate::python;
use crate::stacks::{FastMap, Trie};
use crate::unwind::{self, Caller, LoadedModule, Skip, Unw, UnwCache, MAX_FRAMES};
use crate::walker::{self, Walker};
use crate::writer::{self, Msg};
use crossbeam_channel::{Receiver, Sender};
use memtrack_format::{
    op, put_ivarint, put_uvarint, record, AllocKind, ByteSink, ChunkHeader, EndReason,
    ModulesRecord, PythonEndRecord, MAX_FRAME_PREFIX,
};
use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[repr(align(128))]
struct Padded<T>(T);

/// The global event order. Kept on its own cache line: every event touches it.
static SEQ: Padded<AtomicU64> = Padded(AtomicU64::new(1));
/// Set once a second thread records: from then on `SEQ` is taken with an atomic add. Until
/// then the one recording thread takes it with a plain load and store, which costs no locked
/// instruction (see `go_multi` for the switch).
static MULTI: AtomicBool = AtomicBool::new(false);

/// The next sequence number. Called inside an event (the thread's `busy` set) or after
/// `go_multi`.
#[inline(always)]
fn next_seq() -> u64 {
    if MULTI.load(Ordering::Relaxed) {
        SEQ.0.fetch_add(1, Ordering::Relaxed)
    } else {
        let s = SEQ.0.load(Ordering::Relaxed);
        SEQ.0.store(s + 1, Ordering::Relaxed);
        s
    }
}

/// A second thread is about to record: every thread takes sequence numbers atomically from
/// now on. A thread that read `MULTI` as false before the barrier is inside its event (its
/// `busy` is visible after the barrier), and is waited for; any later event of it sees `MULTI`.
/// Called with the registry lock held, outside any event of the calling thread.
fn go_multi(threads: &[Arc<ThreadState>]) {
    if MULTI.swap(true, Ordering::SeqCst) {
        return;
    }
    // Once registered, membarrier does not fail; if it ever did, the busy flags below still
    // catch every thread whose event had begun visibly.
    let _ = heavy_barrier();
    for ts in threads {
        // Bounded: a thread interrupted inside an event by a signal handler that waits for this
        // thread would otherwise never let go. Past the bound, the worst case is one sequence
        // number taken twice, which the reader orders arbitrarily.
        for i in 0..200_000u32 {
            if !ts.busy.load(Ordering::Acquire) {
                break;
            }
            if i < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// A thread hands its buffer to the writer once it holds this many bytes, or fewer when threads
/// are many (`FLUSH_LIMIT`).
const FLUSH_AT: usize = 256 * 1024;
/// With many threads, each holding a buffer, they share this many bytes between them: a
/// thousand threads held 256 KiB each (275 MB).
const BUFFERS_BUDGET: usize = 16 << 20;
/// Spare buffers kept for threads to take (a buffer written whole holds 320 KiB of memory).
const POOL: usize = 16;
/// The least a thread buffers: smaller chunks encode less compactly.
const FLUSH_MIN: usize = 32 * 1024;
/// The current hand-over size, for the number of threads known (see `set_thread_count`).
static FLUSH_LIMIT: AtomicUsize = AtomicUsize::new(FLUSH_AT);

/// Threads with a state (live, or exited and not yet swept) decide the hand-over size.
pub(crate) fn set_thread_count(n: usize) {
    let each = (BUFFERS_BUDGET / n.max(1)).clamp(FLUSH_MIN, FLUSH_AT);
    FLUSH_LIMIT.store(each, Ordering::Relaxed);
}

/// Python code objects: address -> (id, identity fields).
type CodeIds = FastMap<usize, (u32, (usize, usize))>;

pub(crate) struct Recorder {
    fd: i32,
    /// (st_dev, st_ino) of the capture: a program that closes every descriptor and opens
    /// another file that gets our number must never receive capture bytes.
    file_id: (u64, u64),
    /// The process that owns this recorder: a vfork child shares its memory but must not end
    /// its capture.
    pub pid: i32,
    /// Turns the threads' chunks into the compact encoding; used by the writer thread only
    /// (or by `finish` when no writer was ever started).
    compactor: Mutex<memtrack_format::Transcoder>,
    /// The same, for a program thread that transcodes its own chunk while the writer is
    /// behind (see `hand_off`).
    helper: Mutex<memtrack_format::Transcoder>,
    pub tx: Sender<Msg>,
    rx: Mutex<Option<Receiver<Msg>>>,
    pool_tx: Sender<MapBuf>,
    pool_rx: Receiver<MapBuf>,
    pub writer_started: AtomicBool,
    pub registry: Mutex<Vec<Arc<ThreadState>>>,
    trie: Mutex<Trie>,
    modules: Mutex<ModuleSet>,
    unw_gen: AtomicU64,
    skip: Skip,
    orphan: Mutex<Option<Box<OwnerState>>>,
    thread_key: libc::pthread_key_t,
    /// Python code objects described so far: address -> (id, identity).
    pycodes: Mutex<(CodeIds, u32)>,
    /// The capture of the launched process (`%p` expanded): forked children's captures are
    /// named after it (`<root>.<pid>`).
    pub root_path: String,
    /// `--follow-fork`: forked children record into captures of their own.
    pub follow_fork: bool,
}

struct ModuleSet {
    list: Vec<LoadedModule>,
    /// Address ranges of `list`, shared with the threads for a lock-free check.
    ranges: Arc<[(u64, u64)]>,
    /// None while a `dlclose` is in progress: stacks are not unwound through stale tables.
    unw: Option<Arc<Unw>>,
}

/// The recorder of this process. Set once, except in a child forked under `--follow-fork`,
/// which replaces it with its own (the parent's is leaked there: its locks may be held by
/// threads that do not exist in the child).
static RECORDER: AtomicPtr<Recorder> = AtomicPtr::new(std::ptr::null_mut());

pub(crate) fn recorder() -> Option<&'static Recorder> {
    let p = RECORDER.load(Ordering::Acquire);
    // SAFETY: a non-null pointer comes from `Box::leak` in `start` and is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Set in a forked child: the writer thread is started at the child's first event, outside
/// `fork` (threads are better not created inside an atfork handler).
static WRITER_LATER: AtomicBool = AtomicBool::new(false);

fn file_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: st is a valid out-pointer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor number; fails cleanly when it is closed.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

impl Recorder {
    /// Writes framed bytes to the capture, if the descriptor still is the capture.
    pub fn write(&self, bytes: &[u8]) -> bool {
        if file_id(self.fd) != Some(self.file_id) {
            if lifecycle::disable() {
                let msg = b"memtrack: the program closed the capture file's descriptor; recording stopped\n";
                // SAFETY: plain write of a static message to stderr.
                unsafe { libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len()) };
            }
            return false;
        }
        writer::write_all(self.fd, bytes)
    }

    /// Writes a framed `EVENTS` chunk, transcoded into the compact encoding.
    pub fn write_chunk(&self, framed: &[u8]) -> bool {
        let compacted = self
            .compactor
            .lock()
            .ok()
            .and_then(|mut c| compact_framed(&mut c, framed));
        // A chunk that cannot be transcoded (never expected) is kept as it is.
        self.write(compacted.as_deref().unwrap_or(framed))
    }

    pub fn recycle(&self, mut buf: MapBuf) {
        buf.clear();
        let _ = self.pool_tx.try_send(buf);
    }

    /// A buffer from the pool, or a new mapping (None only when the kernel refuses memory).
    pub fn fresh_buffer(&self) -> Option<MapBuf> {
        self.pool_rx.try_recv().ok().or_else(MapBuf::new)
    }

    /// Encodes the current module set as a framed `MODULES` record.
    fn modules_record(&self, list: &[LoadedModule]) -> Vec<u8> {
        let rec = ModulesRecord {
            seq: SEQ.0.load(Ordering::Relaxed),
            time: clock::now_units(),
            modules: list.iter().map(|m| m.info.clone()).collect(),
        };
        let mut out = Vec::new();
        memtrack_format::put_record(&mut out, record::MODULES, &rec.encode());
        out
    }

    /// Hands a framed record to the writer, or keeps it for later while no writer runs yet.
    fn send_raw(&self, bytes: Vec<u8>) {
        if self.writer_started.load(Ordering::Acquire) {
            send(self, Msg::Raw(bytes));
        } else {
            // Before the writer starts (allocations before constructors), write synchronously:
            // the process is still single-threaded then.
            self.write(&bytes);
        }
    }

    /// Re-reads the module list and publishes a new unwinder.
    pub fn refresh_modules(&self) {
        let list = unwind::enumerate_modules();
        let unw = Arc::new(unwind::build_unwinder(&list));
        let rec = self.modules_record(&list);
        if let Ok(mut m) = self.modules.lock() {
            m.ranges = ranges_of(&list);
            m.list = list;
            m.unw = Some(unw);
        }
        self.unw_gen.fetch_add(1, Ordering::Release);
        self.send_raw(rec);
    }

    /// The tracker runs as the preload library.
    pub fn preloaded(&self) -> bool {
        matches!(self.skip, Skip::Range(..))
    }

    /// The module list, for a forked child: without waiting on a lock that a thread of the
    /// parent may have held at the fork (then the child lists the modules itself).
    pub fn modules_snapshot(&self) -> Vec<LoadedModule> {
        match self.modules.try_lock() {
            Ok(m) if !m.list.is_empty() => m.list.clone(),
            _ => unwind::enumerate_modules(),
        }
    }

    /// Called before a module may be unmapped.
    pub fn invalidate_modules(&self) {
        if let Ok(mut m) = self.modules.lock() {
            m.unw = None;
        }
        self.unw_gen.fetch_add(1, Ordering::Release);
    }
}

fn ranges_of(list: &[LoadedModule]) -> Arc<[(u64, u64)]> {
    list.iter().map(|m| (m.start, m.end)).collect()
}

/// How a capture is started.
pub(crate) struct Config {
    pub fd: i32,
    pub skip_own_module: bool,
    /// Where sequence numbers and stack ids start (above an earlier image's, after exec).
    pub first_seq: u64,
    pub first_stack_id: u32,
    pub root_path: String,
    pub follow_fork: bool,
    /// The loaded modules when already known (a forked child has its parent's, and must not
    /// take the loader's lock, which a parent thread may have held at the fork).
    pub modules: Option<Vec<LoadedModule>>,
    /// Replace the recorder the process has (a forked child's fresh start).
    pub replace: bool,
}

/// Sets up recording into `cfg.fd`, whose header the caller has written. Runs inside the guard.
pub(crate) fn start(cfg: Config, start_mono_ns: u64) -> bool {
    if recorder().is_some() && !cfg.replace {
        return false;
    }
    let modules = match cfg.modules {
        Some(m) => m,
        None => unwind::enumerate_modules(),
    };
    // Resolved here, at start, rather than inside the first hook of the main thread.
    let _ = unwind::current_stack_top();
    let skip = if cfg.skip_own_module {
        let (lo, hi) = unwind::own_module_range(&modules);
        Skip::Range(lo, hi)
    } else {
        Skip::Count(0)
    };
    let unw = Arc::new(unwind::build_unwinder(&modules));
    let (tx, rx) = crossbeam_channel::bounded(64);
    let (pool_tx, pool_rx) = crossbeam_channel::bounded(POOL);
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: key is a valid out-pointer; the destructor is an extern "C" fn that never unwinds.
    if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } != 0 {
        return false;
    }
    // Out of the way of the program's own low descriptor numbers.
    // SAFETY: fcntl/close on the descriptor we own.
    let fd = unsafe {
        let high = libc::fcntl(cfg.fd, libc::F_DUPFD_CLOEXEC, 512);
        if high >= 0 {
            libc::close(cfg.fd);
            high
        } else {
            cfg.fd
        }
    };
    let Some(id) = file_id(fd) else { return false };
    let rec = Recorder {
        fd,
        file_id: id,
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() },
        compactor: Mutex::new(memtrack_format::Transcoder::new()),
        helper: Mutex::new(memtrack_format::Transcoder::new()),
        tx,
        rx: Mutex::new(Some(rx)),
        pool_tx,
        pool_rx,
        writer_started: AtomicBool::new(false),
        registry: Mutex::new(Vec::new()),
        trie: Mutex::new(Trie::starting_at(cfg.first_stack_id)),
        modules: Mutex::new(ModuleSet {
            list: Vec::new(),
            ranges: ranges_of(&modules),
            unw: Some(unw),
        }),
        unw_gen: AtomicU64::new(1),
        skip,
        orphan: Mutex::new(None),
        thread_key: key,
        pycodes: Mutex::new((FastMap::default(), 1)),
        root_path: cfg.root_path,
        follow_fork: cfg.follow_fork,
    };
    SEQ.0.store(cfg.first_seq.max(1), Ordering::Relaxed);
    // A fresh image or a forked child: one thread so far.
    MULTI.store(false, Ordering::Relaxed);
    register_membarrier();
    read_writer_behind();
    // A forked child: its times start from its own start; its writer starts at its first
    // event.
    clock::start_at(start_mono_ns, cfg.replace);
    if cfg.replace {
        WRITER_LATER.store(true, Ordering::Release);
    }
    let rec: &'static Recorder = Box::leak(Box::new(rec));
    RECORDER.store(rec as *const Recorder as *mut Recorder, Ordering::Release);
    let first = rec.modules_record(&modules);
    rec.write(&first);
    if let Ok(mut m) = rec.modules.lock() {
        m.list = modules;
    }
    true
}

/// Starts the writer thread, once. A raw pthread rather than `std::thread`: std's thread start
/// allocates (and registers TLS destructors on the parent) before our closure could enter the
/// guard. Signals are blocked in it so the program's handlers run on the program's threads.
pub(crate) fn start_writer() {
    let Some(rec) = recorder() else { return };
    let Some(rx) = rec.rx.lock().ok().and_then(|mut r| r.take()) else {
        return;
    };
    let _g = IgnoreAllocs::enter();
    let arg = Box::into_raw(Box::new(rx)) as *mut libc::c_void;
    // SAFETY: attr and the sigsets are initialised before use; `arg` is owned by the new thread
    // (or reclaimed below when creation fails).
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, 512 * 1024);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut tid: libc::pthread_t = 0;
        let rc = libc::pthread_create(&mut tid, &attr, writer_entry, arg);
        libc::pthread_attr_destroy(&mut attr);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if rc == 0 {
            rec.writer_started.store(true, Ordering::Release);
        } else {
            drop(Box::from_raw(arg as *mut Receiver<Msg>));
        }
    }
}

extern "C" fn writer_entry(arg: *mut libc::c_void) -> *mut libc::c_void {
    IgnoreAllocs::forever();
    // SAFETY: names the calling thread; the name is NUL-terminated and under 16 bytes.
    unsafe { libc::pthread_setname_np(libc::pthread_self(), c"memtrack-writer".as_ptr()) };
    // A batch thread: same share of the CPU, but its frequent wake-ups do not preempt the
    // program's threads on their cores. Only this thread's policy; failure changes nothing.
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid parameter.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    // SAFETY: `arg` is the Box made in `start_writer`, handed to this thread alone.
    let rx = unsafe { Box::from_raw(arg as *mut Receiver<Msg>) };
    // Symbol lookups that may fail are made here: a failed dlsym leaves a malloc'd message in
    // the calling thread, which that thread's next dl* call frees; in a program thread that
    // free would be recorded without its allocation. The message is left in this thread's
    // dlerror state (per thread), not taken with dlerror(): that formats it through gettext,
    // which outside the C locale reads LANGUAGE from the environment, and the program may be
    // rewriting its environment at this moment (bash does; this thread crashed reading the
    // array bash had just freed). Every library of the program is loaded by now (the writer
    // starts from the library constructor): is it a Python interpreter?
    let _ = dl_find_object(false);
    crate::python::detect();
    if let Some(rec) = recorder() {
        writer::run(rec, *rx);
    }
    std::ptr::null_mut()
}

/// Sends to the writer. Back-pressure: while the writer is behind, the thread sleeps on a futex
/// until the writer has taken a message (`room_made`); polling every 50 us instead, 256 threads
/// kept the kernel's scheduler busy for seconds and starved the writer. Not crossbeam's blocking
/// send: it parks through `std::thread::current()`, which panics in a thread whose TLS is being
/// torn down (an exiting thread's last events come here), and elsewhere gives the program
/// thread a thread-local that std frees outside the guard. Given up after 10 s rather than hang.
pub(crate) fn send(rec: &Recorder, mut m: Msg) {
    let start = Instant::now();
    loop {
        let seen = ROOM.load(Ordering::SeqCst);
        match rec.tx.try_send(m) {
            Ok(()) => return,
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
            Err(crossbeam_channel::TrySendError::Full(back)) => m = back,
        }
        if start.elapsed() > SEND_PATIENCE {
            return;
        }
        WAITERS.fetch_add(1, Ordering::SeqCst);
        // Room made since `seen` (after the failed try) changes ROOM: the wait returns at once.
        futex_wait(&ROOM, seen, Duration::from_millis(10));
        WAITERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a thread waits for room in the writer's queue.
const SEND_PATIENCE: Duration = Duration::from_secs(10);
/// Bumped by the writer each time it takes a message while threads wait for room.
static ROOM: AtomicU32 = AtomicU32::new(0);
/// Threads waiting in `send` for room in the queue.
static WAITERS: AtomicU32 = AtomicU32::new(0);

/// The writer took a message from the queue: one waiting thread may send.
#[inline]
pub(crate) fn room_made() {
    if WAITERS.load(Ordering::SeqCst) != 0 {
        ROOM.fetch_add(1, Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE on a static word; wakes at most one waiter, fails harmlessly.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                ROOM.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            )
        };
    }
}

/// Sleeps while `word` holds `expected`, for at most `timeout` (or until a signal).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // A wait may be cut short by a signal, which sets errno.
    let _errno = SaveErrno::new();
    // SAFETY: FUTEX_WAIT on a static word with a relative timeout; returns on a wake, a
    // timeout, a signal, or at once when the word no longer holds `expected`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

// ---------------------------------------------------------------- per-thread state

/// The part of a thread's state the writer may take: the chunk being filled.
pub(crate) struct ChunkBuf {
    /// None when no buffer could be mapped: events are then dropped (and counted as lost by the
    /// reader's consistency checks) rather than risking the program.
    pub data: Option<MapBuf>,
    pub open: bool,
    /// Event time (clock units) when the chunk was opened.
    pub opened_at: u64,
    last_seq: u64,
    last_time: u64,
    last_addr: u64,
}

impl ChunkBuf {
    fn new(data: Option<MapBuf>) -> Self {
        ChunkBuf {
            data,
            open: false,
            opened_at: 0,
            last_seq: 0,
            last_time: 0,
            last_addr: 0,
        }
    }

    /// Frames the open chunk and returns it as (buffer, offset of its first byte).
    pub fn take_framed(&mut self, replacement: Option<MapBuf>) -> Option<(MapBuf, usize)> {
        if !self.open {
            return None;
        }
        self.open = false;
        let mut data = std::mem::replace(&mut self.data, replacement)?;
        let payload_len = data.len() - MAX_FRAME_PREFIX;
        let mut prefix = [0u8; MAX_FRAME_PREFIX];
        let mut n = 1;
        prefix[0] = record::EVENTS;
        let mut v = payload_len as u64;
        while v >= 0x80 {
            prefix[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        prefix[n] = v as u8;
        n += 1;
        let start = MAX_FRAME_PREFIX - n;
        data.as_mut_slice()[start..MAX_FRAME_PREFIX].copy_from_slice(&prefix[..n]);
        Some((data, start))
    }

    /// Takes the next sequence number and time and opens the chunk if needed.
    #[inline]
    fn begin_event(&mut self, tid: u32) -> (u64, u64) {
        let seq = next_seq();
        let time = clock::event_time();
        if !self.open {
            if let Some(d) = self.data.as_mut() {
                d.zeroed(MAX_FRAME_PREFIX);
                ChunkHeader {
                    tid,
                    base_seq: seq,
                    base_time: time,
                }
                .encode(d);
            }
            self.open = true;
            self.opened_at = time;
            self.last_seq = seq;
            self.last_time = time;
            self.last_addr = 0;
        }
        (seq, time)
    }

    /// The deltas of an event's head from the previous event, which becomes this one.
    #[inline(always)]
    fn head_deltas(&mut self, seq: u64, time: u64, addr: u64) -> (u64, u64, i64) {
        let d = (
            seq - self.last_seq,
            time.saturating_sub(self.last_time),
            addr.wrapping_sub(self.last_addr) as i64,
        );
        self.last_seq = seq;
        self.last_time = time.max(self.last_time);
        self.last_addr = addr;
        d
    }
}

/// Only the owning thread touches this (or the orphan path, under its mutex).
pub(crate) struct OwnerState {
    unw: Option<Arc<Unw>>,
    ranges: Arc<[(u64, u64)]>,
    /// The outermost frame of the last stack, known to lie in a recorded module (`_start` or
    /// `clone3` for nearly every stack): checking it again costs one comparison.
    known_outer: u64,
    /// An outermost frame that no loaded module holds (JIT code): not looked up again.
    unknown_outer: u64,
    unw_gen: u64,
    walker: Walker,
    stack_hi: u64,
    new_nodes: Vec<(u32, u32, u64)>,
    /// Python code objects this thread has met: address -> (id, identity).
    py_codes: CodeIds,
    py_frames: Vec<python::PyFrame>,
    /// The Python frames' runs, innermost first: `py_frames[start..end]` each.
    py_runs: Vec<(usize, usize)>,
    /// The stack being interned in a Python process, outermost first (see `MixKey`).
    mix: Vec<MixKey>,
    /// The previous such stack and its trie nodes: a new stack keeps the nodes of the outer
    /// part they share (all but a few innermost frames, nearly always).
    mix_prev: Vec<MixKey>,
    mix_nodes: Vec<u32>,
    /// Stacks made recently, by a hash of their native and Python frames (see `mixed_stack`);
    /// empty until first used.
    mix_memo: Box<[MemoSlot]>,
}

/// Slots of `OwnerState::mix_memo`, direct-mapped (64 KiB a Python thread).
const MIX_MEMO: usize = 4096;
/// A 64-bit hash of a mixed stack's frames, and the stack's trie node. A lookup compares with
/// the one key in its slot: a false match takes a 64-bit coincidence, about once in 10^19
/// allocations.
type MemoSlot = (u64, u32);

/// How many leading frames two stacks share. Four at a time: a deep stack's shared outer part is
/// compared on every event.
#[inline]
fn common_prefix(a: &[MixKey], b: &[MixKey]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 4 <= n && a[i..i + 4] == b[i..i + 4] {
        i += 4;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// A frame of a stack with Python frames in place: a native return address, `(ip, NATIVE)`;
/// or a Python frame, `(code object, last instruction | entry << 32)`, compared before its code
/// object's id is looked up.
type MixKey = (u64, u64);
const NATIVE: u64 = u64::MAX;

impl OwnerState {
    fn new() -> Self {
        OwnerState {
            unw: None,
            ranges: Arc::new([]),
            known_outer: 0,
            unknown_outer: 0,
            unw_gen: 0,
            walker: Walker::new(),
            stack_hi: unwind::current_stack_top(),
            new_nodes: Vec::new(),
            py_codes: FastMap::default(),
            py_frames: Vec::new(),
            py_runs: Vec::new(),
            mix: Vec::new(),
            mix_prev: Vec::new(),
            mix_nodes: Vec::new(),
            mix_memo: Box::default(),
        }
    }

    /// The stack of an allocation: its native frames, and in a Python process the Python
    /// frames each evaluation loop was running, in that loop's place.
    fn stack_id(&mut self, rec: &Recorder, caller: Origin) -> u32 {
        let py = python::enabled();
        self.walker.set_interning(!py);
        let id = self.native_stack_id(rec, caller);
        if !py {
            return id;
        }
        self.mixed_stack(rec)
    }

    /// Interns the last walk's native frames (`walker.ips`) with the thread's Python frames
    /// each just outside the evaluation loop that runs them: the innermost run goes with the
    /// innermost loop, and so on outwards (runs beyond the loops found, when the native stack
    /// was cut short, go at the root end). The reader shows a run in place of its loop, whose
    /// frame stays for the functions inlined into it at the call. Interleaved so, stacks share
    /// their outer parts in the trie; with every Python frame under the whole native stack
    /// instead, each new native path (a nested import) copied the whole Python stack: millions
    /// of nodes at a large program's start. The innermost frame is always native, which tells
    /// this layout from the older one for the reader. Where the loop's code is not known, the
    /// Python frames come at the leaf end (that older layout).
    #[inline(never)]
    fn mixed_stack(&mut self, rec: &Recorder) -> u32 {
        if self.py_frames.is_empty() {
            self.py_frames = vec![python::PyFrame::default(); python::MAX_PY_FRAMES];
        }
        let n = python::read_frames(&mut self.py_frames);
        // The same native frames with the same Python frames make the same stack: a loop that
        // allocates from a few places finds its stacks here, with no frame compared or looked
        // up. Code objects count with their identity (as in `code_id`), and both frame counts
        // go in, so one split of a sequence cannot pass for another.
        let ips = &self.walker.ips;
        let mut h = walker::frame_hash(self.walker.ips_hash, (ips.len() as u64) << 32 | n as u64);
        for f in &self.py_frames[..n] {
            let (qualname, linetable) = python::code_identity(f.code);
            h = walker::frame_hash(h, f.code as u64);
            h = walker::frame_hash(h, f.lasti as u64 | (f.entry as u64) << 32);
            h = walker::frame_hash(h, qualname as u64 ^ (linetable as u64).rotate_left(32));
        }
        if self.mix_memo.is_empty() {
            // Made on the heap directly: an array built in this frame would make every call
            // probe 64 KiB of stack.
            self.mix_memo = vec![(0, 0); MIX_MEMO].into_boxed_slice();
        }
        let memo = &self.mix_memo;
        let slot = (h >> (64 - MIX_MEMO.trailing_zeros())) as usize;
        if memo[slot].0 == h && memo[slot].1 != 0 {
            return memo[slot].1;
        }
        python::note_native_stack(&self.walker.ips);
        // Runs, innermost first: each ends (outwards) at an entry frame.
        self.py_runs.clear();
        let mut start = 0;
        for (i, f) in self.py_frames[..n].iter().enumerate() {
            if f.entry || i + 1 == n {
                self.py_runs.push((start, i + 1));
                start = i + 1;
            }
        }
        let key = |f: &python::PyFrame| -> MixKey {
            (f.code as u64, f.lasti as u64 | (f.entry as u64) << 32)
        };
        let (frames, runs, ips) = (&self.py_frames, &self.py_runs, &self.walker.ips);
        let mix = &mut self.mix;
        mix.clear();
        mix.reserve(ips.len() + n);
        let push_run = |mix: &mut Vec<MixKey>, r: (usize, usize)| {
            mix.extend(frames[r.0..r.1].iter().rev().map(key));
        };
        if let Some(eval) = python::eval_loop() {
            // One comparison per frame: `ip - start` below the length.
            let (lo, len) = (*eval.start(), eval.end() - eval.start());
            let is_loop = |ip: u64| ip.wrapping_sub(lo) <= len;
            let loops = ips.iter().filter(|&&ip| is_loop(ip)).count();
            for &r in runs.iter().skip(loops).rev() {
                push_run(mix, r);
            }
            let mut seen = 0;
            for &ip in ips {
                if is_loop(ip) {
                    seen += 1;
                    if let Some(&r) = runs.get(loops - seen) {
                        push_run(mix, r);
                    }
                }
                mix.push((ip, NATIVE));
            }
        } else {
            mix.extend(ips.iter().map(|&ip| (ip, NATIVE)));
            for &r in runs.iter().rev() {
                push_run(mix, r);
            }
        }
        // The outer part the previous stack had too keeps its nodes.
        let same = common_prefix(&self.mix, &self.mix_prev);
        self.mix_nodes.truncate(same);
        let mut node = self.mix_nodes.last().copied().unwrap_or(0);
        for i in same..self.mix.len() {
            let k = self.mix[i];
            let ip = if k.1 == NATIVE {
                k.0
            } else {
                let id = self.code_id(rec, k.0 as usize);
                let f = python::PyFrame {
                    code: k.0 as usize,
                    lasti: k.1 as u32,
                    entry: k.1 >> 32 != 0,
                };
                python::frame_ip(&f, id)
            };
            let mut intern = interner(rec, &mut self.new_nodes);
            node = self.walker.child(node, ip, &mut intern);
            self.mix_nodes.push(node);
        }
        std::mem::swap(&mut self.mix, &mut self.mix_prev);
        self.mix_memo[slot] = (h, node);
        node
    }

    /// The id of a code object, described in a `PYCODE` record the first time it is met (or
    /// when another code object has since taken its address).
    fn code_id(&mut self, rec: &Recorder, code: usize) -> u32 {
        let identity = python::code_identity(code);
        if let Some(&(id, known)) = self.py_codes.get(&code) {
            if known == identity {
                return id;
            }
        }
        let _errno = SaveErrno::new();
        let (id, new) = match rec.pycodes.lock() {
            Ok(mut g) => match g.0.get(&code) {
                Some(&(id, known)) if known == identity => (id, false),
                _ => {
                    let id = g.1;
                    g.1 += 1;
                    g.0.insert(code, (id, identity));
                    (id, true)
                }
            },
            Err(_) => return 0,
        };
        if new {
            let mut framed = Vec::new();
            memtrack_format::put_record(
                &mut framed,
                record::PYCODE,
                &python::describe(code, id).encode(),
            );
            rec.send_raw(framed);
        }
        if self.py_codes.len() >= 1 << 16 {
            self.py_codes.clear();
        }
        self.py_codes.insert(code, (id, identity));
        id
    }

    /// Unwinds the stack (from `caller` when the hook captured it, else from here, dropping the
    /// tracker's own frames) and interns it; new trie nodes land in `self.new_nodes`.
    fn native_stack_id(&mut self, rec: &Recorder, caller: Origin) -> u32 {
        let gen = rec.unw_gen.load(Ordering::Acquire);
        if gen != self.unw_gen {
            let _errno = SaveErrno::new();
            if let Ok(m) = rec.modules.lock() {
                self.unw = m.unw.clone();
                self.ranges = m.ranges.clone();
            }
            self.unw_gen = gen;
            self.known_outer = 0;
            self.walker.invalidate();
        }
        // Taken out and put back rather than cloned: an Arc clone is two locked instructions.
        let Some(unw) = self.unw.take() else {
            return 0;
        };
        let (id, outer) = self.walk(rec, &unw, caller);
        self.unw = Some(unw);
        // framehop may end "cleanly" on a frame of unknown code: check the outermost frame.
        if outer == 0 || outer == self.known_outer || outer == self.unknown_outer {
            return id;
        }
        if self
            .ranges
            .iter()
            .any(|&(lo, hi)| outer >= lo && outer < hi)
        {
            self.known_outer = outer;
            return id;
        }
        let _errno = SaveErrno::new();
        let Some(newer) = refresh_if_new_module(rec, outer) else {
            self.unknown_outer = outer;
            return id;
        };
        // A module loaded since the last refresh (dlopen): unwind again through it.
        self.unw_gen = rec.unw_gen.load(Ordering::Acquire);
        if let Ok(m) = rec.modules.lock() {
            self.ranges = m.ranges.clone();
        }
        self.walker.invalidate();
        self.unw = Some(newer.clone());
        self.walk(rec, &newer, caller).0
    }

    fn walk(&mut self, rec: &Recorder, unw: &Unw, caller: Origin) -> (u32, u64) {
        let mut intern = interner(rec, &mut self.new_nodes);
        match caller {
            Origin::Caller(c) => {
                let w = self.walker.walk(unw, self.stack_hi, c, &mut intern);
                (w.node, w.outer)
            }
            Origin::Above(start, marker) => {
                let w = self
                    .walker
                    .walk_above(unw, self.stack_hi, start, marker, &mut intern);
                (w.node, w.outer)
            }
            Origin::Unknown => {
                let mut frames = [0u64; MAX_FRAMES];
                let (n, _) = unwind::capture(
                    unw,
                    &mut UnwCache::new(),
                    self.stack_hi,
                    rec.skip,
                    &mut frames,
                );
                let outer = if n > 0 { frames[n - 1] } else { 0 };
                (self.walker.intern_frames(&frames[..n], &mut intern), outer)
            }
        }
    }
}

/// Interns a trie node in the process-wide table; new nodes are listed in `new_nodes`.
fn interner<'a>(
    rec: &'a Recorder,
    new_nodes: &'a mut Vec<(u32, u32, u64)>,
) -> impl FnMut(u32, u64) -> u32 + 'a {
    move |parent, ip| {
        // A contended lock may sleep in futex(), which sets errno.
        let _errno = SaveErrno::new();
        match rec.trie.lock() {
            Ok(mut t) => t.intern_node(parent, ip, new_nodes),
            Err(_) => 0,
        }
    }
}

#[repr(C)]
struct DlFindObject {
    flags: u64,
    map_start: *mut libc::c_void,
    map_end: *mut libc::c_void,
    link_map: *mut libc::c_void,
    eh_frame: *mut libc::c_void,
    reserved: [u64; 7],
}

type DlFindObjectFn = unsafe extern "C" fn(*mut libc::c_void, *mut DlFindObject) -> libc::c_int;

/// glibc 2.35+'s lock-free `_dl_find_object`, if present.
/// `take_error`: on a program thread, a failed lookup's message is taken with dlerror(), so the
/// program's next dlerror() does not report it; the writer thread leaves it (see
/// `writer_entry`).
fn dl_find_object(take_error: bool) -> Option<DlFindObjectFn> {
    static F: OnceLock<usize> = OnceLock::new();
    let f = *F.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope.
        unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"_dl_find_object".as_ptr()) as usize;
            if f == 0 && take_error {
                libc::dlerror();
            }
            f
        }
    });
    // SAFETY: a non-null result is the address of `_dl_find_object`, of this signature.
    (f != 0).then(|| unsafe { std::mem::transmute::<usize, DlFindObjectFn>(f) })
}

/// When `addr` lies in a loaded module that the current module list lacks, refreshes the list
/// and returns the new unwinder.
fn refresh_if_new_module(rec: &Recorder, addr: u64) -> Option<Arc<Unw>> {
    // Without `_dl_find_object` (glibc < 2.35) a new module is only seen at the next dlclose.
    let find = dl_find_object(true)?;
    let mut res = DlFindObject {
        flags: 0,
        map_start: std::ptr::null_mut(),
        map_end: std::ptr::null_mut(),
        link_map: std::ptr::null_mut(),
        eh_frame: std::ptr::null_mut(),
        reserved: [0; 7],
    };
    // SAFETY: lock-free lookup that only fills `res`.
    if unsafe { find(addr as *mut libc::c_void, &mut res) } != 0 {
        return None;
    }
    rec.refresh_modules();
    rec.modules.lock().ok().and_then(|m| m.unw.clone())
}

pub(crate) struct ThreadState {
    /// The owning thread is inside an event (it holds `buf`).
    busy: AtomicBool,
    /// Another thread (the writer's sweep, `finish`) holds or wants `buf`.
    claim: AtomicBool,
    buf: UnsafeCell<ChunkBuf>,
    /// The thread has exited (its owner state is gone, see `thread_exit`).
    pub dead: AtomicBool,
    tid: u32,
    owner: UnsafeCell<ManuallyDrop<OwnerState>>,
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        if !*self.dead.get_mut() {
            // SAFETY: not dropped by `thread_exit` (which sets `dead` after), and never used again.
            unsafe { ManuallyDrop::drop(self.owner.get_mut()) };
        }
    }
}

// SAFETY: `buf` is only touched by the holder of a `BufGuard` (see `ThreadState::lock`);
// `owner` only by the owning thread.
unsafe impl Sync for ThreadState {}
// SAFETY: as above; the state moves between threads only inside an Arc.
unsafe impl Send for ThreadState {}

pub(crate) struct BufGuard<'a> {
    ts: &'a ThreadState,
    /// Held by the owning thread (else by a claimer).
    owner: bool,
}

impl std::ops::Deref for BufGuard<'_> {
    type Target = ChunkBuf;
    fn deref(&self) -> &ChunkBuf {
        // SAFETY: the lock is held for the guard's lifetime.
        unsafe { &*self.ts.buf.get() }
    }
}
impl std::ops::DerefMut for BufGuard<'_> {
    fn deref_mut(&mut self) -> &mut ChunkBuf {
        // SAFETY: the lock is held for the guard's lifetime.
        unsafe { &mut *self.ts.buf.get() }
    }
}
impl Drop for BufGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if self.owner {
            self.ts.busy.store(false, Ordering::Release);
        } else {
            self.ts.claim.store(false, Ordering::Release);
        }
    }
}

impl ThreadState {
    fn new(buf: Option<MapBuf>, tid: u32) -> Self {
        ThreadState {
            busy: AtomicBool::new(false),
            claim: AtomicBool::new(false),
            buf: UnsafeCell::new(ChunkBuf::new(buf)),
            dead: AtomicBool::new(false),
            tid,
            owner: UnsafeCell::new(ManuallyDrop::new(OwnerState::new())),
        }
    }

    /// The owning thread takes its buffer for one event. Dekker's handshake with
    /// [`ThreadState::claim`]: the owner's side is a plain store and a compiler fence (the
    /// claimer's `membarrier` orders it), so an event pays no locked instruction.
    #[inline]
    fn lock(&self) -> BufGuard<'_> {
        loop {
            self.busy.store(true, Ordering::Relaxed);
            light_barrier();
            if !self.claim.load(Ordering::Acquire) {
                return BufGuard {
                    ts: self,
                    owner: true,
                };
            }
            self.busy.store(false, Ordering::Release);
            while self.claim.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        }
    }

    /// Another thread asks for the buffer; it gets it with [`ThreadState::claimed`] after a
    /// [`heavy_barrier`], unless the owner is inside an event. Claims are made under the
    /// registry lock, so there is one claimer at a time.
    fn request(&self) -> bool {
        !self.claim.swap(true, Ordering::Acquire)
    }

    /// After `request` and a heavy barrier: the buffer, or None (the claim withdrawn) when the
    /// owner is inside an event.
    fn claimed(&self) -> Option<BufGuard<'_>> {
        if self.busy.load(Ordering::Acquire) {
            self.claim.store(false, Ordering::Release);
            return None;
        }
        Some(BufGuard {
            ts: self,
            owner: false,
        })
    }
}

/// `membarrier(2)` commands.
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// True when this process registered for expedited `membarrier`: then the threads' side of
/// every handshake is a compiler fence, and the rare other side pays the syscall.
static ASYM: AtomicBool = AtomicBool::new(false);

/// Registers the process for `membarrier` (once per process image, and again in a forked
/// child: registration belongs to the address space).
/// `MEMTRACK_NO_MEMBARRIER=1` keeps to fences (for sandboxes where the syscall misbehaves; the
/// tests run both ways).
fn register_membarrier() {
    if crate::env::getenv(c"MEMTRACK_NO_MEMBARRIER").is_some() {
        ASYM.store(false, Ordering::Release);
        return;
    }
    // SAFETY: membarrier with a command and flags 0 has no memory-safety preconditions.
    let ok = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
            0,
            0,
        )
    } == 0;
    ASYM.store(ok, Ordering::Release);
}

#[inline(always)]
fn light_barrier() {
    if ASYM.load(Ordering::Relaxed) {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    } else {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// Orders this thread's earlier stores before every other thread's later loads, as a full fence
/// on all of them would. False when that could not be done (nothing may then be assumed).
fn heavy_barrier() -> bool {
    std::sync::atomic::fence(Ordering::SeqCst);
    if !ASYM.load(Ordering::Acquire) {
        return true;
    }
    let _errno = SaveErrno::new();
    // SAFETY: as in `register_membarrier`.
    unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0 }
}

/// Claims the buffers of the `threads` that `wanted` picks (by index) with one heavy barrier:
/// each entry is the buffer, or None when its owner was inside an event or it was not picked.
/// The caller holds the registry lock.
pub(crate) fn claim_all(
    threads: &[Arc<ThreadState>],
    wanted: impl Fn(usize) -> bool,
) -> Vec<Option<BufGuard<'_>>> {
    let asked: Vec<bool> = threads
        .iter()
        .enumerate()
        .map(|(i, ts)| wanted(i) && ts.request())
        .collect();
    let fenced = heavy_barrier();
    threads
        .iter()
        .zip(asked)
        .map(|(ts, asked)| match (asked, fenced) {
            (false, _) => None,
            (true, false) => {
                ts.claim.store(false, Ordering::Release);
                None
            }
            (true, true) => ts.claimed(),
        })
        .collect()
}

const EXITED: *const ThreadState = std::ptr::dangling::<ThreadState>();

#[inline]
fn current_thread(rec: &'static Recorder, g: &IgnoreAllocs) -> Option<&'static ThreadState> {
    let p = g.tls().current.get() as *const ThreadState;
    if p == EXITED {
        return None;
    }
    if !p.is_null() {
        // SAFETY: a live ThreadState stays allocated while CURRENT points to it (the Arc
        // reference given up by `into_raw` is dropped only in `thread_exit`).
        return Some(unsafe { &*p });
    }
    new_thread_state(rec, g)
}

#[cold]
fn new_thread_state(rec: &'static Recorder, g: &IgnoreAllocs) -> Option<&'static ThreadState> {
    let _errno = SaveErrno::new();
    if WRITER_LATER.swap(false, Ordering::AcqRel) {
        // A forked child's first event may come long after the fork: its clock has not
        // ticked yet (the writer starts now), so the event would read time 0.
        clock::tick();
        start_writer();
    }
    // SAFETY: gettid has no preconditions.
    let ts = Arc::new(ThreadState::new(
        rec.fresh_buffer(),
        unsafe { libc::gettid() } as u32,
    ));
    if let Ok(mut r) = rec.registry.lock() {
        if !r.is_empty() {
            go_multi(&r);
        }
        r.push(ts.clone());
        set_thread_count(r.len());
    } else {
        return None;
    }
    let raw = Arc::into_raw(ts);
    g.tls().current.set(raw as *const ());
    // SAFETY: the key was created in `start`; the value is our own pointer.
    unsafe { libc::pthread_setspecific(rec.thread_key, raw as *const libc::c_void) };
    // SAFETY: just stored; see above.
    Some(unsafe { &*raw })
}

/// In a child forked under `--follow-fork`, before its fresh recorder starts: the forking
/// thread's state belongs to the parent's capture (its buffered events are the parent's), so
/// it is dropped from this thread, unwritten.
pub(crate) fn leave_parent(old: &Recorder, g: &IgnoreAllocs) {
    g.tls().current.set(std::ptr::null());
    // SAFETY: clears this thread's value of the parent recorder's key, so its destructor never
    // hands the parent's buffer to the child's writer.
    unsafe { libc::pthread_setspecific(old.thread_key, std::ptr::null()) };
}

/// pthread key destructor: the thread is exiting. Hand its buffer to the writer; later events of
/// this thread (other TLS destructors) take the orphan path.
unsafe extern "C" fn thread_exit(p: *mut libc::c_void) {
    let Some(g) = IgnoreAllocs::enter() else {
        return;
    };
    let _errno = SaveErrno::new();
    g.tls().current.set(EXITED as *const ());
    if p.is_null() {
        return;
    }
    // SAFETY: `p` is the pointer from `Arc::into_raw` in `current_thread`; this drops that ref.
    let ts = unsafe { Arc::from_raw(p as *const ThreadState) };
    // The thread's own state (its walker's caches, some 100 KiB) goes now, on this thread, not
    // at the writer's next sweep: a program that starts threads by the thousand held a sweep
    // interval's worth of them (180 MB at 5,000 threads a second).
    // SAFETY: only this thread touches its owner state, and it no longer will: `current` says
    // it has exited, so its later events take the orphan path; `dead` tells `Drop` it is gone.
    unsafe { ManuallyDrop::drop(&mut *ts.owner.get()) };
    let taken = ts.lock().take_framed(None);
    ts.dead.store(true, Ordering::Release);
    if let (Some(rec), Some((data, start))) = (recorder(), taken) {
        hand_off(rec, data, start);
    }
}

/// Hands the calling thread's open chunk to the writer (outside any event of the thread).
#[cold]
#[inline(never)]
fn flush_own(rec: &Recorder, ts: &ThreadState) {
    // No buffer in its place until the thread's next event: a thread waiting in `send` for
    // room in the writer's queue would otherwise hold two.
    let taken = ts.lock().take_framed(None);
    if let Some((data, start)) = taken {
        hand_off(rec, data, start);
    }
}

/// The compact encoding of a framed events chunk (None: not a chunk, or not transcodable).
fn compact_framed(c: &mut memtrack_format::Transcoder, framed: &[u8]) -> Option<Vec<u8>> {
    use memtrack_format::{next_record, Next};
    let Next::Record(r) = next_record(framed, 0) else {
        return None;
    };
    let mut out = Vec::with_capacity(framed.len() / 3);
    c.transcode(r.payload, 1, &mut out).ok()?;
    Some(out)
}

/// Chunks queued for the writer from which on a program thread transcodes its own: 8, or
/// `MEMTRACK_WRITER_BEHIND` (0: always; the tests use it to run that path on every chunk).
static WRITER_BEHIND: AtomicUsize = AtomicUsize::new(8);

fn read_writer_behind() {
    let v = crate::env::getenv(c"MEMTRACK_WRITER_BEHIND");
    if let Some(n) = v.and_then(|v| v.to_str().ok()?.parse().ok()) {
        WRITER_BEHIND.store(n, Ordering::Relaxed);
    }
}

fn hand_off(rec: &Recorder, data: MapBuf, start: usize) {
    let _errno = SaveErrno::new();
    if rec.writer_started.load(Ordering::Acquire) {
        // The writer is behind: the program's threads outnumber the cores and it gets its
        // fair share of one, less than transcoding takes. Left alone, the chunks pile up (up to
        // the queue's 64, some 20 MB, and then the threads wait) and are transcoded after the
        // program's threads are done, on one core while the others idle. So a thread
        // transcodes its own chunk (one at a time, beside the writer) and hands over only the
        // bytes to write.
        if rec.tx.len() >= WRITER_BEHIND.load(Ordering::Relaxed) {
            if let Ok(mut c) = rec.helper.try_lock() {
                if let Some(out) = compact_framed(&mut c, &data.as_slice()[start..]) {
                    drop(c);
                    rec.recycle(data);
                    send(rec, Msg::Raw(out));
                    return;
                }
            }
        }
        send(rec, Msg::Chunk(data, start));
    } else {
        rec.write_chunk(&data.as_slice()[start..]);
        rec.recycle(data);
    }
}

// ---------------------------------------------------------------- recording entry points

/// What to record.
#[derive(Clone, Copy)]
pub(crate) enum Ev {
    Alloc(AllocKind, u64, u64),
    Free(u64),
    ReallocFree(u64),
    ReallocFailed,
}

/// Where an allocation's stack starts.
#[derive(Clone, Copy)]
pub(crate) enum Origin {
    /// The program's registers, handed over by a preload trampoline.
    Caller(Caller),
    /// The caller of the function whose frame holds the address (a local of
    /// `Tracker::alloc`), unwound from the registers taken in that frame: the tracker linked
    /// into a Rust program.
    Above(Caller, u64),
    /// Unwound from the recorder, dropping the tracker's own frames (`Recorder::skip`).
    Unknown,
}

/// Records one event for the calling thread. The caller holds the guard.
#[inline]
pub(crate) fn record(ev: Ev, caller: Origin, g: &IgnoreAllocs) {
    let Some(rec) = recorder() else { return };
    match current_thread(rec, g) {
        Some(ts) => {
            // SAFETY: only this thread touches its owner state.
            let owner = unsafe { &mut *ts.owner.get() };
            let stack = match ev {
                Ev::Alloc(..) => owner.stack_id(rec, caller),
                _ => 0,
            };
            let room = event_room(owner.new_nodes.len());
            let mut b = ts.lock();
            if b.open && b.data.as_ref().is_some_and(|d| d.spare() < room) {
                // A chunk too full for this event is handed over first (never expected: chunks
                // are handed over at FLUSH_AT, far below the buffer's size).
                drop(b);
                flush_own(rec, ts);
                b = ts.lock();
            }
            if b.data.is_none() {
                // Handed over (`flush_own`), or taken by the writer's sweep while the thread
                // was idle: a thread holds no buffer between its chunks.
                b.data = rec.fresh_buffer();
            }
            let mark = encode(&mut b, ts.tid, ev, stack, &mut owner.new_nodes);
            let full = b
                .data
                .as_ref()
                .is_some_and(|d| d.len() >= FLUSH_LIMIT.load(Ordering::Relaxed));
            drop(b);
            if let Some(m) = mark {
                send_python_end(rec, m);
            }
            if full && rec.writer_started.load(Ordering::Relaxed) {
                flush_own(rec, ts);
            }
        }
        None => record_orphan(rec, ev, caller),
    }
}

/// Encodes one event; returns the `PYTHON_END` mark when interpreter shutdown began just before
/// it (the mark takes a sequence number of its own, below the event's), for the caller to send
/// once the buffer's lock is released.
#[inline(always)]
fn encode(
    b: &mut ChunkBuf,
    tid: u32,
    ev: Ev,
    stack: u32,
    nodes: &mut Vec<(u32, u32, u64)>,
) -> Option<PythonEndRecord> {
    let realloc_half = matches!(ev, Ev::Alloc(kind, ..) if kind.is_realloc());
    let mark = python::shutdown_claim(realloc_half).map(|how| PythonEndRecord {
        seq: next_seq(),
        time: clock::event_time(),
        how,
    });
    let (seq, time) = b.begin_event(tid);
    if let Some(d) = b.data.as_mut() {
        for &(id, parent, ip) in nodes.iter() {
            d.push_byte(op::STACK_NODE);
            put_uvarint(d, id as u64);
            put_uvarint(d, parent as u64);
            put_uvarint(d, ip);
        }
    }
    nodes.clear();
    let (opcode, addr, body) = match ev {
        Ev::Alloc(kind, addr, size) => (op::ALLOC_BASE + kind as u8, addr, Some((size, stack))),
        Ev::Free(addr) => (op::FREE, addr, None),
        Ev::ReallocFree(addr) => (op::REALLOC_FREE, addr, None),
        Ev::ReallocFailed => (op::REALLOC_FAILED, b.last_addr, None),
    };
    let (dseq, dtime, daddr) = b.head_deltas(seq, time, addr);
    if let Some(d) = b.data.as_mut() {
        // Written in place: no copy, and the buffer's length is stored once.
        let mut t = d.tail();
        t.push_byte(opcode);
        put_uvarint(&mut t, dseq);
        put_uvarint(&mut t, dtime);
        put_ivarint(&mut t, daddr);
        if let Some((size, stack)) = body {
            put_uvarint(&mut t, size);
            put_uvarint(&mut t, stack as u64);
        }
        t.commit();
    }
    mark
}

/// Writes the mark of interpreter shutdown (see `python::shutdown_claim`).
#[cold]
fn send_python_end(rec: &Recorder, m: PythonEndRecord) {
    let _errno = SaveErrno::new();
    let mut framed = Vec::new();
    memtrack_format::put_record(&mut framed, record::PYTHON_END, &m.encode());
    rec.send_raw(framed);
}

/// Bytes one event may take in the stream encoding, stack nodes included.
fn event_room(nodes: usize) -> usize {
    64 + nodes * 32
}

/// Events of a thread that has no state (exiting, after its destructor ran): each becomes a
/// one-event chunk of its own.
#[cold]
fn record_orphan(rec: &Recorder, ev: Ev, caller: Origin) {
    let _errno = SaveErrno::new();
    let Ok(mut guard) = rec.orphan.lock() else {
        return;
    };
    if !MULTI.load(Ordering::Relaxed) {
        if let Ok(r) = rec.registry.lock() {
            go_multi(&r);
        }
    }
    let owner = guard.get_or_insert_with(|| Box::new(OwnerState::new()));
    owner.stack_hi = unwind::current_stack_top();
    // Shared by exiting threads: never reuse another thread's walk.
    owner.walker.invalidate();
    let stack = match ev {
        Ev::Alloc(..) => owner.stack_id(rec, caller),
        _ => 0,
    };
    let mut b = ChunkBuf::new(rec.fresh_buffer());
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    let mark = encode(&mut b, tid, ev, stack, &mut owner.new_nodes);
    if let Some((data, start)) = b.take_framed(None) {
        drop(guard);
        hand_off(rec, data, start);
    }
    if let Some(m) = mark {
        send_python_end(rec, m);
    }
}

// ---------------------------------------------------------------- ending

/// Finishes the capture: every thread's buffered events are written, then an `END` record.
/// Later events are not recorded. Safe to call more than once; only the first call acts.
pub fn finish(reason: EndReason) {
    if !lifecycle::finish() {
        return;
    }
    let Some(rec) = recorder() else { return };
    let g = IgnoreAllocs::enter();
    let errno = SaveErrno::new();
    if rec.writer_started.load(Ordering::Acquire) {
        let done = Arc::new(AtomicBool::new(false));
        send(rec, Msg::Finish(reason, done.clone()));
        // Bounded wait: a writer stuck on a full disk must not hang the program's exit.
        for _ in 0..100_000 {
            if done.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    } else {
        writer::finish_inline(rec, reason);
    }
    drop(errno);
    drop(g);
}

pub(crate) fn end_record(rec: &Recorder, reason: EndReason) -> Vec<u8> {
    memtrack_format::EndRecord {
        seq: SEQ.0.load(Ordering::Relaxed),
        time: clock::now_units(),
        reason,
        next_stack_id: rec.trie.lock().map(|t| t.next_id()).unwrap_or(u32::MAX / 2),
    }
    .encode_framed()
}
