//! Stack interning: a process-wide trie of (parent node, return address) -> node id. Threads
//! reach it only for nodes their own cache (`walker`) has not seen.

pub use memtrack_format::hash::FastMap;

/// Nodes the trie keeps (some 13 MiB) before it starts afresh: a program whose stacks never
/// stop changing would otherwise grow it without bound.
const TRIE_MAX: usize = 1 << 18;

/// The process-wide stack trie. Node 0 is the empty stack.
pub struct Trie {
    nodes: FastMap<(u32, u64), u32>,
    next: u32,
    /// `TRIE_MAX`, but for tests.
    limit: usize,
}

impl Default for Trie {
    fn default() -> Self {
        Self::starting_at(1)
    }
}

impl Trie {
    /// A trie whose first new node gets id `first` (an image after exec continues the ids).
    pub fn starting_at(first: u32) -> Self {
        Trie {
            nodes: FastMap::default(),
            next: first.max(1) - 1,
            limit: TRIE_MAX,
        }
    }

    /// The id the next new node will get.
    pub fn next_id(&self) -> u32 {
        self.next + 1
    }

    /// Interns one node: the child `ip` of `parent`. A new node is appended to `new_nodes`.
    pub fn intern_node(
        &mut self,
        parent: u32,
        ip: u64,
        new_nodes: &mut Vec<(u32, u32, u64)>,
    ) -> u32 {
        if let Some(&id) = self.nodes.get(&(parent, ip)) {
            return id;
        }
        if self.nodes.len() >= self.limit {
            // Forgotten, not lost: every id handed out stays defined in the capture, so the
            // threads' caches and the ids in flight stay right; a (parent, ip) met again gets a
            // new id, defined again (the reader merges equal paths).
            self.nodes = FastMap::default();
        }
        self.next += 1;
        new_nodes.push((self.next, parent, ip));
        self.nodes.insert((parent, ip), self.next);
        self.next
    }

    /// Interns `frames` (leaf first).
    #[cfg(test)]
    pub fn intern(&mut self, frames: &[u64], new_nodes: &mut Vec<(u32, u32, u64)>) -> u32 {
        frames
            .iter()
            .rev()
            .fold(0, |parent, &ip| self.intern_node(parent, ip, new_nodes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_share_nodes() {
        let mut t = Trie::default();
        let mut new = Vec::new();
        let a = t.intern(&[3, 2, 1], &mut new);
        assert_eq!(new, vec![(1, 0, 1), (2, 1, 2), (3, 2, 3)]);
        new.clear();
        let b = t.intern(&[4, 2, 1], &mut new);
        assert_eq!(new, vec![(4, 2, 4)]);
        new.clear();
        assert_eq!(t.intern(&[3, 2, 1], &mut new), a);
        assert!(new.is_empty());
        assert_ne!(a, b);
        assert_eq!(t.intern(&[], &mut new), 0);
    }

    /// Past its limit the trie forgets, and ids keep counting up: a stack met again is defined
    /// again under new ids, and every id ever handed out still names its own (parent, ip).
    #[test]
    fn a_full_trie_starts_afresh_with_new_ids() {
        let mut t = Trie {
            limit: 4,
            ..Trie::default()
        };
        let mut defs = Vec::new();
        let a = t.intern(&[3, 2, 1], &mut defs);
        let b = t.intern(&[4, 2, 1], &mut defs);
        assert_eq!(defs.len(), 4);
        assert_eq!(t.intern(&[3, 2, 1], &mut defs), a, "not full yet");
        // The fifth node finds the trie full: it is made under its known parent, in a trie
        // that then knows only it.
        let c = t.intern(&[5, 2, 1], &mut defs);
        assert_eq!(&defs[4..], &[(5, 2, 5)]);
        let again = t.intern(&[3, 2, 1], &mut defs);
        assert_eq!(&defs[5..], &[(6, 0, 1), (7, 6, 2), (8, 7, 3)]);
        assert_eq!(again, 8);
        let frames = |mut id: u32| {
            let mut out = Vec::new();
            while id != 0 {
                let &(_, parent, ip) = defs.iter().find(|d| d.0 == id).unwrap();
                out.push(ip);
                id = parent;
            }
            out
        };
        assert_eq!(frames(a), frames(again));
        assert_eq!(frames(a), vec![3, 2, 1]);
        assert_eq!(frames(b), vec![4, 2, 1]);
        assert_eq!(frames(c), vec![5, 2, 1]);
        let ids: std::collections::HashSet<u32> = defs.iter().map(|d| d.0).collect();
        assert_eq!(ids.len(), defs.len(), "no id defined twice");
    }
}
