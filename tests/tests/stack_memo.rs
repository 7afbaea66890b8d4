//! The stack walk reuses earlier walks (the previous one and a few before it). Stacks that
//! recur after others, at several depths, with rbp changing at every call, must still come out
//! exactly: built without frame pointers (rbp a plain register) and with them.

use memtrack_tests::*;
use std::collections::BTreeMap;

/// Allocated bytes per (depth, site) from the `--allocated` folded export.
fn per_stack(work: &Work, exe: &std::path::Path, n: u64) -> BTreeMap<(usize, String), u64> {
    let name = format!("{}.cap", exe.file_name().unwrap().to_string_lossy());
    let traced = run_traced_ok(work, &name, exe, &[n.to_string()]);
    let out = memtrack_ok(|c| {
        c.arg("export")
            .arg(&traced.capture)
            .args(["--format", "folded", "--allocated"]);
    });
    let text = String::from_utf8(out.stdout).unwrap();
    let mut got = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.ends_with(";leaf") || l.contains(";leaf "))
    {
        let (stack, bytes) = line.rsplit_once(' ').unwrap();
        let frames: Vec<&str> = stack.split(';').collect();
        let main = frames.iter().position(|f| *f == "main").expect(line);
        assert_eq!(frames.len(), main + 3, "main, via_*, leaf: {line}");
        *got.entry((0, frames[main + 1].to_string())).or_insert(0) += bytes.parse::<u64>().unwrap();
    }
    for line in text.lines().filter(|l| l.contains(";drive")) {
        let (stack, bytes) = line.rsplit_once(' ').unwrap();
        let frames: Vec<&str> = stack.split(';').collect();
        let main = frames.iter().position(|f| *f == "main").expect(line);
        let drives = frames[main + 1..]
            .iter()
            .take_while(|f| **f == "drive")
            .count();
        let rest = &frames[main + 1 + drives..];
        assert_eq!(rest.len(), 1, "one frame below drive: {line}");
        *got.entry((drives - 1, rest[0].to_string())).or_insert(0) += bytes.parse::<u64>().unwrap();
    }
    got
}

fn expected(n: u64) -> BTreeMap<(usize, String), u64> {
    let mut want = BTreeMap::new();
    want.insert((0, "via_x".to_string()), n / 2 * 1000);
    want.insert((0, "via_y".to_string()), n / 2 * 3000);
    for depth in 0..3 {
        for (kind, site) in ["site_a", "site_b", "site_c"].into_iter().enumerate() {
            want.insert((depth, site.to_string()), n / 9 * 64 * (kind as u64 + 1));
        }
    }
    want
}

#[test]
fn recurring_stacks_without_frame_pointers_and_a_changing_rbp() {
    let work = Work::new("stack_memo_nofp");
    let exe = work.compile_with(
        "recurring_stacks.c",
        Some("recurring_nofp"),
        &["-O2", "-fomit-frame-pointer", "-DCLOBBER_RBP"],
    );
    assert_eq!(per_stack(&work, &exe, 9000), expected(9000));
}

#[test]
fn recurring_stacks_with_frame_pointers() {
    let work = Work::new("stack_memo_fp");
    let exe = work.compile_with(
        "recurring_stacks.c",
        Some("recurring_fp"),
        &["-O1", "-fno-omit-frame-pointer"],
    );
    assert_eq!(per_stack(&work, &exe, 9000), expected(9000));
}
