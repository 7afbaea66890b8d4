//! Stack interning: a process-wide trie of (parent node, return address) -> node id. Threads
//! reach it only for nodes their own cache (`walker`) has not seen.

pub use memtrack_format::hash::FastMap;

/// The process-wide stack trie. Node 0 is the empty stack.
#[derive(Default)]
pub struct Trie {
    nodes: FastMap<(u32, u64), u32>,
    next: u32,
}

impl Trie {
    /// A trie whose first new node gets id `first` (an image after exec continues the ids).
    pub fn starting_at(first: u32) -> Self {
        Trie {
            nodes: FastMap::default(),
            next: first.max(1) - 1,
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
        let next = &mut self.next;
        *self.nodes.entry((parent, ip)).or_insert_with(|| {
            *next += 1;
            new_nodes.push((*next, parent, ip));
            *next
        })
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
}
