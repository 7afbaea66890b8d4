//! Stack identification: which call path an allocation came from, as a node of the
//! process-wide stack trie. Native frames are unwound from DWARF CFI ([`unwind`]) by a walker
//! that reuses the unchanged outer part of the previous walk ([`walker`]); frames are interned
//! in the trie ([`trie`]), new nodes going into the thread's chunk; in a Python process the
//! interpreter's frames are read and interleaved with the native ones ([`python`]).
//!
//! Must never: take a lock on the common path (a thread's own caches answer nearly every
//! frame), or unwind through a module's tables while it may be unmapped (`dlclose` invalidates
//! the unwinder first).

pub(crate) mod python;
pub(crate) mod trie;
pub(crate) mod unwind;
pub(crate) mod walker;

use crate::clock;
use crate::guard::SaveErrno;
use crate::handoff::{seq, Handoff};
use memtrack_format::{record, ModulesRecord};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use trie::{FastMap, Trie};
use unwind::{Caller, CfiUnwinder, LoadedModule, Skip, UnwCache, MAX_FRAMES};
use walker::Walker;

/// Where an allocation's stack starts.
#[derive(Clone, Copy)]
pub(crate) enum StackStart {
    /// The program's registers at its call, handed over by a preload trampoline.
    Registers(Caller),
    /// The caller of the function whose frame holds the address (a local of
    /// `Tracker::alloc`), unwound from the registers taken in that frame: the tracker linked
    /// into a Rust program.
    AboveMarker(Caller, u64),
    /// Unwound from here, dropping the tracker's own frames (`Stacks::skip`).
    Here,
}

/// Python code objects: address -> (id, identity fields).
type CodeIds = FastMap<usize, (u32, (usize, usize))>;

/// The process-wide part: the trie, the loaded modules and their unwinder, the Python code
/// objects described so far.
pub(crate) struct Stacks {
    trie: Mutex<Trie>,
    modules: Mutex<ModuleSet>,
    /// Bumped whenever the unwinder changes: threads then take the new one.
    unw_gen: AtomicU64,
    skip: Skip,
    /// Python code objects described so far: address -> (id, identity), and the next id.
    code_table: Mutex<(CodeIds, u32)>,
}

struct ModuleSet {
    list: Vec<LoadedModule>,
    /// Address ranges of `list`, shared with the threads for a lock-free check.
    ranges: Arc<[(u64, u64)]>,
    /// None while a `dlclose` is in progress: stacks are not unwound through stale tables.
    unw: Option<Arc<CfiUnwinder>>,
}

impl Stacks {
    /// Stack identification over `modules`; new trie nodes get ids from `first_stack_id`.
    /// `skip_own_module`: the tracker is the preload library, whose frames are dropped by
    /// address (else it is linked into the program).
    pub(crate) fn new(
        modules: &[LoadedModule],
        skip_own_module: bool,
        first_stack_id: u32,
    ) -> Self {
        // Resolved here, at start, rather than inside the first hook of the main thread.
        let _ = unwind::current_stack_top();
        let skip = if skip_own_module {
            let (lo, hi) = unwind::own_module_range(modules);
            Skip::Range(lo, hi)
        } else {
            Skip::Count(0)
        };
        Stacks {
            trie: Mutex::new(Trie::starting_at(first_stack_id)),
            modules: Mutex::new(ModuleSet {
                list: Vec::new(),
                ranges: ranges_of(modules),
                unw: Some(Arc::new(unwind::build_unwinder(modules))),
            }),
            unw_gen: AtomicU64::new(1),
            skip,
            code_table: Mutex::new((FastMap::default(), 1)),
        }
    }

    /// Writes the first `MODULES` record and keeps the list (after the recorder is published:
    /// writing may reach the writer).
    pub(crate) fn publish_first_modules(&self, modules: Vec<LoadedModule>, out: &Handoff) {
        out.writer.write_record(&modules_record(&modules));
        if let Ok(mut m) = self.modules.lock() {
            m.list = modules;
        }
    }

    /// The id the next new trie node will get (the `END` record keeps it for the next image).
    pub(crate) fn next_stack_id(&self) -> u32 {
        self.trie
            .lock()
            .map(|t| t.next_id())
            .unwrap_or(u32::MAX / 2)
    }

    /// Re-reads the module list and publishes a new unwinder.
    pub(crate) fn refresh_modules(&self, out: &Handoff) {
        let list = unwind::enumerate_modules();
        let unw = Arc::new(unwind::build_unwinder(&list));
        let rec = modules_record(&list);
        if let Ok(mut m) = self.modules.lock() {
            m.ranges = ranges_of(&list);
            m.list = list;
            m.unw = Some(unw);
        }
        self.unw_gen.fetch_add(1, Ordering::Release);
        out.send_record(rec);
    }

    /// The tracker runs as the preload library.
    pub(crate) fn preloaded(&self) -> bool {
        matches!(self.skip, Skip::Range(..))
    }

    /// The module list, for a forked child: without waiting on a lock that a thread of the
    /// parent may have held at the fork (then the child lists the modules itself).
    pub(crate) fn modules_snapshot(&self) -> Vec<LoadedModule> {
        match self.modules.try_lock() {
            Ok(m) if !m.list.is_empty() => m.list.clone(),
            _ => unwind::enumerate_modules(),
        }
    }

    /// Called before a module may be unmapped.
    pub(crate) fn invalidate_modules(&self) {
        if let Ok(mut m) = self.modules.lock() {
            m.unw = None;
        }
        self.unw_gen.fetch_add(1, Ordering::Release);
    }
}

/// The current module set as a framed `MODULES` record.
fn modules_record(list: &[LoadedModule]) -> Vec<u8> {
    let rec = ModulesRecord {
        seq: seq::peek(),
        time: clock::now_units(),
        modules: list.iter().map(|m| m.info.clone()).collect(),
    };
    let mut out = Vec::new();
    memtrack_format::put_record(&mut out, record::MODULES, &rec.encode());
    out
}

fn ranges_of(list: &[LoadedModule]) -> Arc<[(u64, u64)]> {
    list.iter().map(|m| (m.start, m.end)).collect()
}

pub(crate) struct ThreadStacks {
    unw: Option<Arc<CfiUnwinder>>,
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
    known_codes: CodeIds,
    py_frames: Vec<python::PyFrame>,
    /// The Python frames' runs, innermost first: `py_frames[start..end]` each.
    py_runs: Vec<(usize, usize)>,
    /// The stack being interned in a Python process, outermost first (see `FrameKey`).
    interleaved: Vec<FrameKey>,
    /// The previous such stack and its trie nodes: a new stack keeps the nodes of the outer
    /// part they share (all but a few innermost frames, nearly always).
    prev_interleaved: Vec<FrameKey>,
    interleaved_nodes: Vec<u32>,
    /// Stacks made recently, by a hash of their native and Python frames (see `interleaved_stack`);
    /// empty until first used.
    interleaved_memo: Box<[MemoSlot]>,
}

/// Slots of `ThreadStacks::interleaved_memo`, direct-mapped (64 KiB a Python thread).
const INTERLEAVED_MEMO: usize = 4096;
/// A 64-bit hash of an interleaved stack's frames, and the stack's trie node. A lookup compares with
/// the one key in its slot: a false match takes a 64-bit coincidence, about once in 10^19
/// allocations.
type MemoSlot = (u64, u32);

/// How many leading frames two stacks share. Four at a time: a deep stack's shared outer part is
/// compared on every event.
#[inline]
fn common_prefix(a: &[FrameKey], b: &[FrameKey]) -> usize {
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
type FrameKey = (u64, u64);
const NATIVE: u64 = u64::MAX;

impl ThreadStacks {
    pub(crate) fn new() -> Self {
        ThreadStacks {
            unw: None,
            ranges: Arc::new([]),
            known_outer: 0,
            unknown_outer: 0,
            unw_gen: 0,
            walker: Walker::new(),
            stack_hi: unwind::current_stack_top(),
            new_nodes: Vec::new(),
            known_codes: FastMap::default(),
            py_frames: Vec::new(),
            py_runs: Vec::new(),
            interleaved: Vec::new(),
            prev_interleaved: Vec::new(),
            interleaved_nodes: Vec::new(),
            interleaved_memo: Box::default(),
        }
    }

    /// The trie nodes made by this thread's stacks since they were last written: each goes into
    /// the thread's chunk before the event that uses it.
    #[inline(always)]
    pub(crate) fn new_nodes(&mut self) -> &mut Vec<(u32, u32, u64)> {
        &mut self.new_nodes
    }

    /// Makes the orphan path's shared state ready for the calling thread (another thread may
    /// have used it last): its stack bounds, and no reuse of another thread's walk.
    pub(crate) fn adopt_for_this_thread(&mut self) {
        self.stack_hi = unwind::current_stack_top();
        self.walker.invalidate();
    }

    /// The stack of an allocation: its native frames, and in a Python process the Python
    /// frames each evaluation loop was running, in that loop's place.
    pub(crate) fn stack_id(&mut self, stacks: &Stacks, out: &Handoff, start: StackStart) -> u32 {
        let py = python::enabled();
        self.walker.set_interning(!py);
        let id = self.native_stack_id(stacks, out, start);
        if !py {
            return id;
        }
        self.interleaved_stack(stacks, out)
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
    fn interleaved_stack(&mut self, stacks: &Stacks, out: &Handoff) -> u32 {
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
        if self.interleaved_memo.is_empty() {
            // Made on the heap directly: an array built in this frame would make every call
            // probe 64 KiB of stack.
            self.interleaved_memo = vec![(0, 0); INTERLEAVED_MEMO].into_boxed_slice();
        }
        let memo = &self.interleaved_memo;
        let slot = (h >> (64 - INTERLEAVED_MEMO.trailing_zeros())) as usize;
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
        let key = |f: &python::PyFrame| -> FrameKey {
            (f.code as u64, f.lasti as u64 | (f.entry as u64) << 32)
        };
        let (frames, runs, ips) = (&self.py_frames, &self.py_runs, &self.walker.ips);
        let keys = &mut self.interleaved;
        keys.clear();
        keys.reserve(ips.len() + n);
        let push_run = |keys: &mut Vec<FrameKey>, r: (usize, usize)| {
            keys.extend(frames[r.0..r.1].iter().rev().map(key));
        };
        if let Some(eval) = python::eval_loop() {
            // One comparison per frame: `ip - start` below the length.
            let (lo, len) = (*eval.start(), eval.end() - eval.start());
            let is_loop = |ip: u64| ip.wrapping_sub(lo) <= len;
            let loops = ips.iter().filter(|&&ip| is_loop(ip)).count();
            for &r in runs.iter().skip(loops).rev() {
                push_run(keys, r);
            }
            let mut seen = 0;
            for &ip in ips {
                if is_loop(ip) {
                    seen += 1;
                    if let Some(&r) = runs.get(loops - seen) {
                        push_run(keys, r);
                    }
                }
                keys.push((ip, NATIVE));
            }
        } else {
            keys.extend(ips.iter().map(|&ip| (ip, NATIVE)));
            for &r in runs.iter().rev() {
                push_run(keys, r);
            }
        }
        // The outer part the previous stack had too keeps its nodes.
        let same = common_prefix(&self.interleaved, &self.prev_interleaved);
        self.interleaved_nodes.truncate(same);
        let mut node = self.interleaved_nodes.last().copied().unwrap_or(0);
        for i in same..self.interleaved.len() {
            let k = self.interleaved[i];
            let ip = if k.1 == NATIVE {
                k.0
            } else {
                let id = self.code_id(stacks, out, k.0 as usize);
                let f = python::PyFrame {
                    code: k.0 as usize,
                    lasti: k.1 as u32,
                    entry: k.1 >> 32 != 0,
                };
                python::frame_ip(&f, id)
            };
            let mut intern = interner(stacks, &mut self.new_nodes);
            node = self.walker.child(node, ip, &mut intern);
            self.interleaved_nodes.push(node);
        }
        std::mem::swap(&mut self.interleaved, &mut self.prev_interleaved);
        self.interleaved_memo[slot] = (h, node);
        node
    }

    /// The id of a code object, described in a `PYCODE` record the first time it is met (or
    /// when another code object has since taken its address).
    fn code_id(&mut self, stacks: &Stacks, out: &Handoff, code: usize) -> u32 {
        let identity = python::code_identity(code);
        if let Some(&(id, known)) = self.known_codes.get(&code) {
            if known == identity {
                return id;
            }
        }
        let _errno = SaveErrno::new();
        let (id, new) = match stacks.code_table.lock() {
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
            out.send_record(framed);
        }
        if self.known_codes.len() >= 1 << 16 {
            self.known_codes.clear();
        }
        self.known_codes.insert(code, (id, identity));
        id
    }

    /// Unwinds the stack (from `start` when the hook captured registers, else from here, dropping the
    /// tracker's own frames) and interns it; new trie nodes land in `self.new_nodes`.
    fn native_stack_id(&mut self, stacks: &Stacks, out: &Handoff, start: StackStart) -> u32 {
        let gen = stacks.unw_gen.load(Ordering::Acquire);
        if gen != self.unw_gen {
            let _errno = SaveErrno::new();
            if let Ok(m) = stacks.modules.lock() {
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
        let (id, outer) = self.walk(stacks, &unw, start);
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
        let Some(newer) = refresh_if_new_module(stacks, out, outer) else {
            self.unknown_outer = outer;
            return id;
        };
        // A module loaded since the last refresh (dlopen): unwind again through it.
        self.unw_gen = stacks.unw_gen.load(Ordering::Acquire);
        if let Ok(m) = stacks.modules.lock() {
            self.ranges = m.ranges.clone();
        }
        self.walker.invalidate();
        self.unw = Some(newer.clone());
        self.walk(stacks, &newer, start).0
    }

    fn walk(&mut self, stacks: &Stacks, unw: &CfiUnwinder, start: StackStart) -> (u32, u64) {
        let mut intern = interner(stacks, &mut self.new_nodes);
        match start {
            StackStart::Registers(c) => {
                let w = self.walker.walk(unw, self.stack_hi, c, &mut intern);
                (w.node, w.outer)
            }
            StackStart::AboveMarker(regs, marker) => {
                let w = self
                    .walker
                    .walk_above(unw, self.stack_hi, regs, marker, &mut intern);
                (w.node, w.outer)
            }
            StackStart::Here => {
                let mut frames = [0u64; MAX_FRAMES];
                let (n, _) = unwind::capture(
                    unw,
                    &mut UnwCache::new(),
                    self.stack_hi,
                    stacks.skip,
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
    stacks: &'a Stacks,
    new_nodes: &'a mut Vec<(u32, u32, u64)>,
) -> impl FnMut(u32, u64) -> u32 + 'a {
    move |parent, ip| {
        // A contended lock may sleep in futex(), which sets errno.
        let _errno = SaveErrno::new();
        match stacks.trie.lock() {
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
fn refresh_if_new_module(stacks: &Stacks, out: &Handoff, addr: u64) -> Option<Arc<CfiUnwinder>> {
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
    stacks.refresh_modules(out);
    stacks.modules.lock().ok().and_then(|m| m.unw.clone())
}

/// Called on the writer thread before it writes anything: symbol lookups that may fail are
/// made there. A failed dlsym leaves a malloc'd message in the calling thread, which that
/// thread's next dl* call frees; in a program thread that free would be recorded without its
/// allocation. The message is left in the writer's dlerror state (per thread), not taken with
/// dlerror(): that formats it through gettext, which outside the C locale reads LANGUAGE from
/// the environment, and the program may be rewriting its environment at this moment (bash
/// does, freeing the array being read). Every library of the program is loaded by now (the
/// writer starts from the library constructor): is it a Python interpreter?
pub(crate) fn prepare_writer_thread() {
    let _ = dl_find_object(false);
    python::detect();
}
