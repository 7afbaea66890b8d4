//! The signal dispositions of `memtrack run`: what the command inherits, and SIGTERM/SIGHUP
//! passed on to it.

pub(super) static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Whether SIGPIPE was ignored when memtrack started. Rust's runtime ignores it before `main`,
/// and `Command` resets it to the default in a child: the command gets back what memtrack was
/// started with (a program that ignores SIGPIPE sees EPIPE where it would otherwise die).
pub(super) static SIGPIPE_IGNORED_AT_START: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Runs before Rust's runtime (from `.init_array`), single-threaded.
extern "C" fn read_sigpipe_at_start() {
    // SAFETY: a zeroed sigaction is a valid out-parameter; the call only reads the disposition.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut sa) == 0 {
            SIGPIPE_IGNORED_AT_START.store(
                sa.sa_sigaction == libc::SIG_IGN,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

#[used]
#[link_section = ".init_array"]
static READ_SIGPIPE_AT_START: extern "C" fn() = read_sigpipe_at_start;

pub(super) extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}
