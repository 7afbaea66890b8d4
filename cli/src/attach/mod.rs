//! `memtrack attach` and `memtrack detach`: start and stop recording in a running process.
//!
//! **Attach**: checks first what would make the injection fail or harm the process, each
//! refusal naming its fix ([`preflight`]); then loads `libmemtrack.so` into the process by
//! calling `dlopen` in one of its threads through ptrace ([`ptrace`]; or through gdb, [`gdb`],
//! when asked), and calls the library's `memtrack_start` there (the in-target interface of `docs/design/issue24-abi.md`). From then
//! on the process records by itself; memtrack only watches its `memtrack_status` word and, on
//! Ctrl-C or `memtrack detach`, writes its `memtrack_control` word (`process_vm_writev`: the
//! process is never stopped again).

mod gdb;
mod ptrace;
mod target;

use crate::args::AttachMethod;
use anyhow::{bail, Context, Result};
use ptrace::{CallError, Hijacked, SeizeError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use target::{Elf, Mapping, Module, Target};

const RTLD_NOW: u64 = 0x2;
const RTLD_GLOBAL: u64 = 0x100;
/// glibc's private flag of `__libc_dlopen_mode` (before 2.34): the caller is not libdl.
const RTLD_DLOPEN_INTERNAL: u64 = 0x8000_0000;
const MEMTRACK_START_ATTACHED: u64 = 2;
/// `START_FAST`: the fast encoding (`--encoding fast`).
const MEMTRACK_START_FAST: u64 = 8;
const STATUS_RECORDING: u32 = 1;
const STATUS_STOPPED: u32 = 2;
const STATUS_PRELOADED: u32 = 3;
/// The scratch mapping in the process: the two paths at its start, the call stack above.
const SCRATCH_LEN: u64 = 1 << 20;

/// A refusal: the reason and what to do about it. `main` prints it as two lines, exit 2.
#[derive(Debug)]
pub struct Refusal {
    pub verb: &'static str,
    pub pid: i32,
    pub reason: String,
    pub fix: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot {} {}: {}\nfix: {}",
            self.verb, self.pid, self.reason, self.fix
        )
    }
}

impl std::error::Error for Refusal {}

fn refuse(
    verb: &'static str,
    pid: i32,
    reason: impl Into<String>,
    fix: impl Into<String>,
) -> anyhow::Error {
    anyhow::Error::new(Refusal {
        verb,
        pid,
        reason: reason.into(),
        fix: fix.into(),
    })
}

const ATTACH: &str = "attach to";
const DETACH: &str = "detach from";

/// Ctrl-C presses seen since `attach` started; acted on only when the process is not held.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

/// The fix named when ptrace is not permitted.
fn ptrace_fix(verb: &str, pid: i32) -> String {
    let cmd = if verb == DETACH { "detach" } else { "attach" };
    format!("run memtrack as the process's user or as root (sudo memtrack {cmd} {pid}); in a container, add the SYS_PTRACE capability (docker run --cap-add=SYS_PTRACE, or securityContext.capabilities.add: [SYS_PTRACE])")
}

fn not_permitted(verb: &'static str, pid: i32, why: impl std::fmt::Display) -> anyhow::Error {
    refuse(
        verb,
        pid,
        format!("ptrace is not permitted ({why})"),
        ptrace_fix(verb, pid),
    )
}

/// A status line of `/proc/PID/status`.
fn status_field<'a>(status: &'a [(String, String)], key: &str) -> Option<&'a str> {
    status
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The ids of a `Uid:`/`Gid:` line: real, effective, saved, filesystem.
fn ids(status: &[(String, String)], key: &str) -> Vec<u32> {
    status_field(status, key)
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn has_cap_sys_ptrace() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

/// Whether `pid` descends from this process (Yama's scope 1 lets a process trace those).
fn is_descendant(pid: i32) -> bool {
    let me = std::process::id() as i32;
    let mut p = pid;
    for _ in 0..1000 {
        if p == me {
            return true;
        }
        if p <= 1 {
            return false;
        }
        let Ok(status) = (Target { pid: p }).status() else {
            return false;
        };
        match status_field(&status, "PPid").and_then(|v| v.parse().ok()) {
            Some(pp) => p = pp,
            None => return false,
        }
    }
    false
}

/// What preflight learnt, for the injection.
struct Preflight {
    start_time: u64,
    libc: (Module, Elf),
    /// Other C libraries and the loader: a thread stopped in their text may hold their locks.
    unsafe_text: Vec<Module>,
    libdl: Option<(Module, Elf)>,
    /// The target runs in another mount namespace (the library is the same file there).
    other_mount_ns: bool,
}

/// The checks made before touching the process, in the order of the design note (the ones
/// that need only world-readable files first).
fn preflight(t: Target, lib: &Path) -> Result<Preflight> {
    let pid = t.pid;
    let Some(stat) = t.stat() else {
        return Err(refuse(
            ATTACH,
            pid,
            "no such process",
            format!("check the process id (ps -p {pid})"),
        ));
    };
    if matches!(stat.state, 'Z' | 'X') {
        return Err(refuse(
            ATTACH,
            pid,
            "the process has exited (a zombie its parent has not reaped)",
            "nothing is left to record; start the program again, e.g. under `memtrack run`",
        ));
    }
    if pid == std::process::id() as i32 {
        return Err(refuse(
            ATTACH,
            pid,
            "that is memtrack itself",
            "give the process id of the program to record",
        ));
    }
    let status = t.status().map_err(|e| {
        refuse(
            ATTACH,
            pid,
            format!("cannot read /proc/{pid}/status: {e}"),
            format!("check the process id (ps -p {pid})"),
        )
    })?;
    let tracer: i32 = status_field(&status, "TracerPid")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if tracer != 0 {
        let who = Target { pid: tracer }.comm();
        return Err(refuse(
            ATTACH,
            pid,
            format!("the process is being traced by process {tracer} ({who}), a debugger or tracer; a process has one tracer at a time"),
            format!("detach the debugger or stop the tracer (process {tracer}) first"),
        ));
    }
    if matches!(stat.state, 'T' | 't') {
        return Err(refuse(
            ATTACH,
            pid,
            "the process is stopped; attaching would make it run",
            format!("kill -CONT {pid} first, then attach"),
        ));
    }
    check_permission(t, &status)?;
    let maps = t.maps().map_err(|e| {
        not_permitted(
            ATTACH,
            pid,
            format_args!("cannot read /proc/{pid}/maps: {e}; a process that is not dumpable, such as a set-user-ID one, needs CAP_SYS_PTRACE"),
        )
    })?;
    let exe = Elf::read(&t.proc_path("exe")).map_err(|e| {
        if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        }) {
            not_permitted(
                ATTACH,
                pid,
                format_args!("/proc/{pid}/exe is unreadable to memtrack: a process that is not dumpable, such as a set-user-ID one, needs CAP_SYS_PTRACE"),
            )
        } else {
            e.context(format!("cannot read the executable of process {pid}"))
        }
    })?;
    if !exe.x86_64 {
        return Err(refuse(
            ATTACH,
            pid,
            "the process is not an x86-64 program; memtrack attaches to x86-64 glibc programs only",
            "run it under `memtrack run` instead",
        ));
    }
    let libc = target::find_module(&t, &maps, target::is_glibc)?;
    if !exe.interp || (libc.is_none() && !maps.iter().any(|m| target::is_loader(m.file_name()))) {
        return Err(refuse(
            ATTACH,
            pid,
            "the process is statically linked: it has no dynamic loader to load memtrack into",
            "run it under `memtrack run` (which records what LD_PRELOAD can reach), or link it dynamically",
        ));
    }
    let Some(libc) = libc else {
        let musl = maps.iter().any(|m| m.file_name().contains("musl"));
        return Err(refuse(
            ATTACH,
            pid,
            if musl {
                "the process uses musl libc; memtrack attaches to glibc programs only"
            } else {
                "no glibc C library (libc.so.6) is mapped in the process; memtrack attaches to glibc programs only"
            },
            "run the program under `memtrack run` on a glibc system",
        ));
    };
    if libc.1.symbol("gnu_get_libc_version").is_none() {
        return Err(refuse(
            ATTACH,
            pid,
            format!("{} is not glibc", libc.0.path),
            "memtrack attaches to glibc programs only",
        ));
    }
    check_not_recorded(t, &maps, lib)?;
    let other_mount_ns = check_mount_namespace(t, lib)?;
    if status_field(&status, "Seccomp") == Some("2") {
        eprintln!("memtrack: note: process {pid} runs under a seccomp filter; if it forbids what dlopen does, the attach fails and says so");
    }
    let mut unsafe_text = vec![libc.0.clone()];
    if let Some((m, _)) = target::find_module(&t, &maps, target::is_loader)? {
        unsafe_text.push(m);
    }
    let libdl = target::find_module(&t, &maps, |n| {
        n.starts_with("libdl.so") || n.starts_with("libdl-2.")
    })?;
    if let Some((m, _)) = target::find_module(&t, &maps, |n| {
        n.starts_with("libpthread.so") || n.starts_with("libpython")
    })? {
        unsafe_text.push(m);
    }
    Ok(Preflight {
        start_time: stat.start_time,
        libc,
        unsafe_text,
        libdl,
        other_mount_ns,
    })
}

/// Refuses what the kernel would refuse, naming the rule: Yama's `ptrace_scope`, another
/// user's process, a process that is not dumpable.
fn check_permission(t: Target, status: &[(String, String)]) -> Result<()> {
    let pid = t.pid;
    let cap = has_cap_sys_ptrace();
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let yama_fix = "sudo sysctl kernel.yama.ptrace_scope=0 (allows tracing your own processes until reboot), or run memtrack as root".to_string();
    match scope {
        Some(3) => {
            return Err(refuse(ATTACH, pid, "ptrace is not permitted: kernel.yama.ptrace_scope is 3 (no process may attach)", "nothing short of a reboot allows it (scope 3 cannot be lowered); start the program under `memtrack run` instead"));
        }
        Some(2) if !cap => {
            return Err(refuse(ATTACH, pid, "ptrace is not permitted: kernel.yama.ptrace_scope is 2 (only root, with CAP_SYS_PTRACE, may attach)", format!("run memtrack as root (sudo memtrack attach {pid})")));
        }
        Some(1) if !cap && !is_descendant(pid) => {
            return Err(refuse(ATTACH, pid, "ptrace is not permitted: kernel.yama.ptrace_scope is 1 (only a parent may attach to its descendants)", yama_fix));
        }
        _ => {}
    }
    if cap {
        return Ok(());
    }
    // Without CAP_SYS_PTRACE the kernel wants our real ids equal to all of the target's.
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let tuids = ids(status, "Uid");
    let tgids = ids(status, "Gid");
    if tuids.iter().take(3).any(|&u| u != uid) || tgids.iter().take(3).any(|&g| g != gid) {
        let owner = tuids.first().copied().unwrap_or(0);
        return Err(refuse(
            ATTACH,
            pid,
            format!("ptrace is not permitted: the process runs as uid {owner}, memtrack as uid {uid} without CAP_SYS_PTRACE"),
            ptrace_fix(ATTACH, pid),
        ));
    }
    // A process that is not dumpable (set-user-ID, or prctl(PR_SET_DUMPABLE, 0)) has its
    // /proc directory owned by root.
    if let Ok(m) = std::fs::metadata(t.proc_path("")) {
        use std::os::unix::fs::MetadataExt;
        if m.uid() != uid {
            return Err(refuse(ATTACH, pid, "ptrace is not permitted: the process is not dumpable (set-user-ID, or it called prctl(PR_SET_DUMPABLE, 0))", format!("run memtrack as root (sudo memtrack attach {pid})")));
        }
    }
    Ok(())
}

/// Refuses a process that memtrack records already (`memtrack run`, an earlier attach).
fn check_not_recorded(t: Target, maps: &[Mapping], lib: &Path) -> Result<()> {
    let pid = t.pid;
    let environ = std::fs::read(t.proc_path("environ")).unwrap_or_default();
    let preloaded = environ.split(|&b| b == 0).any(|var| {
        var.strip_prefix(b"LD_PRELOAD=")
            .is_some_and(|v| String::from_utf8_lossy(v).contains("libmemtrack"))
    });
    if preloaded {
        return Err(refuse(
            ATTACH,
            pid,
            "the process is already being recorded: it was started under `memtrack run` (its LD_PRELOAD names libmemtrack.so)",
            "report on the capture `memtrack run` writes; it records until the process exits",
        ));
    }
    let Some((m, elf)) = find_memtrack(t, maps, Some(lib))? else {
        return Ok(());
    };
    let Some(sym) = elf.symbol("memtrack_status") else {
        return Err(refuse(
            ATTACH,
            pid,
            format!(
                "the process has an older {} loaded, without the attach interface",
                m.path
            ),
            "restart it (under `memtrack run`, or without memtrack) to attach with this version",
        ));
    };
    let status = t
        .read_u32(m.base + sym)
        .map_err(|e| not_permitted(ATTACH, pid, format_args!("reading its memory: {e}")))?;
    match status {
        STATUS_RECORDING => Err(refuse(
            ATTACH,
            pid,
            "the process is already being recorded (by an earlier `memtrack attach`)",
            format!("memtrack detach {pid} stops that recording; then attach again"),
        )),
        STATUS_PRELOADED => Err(refuse(
            ATTACH,
            pid,
            "the process is already being recorded: it was started under `memtrack run`",
            "report on the capture `memtrack run` writes; it records until the process exits",
        )),
        _ => Ok(()),
    }
}

/// libmemtrack.so as the process maps it: by name, or by file (`lib`, ours, may have another
/// name through MEMTRACK_PRELOAD).
fn find_memtrack(t: Target, maps: &[Mapping], lib: Option<&Path>) -> Result<Option<(Module, Elf)>> {
    let ours = lib.and_then(|l| target::dev_ino(l).ok());
    let name = maps
        .iter()
        .find(|m| {
            m.file_name() == "libmemtrack.so"
                || ours.is_some_and(|(d, i)| m.dev == d && m.inode == i)
        })
        .map(|m| m.file_name().to_string());
    match name {
        Some(n) => target::find_module(&t, maps, |x| x == n),
        None => Ok(None),
    }
}

/// In another mount namespace (a container), the library must be the same file at the same
/// path there: the process's `dlopen` opens it by path. True when the namespace differs.
fn check_mount_namespace(t: Target, lib: &Path) -> Result<bool> {
    let pid = t.pid;
    let theirs = std::fs::read_link(t.proc_path("ns/mnt"));
    let ours = std::fs::read_link("/proc/self/ns/mnt");
    let (Ok(theirs), Ok(ours)) = (theirs, ours) else {
        return Ok(false);
    };
    if theirs == ours {
        return Ok(false);
    }
    let there = t
        .proc_path("root")
        .join(lib.strip_prefix("/").unwrap_or(lib));
    let same = match (target::dev_ino(&there), target::dev_ino(lib)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(refuse(
            ATTACH,
            pid,
            format!(
                "the process runs in another mount namespace (a container), where {} is not this library",
                lib.display()
            ),
            "run memtrack inside the container, or from a sidecar sharing its process namespace (kubectl debug -it POD --image=IMG --target=CONTAINER) with libmemtrack.so at the same path in the target (MEMTRACK_PRELOAD names the path)",
        ));
    }
    Ok(true)
}

/// The library's symbols that attach and detach use, as values in the file.
struct LibSymbols {
    start: u64,
    last_error: u64,
    status: u64,
    control: u64,
}

fn lib_symbols(elf: &Elf, path: &Path) -> Result<LibSymbols> {
    let get = |name: &str| {
        elf.symbol(name).with_context(|| {
            format!(
                "{} has no `{name}`: it predates attach (rebuild it, or point MEMTRACK_PRELOAD at a newer libmemtrack.so)",
                path.display()
            )
        })
    };
    Ok(LibSymbols {
        start: get("memtrack_start_with")?,
        last_error: get("memtrack_last_error")?,
        status: get("memtrack_status")?,
        control: get("memtrack_control")?,
    })
}

/// Where the injection left the process.
struct Injected {
    /// Addresses of `memtrack_status` and `memtrack_control` in the process.
    status: u64,
    control: u64,
}

/// Turns a failed remote call into an error that says what the process is left with.
fn call_failed(pid: i32, name: &str, e: CallError) -> anyhow::Error {
    anyhow::anyhow!("calling {name} in process {pid}: {e}")
}

/// The refusal when a seccomp filter made system calls of `name` fail.
fn seccomp_refusal(pid: i32, name: &str, why: &str) -> anyhow::Error {
    refuse(
        ATTACH,
        pid,
        format!("a seccomp filter blocks system calls {name} makes (the thread got SIGSYS; {name} failed: {why})"),
        "run the program under `memtrack run`, or without that seccomp filter (docker: --security-opt seccomp=unconfined)",
    )
}

/// Loads the library into the process and starts recording. Returns the addresses of the
/// status and control words.
fn inject(
    t: Target,
    pre: &Preflight,
    lib: &Path,
    syms: &LibSymbols,
    out: &Path,
    duration_ms: u64,
    how: How,
) -> Result<Injected> {
    let pid = t.pid;
    let (libc_mod, libc_elf) = &pre.libc;
    let libc_fn = |name: &str| libc_elf.symbol(name).map(|v| libc_mod.base + v);
    let mmap = libc_fn("mmap").context("libc has no mmap")?;
    let munmap = libc_fn("munmap").context("libc has no munmap")?;
    let errno_location = libc_fn("__errno_location");
    // glibc 2.34 moved dlopen into libc; before, libdl had it, and libc a private one.
    let dl_fn = |name: &str| {
        libc_fn(name).or_else(|| {
            let (m, e) = pre.libdl.as_ref()?;
            e.symbol(name).map(|v| m.base + v)
        })
    };
    let (dlopen, dlopen_flags) = match dl_fn("dlopen") {
        Some(f) => (f, RTLD_NOW | RTLD_GLOBAL),
        None => (
            libc_fn("__libc_dlopen_mode")
                .context("the process's C library has neither dlopen nor __libc_dlopen_mode")?,
            RTLD_NOW | RTLD_GLOBAL | RTLD_DLOPEN_INTERNAL,
        ),
    };
    let dlerror = dl_fn("dlerror");

    let unsafe_text = |rip: u64| pre.unsafe_text.iter().any(|m| m.contains_text(rip));
    let candidates = ptrace::candidate_threads(&t, 3);
    let mut held = None;
    for &tid in &candidates {
        match Hijacked::seize(t, tid, &unsafe_text, Duration::from_secs(1)) {
            Ok(h) => {
                held = Some(h);
                break;
            }
            Err(SeizeError::NoSafePoint) => continue,
            Err(SeizeError::NotPermitted(why)) => return Err(not_permitted(ATTACH, pid, why)),
            Err(SeizeError::Other(e)) => {
                return Err(e.context(format!("cannot stop a thread of process {pid}")))
            }
        }
    }
    let Some(mut h) = held else {
        return Err(refuse(
            ATTACH,
            pid,
            format!(
                "no thread reached a safe point (tried {}: each stayed inside the C library, the loader or a system call that may hold a lock)",
                candidates.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
            ),
            "try again when the process is less busy or waits for input",
        ));
    };
    let abandon = || INTERRUPTS.load(Ordering::SeqCst) > 0;
    let call = |h: &mut Hijacked, name: &str, f: u64, args: &[u64], stack: Option<u64>| {
        h.call(name, f, args, stack, &abandon)
            .map_err(|e| call_failed(pid, name, e))
    };
    // The thread's errno, put back at the end: dlopen and mmap may change it.
    let errno_at = match errno_location {
        Some(f) => Some(call(&mut h, "__errno_location", f, &[], None)?),
        None => None,
    };
    let errno = errno_at.and_then(|a| t.read_u32(a).ok());
    let scratch = call(
        &mut h,
        "mmap",
        mmap,
        &[
            0,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK) as u64,
            u64::MAX, // fd -1
            0,
        ],
        None,
    )?;
    if scratch as i64 == -1 || scratch == 0 {
        bail!("mmap of a scratch page in process {pid} failed");
    }
    let stack = Some(scratch + SCRATCH_LEN - 64);
    let result = (|| -> Result<Injected> {
        let mut strings = Vec::new();
        let lib_at = scratch;
        strings.extend_from_slice(lib.as_os_str().as_encoded_bytes());
        strings.push(0);
        let out_at = scratch + strings.len() as u64;
        strings.extend_from_slice(out.as_os_str().as_encoded_bytes());
        strings.push(0);
        if strings.len() > 64 * 1024 {
            bail!("the paths are too long");
        }
        t.write_mem(scratch, &strings)
            .with_context(|| format!("cannot write to the memory of process {pid}"))?;
        let handle = call(&mut h, "dlopen", dlopen, &[lib_at, dlopen_flags], stack)?;
        if handle == 0 {
            let why = match dlerror {
                Some(f) => {
                    let s = call(&mut h, "dlerror", f, &[], stack)?;
                    if s == 0 {
                        "no reason given".to_string()
                    } else {
                        t.read_cstr(s, 4096)
                            .unwrap_or_else(|e| format!("(unreadable: {e})"))
                    }
                }
                None => "no reason given".to_string(),
            };
            if h.seccomp_refusals > 0 {
                return Err(seccomp_refusal(pid, "dlopen", &why));
            }
            return Err(refuse(
                ATTACH,
                pid,
                format!("the process could not load {}: {why}", lib.display()),
                "check that the library is readable by the process's user at that path",
            ));
        }
        let maps = t
            .maps()
            .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
        let (dev, ino) = target::dev_ino(lib)?;
        // By file, or by path (kernels that show an overlayfs file's lower device in maps).
        let real = std::fs::canonicalize(lib).unwrap_or_else(|_| lib.to_path_buf());
        let name = maps
            .iter()
            .find(|m| (m.dev == dev && m.inode == ino) || Path::new(&m.path) == real)
            .map(|m| m.file_name().to_string())
            .with_context(|| {
                format!(
                    "{} is not mapped in process {pid} after dlopen",
                    lib.display()
                )
            })?;
        let (m, _) = target::find_module(&t, &maps, |n| n == name)?.with_context(|| {
            format!(
                "{} is not mapped in process {pid} after dlopen",
                lib.display()
            )
        })?;
        let r = call(
            &mut h,
            "memtrack_start",
            m.base + syms.start,
            &[
                out_at,
                how.start_flags(),
                duration_ms,
                how.sample_rate,
                how.sample_seed_plus_one,
                how.checkpoint_interval_ms,
            ],
            stack,
        )?;
        if r as u32 as i32 != 0 {
            let e = call(
                &mut h,
                "memtrack_last_error",
                m.base + syms.last_error,
                &[],
                stack,
            )?;
            let why = if e == 0 {
                "no reason given".to_string()
            } else {
                t.read_cstr(e, 4096)
                    .unwrap_or_else(|e| format!("(unreadable: {e})"))
            };
            if h.seccomp_refusals > 0 {
                return Err(seccomp_refusal(pid, "memtrack_start", &why));
            }
            return Err(refuse(
                ATTACH,
                pid,
                format!("the library refused to start: {why}"),
                "see the reason; `memtrack detach` stops an earlier recording",
            ));
        }
        if h.seccomp_refusals > 0 {
            eprintln!("memtrack: warning: a seccomp filter refused {} system calls during the attach; the recording started anyway", h.seccomp_refusals);
        }
        Ok(Injected {
            status: m.base + syms.status,
            control: m.base + syms.control,
        })
    })();
    // Whatever happened, the scratch page goes and the thread gets its state back.
    let unmapped = call(&mut h, "munmap", munmap, &[scratch, SCRATCH_LEN], None);
    if let (Some(a), Some(v)) = (errno_at, errno) {
        let _ = t.write_u32(a, v);
    }
    h.detach();
    let injected = result?;
    unmapped?;
    Ok(injected)
}

/// How the attached recording records (`memtrack_start_with`'s options): all zero records
/// every event.
#[derive(Clone, Copy, Debug, Default)]
pub struct How {
    pub sample_rate: u64,
    pub sample_seed_plus_one: u64,
    pub checkpoint_interval_ms: u64,
    /// `--encoding fast`.
    pub fast: bool,
}

impl How {
    /// The flags of `memtrack_start_with`.
    fn start_flags(&self) -> u64 {
        MEMTRACK_START_ATTACHED | if self.fast { MEMTRACK_START_FAST } else { 0 }
    }
}

/// `memtrack attach PID`.
pub fn cmd_attach(
    pid: i32,
    output: Option<PathBuf>,
    duration: Option<f64>,
    method: AttachMethod,
    how: How,
) -> Result<u8> {
    let t = Target { pid };
    let lib = crate::run::find_preload()?;
    let duration_ms = match duration {
        Some(d) if !(d > 0.0 && d.is_finite()) => {
            bail!("--duration must be a positive number of seconds")
        }
        Some(d) => ((d * 1000.0).round() as u64).max(1),
        None => 0,
    };
    // Ctrl-C, SIGTERM and SIGHUP wait while a thread is held (memtrack ending then would leave
    // it returning to address 0), and afterwards stop the recording.
    // SAFETY: the handler only increments an atomic counter.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_sigint as *const () as libc::sighandler_t);
        }
    }
    let pre = preflight(t, &lib)?;
    let syms = lib_symbols(&Elf::read(&lib)?, &lib)?;
    let out = match output {
        Some(o) => {
            std::path::absolute(&o).with_context(|| format!("bad output path {}", o.display()))?
        }
        None => {
            let name = t.comm().replace('/', "_");
            std::env::current_dir()?.join(format!("memtrack-{name}.{pid}.cap"))
        }
    };
    // Read back through the process's root when it sees another file system.
    let readable = if pre.other_mount_ns {
        t.proc_path("root")
            .join(out.strip_prefix("/").unwrap_or(&out))
    } else {
        out.clone()
    };
    if readable.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; remove it or give another name with -o",
            out.display()
        );
    }
    let injected = match method {
        // gdb is the weaker way (see gdb.rs): only when asked for.
        AttachMethod::Auto | AttachMethod::Ptrace => {
            inject(t, &pre, &lib, &syms, &out, duration_ms, how)?
        }
        AttachMethod::Gdb => {
            gdb::inject(pid, &lib, &out, duration_ms, how)?;
            if !alive(t, pre.start_time) {
                bail!("process {pid} exited right after gdb detached (gdb stops every thread: an epoll_wait, for one, then fails with EINTR); its capture holds what was written, if anything");
            }
            let maps = t
                .maps()
                .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
            let (m, _) = find_memtrack(t, &maps, Some(&lib))?.with_context(|| {
                format!(
                    "{} is not mapped in process {pid} after gdb loaded it",
                    lib.display()
                )
            })?;
            Injected {
                status: m.base + syms.status,
                control: m.base + syms.control,
            }
        }
    };
    match duration {
        Some(d) => eprintln!(
            "memtrack: recording {pid} into {} for {d} s (Ctrl-C stops it sooner)",
            out.display()
        ),
        None => eprintln!(
            "memtrack: recording {pid} into {} until Ctrl-C or `memtrack detach {pid}`",
            out.display()
        ),
    }
    let ended = wait_recording(t, pre.start_time, &injected, duration_ms)?;
    let at_end = match ended {
        Ended::Stopped => "at the stop",
        Ended::Exited => {
            eprintln!("memtrack: process {pid} exited while recording; the capture holds what it wrote until then");
            "at exit"
        }
    };
    match memtrack_reader::Capture::open(&readable).and_then(|c| c.summary()) {
        Ok(s) => eprintln!(
            "memtrack: capture written to {}: {} allocations ({}) recorded, peak {}, {} live {at_end}; report on it with: memtrack summary {}",
            out.display(),
            memtrack_reader::grouped(s.total_allocations),
            memtrack_reader::human_bytes(s.total_bytes),
            memtrack_reader::human_bytes(s.peak_bytes),
            memtrack_reader::human_bytes(s.leaked_at_exit_bytes),
            out.display()
        ),
        Err(e) => eprintln!("memtrack: warning: cannot summarize {}: {e}", out.display()),
    }
    Ok(0)
}

enum Ended {
    Stopped,
    Exited,
}

/// Whether the process is still the one attached to (same pid, same start time).
fn alive(t: Target, start_time: u64) -> bool {
    t.stat()
        .is_some_and(|s| s.start_time == start_time && !matches!(s.state, 'Z' | 'X'))
}

/// Waits until the recording has stopped (duration over, Ctrl-C, `memtrack detach`) or the
/// process is gone.
fn wait_recording(t: Target, start_time: u64, inj: &Injected, duration_ms: u64) -> Result<Ended> {
    let started = Instant::now();
    let mut asked: Option<Instant> = None;
    loop {
        if !alive(t, start_time) {
            return Ok(Ended::Exited);
        }
        match t.read_u32(inj.status) {
            Ok(STATUS_STOPPED) => return Ok(Ended::Stopped),
            Ok(_) => {}
            Err(_) if !alive(t, start_time) => return Ok(Ended::Exited),
            Err(e) => bail!(
                "cannot read the recording's status in process {}: {e}",
                t.pid
            ),
        }
        // The library stops itself at the end of the duration; memtrack asks only when it
        // has not, well after.
        let overdue = duration_ms > 0
            && started.elapsed() > Duration::from_millis(duration_ms) + Duration::from_secs(10);
        if asked.is_none() && (INTERRUPTS.load(Ordering::SeqCst) > 0 || overdue) {
            if !overdue {
                eprintln!("memtrack: stopping the recording");
            }
            if let Err(e) = t.write_u32(inj.control, 1) {
                if !alive(t, start_time) {
                    return Ok(Ended::Exited);
                }
                bail!("cannot ask process {} to stop recording: {e}", t.pid);
            }
            asked = Some(Instant::now());
        }
        if asked.is_some_and(|a| a.elapsed() > Duration::from_secs(10)) {
            bail!(
                "process {} did not stop recording within 10 s of being asked",
                t.pid
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `memtrack detach PID`.
pub fn cmd_detach(pid: i32) -> Result<u8> {
    let t = Target { pid };
    let Some(stat) = t.stat() else {
        return Err(refuse(
            DETACH,
            pid,
            "no such process",
            format!("check the process id (ps -p {pid})"),
        ));
    };
    let maps = t.maps().map_err(|e| {
        not_permitted(
            DETACH,
            pid,
            format_args!("cannot read /proc/{pid}/maps: {e}"),
        )
    })?;
    let lib = crate::run::find_preload().ok();
    let Some((m, elf)) = find_memtrack(t, &maps, lib.as_deref())? else {
        return Err(refuse(
            DETACH,
            pid,
            "the process is not recorded by `memtrack attach` (libmemtrack.so is not loaded in it)",
            format!("memtrack attach {pid} starts recording it"),
        ));
    };
    let syms = lib_symbols(&elf, Path::new(&m.path))?;
    let status_at = m.base + syms.status;
    let status = t
        .read_u32(status_at)
        .map_err(|e| not_permitted(DETACH, pid, format_args!("reading its memory: {e}")))?;
    match status {
        STATUS_RECORDING => {}
        STATUS_PRELOADED => {
            return Err(refuse(
                DETACH,
                pid,
                "the process is recorded by `memtrack run`, which records until it exits",
                "report on the capture `memtrack run` writes",
            ));
        }
        _ => {
            return Err(refuse(
                DETACH,
                pid,
                "the process is not recording (its recording has ended, or never started)",
                format!("memtrack attach {pid} starts recording it"),
            ));
        }
    }
    t.write_u32(m.base + syms.control, 1)
        .map_err(|e| not_permitted(DETACH, pid, format_args!("writing its memory: {e}")))?;
    let asked = Instant::now();
    while asked.elapsed() < Duration::from_secs(10) {
        if !alive(t, stat.start_time) {
            eprintln!("memtrack: process {pid} exited; its capture holds what it wrote until then");
            return Ok(0);
        }
        if t.read_u32(status_at).ok() == Some(STATUS_STOPPED) {
            eprintln!("memtrack: process {pid} stopped recording; its capture is complete");
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("process {pid} did not stop recording within 10 s")
}
