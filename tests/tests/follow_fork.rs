//! `memtrack run --follow-fork` (the default): every forked process (with or without exec)
//! records into a capture of its own, `FILE.<pid>`, with exact figures; the parent's capture is
//! unchanged and `summary` lists the children. With `--no-follow-fork`, children run untracked.

use memtrack_tests::*;

fn figures(
    kept: u64,
    kept_n: u64,
    total: u64,
    total_n: u64,
    frees: u64,
    peak: u64,
    peak_n: u64,
) -> Figures {
    Figures {
        peak_bytes: peak,
        peak_allocations: peak_n,
        leaked_bytes: kept,
        leaked_allocations: kept_n,
        total_allocations: total_n,
        total_bytes: total,
        total_frees: frees,
    }
}

#[test]
fn forked_children_get_captures_of_their_own() {
    let work = Work::new("follow_fork");
    let exe = work.compile("forks.c");
    let cap = work.path("f.cap");
    // --keep-all: the children here are tiny and short, the very helpers whose captures
    // `memtrack run` otherwise folds into the parent's; this test reads their files.
    let out = memtrack_ok(|c| {
        c.args(["run", "--follow-fork", "--keep-all", "-o"])
            .arg(&cap)
            .arg("--")
            .arg(&exe)
            .current_dir(work.dir());
    });
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("memtrack: 3 child processes recorded, each into a capture of its own"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The parent: its own two allocations only.
    let parent = assert_figures(&cap, figures(1000, 1, 1300, 2, 1, 1300, 2));
    let pid = parent["pid"].as_u64().unwrap();
    assert!(parent["parent_pid"].is_null());
    let children = parent["children"]
        .as_array()
        .expect("children listed")
        .clone();
    assert_eq!(children.len(), 3, "{parent}");
    // Each child's figures, told apart by what it did.
    let mut seen = Vec::new();
    for c in &children {
        let path = std::path::PathBuf::from(c["capture"].as_str().unwrap());
        let child_pid = c["pid"].as_u64().unwrap();
        assert_eq!(path, work.path(&format!("f.cap.{child_pid}")));
        let json = summary_json(&path);
        assert_eq!(json["complete"], true, "{json}");
        assert_eq!(json["pid"], child_pid);
        assert_eq!(json["parent_pid"], c["parent_pid"]);
        match json["total_bytes"].as_u64().unwrap() {
            2500 => {
                // Child A, forked from the parent; it forked C.
                assert_figures(&path, figures(2000, 1, 2500, 2, 1, 2500, 2));
                assert_eq!(c["parent_pid"], pid);
                seen.push('A');
            }
            4000 => {
                // Grandchild C, forked from A; ended with _exit.
                assert_figures(&path, figures(4000, 1, 4000, 1, 0, 4000, 1));
                assert_eq!(json["end_reason"], "_exit");
                assert_ne!(c["parent_pid"], pid);
                seen.push('C');
            }
            _ => {
                // Child B: forked, then exec'd into the same program.
                assert_eq!(c["parent_pid"], pid);
                let folded = memtrack_ok(|cmd| {
                    cmd.args(["export", "--format", "folded", "--leaks"])
                        .arg(&path);
                });
                let text = String::from_utf8_lossy(&folded.stdout).into_owned();
                let in_exec: u64 = text
                    .lines()
                    .filter(|l| l.contains("exec_alloc"))
                    .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
                    .sum();
                assert_eq!(in_exec, 7000, "{text}");
                assert!(!text.contains("parent_alloc") && !text.contains("child_alloc"));
                seen.push('B');
            }
        }
    }
    seen.sort();
    assert_eq!(seen, ['A', 'B', 'C']);
    let text = memtrack_ok(|c| {
        c.arg("summary").arg(&cap);
    });
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("children:       3 captures"), "{text}");
}

#[test]
fn without_follow_fork_children_run_untracked() {
    let work = Work::new("no_follow_fork");
    let exe = work.compile("forks.c");
    let cap = work.path("f.cap");
    memtrack_ok(|c| {
        c.args(["run", "--no-follow-fork", "-o"])
            .arg(&cap)
            .arg("--")
            .arg(&exe)
            .current_dir(work.dir());
    });
    assert_figures(&cap, figures(1000, 1, 1300, 2, 1, 1300, 2));
    let names: Vec<String> = std::fs::read_dir(work.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("f.cap."))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    assert_eq!(summary_json(&cap)["children"], serde_json::json!([]));
}
