//! A call tree of a view: inclusive bytes and allocation counts per call path, largest branches
//! first, small branches folded.

use crate::symbols::Symbolizer;
use crate::views::ViewSites;
use crate::{grouped, human_bytes};

#[derive(Default, Debug)]
pub struct TreeNode {
    pub name: String,
    pub bytes: u64,
    pub allocations: u64,
    pub children: Vec<TreeNode>,
}

impl TreeNode {
    fn child(&mut self, name: &str) -> &mut TreeNode {
        let i = match self.children.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.children.push(TreeNode {
                    name: name.to_string(),
                    ..Default::default()
                });
                self.children.len() - 1
            }
        };
        &mut self.children[i]
    }

    fn sort(&mut self) {
        self.children
            .sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
        for c in &mut self.children {
            c.sort();
        }
    }
}

impl ViewSites {
    /// Builds the tree of a view: the root is the whole view, children are outermost frames.
    pub fn call_tree(&self, sym: &mut Symbolizer) -> TreeNode {
        let mut root = TreeNode {
            name: "[all]".into(),
            ..Default::default()
        };
        for site in &self.sites {
            root.bytes += site.bytes;
            root.allocations += site.allocations;
            let mut node = Some(&mut root);
            sym.for_each_frame(&self.stacks, site.stack, |f| {
                if let Some(n) = node.take().map(|n| n.child(&f.label())) {
                    n.bytes += site.bytes;
                    n.allocations += site.allocations;
                    node = Some(n);
                }
            });
        }
        root.sort();
        root
    }
}

impl TreeNode {
    /// Renders the tree as text. Branches below `min_share` of the whole are folded into one line;
    /// `depth` limits how deep it goes. A chain of single children is printed on one level each.
    pub fn render(&self, depth: usize, min_share: f64) -> String {
        let mut out = String::new();
        let total = self.bytes.max(1);
        line(&mut out, "", "", self, total);
        walk(&mut out, self, "", depth, depth, total, min_share);
        out
    }
}

fn line(out: &mut String, prefix: &str, branch: &str, n: &TreeNode, total: u64) {
    out.push_str(&format!(
        "{:>7.2}% {:>11} {:>10}  {prefix}{branch}{}\n",
        100.0 * n.bytes as f64 / total as f64,
        human_bytes(n.bytes),
        grouped(n.allocations),
        n.name
    ));
}

/// Levels below `node` (0 for a leaf).
fn height(node: &TreeNode) -> usize {
    node.children
        .iter()
        .map(|c| 1 + height(c))
        .max()
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn walk(
    out: &mut String,
    node: &TreeNode,
    prefix: &str,
    depth: usize,
    max_depth: usize,
    total: u64,
    min_share: f64,
) {
    if depth == 0 {
        // Say that the branch goes on, rather than end it as if it were a leaf.
        if !node.children.is_empty() {
            let more = height(node);
            out.push_str(&format!(
                "{:>7} {:>11} {:>10}  {prefix}└─ [{more} more level{} below: --depth {} shows them]\n",
                "",
                "",
                "",
                if more == 1 { "" } else { "s" },
                max_depth + more
            ));
        }
        return;
    }
    // What the node allocated itself, beside its callees, as a leaf of its own.
    let own = TreeNode {
        name: "[self]".into(),
        bytes: node.bytes - node.children.iter().map(|c| c.bytes).sum::<u64>(),
        allocations: node.allocations - node.children.iter().map(|c| c.allocations).sum::<u64>(),
        children: Vec::new(),
    };
    let mut kids: Vec<&TreeNode> = node.children.iter().collect();
    if !kids.is_empty() && own.allocations > 0 {
        kids.push(&own);
        kids.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    }
    let big = |c: &&TreeNode| c.bytes as f64 >= min_share * total as f64;
    let shown: Vec<&TreeNode> = kids.iter().copied().filter(big).collect();
    let folded: Vec<&TreeNode> = kids.iter().copied().filter(|c| !big(c)).collect();
    for (i, c) in shown.iter().enumerate() {
        let last = i + 1 == shown.len() && folded.is_empty();
        line(out, prefix, if last { "└─ " } else { "├─ " }, c, total);
        let deeper = format!("{prefix}{}", if last { "   " } else { "│  " });
        walk(out, c, &deeper, depth - 1, max_depth, total, min_share);
    }
    if !folded.is_empty() {
        let bytes = folded.iter().map(|c| c.bytes).sum();
        let allocations = folded.iter().map(|c| c.allocations).sum();
        let n = TreeNode {
            name: format!(
                "[{} smaller branch{}]",
                folded.len(),
                if folded.len() == 1 { "" } else { "es" }
            ),
            bytes,
            allocations,
            children: Vec::new(),
        };
        line(out, prefix, "└─ ", &n, total);
    }
}
