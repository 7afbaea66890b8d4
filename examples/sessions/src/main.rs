//! A toy session store that records its own allocations with memtrack.
//!
//! `memtrack_tracker::Tracker` is the global allocator, so the program can record itself, with
//! no `LD_PRELOAD` and no launcher:
//!
//! ```text
//! MEMTRACK_OUTPUT=sessions.cap target/release/sessions      # the whole run, exit included
//! target/release/sessions --record sessions.cap             # main's work, via start()
//! memtrack summary sessions.cap
//! memtrack flamegraph sessions.cap -o sessions.svg
//! ```
//!
//! What it does, and so what the reports must show (`--record` mode):
//! - 256 sessions of 4096 bytes each (`open_session`) in a 256-slot `Vec` (8192 bytes);
//! - one 1 MiB report page (`render_report`), freed on return: it makes the peak,
//!   2,105,344 bytes in 258 allocations;
//! - 10 × 100 bytes kept forever (`remember_forever`);
//! - half of the sessions closed; the rest are live when the recording stops: 533,480 bytes in
//!   139 allocations.

use std::alloc::System;
use std::hint::black_box;

#[global_allocator]
static ALLOC: memtrack_tracker::Tracker<System> = memtrack_tracker::Tracker::new(System);

pub struct Session {
    pub id: u64,
    pub scratch: Vec<u8>,
}

#[inline(never)]
fn open_session(id: u64) -> Session {
    Session {
        id,
        scratch: vec![id as u8; 4096],
    }
}

#[inline(never)]
fn render_report(sessions: &[Session]) -> usize {
    let mut page: Vec<u8> = Vec::with_capacity(1 << 20);
    for s in sessions {
        page.extend_from_slice(&s.id.to_le_bytes());
        page.push(s.scratch[0]);
    }
    black_box(&page).len()
}

#[inline(never)]
fn remember_forever(id: u64) {
    black_box(Box::leak(vec![id as u8; 100].into_boxed_slice()));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let record = match args.get(1).map(String::as_str) {
        Some("--record") if args.len() == 3 => Some(args[2].clone()),
        None => None,
        _ => {
            eprintln!("usage: sessions [--record CAPTURE]");
            std::process::exit(2);
        }
    };
    let recording = record.as_ref().map(|path| {
        memtrack_tracker::start(path).unwrap_or_else(|e| {
            eprintln!("sessions: {e}");
            std::process::exit(2);
        })
    });

    let mut sessions = Vec::with_capacity(256);
    for id in 0..256 {
        sessions.push(open_session(id));
    }
    let report = render_report(&sessions);
    for id in 0..10 {
        remember_forever(id);
    }
    sessions.truncate(128);
    drop(recording);

    let s = memtrack_tracker::stats();
    println!(
        "sessions: {} open, report of {report} bytes; heap peak {} bytes in {} allocations",
        sessions.len(),
        s.peak_bytes,
        s.allocations
    );
}
