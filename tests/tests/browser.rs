//! The flamegraph opens in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs) renders the SVG, its script runs, and the fixture's function names are on the page;
//! the frames that hold the most are on the first screen.

use memtrack_tests::*;
use std::path::Path;
use std::process::Command;

/// Headless, and quiet: no network, updates, sync or first-run pages.
const FLAGS: [&str; 8] = CHROMIUM_FLAGS;

#[test]
fn flamegraph_renders_in_headless_chromium() {
    let Some(browser) = chromium() else {
        return;
    };
    let work = Work::new("browser");
    let exe = work.compile("reports.c");
    let t = run_traced_ok(&work, "reports.cap", &exe, &[] as &[&str]);
    let svg = work.path("fg.svg");
    let out = Command::new(&binaries().memtrack)
        .arg("flamegraph")
        .arg(&t.capture)
        .arg("-o")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("file://{}", svg.display());
    let profile = work.path("profile");
    let flags = FLAGS;
    let dom = Command::new(browser)
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=2000", "--dump-dom"])
        .arg(&url)
        .output()
        .expect("chromium runs");
    let page = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    for name in ["leak_direct", "leaf_alloc", "helper", "peak_site", "main"] {
        assert!(page.contains(name), "{name} is not in the rendered page");
    }
    // inferno's script ran on load: it fills in the details line and the search control.
    assert!(
        page.contains("id=\"details\""),
        "no details element in the rendered page"
    );

    let png = work.path("fg.png");
    let shot = Command::new(browser)
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--window-size=1200,400"])
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .output()
        .expect("chromium runs");
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        bytes.len() > 5000,
        "the screenshot is nearly empty ({} bytes)",
        bytes.len()
    );
}

/// Headless Chromium's verdict on a flamegraph opened in a 1200x800 window (a page about 650 px
/// tall inside it): whether the widest
/// frames (those at least 95% as wide as the widest: the root and the frames that hold nearly
/// everything) lie within the first screen. The page inlines the SVG and measures each frame's
/// box with getBoundingClientRect once laid out; `--dump-dom` prints the verdict it writes.
fn first_screen_verdict(browser: &str, work: &Work, svg: &Path) -> String {
    let text = std::fs::read_to_string(svg).unwrap();
    let start = text.find("<svg").expect("an <svg> element");
    let page = work.path(&format!(
        "{}.html",
        svg.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &page,
        format!(
            r##"<!DOCTYPE html><html><head><style>body {{ margin: 0 }}</style></head><body>
{}
<pre id="verdict">not measured</pre>
<script>
window.addEventListener("load", () => setTimeout(() => {{
  const boxes = Array.from(document.querySelectorAll("#frames > g")).map(g => ({{
    name: g.querySelector("title").textContent.split(" (")[0],
    box: g.querySelector("rect").getBoundingClientRect(),
  }}));
  const most = Math.max(...boxes.map(b => b.box.width));
  const widest = boxes.filter(b => b.box.width >= 0.95 * most);
  const hidden = widest.filter(b => b.box.top < 0 || b.box.bottom > window.innerHeight);
  document.getElementById("verdict").textContent = (hidden.length === 0
    ? "visible: " + widest.map(b => b.name).join("|")
    : "hidden: " + hidden.map(b => b.name + "@" + Math.round(b.box.top)).join("|"))
    + " in " + window.innerHeight + "px";
}}, 0));
</script></body></html>
"##,
            &text[start..]
        ),
    )
    .unwrap();
    let profile = work.path("profile-screen");
    let dom = Command::new(browser)
        .args(FLAGS)
        .args([
            "--window-size=1200,800",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let out = String::from_utf8_lossy(&dom.stdout);
    let at = out
        .find("<pre id=\"verdict\">")
        .expect("the verdict element in the page")
        + "<pre id=\"verdict\">".len();
    out[at..out[at..].find("</pre>").unwrap() + at].to_string()
}

/// A flamegraph opens on the answer: in a graph 150 frames deep (a thin tower beside the frame
/// that holds 98% of the bytes) the root and that frame are on the first screen, without
/// scrolling. The same measure of `--flame` (root at the bottom, 2,500 px down) finds them
/// hidden, which shows that it can fail.
#[test]
fn flamegraph_opens_on_its_widest_frames() {
    let Some(browser) = chromium() else {
        return;
    };
    let work = Work::new("browser_screen");
    let exe = work.compile("flame_shape.c");
    let t = run_traced_ok(&work, "shape.cap", &exe, &["150"]);
    let draw = |name: &str, extra: &[&str]| {
        let svg = work.path(name);
        memtrack_ok(|c| {
            c.arg("flamegraph")
                .arg(&t.capture)
                .args(extra)
                .arg("-o")
                .arg(&svg);
        });
        svg
    };
    let icicle = draw("icicle.svg", &[]);
    let height: u32 = {
        let text = std::fs::read_to_string(&icicle).unwrap();
        let at = text.find("height=\"").unwrap() + "height=\"".len();
        text[at..at + text[at..].find('"').unwrap()]
            .parse()
            .unwrap()
    };
    assert!(
        height > 2400,
        "the graph is {height} px tall, not 150 frames deep"
    );
    let verdict = first_screen_verdict(browser, &work, &icicle);
    assert!(verdict.starts_with("visible: "), "{verdict}");
    for name in ["all", "main", "big_cache"] {
        assert!(
            verdict.split([' ', '|']).any(|n| n == name),
            "{name} is not among the widest frames: {verdict}"
        );
    }
    // The window is shorter than the page: what is visible was not so by a window's size.
    let window: u32 = verdict
        .rsplit(' ')
        .next()
        .and_then(|w| w.strip_suffix("px"))
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no window height in {verdict}"));
    assert!(window < height / 2, "{verdict}");

    let flame = draw("flame.svg", &["--flame"]);
    let verdict = first_screen_verdict(browser, &work, &flame);
    assert!(verdict.starts_with("hidden: "), "{verdict}");
    assert!(verdict.contains("big_cache@"), "{verdict}");
}
