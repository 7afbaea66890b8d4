//! `memtrack export --format json`: a view's stacks for scripts, each distinct frame written once
//! in a table that stacks refer to by index, so that the output stays in proportion to the
//! capture (deep stacks share most of their frames, so writing them out per stack multiplies the
//! output many times over), and written as it goes rather than built whole.

use crate::symbols::{Frame, Symbolizer};
use crate::views::{View, ViewSites};
use std::collections::HashMap;
use std::io::{self, Write};

/// A view being exported: its frames, each once, and its stacks as indexes into them.
#[derive(Default)]
pub struct JsonExport {
    frames: Vec<Frame>,
    index: HashMap<Frame, u32>,
    stacks: Vec<Stack>,
    /// Labels of the processes of a tree, by their index in `Stack::process`.
    processes: Vec<(u32, String)>,
    /// `--at`, `--between`: the window of time, and when what the view holds was live.
    pub window: Option<(crate::Window, Option<f64>)>,
    /// Mean bytes between samples when the capture is sampled: the figures are estimates.
    pub sample_rate: Option<u64>,
}

struct Stack {
    bytes: u64,
    allocations: u64,
    /// Outermost first.
    frame_ids: Vec<u32>,
    /// Index into `JsonExport::processes`.
    process: Option<u32>,
}

impl JsonExport {
    /// Adds the stacks of `v` (empty ones left out), of the process `process` (its pid and label)
    /// when the view spans a tree.
    pub fn add(&mut self, v: &ViewSites, sym: &mut Symbolizer, process: Option<(u32, String)>) {
        let process = process.map(|p| {
            self.processes.push(p);
            (self.processes.len() - 1) as u32
        });
        for site in v.sites.iter().filter(|s| s.bytes > 0 || s.allocations > 0) {
            let mut frame_ids = Vec::new();
            sym.for_each_frame(&v.stacks, site.stack, |f| {
                let id = match self.index.get(f) {
                    Some(&id) => id,
                    None => {
                        let id = self.frames.len() as u32;
                        self.frames.push(f.clone());
                        self.index.insert(f.clone(), id);
                        id
                    }
                };
                frame_ids.push(id);
            });
            self.stacks.push(Stack {
                bytes: site.bytes,
                allocations: site.allocations,
                frame_ids,
                process,
            });
        }
    }

    /// Writes the export: `{"capture", "view", "bytes", "allocations", "frames": [...],
    /// "stacks": [{"bytes", "allocations", "frame_ids", "pid"?, "process"?}]}`, stacks largest
    /// first, one frame or stack a line. With `inline_frames`, each stack carries its frames in
    /// full (`"frames"`) instead of `frame_ids`, and there is no frame table.
    pub fn write(
        self,
        capture: &str,
        view: View,
        inline_frames: bool,
        mut w: impl Write,
    ) -> io::Result<()> {
        let pid = |s: &Stack| s.process.map(|p| self.processes[p as usize].0);
        let mut order: Vec<usize> = (0..self.stacks.len()).collect();
        order.sort_by(|&a, &b| {
            let (sa, sb) = (&self.stacks[a], &self.stacks[b]);
            sb.bytes.cmp(&sa.bytes).then(pid(sa).cmp(&pid(sb)))
        });
        let bytes: u64 = self.stacks.iter().map(|s| s.bytes).sum();
        let allocations: u64 = self.stacks.iter().map(|s| s.allocations).sum();
        writeln!(
            w,
            "{{\"capture\": {}, \"view\": {}, \"bytes\": {bytes}, \"allocations\": {allocations},",
            json(&capture)?,
            json(&view.name())?
        )?;
        if let Some((window, at)) = &self.window {
            let mut v = serde_json::to_value(window).map_err(io::Error::other)?;
            if let Some(at) = at {
                v["at_seconds"] = (*at).into();
            }
            writeln!(w, "\"window\": {v},")?;
        }
        if let Some(rate) = self.sample_rate {
            writeln!(
                w,
                "\"sampled\": true, \"sample_rate_bytes\": {rate}, \"note\": {},",
                json(&"bytes and allocations are estimates from a sample of the allocations")?
            )?;
        }
        if !inline_frames {
            w.write_all(b"\"frames\": [")?;
            for (i, f) in self.frames.iter().enumerate() {
                let sep = if i == 0 { "\n" } else { ",\n" };
                write!(w, "{sep}{}", json(f)?)?;
            }
            w.write_all(b"\n],\n")?;
        }
        w.write_all(b"\"stacks\": [")?;
        let mut ids = String::new();
        for (i, &k) in order.iter().enumerate() {
            let s = &self.stacks[k];
            let sep = if i == 0 { "\n" } else { ",\n" };
            write!(
                w,
                "{sep}{{\"bytes\": {}, \"allocations\": {}, ",
                s.bytes, s.allocations
            )?;
            if inline_frames {
                w.write_all(b"\"frames\": [")?;
                for (j, &id) in s.frame_ids.iter().enumerate() {
                    let sep = if j == 0 { "" } else { ", " };
                    write!(w, "{sep}{}", json(&self.frames[id as usize])?)?;
                }
                w.write_all(b"]")?;
            } else {
                ids.clear();
                for (j, id) in s.frame_ids.iter().enumerate() {
                    if j > 0 {
                        ids.push(',');
                    }
                    ids.push_str(&id.to_string());
                }
                write!(w, "\"frame_ids\": [{ids}]")?;
            }
            if let Some(p) = s.process {
                let (pid, label) = &self.processes[p as usize];
                write!(w, ", \"pid\": {pid}, \"process\": {}", json(label)?)?;
            }
            w.write_all(b"}")?;
        }
        w.write_all(b"\n]}\n")?;
        w.flush()
    }
}

/// One JSON value, compact.
fn json(v: &impl serde::Serialize) -> io::Result<String> {
    serde_json::to_string(v).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts parse and give each stack the same frames; the table holds each frame once.
    #[test]
    fn frame_table_and_inline_frames_agree() {
        let export = || JsonExport {
            frames: vec![Frame::native("main"), Frame::native("leaf")],
            stacks: vec![
                Stack {
                    bytes: 5,
                    allocations: 1,
                    frame_ids: vec![0, 1],
                    process: None,
                },
                Stack {
                    bytes: 7,
                    allocations: 2,
                    frame_ids: vec![0],
                    process: Some(0),
                },
            ],
            processes: vec![(42, "app [pid 42]".into())],
            ..Default::default()
        };
        let parse = |inline: bool| -> serde_json::Value {
            let mut out = Vec::new();
            export()
                .write("a \"b\".cap", View::Leaks, inline, &mut out)
                .unwrap();
            serde_json::from_slice(&out).unwrap()
        };
        let v = parse(false);
        assert_eq!(v["capture"], "a \"b\".cap");
        assert_eq!(v["view"], "leaks");
        assert_eq!(
            (v["bytes"].as_u64(), v["allocations"].as_u64()),
            (Some(12), Some(3))
        );
        assert_eq!(v["frames"][1]["function"], "leaf");
        assert_eq!(v["stacks"][0]["bytes"], 7);
        assert_eq!(v["stacks"][0]["pid"], 42);
        assert_eq!(v["stacks"][0]["process"], "app [pid 42]");
        assert_eq!(v["stacks"][1]["frame_ids"], serde_json::json!([0, 1]));
        assert!(v["stacks"][1].get("pid").is_none());

        let v = parse(true);
        assert!(v.get("frames").is_none());
        let names: Vec<&str> = v["stacks"][1]["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["main", "leaf"]);
    }
}
