//! Stack walking with a memoized outer part.
//!
//! Unwinding is a pure function of the starting registers, the unwind rules (fixed for a given
//! set of modules) and the stack words it reads. Each thread keeps its previous walk, outermost
//! frame first, with every frame's registers, the words read to unwind it, and its trie node.
//! When a new walk reaches a frame whose (ip, sp, bp) equal a frame of the previous walk, and
//! every word the previous walk read from there outwards still holds the same value, the rest of
//! the walk would repeat exactly: it is taken from the previous walk, trie node included. The
//! check costs one comparison per word (two or so per frame) instead of a DWARF rule lookup and
//! evaluation per frame, and nothing is hashed per frame. Nothing is patched on the stack, so
//! exceptions and longjmp are unaffected.

use crate::stack::trie::FastMap;
use crate::stack::unwind::{self, AboveMemo, Caller, CfiUnwinder, UnwCache, BP_WINDOW, MAX_FRAMES};
use framehop::x86_64::UnwindRegsX86_64;
use framehop::{FrameAddress, Unwinder};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    ip: u64,
    sp: u64,
    bp: u64,
    /// Trie node of the stack from the root down to this frame when interning; else a hash of
    /// its ips from the root down (`frame_hash`). One field for both keeps frames at 40 bytes:
    /// walks are copied whole into `recent`, so deep stacks pay for every byte of a frame.
    id: u64,
    /// End (exclusive) in `reads` of the words read to unwind this frame.
    reads_end: u32,
    /// Whether the walk from this frame outwards may depend on `bp`. Code built without frame
    /// pointers keeps any value in rbp (a loop counter), and most frames neither use it nor
    /// pass it to a frame that does: comparing it would miss nearly every reusable frame.
    bp_dep: bool,
}

impl Frame {
    #[inline(always)]
    fn is(&self, ip: u64, sp: u64, bp: u64) -> bool {
        self.ip == ip && self.sp == sp && (self.bp == bp || !self.bp_dep)
    }
}

/// A hash of a sequence of frames, built outwards-in one frame at a time (a folded multiply).
#[inline(always)]
pub fn frame_hash(h: u64, ip: u64) -> u64 {
    let m = ((h.rotate_left(23) ^ ip) as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (m as u64) ^ ((m >> 64) as u64)
}

/// How one unwinding step used bp: it took the frame from it (`USES_BP`), or left it as it was
/// for the next frame (`PASSES_BP`).
const USES_BP: u8 = 1;
const PASSES_BP: u8 = 2;

/// A whole earlier walk, kept so a stack that recurs after others (a loop calling malloc from
/// a few sites) is found without unwinding a frame.
#[derive(Default)]
struct Snapshot {
    frames: Vec<Frame>,
    reads: Vec<(u64, u64)>,
    complete: bool,
}

/// Earlier walks kept besides the previous one.
const RECENT: usize = 16;

/// The key of a walk in `Walker::recent_keys`: its innermost frame's ip and sp.
#[inline]
fn key_of(frames: &[Frame]) -> (u64, u64) {
    frames.last().map_or((0, 0), |f| (f.ip, f.sp))
}

/// Whether every (address, value) still holds. Eight words per step without a branch each:
/// a deep stack's check is the walk's main cost.
///
/// # Safety
/// Every address must be readable.
#[inline]
unsafe fn words_hold(reads: &[(u64, u64)]) -> bool {
    let mut chunks = reads.chunks_exact(8);
    for c in &mut chunks {
        let mut diff = 0;
        for &(addr, val) in c {
            // SAFETY: the caller's guarantee.
            diff |= unsafe { std::ptr::read(addr as *const u64) } ^ val;
        }
        if diff != 0 {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        // SAFETY: the caller's guarantee.
        .all(|&(addr, val)| unsafe { std::ptr::read(addr as *const u64) } == val)
}

/// Rules in one framehop cache (its slot is the address modulo this).
const RULES: u64 = 509;
/// Caches of a thread whose stacks overflow one (about 16 KiB each).
const WIDE_CACHES: usize = 16;
/// Steps between looks at the cache's misses.
const CACHE_CHECK: u32 = 1 << 14;

/// Per-thread walker state.
pub struct Walker {
    /// framehop's rule caches. One holds 509 rules, direct-mapped: a program whose stacks run
    /// through more code than that (an interpreter) keeps evicting rules and evaluating DWARF
    /// again. A thread that sees many such misses gets `WIDE_CACHES`, chosen by address.
    caches: Vec<UnwCache>,
    /// The rule cache of `caller_above`'s few frames (the tracker's own), apart: sharing the
    /// program's direct-mapped cache, one of them could land on the slot of a program frame
    /// and both be evaluated from DWARF on every allocation, depending on code layout. Made on
    /// first use: preloaded, no thread needs it.
    above_cache: Option<UnwCache>,
    /// Unwinding steps taken, for the periodic look at the cache's misses.
    steps: u32,
    /// The previous walk, outermost frame first. Empty when there is none to reuse.
    frames: Vec<Frame>,
    reads: Vec<(u64, u64)>,
    /// Whether the previous walk reached the root.
    complete: bool,
    /// The new inner frames of the walk in progress, innermost first, with their reads.
    inner: Vec<(u64, u64, u64, u32, u8)>,
    inner_reads: Vec<(u64, u64)>,
    /// (parent node, ip) -> node, so most frames are interned without the global lock.
    nodes: FastMap<(u32, u64), u32>,
    /// A small direct-mapped copy of the recent part of `nodes`: the map grows to megabytes,
    /// and a program with a large heap of its own (an interpreter) evicts it from the caches,
    /// so its lookups cost a cache miss each, several per walk.
    front: Box<[FrontSlot]>,
    /// 64 - log2(front.len()): the hash's top bits pick the slot.
    front_shift: u32,
    /// Lookups `front` missed since it last grew.
    front_misses: usize,
    /// The previous `caller_above` (the tracker linked into a Rust program).
    above: AboveMemo,
    /// Walks before the previous one; `recent_next` is the slot to overwrite next.
    recent: [Snapshot; RECENT],
    /// The (ip, sp) of each of `recent`'s innermost frames ((0, 0): none), side by side: the
    /// search for a caller reads these few cache lines, not every snapshot's frames.
    recent_keys: [(u64, u64); RECENT],
    recent_next: usize,
    /// Whether walks intern their frames. Off in a Python process, whose stacks are interned
    /// with the Python frames in place (see `stack::ThreadStacks::interleaved_stack`): the walk then
    /// leaves its return addresses in `ips` and its node is 0.
    interning: bool,
    /// The last walk's frames (outermost first), kept only when not `interning`.
    pub ips: Vec<u64>,
    /// How many of `ips` are `frames`' ips (a walk then rewrites only the rest).
    ips_valid: usize,
    /// `frame_hash` over `ips` (kept only when not `interning`).
    pub ips_hash: u64,
}

const NODE_CACHE_MAX: usize = 1 << 13;

/// Slots of `Walker::front` at first (4 KiB) and at most (64 KiB). A thread starts small and
/// doubles it while it misses more often than it has slots, so that a program of many threads
/// that each meet a few nodes does not write 64 KiB at every thread's start.
const FRONT_MIN: usize = 256;
const FRONT_MAX: usize = 4096;

/// (parent, node, ip). A free slot holds a parent no trie reaches (4 G nodes) with an ip no
/// frame has.
type FrontSlot = (u32, u32, u64);
const FRONT_FREE: FrontSlot = (u32::MAX, 0, u64::MAX);

#[inline(always)]
fn front_slot(parent: u32, ip: u64, shift: u32) -> usize {
    let h = (ip ^ (parent as u64).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> shift) as usize
}

/// The result of a walk.
pub struct Walk {
    /// Leaf trie node: the stack id.
    pub node: u32,
    /// Outermost frame's address (0 for an empty stack).
    pub outer: u64,
}

impl Default for Walker {
    fn default() -> Self {
        Self::new()
    }
}

impl Walker {
    pub fn new() -> Self {
        Walker {
            caches: vec![UnwCache::new()],
            above_cache: None,
            steps: 0,
            frames: Vec::new(),
            reads: Vec::new(),
            complete: false,
            inner: Vec::new(),
            inner_reads: Vec::new(),
            nodes: FastMap::default(),
            front: vec![FRONT_FREE; FRONT_MIN].into_boxed_slice(),
            front_shift: 64 - FRONT_MIN.trailing_zeros(),
            front_misses: 0,
            above: Default::default(),
            recent: Default::default(),
            recent_keys: [(0, 0); RECENT],
            recent_next: 0,
            interning: true,
            ips: Vec::new(),
            ips_valid: 0,
            ips_hash: 0,
        }
    }

    /// Turns interning on or off; the previous walks' nodes belong to the other mode.
    #[inline]
    pub fn set_interning(&mut self, on: bool) {
        if self.interning != on {
            self.interning = on;
            self.invalidate();
        }
    }

    /// Copies the walk's frames into `ips` when they are not interned; the first `kept` frames
    /// are the previous walk's, whose ips are there already (a deep stack's outer part is
    /// nearly always reused, and copying it would cost a step per frame on every event).
    #[inline]
    fn keep_ips(&mut self, kept: usize) {
        if !self.interning {
            let k = kept.min(self.ips_valid).min(self.frames.len());
            self.ips.truncate(k);
            self.ips.extend(self.frames[k..].iter().map(|f| f.ip));
            self.ips_valid = self.frames.len();
            self.ips_hash = self.frames.last().map_or(0, |f| f.id);
        }
    }

    /// One cache evicting rules on more than one step in ten: take `WIDE_CACHES`.
    #[cold]
    fn widen_cache(&mut self) {
        if self.caches.len() != 1 {
            return;
        }
        let st = self.caches[0].stats();
        if st.miss_wrong_address_count * 10 > st.total() {
            self.caches.resize_with(WIDE_CACHES, UnwCache::new);
        }
    }

    /// Forgets the previous walk (the modules changed, so the rules may have).
    pub fn invalidate(&mut self) {
        self.frames.clear();
        self.ips_valid = 0;
        self.reads.clear();
        for r in &mut self.recent {
            r.frames.clear();
            r.reads.clear();
        }
        self.recent_keys = [(0, 0); RECENT];
        self.above.invalidate();
    }

    /// The trie node of `ip` under `parent`, through the per-thread cache.
    pub fn child(&mut self, parent: u32, ip: u64, intern: &mut impl FnMut(u32, u64) -> u32) -> u32 {
        self.node(parent, ip, intern)
    }

    #[inline]
    fn node(&mut self, parent: u32, ip: u64, intern: &mut impl FnMut(u32, u64) -> u32) -> u32 {
        let slot = &mut self.front[front_slot(parent, ip, self.front_shift)];
        if slot.0 == parent && slot.2 == ip {
            return slot.1;
        }
        self.node_slow(parent, ip, intern)
    }

    #[inline(never)]
    fn node_slow(&mut self, parent: u32, ip: u64, intern: &mut impl FnMut(u32, u64) -> u32) -> u32 {
        let n = match self.nodes.get(&(parent, ip)) {
            Some(&n) => n,
            None => {
                if self.nodes.len() >= NODE_CACHE_MAX {
                    self.nodes.clear();
                }
                let n = intern(parent, ip);
                self.nodes.insert((parent, ip), n);
                n
            }
        };
        self.front[front_slot(parent, ip, self.front_shift)] = (parent, n, ip);
        self.front_misses += 1;
        if self.front_misses > 2 * self.front.len() && self.front.len() < FRONT_MAX {
            self.grow_front();
        }
        n
    }

    #[cold]
    fn grow_front(&mut self) {
        let n = self.front.len() * 2;
        let old = std::mem::replace(&mut self.front, vec![FRONT_FREE; n].into_boxed_slice());
        self.front_shift -= 1;
        self.front_misses = 0;
        for s in old.iter().filter(|s| **s != FRONT_FREE) {
            self.front[front_slot(s.0, s.2, self.front_shift)] = *s;
        }
    }

    /// Index in `frames` of the previous walk's frame equal to (ip, sp, bp) whose recorded words
    /// all still hold, searching from `*from` downwards (frames are ordered by sp, outermost
    /// first, so the search position only moves one way during a walk).
    fn reusable(&self, from: &mut usize, ip: u64, sp: u64, bp: u64) -> Option<usize> {
        while *from > 0 && self.frames[*from - 1].sp < sp {
            *from -= 1;
        }
        let i = (*from).checked_sub(1)?;
        self.holds(i, ip, sp, bp).then_some(i)
    }

    /// Whether the previous walk's frame `i` equals (ip, sp, bp) and every word read from there
    /// outwards still holds: the walk from there on would repeat exactly.
    #[inline(always)]
    fn holds(&self, i: usize, ip: u64, sp: u64, bp: u64) -> bool {
        let f = &self.frames[i];
        // SAFETY: each address was read during an earlier walk of this same thread's stack,
        // within [sp, stack top) of a frame that is still live (its sp is at or above the current
        // stack pointer), so it is mapped and readable.
        f.is(ip, sp, bp) && unsafe { words_hold(&self.reads[..f.reads_end as usize]) }
    }

    /// A walk kept in `recent` whose innermost frame is the caller's and whose words all still
    /// hold: it becomes the previous walk (trading places with it) and is the answer. Called
    /// when the previous walk is not the answer: its innermost frame may still be the caller's,
    /// reached another way (one function allocating for several callers).
    #[inline]
    fn recent_hit(&mut self, caller: Caller) -> Option<Walk> {
        let same = |f: Option<&Frame>| f.is_some_and(|f| f.is(caller.ip, caller.sp, caller.bp));
        let i = (0..RECENT).find(|&i| {
            self.recent_keys[i] == (caller.ip, caller.sp) && {
                let r = &self.recent[i];
                same(r.frames.last())
                    // SAFETY: as in `reusable`: read by an earlier walk of this thread's
                    // stack, at or above the innermost frame's sp, which equals the current
                    // caller's, so still within the live stack.
                    && unsafe { words_hold(&r.reads) }
            }
        })?;
        let r = &mut self.recent[i];
        std::mem::swap(&mut self.frames, &mut r.frames);
        std::mem::swap(&mut self.reads, &mut r.reads);
        std::mem::swap(&mut self.complete, &mut r.complete);
        self.recent_keys[i] = key_of(&r.frames);
        Some(self.previous())
    }

    /// The previous walk as a result: its leaf node and outermost frame.
    fn previous(&self) -> Walk {
        Walk {
            node: self.frames.last().map_or(0, |f| f.id as u32),
            outer: self.frames.first().map_or(0, |f| f.ip),
        }
    }

    /// Walks the stack of the caller of the function whose frame holds `marker`, from `start`
    /// taken in that frame (see [`unwind::caller_above`]).
    pub fn walk_above(
        &mut self,
        unw: &CfiUnwinder,
        stack_hi: u64,
        start: Caller,
        marker: u64,
        intern: &mut impl FnMut(u32, u64) -> u32,
    ) -> Walk {
        match unwind::caller_above(
            unw,
            self.above_cache.get_or_insert_with(UnwCache::new),
            &mut self.above,
            stack_hi,
            start,
            marker,
        ) {
            Some(caller) => self.walk(unw, stack_hi, caller, intern),
            None => {
                self.ips.clear();
                self.ips_valid = 0;
                self.ips_hash = 0;
                Walk { node: 0, outer: 0 }
            }
        }
    }

    /// Walks the stack from `caller` (its return address first). `intern(parent, ip)` makes a
    /// trie node in the process-wide table when this thread has not seen it.
    pub fn walk(
        &mut self,
        unw: &CfiUnwinder,
        stack_hi: u64,
        caller: Caller,
        intern: &mut impl FnMut(u32, u64) -> u32,
    ) -> Walk {
        // The same call site with the same stack as the previous walk (a loop that allocates):
        // the whole walk again, found before any of the general path's set-up.
        if let Some(last) = self.frames.len().checked_sub(1) {
            if self.holds(last, caller.ip, caller.sp, caller.bp) {
                self.keep_ips(self.frames.len());
                return self.previous();
            }
        }
        if let Some(w) = self.recent_hit(caller) {
            // A whole other walk: nothing of `ips` is known to hold.
            self.keep_ips(0);
            return w;
        }
        self.inner.clear();
        self.inner_reads.clear();
        let sp0 = caller.sp;
        let mut regs = UnwindRegsX86_64::new(caller.ip, caller.sp, caller.bp);
        let mut ip = caller.ip;
        let mut search = self.frames.len();
        let mut matched: Option<usize> = None;
        let mut complete = false;
        if ip != 0 {
            loop {
                let (sp, bp) = (regs.sp(), regs.bp());
                if let Some(i) = self.reusable(&mut search, ip, sp, bp) {
                    matched = Some(i);
                    break;
                }
                let Some(addr) = FrameAddress::from_return_address(ip) else {
                    break;
                };
                let inner_reads = &mut self.inner_reads;
                let mut read_stack = |a: u64| {
                    if a >= sp0
                        && a.checked_add(8).is_some_and(|e| e <= stack_hi)
                        && a.is_multiple_of(8)
                    {
                        // SAFETY: [sp0, stack_hi) is this thread's live stack.
                        let v = unsafe { std::ptr::read(a as *const u64) };
                        inner_reads.push((a, v));
                        Ok(v)
                    } else {
                        Err(())
                    }
                };
                let which = ((ip / RULES) % self.caches.len() as u64) as usize;
                let cache = &mut self.caches[which];
                let step = unw.unwind_frame(addr, &mut regs, cache, &mut read_stack);
                self.steps = self.steps.wrapping_add(1);
                if self.steps.is_multiple_of(CACHE_CHECK) {
                    self.widen_cache();
                }
                // A caller frame just above bp may have been found through bp (the frame
                // pointer rule puts it at bp + 16; a DWARF rule may use another offset); a
                // coincidence only makes the check stricter. A step that ends the walk is taken
                // as depending on bp.
                let flags = match step {
                    Ok(Some(ra)) if ra != 0 => {
                        let mut f = 0;
                        if regs.sp().wrapping_sub(bp) < BP_WINDOW {
                            f |= USES_BP;
                        }
                        if regs.bp() == bp {
                            f |= PASSES_BP;
                        }
                        f
                    }
                    _ => USES_BP,
                };
                self.inner
                    .push((ip, sp, bp, self.inner_reads.len() as u32, flags));
                match step {
                    Ok(Some(ra)) if ra != 0 => {
                        if self.inner.len() >= MAX_FRAMES {
                            break;
                        }
                        ip = ra;
                    }
                    Ok(_) => {
                        complete = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        // Rebuild the walk outermost first: the reused outer part stays in place.
        let keep = match matched {
            Some(i) => {
                complete = self.complete;
                i + 1
            }
            None => 0,
        };
        let too_deep = matched.is_none() && self.inner.len() >= MAX_FRAMES;
        if !self.inner.is_empty() {
            // The previous walk is about to change: keep a copy of it.
            let r = &mut self.recent[self.recent_next];
            self.recent_keys[self.recent_next] = key_of(&self.frames);
            self.recent_next = (self.recent_next + 1) % RECENT;
            r.frames.clear();
            r.frames.extend_from_slice(&self.frames);
            r.reads.clear();
            r.reads.extend_from_slice(&self.reads);
            r.complete = self.complete;
        }
        self.frames.truncate(keep);
        let reads_keep = self.frames.last().map_or(0, |f| f.reads_end as usize);
        self.reads.truncate(reads_keep);
        // The trie node (interning) or the hash (not) of the frames so far.
        let mut parent = self.frames.last().map_or(0, |f| f.id);
        // Whether the frame outside the next one depends on its bp (a matched outer frame
        // carries its own flag; an unknown end does).
        let mut outer_dep = !matches!(self.frames.last(), Some(f) if !f.bp_dep);
        let mut outer_sp = self.frames.last().map(|f| f.sp);
        for k in (0..self.inner.len()).rev() {
            let (fip, fsp, fbp, end, flags) = self.inner[k];
            let start = if k == 0 { 0 } else { self.inner[k - 1].3 };
            let step_reads = &self.inner_reads[start as usize..end as usize];
            // The step from this frame gave the outer frame its ip (the return address, always
            // at the outer sp - 8 on x86-64), its sp (from this frame's registers) and its bp.
            // When nothing outwards depends on that bp, the return address is the only word to
            // check again; checking fewer words is what makes deep stacks cheap to reuse.
            let ra = outer_sp.filter(|_| !outer_dep).and_then(|osp| {
                step_reads
                    .iter()
                    .find(|r| r.0 == osp.wrapping_sub(8))
                    .copied()
            });
            match ra {
                Some(r) => self.reads.push(r),
                None => self.reads.extend_from_slice(step_reads),
            }
            let bp_dep = flags & USES_BP != 0 || (flags & PASSES_BP != 0 && outer_dep);
            outer_dep = bp_dep;
            outer_sp = Some(fsp);
            parent = if self.interning {
                self.node(parent as u32, fip, intern) as u64
            } else {
                frame_hash(parent, fip)
            };
            self.frames.push(Frame {
                ip: fip,
                sp: fsp,
                bp: fbp,
                id: parent,
                reads_end: self.reads.len() as u32,
                bp_dep,
            });
        }
        self.complete = complete;
        let walk = self.previous();
        self.keep_ips(keep);
        if too_deep || self.frames.len() > MAX_FRAMES {
            // A walk cut at MAX_FRAMES has no root: nothing outer to reuse.
            self.invalidate();
        }
        walk
    }

    /// Interns frames found another way (innermost first) through this thread's node cache.
    pub fn intern_frames(
        &mut self,
        frames: &[u64],
        intern: &mut impl FnMut(u32, u64) -> u32,
    ) -> u32 {
        if !self.interning {
            self.ips.clear();
            self.ips.extend(frames.iter().rev());
            self.ips_valid = 0;
            self.ips_hash = self.ips.iter().fold(0, |h, &ip| frame_hash(h, ip));
            return 0;
        }
        let mut parent = 0;
        for &ip in frames.iter().rev() {
            parent = self.node(parent, ip, intern);
        }
        parent
    }
}
