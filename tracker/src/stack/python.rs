//! Python frames: when the traced program is CPython, each allocation's stack also records the
//! Python frames the calling thread was running, read from the interpreter's own frame stack.
//!
//! The thread's `PyThreadState` comes from `PyGILState_GetThisThreadState` (a TSS lookup: no lock,
//! no allocation); its frame chain is only ever changed by the thread itself, so reading it from
//! inside that thread's malloc is consistent whether or not it holds the GIL. Each frame gives
//! its code object and its last instruction; a code object is described once, in a `PYCODE`
//! record (names, file, line table), and the reader turns instructions into lines offline.
//!
//! The struct layouts are those of CPython 3.11, 3.12 and 3.13 (x86-64, the default build with
//! the GIL), one table per version (`Layout`), and every object read is checked against its type
//! (`PyCode_Type`, `PyUnicode_Type`, `PyBytes_Type`) first. Other versions, and builds whose
//! object header differs (free-threaded ones), get native stacks only, with one warning line.

use memtrack_format::{pyframe, PyCodeRecord, PythonEndRecord};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const OFF: u8 = 0;
const ON: u8 = 1;
static STATE: AtomicU8 = AtomicU8::new(OFF);
/// Index into `LAYOUTS` of the running interpreter's version.
static LAYOUT: AtomicU8 = AtomicU8::new(0);
static GET_TSTATE: AtomicUsize = AtomicUsize::new(0);
static CODE_TYPE: AtomicUsize = AtomicUsize::new(0);
static UNICODE_TYPE: AtomicUsize = AtomicUsize::new(0);
static BYTES_TYPE: AtomicUsize = AtomicUsize::new(0);
/// `_PyEval_EvalFrameDefault`'s code, `[lo, hi)` (0, 0 when its size is unknown).
static EVAL_LO: AtomicUsize = AtomicUsize::new(0);
static EVAL_HI: AtomicUsize = AtomicUsize::new(0);

/// Interpreter shutdown, watched so that the reader can tell what the program left live from
/// what CPython frees as it shuts down (see `shutdown_claim`).
const SD_OFF: u8 = 0;
const SD_WATCH: u8 = 1;
/// An allocation's stack passed through `Py_FinalizeEx`: the next event marks the moment.
const SD_SEEN: u8 = 2;
const SD_DONE: u8 = 3;
static SHUTDOWN: AtomicU8 = AtomicU8::new(SD_OFF);
/// `Py_FinalizeEx`'s code, `[lo, hi)` (0, 0 when its size is unknown).
static FINALIZE_LO: AtomicUsize = AtomicUsize::new(0);
static FINALIZE_HI: AtomicUsize = AtomicUsize::new(0);
/// The address of `_PyRuntime._finalizing` (0 when unknown).
static FINALIZING_AT: AtomicUsize = AtomicUsize::new(0);

/// How a frame says that an evaluation loop began with it.
#[derive(Clone, Copy)]
enum Entry {
    /// 3.11: the frame's `is_entry` byte, at this offset.
    IsEntry(usize),
    /// 3.12+: the loop pushes a frame of its own, owned by the C stack (`owner`, a byte at
    /// this offset, is `FRAME_OWNED_BY_CSTACK`), just before the frame it runs.
    CStackFrame(usize),
}

const FRAME_OWNED_BY_CSTACK: u8 = 3;

/// Where one CPython version keeps what is read. Offsets in bytes, from `offsetof` over each
/// version's headers (Include/cpython/pystate.h, Include/internal/pycore_frame.h,
/// Include/cpython/code.h, Include/cpython/unicodeobject.h, Include/cpython/bytesobject.h),
/// compiled with `Py_BUILD_CORE`.
struct Layout {
    minor: libc::c_ulong,
    /// `PyThreadState.cframe` (3.11, 3.12), whose `current_frame` is at `current_frame`; `None`
    /// when the thread state holds `current_frame` itself (3.13).
    tstate_cframe: Option<usize>,
    current_frame: usize,
    /// `_PyInterpreterFrame`: `f_code` (3.13: `f_executable`), `previous`, `prev_instr` (3.13:
    /// `instr_ptr`; both give the instruction running).
    frame_code: usize,
    frame_previous: usize,
    frame_instr: usize,
    entry: Entry,
    code_firstlineno: usize,
    code_filename: usize,
    code_qualname: usize,
    code_linetable: usize,
    code_code_adaptive: usize,
    /// Where a compact string's characters begin: ASCII ones, others.
    unicode_ascii_data: usize,
    unicode_compact_data: usize,
}

const LAYOUT_311: Layout = Layout {
    minor: 11,
    tstate_cframe: Some(56),
    current_frame: 8,
    frame_code: 32,
    frame_previous: 48,
    frame_instr: 56,
    entry: Entry::IsEntry(68),
    code_firstlineno: 72,
    code_filename: 112,
    code_qualname: 128,
    code_linetable: 136,
    code_code_adaptive: 184,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
};

const LAYOUT_312: Layout = Layout {
    minor: 12,
    tstate_cframe: Some(56),
    current_frame: 0,
    frame_code: 0,
    frame_previous: 8,
    frame_instr: 56,
    entry: Entry::CStackFrame(70),
    code_firstlineno: 68,
    code_code_adaptive: 192,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    ..LAYOUT_311
};

/// 3.13 drops `_PyCFrame` and adds a field to code objects; the rest is 3.12's.
const LAYOUT_313: Layout = Layout {
    minor: 13,
    tstate_cframe: None,
    current_frame: 72,
    code_code_adaptive: 200,
    ..LAYOUT_312
};

static LAYOUTS: [Layout; 3] = [LAYOUT_311, LAYOUT_312, LAYOUT_313];

#[inline]
fn layout() -> &'static Layout {
    &LAYOUTS[LAYOUT.load(Ordering::Relaxed) as usize % LAYOUTS.len()]
}

// The same in every version read.
const OB_TYPE: usize = 8;
const UNICODE_LENGTH: usize = 16;
const UNICODE_STATE: usize = 32;
const BYTES_SIZE: usize = 16;
const BYTES_DATA: usize = 32;

/// Python frames read per allocation at most.
pub(crate) const MAX_PY_FRAMES: usize = 128;

/// The address of `name` in the global scope (0: none). Looked up on the writer thread only: a
/// failed lookup's message stays in that thread's dlerror state, which no program code reads,
/// and is not taken with dlerror() (see `recorder::writer_entry`: it may read the environment
/// while the program rewrites it).
fn sym(name: &std::ffi::CStr) -> usize {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) as usize }
}

/// Looks for a CPython interpreter in the process (after the program's libraries are loaded)
/// and turns frame reading on when its version is understood.
/// Runs on the writer thread (see `stack::prepare_writer_thread`), once per process.
pub(crate) fn detect() {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, Ordering::AcqRel) {
        return; // a forked child's writer: the parent looked already
    }
    let version = sym(c"Py_Version");
    let (major, minor) = if version != 0 {
        // SAFETY: `Py_Version` is CPython's `const unsigned long` PY_VERSION_HEX.
        let v = unsafe { *(version as *const libc::c_ulong) };
        ((v >> 24) & 0xff, (v >> 16) & 0xff)
    } else if sym(c"Py_Initialize") != 0 {
        (3, 0) // older than 3.11, which introduced Py_Version
    } else {
        return; // not Python
    };
    let (get, code, unicode, bytes, type_type) = (
        sym(c"PyGILState_GetThisThreadState"),
        sym(c"PyCode_Type"),
        sym(c"PyUnicode_Type"),
        sym(c"PyBytes_Type"),
        sym(c"PyType_Type"),
    );
    let index = LAYOUTS.iter().position(|l| major == 3 && l.minor == minor);
    // The object header is the default build's: a type object's type is `type` at `OB_TYPE`
    // (a free-threaded build keeps more before it).
    // SAFETY: `code` is the address of CPython's `PyCode_Type` object, a static type object
    // far longer than `OB_TYPE` + 8 bytes.
    let header_ok = code != 0 && type_type != 0 && unsafe { word(code + OB_TYPE) } == type_type;
    if index.is_none() || !header_ok || get == 0 || unicode == 0 || bytes == 0 {
        let v = if minor == 0 {
            "before 3.11".to_string()
        } else if index.is_some() {
            format!("{major}.{minor} (a build with another object layout)")
        } else {
            format!("{major}.{minor}")
        };
        let msg = format!(
            "memtrack: Python {v}: its frames are not read (supported: 3.11, 3.12, 3.13); stacks show native frames only\n"
        );
        // SAFETY: plain write of a byte slice to stderr.
        unsafe { libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len()) };
        return;
    }
    if let Some((lo, hi)) = function_range(c"_PyEval_EvalFrameDefault") {
        EVAL_LO.store(lo, Ordering::Relaxed);
        EVAL_HI.store(hi, Ordering::Relaxed);
    }
    if let Some((lo, hi)) = function_range(c"Py_FinalizeEx") {
        FINALIZE_LO.store(lo, Ordering::Relaxed);
        FINALIZE_HI.store(hi, Ordering::Relaxed);
    }
    FINALIZING_AT.store(finalizing_field(minor), Ordering::Relaxed);
    SHUTDOWN.store(SD_WATCH, Ordering::Release);
    LAYOUT.store(index.unwrap_or(0) as u8, Ordering::Relaxed);
    GET_TSTATE.store(get, Ordering::Relaxed);
    CODE_TYPE.store(code, Ordering::Relaxed);
    UNICODE_TYPE.store(unicode, Ordering::Relaxed);
    BYTES_TYPE.store(bytes, Ordering::Relaxed);
    STATE.store(ON, Ordering::Release);
}

/// Where `_PyRuntime._finalizing` lies (0: unknown). It is the thread state that runs the
/// shutdown, set by `Py_FinalizeEx` once the atexit handlers have run and before modules are
/// freed. 3.11 and 3.12 keep it after five ints (`offsetof` over their headers: 24); 3.13's
/// runtime state begins with debug offsets for out-of-process tools ("xdebugpy", a version,
/// then `runtime_state.size`, `runtime_state.finalizing`), which say where it is.
fn finalizing_field(minor: libc::c_ulong) -> usize {
    let runtime = sym(c"_PyRuntime");
    if runtime == 0 {
        return 0;
    }
    match minor {
        11 | 12 => runtime + 24,
        13 => {
            // SAFETY: `_PyRuntime` is CPython's static runtime state, far larger than 40 bytes.
            let (cookie, off) = unsafe { (word(runtime), word(runtime + 32)) };
            if cookie == usize::from_le_bytes(*b"xdebugpy") && (40..1 << 16).contains(&off) {
                runtime + off
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// Called with the native frames of a new Python stack (a miss of the stack memo, which every
/// first stack inside `Py_FinalizeEx` is): notes when it runs inside `Py_FinalizeEx`.
#[inline]
pub(crate) fn note_native_stack(ips: &[u64]) {
    if SHUTDOWN.load(Ordering::Relaxed) != SD_WATCH {
        return;
    }
    let (lo, hi) = (
        FINALIZE_LO.load(Ordering::Relaxed) as u64,
        FINALIZE_HI.load(Ordering::Relaxed) as u64,
    );
    // Return addresses: in (lo, hi]. Near the root, outermost first.
    if hi != 0 && ips.iter().any(|&ip| ip.wrapping_sub(lo + 1) < hi - lo) {
        let _ = SHUTDOWN.compare_exchange(SD_WATCH, SD_SEEN, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Whether the event about to be recorded is the first of interpreter shutdown: true once per
/// process. Shutdown began when an allocation's stack passed through `Py_FinalizeEx` (before
/// `threading._shutdown` and the atexit handlers run), or, failing that, when CPython set its
/// finalizing flag (before modules are freed). Checked on every event, so that the mark falls
/// exactly between the program's events and shutdown's; a realloc's second half waits for the
/// next event (the block is in neither live set between the halves). Non-Python processes pay
/// one load.
#[inline(always)]
pub(crate) fn shutdown_claim(realloc_half: bool) -> Option<u8> {
    let s = SHUTDOWN.load(Ordering::Relaxed);
    if s == SD_OFF || s == SD_DONE || realloc_half {
        return None;
    }
    if s == SD_WATCH {
        let at = FINALIZING_AT.load(Ordering::Relaxed);
        // SAFETY: a pointer-sized field of CPython's static runtime state (`finalizing_field`);
        // volatile: the main thread stores it while others read.
        if at == 0 || unsafe { std::ptr::read_volatile(at as *const usize) } == 0 {
            return None;
        }
    }
    shutdown_claim_slow(s)
}

#[cold]
fn shutdown_claim_slow(s: u8) -> Option<u8> {
    let how = if s == SD_SEEN {
        PythonEndRecord::BY_STACK
    } else {
        PythonEndRecord::BY_FLAG
    };
    SHUTDOWN
        .compare_exchange(s, SD_DONE, Ordering::Relaxed, Ordering::Relaxed)
        .ok()
        .map(|_| how)
}

/// The code of a function the dynamic linker can find, from its symbol's value and size.
fn function_range(name: &std::ffi::CStr) -> Option<(usize, usize)> {
    let start = sym(name);
    if start == 0 {
        return None;
    }
    let mut info: libc::Dl_info = empty_dl_info();
    let mut ent: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: `start` is an address the linker just gave; dladdr1 fills `info` and points `ent`
    // at the symbol's ELF entry (RTLD_DL_SYMENT), which lives as long as the module.
    let ok = unsafe { libc::dladdr1(start as *const libc::c_void, &mut info, &mut ent, 1) };
    if ok == 0 || ent.is_null() {
        return None;
    }
    // SAFETY: with RTLD_DL_SYMENT, `ent` points at the matching `Elf64_Sym`.
    let size = unsafe { (*(ent as *const libc::Elf64_Sym)).st_size } as usize;
    (size > 0).then(|| (start, start + size))
}

fn empty_dl_info() -> libc::Dl_info {
    libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    }
}

/// CPython's evaluation loop, as the range of return addresses that lie in it (a return
/// address may equal the end, after a call that is the function's last instruction); `None`
/// when where the loop lies is not known.
#[inline]
pub(crate) fn eval_loop() -> Option<std::ops::RangeInclusive<u64>> {
    let (lo, hi) = (
        EVAL_LO.load(Ordering::Relaxed) as u64,
        EVAL_HI.load(Ordering::Relaxed) as u64,
    );
    (hi != 0).then(|| lo + 1..=hi)
}

#[inline]
pub(crate) fn enabled() -> bool {
    // Acquire: the evaluation loop's range is stored before.
    STATE.load(Ordering::Acquire) == ON
}

/// A word of the interpreter's memory.
///
/// # Safety
/// `addr` must point to readable memory of the interpreter's objects.
#[inline]
unsafe fn word(addr: usize) -> usize {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::read(addr as *const usize) }
}

/// One Python frame: its code object and last instruction (code units), and whether it began
/// an evaluation loop of its own.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PyFrame {
    pub code: usize,
    pub lasti: u32,
    pub entry: bool,
}

/// Reads the calling thread's Python frames, innermost first, into `out`; returns how many.
pub(crate) fn read_frames(out: &mut [PyFrame]) -> usize {
    let get = GET_TSTATE.load(Ordering::Relaxed);
    let code_type = CODE_TYPE.load(Ordering::Relaxed);
    if get == 0 {
        return 0;
    }
    // SAFETY: `get` is PyGILState_GetThisThreadState, found by `detect`.
    let get: unsafe extern "C" fn() -> usize = unsafe { std::mem::transmute(get) };
    // SAFETY: a TSS lookup; NULL before the interpreter is up or after it is finalized.
    let tstate = unsafe { get() };
    if tstate == 0 {
        return 0;
    }
    let l = layout();
    // SAFETY: tstate is this thread's live PyThreadState; its frames are changed only by this
    // thread, which is here.
    let mut frame = unsafe {
        match l.tstate_cframe {
            Some(off) => {
                let cframe = word(tstate + off);
                if cframe == 0 {
                    return 0;
                }
                word(cframe + l.current_frame)
            }
            None => word(tstate + l.current_frame),
        }
    };
    let mut n = 0;
    // Frames skipped (the loops' own) count too: the walk is bounded even on a damaged chain.
    let mut visited = 0;
    while frame != 0 && n < out.len() && visited < 2 * out.len() {
        visited += 1;
        // SAFETY: a frame of this thread's chain (see above); its code object is checked by
        // type before anything else is read from it.
        unsafe {
            let entry = match l.entry {
                Entry::IsEntry(off) => std::ptr::read((frame + off) as *const u8) != 0,
                Entry::CStackFrame(off) => {
                    if std::ptr::read((frame + off) as *const u8) == FRAME_OWNED_BY_CSTACK {
                        // The loop's own frame: the one it ran (read just before) began it.
                        if let Some(newer) = n.checked_sub(1) {
                            out[newer].entry = true;
                        }
                        frame = word(frame + l.frame_previous);
                        continue;
                    }
                    false
                }
            };
            let code = word(frame + l.frame_code);
            if code == 0 || !code.is_multiple_of(8) || word(code + OB_TYPE) != code_type {
                break;
            }
            let first = code + l.code_code_adaptive;
            let prev = word(frame + l.frame_instr);
            let lasti = if prev >= first {
                ((prev - first) / 2).min(u32::MAX as usize) as u32
            } else {
                0
            };
            out[n] = PyFrame { code, lasti, entry };
            n += 1;
            frame = word(frame + l.frame_previous);
        }
    }
    n
}

/// The fields that tell one code object from another one later made at the same address.
pub(crate) fn code_identity(code: usize) -> (usize, usize) {
    let l = layout();
    // SAFETY: `code` was checked to be a code object by `read_frames`, during this allocation.
    unsafe { (word(code + l.code_qualname), word(code + l.code_linetable)) }
}

/// A `str` object's text (compact strings; others and non-strings give "?").
fn unicode(obj: usize) -> String {
    if obj == 0 {
        return "?".into();
    }
    // SAFETY: obj is a field of a live code object; its type is checked before its layout is
    // relied on.
    unsafe {
        if word(obj + OB_TYPE) != UNICODE_TYPE.load(Ordering::Relaxed) {
            return "?".into();
        }
        let len = word(obj + UNICODE_LENGTH).min(4096);
        let state = std::ptr::read((obj + UNICODE_STATE) as *const u32);
        let kind = (state >> 2) & 7;
        let compact = state & (1 << 5) != 0;
        let ascii = state & (1 << 6) != 0;
        if !compact {
            return "?".into();
        }
        let l = layout();
        let data = obj
            + if ascii {
                l.unicode_ascii_data
            } else {
                l.unicode_compact_data
            };
        let mut s = String::with_capacity(len);
        for i in 0..len {
            let c = match kind {
                1 => std::ptr::read((data + i) as *const u8) as u32,
                2 => std::ptr::read((data + 2 * i) as *const u16) as u32,
                4 => std::ptr::read((data + 4 * i) as *const u32),
                _ => return "?".into(),
            };
            s.push(char::from_u32(c).unwrap_or('\u{fffd}'));
        }
        s
    }
}

/// A `bytes` object's contents (empty for anything else).
fn bytes(obj: usize) -> Vec<u8> {
    if obj == 0 {
        return Vec::new();
    }
    // SAFETY: as for `unicode`: the type is checked first.
    unsafe {
        if word(obj + OB_TYPE) != BYTES_TYPE.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let len = word(obj + BYTES_SIZE).min(1 << 20);
        std::slice::from_raw_parts((obj + BYTES_DATA) as *const u8, len).to_vec()
    }
}

/// The description of code object `code` under `id`.
pub(crate) fn describe(code: usize, id: u32) -> PyCodeRecord {
    let l = layout();
    // SAFETY: `code` was checked to be a code object by `read_frames`, during this allocation.
    let (filename, qualname, linetable, first_line) = unsafe {
        (
            word(code + l.code_filename),
            word(code + l.code_qualname),
            word(code + l.code_linetable),
            std::ptr::read((code + l.code_firstlineno) as *const i32),
        )
    };
    PyCodeRecord {
        id,
        qualname: unicode(qualname),
        filename: unicode(filename),
        first_line: first_line.max(0) as u32,
        linetable: bytes(linetable),
        linetable_version: 311,
    }
}

/// The stack "address" of a frame whose code object has id `id`.
pub(crate) fn frame_ip(f: &PyFrame, id: u32) -> u64 {
    pyframe::encode(id, f.lasti, f.entry)
}
