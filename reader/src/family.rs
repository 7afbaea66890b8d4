//! The captures of forked children (`memtrack run --follow-fork`): each child records into
//! `<capture>.<pid>` beside its parent's capture, with its parent's pid in its header.

use memtrack_format::Header;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A capture written by a process forked (directly or further down) from a capture's process.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChildCapture {
    pub capture: PathBuf,
    pub pid: u32,
    /// The process it was forked from.
    pub parent_pid: u32,
    pub command: String,
}

/// The children's captures beside `capture` (`<capture>.<pid>`, with a parent pid in their
/// header), in order of pid. Files that are not captures are skipped.
pub fn child_captures(capture: &Path) -> Vec<ChildCapture> {
    let (Some(dir), Some(name)) = (capture.parent(), capture.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<ChildCapture> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = file_name.strip_prefix(&prefix)?.parse().ok()?;
            let path = dir.join(&file_name);
            let header = read_header(&path)?;
            (header.parent_pid != 0 && header.pid == pid).then(|| ChildCapture {
                capture: if capture.parent() == Some(Path::new("")) {
                    PathBuf::from(&file_name)
                } else {
                    path
                },
                pid,
                parent_pid: header.parent_pid,
                command: if header.argv.is_empty() {
                    header.executable.clone()
                } else {
                    header.argv.join(" ")
                },
            })
        })
        .collect();
    out.sort_by_key(|c| c.pid);
    out
}

fn read_header(path: &Path) -> Option<Header> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut head)
        .ok()?;
    Header::decode(&head).ok().map(|(h, _)| h)
}
