//! `libmemtrack.so`: the `LD_PRELOAD` shim. Only `extern "C"` exports live here; each
//! forwards to `memtrack_tracker::hooks`, so no library that programs link exports
//! `malloc`. A panic cannot unwind out of these functions: Rust aborts at an `extern "C"`
//! boundary, and the tracker does not panic on its paths.

use memtrack_tracker::hooks as ip;
use std::os::raw::{c_char, c_int, c_uint, c_ulong, c_void};
use std::sync::atomic::AtomicU32;

/// The tracker's own allocations come from a heap of its own, never from the program's malloc
/// arenas (see `memtrack_tracker::heap`).
#[global_allocator]
static HEAP: memtrack_tracker::heap::PrivateHeap = memtrack_tracker::heap::PrivateHeap;

// Allocation functions are naked trampolines: on entry `[rsp]` is the return address into the
// program and `rsp + 8` its stack pointer after the return, and rbp is still the caller's. They
// pass these as extra arguments to the hook, so the stack walk starts at the program's caller of
// malloc and never steps through the tracker's own frames (a third of the frames of a typical
// stack). A tail jump: the hook returns straight to the program.

macro_rules! trampoline {
    ($(#[$doc:meta])* $name:ident => $imp:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty,
     regs: $ip:literal, $sp:literal, $bp:literal, body: $body:expr) => {
        $(#[$doc])*
        /// # Safety
        /// The C function's contract.
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(
                concat!("mov ", $ip, ", [rsp]"),
                concat!("lea ", $sp, ", [rsp + 8]"),
                concat!("mov ", $bp, ", rbp"),
                "jmp {imp}",
                imp = sym $imp,
            )
        }

        unsafe extern "C" fn $imp($($arg: $ty,)* ip: u64, sp: u64, bp: u64) -> $ret {
            let caller = ip::Caller { ip, sp, bp };
            // SAFETY: the program's call, forwarded with the same contract.
            unsafe { $body(caller) }
        }
    };
}

trampoline!(malloc => malloc_imp(size: usize) -> *mut c_void,
    regs: "rsi", "rdx", "rcx", body: |c| ip::malloc(size, c));
trampoline!(valloc => valloc_imp(size: usize) -> *mut c_void,
    regs: "rsi", "rdx", "rcx", body: |c| ip::valloc(size, c));
trampoline!(pvalloc => pvalloc_imp(size: usize) -> *mut c_void,
    regs: "rsi", "rdx", "rcx", body: |c| ip::pvalloc(size, c));
trampoline!(calloc => calloc_imp(n: usize, m: usize) -> *mut c_void,
    regs: "rdx", "rcx", "r8", body: |c| ip::calloc(n, m, c));
trampoline!(realloc => realloc_imp(p: *mut c_void, size: usize) -> *mut c_void,
    regs: "rdx", "rcx", "r8", body: |c| ip::realloc(p, size, c));
trampoline!(aligned_alloc => aligned_alloc_imp(align: usize, size: usize) -> *mut c_void,
    regs: "rdx", "rcx", "r8", body: |c| ip::aligned_alloc(align, size, c));
trampoline!(memalign => memalign_imp(align: usize, size: usize) -> *mut c_void,
    regs: "rdx", "rcx", "r8", body: |c| ip::memalign(align, size, c));
trampoline!(reallocarray => reallocarray_imp(p: *mut c_void, n: usize, m: usize) -> *mut c_void,
    regs: "rcx", "r8", "r9", body: |c| ip::reallocarray(p, n, m, c));
trampoline!(posix_memalign => posix_memalign_imp(out: *mut *mut c_void, align: usize, size: usize) -> c_int,
    regs: "rcx", "r8", "r9", body: |c| ip::posix_memalign(out, align, size, c));

// The mapping functions take six register arguments, which leave no register for the caller's:
// their trampolines keep a frame and pass the address of the return address as the seventh
// argument, on the stack. From it: the return address (the caller's ip), the stack pointer
// after the return, and the caller's rbp saved just below it.
macro_rules! trampoline6 {
    ($(#[$doc:meta])* $name:ident => $imp:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty,
     body: $body:expr) => {
        $(#[$doc])*
        /// # Safety
        /// The C function's contract.
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(
                // rsp is 8 past a multiple of 16 here: after the push and 16 bytes, 16-aligned
                // for the call, with the seventh argument at [rsp].
                "push rbp",
                "mov rbp, rsp",
                "lea rax, [rbp + 8]",
                "sub rsp, 16",
                "mov [rsp], rax",
                "call {imp}",
                "leave",
                "ret",
                imp = sym $imp,
            )
        }

        unsafe extern "C" fn $imp($($arg: $ty,)* frame: *const u64) -> $ret {
            // SAFETY: `frame` points at the return address pushed by the program's call, with
            // the caller's rbp (pushed by the trampoline) just below it.
            let caller = unsafe {
                ip::Caller {
                    ip: *frame,
                    sp: frame as u64 + 8,
                    bp: *frame.sub(1),
                }
            };
            // SAFETY: the program's call, forwarded with the same contract.
            unsafe { $body(caller) }
        }
    };
}

trampoline6!(mmap => mmap_imp(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int,
    off: i64) -> *mut c_void,
    body: |c| ip::mmap(addr, len, prot, flags, fd, off, c));
trampoline6!(
    /// The large-file name of `mmap` (the same function on 64-bit Linux).
    mmap64 => mmap64_imp(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int,
    off: i64) -> *mut c_void,
    body: |c| ip::mmap(addr, len, prot, flags, fd, off, c));
// `mremap` is variadic (the new address comes only with MREMAP_FIXED): the fifth register is
// read as it is, the sixth is unused.
trampoline6!(mremap => mremap_imp(old: *mut c_void, old_size: usize, new_size: usize,
    flags: c_int, new_addr: *mut c_void, _unused: usize) -> *mut c_void,
    body: |c| ip::mremap(old, old_size, new_size, flags, new_addr, c));
trampoline!(munmap => munmap_imp(addr: *mut c_void, len: usize) -> c_int,
    regs: "rdx", "rcx", "r8", body: |c| ip::munmap(addr, len, c));

/// # Safety
/// C `free`.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { ip::free(p) }
}

/// # Safety
/// C `cfree` (obsolete alias of free).
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { ip::free(p) }
}

/// # Safety
/// C `malloc_usable_size`.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: same contract.
    unsafe { ip::malloc_usable_size(p) }
}

/// # Safety
/// C `dlclose`.
#[no_mangle]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::dlclose(handle) }
}

/// # Safety
/// C `execve`.
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execve(path, argv, envp) }
}

/// # Safety
/// C `execv`.
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execv(path, argv) }
}

/// # Safety
/// C `execvp`.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execvp(file, argv) }
}

// `execl`, `execle` and `execlp` take C varargs, which stable Rust cannot receive: naked
// functions spill the six argument registers next to a pointer to the stack arguments, and
// `execl_va` reads the arguments from there (all pointers, so all in integer registers).
macro_rules! execl_form {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        /// # Safety
        /// The C function's contract (a variadic function; the Rust signature is nominal).
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, arg: *const c_char) -> c_int {
            core::arch::naked_asm!(
                // rsp is 8 past a multiple of 16 here; after the push and 48 bytes, 16-aligned
                // for the call. The stack arguments start at rbp + 16.
                "push rbp",
                "mov rbp, rsp",
                "sub rsp, 48",
                "mov [rsp], rdi",
                "mov [rsp + 8], rsi",
                "mov [rsp + 16], rdx",
                "mov [rsp + 24], rcx",
                "mov [rsp + 32], r8",
                "mov [rsp + 40], r9",
                "mov rdi, rsp",
                "lea rsi, [rbp + 16]",
                "mov edx, {kind}",
                "call {va}",
                "leave",
                "ret",
                kind = const $kind,
                va = sym ip::execl_va,
            )
        }
    };
}
execl_form!(
    /// C `execl`.
    execl, ip::EXECL
);
execl_form!(
    /// C `execle`.
    execle, ip::EXECLE
);
execl_form!(
    /// C `execlp`.
    execlp, ip::EXECLP
);

/// # Safety
/// C `execvpe`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::execvpe(file, argv, envp) }
}

/// # Safety
/// C `fexecve`.
#[no_mangle]
pub unsafe extern "C" fn fexecve(
    fd: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: same contract.
    unsafe { ip::fexecve(fd, argv, envp) }
}

/// # Safety
/// C `_exit`.
#[no_mangle]
pub unsafe extern "C" fn _exit(status: c_int) -> ! {
    // SAFETY: same contract.
    unsafe { ip::exit_now(status, false) }
}

/// # Safety
/// C `_Exit`.
#[no_mangle]
pub unsafe extern "C" fn _Exit(status: c_int) -> ! {
    // SAFETY: same contract.
    unsafe { ip::exit_now(status, true) }
}

/// C `abort`.
#[no_mangle]
pub extern "C" fn abort() -> ! {
    ip::abort_now()
}

/// The calling thread enters region `name` (`include/memtrack.h`); a null name is ignored.
///
/// # Safety
/// `name` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn memtrack_region_begin(name: *const c_char) {
    // SAFETY: same contract.
    unsafe { ip::region_begin(name) }
}

/// The calling thread leaves its innermost open region (`include/memtrack.h`).
#[no_mangle]
pub extern "C" fn memtrack_region_end() {
    ip::region_end()
}

// ---------------------------------------------------------------- started in a running process
// (`docs/design/issue24-abi.md`)

/// Written 1 by a process outside (`memtrack detach`) to stop the recording.
#[no_mangle]
pub static memtrack_control: AtomicU32 = AtomicU32::new(0);

/// Read by a process outside: 0 nothing started, 1 recording, 2 stopped, 3 `memtrack run`.
#[no_mangle]
pub static memtrack_status: AtomicU32 = AtomicU32::new(0);

/// Starts recording this process into a new capture at `path` (see `include/memtrack.h`).
///
/// # Safety
/// `path` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn memtrack_start(
    path: *const c_char,
    flags: c_uint,
    duration_ms: c_ulong,
) -> c_int {
    // SAFETY: same contract.
    unsafe { memtrack_tracker::inproc::start(path, flags, duration_ms) }
}

/// `memtrack_start` that samples (`sample_rate` bytes between samples on average, 0: every
/// allocation; `sample_seed_plus_one` 0: a seed of its own) or aggregates
/// (`checkpoint_interval_ms` 0: events), as `memtrack run --sample-rate`/`--aggregate` do.
///
/// # Safety
/// `path` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn memtrack_start_with(
    path: *const c_char,
    flags: c_uint,
    duration_ms: c_ulong,
    sample_rate: c_ulong,
    sample_seed_plus_one: c_ulong,
    checkpoint_interval_ms: c_ulong,
) -> c_int {
    let options = memtrack_tracker::inproc::Options {
        sample_rate,
        sample_seed_plus_one,
        checkpoint_interval_ms,
    };
    // SAFETY: same contract.
    unsafe { memtrack_tracker::inproc::start_with(path, flags, duration_ms, options) }
}

/// Stops the recording `memtrack_start` began; the capture is complete when it returns.
#[no_mangle]
pub extern "C" fn memtrack_stop() -> c_int {
    memtrack_tracker::inproc::stop()
}

/// Why the last `memtrack_start` or `memtrack_stop` failed.
#[no_mangle]
pub extern "C" fn memtrack_last_error() -> *const c_char {
    memtrack_tracker::inproc::last_error()
}

trampoline!(
    /// `dlopen` of a process the library was loaded into late (relocation slots of `dlopen`
    /// point here while recording; never interposed by name).
    memtrack_attach_dlopen => attach_dlopen_imp(name: *const c_char, flags: c_int) -> *mut c_void,
    regs: "rdx", "rcx", "r8", body: |c| ip::attach_dlopen(name, flags, c));
trampoline!(
    /// Python's allocator domains, wrapped while recording a running CPython.
    memtrack_py_malloc => py_malloc_imp(ctx: *mut c_void, size: usize) -> *mut c_void,
    regs: "rdx", "rcx", "r8", body: |c| ip::py_malloc(ctx, size, c));
trampoline!(
    /// See `memtrack_py_malloc`.
    memtrack_py_calloc => py_calloc_imp(ctx: *mut c_void, n: usize, m: usize) -> *mut c_void,
    regs: "rcx", "r8", "r9", body: |c| ip::py_calloc(ctx, n, m, c));
trampoline!(
    /// See `memtrack_py_malloc`.
    memtrack_py_realloc => py_realloc_imp(ctx: *mut c_void, p: *mut c_void, size: usize) -> *mut c_void,
    regs: "rcx", "r8", "r9", body: |c| ip::py_realloc(ctx, p, size, c));

/// See `memtrack_py_malloc`.
///
/// # Safety
/// The wrapped domain's `free` contract.
#[no_mangle]
pub unsafe extern "C" fn memtrack_py_free(ctx: *mut c_void, p: *mut c_void) {
    // SAFETY: same contract.
    unsafe { ip::py_free(ctx, p) }
}

/// Tells the tracker where this library's words and Python wrappers are, for a recording
/// started late (the hooks it finds by name: see `memtrack_tracker::got`).
fn register() {
    memtrack_tracker::inproc::register_words(&memtrack_control, &memtrack_status);
    memtrack_tracker::pymem::register_wrappers(
        memtrack_py_malloc as *const () as usize,
        memtrack_py_calloc as *const () as usize,
        memtrack_py_realloc as *const () as usize,
        memtrack_py_free as *const () as usize,
    );
}

extern "C" fn memtrack_constructor() {
    register();
    ip::constructor();
}

extern "C" fn memtrack_destructor() {
    ip::destructor();
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = memtrack_constructor;

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = memtrack_destructor;
