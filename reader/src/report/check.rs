//! `memtrack check`: budgets against a capture or a process tree; the verdict is the caller's
//! exit code.

use super::{bytes, count, Reporter, Subject};
use crate::{human_bytes, Budget, RegionBudget};
use anyhow::{bail, Result};
use std::io::Write;
use std::path::Path;

/// Checks `budget` against `subject` (opened from `file`) and writes the report to `out`;
/// returns the exit code (0 held, 1 exceeded).
pub fn check(
    r: &mut Reporter,
    subject: &Subject,
    file: &Path,
    budget: &Budget,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    check_with_regions(r, subject, file, budget, &[], json, out)
}

/// [`check`], with limits on regions' figures too (`--region NAME --max-peak ...`), checked
/// against the subject's main capture (the launched process, or the `--pid` one). A region
/// the capture does not have is an error.
pub fn check_with_regions(
    r: &mut Reporter,
    subject: &Subject,
    file: &Path,
    budget: &Budget,
    regions: &[RegionBudget],
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    let cap = subject.main_capture();
    if let Some(w) = subject.window {
        if subject.one().is_none() {
            bail!("check with --at or --between on a process tree: give --pid PID (a window's limits apply to one process)");
        }
        if !regions.is_empty() {
            bail!("--region limits and a time window (--at, --between) do not combine");
        }
        if w.is_at()
            && (budget.max_leaked.is_some()
                || budget.max_leaked_allocations.is_some()
                || budget.max_allocations.is_some()
                || budget.max_total.is_some())
        {
            bail!("--at is one moment: only --max-peak (what was live then) applies; for totals and leaks use --between A B");
        }
    }
    // Without --pid, a region's limits apply to every recorded process that marked it (a
    // pre-fork server's workers); with one process, to that process.
    let marked: Vec<(&crate::Process, &crate::Capture)> = match subject.one() {
        Some(p) => vec![(p, cap)],
        None => subject
            .tree
            .processes
            .iter()
            .filter_map(|p| p.capture.as_ref().map(|c| (p, c)))
            .collect(),
    };
    for b in regions {
        if !marked.iter().any(|(_, c)| c.check_region(&b.name).is_ok()) {
            cap.check_region(&b.name).map_err(anyhow::Error::msg)?;
        }
    }
    let progress = r.reading(cap, json);
    let (mut results, complete) = match subject.one() {
        Some(_) => {
            let mut sym = r.symbolizer(cap);
            let results = match subject.span() {
                Some(span) => cap.check_window(budget, &span, &mut sym),
                None => cap.check(budget, &mut sym),
            };
            r.warn(&sym.warnings);
            (results, cap.complete())
        }
        None => (
            subject.tree.check(budget, |c| r.symbolizer(c)),
            subject.tree.processes.iter().all(|p| p.summary.complete),
        ),
    };
    // Per process (one replay and one symbolizer each, for all its regions' limits), then one
    // result per limit: peaks are the largest of any process (each has its own heap), totals
    // add up; the stacks are the largest contributor's.
    let mut merged: Vec<Vec<(crate::LimitResult, Vec<crate::ProcessShare>)>> =
        vec![Vec::new(); regions.len()];
    for (p, c) in &marked {
        let here: Vec<usize> = (0..regions.len())
            .filter(|&i| c.check_region(&regions[i].name).is_ok())
            .collect();
        if here.is_empty() {
            continue;
        }
        let budgets: Vec<RegionBudget> = here.iter().map(|&i| regions[i].clone()).collect();
        let mut sym = r.symbolizer(c);
        let mut got = c
            .check_regions(&budgets, &mut sym)
            .map_err(anyhow::Error::msg)?
            .into_iter();
        r.warn(&sym.warnings);
        for &i in &here {
            // check_regions gives one result per limit set, budget after budget.
            let b = &regions[i];
            let n = [b.max_peak, b.max_leaked, b.max_allocations, b.max_total]
                .iter()
                .filter(|l| l.is_some())
                .count();
            let slots = &mut merged[i];
            for (k, g) in got.by_ref().take(n).enumerate() {
                if slots.len() <= k {
                    let mut m = g.clone();
                    m.measured = 0;
                    slots.push((m, Vec::new()));
                }
                let (m, share) = &mut slots[k];
                share.push(crate::ProcessShare {
                    pid: p.pid,
                    command: p.command(),
                    measured: g.measured,
                });
                if share.iter().all(|s| s.measured <= g.measured) {
                    m.top = g.top;
                }
                m.measured = if m.name == "max_peak" {
                    m.measured.max(g.measured)
                } else {
                    m.measured.saturating_add(g.measured)
                };
            }
        }
    }
    for (mut m, mut share) in merged.into_iter().flatten() {
        m.exceeded = m.measured > m.limit;
        if !m.exceeded {
            m.top.clear();
        } else if share.len() > 1 {
            share.sort_by_key(|s| std::cmp::Reverse(s.measured));
            share.truncate(3);
            m.processes = share;
        }
        results.push(m);
    }
    drop(progress);
    let exceeded = results.iter().filter(|r| r.exceeded).count();
    if json {
        let v = serde_json::json!({
            "capture": file.display().to_string(),
            "ok": exceeded == 0,
            "complete": complete,
            "pid": subject.one().map(|p| p.pid),
            "processes": subject.tree.processes.len(),
            "limits": results,
        });
        let mut v = v;
        if let Some(w) = subject.window {
            v["window"] = serde_json::to_value(w)?;
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        match subject.one() {
            Some(p) if subject.is_one_of_many() => writeln!(
                out,
                "memtrack check of {}, process {}",
                file.display(),
                p.label()
            )?,
            Some(_) => match subject.window {
                Some(w) => writeln!(out, "memtrack check of {}, {}", file.display(), w.words())?,
                None => writeln!(out, "memtrack check of {}", file.display())?,
            },
            None => writeln!(
                out,
                "memtrack check of {}: {} processes, {} and the sums of the rest",
                file.display(),
                subject.tree.processes.len(),
                if subject.tree.combined_known {
                    "their combined peak"
                } else {
                    "the sum of their peaks (aggregated: the combined peak is at most that)"
                }
            )?,
        }
        for r in &results {
            let show = |n: u64| {
                if r.unit == "bytes" {
                    bytes(n)
                } else {
                    count(n, "allocation")
                }
            };
            let name = match &r.region {
                Some(region) => format!("[{region}] {}", r.name.replace('_', "-")),
                None => r.name.replace('_', "-"),
            };
            match r.lower_bound {
                Some(lb) => writeln!(
                    out,
                    "  {:<24} ≈ {}{}, at least {} {} limit {}  {}",
                    name,
                    show(r.measured),
                    r.stderr
                        .map(|se| format!(" ± {}", human_bytes(se)))
                        .unwrap_or_default(),
                    show(lb),
                    if r.exceeded { ">" } else { "<=" },
                    show(r.limit),
                    if r.exceeded { "EXCEEDED" } else { "ok" }
                )?,
                None => writeln!(
                    out,
                    "  {:<24} {} {} limit {}  {}",
                    name,
                    show(r.measured),
                    if r.exceeded { ">" } else { "<=" },
                    show(r.limit),
                    if r.exceeded { "EXCEEDED" } else { "ok" }
                )?,
            }
            for p in &r.processes {
                writeln!(
                    out,
                    "      pid {}: {}  {}",
                    p.pid,
                    show(p.measured),
                    p.command
                )?;
            }
            for c in &r.top {
                let frames: Vec<&str> = c.frames.iter().take(10).map(String::as_str).collect();
                writeln!(
                    out,
                    "      {} in {}{}: {}{}",
                    human_bytes(c.bytes),
                    count(c.allocations, "allocation"),
                    c.pid.map(|p| format!(" [pid {p}]")).unwrap_or_default(),
                    frames.join(" <- "),
                    if c.frames.len() > 10 { " <- ..." } else { "" }
                )?;
            }
        }
        if let (Some(rate), true) = (cap.sample_rate(), subject.one().is_some()) {
            writeln!(out, "  note: a sampled capture (one sample per {} allocated on average): figures are estimates; a limit is exceeded only when the lower bound is above it: for peak and leaked bytes the larger of the estimate minus two standard errors and the bytes actually recorded (the truth cannot be less), for counts and totals the recorded figure", human_bytes(rate))?;
            if subject.window.is_some() {
                writeln!(out, "  note: within a time window the figures of a sampled capture are estimates without an error bound: limits are checked against the estimates")?;
            }
        }
        if !complete && super::being_written(cap) {
            writeln!(out, "  note: the capture is still being written (no END record yet); figures cover what was recorded so far")?;
        } else if !complete {
            writeln!(out, "  note: the capture is incomplete (the process was killed or crashed); figures cover what was recorded")?;
        }
        writeln!(
            out,
            "result: {}",
            if exceeded == 0 {
                format!("all {} limits hold", results.len())
            } else {
                format!("{exceeded} of {} limits exceeded", results.len())
            }
        )?;
    }
    Ok(if exceeded == 0 { 0 } else { 1 })
}
