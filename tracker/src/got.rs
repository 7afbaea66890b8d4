//! Redirects a running process's allocator calls to the hooks by rewriting relocation slots:
//! used when `libmemtrack.so` was loaded into a process already running (`memtrack attach`,
//! `memtrack.Tracker`), where no symbol lookup would ever reach its exports.
//!
//! Every loaded module (but the loader, the vdso and this library) has its `GLOB_DAT`,
//! `JUMP_SLOT` and `R_X86_64_64` slots naming a hooked function pointed at the hook, as
//! heaptrack's injection does. Releasing functions are redirected before allocating ones and
//! restored after them: a free of a block whose allocation went unseen is harmless (counted
//! apart), an allocation whose free goes unseen would be a false leak. A slot is redirected only
//! when it holds the process's own definition of the function or its module's lazy-binding
//! stub (a module bound to an allocator of its own keeps it), and restored only while it still
//! holds the hook. Slots in a `PT_GNU_RELRO` range are made writable for the store and
//! read-only again after it.
//!
//! Must never: run outside the guard, write a slot of a module that is no longer loaded, or
//! unload anything.

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Hooked functions, in the order their slots are redirected: the functions that only release
/// (`free`, `munmap`) first, then those that release and hand out (`realloc`, `reallocarray`,
/// `mremap`), then the rest; restored in the reverse order. So while slots change, a block a
/// hook recorded is never released through a slot that is not hooked (the next block at its
/// address would be recorded over it), and a release may only miss blocks not recorded.
pub const NAMES: [&CStr; 27] = [
    c"free",
    c"munmap",
    c"realloc",
    c"reallocarray",
    c"mremap",
    c"malloc",
    c"calloc",
    c"posix_memalign",
    c"aligned_alloc",
    c"memalign",
    c"valloc",
    c"pvalloc",
    c"mmap",
    c"mmap64",
    c"dlopen",
    c"dlclose",
    c"execve",
    c"execv",
    c"execvp",
    c"execvpe",
    c"execl",
    c"execle",
    c"execlp",
    c"fexecve",
    c"_exit",
    c"_Exit",
    c"abort",
];

/// The releasing functions lead [`NAMES`], those that only release first. (`cfree` is left
/// out: glibc keeps it only for old binaries, and looking it up would fail.)
const RELEASING_ONLY: usize = 2;
const RELEASING: usize = 5;

/// The order in which a name's slots are redirected (restored in the reverse order): 0 for
/// the functions that only release, 1 for those that release and hand out, 2 for the rest.
fn tier(name: usize) -> usize {
    match name {
        n if n < RELEASING_ONLY => 0,
        n if n < RELEASING => 1,
        _ => 2,
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicUsize = AtomicUsize::new(0);
/// This library's hook for each of [`NAMES`].
static HOOKS: [AtomicUsize; NAMES.len()] = [ZERO; NAMES.len()];
/// The function each slot is expected to hold: the process's own definition of the name.
static ORIGINALS: [AtomicUsize; NAMES.len()] = [ZERO; NAMES.len()];

/// Finds this library's hooks: its own definitions of [`NAMES`] (`dlopen`'s is
/// `memtrack_attach_dlopen`). Looked up through a handle of this library itself: a plain
/// reference to an exported function from inside the library goes through its own relocation
/// slot, bound to the first definition in the process (libc's, when loaded late).
fn resolve_hooks() -> bool {
    if HOOKS[0].load(Ordering::Acquire) != 0 {
        return true;
    }
    // SAFETY: dladdr/dlopen/dlsym/dlclose with valid arguments; the handle is released.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(resolve_hooks as *const () as *const c_void, &mut info) == 0
            || info.dli_fname.is_null()
        {
            return false;
        }
        let h = libc::dlopen(info.dli_fname, libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if h.is_null() {
            return false;
        }
        for (i, name) in NAMES.iter().enumerate().rev() {
            let symbol = if *name == c"dlopen" {
                c"memtrack_attach_dlopen"
            } else {
                name
            };
            let f = libc::dlsym(h, symbol.as_ptr()) as usize;
            let mut at: libc::Dl_info = std::mem::zeroed();
            // Only this library's own definition will do.
            if f != 0
                && libc::dladdr(f as *const c_void, &mut at) != 0
                && at.dli_fbase == info.dli_fbase
            {
                HOOKS[i].store(f, Ordering::Release);
            }
        }
        libc::dlclose(h);
    }
    HOOKS[0].load(Ordering::Acquire) != 0
}

/// True when this library's hooks are found.
pub(crate) fn hooks_registered() -> bool {
    resolve_hooks()
}

/// One redirected slot.
#[derive(Clone, Copy)]
struct Patch {
    /// The module's load bias, to tell whether it is still loaded when restoring.
    module: usize,
    slot: usize,
    old: usize,
    hook: usize,
    /// Index into [`NAMES`].
    name: usize,
    relro: Option<(usize, usize)>,
}

/// The slots redirected, and the modules whose slots were looked through (load bias and
/// dynamic section: a later pass skips them; `forget_unloaded` drops those unloaded since).
struct Patched {
    slots: Vec<Patch>,
    scanned: Vec<(usize, usize)>,
}

static PATCHES: Mutex<Patched> = Mutex::new(Patched {
    slots: Vec::new(),
    scanned: Vec::new(),
});

/// What `patch_all` and `restore_all` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub slots: usize,
    pub modules: usize,
    /// Slots left alone: bound elsewhere, or their page could not be made writable.
    pub skipped: usize,
}

/// The symbol lookups `patch_all` needs, made ahead (on the writer thread: see
/// `inproc::writer_prepared`).
pub(crate) fn prepare() {
    resolve_originals();
    resolve_hooks();
}

/// Redirects every loaded module's slots of the hooked functions (again: slots already
/// redirected are kept; modules loaded since are added). Runs inside the guard.
pub(crate) fn patch_all() -> Counts {
    resolve_originals();
    if !resolve_hooks() {
        return Counts::default();
    }
    let Ok(mut patched) = PATCHES.lock() else {
        return Counts::default();
    };
    let patched = &mut *patched;
    let mut counts = Counts::default();
    let mut fresh = Vec::new();
    // One pass over all modules per tier, in `NAMES`' order (see there).
    for pass in [
        0..RELEASING_ONLY,
        RELEASING_ONLY..RELEASING,
        RELEASING..NAMES.len(),
    ] {
        counts.modules = 0;
        with_modules(&mut |m| {
            counts.modules += 1;
            if patched.scanned.contains(&(m.bias, m.dynamic)) {
                return;
            }
            if pass.start == 0 {
                fresh.push((m.bias, m.dynamic));
            }
            // SAFETY: `m` is a module the loader lists now, and it stays mapped while its
            // entry is being visited (see `with_modules`).
            unsafe {
                for_each_slot(m, |slot, name| {
                    if !pass.contains(&name) {
                        return;
                    }
                    let hook = HOOKS[name].load(Ordering::Acquire);
                    if hook == 0 {
                        return;
                    }
                    let cur = (slot as *const usize).read_volatile();
                    if cur == hook {
                        return;
                    }
                    let original = ORIGINALS[name].load(Ordering::Acquire);
                    let lazy_stub = m.contains(cur);
                    // A null slot is an undefined weak reference the program tests: left null.
                    if cur == 0 || original == 0 || (cur != original && !lazy_stub) {
                        counts.skipped += 1;
                        return;
                    }
                    let relro = m.relro_page(slot);
                    if store(slot, hook, relro) {
                        patched.slots.push(Patch {
                            module: m.bias,
                            slot,
                            old: cur,
                            hook,
                            name,
                            relro,
                        });
                        counts.slots += 1;
                    } else {
                        counts.skipped += 1;
                    }
                });
            }
        });
    }
    patched.scanned.extend(fresh);
    counts
}

/// Forgets modules unloaded since they were looked through (one loaded later at the same
/// address is then looked through again).
pub(crate) fn forget_unloaded() {
    let Ok(mut patched) = PATCHES.lock() else {
        return;
    };
    let mut loaded = Vec::new();
    with_modules(&mut |m| loaded.push((m.bias, m.dynamic)));
    patched.scanned.retain(|k| loaded.contains(k));
    patched
        .slots
        .retain(|p| loaded.iter().any(|&(b, _)| b == p.module));
}

/// Puts back every redirected slot that still holds its hook, in modules still loaded: the
/// tiers of [`NAMES`] in the reverse order (functions that only hand out first, `free` and
/// `munmap` last). Runs inside the guard.
pub(crate) fn restore_all() -> Counts {
    let Ok(mut patched) = PATCHES.lock() else {
        return Counts::default();
    };
    patched.scanned.clear();
    let order: Vec<Patch> = patched.slots.drain(..).collect();
    let mut counts = Counts::default();
    for t in [2, 1, 0] {
        with_modules(&mut |m| {
            counts.modules += usize::from(t == 2);
            for p in order.iter().filter(|p| tier(p.name) == t) {
                if p.module != m.bias || !m.contains(p.slot) {
                    continue;
                }
                // SAFETY: the slot lies in a module the loader lists now (checked above),
                // inside one of its segments; it is read before it is written.
                unsafe {
                    if (p.slot as *const usize).read_volatile() != p.hook {
                        continue;
                    }
                    if store(p.slot, p.old, p.relro) {
                        counts.slots += 1;
                    } else {
                        counts.skipped += 1;
                    }
                }
            }
        });
    }
    counts
}

fn resolve_originals() {
    for (i, name) in NAMES.iter().enumerate() {
        if ORIGINALS[i].load(Ordering::Acquire) == 0 {
            ORIGINALS[i].store(crate::real::process_definition(name), Ordering::Release);
        }
    }
}

/// Writes `value` into `slot`, making a read-only page writable for the store and read-only
/// again after it.
///
/// # Safety
/// `slot` is an 8-byte aligned relocation slot of a loaded module.
unsafe fn store(slot: usize, value: usize, relro: Option<(usize, usize)>) -> bool {
    if let Some((start, len)) = relro {
        // SAFETY: the range is the module's own RELRO pages, mapped.
        if unsafe {
            libc::mprotect(
                start as *mut c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } != 0
        {
            return false;
        }
    }
    // One aligned 8-byte store: a thread calling through the slot meanwhile sees either value.
    // SAFETY: the caller's contract; the page is writable here.
    unsafe { (*(slot as *const AtomicUsize)).store(value, Ordering::SeqCst) };
    if let Some((start, len)) = relro {
        // SAFETY: as above.
        unsafe { libc::mprotect(start as *mut c_void, len, libc::PROT_READ) };
    }
    true
}

/// A loaded module as the loader describes it, with what slot rewriting needs.
struct Module {
    bias: usize,
    /// The module's loaded segments: `[start, end)`.
    segments: Vec<(usize, usize)>,
    relro: Option<(usize, usize)>,
    dynamic: usize,
}

impl Module {
    fn contains(&self, addr: usize) -> bool {
        self.segments.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// The page range to unprotect for a store to `slot`, when it lies in RELRO.
    fn relro_page(&self, slot: usize) -> Option<(usize, usize)> {
        let (s, e) = self.relro?;
        (slot >= s && slot < e).then(|| (slot & !(page_size() - 1), page_size()))
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

type Visit<'a> = &'a mut dyn FnMut(&Module);

/// Calls `f` for each loaded module whose slots may be rewritten (all but the loader, the vdso
/// and this library), inside `dl_iterate_phdr`'s callback: the loader holds its list lock
/// there, and `dlclose` removes a module from the list under that lock before unmapping it, so
/// the module stays mapped while `f` looks at it.
fn with_modules(f: Visit<'_>) {
    let mut f = f;
    // SAFETY: the callback reads only the phdr array the loader hands it, for the length it
    // states; `data` points to `f`, alive for the call.
    unsafe {
        libc::dl_iterate_phdr(Some(collect), &mut f as *mut Visit<'_> as *mut c_void);
    }
}

unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY: `data` is the visitor passed by `with_modules`; `info` is valid for this call.
    let (f, info) = unsafe { (&mut *(data as *mut Visit<'_>), &*info) };
    let name = if info.dlpi_name.is_null() {
        &b""[..]
    } else {
        // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
        unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
    };
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    if contains(name, b"/ld-linux") || contains(name, b"linux-vdso") || name.starts_with(b"linux-")
    {
        return 0;
    }
    let bias = info.dlpi_addr as usize;
    // SAFETY: the loader guarantees dlpi_phdr points to dlpi_phnum entries.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let mut m = Module {
        bias,
        segments: Vec::new(),
        relro: None,
        dynamic: 0,
    };
    for ph in phdrs {
        let start = bias.wrapping_add(ph.p_vaddr as usize);
        let end = start.wrapping_add(ph.p_memsz as usize);
        match ph.p_type {
            libc::PT_LOAD => m.segments.push((start, end)),
            libc::PT_DYNAMIC => m.dynamic = start,
            libc::PT_GNU_RELRO => m.relro = Some((start, end)),
            _ => {}
        }
    }
    let own = collect as *const () as usize;
    if m.dynamic == 0 || m.contains(own) {
        return 0;
    }
    f(&m);
    0
}

const DT_NULL: i64 = 0;
const DT_PLTRELSZ: i64 = 2;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const DT_RELA: i64 = 7;
const DT_RELASZ: i64 = 8;
const DT_STRSZ: i64 = 10;
const DT_PLTREL: i64 = 20;
const DT_JMPREL: i64 = 23;
const R_X86_64_64: u32 = 1;
const R_X86_64_GLOB_DAT: u32 = 6;
const R_X86_64_JUMP_SLOT: u32 = 7;

#[repr(C)]
struct Dyn {
    tag: i64,
    val: u64,
}

#[repr(C)]
struct Rela {
    offset: u64,
    info: u64,
    addend: i64,
}

#[repr(C)]
struct Sym {
    name: u32,
    info: u8,
    other: u8,
    shndx: u16,
    value: u64,
    size: u64,
}

/// Calls `f(slot address, index into NAMES)` for each relocation slot of `m` naming a hooked
/// function.
///
/// # Safety
/// `m` describes a module loaded now, whose dynamic section and the tables it points to are
/// mapped (the loader keeps them while the module is loaded).
unsafe fn for_each_slot(m: &Module, mut f: impl FnMut(usize, usize)) {
    let (mut symtab, mut strtab, mut strsz) = (0usize, 0usize, 0usize);
    let (mut rela, mut relasz, mut jmprel, mut pltrelsz, mut pltrel) = (0, 0, 0, 0, DT_RELA);
    // Most tags' addresses are relocated in place by the loader; a value below the bias was
    // not (some loaders keep the dynamic section read-only).
    let addr = |v: u64| -> usize {
        let v = v as usize;
        if v < m.bias {
            m.bias.wrapping_add(v)
        } else {
            v
        }
    };
    let mut d = m.dynamic as *const Dyn;
    // SAFETY: the dynamic section is an array ending with DT_NULL (the caller's contract).
    unsafe {
        for _ in 0..4096 {
            let e = &*d;
            match e.tag {
                DT_NULL => break,
                DT_SYMTAB => symtab = addr(e.val),
                DT_STRTAB => strtab = addr(e.val),
                DT_STRSZ => strsz = e.val as usize,
                DT_RELA => rela = addr(e.val),
                DT_RELASZ => relasz = e.val as usize,
                DT_JMPREL => jmprel = addr(e.val),
                DT_PLTRELSZ => pltrelsz = e.val as usize,
                DT_PLTREL => pltrel = e.val as i64,
                _ => {}
            }
            d = d.add(1);
        }
    }
    if symtab == 0 || strtab == 0 {
        return;
    }
    let mut tables = vec![(rela, relasz)];
    if pltrel == DT_RELA {
        tables.push((jmprel, pltrelsz));
    }
    for (start, size) in tables {
        if start == 0 || !m.contains(start) {
            continue;
        }
        let n = size / std::mem::size_of::<Rela>();
        for i in 0..n {
            // SAFETY: inside the table the dynamic section names, of `n` entries.
            let r = unsafe { &*(start as *const Rela).add(i) };
            let kind = (r.info & 0xffff_ffff) as u32;
            let sym = (r.info >> 32) as usize;
            let wanted = matches!(kind, R_X86_64_JUMP_SLOT | R_X86_64_GLOB_DAT)
                || (kind == R_X86_64_64 && r.addend == 0);
            if !wanted || sym == 0 {
                continue;
            }
            // SAFETY: the symbol table has an entry for every index a relocation names.
            let s = unsafe { &*(symtab as *const Sym).add(sym) };
            let off = s.name as usize;
            if off >= strsz {
                continue;
            }
            // SAFETY: the string table holds NUL-terminated names inside its `strsz` bytes.
            let name = unsafe { CStr::from_ptr((strtab + off) as *const std::os::raw::c_char) };
            let Some(idx) = NAMES.iter().position(|n| *n == name) else {
                continue;
            };
            let slot = m.bias.wrapping_add(r.offset as usize);
            if !slot.is_multiple_of(8) || !m.contains(slot) {
                continue;
            }
            f(slot, idx);
        }
    }
}
