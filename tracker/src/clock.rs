//! Event times. The writer thread publishes the time every [`TICK`]; an event reads the last
//! published value with one relaxed load instead of reading the clock. Event order never
//! depends on it (sequence numbers give the order), so a time may lag by up to a tick.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Time unit of event times in the capture: microseconds.
pub(crate) const CLOCK_UNIT_NS: u64 = 1000;
/// How often the writer publishes the time.
pub(crate) const TICK: Duration = Duration::from_millis(2);

#[repr(align(128))]
struct Padded<T>(T);

/// The published time, in clock units since the capture's start. Kept on its own cache line:
/// every event reads it.
static PUBLISHED: Padded<AtomicU64> = Padded(AtomicU64::new(0));
/// The capture's start on the monotonic clock (the first image's, after an exec).
static START_MONO_NS: AtomicU64 = AtomicU64::new(0);

/// The monotonic clock, in nanoseconds.
pub(crate) fn now_mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Times count from `start_mono_ns`. `restart`: a forked child, whose published time must not
/// be its parent's until its writer ticks.
pub(crate) fn start_at(start_mono_ns: u64, restart: bool) {
    START_MONO_NS.store(start_mono_ns, Ordering::Relaxed);
    if restart {
        PUBLISHED.0.store(0, Ordering::Relaxed);
    }
}

/// The precise time, in clock units since the start.
pub(crate) fn now_units() -> u64 {
    now_mono_ns().saturating_sub(START_MONO_NS.load(Ordering::Relaxed)) / CLOCK_UNIT_NS
}

/// Publishes the time for events and returns it.
pub(crate) fn tick() -> u64 {
    let now = now_units();
    PUBLISHED.0.fetch_max(now, Ordering::Relaxed);
    now
}

/// The time of an event: the last published tick.
#[inline(always)]
pub(crate) fn event_time() -> u64 {
    PUBLISHED.0.load(Ordering::Relaxed)
}
