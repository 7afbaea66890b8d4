//! The stack trie rebuilt from `STACK_NODE` ops.

/// Stack trie nodes by id. Node 0 is the empty stack.
#[derive(Default, Debug, Clone)]
pub struct StackTable {
    nodes: Vec<(u32, u64)>,
}

impl StackTable {
    pub fn insert(&mut self, id: u32, parent: u32, ip: u64) {
        let i = id as usize;
        if i >= self.nodes.len() {
            self.nodes.resize(i + 1, (0, 0));
        }
        self.nodes[i] = (parent, ip);
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// A node's parent and address (`None`: not defined).
    pub fn node(&self, id: u32) -> Option<(u32, u64)> {
        self.nodes.get(id as usize).copied().filter(|n| n.1 != 0)
    }

    /// Return addresses of stack `id`, innermost (the caller of malloc) first. A node whose
    /// definition was lost with a torn tail ends the stack there.
    pub fn frames(&self, mut id: u32) -> Vec<u64> {
        let mut out = Vec::new();
        while id != 0 {
            let Some(&(parent, ip)) = self.nodes.get(id as usize) else {
                break;
            };
            if ip == 0 || out.len() > 4096 || parent >= id && parent != 0 {
                // Undefined node (lost) or a malformed cycle: stop rather than loop.
                if ip != 0 {
                    out.push(ip);
                }
                break;
            }
            out.push(ip);
            id = parent;
        }
        out
    }
}
