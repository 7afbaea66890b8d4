//! Golden files of the reports, made from the kept captures with symbolization off
//! (`MEMTRACK_SYMBOLIZE=0`: frames as module+offset), so they are the same on every machine.
//! Regenerate with `MEMTRACK_BLESS=1 cargo test --release -p memtrack-tests --test golden`.

use memtrack_tests::*;
use std::path::Path;
use std::process::Command;

fn check(name: &str, args: &[&str], output_file: Option<&str>) {
    let root = workspace_root();
    let work = Work::new(&format!("golden_{name}"));
    let mut cmd = Command::new(&binaries().memtrack);
    cmd.args(args)
        .env("MEMTRACK_SYMBOLIZE", "0")
        .current_dir(&root);
    if let Some(f) = output_file {
        cmd.arg("-o").arg(work.path(f));
    }
    let out = cmd.output().expect("memtrack runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let actual = match output_file {
        Some(f) => std::fs::read_to_string(work.path(f)).unwrap(),
        None => String::from_utf8(out.stdout).unwrap(),
    };
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name);
    if std::env::var_os("MEMTRACK_BLESS").is_some() {
        std::fs::write(&golden, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_else(|_| {
        panic!(
            "no golden file {}; run with MEMTRACK_BLESS=1",
            golden.display()
        )
    });
    if expected != actual {
        let got = work.path(name);
        std::fs::write(&got, &actual).unwrap();
        panic!(
            "{name} differs from {} (new output in {}); if the change is intended, run with MEMTRACK_BLESS=1",
            golden.display(),
            got.display()
        );
    }
}

const EVERY: &str = "tests/captures/v2-every-function.cap";
const THREADS: &str = "tests/captures/v2-threads.cap";

#[test]
fn summary_text() {
    check("summary.txt", &["summary", EVERY], None);
}

#[test]
fn table_text() {
    check(
        "table-by-line.txt",
        &["table", THREADS, "--by", "line"],
        None,
    );
}

#[test]
fn tree_text() {
    check(
        "tree-leaks.txt",
        &["tree", THREADS, "--leaks", "--min-percent", "0"],
        None,
    );
}

#[test]
fn stats_text() {
    check("stats.txt", &["stats", EVERY], None);
}

#[test]
fn folded_export() {
    check(
        "allocated.folded",
        &["export", THREADS, "--format", "folded", "--allocated"],
        None,
    );
}

#[test]
fn flamegraph_svg() {
    check(
        "flamegraph-peak.svg",
        &["flamegraph", THREADS],
        Some("fg.svg"),
    );
}

#[test]
fn plot_svg() {
    check("plot.svg", &["plot", THREADS], Some("plot.svg"));
}
