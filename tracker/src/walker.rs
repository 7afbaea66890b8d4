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

use crate::stacks::FastMap;
use crate::unwind::{Caller, Unw, UnwCache, MAX_FRAMES};
use framehop::x86_64::UnwindRegsX86_64;
use framehop::{FrameAddress, Unwinder};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    ip: u64,
    sp: u64,
    bp: u64,
    /// Trie node of the stack from the root down to this frame.
    node: u32,
    /// End (exclusive) in `reads` of the words read to unwind this frame.
    reads_end: u32,
}

/// Per-thread walker state.
pub struct Walker {
    cache: Box<UnwCache>,
    /// The previous walk, outermost frame first. Empty when there is none to reuse.
    frames: Vec<Frame>,
    reads: Vec<(u64, u64)>,
    /// Whether the previous walk reached the root.
    complete: bool,
    /// The new inner frames of the walk in progress, innermost first, with their reads.
    inner: Vec<(u64, u64, u64, u32)>,
    inner_reads: Vec<(u64, u64)>,
    /// (parent node, ip) -> node, so most frames are interned without the global lock.
    nodes: FastMap<(u32, u64), u32>,
    /// The previous `caller_above` (the tracker linked into a Rust program).
    above: crate::unwind::AboveMemo,
}

const NODE_CACHE_MAX: usize = 1 << 16;

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
            cache: Box::new(UnwCache::new()),
            frames: Vec::new(),
            reads: Vec::new(),
            complete: false,
            inner: Vec::new(),
            inner_reads: Vec::new(),
            nodes: FastMap::default(),
            above: Default::default(),
        }
    }

    /// Forgets the previous walk (the modules changed, so the rules may have).
    pub fn invalidate(&mut self) {
        self.frames.clear();
        self.reads.clear();
        self.above.invalidate();
    }

    /// The trie node of `ip` under `parent`, through the per-thread cache.
    pub fn child(&mut self, parent: u32, ip: u64, intern: &mut impl FnMut(u32, u64) -> u32) -> u32 {
        self.node(parent, ip, intern)
    }

    fn node(&mut self, parent: u32, ip: u64, intern: &mut impl FnMut(u32, u64) -> u32) -> u32 {
        if let Some(&n) = self.nodes.get(&(parent, ip)) {
            return n;
        }
        if self.nodes.len() >= NODE_CACHE_MAX {
            self.nodes.clear();
        }
        let n = intern(parent, ip);
        self.nodes.insert((parent, ip), n);
        n
    }

    /// Index in `frames` of the previous walk's frame equal to (ip, sp, bp) whose recorded words
    /// all still hold, searching from `*from` downwards (frames are ordered by sp, outermost
    /// first, so the search position only moves one way during a walk).
    fn reusable(&self, from: &mut usize, ip: u64, sp: u64, bp: u64) -> Option<usize> {
        while *from > 0 && self.frames[*from - 1].sp < sp {
            *from -= 1;
        }
        let i = (*from).checked_sub(1)?;
        let f = &self.frames[i];
        if f.sp != sp || f.ip != ip || f.bp != bp {
            return None;
        }
        let valid = self.reads[..f.reads_end as usize]
            .iter()
            // SAFETY: each address was read during an earlier walk of this same thread's stack,
            // within [sp, stack top) of a frame that is still live (its sp is at or above the
            // current stack pointer), so it is mapped and readable.
            .all(|&(addr, val)| unsafe { std::ptr::read(addr as *const u64) } == val);
        valid.then_some(i)
    }

    /// Walks the stack of the caller of the function whose frame holds `marker` (see
    /// [`crate::unwind::caller_above`]).
    pub fn walk_above(
        &mut self,
        unw: &Unw,
        stack_hi: u64,
        marker: u64,
        intern: &mut impl FnMut(u32, u64) -> u32,
    ) -> Walk {
        match crate::unwind::caller_above(unw, &mut self.cache, &mut self.above, stack_hi, marker) {
            Some(caller) => self.walk(unw, stack_hi, caller, intern),
            None => Walk { node: 0, outer: 0 },
        }
    }

    /// Walks the stack from `caller` (its return address first). `intern(parent, ip)` makes a
    /// trie node in the process-wide table when this thread has not seen it.
    pub fn walk(
        &mut self,
        unw: &Unw,
        stack_hi: u64,
        caller: Caller,
        intern: &mut impl FnMut(u32, u64) -> u32,
    ) -> Walk {
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
                let step = unw.unwind_frame(addr, &mut regs, &mut self.cache, &mut read_stack);
                self.inner.push((ip, sp, bp, self.inner_reads.len() as u32));
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
        self.frames.truncate(keep);
        let reads_keep = self.frames.last().map_or(0, |f| f.reads_end as usize);
        self.reads.truncate(reads_keep);
        let mut parent = self.frames.last().map_or(0, |f| f.node);
        for k in (0..self.inner.len()).rev() {
            let (fip, fsp, fbp, end) = self.inner[k];
            let start = if k == 0 { 0 } else { self.inner[k - 1].3 };
            self.reads
                .extend_from_slice(&self.inner_reads[start as usize..end as usize]);
            parent = self.node(parent, fip, intern);
            self.frames.push(Frame {
                ip: fip,
                sp: fsp,
                bp: fbp,
                node: parent,
                reads_end: self.reads.len() as u32,
            });
        }
        self.complete = complete;
        let walk = Walk {
            node: self.frames.last().map_or(0, |f| f.node),
            outer: self.frames.first().map_or(0, |f| f.ip),
        };
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
        let mut parent = 0;
        for &ip in frames.iter().rev() {
            parent = self.node(parent, ip, intern);
        }
        parent
    }
}
