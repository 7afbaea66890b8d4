//! Python frames: when the traced program is CPython, each allocation's stack also records the
//! Python frames the calling thread was running, read from the interpreter's own frame stack.
//!
//! The thread's `PyThreadState` comes from `PyGILState_GetThisThreadState` (a TSS lookup: no lock,
//! no allocation); its frame chain is only ever changed by the thread itself, so reading it from
//! inside that thread's malloc is consistent whether or not it holds the GIL. Each frame gives
//! its code object and its last instruction; a code object is described once, in a `PYCODE`
//! record (names, file, line table), and the reader turns instructions into lines offline.
//!
//! The struct layouts are CPython 3.11's (x86-64), checked against the type of every object
//! read (`PyCode_Type`, `PyUnicode_Type`, `PyBytes_Type`). Other versions get native stacks
//! only, with one warning line.

use memtrack_format::{pyframe, PyCodeRecord};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const OFF: u8 = 0;
const ON: u8 = 1;
static STATE: AtomicU8 = AtomicU8::new(OFF);
static GET_TSTATE: AtomicUsize = AtomicUsize::new(0);
static CODE_TYPE: AtomicUsize = AtomicUsize::new(0);
static UNICODE_TYPE: AtomicUsize = AtomicUsize::new(0);
static BYTES_TYPE: AtomicUsize = AtomicUsize::new(0);
/// `_PyEval_EvalFrameDefault`'s code, `[lo, hi)` (0, 0 when its size is unknown).
static EVAL_LO: AtomicUsize = AtomicUsize::new(0);
static EVAL_HI: AtomicUsize = AtomicUsize::new(0);

// CPython 3.11 layouts (Include/cpython/pystate.h, Include/internal/pycore_frame.h,
// Include/cpython/code.h, Include/cpython/unicodeobject.h, Include/cpython/bytesobject.h).
const TSTATE_CFRAME: usize = 56;
const CFRAME_CURRENT_FRAME: usize = 8;
const FRAME_CODE: usize = 32;
const FRAME_PREVIOUS: usize = 48;
const FRAME_PREV_INSTR: usize = 56;
const FRAME_IS_ENTRY: usize = 68;
const OB_TYPE: usize = 8;
const CODE_FIRSTLINENO: usize = 72;
const CODE_FILENAME: usize = 112;
const CODE_QUALNAME: usize = 128;
const CODE_LINETABLE: usize = 136;
const CODE_CODE_ADAPTIVE: usize = 184;
const UNICODE_LENGTH: usize = 16;
const UNICODE_STATE: usize = 32;
const UNICODE_ASCII_DATA: usize = 48;
const UNICODE_COMPACT_DATA: usize = 72;
const BYTES_SIZE: usize = 16;
const BYTES_DATA: usize = 32;

/// Python frames read per allocation at most.
pub(crate) const MAX_PY_FRAMES: usize = 128;

fn sym(name: &std::ffi::CStr) -> usize {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope. A failed
    // lookup leaves a message for dlerror(): it is taken here, so the program's next dlerror()
    // does not report our lookup.
    unsafe {
        let p = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) as usize;
        if p == 0 {
            libc::dlerror();
        }
        p
    }
}

/// Looks for a CPython interpreter in the process (after the program's libraries are loaded)
/// and turns frame reading on when its version is understood.
/// Runs on the writer thread (see `recorder::writer_entry`), once per process.
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
    let (get, code, unicode, bytes) = (
        sym(c"PyGILState_GetThisThreadState"),
        sym(c"PyCode_Type"),
        sym(c"PyUnicode_Type"),
        sym(c"PyBytes_Type"),
    );
    if (major, minor) != (3, 11) || get == 0 || code == 0 || unicode == 0 || bytes == 0 {
        let v = if minor == 0 {
            "before 3.11".to_string()
        } else {
            format!("{major}.{minor}")
        };
        let msg = format!(
            "memtrack: Python {v}: its frames are not read (supported: 3.11); stacks show native frames only\n"
        );
        // SAFETY: plain write of a byte slice to stderr.
        unsafe { libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len()) };
        return;
    }
    if let Some((lo, hi)) = function_range(c"_PyEval_EvalFrameDefault") {
        EVAL_LO.store(lo, Ordering::Relaxed);
        EVAL_HI.store(hi, Ordering::Relaxed);
    }
    GET_TSTATE.store(get, Ordering::Relaxed);
    CODE_TYPE.store(code, Ordering::Relaxed);
    UNICODE_TYPE.store(unicode, Ordering::Relaxed);
    BYTES_TYPE.store(bytes, Ordering::Relaxed);
    STATE.store(ON, Ordering::Release);
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
    // SAFETY: tstate is this thread's live PyThreadState; its cframe and frames are changed
    // only by this thread, which is here.
    let mut frame = unsafe {
        let cframe = word(tstate + TSTATE_CFRAME);
        if cframe == 0 {
            return 0;
        }
        word(cframe + CFRAME_CURRENT_FRAME)
    };
    let mut n = 0;
    while frame != 0 && n < out.len() {
        // SAFETY: a frame of this thread's chain (see above); its code object is checked by
        // type before anything else is read from it.
        unsafe {
            let code = word(frame + FRAME_CODE);
            if code == 0 || !code.is_multiple_of(8) || word(code + OB_TYPE) != code_type {
                break;
            }
            let first = code + CODE_CODE_ADAPTIVE;
            let prev = word(frame + FRAME_PREV_INSTR);
            let lasti = if prev >= first {
                ((prev - first) / 2).min(u32::MAX as usize) as u32
            } else {
                0
            };
            let entry = std::ptr::read((frame + FRAME_IS_ENTRY) as *const u8) != 0;
            out[n] = PyFrame { code, lasti, entry };
            n += 1;
            frame = word(frame + FRAME_PREVIOUS);
        }
    }
    n
}

/// The fields that tell one code object from another one later made at the same address.
pub(crate) fn code_identity(code: usize) -> (usize, usize) {
    // SAFETY: `code` was checked to be a code object by `read_frames`, during this allocation.
    unsafe { (word(code + CODE_QUALNAME), word(code + CODE_LINETABLE)) }
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
        let data = obj
            + if ascii {
                UNICODE_ASCII_DATA
            } else {
                UNICODE_COMPACT_DATA
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
    // SAFETY: `code` was checked to be a code object by `read_frames`, during this allocation.
    let (filename, qualname, linetable, first_line) = unsafe {
        (
            word(code + CODE_FILENAME),
            word(code + CODE_QUALNAME),
            word(code + CODE_LINETABLE),
            std::ptr::read((code + CODE_FIRSTLINENO) as *const i32),
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
