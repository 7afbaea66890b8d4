//! What a module's file tells beyond DWARF: its symbols with their sizes (`.symtab` and
//! `.dynsym`), the function bounds of its `.eh_frame`, the names behind its PLT stubs, and its
//! machine code, read to recognise allocation wrappers (x86-64 only).
//!
//! The nearest preceding symbol is not the function of an address in a stripped binary: the
//! local functions between two exported ones have no symbol. A symbol names an address only
//! within its size; past it, `.eh_frame` still tells where the enclosing function starts.

use addr2line::gimli;
use memtrack_format::hash::FastMap;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, RelocationTarget};
use std::path::Path;

/// A function symbol: start and size (in the file's addresses) and name.
struct Sym {
    addr: u64,
    size: u64,
    name: Box<str>,
}

/// A module's file, read once: symbols, function bounds, PLT names, code.
pub(crate) struct ModuleFile {
    /// Sorted by address; several names at one address (aliases) keep the preferred first.
    syms: Vec<Sym>,
    /// `.eh_frame` functions, sorted by start: (start, end).
    fdes: Vec<(u64, u64)>,
    /// GOT slot -> the symbol its dynamic relocation names (what a PLT stub jumps to).
    got: FastMap<u64, Box<str>>,
    /// Executable segments: (address, file offset, size in the file).
    exec: Vec<(u64, u64, u64)>,
    data: Option<memmap2::Mmap>,
    x86_64: bool,
}

/// A function found for an address.
pub(crate) struct Function<'a> {
    pub start: u64,
    pub end: u64,
    /// Its symbol's name, when a symbol covers the address.
    pub name: Option<&'a str>,
}

fn map(path: &Path) -> Option<memmap2::Mmap> {
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: the mapping is read-only and private; a file truncated while mapped can fault, as
    // with every reader of mapped files (the capture itself is read so).
    unsafe { memmap2::Mmap::map(&f) }.ok()
}

fn add_symbols<'d>(obj: &object::File<'d>, out: &mut Vec<(Sym, u8)>) {
    let mut take = |s: object::Symbol<'d, '_>, rank: u8| {
        if !s.is_definition() || s.address() == 0 {
            return;
        }
        if !matches!(
            s.kind(),
            object::SymbolKind::Text | object::SymbolKind::Unknown
        ) {
            return;
        }
        let Ok(name) = s.name() else { return };
        if name.is_empty() {
            return;
        }
        // Prefer global names to local ones (glibc's `__GI_` aliases), then .symtab's order.
        let rank = rank + if s.is_global() { 0 } else { 2 };
        out.push((
            Sym {
                addr: s.address(),
                size: s.size(),
                name: name.into(),
            },
            rank,
        ));
    };
    for s in obj.symbols() {
        take(s, 0);
    }
    for s in obj.dynamic_symbols() {
        take(s, 1);
    }
}

impl ModuleFile {
    /// Reads `path` (the module) and, when it is another file, `debug` (its separate debug
    /// file, whose `.symtab` often has what the stripped module lost).
    pub fn open(path: &Path, debug: Option<&Path>) -> Option<ModuleFile> {
        let data = map(path)?;
        let obj = object::File::parse(&*data).ok()?;
        let mut syms = Vec::new();
        add_symbols(&obj, &mut syms);
        if let Some(d) = debug.filter(|d| *d != path) {
            if let Some(dd) = map(d) {
                if let Ok(dobj) = object::File::parse(&*dd) {
                    add_symbols(&dobj, &mut syms);
                }
            }
        }
        syms.sort_by(|a, b| {
            (a.0.addr, a.1, b.0.size, a.0.name.len()).cmp(&(
                b.0.addr,
                b.1,
                a.0.size,
                b.0.name.len(),
            ))
        });
        // One entry per address: the preferred name, with the largest size seen there.
        let mut merged: Vec<Sym> = Vec::with_capacity(syms.len());
        for (s, _) in syms {
            match merged.last_mut() {
                Some(last) if last.addr == s.addr => last.size = last.size.max(s.size),
                _ => merged.push(s),
            }
        }
        let fdes = eh_frame_functions(&obj);
        let mut got = FastMap::default();
        if let Some(relocs) = obj.dynamic_relocations() {
            // Dynamic relocations name symbols of .dynsym by index.
            let dynsyms: FastMap<usize, &str> = obj
                .dynamic_symbols()
                .filter_map(|s| Some((s.index().0, s.name().ok()?)))
                .collect();
            for (slot, r) in relocs {
                if let RelocationTarget::Symbol(i) = r.target() {
                    if let Some(n) = dynsyms.get(&i.0).filter(|n| !n.is_empty()) {
                        got.insert(slot, (*n).into());
                    }
                }
            }
        }
        let exec = obj
            .segments()
            .filter(|s| {
                matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0)
            })
            .map(|s| {
                let (off, size) = s.file_range();
                (s.address(), off, size)
            })
            .collect();
        let x86_64 = obj.architecture() == object::Architecture::X86_64;
        drop(obj);
        Some(ModuleFile {
            syms: merged,
            fdes,
            got,
            exec,
            data: Some(data),
            x86_64,
        })
    }

    /// The `.eh_frame` function that holds `addr`.
    fn fde(&self, addr: u64) -> Option<(u64, u64)> {
        let i = self.fdes.partition_point(|&(s, _)| s <= addr);
        let (s, e) = *self.fdes.get(i.checked_sub(1)?)?;
        (addr < e).then_some((s, e))
    }

    /// The function that holds `addr` (a file address): the symbol whose extent covers it
    /// (a symbol of size 0 only when `.eh_frame` has a function starting at it, whose end is
    /// then its end), else the `.eh_frame` function without a name.
    pub fn function(&self, addr: u64) -> Option<Function<'_>> {
        let fde = self.fde(addr);
        let i = self.syms.partition_point(|s| s.addr <= addr);
        // The nearest symbol first, then a few before it (a symbol nested in a larger one).
        for s in self.syms[..i].iter().rev().take(8) {
            let end = if s.size > 0 {
                s.addr.saturating_add(s.size)
            } else {
                match fde {
                    Some((fs, fe)) if fs == s.addr => fe,
                    _ => continue,
                }
            };
            if addr < end {
                return Some(Function {
                    start: s.addr,
                    end,
                    name: Some(&s.name),
                });
            }
        }
        fde.map(|(start, end)| Function {
            start,
            end,
            name: None,
        })
    }

    /// The symbol that starts exactly at `addr`.
    fn symbol_at(&self, addr: u64) -> Option<&str> {
        let i = self.syms.partition_point(|s| s.addr < addr);
        self.syms
            .get(i)
            .filter(|s| s.addr == addr)
            .map(|s| &*s.name)
    }

    /// The code bytes from `start` to `end` (file addresses), when the file has them.
    fn code(&self, start: u64, end: u64) -> Option<&[u8]> {
        let data = self.data.as_deref()?;
        let &(a, off, _) = self
            .exec
            .iter()
            .find(|&&(a, _, size)| start >= a && end <= a + size)?;
        let from = usize::try_from(off + (start - a)).ok()?;
        let to = usize::try_from(off + (end - a)).ok()?;
        data.get(from..to)
    }

    /// The name of what a call to `target` reaches: a PLT stub's symbol (its `jmp *slot`
    /// read, the slot's relocation named), else the symbol starting there.
    fn target_name(&self, target: u64) -> Option<&str> {
        if let Some(code) = self.code(target, target + 16) {
            let mut c = code;
            if c.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
                c = &c[4..]; // endbr64
            }
            if c.first() == Some(&0xf2) {
                c = &c[1..]; // bnd
            }
            if c.len() >= 6 && c[0] == 0xff && c[1] == 0x25 {
                let disp = i32::from_le_bytes([c[2], c[3], c[4], c[5]]) as i64;
                let next = target + (code.len() - c.len()) as u64 + 6;
                if let Some(n) = self.got.get(&next.wrapping_add(disp as u64)) {
                    return Some(n);
                }
            }
        }
        self.symbol_at(target)
    }

    /// Whether the function holding `addr` (a return address less one, file address) is an
    /// allocation wrapper: see [`Wrapper`].
    pub fn is_wrapper(&self, addr: u64, inner: &Inner) -> bool {
        if !self.x86_64 {
            return false;
        }
        let Some(f) = self.function(addr) else {
            return false;
        };
        if f.end - f.start > WRAPPER_MAX_BYTES {
            return false;
        }
        let Some(code) = self.code(f.start, f.end) else {
            return false;
        };
        self.wrapper_code(f.start, code, inner)
    }

    fn wrapper_code(&self, start: u64, code: &[u8], inner: &Inner) -> bool {
        let end = start + code.len() as u64;
        let mut at = 0usize;
        // Argument registers that hold a constant set in this function (bit = register number).
        let mut consts: u32 = 0;
        let mut allocates = false;
        let mut failure_path = false;
        // Targets of calls that something never reached follows (padding, a trap, the end):
        // they do not return, wherever else they are called from.
        let mut noreturn = Vec::new();
        while at < code.len() {
            let Some(i) = decode(&code[at..]) else {
                return false;
            };
            at += i.len;
            if let Op::Call(rel) = i.op {
                if never_returns_here(&code[at..]) {
                    noreturn.push((start + at as u64).wrapping_add(rel as u64));
                }
            }
        }
        at = 0;
        while at < code.len() {
            let Some(i) = decode(&code[at..]) else {
                return false;
            };
            let pc = start + at as u64;
            let next = pc + i.len as u64;
            at += i.len;
            let rest = &code[at.min(code.len())..];
            let target = |rel: i64| next.wrapping_add(rel as u64);
            match i.op {
                Op::Ret | Op::Trap => {}
                Op::Other => {
                    consts = (consts & !i.clobbers) | i.sets_const;
                }
                Op::Jcc(rel) => {
                    let t = target(rel);
                    if t < start || t >= end {
                        // Into a split-off cold part (GCC's `f.cold`): the failure path.
                        failure_path = true;
                    }
                }
                Op::Jmp(rel) => {
                    let t = target(rel);
                    if t >= start && t < end {
                        continue;
                    }
                    // A tail call.
                    match self.classify(Some(t), None, inner) {
                        Callee::Alloc(args) if args & !consts != 0 || args == 0 => allocates = true,
                        Callee::Error => failure_path = true,
                        _ => return false,
                    }
                }
                Op::Call(rel) | Op::CallSlot(rel) => {
                    let (t, slot) = match i.op {
                        Op::Call(_) => (Some(target(rel)), None),
                        _ => (None, Some(target(rel))),
                    };
                    match self.classify(t, slot, inner) {
                        // Every size argument a constant: this call's size is chosen here
                        // (a fallback such as git's `calloc(1, 1)` may sit beside the
                        // caller's size); a wrapper passes on at least one size it was given.
                        Callee::Alloc(args) => allocates |= args == 0 || args & !consts != 0,
                        Callee::Helper => {}
                        Callee::Error => failure_path = true,
                        Callee::Other
                            if never_returns_here(rest)
                                || t.is_some_and(|t| noreturn.contains(&t)) =>
                        {
                            failure_path = true
                        }
                        // Both first arguments constants: a look-up of configuration, not
                        // work on the caller's data (git's xmalloc reads GIT_ALLOC_LIMIT so).
                        Callee::Other if consts & (RDI | RSI) == RDI | RSI => {}
                        Callee::Other => return false,
                    }
                    consts = 0; // the callee may have changed every argument register
                }
                Op::Indirect => return false,
            }
        }
        allocates && failure_path
    }

    fn classify(&self, target: Option<u64>, slot: Option<u64>, inner: &Inner) -> Callee {
        if let Some(t) = target {
            if inner.starts.contains(&t) {
                return Callee::Alloc(ARGS_UNKNOWN);
            }
        }
        let name = match (target, slot) {
            (Some(t), _) => self.target_name(t),
            (None, Some(s)) => self.got.get(&s).map(|n| &**n),
            _ => None,
        };
        let Some(name) = name else {
            return Callee::Other;
        };
        let name = name.split('@').next().unwrap_or(name);
        if let Some(args) = allocator_args(name) {
            return Callee::Alloc(args);
        }
        let demangled = addr2line::demangle_auto(name.into(), None);
        if inner.names.iter().any(|n| *n == demangled || n == name) {
            return Callee::Alloc(ARGS_UNKNOWN);
        }
        if HELPERS.contains(&name) {
            return Callee::Helper;
        }
        if is_error_routine(name) {
            return Callee::Error;
        }
        Callee::Other
    }
}

/// What a wrapper's inner frame is: besides the malloc family, calls to these count as the
/// allocation (the function already skipped below the one examined).
#[derive(Default)]
pub(crate) struct Inner {
    /// Start addresses (file addresses in the examined function's module).
    pub starts: Vec<u64>,
    /// Function names (demangled, and as in the symbol table).
    pub names: Vec<String>,
}

/// Functions larger than this are not wrappers (jv_mem_alloc is 25 bytes, g_malloc about 100).
const WRAPPER_MAX_BYTES: u64 = 256;

/// Argument registers as bits: rdi 7, rsi 6, rdx 2, rcx 1.
const RDI: u32 = 1 << 7;
const RSI: u32 = 1 << 6;
const RDX: u32 = 1 << 2;
const ARGS_UNKNOWN: u32 = RDI | RSI | RDX;

enum Callee {
    /// An allocator; its size arguments.
    Alloc(u32),
    /// Copies or measures (strdup-like wrappers: strlen, memcpy).
    Helper,
    /// Reports a failure (abort, die, fprintf, g_error, ...).
    Error,
    Other,
}

/// The size arguments of the allocator `name`, when it is one.
fn allocator_args(name: &str) -> Option<u32> {
    let bare = name
        .trim_start_matches("__GI_")
        .trim_start_matches("__libc_")
        .trim_start_matches('_');
    Some(match bare {
        "malloc" | "valloc" | "pvalloc" | "Znwm" | "Znam" | "strdup" | "strndup" => RDI,
        "calloc" => RDI | RSI,
        "realloc" | "aligned_alloc" | "memalign" | "ZnwmSt11align_val_t" => RSI,
        "reallocarray" => RSI | RDX,
        "posix_memalign" => RDX,
        n if n.starts_with("ZnwmRKSt9nothrow") || n.starts_with("ZnamRKSt9nothrow") => RDI,
        _ => return None,
    })
}

const HELPERS: &[&str] = &[
    "getenv",
    "secure_getenv",
    "memcpy",
    "memmove",
    "memset",
    "strlen",
    "strnlen",
    "wcslen",
    "__memcpy_chk",
    "__memset_chk",
    "__memmove_chk",
];

/// Names of failure reports: abort and exit, stdio writes, and names with a word such as
/// `error`, `die`, `fatal`, `oom` (g_error, jq's memory_exhausted, git's die, sqlite3_log).
fn is_error_routine(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "abort",
        "exit",
        "_exit",
        "_Exit",
        "perror",
        "fprintf",
        "__fprintf_chk",
        "fputs",
        "fwrite",
        "puts",
        "printf",
        "__printf_chk",
        "dprintf",
        "__dprintf_chk",
        "write",
        "raise",
        "syslog",
        "__syslog_chk",
        "__assert_fail",
        "__stack_chk_fail",
        "__fortify_fail",
        "__chk_fail",
        "_ZSt17__throw_bad_allocv",
        "_ZSt28__throw_bad_array_new_lengthv",
        "__cxa_throw",
        "__cxa_allocate_exception",
    ];
    if EXACT.contains(&name) {
        return true;
    }
    const WORDS: &[&str] = &[
        "error",
        "err",
        "die",
        "fatal",
        "abort",
        "panic",
        "oom",
        "exhausted",
        "fail",
        "failed",
        "failure",
        "nomem",
        "log",
        "warn",
        "warning",
        "assert",
        "bug",
        "crash",
    ];
    words(name).any(|w| WORDS.contains(&w.as_str()))
}

/// The lower-case words of an identifier: split at `_`, digits and lower-to-upper case changes.
fn words(name: &str) -> impl Iterator<Item = String> + '_ {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if !c.is_ascii_alphabetic() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_ascii_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_ascii_lowercase();
        cur.push(c.to_ascii_lowercase());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out.into_iter()
}

/// After a call, code nothing falls into: the function's end, a trap or padding. Compilers
/// emit a call to a `noreturn` function (an error routine without a name in a stripped
/// binary) so.
fn never_returns_here(rest: &[u8]) -> bool {
    match decode(rest) {
        None => rest.is_empty(),
        Some(i) => matches!(i.op, Op::Trap) || i.nop,
    }
}

/// The `.eh_frame` functions of a file, sorted.
fn eh_frame_functions(obj: &object::File<'_>) -> Vec<(u64, u64)> {
    use gimli::UnwindSection;
    let Some(section) = obj.section_by_name(".eh_frame") else {
        return Vec::new();
    };
    let Ok(data) = section.data() else {
        return Vec::new();
    };
    let endian = if obj.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    let mut eh = gimli::EhFrame::new(data, endian);
    eh.set_address_size(if obj.is_64() { 8 } else { 4 });
    let mut bases = gimli::BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = obj.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = obj.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let mut out = Vec::new();
    let mut entries = eh.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let gimli::CieOrFde::Fde(partial) = entry {
            if let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) {
                let start = fde.initial_address();
                if fde.len() > 0 && start != 0 {
                    out.push((start, start.saturating_add(fde.len())));
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// One decoded x86-64 instruction, as much of it as wrapper recognition needs.
struct Insn {
    len: usize,
    op: Op,
    /// Registers (bits by number) it loads with a constant.
    sets_const: u32,
    /// Registers it may write otherwise.
    clobbers: u32,
    nop: bool,
}

#[derive(Clone, Copy)]
enum Op {
    /// Relative call/jump: displacement from the next instruction.
    Call(i64),
    /// `call *slot(%rip)`: the slot's displacement from the next instruction.
    CallSlot(i64),
    Jmp(i64),
    Jcc(i64),
    /// An indirect call or jump through a register or memory.
    Indirect,
    Ret,
    /// int3, ud2, hlt.
    Trap,
    Other,
}

/// Decodes the instruction at the start of `c`: the general-purpose and common SSE
/// instructions of compiled code. Anything else is `None` (the function is then not taken for
/// a wrapper: unknown code is never guessed at).
fn decode(c: &[u8]) -> Option<Insn> {
    let mut i = 0;
    let mut opsize16 = false;
    let mut rep = false;
    // Legacy prefixes.
    while let Some(&b) = c.get(i) {
        match b {
            0x66 => opsize16 = true,
            0xf2 | 0xf3 => rep = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x67 | 0xf0 => {}
            _ => break,
        }
        i += 1;
    }
    let mut rex = 0u8;
    if let Some(&b) = c.get(i) {
        if b & 0xf0 == 0x40 {
            rex = b;
            i += 1;
        }
    }
    let rex_w = rex & 8 != 0;
    let imm_z = if opsize16 { 2 } else { 4 };
    let op = *c.get(i)?;
    i += 1;
    let mut insn = Insn {
        len: 0,
        op: Op::Other,
        sets_const: 0,
        clobbers: 0,
        nop: false,
    };
    let reg_of = |low: u8| u32::from(low & 7) + if rex & 1 != 0 { 8 } else { 0 };
    // (has ModRM, immediate bytes)
    let (modrm, imm): (bool, usize) = match op {
        0x0f => return decode_0f(c, i, rex, rep, insn),
        0x00..=0x3f => match op & 7 {
            0..=3 => (true, 0),
            4 => (false, 1),
            5 => (false, imm_z),
            _ => return None,
        },
        0x50..=0x57 => (false, 0),
        0x58..=0x5f => {
            insn.clobbers = 1 << reg_of(op);
            (false, 0)
        }
        0x63 => (true, 0),
        0x68 => (false, imm_z),
        0x69 => (true, imm_z),
        0x6a => (false, 1),
        0x6b => (true, 1),
        0x70..=0x7f => {
            let d = *c.get(i)? as i8 as i64;
            insn.len = i + 1;
            insn.op = Op::Jcc(d);
            return Some(insn);
        }
        0x80 | 0x82 | 0x83 => (true, 1),
        0x81 => (true, imm_z),
        0x84..=0x8f => (true, 0),
        0x90..=0x97 => {
            insn.nop = op == 0x90 && rex & 1 == 0;
            insn.clobbers = 1 | 1 << reg_of(op);
            (false, 0)
        }
        0x98 | 0x99 => {
            insn.clobbers = 0b101;
            (false, 0)
        }
        0x9c..=0x9f => (false, 0),
        // movs, cmps, stos, lods, scas (inlined memcpy and memset: rep movs, rep stos)
        0xa4..=0xa7 | 0xaa..=0xaf => {
            insn.clobbers = 0b1100_0011;
            (false, 0)
        }
        0xa8 => (false, 1),
        0xa9 => (false, imm_z),
        0xb0..=0xb7 => {
            insn.clobbers = 1 << reg_of(op);
            (false, 1)
        }
        0xb8..=0xbf => {
            insn.sets_const = 1 << reg_of(op);
            (false, if rex_w { 8 } else { imm_z })
        }
        0xc0 | 0xc1 => (true, 1),
        0xc2 => {
            insn.op = Op::Ret;
            insn.len = i + 2;
            return (c.len() >= insn.len).then_some(insn);
        }
        0xc3 => {
            insn.op = Op::Ret;
            insn.len = i;
            return Some(insn);
        }
        0xc6 => (true, 1),
        0xc7 => (true, imm_z),
        0xc9 => (false, 0),
        0xcc | 0xf4 => {
            insn.op = Op::Trap;
            insn.len = i;
            return Some(insn);
        }
        0xd0..=0xd3 => (true, 0),
        0xe8 | 0xe9 => {
            let d = i32::from_le_bytes(c.get(i..i + 4)?.try_into().ok()?) as i64;
            insn.len = i + 4;
            insn.op = if op == 0xe8 { Op::Call(d) } else { Op::Jmp(d) };
            return Some(insn);
        }
        0xeb => {
            let d = *c.get(i)? as i8 as i64;
            insn.len = i + 1;
            insn.op = Op::Jmp(d);
            return Some(insn);
        }
        0xf6 | 0xf7 => {
            let m = *c.get(i)?;
            let test = (m >> 3) & 7 <= 1;
            (
                true,
                if !test {
                    0
                } else if op == 0xf6 {
                    1
                } else {
                    imm_z
                },
            )
        }
        0xfe | 0xff => (true, 0),
        _ => return None,
    };
    if modrm {
        let (len, m) = modrm_len(c, i)?;
        let md = m >> 6;
        let regf = u32::from((m >> 3) & 7) + if rex & 4 != 0 { 8 } else { 0 };
        let rmf = u32::from(m & 7) + if rex & 1 != 0 { 8 } else { 0 };
        if op == 0xff {
            match (m >> 3) & 7 {
                2 if md == 0 && m & 7 == 5 => {
                    let d = i32::from_le_bytes(c.get(i + 1..i + 5)?.try_into().ok()?) as i64;
                    insn.op = Op::CallSlot(d);
                }
                2..=5 => insn.op = Op::Indirect,
                _ => {}
            }
        }
        if md == 3 {
            insn.clobbers |= 1 << rmf;
            // xor r, r / sub r, r: zero.
            if matches!(op, 0x31 | 0x33 | 0x29 | 0x2b) && regf == rmf {
                insn.sets_const = 1 << rmf;
                insn.clobbers = 0;
            }
            // mov $imm, r
            if op == 0xc7 && (m >> 3) & 7 == 0 {
                insn.sets_const = 1 << rmf;
                insn.clobbers = 0;
            }
        }
        // lea of a constant address (mod 0, rm 5: rip-relative).
        if op == 0x8d && md == 0 && m & 7 == 5 {
            insn.sets_const = 1 << regf;
        } else {
            insn.clobbers |= 1 << regf;
        }
        i += len;
    }
    finish(insn, i + imm, c)
}

/// The instruction, `len` bytes long, when `c` holds them all.
fn finish(mut insn: Insn, len: usize, c: &[u8]) -> Option<Insn> {
    insn.len = len;
    (len <= c.len()).then_some(insn)
}

/// The ModRM (+SIB, displacement) bytes at `c[i..]`: their length and the ModRM byte.
fn modrm_len(c: &[u8], i: usize) -> Option<(usize, u8)> {
    let m = *c.get(i)?;
    let md = m >> 6;
    let rm = m & 7;
    let mut len = 1;
    if md != 3 && rm == 4 {
        let sib = *c.get(i + 1)?;
        len += 1;
        if md == 0 && sib & 7 == 5 {
            len += 4;
        }
    }
    len += match md {
        0 if rm == 5 => 4,
        1 => 1,
        2 => 4,
        _ => 0,
    };
    Some((len, m))
}

/// Two-byte (0x0f) opcodes.
fn decode_0f(c: &[u8], mut i: usize, rex: u8, rep: bool, mut insn: Insn) -> Option<Insn> {
    let op = *c.get(i)?;
    i += 1;
    let (modrm, imm) = match op {
        0x05 => (false, 0), // syscall
        0x0b => {
            insn.op = Op::Trap;
            insn.len = i;
            return Some(insn);
        }
        0x1e if rep && c.get(i) == Some(&0xfa) => {
            // endbr64
            insn.nop = true;
            insn.len = i + 1;
            return Some(insn);
        }
        0x18..=0x1f => {
            insn.nop = op == 0x1f;
            (true, 0)
        }
        0x10..=0x17 | 0x28..=0x2f => (true, 0),
        0x40..=0x4f => (true, 0),
        0x50..=0x6f => (true, 0),
        0x70..=0x73 => (true, 1),
        0x74..=0x76 | 0x7e | 0x7f => (true, 0),
        0x80..=0x8f => {
            let d = i32::from_le_bytes(c.get(i..i + 4)?.try_into().ok()?) as i64;
            insn.len = i + 4;
            insn.op = Op::Jcc(d);
            return Some(insn);
        }
        0x90..=0x9f => (true, 0),
        0xa2 => (false, 0),
        0xa3 | 0xab | 0xb3 | 0xbb | 0xaf | 0xb0 | 0xb1 | 0xb6 | 0xb7 | 0xbc..=0xbf => (true, 0),
        0xa4 | 0xac | 0xba | 0xc2 | 0xc4..=0xc6 => (true, 1),
        0xa5 | 0xad | 0xc0 | 0xc1 | 0xc3 => (true, 0),
        0xc8..=0xcf => (false, 0),
        0xd0..=0xfe => (true, 0),
        _ => return None,
    };
    if modrm {
        let (len, m) = modrm_len(c, i)?;
        let regf = u32::from((m >> 3) & 7) + if rex & 4 != 0 { 8 } else { 0 };
        let rmf = u32::from(m & 7) + if rex & 1 != 0 { 8 } else { 0 };
        insn.clobbers |= 1 << regf;
        if m >> 6 == 3 {
            insn.clobbers |= 1 << rmf;
        }
        i += len;
    }
    finish(insn, i + imm, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(code: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < code.len() {
            let i = decode(&code[at..]).expect("decodes");
            out.push(i.len);
            at += i.len;
        }
        out
    }

    #[test]
    fn decodes_a_wrapper_and_its_padding() {
        // jq's jv_mem_alloc: sub $8,%rsp; call malloc; test %rax,%rax; je +5; add $8,%rsp;
        // ret; call memory_exhausted; nopl 0(%rax,%rax,1)
        let code = [
            0x48, 0x83, 0xec, 0x08, 0xe8, 0x17, 0x87, 0xfe, 0xff, 0x48, 0x85, 0xc0, 0x74, 0x05,
            0x48, 0x83, 0xc4, 0x08, 0xc3, 0xe8, 0x78, 0xff, 0xff, 0xff, 0x0f, 0x1f, 0x44, 0x00,
            0x00,
        ];
        assert_eq!(lens(&code), [4, 5, 3, 2, 4, 1, 5, 5]);
        // data16 cs nopw 0(%rax,%rax,1); movabs $imm64,%rax; endbr64; lea 0x10(%rip),%rdi
        let code = [
            0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0, 0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 0xf3,
            0x0f, 0x1e, 0xfa, 0x48, 0x8d, 0x3d, 0x10, 0, 0, 0,
        ];
        assert_eq!(lens(&code), [10, 10, 4, 7]);
        let lea = decode(&code[24..]).unwrap();
        assert_eq!(lea.sets_const, RDI);
        // mov $100,%edi is a constant size.
        assert_eq!(decode(&[0xbf, 100, 0, 0, 0]).unwrap().sets_const, RDI);
    }

    /// git's xcalloc, shortened: calloc(n, size); on NULL `die` (once followed by a constant
    /// calloc(1, 1) fallback, once at the end: so `die` does not return).
    fn xcalloc_like(with_last_die: bool) -> Vec<u8> {
        let rel = |to: i64, next: i64| ((to - next) as i32).to_le_bytes();
        let (slot, die) = (0x5000i64, 0x2000i64);
        let mut c = vec![0x53, 0x48, 0x89, 0xfb, 0xff, 0x15];
        c.extend(rel(slot, 0x100a)); // call *calloc
        c.extend([0x48, 0x85, 0xc0, 0x74, 0x02, 0x5b, 0xc3, 0xe8]);
        c.extend(rel(die, 0x1016)); // call die
        c.extend([0xbe, 1, 0, 0, 0, 0xbf, 1, 0, 0, 0, 0xff, 0x15]);
        c.extend(rel(slot, 0x1026)); // call *calloc(1, 1)
        c.extend([0x5b, 0xc3]);
        if with_last_die {
            c.push(0xe8);
            c.extend(rel(die, 0x102d));
        }
        c
    }

    #[test]
    fn a_callee_that_does_not_return_once_is_a_failure_path_everywhere() {
        let mut got = FastMap::default();
        got.insert(0x5000, "calloc".into());
        let m = ModuleFile {
            syms: Vec::new(),
            fdes: Vec::new(),
            got,
            exec: Vec::new(),
            data: None,
            x86_64: true,
        };
        let inner = Inner::default();
        assert_eq!(lens(&xcalloc_like(true)).len(), 14);
        assert!(m.wrapper_code(0x1000, &xcalloc_like(true), &inner));
        // Without the call that shows `die` never returns, the first one might: not a wrapper.
        assert!(!m.wrapper_code(0x1000, &xcalloc_like(false), &inner));
    }

    #[test]
    fn symbols_name_addresses_within_their_size_only() {
        let sym = |addr, size, name: &str| Sym {
            addr,
            size,
            name: name.into(),
        };
        let m = ModuleFile {
            syms: vec![
                sym(0x100, 4, "tiny"),
                sym(0x200, 0, "asm_entry"),
                sym(0x300, 0, "label"),
            ],
            fdes: vec![(0x108, 0x150), (0x200, 0x240)],
            got: FastMap::default(),
            exec: Vec::new(),
            data: None,
            x86_64: true,
        };
        let at = |a| {
            m.function(a)
                .map(|f| (f.start, f.end, f.name.map(str::to_string)))
        };
        assert_eq!(at(0x102), Some((0x100, 0x104, Some("tiny".into()))));
        // Past tiny's 4 bytes: the unnamed .eh_frame function there.
        assert_eq!(at(0x120), Some((0x108, 0x150, None)));
        // A size-0 symbol where an .eh_frame function starts: named, to that function's end.
        assert_eq!(at(0x210), Some((0x200, 0x240, Some("asm_entry".into()))));
        // Past it, or a size-0 symbol no .eh_frame function starts at: nothing known.
        assert_eq!(at(0x250), None);
        assert_eq!(at(0x310), None);
    }

    #[test]
    fn error_routines_by_word() {
        for n in [
            "die",
            "g_error",
            "memory_exhausted",
            "sqlite3_log",
            "report_oom",
            "xmallocFailed",
            "abort",
            "__fprintf_chk",
        ] {
            assert!(is_error_routine(n), "{n}");
        }
        for n in [
            "catalog_add",
            "dialog_new",
            "diet",
            "store",
            "errno_location_x",
        ] {
            assert!(!is_error_routine(n), "{n}");
        }
    }
}
