//! Per-thread recording: for each allocation event, the stack id, a sequence number and a
//! time, encoded into the thread's chunk; full chunks go to the hand-off. Also the recorder of
//! the process (set up by `session`), its start, the writer thread's start, and `finish`.
//!
//! Must never: write to the capture itself (the writer does, through the hand-off), or take a
//! lock or make a system call on the common path of an event.

use crate::capture_file::CaptureFile;
use crate::clock;
use crate::guard::{IgnoreAllocs, SaveErrno};
use crate::handoff::{self, seq, ChunkBuf, Handoff, ThreadSlot};
use crate::lifecycle;
use crate::mapbuf::MapBuf;
use crate::region::{self, SeenNames};
use crate::stack::unwind::{self, LoadedModule};
use crate::stack::{self, python, StackStart, Stacks, ThreadStacks};
use crate::writer::{self, FramedChunk, Inbox, Msg, Writer};
use crossbeam_channel::{Receiver, TryRecvError};
use memtrack_format::{
    record, AllocKind, EndReason, EndRecord, EventKind, PythonEndRecord, RegionNameRecord,
    StreamEncoder,
};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The recording of this process: its hand-off to the writer and its stack identification.
pub(crate) struct Recorder {
    /// The process that owns this recorder: a vfork child shares its memory but must not end
    /// its capture.
    pub pid: i32,
    handoff: Handoff,
    stacks: Stacks,
    /// The stack state of threads that record after their own state went (exiting threads).
    orphan: Mutex<Option<Box<ThreadStacks>>>,
    /// The capture of the launched process (`%p` expanded): forked children's captures are
    /// named after it (`<root>.<pid>`).
    pub root_path: String,
    /// `--follow-fork`: forked children record into captures of their own.
    pub follow_fork: bool,
    /// The region ids whose name this capture holds.
    region_names: SeenNames,
    /// The ids of mapped files whose `MAP_FILE` record this capture holds.
    map_files: SeenNames,
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

impl Recorder {
    /// Re-reads the module list and publishes a new unwinder.
    pub fn refresh_modules(&self) {
        self.stacks.refresh_modules(&self.handoff);
    }

    /// Called before a module may be unmapped.
    pub fn invalidate_modules(&self) {
        self.stacks.invalidate_modules();
    }

    /// The tracker runs as the preload library.
    pub fn preloaded(&self) -> bool {
        self.stacks.preloaded()
    }

    /// The module list, for a forked child (see `Stacks::modules_snapshot`).
    pub fn modules_snapshot(&self) -> Vec<LoadedModule> {
        self.stacks.modules_snapshot()
    }
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
    /// A new recording of a running process (`memtrack_start`): replaces a finished recorder,
    /// with its own clock and writer thread.
    pub new_session: bool,
}

/// The pthread key whose destructor hands an exiting thread's chunk over: one for the process
/// (keys are few), whichever recorder the thread's state belongs to.
static THREAD_KEY: std::sync::OnceLock<libc::pthread_key_t> = std::sync::OnceLock::new();

fn thread_key() -> Option<libc::pthread_key_t> {
    if let Some(k) = THREAD_KEY.get() {
        return Some(*k);
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: key is a valid out-pointer; the destructor is an extern "C" fn that never unwinds.
    if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } != 0 {
        return None;
    }
    // Only session set-up creates it, one thread at a time (under `Initializing`).
    Some(*THREAD_KEY.get_or_init(|| key))
}

/// Sets up recording into `cfg.fd`, whose header the caller has written. Runs inside the guard.
pub(crate) fn start(cfg: Config, start_mono_ns: u64) -> bool {
    if recorder().is_some() && !cfg.replace && !cfg.new_session {
        return false;
    }
    let modules = match cfg.modules {
        Some(m) => m,
        None => unwind::enumerate_modules(),
    };
    let stacks = Stacks::new(&modules, cfg.skip_own_module, cfg.first_stack_id);
    if thread_key().is_none() {
        return false;
    }
    let Some(file) = CaptureFile::adopt(cfg.fd) else {
        return false;
    };
    let rec = Recorder {
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() },
        handoff: Handoff::new(Writer::new(file, cfg.first_seq), cfg.first_seq),
        stacks,
        orphan: Mutex::new(None),
        root_path: cfg.root_path,
        follow_fork: cfg.follow_fork,
        region_names: SeenNames::new(),
        map_files: SeenNames::new(),
    };
    // A forked child: its times start from its own start; its writer starts at its first
    // event.
    clock::start_at(start_mono_ns, cfg.replace || cfg.new_session);
    if cfg.replace {
        WRITER_LATER.store(true, Ordering::Release);
    }
    let rec: &'static Recorder = Box::leak(Box::new(rec));
    RECORDER.store(rec as *const Recorder as *mut Recorder, Ordering::Release);
    rec.stacks.publish_first_modules(modules, &rec.handoff);
    true
}

/// Starts the writer thread, once. A raw pthread rather than `std::thread`: std's thread start
/// allocates (and registers TLS destructors on the parent) before our closure could enter the
/// guard. Signals are blocked in it so the program's handlers run on the program's threads.
pub(crate) fn start_writer() {
    let Some(rec) = recorder() else { return };
    let Some(rx) = rec.handoff.take_receiver() else {
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
            rec.handoff.mark_writer_started();
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
    stack::prepare_writer_thread();
    crate::inproc::writer_prepared();
    if let Some(rec) = recorder() {
        let inbox = WriterInbox { rec, rx: Some(*rx) };
        writer::run(&rec.handoff.writer, &inbox);
    }
    std::ptr::null_mut()
}

/// What the writer takes its work from: the queue's receiving end (none when the capture is
/// finished without a writer thread) and the recorder's hand-off and stacks.
struct WriterInbox {
    rec: &'static Recorder,
    rx: Option<Receiver<Msg>>,
}

impl Inbox for WriterInbox {
    fn take(&self) -> Result<Msg, TryRecvError> {
        let m = self
            .rx
            .as_ref()
            .ok_or(TryRecvError::Disconnected)?
            .try_recv()?;
        // Taking it makes room for a thread waiting to send.
        handoff::room_made();
        Ok(m)
    }

    fn queued(&self) -> usize {
        self.rx.as_ref().map_or(0, |rx| rx.len())
    }

    fn take_chunks(&self, force: bool, max_age: u64) -> Vec<FramedChunk> {
        self.rec
            .handoff
            .take_chunks(force, clock::event_time(), max_age)
    }

    fn recycle(&self, buf: MapBuf) {
        self.rec.handoff.recycle(buf);
    }

    fn end_record(&self, reason: EndReason) -> EndRecord {
        EndRecord {
            seq: seq::peek(),
            time: clock::now_units(),
            reason,
            next_stack_id: self.rec.stacks.next_stack_id(),
        }
    }

    fn seq_now(&self) -> u64 {
        seq::peek()
    }

    fn stop_due(&self) -> bool {
        crate::inproc::writer_stop_due()
    }
}

// ---------------------------------------------------------------- per-thread state

/// A recording thread's state, reached through its thread-local pointer. The slot is shared
/// with the hand-off's registry (which keeps it until its last chunk is written); the rest is
/// the thread's alone.
struct ThreadState {
    /// The recorder this state belongs to: a thread that recorded in an earlier session of a
    /// running process gets a fresh state in the next one.
    owner: *const Recorder,
    slot: Arc<ThreadSlot>,
    tid: u32,
    stacks: ThreadStacks,
}

/// The thread-local pointer of a thread whose state is gone (it is exiting).
const EXITED: *const ThreadState = std::ptr::dangling::<ThreadState>();

/// The calling thread's state, made at its first event; None once it is exiting. Exclusive for
/// as long as the guard is held: a thread holds one guard at a time, and only its holder
/// reaches the state.
#[inline]
#[allow(clippy::mut_from_ref)]
fn current_thread<'g>(rec: &'static Recorder, g: &'g IgnoreAllocs) -> Option<&'g mut ThreadState> {
    let p = g.tls().current.get() as *mut ThreadState;
    if std::ptr::eq(p, EXITED) {
        return None;
    }
    if !p.is_null() {
        // SAFETY: a live ThreadState stays allocated while CURRENT points to it (it is freed
        // only in `thread_exit` or below, which clear the pointer first), and only this thread,
        // inside the guard, uses it.
        let ts = unsafe { &mut *p };
        if std::ptr::eq(ts.owner, rec) {
            return Some(ts);
        }
        retire_thread_state(p, g);
    }
    new_thread_state(rec, g)
}

/// Drops this thread's state of a finished session (its buffered events belong to a capture
/// that has ended).
#[cold]
fn retire_thread_state(p: *mut ThreadState, g: &IgnoreAllocs) {
    g.tls().current.set(std::ptr::null());
    if let Some(key) = THREAD_KEY.get() {
        // SAFETY: clears this thread's value of the key before the state it names is freed.
        unsafe { libc::pthread_setspecific(*key, std::ptr::null()) };
    }
    // SAFETY: `p` came from `Box::into_raw` in `new_thread_state`; the thread's pointers to it
    // were just cleared, and only this thread used it.
    let ts = unsafe { Box::from_raw(p) };
    ts.slot.mark_dead();
}

#[cold]
#[allow(clippy::mut_from_ref)]
fn new_thread_state<'g>(
    rec: &'static Recorder,
    g: &'g IgnoreAllocs,
) -> Option<&'g mut ThreadState> {
    let _errno = SaveErrno::new();
    if WRITER_LATER.swap(false, Ordering::AcqRel) {
        // A forked child's first event may come long after the fork: its clock has not
        // ticked yet (the writer starts now), so the event would read time 0.
        clock::tick();
        start_writer();
    }
    let slot = Arc::new(ThreadSlot::new(rec.handoff.fresh_buffer()));
    let ts = Box::new(ThreadState {
        owner: rec,
        slot: slot.clone(),
        // SAFETY: gettid has no preconditions.
        tid: unsafe { libc::gettid() } as u32,
        stacks: ThreadStacks::new(),
    });
    if !rec.handoff.register(slot) {
        return None;
    }
    let raw = Box::into_raw(ts);
    g.tls().current.set(raw as *const ());
    if let Some(key) = THREAD_KEY.get() {
        // SAFETY: the key was created in `start`; the value is our own pointer.
        unsafe { libc::pthread_setspecific(*key, raw as *const libc::c_void) };
    }
    // SAFETY: just made; see `current_thread`.
    Some(unsafe { &mut *raw })
}

/// In a child forked under `--follow-fork`, before its fresh recorder starts: the forking
/// thread's state belongs to the parent's capture (its buffered events are the parent's), so
/// it is dropped from this thread, unwritten.
pub(crate) fn leave_parent(g: &IgnoreAllocs) {
    g.tls().current.set(std::ptr::null());
    if let Some(key) = THREAD_KEY.get() {
        // SAFETY: clears this thread's value of the key, so its destructor never hands the
        // parent's buffer to the child's writer.
        unsafe { libc::pthread_setspecific(*key, std::ptr::null()) };
    }
}

/// pthread key destructor: the thread is exiting. Hand its chunk to the writer; later events of
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
    // SAFETY: `p` is the pointer from `Box::into_raw` in `new_thread_state`, and the thread's
    // pointer to it was just cleared: nothing uses it any more.
    let ts = unsafe { Box::from_raw(p as *mut ThreadState) };
    let ThreadState {
        owner,
        slot,
        stacks,
        ..
    } = *ts;
    // The thread's stack state (its walker's caches) goes now, on this thread, not at the
    // writer's next sweep: a program that starts threads by the thousand would hold a sweep
    // interval's worth of them.
    drop(stacks);
    let taken = slot.lock().take_framed();
    slot.mark_dead();
    // Events of an earlier session's state belong to a capture that has ended.
    if let (Some(rec), Some(chunk)) = (recorder().filter(|r| std::ptr::eq(*r, owner)), taken) {
        rec.handoff.hand_off(chunk);
    }
}

// ---------------------------------------------------------------- recording entry points

/// An allocation event, its stack to be filled in by [`record`].
#[inline(always)]
pub(crate) fn alloc_event(kind: AllocKind, addr: u64, size: u64) -> EventKind {
    EventKind::Alloc {
        kind,
        addr,
        size,
        stack: 0,
    }
}

/// The stack field of the events that carry one.
#[inline(always)]
fn stack_of(ev: &mut EventKind) -> Option<&mut u32> {
    match ev {
        EventKind::Alloc { stack, .. }
        | EventKind::Map { stack, .. }
        | EventKind::Remap { stack, .. } => Some(stack),
        _ => None,
    }
}

/// The id of the mapped file `path` (never 0, which means anonymous); its `MAP_FILE` record
/// is sent the first time the capture meets it. The caller holds the guard.
pub(crate) fn map_file_id(path: &[u8]) -> u32 {
    let id = region::id_of(path);
    if let Some(rec) = recorder() {
        if rec.map_files.first_meeting(id) {
            let _errno = SaveErrno::new();
            let payload = memtrack_format::MapFileRecord {
                id,
                path: path.to_vec(),
            }
            .encode();
            let mut framed = Vec::new();
            memtrack_format::put_record(&mut framed, record::MAP_FILE, &payload);
            rec.handoff.send_record(framed);
        }
    }
    id
}

/// Records one event for the calling thread. The caller holds the guard.
#[inline]
pub(crate) fn record(mut ev: EventKind, start: StackStart, g: &IgnoreAllocs) {
    let Some(rec) = recorder() else { return };
    match current_thread(rec, g) {
        Some(ts) => {
            if let Some(stack) = stack_of(&mut ev) {
                *stack = ts.stacks.stack_id(&rec.stacks, &rec.handoff, start);
            }
            let room = event_room(ts.stacks.new_nodes().len());
            let slot = &*ts.slot;
            let mut b = slot.lock();
            if b.open && b.data.as_ref().is_some_and(|d| d.spare() < room) {
                // A chunk too full for this event is handed over first (never expected: chunks
                // are handed over well below the buffer's size).
                drop(b);
                rec.handoff.flush(slot);
                b = slot.lock();
            }
            if b.data.is_none() {
                // Handed over (`flush`), or taken by the writer's sweep while the thread was
                // idle: a thread holds no buffer between its chunks.
                b.data = rec.handoff.fresh_buffer();
            }
            let mark = encode(&mut b, ts.tid, ev, ts.stacks.new_nodes());
            let full = b.data.as_ref().is_some_and(|d| handoff::is_full(d.len()));
            drop(b);
            if let Some(m) = mark {
                send_python_end(rec, m);
            }
            if full && rec.handoff.writer_started() {
                rec.handoff.flush(slot);
            }
        }
        None => record_orphan(rec, ev, start),
    }
}

/// Records the begin of region `name` for the calling thread (its name first, when this capture
/// does not hold it yet). The caller holds the guard. No stack: a mark costs a sequence number,
/// a time and a few bytes.
#[inline]
pub(crate) fn region_begin(name: &[u8], g: &IgnoreAllocs) {
    let Some(rec) = recorder() else { return };
    let id = region::id_of(name);
    if rec.region_names.first_meeting(id) {
        send_region_name(rec, id, name);
    }
    record(EventKind::RegionBegin { region: id }, StackStart::Here, g);
}

/// Records the end of the calling thread's innermost open region. The caller holds the guard.
#[inline]
pub(crate) fn region_end(g: &IgnoreAllocs) {
    record(EventKind::RegionEnd, StackStart::Here, g);
}

/// Writes a `REGION_NAME` record (through the writer's queue, as `PYCODE` records go).
#[cold]
fn send_region_name(rec: &Recorder, id: u32, name: &[u8]) {
    let _errno = SaveErrno::new();
    let payload = RegionNameRecord {
        id,
        name: name.to_vec(),
    }
    .encode();
    let mut framed = Vec::new();
    memtrack_format::put_record(&mut framed, record::REGION_NAME, &payload);
    rec.handoff.send_record(framed);
}

/// Encodes one event; returns the `PYTHON_END` mark when interpreter shutdown began just before
/// it (the mark takes a sequence number of its own, below the event's), for the caller to send
/// once the buffer's lock is released.
#[inline(always)]
fn encode(
    b: &mut ChunkBuf,
    tid: u32,
    ev: EventKind,
    nodes: &mut Vec<(u32, u32, u64)>,
) -> Option<PythonEndRecord> {
    let realloc_half = matches!(ev, EventKind::Alloc { kind, .. } if kind.is_realloc());
    let mark = python::shutdown_claim(realloc_half).map(|how| PythonEndRecord {
        seq: seq::next(),
        time: clock::event_time(),
        how,
    });
    let (seq, time) = (seq::next(), clock::event_time());
    b.begin_event(tid, seq, time);
    let ChunkBuf { data, enc, .. } = b;
    if let Some(d) = data.as_mut() {
        for &(id, parent, ip) in nodes.iter() {
            StreamEncoder::node(d, id as u64, parent as u64, ip);
        }
        // Written in place: no copy, and the buffer's length is stored once.
        let mut t = d.tail();
        enc.event(&mut t, seq, time, ev);
        t.commit();
    }
    nodes.clear();
    mark
}

/// Writes the mark of interpreter shutdown (see `python::shutdown_claim`).
#[cold]
fn send_python_end(rec: &Recorder, m: PythonEndRecord) {
    let _errno = SaveErrno::new();
    let mut framed = Vec::new();
    memtrack_format::put_record(&mut framed, record::PYTHON_END, &m.encode());
    rec.handoff.send_record(framed);
}

/// Bytes one event may take in the stream encoding, stack nodes included.
fn event_room(nodes: usize) -> usize {
    // The longest event (`Remap`) is an op and seven varints: 71 bytes.
    80 + nodes * 32
}

/// Events of a thread that has no state (exiting, after its destructor ran): each becomes a
/// one-event chunk of its own.
#[cold]
fn record_orphan(rec: &Recorder, mut ev: EventKind, start: StackStart) {
    let _errno = SaveErrno::new();
    let Ok(mut guard) = rec.orphan.lock() else {
        return;
    };
    rec.handoff.share_sequence();
    let stacks = guard.get_or_insert_with(|| Box::new(ThreadStacks::new()));
    stacks.adopt_for_this_thread();
    if let Some(stack) = stack_of(&mut ev) {
        *stack = stacks.stack_id(&rec.stacks, &rec.handoff, start);
    }
    let mut b = ChunkBuf::new(rec.handoff.fresh_buffer());
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    let mark = encode(&mut b, tid, ev, stacks.new_nodes());
    if let Some(chunk) = b.take_framed() {
        drop(guard);
        rec.handoff.hand_off(chunk);
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
    if rec.handoff.writer_started() {
        let done = Arc::new(AtomicBool::new(false));
        rec.handoff.send(Msg::Finish(reason, done.clone()));
        // Bounded wait: a writer stuck on a full disk must not hang the program's exit.
        for _ in 0..100_000 {
            if done.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    } else {
        let inbox = WriterInbox { rec, rx: None };
        writer::finish_inline(&rec.handoff.writer, &inbox, reason);
    }
    drop(errno);
    drop(g);
}
