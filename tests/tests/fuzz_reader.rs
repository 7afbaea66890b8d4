//! Arbitrary-input property test of the reader (a fuzzer without the nightly toolchain): the
//! kept captures and the crafted seeds of `tests/fuzz/corpus/` are mutated at random (bit
//! flips, absurd varints and lengths, cuts, splices) and read through every view. The reader
//! must never panic and never need more than a bounded amount of memory; an unreadable file
//! must be an error naming the file.
//!
//! It runs for `MEMTRACK_FUZZ_SECS` seconds (default 8) from seed `MEMTRACK_FUZZ_SEED`; a
//! failure prints the seed and iteration to reproduce it.

use memtrack_reader::{Capture, Symbolizer, View};
use memtrack_tests::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["captures", "fuzz/corpus"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cap") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 15, "{files:?}");
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

fn mutate(rng: &mut Rng, input: &[u8], others: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut d = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = d.len();
        match rng.below(8) {
            0 if n > 0 => {
                let i = rng.below(n);
                d[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                d[i] = [0x00, 0xff, 0x80, 0x7f][rng.below(4)];
            }
            2 => d.truncate(rng.below(n + 1)),
            3 => {
                // An absurd varint or length.
                let i = rng.below(n + 1);
                let run = 1 + rng.below(12);
                d.splice(i..i, std::iter::repeat_n(0xffu8, run));
            }
            4 if n > 0 => {
                let i = rng.below(n);
                let j = (i + 1 + rng.below(64)).min(n);
                d.drain(i..j);
            }
            5 if n > 0 => {
                // Splice a piece of another capture in.
                let (_, o) = &others[rng.below(others.len())];
                if !o.is_empty() {
                    let a = rng.below(o.len());
                    let b = (a + 1 + rng.below(256)).min(o.len());
                    let i = rng.below(n);
                    d.splice(i..i, o[a..b].iter().copied());
                }
            }
            6 if n >= 8 => {
                let i = rng.below(n - 7);
                d[i..i + 8].copy_from_slice(&rng.next().to_le_bytes());
            }
            _ => {
                let i = rng.below(n + 1);
                d.insert(i, rng.next() as u8);
            }
        }
    }
    d
}

#[test]
fn the_reader_survives_arbitrary_damage() {
    let secs: u64 = std::env::var("MEMTRACK_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("MEMTRACK_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd);
    let corpus = corpus();
    let work = Work::new("fuzz");
    let path = work.path("input.cap");
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let mut iterations = 0u64;
    let (mut opened, mut errors) = (0u64, 0u64);
    while start.elapsed() < Duration::from_secs(secs) {
        let (name, base) = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, base, &corpus);
        std::fs::write(&path, &input).unwrap();
        let context = format!("seed {seed}, iteration {iterations}, from {name}");
        let result = std::panic::catch_unwind(|| match Capture::open(&path) {
            Ok(cap) => {
                let s = cap.summary().expect("an opened capture summarizes");
                for view in [View::Peak, View::Leaks, View::Allocated, View::Temporary] {
                    let v = cap.view(view);
                    assert!(v.bytes <= s.total_bytes.max(v.bytes), "{view:?}");
                }
                let _ = cap.stats();
                if iterations.is_multiple_of(16) {
                    let mut sym = Symbolizer::new(&cap);
                    let _ = cap.view(View::Peak).folded(&mut sym);
                }
                true
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("input.cap"),
                    "error without the file name: {msg}"
                );
                false
            }
        });
        match result {
            Ok(true) => opened += 1,
            Ok(false) => errors += 1,
            Err(_) => {
                let keep = work.path("crash.cap");
                std::fs::write(&keep, &input).unwrap();
                panic!(
                    "the reader panicked ({context}); input kept at {}",
                    keep.display()
                );
            }
        }
        iterations += 1;
    }
    eprintln!(
        "fuzz: {iterations} inputs in {secs} s ({opened} opened, {errors} refused with an error)"
    );
    assert!(iterations > 100, "only {iterations} inputs");
    assert!(opened > 0 && errors > 0);
}
