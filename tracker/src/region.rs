//! Regions: named spans of a thread's execution (a pipeline step, a request, a start-up phase).
//! A begin or an end is an event of the calling thread's stream (`EventKind::RegionBegin`,
//! `EventKind::RegionEnd`) with a sequence number and a time like any allocation, but no
//! stack. A region's id is the 32-bit FNV-1a hash of its name, so the images of an `exec`
//! chain (which share a capture but not their memory) agree on ids without a table; the name
//! is written once per recorder, in a `REGION_NAME` record, the first time the process meets
//! it. Two names with the same hash (about one chance in 2^32 per pair) share a region, under
//! the first name written.
//!
//! Must never: allocate on the common path (a name already met), or allocate from the
//! program's heap (the set of names met is part of the recorder).

use std::sync::atomic::{AtomicU32, Ordering};

/// The region id of a name: FNV-1a over its bytes (0, which nothing else may mean, is moved to 1).
#[inline]
pub(crate) fn id_of(name: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in name {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Slots of the set of ids met: a power of two. A program with more distinct names than this
/// has its further names written again at each begin (a reader keeps the first).
const SLOTS: usize = 4096;

/// The ids whose name this capture holds: an open-addressing set of ids, lock-free (ids are
/// never removed; 0 is an empty slot).
pub(crate) struct SeenNames {
    ids: Box<[AtomicU32]>,
}

impl SeenNames {
    pub(crate) fn new() -> SeenNames {
        SeenNames {
            ids: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// True for the first caller to meet `id` (which writes its name), false after.
    #[inline]
    pub(crate) fn first_meeting(&self, id: u32) -> bool {
        let mask = SLOTS - 1;
        let mut i = (id as usize).wrapping_mul(0x9e37_79b9) >> 7 & mask;
        for _ in 0..SLOTS {
            let slot = &self.ids[i];
            match slot.load(Ordering::Acquire) {
                v if v == id => return false,
                0 => match slot.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return true,
                    Err(v) if v == id => return false,
                    Err(_) => {}
                },
                _ => {}
            }
            i = (i + 1) & mask;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fnv1a_and_never_zero() {
        // FNV-1a reference values.
        assert_eq!(id_of(b""), 0x811c_9dc5);
        assert_eq!(id_of(b"a"), 0xe40c_292c);
        assert_eq!(id_of(b"foobar"), 0xbf9c_f968);
        assert_ne!(id_of(b"search"), id_of(b"rank"));
    }

    #[test]
    fn a_name_is_met_first_once_even_when_the_set_is_full() {
        let s = SeenNames::new();
        assert!(s.first_meeting(7));
        assert!(!s.first_meeting(7));
        for id in 100..100 + SLOTS as u32 - 1 {
            assert!(s.first_meeting(id), "{id}");
        }
        assert!(!s.first_meeting(7));
        assert!(!s.first_meeting(100 + SLOTS as u32 - 2));
        // Full: every further id is written each time.
        assert!(s.first_meeting(1_000_000));
        assert!(s.first_meeting(1_000_000));
    }
}
