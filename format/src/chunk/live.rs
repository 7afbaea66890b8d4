//! The live set of the rank encoding: which of a chunk's allocations are still live, and the rank
//! of each among them (1 = the newest). The transcoder asks a block's rank when it is freed; the
//! decoder selects the block of a rank. Both sides keep the same set, so they agree.

/// The live blocks among a chunk's allocations (by allocation index): a bitmap, with a count per
/// 512 allocations, so a rank from the newest is a few loads and popcounts away.
#[derive(Default)]
pub(super) struct LiveSet {
    words: Vec<u64>,
    groups: Vec<u16>,
}

/// Words per group count.
const GROUP: usize = 8;

impl LiveSet {
    pub(super) fn clear(&mut self) {
        self.words.clear();
        self.groups.clear();
    }

    #[inline(always)]
    pub(super) fn insert(&mut self, i: usize) {
        let w = i >> 6;
        if w >= self.words.len() {
            // Whole groups: a rank then reads its group's words without a bounds check each.
            self.words.resize((w / GROUP + 1) * GROUP, 0);
            self.groups.resize(w / GROUP + 1, 0);
        }
        let bit = 1u64 << (i & 63);
        if self.words[w] & bit == 0 {
            self.words[w] |= bit;
            self.groups[w / GROUP] += 1;
        }
    }

    #[inline(always)]
    pub(super) fn remove(&mut self, i: usize) {
        let w = i >> 6;
        let bit = 1u64 << (i & 63);
        if let Some(word) = self.words.get_mut(w) {
            if *word & bit != 0 {
                *word &= !bit;
                self.groups[w / GROUP] -= 1;
            }
        }
    }

    /// The index of the live block of rank `r` (1 = the newest).
    #[inline]
    pub(super) fn select(&self, r: u64) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has the instruction (just checked).
            return unsafe { self.select_popcnt(r) };
        }
        self.select_any(r)
    }

    // Compiled twice: a software popcount costs a dozen instructions where the CPU's costs one,
    // and x86-64's baseline lacks it (this workspace builds for x86-64-v2, which has it; a build
    // of this crate elsewhere may not).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "popcnt")]
    unsafe fn select_popcnt(&self, r: u64) -> Option<usize> {
        self.select_any(r)
    }

    /// How many live blocks have an index of `i` or more. The transcoder calls it on every
    /// free of a block of its chunk; `.cargo/config.toml` builds for x86-64-v2, so its popcounts
    /// are single instructions.
    #[inline(always)]
    pub(super) fn rank(&self, i: usize) -> u64 {
        let w = i >> 6;
        let Some(&first) = self.words.get(w) else {
            return 0;
        };
        let mut n = (first >> (i & 63)).count_ones() as u64;
        // The group's words after `w`: all eight looked at, those before masked out, so the
        // loop's end is always the same (where `w` lies is random).
        let start = w / GROUP * GROUP;
        if let Some(group) = self.words.get(start..start + GROUP) {
            for (k, x) in group.iter().enumerate() {
                n += x.count_ones() as u64 & ((start + k > w) as u64).wrapping_neg();
            }
        }
        n + self.groups[w / GROUP + 1..]
            .iter()
            .map(|&g| g as u64)
            .sum::<u64>()
    }

    /// The group holding the live block of rank `r` (> 0), and that block's rank within it.
    /// Eight groups' counts at a time, newest first: their running sums in one vector, compared
    /// with `r` at once (where the search stops is as good as random, so branches there would
    /// mispredict). Only the loop over eight-group steps branches, and a rank usually lies among
    /// the newest groups.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn select_group(&self, mut r: u64) -> Option<(usize, u64)> {
        use std::arch::x86_64::*;
        let groups = &self.groups;
        let mut end = groups.len();
        loop {
            let start = end.saturating_sub(8);
            // Newest first: lane 0 holds group end - 1. A group counts at most 512, so eight
            // sum to at most 4096 and fit i16 lanes.
            let mut c = [0i16; 8];
            for (lane, &g) in groups[start..end].iter().rev().enumerate() {
                c[lane] = g as i16;
            }
            // SAFETY: SSE2 is part of x86-64; `c` and `sums` are 16 bytes each.
            let (mask, sums) = unsafe {
                let mut v = _mm_loadu_si128(c.as_ptr() as *const __m128i);
                v = _mm_add_epi16(v, _mm_slli_si128::<2>(v));
                v = _mm_add_epi16(v, _mm_slli_si128::<4>(v));
                v = _mm_add_epi16(v, _mm_slli_si128::<8>(v));
                let below = _mm_set1_epi16((r.min(i16::MAX as u64) - 1) as i16);
                let mut sums = [0i16; 8];
                _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, v);
                (_mm_movemask_epi8(_mm_cmpgt_epi16(v, below)) as u32, sums)
            };
            if mask != 0 {
                // The first lane whose running sum reaches r; the lanes before it are passed.
                let lane = (mask.trailing_zeros() / 2) as usize;
                let passed = if lane == 0 { 0 } else { sums[lane - 1] as u64 };
                return Some((end - 1 - lane, r - passed));
            }
            if start == 0 {
                return None;
            }
            r -= sums[7] as u64;
            end = start;
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[inline(always)]
    fn select_group(&self, mut r: u64) -> Option<(usize, u64)> {
        let groups = &self.groups;
        let mut end = groups.len();
        loop {
            let start = end.saturating_sub(4);
            let four: u64 = groups[start..end].iter().map(|&c| c as u64).sum();
            if four >= r {
                break;
            }
            if start == 0 {
                return None;
            }
            r -= four;
            end = start;
        }
        let count = |k: usize| end.checked_sub(k).map_or(0, |g| groups[g] as u64);
        let (c1, c2, c3) = (count(1), count(2), count(3));
        let passed = (c1 < r) as usize + (c1 + c2 < r) as usize + (c1 + c2 + c3 < r) as usize;
        Some((end - 1 - passed, r - [0, c1, c1 + c2, c1 + c2 + c3][passed]))
    }

    #[inline(always)]
    fn select_any(&self, r: u64) -> Option<usize> {
        if r == 0 {
            return None;
        }
        let (group, mut r) = self.select_group(r)?;
        // Its eight words, newest first, the same way.
        let top = group * GROUP + GROUP - 1;
        let mut below = [0u64; GROUP + 1];
        let mut words = [0u64; GROUP];
        for k in 0..GROUP {
            words[k] = top
                .checked_sub(k)
                .and_then(|w| self.words.get(w))
                .copied()
                .unwrap_or(0);
            below[k + 1] = below[k] + words[k].count_ones() as u64;
        }
        let passed: usize = (1..GROUP).map(|k| (below[k] < r) as usize).sum();
        r -= below[passed];
        let x = words[passed];
        let c = x.count_ones() as u64;
        if c < r {
            return None;
        }
        // The r-th set bit from the top is the (c - r)-th from the bottom.
        Some(((top - passed) << 6) | select_bit(x, (c - r) as u32) as usize)
    }
}

/// Position of the `j`-th (from 0) set bit of `x`, counting from the least significant; `x` has
/// more than `j` set bits.
#[inline(always)]
fn select_bit(mut x: u64, mut j: u32) -> u32 {
    let mut pos = 0;
    // Without branches: which half holds the bit is as good as random.
    for half in [32, 16, 8] {
        let low = (x & ((1u64 << half) - 1)).count_ones();
        let upper = ((j >= low) as u32).wrapping_neg();
        j -= low & upper;
        x >>= half & upper;
        pos += half & upper;
    }
    pos + SELECT_IN_BYTE[(x & 0xff) as usize][(j & 7) as usize] as u32
}

/// `SELECT_IN_BYTE[b][j]`: position of the `j`-th set bit of byte `b`.
static SELECT_IN_BYTE: [[u8; 8]; 256] = {
    let mut t = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let (mut bit, mut j) = (0, 0);
        while bit < 8 {
            if b & (1 << bit) != 0 {
                t[b][j] = bit as u8;
                j += 1;
            }
            bit += 1;
        }
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_set_ranks_and_selects() {
        for j in 0..64 {
            let x = u64::MAX;
            assert_eq!(select_bit(x, j), j);
        }
        assert_eq!(select_bit(0b1010_0000_0000_0001, 0), 0);
        assert_eq!(select_bit(0b1010_0000_0000_0001, 1), 13);
        assert_eq!(select_bit(0b1010_0000_0000_0001, 2), 15);
        assert_eq!(select_bit(1 << 63 | 1 << 40, 1), 63);
        // Against a plain list, across words and groups.
        let mut set = LiveSet::default();
        let mut plain: Vec<usize> = Vec::new();
        let mut state = 7u64;
        for i in 0..5000 {
            set.insert(i);
            plain.push(i);
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if state >> 62 != 0 && !plain.is_empty() {
                let r = 1 + (state >> 20) as usize % plain.len();
                let want = plain[plain.len() - r];
                assert_eq!(set.rank(want), r as u64);
                assert_eq!(set.select(r as u64), Some(want));
                set.remove(want);
                plain.retain(|&x| x != want);
            }
        }
        assert_eq!(set.select(plain.len() as u64 + 1), None);
        assert_eq!(set.select(0), None);
    }
}
