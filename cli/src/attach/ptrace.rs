//! Calling functions inside another process with ptrace, without writing any code into it.
//!
//! One thread is seized (the others keep running, so a lock one of them holds gets released),
//! interrupted, and its registers saved. A call sets `rip` to the function, the arguments in
//! `rdi rsi rdx rcx r8 r9`, and a stack whose return address is 0: when the function returns,
//! the thread faults at address 0 and the `SIGSEGV` stop is the return (the signal is never
//! delivered). At the end the saved registers (and the FPU/vector state) are put back, so an
//! interrupted system call restarts as if nothing had happened.

use super::target::Target;
use std::time::{Duration, Instant};

const PTRACE_EVENT_STOP: i32 = 128;
const NT_PRFPREG: libc::c_int = 2;
const NT_X86_XSTATE: libc::c_int = 0x202;
/// The `ERESTART*` codes a system call interrupted by the stop returns (kernel-internal; the
/// kernel turns them into a restart or `EINTR` on the way back to user space).
const RESTART_CODES: [i64; 4] = [-512, -513, -514, -516];
/// System calls in which a thread waits for work and holds no allocator or loader lock.
const IDLE_SYSCALLS: [i64; 22] = [
    0,   // read
    7,   // poll
    23,  // select
    34,  // pause
    35,  // nanosleep
    43,  // accept
    45,  // recvfrom
    47,  // recvmsg
    61,  // wait4
    128, // rt_sigtimedwait
    130, // rt_sigsuspend
    230, // clock_nanosleep
    232, // epoll_wait
    247, // waitid
    270, // pselect6
    271, // ppoll
    281, // epoll_pwait
    288, // accept4
    299, // recvmmsg
    441, // epoll_pwait2
    17,  // pread64
    19,  // readv
];

/// How a remote call went wrong.
#[derive(Debug)]
pub enum CallError {
    /// The process ended during the call.
    Exited(String),
    /// The function faulted (not at the return address).
    Fault { signal: i32, rip: u64 },
    /// A ptrace or wait call failed.
    Os(String),
    /// memtrack was interrupted (Ctrl-C twice) while the call had not returned.
    Abandoned,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Exited(how) => write!(f, "the process {how} during the injection"),
            CallError::Fault { signal, rip } => write!(
                f,
                "the call faulted with signal {signal} at {rip:#x}; the process may be damaged"
            ),
            CallError::Os(e) => write!(f, "{e}"),
            CallError::Abandoned => {
                write!(f, "abandoned while a call in the process had not returned")
            }
        }
    }
}

/// One thread held under ptrace, its registers saved.
pub struct Hijacked {
    pub target: Target,
    pub tid: i32,
    saved: libc::user_regs_struct,
    /// The FPU/vector state as `PTRACE_GETREGSET` gave it, with the note type it came from.
    saved_fp: Option<(libc::c_int, Vec<u8>)>,
    /// Signals that arrived for the thread during the calls, sent again after the detach.
    pending: Vec<i32>,
    /// System calls a seccomp filter refused with `SIGSYS` during the calls (each made to
    /// fail with `EPERM` instead, so that the function returns and releases its locks).
    pub seccomp_refusals: u32,
    detached: bool,
}

/// Why seizing failed.
pub enum SeizeError {
    /// `EPERM`: ptrace is not permitted.
    NotPermitted(String),
    /// The thread stayed inside the C library or the loader (or a non-idle system call).
    NoSafePoint,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for SeizeError {
    fn from(e: anyhow::Error) -> Self {
        SeizeError::Other(e)
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// The threads to try, best first: those blocked in an idle system call, then those running
/// (not in any system call), then the others; the main thread first within each group. At most
/// `max` of them.
pub fn candidate_threads(target: &Target, max: usize) -> Vec<i32> {
    let tids: Vec<i32> = std::fs::read_dir(target.proc_path("task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut ranked: Vec<(u8, bool, i32)> = tids
        .into_iter()
        .map(|tid| {
            let path = target.proc_path(&format!("task/{tid}/syscall"));
            let first = std::fs::read_to_string(path).unwrap_or_default();
            let first = first.split_whitespace().next().unwrap_or("");
            let rank = match first.parse::<i64>() {
                Ok(n) if IDLE_SYSCALLS.contains(&n) => 0,
                _ if first == "running" || first == "-1" => 1,
                _ => 2,
            };
            (rank, tid != target.pid, tid)
        })
        .collect();
    ranked.sort_unstable();
    let mut out: Vec<i32> = ranked.into_iter().map(|(_, _, t)| t).take(max).collect();
    if out.is_empty() {
        out.push(target.pid);
    }
    out
}

/// Whether a signal the thread does not block waits for it (its own or the process's).
fn signal_waiting(target: &Target, tid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(target.proc_path(&format!("task/{tid}/status"))) else {
        return true;
    };
    let mask = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

/// Waits for `tid` to stop; the raw status.
fn wait_stop(tid: i32, deadline: Option<Instant>) -> Result<i32, CallError> {
    let mut status = 0;
    loop {
        let flags = if deadline.is_some() { libc::WNOHANG } else { 0 };
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | flags) };
        if r == tid {
            return Ok(status);
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(CallError::Os(format!("waitpid({tid}): {e}")));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(CallError::Os(format!(
                "thread {tid} did not stop within 5 s"
            )));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn getregs(tid: i32) -> Result<libc::user_regs_struct, CallError> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GETREGS writes one user_regs_struct at the pointer.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            &mut regs as *mut libc::user_regs_struct,
        )
    };
    if r < 0 {
        return Err(CallError::Os(os_err("PTRACE_GETREGS")));
    }
    Ok(regs)
}

fn setregs(tid: i32, regs: &libc::user_regs_struct) -> Result<(), CallError> {
    // SAFETY: PTRACE_SETREGS reads one user_regs_struct from the pointer.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGS,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            regs as *const libc::user_regs_struct,
        )
    };
    if r < 0 {
        return Err(CallError::Os(os_err("PTRACE_SETREGS")));
    }
    Ok(())
}

fn get_fp(tid: i32) -> Option<(libc::c_int, Vec<u8>)> {
    for note in [NT_X86_XSTATE, NT_PRFPREG] {
        let mut buf = vec![0u8; 64 * 1024];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`; the kernel writes at most iov_len bytes and
        // shortens iov_len to what it wrote.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                tid,
                note as usize as *mut libc::c_void,
                &mut iov as *mut libc::iovec,
            )
        };
        if r == 0 {
            buf.truncate(iov.iov_len);
            return Some((note, buf));
        }
    }
    None
}

fn set_fp(tid: i32, fp: &(libc::c_int, Vec<u8>)) {
    let mut iov = libc::iovec {
        iov_base: fp.1.as_ptr() as *mut libc::c_void,
        iov_len: fp.1.len(),
    };
    // SAFETY: the iovec describes the saved buffer, which the kernel only reads.
    unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            fp.0 as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec,
        );
    }
}

fn cont(tid: i32, sig: i32) -> Result<(), CallError> {
    // SAFETY: PTRACE_CONT takes the signal as its data argument and no pointer.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_CONT,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            sig as usize as *mut libc::c_void,
        )
    };
    if r < 0 {
        return Err(CallError::Os(os_err("PTRACE_CONT")));
    }
    Ok(())
}

fn interrupt(tid: i32) -> Result<(), CallError> {
    // SAFETY: PTRACE_INTERRUPT takes no pointer arguments.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_INTERRUPT,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r < 0 {
        return Err(CallError::Os(os_err("PTRACE_INTERRUPT")));
    }
    Ok(())
}

fn describe_end(status: i32) -> Option<String> {
    if libc::WIFEXITED(status) {
        Some(format!("exited with code {}", libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(format!("was killed by signal {}", libc::WTERMSIG(status)))
    } else {
        None
    }
}

impl Hijacked {
    /// Seizes thread `tid` and stops it at a safe point: inside an idle system call, or with
    /// its `rip` outside the text of the modules in `unsafe_text` (the C library and the
    /// loader: a thread stopped there may hold their locks).
    pub fn seize(
        target: Target,
        tid: i32,
        unsafe_text: &dyn Fn(u64) -> bool,
        budget: Duration,
    ) -> Result<Hijacked, SeizeError> {
        // SAFETY: PTRACE_SEIZE takes no pointer arguments (options 0).
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SEIZE,
                tid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                return Err(SeizeError::NotPermitted(format!("PTRACE_SEIZE: {e}")));
            }
            return Err(SeizeError::Other(anyhow::anyhow!(
                "PTRACE_SEIZE of thread {tid}: {e}"
            )));
        }
        let mut h = Hijacked {
            target,
            tid,
            // SAFETY: plain integers; replaced below before any use.
            saved: unsafe { std::mem::zeroed() },
            saved_fp: None,
            pending: Vec::new(),
            seccomp_refusals: 0,
            detached: false,
        };
        let deadline = Instant::now() + budget;
        let mut delay = Duration::from_millis(1);
        loop {
            h.stop()
                .map_err(|e| SeizeError::Other(anyhow::anyhow!("{e}")))?;
            let mut regs = getregs(tid).map_err(|e| SeizeError::Other(anyhow::anyhow!("{e}")))?;
            let idle_nr =
                regs.orig_rax as i64 >= 0 && IDLE_SYSCALLS.contains(&(regs.orig_rax as i64));
            let restarts = RESTART_CODES.contains(&(regs.rax as i64));
            // epoll_wait (and a few others) answer any interruption, a ptrace stop included,
            // with EINTR instead of a restart. Caused by this stop (no signal waits to be
            // delivered), it is undone: the thread goes back to the `syscall` instruction
            // and makes the call again (a finite timeout starts over).
            let rewind = idle_nr
                && regs.rax as i64 == -(libc::EINTR as i64)
                && h.pending.is_empty()
                && !signal_waiting(&target, tid)
                && target.read_mem(regs.rip - 2, 2).ok().as_deref() == Some(&[0x0f, 0x05]);
            if rewind {
                regs.rax = regs.orig_rax;
                regs.rip -= 2;
            }
            let idle = idle_nr && (restarts || rewind);
            if idle || !unsafe_text(regs.rip) {
                h.saved = regs;
                h.saved_fp = get_fp(tid);
                return Ok(h);
            }
            if Instant::now() >= deadline {
                h.detach();
                return Err(SeizeError::NoSafePoint);
            }
            cont(tid, 0).map_err(|e| SeizeError::Other(anyhow::anyhow!("{e}")))?;
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    /// Interrupts the running thread and waits for the interrupt's stop, keeping signals that
    /// arrive first for later.
    fn stop(&mut self) -> Result<(), CallError> {
        interrupt(self.tid)?;
        loop {
            let status = wait_stop(self.tid, Some(Instant::now() + Duration::from_secs(5)))?;
            if let Some(how) = describe_end(status) {
                self.detached = true;
                return Err(CallError::Exited(how));
            }
            if status >> 16 == PTRACE_EVENT_STOP {
                return Ok(());
            }
            // A signal-delivery stop before the interrupt's: keep the signal for the end.
            self.pending.push(libc::WSTOPSIG(status));
            cont(self.tid, 0)?;
        }
    }

    /// Calls `func(args...)` in the thread with the stack pointer below `stack_top` (None: the
    /// thread's own stack, below its red zone). Returns `rax`. `abandon` is polled while the
    /// call runs: once it says so after the 5 s report, the call is given up.
    pub fn call(
        &mut self,
        name: &str,
        func: u64,
        args: &[u64],
        stack_top: Option<u64>,
        abandon: &dyn Fn() -> bool,
    ) -> Result<u64, CallError> {
        assert!(args.len() <= 6, "at most six register arguments");
        let mut regs = self.saved;
        // Not a system call any more: no restart logic applies to the call's registers.
        regs.orig_rax = u64::MAX;
        let top = stack_top.unwrap_or(self.saved.rsp - 128 - 256);
        // At a function's entry, rsp + 8 is 16-byte aligned: the return address sits there.
        let rsp = (top & !15) - 8;
        self.target
            .write_mem(rsp, &0u64.to_ne_bytes())
            .map_err(|e| {
                CallError::Os(format!("cannot write the call's stack at {rsp:#x}: {e}"))
            })?;
        regs.rsp = rsp;
        regs.rip = func;
        regs.rax = 0;
        regs.eflags &= !0x400; // DF clear, as the ABI requires at a call
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.rcx,
            &mut regs.r8,
            &mut regs.r9,
        ];
        for (slot, &a) in slots.into_iter().zip(args) {
            *slot = a;
        }
        setregs(self.tid, &regs)?;
        cont(self.tid, 0)?;
        let started = Instant::now();
        let mut reported = false;
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a local.
            let r = unsafe { libc::waitpid(self.tid, &mut status, libc::__WALL | libc::WNOHANG) };
            if r == 0 {
                if !reported && started.elapsed() >= Duration::from_secs(5) {
                    eprintln!(
                        "memtrack: the call to {name} in process {} has not returned after 5 s: it may wait for a lock another thread holds; waiting (Ctrl-C to give up, which leaves the process stuck)",
                        self.target.pid
                    );
                    reported = true;
                }
                if reported && abandon() {
                    return Err(CallError::Abandoned);
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(CallError::Os(format!("waitpid: {e}")));
            }
            if let Some(how) = describe_end(status) {
                self.detached = true;
                return Err(CallError::Exited(how));
            }
            if !libc::WIFSTOPPED(status) {
                continue;
            }
            let sig = libc::WSTOPSIG(status);
            if status >> 16 != 0 {
                // An event stop (a group stop seen as PTRACE_EVENT_STOP): carry on.
                cont(self.tid, 0)?;
                continue;
            }
            match sig {
                libc::SIGSEGV => {
                    let now = getregs(self.tid)?;
                    if now.rip == 0 {
                        return Ok(now.rax);
                    }
                    return Err(CallError::Fault {
                        signal: sig,
                        rip: now.rip,
                    });
                }
                libc::SIGSYS => {
                    // SECCOMP_RET_TRAP skipped the system call and stopped here, after it:
                    // it fails as if refused, and the function goes on to its error path.
                    let mut now = getregs(self.tid)?;
                    now.rax = -(libc::EPERM as i64) as u64;
                    setregs(self.tid, &now)?;
                    self.seccomp_refusals += 1;
                    cont(self.tid, 0)?;
                }
                libc::SIGBUS | libc::SIGILL | libc::SIGFPE => {
                    let now = getregs(self.tid)?;
                    return Err(CallError::Fault {
                        signal: sig,
                        rip: now.rip,
                    });
                }
                _ => {
                    // Not for now: a handler would run on the hijacked stack. Sent again later.
                    self.pending.push(sig);
                    cont(self.tid, 0)?;
                }
            }
        }
    }

    /// Puts the saved registers back and lets the thread go; signals that arrived meanwhile
    /// are sent to it again.
    pub fn detach(&mut self) {
        if self.detached {
            return;
        }
        self.detached = true;
        let _ = setregs(self.tid, &self.saved);
        if let Some(fp) = &self.saved_fp {
            set_fp(self.tid, fp);
        }
        // SAFETY: PTRACE_DETACH with signal 0 takes no pointer arguments.
        unsafe {
            libc::ptrace(
                libc::PTRACE_DETACH,
                self.tid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            );
        }
        for &sig in &self.pending {
            // SAFETY: tgkill takes plain integers.
            unsafe {
                libc::syscall(libc::SYS_tgkill, self.target.pid, self.tid, sig);
            }
        }
    }
}

impl Drop for Hijacked {
    fn drop(&mut self) {
        self.detach();
    }
}
