//! The writer thread's per-chunk work, measured offline on a real capture: every `EVENTS_R`
//! chunk is decoded and stream-encoded again (what the program threads handed over), then
//! transcoded the way the tracker's writer does, several times; the CPU time per event and the
//! bytes per event are printed. `bench/transcode.sh` runs it; not part of the tests.
//!
//!     cargo run --release -p memtrack-format --example transcode -- CAPTURE [ROUNDS]

use memtrack_format::{
    encode_stream, next_record, record, ChunkHeader, ColumnDecoder, ColumnEncoding, Cursor,
    FastEncoder, Header, Item, Next, Transcoder,
};
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let mut t = libc_timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { clock_gettime(3, &mut t) }; // CLOCK_THREAD_CPUTIME_ID
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

#[repr(C)]
struct libc_timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn clock_gettime(clk: i32, tp: *mut libc_timespec) -> i32;
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: transcode CAPTURE [ROUNDS]");
        std::process::exit(2);
    };
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(3);
    // SPLIT=k cuts every chunk into k (what smaller thread buffers would hand over).
    let split: usize = std::env::var("SPLIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let data = std::fs::read(path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(2)
    });
    let (_, mut off) = Header::decode(&data).unwrap_or_else(|e| {
        eprintln!("{path}: not a capture: {e}");
        std::process::exit(2)
    });
    // The stream chunks the program threads wrote, rebuilt from the rank chunks.
    let mut chunks = Vec::new();
    // Each chunk's record as the tracker wrote it: transcoding the rebuilt stream must give
    // the same bytes (the harness checks it is measuring the same work).
    let mut written = Vec::new();
    let mut events = 0u64;
    let mut rank_bytes = 0usize;
    while let Next::Record(r) = next_record(&data, off) {
        off = r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
        if r.kind != record::EVENTS_R {
            continue;
        }
        written.push(&data[r.offset..off]);
        rank_bytes += r.payload.len();
        let mut c = Cursor::new(r.payload);
        let h = ChunkHeader::decode(&mut c).expect("chunk header");
        let mut d = ColumnDecoder::new(c.rest(), &h, ColumnEncoding::Rank).expect("chunk");
        let mut items = Vec::new();
        while let Some(it) = d.next_item().expect("item") {
            if matches!(it, Item::Event { .. }) {
                events += 1;
            }
            items.push(it);
        }
        if split <= 1 {
            chunks.push(encode_stream(&h, &items));
            continue;
        }
        let per = items.len().div_ceil(split);
        for part in items.chunks(per) {
            let first = part.iter().find_map(|it| match it {
                Item::Event { seq, time, .. } => Some((*seq, *time)),
                Item::Node { .. } => None,
            });
            let Some((base_seq, base_time)) = first else {
                continue;
            };
            let ph = ChunkHeader {
                tid: h.tid,
                base_seq,
                base_time,
            };
            chunks.push(encode_stream(&ph, part));
        }
    }
    let stream_bytes: usize = chunks.iter().map(Vec::len).sum();
    println!(
        "{path}: {} chunks, {events} events, stream {:.2} B/event, file's EVENTS_R {:.3} B/event",
        chunks.len(),
        stream_bytes as f64 / events as f64,
        rank_bytes as f64 / events as f64
    );
    let mut t = Transcoder::new();
    let mut same = 0;
    for (ch, w) in chunks.iter().zip(&written) {
        let mut out = Vec::new();
        t.transcode(ch, 1, &mut out).expect("transcode");
        same += (out == *w) as usize;
    }
    println!(
        "{same} of {} chunks transcode to the bytes in the file",
        chunks.len()
    );
    let mut best = f64::MAX;
    let mut out_bytes = 0;
    for _ in 0..rounds {
        let mut out = Vec::new();
        let (c0, w0) = (cpu_seconds(), Instant::now());
        for ch in &chunks {
            out.clear();
            t.transcode(ch, 1, &mut out).expect("transcode");
            out_bytes += out.len();
        }
        let _ = w0;
        best = best.min(cpu_seconds() - c0);
    }
    println!(
        "transcode: {:.1} ns/event (best of {rounds}), {:.3} B/event",
        best * 1e9 / events as f64,
        out_bytes as f64 / rounds as f64 / events as f64
    );
    // The other end of the trade-off: the fast encoding (`EVENTS_S`), the stream as the threads
    // wrote it compressed at a low zstd level, at the levels in LEVELS (comma-separated).
    let levels: Vec<i32> = match std::env::var("LEVELS") {
        Ok(v) => v.split(',').filter_map(|l| l.trim().parse().ok()).collect(),
        Err(_) if std::env::var_os("ONLY_RANK").is_some() => Vec::new(),
        Err(_) => vec![-7, -5, -3, -1, 1, 3],
    };
    for level in levels {
        let mut f = FastEncoder::new();
        let mut best = f64::MAX;
        let mut bytes = 0;
        let mut out = Vec::new();
        for _ in 0..rounds {
            let c0 = cpu_seconds();
            bytes = 0;
            for ch in &chunks {
                out.clear();
                f.encode(ch, level, &mut out).expect("compress");
                bytes += out.len();
            }
            best = best.min(cpu_seconds() - c0);
        }
        println!(
            "fast encoding, zstd level {level}: {:.1} ns/event, {:.3} B/event",
            best * 1e9 / events as f64,
            bytes as f64 / events as f64
        );
    }
}
