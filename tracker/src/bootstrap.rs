//! The bootstrap arena: memory for allocations made before the real functions are known
//! (`dlsym` itself calls `calloc`, and so may anything the table's filling reaches).
//!
//! Blocks come from a static, zero-initialised arena by an atomic bump pointer and are never
//! reused or handed to the real `free` (the hooks check `contains` first). Each block's size is
//! kept in the 8 bytes before it, for `realloc` and `malloc_usable_size`.

use std::os::raw::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

const ARENA_SIZE: usize = 1 << 20;
/// Room before each block for its size.
const BLOCK_HEADER: usize = 16;

#[repr(C, align(64))]
struct Arena(std::cell::UnsafeCell<[u8; ARENA_SIZE]>);
// SAFETY: disjoint ranges are handed out by an atomic bump pointer.
unsafe impl Sync for Arena {}
static ARENA: Arena = Arena(std::cell::UnsafeCell::new([0; ARENA_SIZE]));
/// Offset in `ARENA` of the first byte not yet handed out.
static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);

fn base() -> usize {
    ARENA.0.get() as usize
}

/// Whether `p` points into the arena.
#[inline]
pub(crate) fn contains(p: *mut c_void) -> bool {
    let a = p as usize;
    a >= base() && a < base() + ARENA_SIZE
}

/// A zeroed block of `size` bytes aligned to `align` (at least 16), or null when the arena is
/// full.
#[cold]
pub(crate) fn alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.max(16);
    let mut cur = ARENA_NEXT.load(Ordering::Relaxed);
    loop {
        let start = (base() + cur + BLOCK_HEADER).next_multiple_of(align);
        let end = match start.checked_add(size) {
            Some(e) if e <= base() + ARENA_SIZE => e,
            _ => return std::ptr::null_mut(),
        };
        match ARENA_NEXT.compare_exchange(cur, end - base(), Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: [start - 8, end) lies inside the arena range just reserved.
                unsafe { *((start - 8) as *mut usize) = size };
                return start as *mut c_void;
            }
            Err(now) => cur = now,
        }
    }
}

/// The size `p` was allocated with. `p` must come from [`alloc`].
pub(crate) fn size_of(p: *mut c_void) -> usize {
    // SAFETY: every arena block has its size stored in the 8 bytes before it.
    unsafe { *((p as usize - 8) as *const usize) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_zeroed_and_sized() {
        let p = alloc(40, 64);
        assert!(!p.is_null() && contains(p));
        assert_eq!(p as usize % 64, 0);
        assert_eq!(size_of(p), 40);
        // SAFETY: 40 bytes just handed out.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, 40) };
        assert!(bytes.iter().all(|&b| b == 0));
        let mut x = 0u8;
        assert!(!contains(&mut x as *mut u8 as *mut c_void));
        assert!(alloc(ARENA_SIZE, 16).is_null());
    }
}
