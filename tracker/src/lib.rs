//! memtrack's recording core.
//!
//! **What**: records every allocation and free of the process it runs in, with the native
//! stack of each allocation, into a capture file in the `memtrack-format` layout.
//! **Why**: the report side needs exact, ordered events to rebuild the heap at any point
//! (peak, exit) and to attribute it to call paths.
//! **How**: each thread appends events, in `memtrack-format`'s stream encoding, to its own mapped
//! buffer under an uncontended flag; full buffers go to one writer thread over a bounded queue,
//! and the writer also collects buffers that have sat for more than ~150 ms, so a killed process
//! loses at most the last quarter second. A global sequence number, taken before a block is
//! handed back to the allocator and after one is obtained, orders events across threads. Stacks
//! are unwound from DWARF CFI with a per-thread rule cache and interned in a trie.
//!
//! The modules, whose imports run one way (`docs/design/tracker.md` has the map and the
//! invariants): `hooks` (the preload library's hook bodies) and `rust_alloc` ([`Tracker`]) use
//! `session` (whether and where to record, exec and fork), which starts the `recorder`
//! (per-thread recording), which uses `stack` (stack identification) and `handoff` (per-thread
//! buffers, the sequence, the writer's queue), which feeds the `writer` thread, which alone
//! writes the `capture_file`. `lifecycle` holds the recording state and its transitions.
//!
//! This crate exports no `malloc`: the `memtrack-preload` cdylib holds the `extern "C"` hooks
//! and forwards them to [`hooks`], public for that crate alone. Linked into a Rust program,
//! [`Tracker`] is a `#[global_allocator]` with exact counters ([`stats`], [`measure`]) that can
//! also record the program's own captures ([`start`], or `MEMTRACK_OUTPUT`).
//!
//! ```
//! // Nothing is recorded until a capture is started; the guard type works at any time.
//! let g = memtrack_tracker::IgnoreAllocs::enter();
//! assert!(g.is_some());
//! assert!(memtrack_tracker::IgnoreAllocs::enter().is_none());
//! assert!(memtrack_tracker::IgnoreAllocs::active(), "a refused nested enter keeps the guard");
//! drop(g);
//! assert!(!memtrack_tracker::IgnoreAllocs::active());
//! ```

mod aggregate;
mod bootstrap;
mod capture_file;
mod clock;
mod env;
pub mod got;
mod guard;
mod handoff;
pub mod heap;
pub mod hooks;
pub mod inproc;
mod lifecycle;
mod mapbuf;
mod mark;
pub mod pymem;
mod real;
mod recorder;
mod region;
mod rss;
mod rust_alloc;
mod sampling;
mod session;
mod stack;
mod writer;

pub use guard::IgnoreAllocs;
pub use lifecycle::is_recording;
pub use mark::{region, region_begin, region_end, Region};
pub use memtrack_format::{AllocKind, EndReason};
pub use recorder::finish;
pub use rust_alloc::{measure, reset_peak, start, stats, Recording, StartError, Stats, Tracker};
