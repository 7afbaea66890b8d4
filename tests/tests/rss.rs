//! Resident memory over time (issue 22): the writer thread's `RSS` samples and what `summary`
//! makes of them, from `rss_phases.c` (one 50,000,000-byte block, touched, held 100 ms, freed).

use memtrack_format::EventKind;
use memtrack_reader::StackTable;
use memtrack_tests::*;

const BLOCK: u64 = 50_000_000;

#[test]
fn peak_rss_is_sampled_while_the_touched_block_is_live_with_the_heap_then() {
    let work = Work::new("rss");
    let exe = work.compile("rss_phases.c");
    let t = run_traced_ok(&work, "rss.cap", &exe, &[] as &[&str]);
    let cap = open_capture(&t.capture);
    assert!(cap.complete());

    // The block's allocation and free, and their times.
    let mut stacks = StackTable::default();
    let (mut alloc, mut free) = (None, None);
    let mut block_addr = None;
    for e in cap.events(&mut stacks) {
        match e.kind {
            EventKind::Alloc { size, addr, .. } if size == BLOCK => {
                alloc = Some((e.seq, cap.seconds(e.time)));
                block_addr = Some(addr);
            }
            EventKind::Free { addr } if Some(addr) == block_addr => {
                free = Some((e.seq, cap.seconds(e.time)));
            }
            _ => {}
        }
    }
    let (alloc_seq, alloc_t) = alloc.expect("the block's allocation");
    let (free_seq, free_t) = free.expect("the block's free");

    // Samples: in order, at least one before END, the block visible in them.
    assert!(cap.rss.len() >= 2, "{:?}", cap.rss);
    assert!(cap
        .rss
        .windows(2)
        .all(|w| w[0].seq <= w[1].seq && w[0].time <= w[1].time));
    let last = cap.rss.last().unwrap();
    assert!(
        last.seq >= free_seq,
        "a sample at finish, after the free: {last:?}"
    );
    let peak = cap.peak_rss().unwrap();
    assert!(
        peak.seq > alloc_seq && peak.seq <= free_seq,
        "peak sample {peak:?} between the allocation (seq {alloc_seq}) and the free (seq {free_seq})"
    );
    // After the free (munmap) resident memory fell by most of the block.
    assert!(
        last.rss_bytes + BLOCK * 9 / 10 <= peak.rss_bytes,
        "{last:?} vs {peak:?}"
    );

    let json = summary_json(&t.capture);
    assert_eq!(json_u64(&json, "peak_bytes"), BLOCK, "{json}");
    assert_eq!(json_u64(&json, "peak_allocations"), 1, "{json}");
    let rss = json_u64(&json, "peak_rss_bytes");
    assert!(rss >= BLOCK, "{json}");
    assert_eq!(rss, peak.rss_bytes);
    // The heap then: exactly the block, the only allocation.
    assert_eq!(json_u64(&json, "heap_at_peak_rss_bytes"), BLOCK, "{json}");
    assert_eq!(
        json_u64(&json, "heap_at_peak_rss_bytes"),
        json_u64(&json, "peak_bytes")
    );
    let when = json["peak_rss_time_seconds"].as_f64().expect("a time");
    assert!(
        alloc_t <= when && when <= free_t,
        "peak RSS at {when} s, block live from {alloc_t} s to {free_t} s"
    );
    // The block was held ~100 ms.
    assert!(free_t - alloc_t >= 0.09, "{alloc_t} .. {free_t}");

    // The text line, after the peak heap line.
    let out = memtrack_ok(|c| {
        c.arg("summary").arg(&t.capture);
    });
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("  peak heap:"))
        .unwrap();
    let want = format!(
        "  peak RSS:       {} bytes (",
        memtrack_reader::grouped(rss)
    );
    assert!(lines[at + 1].starts_with(&want), "{text}");
    assert!(
        lines[at + 1].ends_with(&format!(
            "s (heap then: {} bytes (47.68 MiB))",
            memtrack_reader::grouped(BLOCK)
        )),
        "{text}"
    );
}

/// `memtrack dump` lists the samples.
#[test]
fn dump_lists_every_sample() {
    let work = Work::new("rss-dump");
    let exe = work.compile("rss_phases.c");
    let t = run_traced_ok(&work, "rss.cap", &exe, &[] as &[&str]);
    let cap = open_capture(&t.capture);
    let out = memtrack_ok(|c| {
        c.arg("dump").arg(&t.capture);
    });
    let text = String::from_utf8_lossy(&out.stdout);
    let listed: Vec<&str> = text.lines().filter(|l| l.starts_with("rss at")).collect();
    let want: Vec<String> = cap
        .rss
        .iter()
        .map(|r| {
            format!(
                "rss at seq {} time {}: {} bytes",
                r.seq, r.time, r.rss_bytes
            )
        })
        .collect();
    assert!(!want.is_empty());
    assert_eq!(listed, want);
}

/// A capture without samples (written before the tracker sampled) gives nulls, and no line.
#[test]
fn a_capture_without_samples_has_null_rss_keys() {
    let capture = workspace_root().join("tests/captures/v2-every-function.cap");
    let cap = open_capture(&capture);
    assert!(cap.rss.is_empty());
    let json = summary_json(&capture);
    for key in [
        "peak_rss_bytes",
        "peak_rss_time_seconds",
        "heap_at_peak_rss_bytes",
    ] {
        assert!(json[key].is_null(), "{key}: {json}");
    }
    let out = memtrack_ok(|c| {
        c.arg("summary").arg(&capture);
    });
    assert!(!String::from_utf8_lossy(&out.stdout).contains("peak RSS"));
}
