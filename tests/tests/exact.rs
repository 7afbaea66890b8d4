//! Exact figures of single-threaded fixtures: every interposed function, a realloc chain, and
//! C++ new/delete. The truths are stated (and derived) in the fixtures' comment blocks.

use memtrack_reader::{AllocKind, EventKind, StackTable};
use memtrack_tests::*;

/// every_function.c run with `no-reallocarray`: steps 6 and 7 (the two reallocarray calls)
/// are skipped; see `every_function_with_reallocarray` for the full run.
const EVERY_FUNCTION_NO_REALLOCARRAY: Figures = Figures {
    peak_bytes: 13958,
    peak_allocations: 9,
    leaked_bytes: 3286,
    leaked_allocations: 4,
    total_allocations: 11,
    total_bytes: 19008,
    total_frees: 5,
};

/// every_function.c, whole run.
const EVERY_FUNCTION: Figures = Figures {
    peak_bytes: 14022,
    peak_allocations: 10,
    leaked_bytes: 3350,
    leaked_allocations: 5,
    total_allocations: 13,
    total_bytes: 19200,
    total_frees: 5,
};

/// The allocation events of a capture, in order: (kind, address, size, stack).
fn allocations(cap: &memtrack_reader::Capture) -> (Vec<(AllocKind, u64, u64, u32)>, StackTable) {
    let mut stacks = StackTable::default();
    let allocs = cap
        .events(&mut stacks)
        .filter_map(|e| match e.kind {
            EventKind::Alloc {
                kind,
                addr,
                size,
                stack,
            } => Some((kind, addr, size, stack)),
            _ => None,
        })
        .collect();
    (allocs, stacks)
}

#[test]
fn every_function_exact() {
    let work = Work::new("every_function");
    let exe = work.compile("every_function.c");
    let t = run_traced_ok(&work, "every.cap", &exe, &["no-reallocarray"]);
    let json = assert_figures(&t.capture, EVERY_FUNCTION_NO_REALLOCARRAY);
    assert!(json_bool(&json, "complete"), "{json}");
    assert_eq!(json["end_reason"], "exit", "{json}");
    assert_eq!(json_u64(&json, "threads"), 1, "{json}");

    let cap = open_capture(&t.capture);
    assert!(cap.complete());
    let (allocs, stacks) = allocations(&cap);
    let kinds: Vec<(AllocKind, u64)> = allocs.iter().map(|a| (a.0, a.2)).collect();
    use AllocKind::*;
    assert_eq!(
        kinds,
        [
            (Malloc, 100),
            (Calloc, 200),
            (Realloc, 50),
            (Realloc, 5000),
            (Realloc, 30),
            (PosixMemalign, 300),
            (AlignedAlloc, 256),
            (Memalign, 72),
            (Valloc, 1000),
            (Pvalloc, 2000),
            (Malloc, 10000),
        ],
        "the allocation events, in order, as (function, requested bytes)"
    );
    // The aligned functions' blocks are aligned as asked.
    for (kind, addr, _, _) in &allocs {
        let align = match kind {
            PosixMemalign => 64,
            AlignedAlloc => 128,
            Memalign => 32,
            Valloc | Pvalloc => 4096,
            _ => 16,
        };
        assert_eq!(addr % align, 0, "{kind:?} block at {addr:#x}");
    }

    // Events: 11 allocations, 2 realloc halves (the grow and the shrink of a live block) and
    // 5 frees; free(NULL) is not an event, and no event is about address 0.
    let mut scratch = StackTable::default();
    let events: Vec<_> = cap.events(&mut scratch).collect();
    let frees = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Free { .. }))
        .count();
    let realloc_frees = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ReallocFree { .. }))
        .count();
    assert_eq!(frees, 5, "free events (free(NULL) is not one)");
    assert_eq!(realloc_frees, 2, "old-block halves of the two resizes");
    assert!(
        events.iter().all(|e| match e.kind {
            EventKind::Free { addr } | EventKind::ReallocFree { addr } => addr != 0,
            _ => true,
        }),
        "an event about address 0"
    );
    assert_eq!(events.len(), 18);
    assert_eq!(json_u64(&json, "events"), 18, "{json}");
    // Sequence numbers are strictly increasing in the merged stream.
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));

    // Stacks: the first malloc's innermost frame is in site_malloc, called from main; so is
    // calloc's in site_calloc.
    assert_stack_starts_in(&cap, &stacks, allocs[0].3, &exe, &["site_malloc", "main"]);
    assert_stack_starts_in(&cap, &stacks, allocs[1].3, &exe, &["site_calloc", "main"]);
    assert_stack_starts_in(
        &cap,
        &stacks,
        allocs[6].3,
        &exe,
        &["site_aligned_alloc", "main"],
    );

    // The peak is reached by the 10000-byte malloc, with the 9 blocks a, b, c, e, f, g, h, i
    // and big live: replaying up to the peak's sequence number gives that live set.
    let memtrack_reader::Replayed { replay: full, .. } = cap.replay();
    let memtrack_reader::Replayed {
        replay: at_peak, ..
    } = cap.replay_until(full.peak_seq);
    assert_eq!(at_peak.live_bytes, 13958);
    assert_eq!(at_peak.live_allocations(), 9);

    // What is live at exit, by site: c (30), f (256), h (1000), i (2000), one site each.
    let mut live: Vec<u64> = full.live_by_stack().iter().map(|s| s.bytes).collect();
    live.sort_unstable();
    assert_eq!(live, [30, 256, 1000, 2000]);
}

/// The full every_function run, reallocarray included.
#[test]
fn every_function_with_reallocarray() {
    let work = Work::new("every_function_full");
    let exe = work.compile("every_function.c");
    let t = run_traced_ok(&work, "every.cap", &exe, &[] as &[&str]);
    assert_figures(&t.capture, EVERY_FUNCTION);
    let cap = open_capture(&t.capture);
    let (allocs, _) = allocations(&cap);
    let ra: Vec<u64> = allocs
        .iter()
        .filter(|a| a.0 == AllocKind::ReallocArray)
        .map(|a| a.2)
        .collect();
    assert_eq!(
        ra,
        [128, 64],
        "one ReallocArray event per reallocarray call"
    );
    assert_eq!(allocs.len(), 13);
}

#[test]
fn realloc_chain_exact() {
    const N: u64 = 2000;
    const STEP: u64 = 100;
    let work = Work::new("realloc_chain");
    let exe = work.compile("realloc_chain.c");
    let t = run_traced_ok(&work, "chain.cap", &exe, &[] as &[&str]);
    let json = assert_figures(
        &t.capture,
        Figures {
            peak_bytes: N * STEP,
            peak_allocations: 1,
            leaked_bytes: 0,
            leaked_allocations: 0,
            total_allocations: 2 * N - 1,
            total_bytes: STEP * N * N,
            total_frees: 1,
        },
    );
    assert_eq!(json_u64(&json, "total_allocations"), 3999);
    assert_eq!(json_u64(&json, "total_bytes"), 400_000_000);
    assert!(json_bool(&json, "complete"));

    // The sizes go 100, 200, ..., 200000, 199900, ..., 100, every one a realloc.
    let cap = open_capture(&t.capture);
    let (allocs, stacks) = allocations(&cap);
    let expected: Vec<u64> = (1..=N).chain((1..N).rev()).map(|k| k * STEP).collect();
    assert_eq!(
        allocs.iter().map(|a| a.2).collect::<Vec<_>>(),
        expected,
        "sizes of the chain"
    );
    assert!(allocs.iter().all(|a| a.0 == AllocKind::Realloc));
    // Two call sites of resize() in main (the growing and the shrinking loop): two stacks,
    // the first for the growing calls, both starting in resize() called by main.
    let mut distinct: Vec<u32> = allocs.iter().map(|a| a.3).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 2, "stacks of the chain: {distinct:?}");
    assert!(allocs[..N as usize].iter().all(|a| a.3 == allocs[0].3));
    assert!(allocs[N as usize..]
        .iter()
        .all(|a| a.3 == allocs[N as usize].3));
    for stack in distinct {
        assert_stack_starts_in(&cap, &stacks, stack, &exe, &["resize", "main"]);
    }
    // Peak reached at the largest size.
    let memtrack_reader::Replayed { replay: r, .. } = cap.replay();
    let memtrack_reader::Replayed {
        replay: at_peak, ..
    } = cap.replay_until(r.peak_seq);
    assert_eq!(at_peak.live_bytes, N * STEP);
    assert_eq!(at_peak.total_allocations, N);
}

/// The C++ runtime's own allocations, measured from cxx_baseline.cpp.
fn cxx_baseline(work: &Work) -> Figures {
    let exe = work.compile("cxx_baseline.cpp");
    let t = run_traced_ok(work, "baseline.cap", &exe, &[] as &[&str]);
    let (base, json) = figures_both_ways(&t.capture);
    assert_eq!(Figures::from_json(&json), base);
    // Sanity: libstdc++ is linked and its start-up pool is there, allocated once, never freed.
    assert!(
        base.total_allocations >= 1 && base.leaked_bytes > 0,
        "the baseline shows no C++ runtime allocation: {base:?}"
    );
    assert_eq!(base.total_frees, 0, "{base:?}");
    assert_eq!(base.leaked_bytes, base.total_bytes, "{base:?}");
    base
}

#[test]
fn cxx_new_delete_exact() {
    let work = Work::new("cxx_new_delete");
    let base = cxx_baseline(&work);
    let exe = work.compile("cxx_new_delete.cpp");
    let t = run_traced_ok(&work, "cxx.cap", &exe, &[] as &[&str]);
    let truth = Figures {
        peak_bytes: 6068,
        peak_allocations: 3,
        leaked_bytes: 60,
        leaked_allocations: 2,
        total_allocations: 1005,
        total_bytes: 18128,
        total_frees: 1003,
    };
    let json = assert_figures(&t.capture, truth.on_top_of(base));
    assert!(json_bool(&json, "complete"));

    // The program's own requests, in order of first appearance per size: 12 (Point),
    // 1000 (int[250]), 68 (Named[3] with its 8-byte cookie), 5000, 12, 48 (Named[2] + cookie).
    let cap = open_capture(&t.capture);
    let (allocs, stacks) = allocations(&cap);
    let module = exe_module(&cap, &exe);
    let own: Vec<(u64, u32)> = allocs
        .iter()
        .filter(|a| {
            module_frames(&stacks, a.3, module)
                .iter()
                .any(|f| f.is_some())
        })
        .map(|a| (a.2, a.3))
        .collect();
    let sizes: Vec<u64> = own.iter().map(|a| a.0).collect();
    let mut expected = vec![12u64; 1000];
    expected.extend([1000, 68, 5000, 12, 48]);
    assert_eq!(sizes, expected);
    // new[] goes through operator new[] and operator new to malloc: the stack still reaches
    // the fixture's make_names, called from main.
    let names_stack = own[1001].1;
    let frames = module_frames(&stacks, names_stack, module);
    let make_names = function_range(&exe, "make_names(unsigned long)");
    let main = function_range(&exe, "main");
    let in_fixture: Vec<u64> = frames.into_iter().flatten().collect();
    assert!(
        in_fixture.len() >= 2
            && make_names.contains(&in_fixture[0])
            && main.contains(&in_fixture[1]),
        "stack of new Named[3] within the fixture: {in_fixture:#x?} (make_names {make_names:#x?}, main {main:#x?})"
    );
}
