//! Sampled recording (`MEMTRACK_SAMPLE_RATE`): which allocations are recorded, and the set of
//! sampled blocks still live, so that only their frees are recorded.
//!
//! **How**: the tcmalloc/jemalloc scheme. Each thread counts down the bytes to its next sample
//! point, drawn from an exponential distribution of mean `rate`; an allocation that crosses it
//! is recorded, and a fresh gap is drawn (memorylessness makes each allocation of `size` bytes
//! sampled with probability `1 - exp(-size / rate)`, independently, whatever came before). The
//! unsampled path is a thread-local decrement and a compare.
//! Frees: a counting filter (one counter per hash bucket of sampled live addresses) rejects
//! almost every unsampled address with one load; a positive goes to an exact open-addressing
//! table behind a spin lock. Both live in `mmap`ed pages: nothing here uses the program's heap.
//!
//! Must never: allocate, take a lock on the unsampled path, or change errno on the fast paths.

use crate::env::getenv;
use crate::guard::IgnoreAllocs;
use crate::lifecycle::{self, State};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::*};

/// Mean bytes between samples; 0: every allocation is recorded.
static RATE: AtomicU64 = AtomicU64::new(0);
/// `MEMTRACK_SAMPLE_SEED` + 1 (0: none, seed from the clock).
static SEED: AtomicU64 = AtomicU64::new(0);
/// Threads that drew their first gap: the seeded stream of thread n is `seed + n`.
static THREADS: AtomicU64 = AtomicU64::new(0);

/// Reads `MEMTRACK_SAMPLE_RATE` and `MEMTRACK_SAMPLE_SEED` (plain integers), once per image.
pub(crate) fn configure_from_env() {
    let num = |name: &std::ffi::CStr| {
        getenv(name).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
    };
    configure(
        num(c"MEMTRACK_SAMPLE_RATE").unwrap_or(0),
        num(c"MEMTRACK_SAMPLE_SEED"),
    );
}

/// Samples with a mean gap of `rate` bytes (0 or 1: every allocation), from `seed` (None: a
/// seed of its own per process).
pub(crate) fn configure(rate: u64, seed: Option<u64>) {
    // A rate of 1 byte samples every allocation: the same as none.
    let rate = if rate <= 1 { 0 } else { rate };
    SEED.store(seed.map_or(0, |s| s.wrapping_add(1)), Relaxed);
    if rate != 0 && set().is_none() {
        // No room for the set of sampled blocks: record everything rather than guess.
        RATE.store(0, Release);
        return;
    }
    RATE.store(rate, Release);
}

/// The mean gap between samples in bytes, 0 when not sampling.
#[inline(always)]
pub(crate) fn rate() -> u64 {
    RATE.load(Relaxed)
}

/// Per-thread countdown state, in the guard's thread-local block (one TLS access per hook).
pub(crate) struct Countdown {
    /// Bytes left before the next sample point (below zero: crossed).
    left: Cell<i64>,
    /// xorshift64* state; 0 before the thread's first draw.
    rng: Cell<u64>,
}

impl Countdown {
    pub(crate) const fn new() -> Countdown {
        Countdown {
            left: Cell::new(0),
            rng: Cell::new(0),
        }
    }

    /// Counts `size` bytes allocated; true when this allocation is to be recorded.
    #[inline(always)]
    pub(crate) fn take(&self, size: u64) -> bool {
        let left = self
            .left
            .get()
            .wrapping_sub(size.min(i64::MAX as u64) as i64);
        self.left.set(left);
        left < 0 && self.crossed(size)
    }

    #[cold]
    #[inline(never)]
    fn crossed(&self, size: u64) -> bool {
        let rate = rate();
        if rate == 0 {
            return true;
        }
        if self.rng.get() == 0 {
            // The thread's first allocation: draw its first gap, then count this one against it.
            self.rng.set(first_state());
            let left = self
                .gap(rate)
                .saturating_sub(size.min(i64::MAX as u64) as i64);
            self.left.set(left);
            if left >= 0 {
                return false;
            }
        }
        // Sampled; the gap to the next sample starts after this block (memoryless).
        self.left.set(self.gap(rate));
        true
    }

    /// An exponentially distributed gap of mean `rate`.
    fn gap(&self, rate: u64) -> i64 {
        // xorshift64*
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // Uniform in (0, 1]: 53 bits, never 0.
        let u = ((r >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let g = -u.ln() * rate as f64;
        g.min(i64::MAX as f64 / 2.0) as i64
    }
}

fn first_state() -> u64 {
    let n = THREADS.fetch_add(1, Relaxed);
    let seed = match SEED.load(Relaxed) {
        0 => crate::clock::now_mono_ns() ^ ((std::process::id() as u64) << 32),
        s => s - 1,
    };
    let s = splitmix(seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    if s == 0 {
        1
    } else {
        s
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------- sampled live blocks

/// Buckets of the filter: 2^17. Its bits (one per bucket, set while a sampled block hashes
/// there) take 16 KiB, which stay in the cache: a larger filter made every free a cache
/// and TLB miss (17% of a random-free workload's time at 2 MiB). The bucket counters behind
/// them are touched only under the lock.
const FILTER_BITS: u32 = 17;
const EMPTY: u64 = 0;
const TOMB: u64 = 1;

/// The sampled blocks still live.
pub(crate) struct SampledSet {
    /// One bit per bucket: some sampled block hashes there.
    bits: *const AtomicU64,
    /// Sampled blocks per bucket (lock held).
    counts: *mut u32,
    lock: AtomicBool,
    /// Open-addressing table of addresses (`EMPTY`, `TOMB` or an address), `cap` a power of 2.
    table: Cell<*mut u64>,
    cap: Cell<usize>,
    used: Cell<usize>,
    tombs: Cell<usize>,
}

// SAFETY: the filter is atomics; the table's cells are touched only with `lock` held.
unsafe impl Sync for SampledSet {}

static SET: AtomicPtr<SampledSet> = AtomicPtr::new(std::ptr::null_mut());

/// The set, made at the first call (or None when its pages cannot be mapped).
fn set() -> Option<&'static SampledSet> {
    let p = SET.load(Acquire);
    if !p.is_null() {
        // SAFETY: published below, never freed.
        return Some(unsafe { &*p });
    }
    let s = SampledSet::new()?;
    let raw = map(std::mem::size_of::<SampledSet>())? as *mut SampledSet;
    // SAFETY: `raw` is a fresh mapping large enough and aligned (page) for the value.
    unsafe { raw.write(s) };
    SET.store(raw, Release);
    // SAFETY: just written.
    Some(unsafe { &*raw })
}

/// A fresh, empty set of sampled blocks, the old one left mapped: in a forked child (the
/// parent's may be locked by a thread the child does not have; its blocks belong to the
/// parent's capture), and for a new recording in a running process.
pub(crate) fn reset_after_fork() {
    if rate() == 0 {
        return;
    }
    SET.store(std::ptr::null_mut(), Release);
    if set().is_none() {
        RATE.store(0, Release);
    }
}

fn map(bytes: usize) -> Option<*mut u8> {
    // SAFETY: an anonymous private mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

fn unmap(p: *mut u8, bytes: usize) {
    // SAFETY: a mapping made by `map` with this length, no longer referenced.
    unsafe { libc::munmap(p as *mut libc::c_void, bytes) };
}

#[inline(always)]
fn mix(addr: u64) -> u64 {
    (addr >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl SampledSet {
    fn new() -> Option<SampledSet> {
        let _errno = crate::guard::SaveErrno::new();
        let bits = map(1usize << (FILTER_BITS - 3))? as *const AtomicU64;
        let counts = map(4usize << FILTER_BITS)? as *mut u32;
        let cap = 1 << 14;
        let table = map(cap * 8)? as *mut u64;
        Some(SampledSet {
            bits,
            counts,
            lock: AtomicBool::new(false),
            table: Cell::new(table),
            cap: Cell::new(cap),
            used: Cell::new(0),
            tombs: Cell::new(0),
        })
    }

    #[inline(always)]
    fn bucket(addr: u64) -> usize {
        (mix(addr) >> (64 - FILTER_BITS)) as usize
    }

    #[inline(always)]
    fn bit_word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: i / 64 < 2^FILTER_BITS / 64, the bit array's length in words; mapped
        // zeroed, never unmapped.
        unsafe { &*self.bits.add(i / 64) }
    }

    /// Counts a block in (`+1`) or out (`-1`) of its bucket, keeping the bucket's bit (lock
    /// held).
    fn count(&self, addr: u64, up: bool) {
        let i = Self::bucket(addr);
        // SAFETY: i < 2^FILTER_BITS, the counters' length; only touched with the lock held.
        let c = unsafe { &mut *self.counts.add(i) };
        let bit = 1u64 << (i % 64);
        if up {
            *c = c.saturating_add(1);
            if *c == 1 {
                self.bit_word(i).fetch_or(bit, Release);
            }
        } else {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.bit_word(i).fetch_and(!bit, Release);
            }
        }
    }

    fn locked<R>(&self, f: impl FnOnce(&Self) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
            if self.lock.load(Relaxed) {
                // SAFETY: sched_yield has no preconditions and cannot fail on Linux.
                unsafe { libc::sched_yield() };
            }
        }
        let r = f(self);
        self.lock.store(false, Release);
        r
    }

    /// The slot of `addr` or of the first free one on its probe path (lock held).
    fn find(&self, addr: u64) -> (usize, bool) {
        let (t, mask) = (self.table.get(), self.cap.get() - 1);
        let mut i = (mix(addr) as usize) & mask;
        let mut free = None;
        loop {
            // SAFETY: i <= mask < cap, the table's length.
            let v = unsafe { *t.add(i) };
            if v == addr {
                return (i, true);
            }
            if v == EMPTY {
                return (free.unwrap_or(i), false);
            }
            if v == TOMB && free.is_none() {
                free = Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Rebuilds the table (larger when it is over half full) without tombstones (lock held).
    fn rebuild(&self) -> bool {
        let (old, cap) = (self.table.get(), self.cap.get());
        let live = self.used.get() - self.tombs.get();
        let new_cap = if live * 2 >= cap { cap * 2 } else { cap };
        let Some(t) = map(new_cap * 8) else {
            return false;
        };
        self.table.set(t as *mut u64);
        self.cap.set(new_cap);
        self.used.set(0);
        self.tombs.set(0);
        for i in 0..cap {
            // SAFETY: i < cap, the old table's length.
            let v = unsafe { *old.add(i) };
            if v > TOMB {
                let (j, _) = self.find(v);
                // SAFETY: j < new_cap.
                unsafe { *self.table.get().add(j) = v };
                self.used.set(self.used.get() + 1);
            }
        }
        unmap(old as *mut u8, cap * 8);
        true
    }

    /// Adds a sampled block handed to the program; false when there was no room (the block's
    /// free will then not be recorded: it stays live in the capture).
    pub(crate) fn insert(&self, addr: u64) -> bool {
        if addr <= TOMB {
            return false;
        }
        self.locked(|s| {
            if (s.used.get() + 1) * 4 > s.cap.get() * 3 {
                let _errno = crate::guard::SaveErrno::new();
                if !s.rebuild() && (s.used.get() + 2) > s.cap.get() {
                    return false;
                }
            }
            let (i, found) = s.find(addr);
            if !found {
                // SAFETY: i < cap.
                let t = unsafe { &mut *s.table.get().add(i) };
                if *t == TOMB {
                    s.tombs.set(s.tombs.get() - 1);
                } else {
                    s.used.set(s.used.get() + 1);
                }
                *t = addr;
                s.count(addr, true);
            }
            !found
        })
    }

    /// True when `addr` may be a sampled block (one load; false positives are possible).
    #[inline(always)]
    pub(crate) fn maybe(&self, addr: u64) -> bool {
        let i = Self::bucket(addr);
        self.bit_word(i).load(Relaxed) & (1u64 << (i % 64)) != 0
    }

    /// Removes `addr` if it is a sampled block: true when it was (its free is to be recorded).
    pub(crate) fn remove(&self, addr: u64) -> bool {
        self.locked(|s| {
            let (i, found) = s.find(addr);
            if found {
                // SAFETY: i < cap.
                unsafe { *s.table.get().add(i) = TOMB };
                s.tombs.set(s.tombs.get() + 1);
                s.count(addr, false);
            }
            found
        })
    }
}

/// The set of sampled live blocks, when sampling.
#[inline(always)]
pub(crate) fn sampled() -> Option<&'static SampledSet> {
    if rate() == 0 {
        return None;
    }
    let p = SET.load(Acquire);
    // SAFETY: published by `set`, never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Whether the free of `addr` is recorded, with the guard entered when it is. Not sampling:
/// `full` decides (the caller's usual check). Sampling: only a sampled block's free, which
/// leaves the set; the common unsampled address is rejected by one load of the filter, before
/// the guard is touched. The one filter of the preload's `free` and the Rust `dealloc`.
#[inline(always)]
pub(crate) fn enter_free(
    addr: u64,
    full: impl FnOnce() -> Option<IgnoreAllocs>,
) -> Option<IgnoreAllocs> {
    if rate() == 0 {
        return full();
    }
    let s = sampled()?;
    if lifecycle::current_relaxed() != State::Active || !s.maybe(addr) {
        return None;
    }
    let g = IgnoreAllocs::enter()?;
    s.remove(addr).then_some(g)
}

/// Records that `addr`, just handed to the program, was sampled.
#[inline]
pub(crate) fn note_sampled(addr: u64) {
    if let Some(s) = sampled() {
        s.insert(addr);
    }
}

/// The framed `SAMPLING` record of this capture, when sampling.
pub(crate) fn record() -> Option<Vec<u8>> {
    let rate = rate();
    if rate == 0 {
        return None;
    }
    let payload = memtrack_format::SamplingRecord { rate_bytes: rate }.encode();
    let mut framed = Vec::new();
    memtrack_format::put_record(&mut framed, memtrack_format::record::SAMPLING, &payload);
    Some(framed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_adds_finds_and_removes() {
        let s = SampledSet::new().unwrap();
        for a in (0..100_000u64).map(|i| 0x1000 + i * 48) {
            assert!(s.insert(a));
        }
        assert!(!s.insert(0x1000), "already there");
        for a in (0..100_000u64).map(|i| 0x1000 + i * 48) {
            assert!(s.maybe(a));
            if a % 96 == 0 {
                assert!(s.remove(a));
                assert!(!s.remove(a));
            }
        }
        for a in (0..100_000u64).map(|i| 0x1000 + i * 48) {
            assert_eq!(s.remove(a), a % 96 != 0, "{a:#x}");
        }
        assert!(!s.maybe(0x1000));
    }

    #[test]
    fn gaps_average_the_rate() {
        let c = Countdown::new();
        c.rng.set(12345);
        let n = 100_000;
        let sum: i64 = (0..n).map(|_| c.gap(1 << 20)).sum();
        let mean = sum as f64 / n as f64;
        assert!((mean / (1u64 << 20) as f64 - 1.0).abs() < 0.02, "{mean}");
    }
}
