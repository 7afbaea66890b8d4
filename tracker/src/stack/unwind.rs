//! Native stacks: the loaded modules and a DWARF CFI unwinder over their in-memory
//! `.eh_frame` tables (framehop), with a per-thread cache of unwind rules.
//!
//! Why not the `backtrace` crate: libgcc's unwinder re-reads unwind tables for every frame,
//! several times the cost on a malloc-heavy loop (figures in `bench/RESULTS.md`). framehop
//! caches the computed rule per instruction address, so a repeated call path costs a table
//! lookup per frame, and it needs no frame pointers (Debian's libc and Python have none).

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Unwinder};
use memtrack_format::{Module, Segment};
use std::ffi::CStr;
use std::os::raw::{c_int, c_void};

/// A caller frame found less than this far above bp counts as found through bp (the frame
/// pointer rule puts it at bp + 16; a DWARF rule may use another offset).
pub(crate) const BP_WINDOW: u64 = 1 << 16;

/// Most frames kept per stack (the issue asks for at least 128).
pub const MAX_FRAMES: usize = 256;

/// Section data borrowed from the mapped module. The module stays mapped while its entry is in
/// the unwinder: `dlclose` invalidates the unwinder before the real `dlclose` runs.
pub type CfiUnwinder = UnwinderX86_64<&'static [u8]>;
pub type UnwCache = CacheX86_64;

/// One module as seen by `dl_iterate_phdr`.
#[derive(Clone, Debug)]
pub struct LoadedModule {
    pub info: Module,
    /// Runtime address range covered by its `PT_LOAD` segments.
    pub start: u64,
    pub end: u64,
    eh_frame_hdr: Option<(u64, u64)>,
    eh_frame: Option<(u64, u64)>,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PT_GNU_EH_FRAME: u32 = 0x6474_e550;

/// Lists the modules mapped now. Allocates: call it inside the tracker guard.
pub fn enumerate_modules() -> Vec<LoadedModule> {
    let mut out: Vec<LoadedModule> = Vec::new();
    // SAFETY: the callback only reads the phdr array dl_iterate_phdr hands it, for the length
    // it states, and memory inside the module's own loaded segments.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect),
            &mut out as *mut Vec<LoadedModule> as *mut c_void,
        );
    }
    out
}

unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY: `data` is the Vec passed by `enumerate_modules`; `info` is valid for this call.
    let out = unsafe { &mut *(data as *mut Vec<LoadedModule>) };
    // SAFETY: `info` is valid for the duration of this callback.
    let info = unsafe { &*info };
    let base = info.dlpi_addr;
    let name = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    };
    let path = if name.is_empty() && out.is_empty() {
        std::fs::read_link("/proc/self/exe")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        name
    };
    // SAFETY: the loader guarantees dlpi_phdr points to dlpi_phnum entries.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let mut m = LoadedModule {
        info: Module {
            path,
            base,
            build_id: Vec::new(),
            segments: Vec::new(),
        },
        start: u64::MAX,
        end: 0,
        eh_frame_hdr: None,
        eh_frame: None,
    };
    for ph in phdrs {
        match ph.p_type {
            PT_LOAD => {
                m.info.segments.push(Segment {
                    vaddr: ph.p_vaddr,
                    memsz: ph.p_memsz,
                    flags: ph.p_flags,
                });
                m.start = m.start.min(base.wrapping_add(ph.p_vaddr));
                m.end = m.end.max(base.wrapping_add(ph.p_vaddr + ph.p_memsz));
            }
            PT_GNU_EH_FRAME => m.eh_frame_hdr = Some((ph.p_vaddr, ph.p_memsz)),
            PT_NOTE if m.info.build_id.is_empty() => {
                // SAFETY: a PT_NOTE segment is inside a loaded segment and readable.
                let notes = unsafe {
                    std::slice::from_raw_parts(
                        base.wrapping_add(ph.p_vaddr) as *const u8,
                        ph.p_memsz as usize,
                    )
                };
                if let Some(id) = find_build_id(notes) {
                    m.info.build_id = id.to_vec();
                }
            }
            _ => {}
        }
    }
    if m.start >= m.end {
        return 0;
    }
    if let Some((hdr_vaddr, hdr_len)) = m.eh_frame_hdr {
        // SAFETY: PT_GNU_EH_FRAME lies inside a loaded, readable segment.
        let hdr = unsafe {
            std::slice::from_raw_parts(base.wrapping_add(hdr_vaddr) as *const u8, hdr_len as usize)
        };
        if let Some(eh_avma) = eh_frame_address(hdr, base.wrapping_add(hdr_vaddr)) {
            let eh_vaddr = eh_avma.wrapping_sub(base);
            // .eh_frame's length is not in any header: it runs at most to the end of its segment.
            let seg_end = m
                .info
                .segments
                .iter()
                .find(|s| eh_vaddr >= s.vaddr && eh_vaddr < s.vaddr + s.memsz)
                .map(|s| s.vaddr + s.memsz);
            if let Some(end) = seg_end {
                m.eh_frame = Some((eh_vaddr, end - eh_vaddr));
            }
        }
    }
    out.push(m);
    0
}

fn find_build_id(mut notes: &[u8]) -> Option<&[u8]> {
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let namesz = u32::from_ne_bytes(notes[0..4].try_into().ok()?) as usize;
        let descsz = u32::from_ne_bytes(notes[4..8].try_into().ok()?) as usize;
        let ntype = u32::from_ne_bytes(notes[8..12].try_into().ok()?);
        let name_end = 12 + align4(namesz);
        let desc_end = name_end.checked_add(align4(descsz))?;
        if desc_end > notes.len() {
            return None;
        }
        if ntype == 3 && namesz == 4 && &notes[12..16] == b"GNU\0" {
            return Some(&notes[name_end..name_end + descsz]);
        }
        notes = &notes[desc_end..];
    }
    None
}

/// Decodes `eh_frame_ptr` from an `.eh_frame_hdr` at runtime address `hdr_addr`.
fn eh_frame_address(hdr: &[u8], hdr_addr: u64) -> Option<u64> {
    if hdr.len() < 8 || hdr[0] != 1 {
        return None;
    }
    let enc = hdr[1];
    let field = &hdr[4..];
    let raw: i64 = match enc & 0x0f {
        0x00 | 0x04 => i64::from_ne_bytes(field.get(..8)?.try_into().ok()?),
        0x03 => u32::from_ne_bytes(field.get(..4)?.try_into().ok()?) as i64,
        0x0b => i32::from_ne_bytes(field.get(..4)?.try_into().ok()?) as i64,
        0x0c => i64::from_ne_bytes(field.get(..8)?.try_into().ok()?),
        _ => return None,
    };
    match enc & 0x70 {
        0x00 => Some(raw as u64),
        0x10 => Some((hdr_addr + 4).wrapping_add(raw as u64)),
        0x30 => Some(hdr_addr.wrapping_add(raw as u64)),
        _ => None,
    }
}

/// Builds an unwinder over `modules`.
pub fn build_unwinder(modules: &[LoadedModule]) -> CfiUnwinder {
    let mut unw = CfiUnwinder::new();
    for m in modules {
        let (Some((hv, hl)), Some((ev, el))) = (m.eh_frame_hdr, m.eh_frame) else {
            continue;
        };
        let base = m.info.base;
        // SAFETY: both ranges lie in the module's loaded segments (checked in `collect`), and
        // the module stays mapped while this unwinder is current (see `CfiUnwinder`).
        let (hdr, eh) = unsafe {
            (
                std::slice::from_raw_parts(base.wrapping_add(hv) as *const u8, hl as usize),
                std::slice::from_raw_parts(base.wrapping_add(ev) as *const u8, el as usize),
            )
        };
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            eh_frame_hdr_svma: Some(hv..hv + hl),
            eh_frame_hdr: Some(hdr),
            eh_frame_svma: Some(ev..ev + el),
            eh_frame: Some(eh),
            ..Default::default()
        };
        unw.add_module(framehop::Module::new(
            m.info.path.clone(),
            m.start..m.end,
            base,
            info,
        ));
    }
    unw
}

/// The address range of the module that holds this function: the tracker's own frames.
pub fn own_module_range(modules: &[LoadedModule]) -> (u64, u64) {
    let here = own_module_range as *const () as u64;
    modules
        .iter()
        .find(|m| here >= m.start && here < m.end)
        .map(|m| (m.start, m.end))
        .unwrap_or((0, 0))
}

/// Where to stop dropping the tracker's own leading frames.
#[derive(Clone, Copy, Debug)]
pub enum Skip {
    /// Drop leading frames inside this address range (the preload library).
    Range(u64, u64),
    /// Drop this many leading frames (the tracker is linked into the program).
    Count(usize),
}

/// Unwinds the calling thread's stack into `out`, leaf first, without the tracker's own
/// frames. `stack_hi` is the top of this thread's stack: no read goes above it or below the
/// current stack pointer. Returns the number of frames and whether the walk reached the root
/// (false when it stopped early, e.g. in code of a module the unwinder does not know).
#[inline(never)]
pub fn capture(
    unw: &CfiUnwinder,
    cache: &mut UnwCache,
    stack_hi: u64,
    skip: Skip,
    out: &mut [u64],
) -> (usize, bool) {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers; touches no memory and no flags.
    unsafe {
        std::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags)
        );
    }
    let mut read_stack = |addr: u64| {
        if addr >= sp
            && addr.checked_add(8).is_some_and(|e| e <= stack_hi)
            && addr.is_multiple_of(8)
        {
            // SAFETY: [sp, stack_hi) is this thread's live stack, mapped and readable.
            Ok(unsafe { std::ptr::read(addr as *const u64) })
        } else {
            Err(())
        }
    };
    let mut it = unw.iter_frames(
        ip,
        UnwindRegsX86_64::new(ip, sp, bp),
        cache,
        &mut read_stack,
    );
    let mut n = 0;
    let mut skipped = 0usize;
    let mut skipping = true;
    loop {
        let frame = match it.next() {
            Ok(Some(f)) => f,
            Ok(None) => return (n, true),
            Err(_) => return (n, false),
        };
        let addr = frame.address();
        if skipping {
            let own = match skip {
                Skip::Range(lo, hi) => addr >= lo && addr < hi,
                Skip::Count(c) => skipped < c,
            };
            if own {
                skipped += 1;
                continue;
            }
            skipping = false;
        }
        if n == out.len() {
            return (n, true);
        }
        out[n] = addr;
        n += 1;
    }
}

/// The registers of the program's frame that called an allocation function, as the preload
/// trampolines capture them on entry: the return address, the stack pointer after the return,
/// and rbp (callee-saved, so still the caller's).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Caller {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// Recent results of [`caller_above`] on a thread: unwinding is a pure function of the
/// starting registers, the rules and the stack words read, so when all of them repeat, so does
/// the result. Several, for an allocation function called at a few depths in turn.
#[derive(Default)]
pub struct AboveMemo {
    entries: [AboveEntry; ABOVE_MEMO],
    next: usize,
}

const ABOVE_MEMO: usize = 4;

#[derive(Default)]
struct AboveEntry {
    /// (ip, sp, marker) of the start; None: empty.
    key: Option<(u64, u64, u64)>,
    /// The start's bp, when a step may have used it. Code built without frame pointers keeps
    /// any value in rbp, so comparing it always would find nothing again.
    bp: Option<u64>,
    reads: Vec<(u64, u64)>,
    result: Option<Caller>,
    /// The result's bp is the start's (no frame in between restored it).
    passes_bp: bool,
}

impl AboveMemo {
    /// Forgets the results (the modules, hence the rules, changed).
    pub fn invalidate(&mut self) {
        for e in &mut self.entries {
            e.key = None;
        }
    }
}

/// The registers of the frame that called the function whose frame holds `marker` (the address
/// of one of its locals), found by unwinding from `start`, registers taken in that function's
/// own frame by [`here_regs`]: one step reaches the caller. For the tracker linked into a Rust
/// program, where no trampoline hands over the program's registers. `None` when the walk fails
/// before it gets there.
#[inline(never)]
pub fn caller_above(
    unw: &CfiUnwinder,
    cache: &mut UnwCache,
    memo: &mut AboveMemo,
    stack_hi: u64,
    start: Caller,
    marker: u64,
) -> Option<Caller> {
    let sp0 = start.sp;
    if marker < sp0 || marker >= stack_hi {
        return None;
    }
    let key = Some((start.ip, start.sp, marker));
    let same = |reads: &[(u64, u64)]| {
        reads.iter().all(|&(a, v)| {
            // SAFETY: each address was read from this thread's live stack, within
            // [sp0, stack_hi), by the walk that made the entry from the same stack pointer.
            let now = unsafe { std::ptr::read(a as *const u64) };
            now == v
        })
    };
    let hit = memo
        .entries
        .iter()
        .find(|e| e.key == key && e.bp.is_none_or(|bp| bp == start.bp) && same(&e.reads));
    if let Some(e) = hit {
        return e.result.map(|mut r| {
            if e.passes_bp {
                r.bp = start.bp;
            }
            r
        });
    }
    let e = &mut memo.entries[memo.next];
    memo.next = (memo.next + 1) % ABOVE_MEMO;
    e.key = None;
    e.reads.clear();
    let reads = &mut e.reads;
    let mut read_stack = |addr: u64| {
        if addr >= sp0
            && addr.checked_add(8).is_some_and(|e| e <= stack_hi)
            && addr.is_multiple_of(8)
        {
            // SAFETY: [sp0, stack_hi) is this thread's live stack, mapped and readable.
            let v = unsafe { std::ptr::read(addr as *const u64) };
            reads.push((addr, v));
            Ok(v)
        } else {
            Err(())
        }
    };
    let (result, uses_bp) = unwind_above(unw, cache, start, marker, &mut read_stack);
    // framehop leaves bp as it was or loads it from the stack. Equal to the start's and to no
    // word read, it was left; equal to both, which is not known, so the entry needs the same bp.
    let kept = result.is_some_and(|r| r.bp == start.bp);
    let loaded = result.is_some_and(|r| e.reads.iter().any(|&(_, v)| v == r.bp));
    e.key = key;
    e.bp = (uses_bp || (kept && loaded)).then_some(start.bp);
    e.passes_bp = kept && !loaded;
    e.result = result;
    result
}

/// Unwinds from `start` to the first frame whose stack pointer is above `marker`; and whether a
/// step may have used bp (a caller frame found a little above bp, as the frame pointer rule
/// finds it; a coincidence only makes the memo stricter).
fn unwind_above(
    unw: &CfiUnwinder,
    cache: &mut UnwCache,
    start: Caller,
    marker: u64,
    read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
) -> (Option<Caller>, bool) {
    let mut regs = UnwindRegsX86_64::new(start.ip, start.sp, start.bp);
    let Some(mut frame) = framehop::FrameAddress::from_return_address(start.ip) else {
        return (None, false);
    };
    let mut uses_bp = false;
    // The marker's frame, and any frame of a function inlined differently than expected.
    for _ in 0..32 {
        let bp = regs.bp();
        let Some(ra) = unw
            .unwind_frame(frame, &mut regs, cache, read_stack)
            .ok()
            .flatten()
        else {
            return (None, true);
        };
        uses_bp |= regs.sp().wrapping_sub(bp) < BP_WINDOW;
        if regs.sp() > marker {
            let caller = Caller {
                ip: ra,
                sp: regs.sp(),
                bp: regs.bp(),
            };
            return (Some(caller), uses_bp);
        }
        let Some(next) = framehop::FrameAddress::from_return_address(ra) else {
            return (None, true);
        };
        frame = next;
    }
    (None, true)
}

/// The registers of the function this is inlined into, at a call site of it (whose unwind rule
/// framehop caches, where an arbitrary instruction's rule is evaluated from DWARF every time).
#[inline(always)]
pub fn here_regs() -> Caller {
    let mut start = Caller {
        ip: 0,
        sp: 0,
        bp: 0,
    };
    // SAFETY: `here` writes the three fields of `start` and returns.
    unsafe { here(&mut start) };
    start
}

/// Writes its caller's registers at the call: the return address, the stack pointer after the
/// return, and rbp.
///
/// # Safety
/// `out` must be valid for writes.
#[unsafe(naked)]
unsafe extern "C" fn here(out: *mut Caller) {
    core::arch::naked_asm!(
        "mov rax, [rsp]",
        "mov [rdi], rax",
        "lea rax, [rsp + 8]",
        "mov [rdi + 8], rax",
        "mov [rdi + 16], rbp",
        "ret",
    )
}

/// An upper bound of the calling thread's stack: no stack read goes at or above it.
///
/// Found without a lock or an allocation, because it runs inside malloc: `pthread_getattr_np`
/// holds the thread's lock while it allocates (and a program may be inside it when its malloc
/// reaches us: Rust's runtime calls it at start-up), so calling it here would deadlock. glibc
/// puts a thread's descriptor (`pthread_self()`) at the top of the thread's stack block, above
/// the stack; the main thread's stack ends just above `__libc_stack_end` (argc, argv and the
/// environment follow), and the rest of that page is mapped.
pub fn current_stack_top() -> u64 {
    // SAFETY: gettid/getpid/pthread_self have no preconditions.
    let (tid, pid, tcb) = unsafe { (libc::gettid(), libc::getpid(), libc::pthread_self() as u64) };
    if tid != pid {
        return tcb;
    }
    let end = libc_stack_end();
    if end == 0 {
        return 0;
    }
    (end | 4095) + 1
}

fn libc_stack_end() -> u64 {
    static END: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *END.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; the symbol, when present, is a pointer-sized
        // variable of the dynamic loader holding the initial stack pointer.
        unsafe {
            let p = libc::dlsym(libc::RTLD_DEFAULT, c"__libc_stack_end".as_ptr()) as *const u64;
            if p.is_null() {
                0
            } else {
                *p
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_build_ids_and_eh_frame_of_this_test_binary() {
        let mods = enumerate_modules();
        assert!(!mods.is_empty());
        assert!(
            mods[0].info.path.contains("memtrack_tracker"),
            "{}",
            mods[0].info.path
        );
        assert!(mods.iter().any(|m| m.info.path.contains("libc.so")));
        assert!(mods.iter().all(|m| m.start < m.end));
        assert!(mods.iter().any(|m| m.info.build_id.len() == 20));
        assert!(mods[0].eh_frame.is_some());
    }

    #[inline(never)]
    fn nested(depth: u32, out: &mut Vec<u64>) -> usize {
        if depth == 0 {
            let mods = enumerate_modules();
            let unw = build_unwinder(&mods);
            let mut cache = UnwCache::new();
            out.resize(MAX_FRAMES, 0);
            let (n, complete) = capture(&unw, &mut cache, current_stack_top(), Skip::Count(0), out);
            assert!(complete);
            out.truncate(n);
            n
        } else {
            let r = nested(depth - 1, out);
            std::hint::black_box(r)
        }
    }

    #[test]
    fn unwinds_through_recursive_frames() {
        let mut frames = Vec::new();
        let n = nested(20, &mut frames);
        // capture + 21 nested frames + the test harness below them.
        assert!(n > 22, "only {n} frames");
        let here = nested as *const () as u64;
        let in_nested = frames
            .iter()
            .filter(|&&a| a > here && a < here + 4096)
            .count();
        assert!(
            in_nested >= 20,
            "{in_nested} frames in nested(): {frames:x?}"
        );
    }
}
