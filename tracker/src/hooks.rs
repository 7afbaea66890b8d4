//! Bodies of the `LD_PRELOAD` hooks. `memtrack-preload` exports the C symbols and calls these;
//! this module is public for that crate alone.
//!
//! Each hook forwards to the real function (see `real`) and, while recording, records what it
//! did. Calls made before the real functions are known are served from the bootstrap arena.
//!
//! Must never: allocate from the program's heap outside the guard, change `errno` as the
//! program sees it, or record a call the real function makes through the PLT (the guard is
//! held across the real call).

use crate::bootstrap;
use crate::guard::{self, IgnoreAllocs, SaveErrno};
use crate::lifecycle::{self, State};
use crate::real::{real_fn, Real};
use crate::real::{
    Abort, Calloc, Dlclose, Execv, Execve, Exit, Fexecve, Free, Malloc, Memalign, Mmap, Mremap,
    Munmap, PosixMemalign, Realloc, ReallocArray, UsableSize,
};
use crate::recorder::{self, alloc_event};
use crate::sampling;
use crate::session;
pub use crate::stack::unwind::Caller;
use crate::stack::StackStart;
use memtrack_format::{AllocKind, EndReason, EventKind};
use std::os::raw::{c_char, c_int, c_void};

/// The library constructor: decide about recording if no hook has yet, start the writer.
pub fn constructor() {
    session::constructor();
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
    match lifecycle::current_relaxed() {
        State::Active => IgnoreAllocs::enter(),
        State::Uninit if session::init() => IgnoreAllocs::enter(),
        _ => None,
    }
}

/// `enter` for an allocation of `size` bytes: when sampling, only a sampled one enters (the
/// unsampled path is a thread-local decrement and compare, no guard).
#[inline(always)]
fn enter_alloc(size: usize) -> Option<IgnoreAllocs> {
    match lifecycle::current_relaxed() {
        State::Active => sampled_enter(size),
        State::Uninit if session::init() => sampled_enter(size),
        _ => None,
    }
}

#[inline(always)]
fn sampled_enter(size: usize) -> Option<IgnoreAllocs> {
    if sampling::rate() != 0 && !guard::sample_take(size as u64) {
        return None;
    }
    IgnoreAllocs::enter()
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
                alloc_event(kind, p as u64, size as u64),
                StackStart::Registers(caller),
                &g,
            );
            sampling::note_sampled(p as u64);
        }
    }
}

// ---------------------------------------------------------------- the hooks

/// # Safety
/// C `malloc` contract.
#[inline]
pub unsafe fn malloc(size: usize, caller: Caller) -> *mut c_void {
    let Some(f) = real_fn!(Real::Malloc, Malloc) else {
        return bootstrap::alloc(size, 16);
    };
    let g = enter_alloc(size);
    // SAFETY: forwarding the caller's arguments to the real function.
    let p = unsafe { f(size) };
    done_alloc(g, AllocKind::Malloc, p, size, caller);
    p
}

/// # Safety
/// C `free` contract.
#[inline]
pub unsafe fn free(p: *mut c_void) {
    if p.is_null() || bootstrap::contains(p) {
        return;
    }
    let Some(f) = real_fn!(Real::Free, Free) else {
        return;
    };
    let g = sampling::enter_free(p as u64, enter);
    if let Some(g) = &g {
        // Recorded before the block goes back: no other thread can be handed it first.
        recorder::record(EventKind::Free { addr: p as u64 }, StackStart::Here, g);
    }
    // SAFETY: forwarding a pointer the program obtained from the real allocator.
    unsafe { f(p) };
    drop(g);
}

/// # Safety
/// C `calloc` contract.
#[inline]
pub unsafe fn calloc(n: usize, m: usize, caller: Caller) -> *mut c_void {
    let Some(f) = real_fn!(Real::Calloc, Calloc) else {
        // The arena is zero-initialised static memory, never reused.
        return n
            .checked_mul(m)
            .map_or(std::ptr::null_mut(), |s| bootstrap::alloc(s, 16));
    };
    let g = enter_alloc(n.saturating_mul(m));
    // SAFETY: forwarding.
    let p = unsafe { f(n, m) };
    done_alloc(g, AllocKind::Calloc, p, n.wrapping_mul(m), caller);
    p
}

#[cold]
unsafe fn realloc_from_arena(p: *mut c_void, size: usize, caller: Caller) -> *mut c_void {
    // SAFETY: malloc contract; copies at most the old block's size.
    unsafe {
        let q = malloc(size, caller);
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(
                p as *const u8,
                q as *mut u8,
                size.min(bootstrap::size_of(p)),
            );
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
    // Which halves are recorded: both, unless sampling (a free of the old block if it was
    // sampled, an allocation of the new one if it is).
    let (g, old_rec, new_rec) = if sampling::rate() == 0 {
        (enter(), true, true)
    } else {
        realloc_enter_sampled(kind, p, size)
    };
    if let (Some(g), false, true) = (&g, p.is_null(), old_rec) {
        if size == Some(0) {
            // glibc frees the block and returns NULL.
            recorder::record(EventKind::Free { addr: p as u64 }, StackStart::Here, g);
        } else {
            recorder::record(
                EventKind::ReallocFree { addr: p as u64 },
                StackStart::Here,
                g,
            );
        }
    }
    let q = call();
    if let Some(g) = &g {
        if !q.is_null() {
            if new_rec {
                let ev = alloc_event(kind, q as u64, size.unwrap_or(0) as u64);
                recorder::record(ev, StackStart::Registers(caller), g);
                sampling::note_sampled(q as u64);
            }
        } else if !p.is_null() && size != Some(0) && old_rec {
            recorder::record(EventKind::ReallocFailed, StackStart::Here, g);
            // The old block stays the program's.
            sampling::note_sampled(p as u64);
        }
    }
    q
}

/// The sampled realloc's entry: the guard when either half is recorded (always for
/// `reallocarray`, whose real function calls `realloc` through the PLT), and which halves.
#[inline(always)]
fn realloc_enter_sampled(
    kind: AllocKind,
    p: *mut c_void,
    size: Option<usize>,
) -> (Option<IgnoreAllocs>, bool, bool) {
    let set = sampling::sampled();
    let (Some(set), State::Active) = (set, lifecycle::current_relaxed()) else {
        return (None, false, false);
    };
    let new_rec = size.is_some_and(|s| s != 0 && guard::sample_take(s as u64));
    let old_maybe = !p.is_null() && set.maybe(p as u64);
    if !new_rec && !old_maybe && kind != AllocKind::ReallocArray {
        return (None, false, false);
    }
    let Some(g) = IgnoreAllocs::enter() else {
        return (None, false, false);
    };
    let old_rec = old_maybe && set.remove(p as u64);
    (Some(g), old_rec, new_rec)
}

/// # Safety
/// C `realloc` contract.
#[inline]
pub unsafe fn realloc(p: *mut c_void, size: usize, caller: Caller) -> *mut c_void {
    if bootstrap::contains(p) {
        // SAFETY: p came from the bootstrap arena.
        return unsafe { realloc_from_arena(p, size, caller) };
    }
    let Some(f) = real_fn!(Real::Realloc, Realloc) else {
        return bootstrap::alloc(size, 16);
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
    if bootstrap::contains(p) {
        return match n.checked_mul(m) {
            // SAFETY: p came from the bootstrap arena.
            Some(s) => unsafe { realloc_from_arena(p, s, caller) },
            None => std::ptr::null_mut(),
        };
    }
    let Some(f) = real_fn!(Real::ReallocArray, ReallocArray) else {
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
    let Some(f) = real_fn!(Real::PosixMemalign, PosixMemalign) else {
        let p = bootstrap::alloc(size, align);
        if p.is_null() {
            return libc::ENOMEM;
        }
        // SAFETY: out is the caller's valid out-pointer.
        unsafe { *out = p };
        return 0;
    };
    let g = enter_alloc(size);
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
                return bootstrap::alloc(size, align);
            };
            let g = enter_alloc(size);
            // SAFETY: forwarding.
            let p = unsafe { f(align, size) };
            done_alloc(g, $kind, p, size, caller);
            p
        }
    };
}
aligned_hook!(aligned_alloc, Real::AlignedAlloc, AllocKind::AlignedAlloc);
aligned_hook!(memalign, Real::Memalign, AllocKind::Memalign);

macro_rules! page_hook {
    ($name:ident, $idx:expr, $kind:expr) => {
        /// # Safety
        /// The C function's contract.
        #[inline]
        pub unsafe fn $name(size: usize, caller: Caller) -> *mut c_void {
            let Some(f) = real_fn!($idx, Malloc) else {
                return bootstrap::alloc(size, 4096);
            };
            let g = enter_alloc(size);
            // SAFETY: forwarding.
            let p = unsafe { f(size) };
            done_alloc(g, $kind, p, size, caller);
            p
        }
    };
}
page_hook!(valloc, Real::Valloc, AllocKind::Valloc);
page_hook!(pvalloc, Real::Pvalloc, AllocKind::Pvalloc);

/// # Safety
/// C `malloc_usable_size` contract.
pub unsafe fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if bootstrap::contains(p) {
        return bootstrap::size_of(p);
    }
    match real_fn!(Real::UsableSize, UsableSize) {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(p) },
        None => 0,
    }
}

/// # Safety
/// C `dlclose` contract.
pub unsafe fn dlclose(handle: *mut c_void) -> c_int {
    let Some(f) = real_fn!(Real::Dlclose, Dlclose) else {
        return -1;
    };
    let active = lifecycle::is_recording();
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
            if crate::inproc::loaded_late() {
                crate::got::forget_unloaded();
            }
        }
    }
    rc
}

/// # Safety
/// C `execve` contract.
pub unsafe fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(f) = real_fn!(Real::Execve, Execve) else {
        return -1;
    };
    session::before_exec();
    // SAFETY: forwarding.
    let rc = unsafe { f(path, argv, envp) };
    session::after_failed_exec();
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
            session::before_exec();
            // SAFETY: forwarding.
            let rc = unsafe { f(path, argv) };
            session::after_failed_exec();
            rc
        }
    };
}
exec2_hook!(execv, Real::Execv);
exec2_hook!(execvp, Real::Execvp);

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
/// the capture is finished before the image goes (else the image's buffered events would be
/// lost with it).
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
    let Some(f) = real_fn!(Real::Execvpe, Execve) else {
        return -1;
    };
    session::before_exec();
    // SAFETY: forwarding.
    let rc = unsafe { f(file, argv, envp) };
    session::after_failed_exec();
    rc
}

/// # Safety
/// C `fexecve` contract.
pub unsafe fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let Some(f) = real_fn!(Real::Fexecve, Fexecve) else {
        return -1;
    };
    session::before_exec();
    // SAFETY: forwarding.
    let rc = unsafe { f(fd, argv, envp) };
    session::after_failed_exec();
    rc
}

/// `abort` called by the program (through the PLT: glibc's own internal aborts, such as
/// `assert` failures and heap corruption reports, do not pass here): the capture is finished
/// with reason `abort`, then the real `abort` raises SIGABRT.
pub fn abort_now() -> ! {
    session::end_now(EndReason::Abort);
    if let Some(f) = real_fn!(Real::Abort, Abort) {
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
    session::end_now(EndReason::ImmediateExit);
    let f = if upper {
        real_fn!(Real::ExitNowUpper, Exit)
    } else {
        real_fn!(Real::ExitNow, Exit)
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

// ---------------------------------------------------------------- regions

/// `memtrack_region_begin`: the calling thread enters region `name` (a NUL-terminated string;
/// null is ignored). Recorded while this process records; nothing otherwise.
///
/// # Safety
/// `name` is null or points to a NUL-terminated string.
pub unsafe fn region_begin(name: *const c_char) {
    if name.is_null() {
        return;
    }
    let Some(g) = enter() else { return };
    // SAFETY: the caller's contract: a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name) };
    recorder::region_begin(name.to_bytes(), &g);
}

/// `memtrack_region_end`: the calling thread leaves its innermost open region.
pub fn region_end() {
    let Some(g) = enter() else { return };
    recorder::region_end(&g);
}

// ---------------------------------------------------------------- mapped memory

/// The address range of the library this code is linked into (the preload library's text and
/// data), read from its own program headers: found without a lock, an allocation or a call.
fn own_code() -> (u64, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LO: AtomicU64 = AtomicU64::new(0);
    static HI: AtomicU64 = AtomicU64::new(0);
    let hi = HI.load(Ordering::Acquire);
    if hi != 0 {
        return (LO.load(Ordering::Relaxed), hi);
    }
    extern "C" {
        /// The ELF header of this object, placed by the linker (a hidden symbol: never
        /// another object's).
        static __ehdr_start: libc::Elf64_Ehdr;
    }
    // SAFETY: the linker maps the ELF header and the program headers of every loaded object;
    // `e_phoff`/`e_phnum` describe the latter, inside the first loaded segment.
    let (lo, hi) = unsafe {
        let eh = &raw const __ehdr_start;
        let base = eh as u64;
        let phdrs = (base + (*eh).e_phoff) as *const libc::Elf64_Phdr;
        let mut first = u64::MAX;
        let mut end = 0u64;
        for i in 0..(*eh).e_phnum as usize {
            let ph = &*phdrs.add(i);
            if ph.p_type == libc::PT_LOAD {
                first = first.min(ph.p_vaddr);
                end = end.max(ph.p_vaddr + ph.p_memsz);
            }
        }
        // The header is at the first segment's start: the load bias is `base - first`.
        (base, base - first.min(end) + end)
    };
    LO.store(lo, Ordering::Relaxed);
    HI.store(hi.max(lo + 1), Ordering::Release);
    (lo, hi)
}

/// True when the call came from this library (its heap's pages, chunk buffers, the Rust
/// runtime's own maps): the tracker's mappings are never recorded.
#[inline]
fn from_tracker(caller: &Caller) -> bool {
    let (lo, hi) = own_code();
    caller.ip >= lo && caller.ip < hi
}

/// The page size, from the auxiliary vector (no system call, errno untouched).
fn page_size() -> u64 {
    // SAFETY: getauxval has no preconditions.
    let p = unsafe { libc::getauxval(libc::AT_PAGESZ) };
    if p.is_power_of_two() {
        p
    } else {
        4096
    }
}

/// `len` rounded up to whole pages, as the kernel maps it.
#[inline]
fn pages(len: usize) -> u64 {
    let p = page_size();
    (len as u64).saturating_add(p - 1) & !(p - 1)
}

/// The path of the file open as `fd` (`/proc/self/fd/N`), into `buf`; None if unknown.
fn fd_path(fd: c_int, buf: &mut [u8; 4096]) -> Option<&[u8]> {
    let mut link = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0\0";
    let mut digits = [0u8; 10];
    let (mut n, mut v) = (0, fd as u32);
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        link[14 + i] = digits[n - 1 - i];
    }
    // SAFETY: `link` is NUL-terminated (14 + at most 10 digits < its 26 bytes); `buf` is
    // writable for its length.
    let got = unsafe {
        libc::readlink(
            link.as_ptr() as *const c_char,
            buf.as_mut_ptr() as *mut c_char,
            buf.len(),
        )
    };
    (got > 0).then(|| &buf[..got as usize])
}

/// The real `mmap` (the system call itself while the table of real functions is being filled).
///
/// # Safety
/// C `mmap` contract.
unsafe fn real_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    match real_fn!(Real::Mmap, Mmap) {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(addr, len, prot, flags, fd, off) },
        // SAFETY: the system call takes the same arguments (and sets errno on failure).
        None => unsafe {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void
        },
    }
}

/// # Safety
/// C `mmap` (and `mmap64`) contract.
pub unsafe fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
    caller: Caller,
) -> *mut c_void {
    if from_tracker(&caller) {
        // SAFETY: forwarding.
        return unsafe { real_mmap(addr, len, prot, flags, fd, off) };
    }
    let g = enter();
    // SAFETY: forwarding.
    let p = unsafe { real_mmap(addr, len, prot, flags, fd, off) };
    if let (Some(g), false) = (g, p == libc::MAP_FAILED) {
        let _errno = SaveErrno::new();
        let size = pages(len);
        let ev = if prot == libc::PROT_NONE {
            // An address-space reservation is not memory; one placed over mapped memory
            // (MAP_FIXED) gives that memory back.
            (flags & libc::MAP_FIXED != 0).then_some(EventKind::Unmap {
                addr: p as u64,
                size,
            })
        } else {
            let mut buf = [0u8; 4096];
            let file = if flags & libc::MAP_ANONYMOUS == 0 && fd >= 0 {
                fd_path(fd, &mut buf).map_or(0, recorder::map_file_id)
            } else {
                0
            };
            Some(EventKind::Map {
                addr: p as u64,
                size,
                stack: 0,
                file,
                shared: flags & libc::MAP_SHARED != 0,
            })
        };
        if let Some(ev) = ev {
            recorder::record(ev, StackStart::Registers(caller), &g);
        }
    }
    p
}

/// # Safety
/// C `munmap` contract.
pub unsafe fn munmap(addr: *mut c_void, len: usize, caller: Caller) -> c_int {
    let f = real_fn!(Real::Munmap, Munmap);
    let call = || match f {
        // SAFETY: forwarding.
        Some(f) => unsafe { f(addr, len) },
        // SAFETY: the system call takes the same arguments.
        None => unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int },
    };
    if from_tracker(&caller) {
        return call();
    }
    let g = enter();
    if let Some(g) = &g {
        // Recorded before the range goes back (no other thread can be given it first); the
        // kernel refuses only a misaligned address or an empty length, and unmaps otherwise.
        if len != 0 && (addr as u64) & (page_size() - 1) == 0 {
            let ev = EventKind::Unmap {
                addr: addr as u64,
                size: pages(len),
            };
            recorder::record(ev, StackStart::Here, g);
        }
    }
    let rc = call();
    drop(g);
    rc
}

/// # Safety
/// C `mremap` contract (`new_addr` is read only with `MREMAP_FIXED`).
pub unsafe fn mremap(
    old: *mut c_void,
    old_size: usize,
    new_size: usize,
    flags: c_int,
    new_addr: *mut c_void,
    caller: Caller,
) -> *mut c_void {
    let call = || match real_fn!(Real::Mremap, Mremap) {
        // SAFETY: forwarding; the fifth argument is what the caller passed (read by the
        // kernel only with MREMAP_FIXED).
        Some(f) => unsafe { f(old, old_size, new_size, flags, new_addr) },
        // SAFETY: the system call takes the same arguments.
        None => unsafe {
            libc::syscall(libc::SYS_mremap, old, old_size, new_size, flags, new_addr) as *mut c_void
        },
    };
    if from_tracker(&caller) {
        return call();
    }
    let g = enter();
    let p = call();
    if let (Some(g), false) = (g, p == libc::MAP_FAILED) {
        let _errno = SaveErrno::new();
        // MREMAP_DONTUNMAP leaves the old range mapped.
        let keeps_old = flags & libc::MREMAP_DONTUNMAP != 0;
        let ev = EventKind::Remap {
            old_addr: old as u64,
            old_size: if keeps_old { 0 } else { pages(old_size) },
            addr: p as u64,
            size: pages(new_size),
            stack: 0,
        };
        recorder::record(ev, StackStart::Registers(caller), &g);
    }
    p
}

// ---------------------------------------------------------------- loaded into a running process

/// `dlopen` for modules of a process the library was loaded into late (`got` redirects the
/// name `dlopen` here; preloaded, nothing calls it): the real call, then the new modules' slots
/// redirected. A bare name is looked up along the caller's search path (its `RUNPATH`), which
/// glibc would otherwise take from this library, the real function's caller.
///
/// # Safety
/// C `dlopen` contract.
pub unsafe fn attach_dlopen(name: *const c_char, flags: c_int, caller: Caller) -> *mut c_void {
    let Some(f) = real_fn!(Real::Dlopen, crate::real::Dlopen) else {
        return std::ptr::null_mut();
    };
    // SAFETY: forwarding, with a path the caller's search path gives when it has one.
    let h = unsafe {
        match along_callers_path(name, caller.ip) {
            Some(path) => f(path.as_ptr(), flags),
            None => f(name, flags),
        }
    };
    // Not while a stop is restoring the slots: patching now would leave hooks behind.
    if !h.is_null() && lifecycle::is_recording() && !crate::inproc::stopping() {
        if let Some(_g) = IgnoreAllocs::enter() {
            let _errno = SaveErrno::new();
            crate::got::patch_all();
            if let Some(r) = recorder::recorder() {
                r.refresh_modules();
            }
        }
    }
    h
}

/// Where the caller at `ip` would find bare library `name`: the first file that exists in its
/// search path (`dlinfo(RTLD_DI_SERINFO)` of the caller's module). None for a path, a library
/// loaded already, or when nothing is found (the plain call then searches the default places).
unsafe fn along_callers_path(name: *const c_char, ip: u64) -> Option<std::ffi::CString> {
    if name.is_null() {
        return None;
    }
    // SAFETY: the caller's contract: a NUL-terminated name.
    let bare = unsafe { std::ffi::CStr::from_ptr(name) };
    if bare.to_bytes().contains(&b'/') {
        return None;
    }
    let _g = IgnoreAllocs::enter()?;
    let _errno = SaveErrno::new();
    // Loaded already (by that file name): the plain call finds it. Asked of the loader's list,
    // not with a failing dlopen(RTLD_NOLOAD), whose error the program's dlerror() would see.
    if loaded_by_file_name(bare.to_bytes()) {
        return None;
    }
    // SAFETY: dladdr1/dlinfo with valid arguments; no handle is taken.
    unsafe {
        // The caller's link map: glibc's dlopen handles are link maps, so dlinfo takes it as
        // one (no reference is taken or released).
        let mut info: libc::Dl_info = std::mem::zeroed();
        let mut map: *mut c_void = std::ptr::null_mut();
        const RTLD_DL_LINKMAP: c_int = 2;
        if libc::dladdr1(
            ip as *const c_void,
            &mut info,
            &mut map as *mut *mut c_void,
            RTLD_DL_LINKMAP,
        ) == 0
            || map.is_null()
        {
            return None;
        }
        search_path_hit(map, bare)
    }
}

/// A loaded module's file is named `name`.
fn loaded_by_file_name(name: &[u8]) -> bool {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the (name, found) pair below; `info` is valid for this call.
        let (want, info) = unsafe { (&mut *(data as *mut (&[u8], bool)), &*info) };
        if !info.dlpi_name.is_null() {
            // SAFETY: a NUL-terminated string owned by the loader.
            let path = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes();
            if path.rsplit(|&c| c == b'/').next() == Some(want.0) {
                want.1 = true;
                return 1;
            }
        }
        0
    }
    let mut want = (name, false);
    // SAFETY: the callback reads what the loader hands it and `want`.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut want as *mut (&[u8], bool) as *mut c_void) };
    want.1
}

/// The first `dir/name` that exists along `handle`'s search path.
unsafe fn search_path_hit(handle: *mut c_void, name: &std::ffi::CStr) -> Option<std::ffi::CString> {
    #[repr(C)]
    struct SerInfo {
        size: usize,
        cnt: u32,
    }
    #[repr(C)]
    struct SerPath {
        name: *const c_char,
        flags: u32,
    }
    let mut head = SerInfo { size: 0, cnt: 0 };
    // SAFETY: RTLD_DI_SERINFOSIZE fills the two header fields.
    if unsafe {
        libc::dlinfo(
            handle,
            libc::RTLD_DI_SERINFOSIZE,
            &mut head as *mut _ as *mut c_void,
        )
    } != 0
        || head.size < std::mem::size_of::<SerInfo>()
    {
        return None;
    }
    // u64 words keep the buffer aligned for the pointers inside.
    let mut buf = vec![0u64; head.size.div_ceil(8)];
    // SAFETY: the buffer is `size` bytes, its header initialised as dlinfo requires.
    unsafe {
        let p = buf.as_mut_ptr() as *mut SerInfo;
        (*p).size = head.size;
        (*p).cnt = head.cnt;
        if libc::dlinfo(handle, libc::RTLD_DI_SERINFO, p as *mut c_void) != 0 {
            return None;
        }
        let paths = (p as *const u8).add(16) as *const SerPath;
        for i in 0..(*p).cnt as usize {
            let dir = (*paths.add(i)).name;
            if dir.is_null() {
                continue;
            }
            let mut full = std::ffi::CStr::from_ptr(dir).to_bytes().to_vec();
            full.push(b'/');
            full.extend_from_slice(name.to_bytes());
            let Ok(full) = std::ffi::CString::new(full) else {
                continue;
            };
            if libc::access(full.as_ptr(), libc::F_OK) == 0 {
                return Some(full);
            }
        }
    }
    None
}

/// A wrapper of Python's object allocator (`pymem`): `malloc` of the domain.
///
/// # Safety
/// `ctx` is the `PyMemAllocatorEx` the wrapper was installed over.
pub unsafe fn py_malloc(ctx: *mut c_void, size: usize, caller: Caller) -> *mut c_void {
    // SAFETY: the caller's contract.
    let orig = unsafe { &*(ctx as *const crate::pymem::PyMemAllocatorEx) };
    let Some(f) = orig.malloc else {
        return std::ptr::null_mut();
    };
    let g = enter_alloc(size);
    // Unsampled, the wrapped allocator's own malloc must not be sampled a second time.
    let quiet = quiet_unless(&g);
    // SAFETY: forwarding to the wrapped allocator with its own context.
    let p = unsafe { f(orig.ctx, size) };
    drop(quiet);
    done_alloc(g, AllocKind::Malloc, p, size, caller);
    p
}

/// The guard for a wrapped Python allocator's call when this one is not recorded: what it
/// does through `malloc` is part of the object (one decision, not two).
#[inline(always)]
fn quiet_unless(g: &Option<IgnoreAllocs>) -> Option<IgnoreAllocs> {
    if g.is_some() {
        None
    } else {
        IgnoreAllocs::enter()
    }
}

/// `calloc` of a wrapped Python allocator domain.
///
/// # Safety
/// As [`py_malloc`].
pub unsafe fn py_calloc(ctx: *mut c_void, n: usize, m: usize, caller: Caller) -> *mut c_void {
    // SAFETY: the caller's contract.
    let orig = unsafe { &*(ctx as *const crate::pymem::PyMemAllocatorEx) };
    let Some(f) = orig.calloc else {
        return std::ptr::null_mut();
    };
    let size = n.saturating_mul(m);
    let g = enter_alloc(size);
    let quiet = quiet_unless(&g);
    // SAFETY: forwarding.
    let p = unsafe { f(orig.ctx, n, m) };
    drop(quiet);
    done_alloc(g, AllocKind::Calloc, p, size, caller);
    p
}

/// `realloc` of a wrapped Python allocator domain.
///
/// # Safety
/// As [`py_malloc`]; `p` came from the domain.
pub unsafe fn py_realloc(
    ctx: *mut c_void,
    p: *mut c_void,
    size: usize,
    caller: Caller,
) -> *mut c_void {
    // SAFETY: the caller's contract.
    let orig = unsafe { &*(ctx as *const crate::pymem::PyMemAllocatorEx) };
    let Some(f) = orig.realloc else {
        return std::ptr::null_mut();
    };
    realloc_common(AllocKind::Realloc, p, Some(size), caller, || {
        // Held only when this call is not recorded (a recorded one holds the guard already).
        let _quiet = IgnoreAllocs::enter();
        // SAFETY: forwarding.
        unsafe { f(orig.ctx, p, size) }
    })
}

/// `free` of a wrapped Python allocator domain.
///
/// # Safety
/// As [`py_malloc`]; `p` came from the domain.
pub unsafe fn py_free(ctx: *mut c_void, p: *mut c_void) {
    // SAFETY: the caller's contract.
    let orig = unsafe { &*(ctx as *const crate::pymem::PyMemAllocatorEx) };
    let Some(f) = orig.free else { return };
    if p.is_null() {
        // SAFETY: forwarding.
        return unsafe { f(orig.ctx, p) };
    }
    let g = sampling::enter_free(p as u64, enter);
    if let Some(g) = &g {
        recorder::record(EventKind::Free { addr: p as u64 }, StackStart::Here, g);
    }
    let quiet = quiet_unless(&g);
    // SAFETY: forwarding.
    unsafe { f(orig.ctx, p) };
    drop(quiet);
    drop(g);
}
