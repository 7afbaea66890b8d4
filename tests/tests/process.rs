//! Process life: errno, exit from a thread, exec, dlopen'ed code, deep stacks.

use memtrack_reader::EventKind;
use memtrack_tests::*;
use std::process::Command;

#[test]
fn errno_is_preserved_and_failed_calls_count_nothing() {
    let work = Work::new("errno");
    let exe = work.compile("errno_check.c");
    assert_eq!(run_plain(&exe, &[] as &[&str]).code(), Some(0), "plain run");
    let t = run_traced(&work, "errno.cap", &exe, &[] as &[&str]);
    assert_eq!(
        t.run.code(),
        Some(0),
        "errno check failed under memtrack: {:?}",
        t.run
    );
    assert_figures(
        &t.capture,
        Figures {
            peak_bytes: 100,
            peak_allocations: 1,
            leaked_bytes: 0,
            leaked_allocations: 0,
            total_allocations: 3,
            total_bytes: 264,
            total_frees: 3,
        },
    );
}

#[test]
fn exit_from_a_second_thread_ends_the_capture_cleanly() {
    let work = Work::new("exit_thread");
    let exe = work.compile("exit_from_thread.c");
    let t = run_traced(&work, "exit.cap", &exe, &[] as &[&str]);
    assert_eq!(t.run.code(), Some(3), "{:?}", t.run);
    let json = summary_json(&t.capture);
    assert!(json_bool(&json, "complete"), "{json}");
    assert_eq!(json["end_reason"], "exit", "{json}");

    let cap = open_capture(&t.capture);
    let memtrack_reader::Replayed { replay, stacks, .. } = cap.replay();
    let sites: Vec<_> = replay
        .live_by_stack()
        .into_iter()
        .filter(|s| {
            let m = exe_module(&cap, &exe);
            let range = function_range(&exe, "leak_in_thread");
            module_frames(&stacks, s.stack, m)
                .first()
                .copied()
                .flatten()
                .is_some_and(|rel| range.contains(&rel))
        })
        .collect();
    // gcc may unroll the loop: up to four call sites, 4000 bytes in 4 blocks between them.
    let bytes: u64 = sites.iter().map(|s| s.bytes).sum();
    let blocks: u64 = sites.iter().map(|s| s.allocations).sum();
    assert_eq!((bytes, blocks), (4000, 4), "{sites:?}");
    for s in &sites {
        assert_stack_starts_in(&cap, &stacks, s.stack, &exe, &["leak_in_thread", "body"]);
    }
}

/// The `execl` forms take their arguments as C varargs; they finish the capture as `execv`
/// does (without the hook, the image's events were lost, and the capture was left cut off).
#[test]
fn execl_execle_and_execlp_continue_the_capture_too() {
    let work = Work::new("execl");
    let exe = work.compile("exec_chain.c");
    for (how, tag) in [("execl", "l"), ("execle", "le"), ("execlp", "lp")] {
        let t = run_traced_ok(&work, &format!("{how}.cap"), &exe, &["first", how]);
        let json = assert_figures(&t.capture, EXEC_CHAIN_TRUTH);
        assert!(json_bool(&json, "complete"), "{how}: {json}");
        assert_eq!(json["end_reason"], "exit", "{how}: {json}");
        // Eight arguments after the path: the last ones were passed on the stack.
        let argv: Vec<&str> = json["argv"]
            .as_array()
            .expect("argv")
            .iter()
            .map(|v| v.as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            argv[1..],
            ["second", tag, "b", "c", "d", "e"],
            "{how}: {json}"
        );
    }
}

/// An exec that fails is no image boundary: the heap it left stays live in the replay (the
/// reader reset its live set at every exec's END record, so the later free of a block made
/// before it counted as a free of an unknown block, and the block as freed before the peak).
#[test]
fn a_failed_exec_keeps_the_heap_it_left() {
    let work = Work::new("failed_exec");
    let exe = work.compile("failed_exec.c");
    let t = run_traced_ok(&work, "failed.cap", &exe, &[] as &[&str]);
    assert_eq!(t.run.stdout_text(), "ok\n");
    let json = assert_figures(
        &t.capture,
        Figures {
            peak_bytes: 4000,
            peak_allocations: 2,
            leaked_bytes: 3000,
            leaked_allocations: 1,
            total_allocations: 2,
            total_bytes: 4000,
            total_frees: 1,
        },
    );
    assert!(json_bool(&json, "complete"), "{json}");
    assert_eq!(json["end_reason"], "exit", "{json}");
    assert_eq!(open_capture(&t.capture).exec_boundaries, Vec::<u64>::new());
}

#[test]
fn exec_continues_the_capture_into_the_new_image() {
    let work = Work::new("exec");
    let exe = work.compile("exec_chain.c");
    let t = run_traced_ok(&work, "exec.cap", &exe, &["first"]);
    let json = assert_figures(&t.capture, EXEC_CHAIN_TRUTH);
    assert!(json_bool(&json, "complete"), "{json}");
    assert_eq!(json["end_reason"], "exit", "{json}");
    let chain: Vec<String> = json["exec_chain"]
        .as_array()
        .expect("exec_chain")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(chain.len(), 2, "{json}");
    assert!(
        chain[0].ends_with(" first") && chain[1].ends_with(" second"),
        "{chain:?}"
    );
    assert_eq!(json["argv"][1], "second", "{json}");

    // Each image's allocations carry stacks in that image's own functions.
    let cap = open_capture(&t.capture);
    assert_eq!(cap.images.len(), 1);
    assert_eq!(cap.exec_boundaries.len(), 1);
    let mut stacks = memtrack_reader::StackTable::default();
    let allocs: Vec<_> = cap
        .events(&mut stacks)
        .filter_map(|e| match e.kind {
            EventKind::Alloc { size, stack, .. } => Some((e.seq, size, stack)),
            _ => None,
        })
        .collect();
    assert_eq!(
        allocs.iter().map(|a| a.1).collect::<Vec<_>>(),
        [500, 100, 2000, 300]
    );
    assert!(allocs[2].0 >= cap.exec_boundaries[0]);
    assert!(allocs[1].0 < cap.exec_boundaries[0]);
    // The second image's stack ids continue above the first image's.
    assert!(allocs[2].2 > allocs[0].2, "{allocs:?}");
    let second_modules = cap
        .modules
        .iter()
        .rev()
        .find(|m| m.seq >= cap.exec_boundaries[0])
        .expect("the new image records its modules");
    let exe_mod = &second_modules.modules[0];
    let range = function_range(&exe, "second_alloc");
    let frames = stacks.frames(allocs[2].2);
    let rel = frames[0].wrapping_sub(exe_mod.base);
    assert!(
        range.contains(&rel),
        "{frames:#x?} base {:#x}",
        exe_mod.base
    );
}

fn deep_stack_frames(depth: u32) -> (Vec<u64>, usize) {
    let work = Work::new(&format!("deep{depth}"));
    let exe = work.compile("deep_stack.c");
    let t = run_traced_ok(&work, "deep.cap", &exe, &[depth.to_string()]);
    let cap = open_capture(&t.capture);
    let memtrack_reader::Replayed { replay, stacks, .. } = cap.replay();
    let live = replay.live_by_stack();
    let site = live
        .iter()
        .find(|s| s.bytes == 64)
        .unwrap_or_else(|| panic!("{live:?}"));
    let module = exe_module(&cap, &exe);
    let descend = function_range(&exe, "descend");
    let frames = module_frames(&stacks, site.stack, module);
    let in_descend = frames
        .iter()
        .filter(|f| f.is_some_and(|rel| descend.contains(&rel)))
        .count();
    assert_stack_starts_in(
        &cap,
        &stacks,
        site.stack,
        &exe,
        &["bottom_alloc", "descend"],
    );
    (stacks.frames(site.stack), in_descend)
}

#[test]
fn deep_stacks_are_kept_whole_up_to_256_frames() {
    // bottom_alloc + 200 x descend + main + __libc_start_call_main + __libc_start_main + _start
    let (frames, in_descend) = deep_stack_frames(200);
    assert_eq!(in_descend, 200);
    assert_eq!(frames.len(), 205, "{frames:#x?}");
    // Deeper stacks are cut at 256 frames, innermost kept.
    let (frames, in_descend) = deep_stack_frames(400);
    assert_eq!(frames.len(), 256);
    assert_eq!(in_descend, 255);
}

#[test]
fn code_loaded_with_dlopen_is_unwound_and_its_module_recorded() {
    let work = Work::new("dlopen");
    let lib = work.compile_shared("dlopen_lib.c");
    let exe = work.compile("dlopen_main.c");
    let t = run_traced_ok(&work, "dl.cap", &exe, &[lib.to_str().unwrap()]);
    let cap = open_capture(&t.capture);
    let memtrack_reader::Replayed { stacks, .. } = cap.replay();
    let lib_site = function_range(&lib, "lib_site");
    let lib_alloc = function_range(&lib, "lib_alloc");
    let call_lib = function_range(&exe, "call_lib");
    let exe_mod = exe_module(&cap, &exe);
    let mut stacks_owned = memtrack_reader::StackTable::default();
    let mut found = Vec::new();
    for ev in cap.events(&mut stacks_owned) {
        let EventKind::Alloc { size, stack, .. } = ev.kind else {
            continue;
        };
        if size != 4096 && size != 8192 {
            continue;
        }
        // The module set in force for this event: the last snapshot at or before it that
        // includes the library.
        let snapshot = cap
            .modules
            .iter()
            .filter(|m| m.seq <= ev.seq)
            .rev()
            .find_map(|m| {
                m.modules
                    .iter()
                    .find(|x| x.path.ends_with("libdlopen_lib.so"))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no module record with libdlopen_lib.so before seq {}",
                    ev.seq
                )
            });
        let frames = stacks.frames(stack);
        let rel0 = frames[0].wrapping_sub(snapshot.base);
        let rel1 = frames[1].wrapping_sub(snapshot.base);
        let rel2 = frames[2].wrapping_sub(exe_mod.base);
        assert!(
            lib_site.contains(&rel0),
            "frame 0 {frames:#x?}, lib base {:#x}",
            snapshot.base
        );
        assert!(lib_alloc.contains(&rel1), "frame 1 {frames:#x?}");
        assert!(call_lib.contains(&rel2), "frame 2 {frames:#x?}");
        found.push(size);
    }
    assert_eq!(found, [4096, 8192]);
}

#[test]
fn vfork_children_do_not_end_the_parents_capture() {
    let work = Work::new("vfork");
    let exe = work.compile("vfork_exec.c");
    let t = run_traced_ok(&work, "vfork.cap", &exe, &[] as &[&str]);
    let json = summary_json(&t.capture);
    assert!(json_bool(&json, "complete"), "{json}");
    assert_eq!(json["end_reason"], "exit", "{json}");
    let cap = open_capture(&t.capture);
    let memtrack_reader::Replayed { replay, stacks, .. } = cap.replay();
    let module = exe_module(&cap, &exe);
    let site = function_range(&exe, "parent_alloc");
    let mut mine: Vec<u64> = replay
        .live_by_stack()
        .into_iter()
        .filter(|s| {
            module_frames(&stacks, s.stack, module)
                .first()
                .copied()
                .flatten()
                .is_some_and(|rel| site.contains(&rel))
        })
        .map(|s| s.bytes)
        .collect();
    mine.sort();
    assert_eq!(
        mine,
        [100, 200],
        "both of the parent's blocks, the second made after the children"
    );
}

#[test]
fn a_program_that_closes_every_descriptor_never_gets_capture_bytes() {
    let work = Work::new("close_fds");
    let exe = work.compile("close_fds.c");
    let log = work.path("program.log");
    let t = run_traced(&work, "fds.cap", &exe, &[log.to_str().unwrap()]);
    assert_eq!(t.run.code(), Some(0), "{:?}", t.run);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().count();
    assert!(lines > 100, "{lines} lines");
    assert!(
        text.lines().all(|l| l == "log line"),
        "the program's log holds foreign bytes"
    );
    // The capture holds what was recorded until the descriptor went away.
    let cap = open_capture(&t.capture);
    assert!(!cap.complete());
    assert!(
        t.run.stderr.contains("closed the capture file"),
        "{}",
        t.run.stderr
    );
}

/// A program inside pthread_getattr_np when its malloc reaches the tracker (glibc holds the
/// thread's lock there) must not deadlock: run with a time limit.
#[test]
fn pthread_getattr_np_inside_malloc_does_not_deadlock() {
    let work = Work::new("getattr");
    let exe = work.compile("getattr.c");
    let cap = work.path("getattr.cap");
    let mut child = Command::new(&binaries().memtrack)
        .args(["run", "-o"])
        .arg(&cap)
        .arg("--")
        .arg(&exe)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("memtrack runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = Command::new("pkill").args(["-9", "-f"]).arg(&exe).status();
            let _ = child.kill();
            panic!("the traced program hung (deadlock)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    let s = open_capture(&cap).summary().unwrap();
    assert!(s.complete, "{s:?}");
    // glibc's own blocks (the /proc/self/maps stream, cpusets) come and go; the program keeps
    // its 1234 bytes plus the new thread's TLS table (one calloc per thread, never freed).
    let memtrack_reader::Replayed { replay, .. } = open_capture(&cap).replay();
    assert!(
        replay.live_by_stack().iter().any(|site| site.bytes == 1234),
        "{s:?}"
    );
}
