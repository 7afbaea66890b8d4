//! `memtrack plot`: heap in use over time, of one process or the whole tree.

use super::{Reporter, Subject};
use crate::Plot;

/// The plot of `subject`: its one process's heap, or the tree's combined heap.
pub fn plot(r: &Reporter, subject: &Subject) -> Plot {
    let progress = r.reading(subject.main_capture(), false);
    let plot = match subject.one() {
        Some(_) => subject.main_capture().plot(),
        None => subject.tree.plot(),
    };
    drop(progress);
    plot
}
