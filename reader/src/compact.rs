//! `memtrack compact`: rewrites the fast encoding's chunks (`EVENTS_S`) in the compact rank
//! encoding (`EVENTS_R`), after the run, when CPU is no longer the service's. The transcoder is
//! the writer's own, so the result holds the records a run in the compact encoding would have
//! written; every other record is copied as it is.
//!
//! The new file is written beside the capture and renamed over it (or written to another path),
//! so a failure leaves the capture untouched. A capture still being written (its process has it
//! open) is refused: its later records would be lost.

use crate::capture::ReadError;
use memtrack_format::{expand_fast, next_record, record, Header, Next, Transcoder};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What compacting one capture did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Chunks rewritten in the rank encoding.
    pub chunks: u64,
    /// Chunks kept as they were: already compact, or damaged.
    pub kept_chunks: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Bytes of a torn tail (an unfinished last record) that were not copied: no reader can
    /// use them.
    pub torn_bytes: u64,
}

/// Compacts `path` into `out` (None: in place, and only when it holds a fast chunk). The
/// capture is mapped, not read into memory, and the new file is written as it goes: a capture of
/// many gigabytes takes the memory of one chunk.
pub fn compact_file(path: &Path, out: Option<&Path>) -> Result<Compacted, ReadError> {
    let io = |error: std::io::Error| ReadError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let map = if len == 0 {
        None
    } else {
        // SAFETY: mapped read-only; a capture still being written is refused below before any
        // byte past the header is read, and a writer only ever appends.
        Some(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
    };
    let data: &[u8] = map.as_deref().unwrap_or(&[]);
    let (header, start) =
        Header::decode(data).map_err(|e| ReadError::of_header(path.to_path_buf(), e))?;
    if let Some(pid) = still_written(path, &header) {
        return Err(io(std::io::Error::other(format!(
            "process {pid} is still writing this capture; compact it once the process has exited"
        ))));
    }
    let mut done = Compacted {
        chunks: 0,
        kept_chunks: 0,
        bytes_before: data.len() as u64,
        bytes_after: 0,
        torn_bytes: 0,
    };
    let target = out.unwrap_or(path);
    let tmp = temp_beside(target);
    let out_err = |error: std::io::Error| ReadError::Io {
        path: target.to_path_buf(),
        error,
    };
    let mut w = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(out_err)?,
    );
    let result = (|| -> std::io::Result<()> {
        w.write_all(&data[..start])?;
        done.bytes_after = start as u64;
        let mut transcoder = Transcoder::new();
        let mut chunk = Vec::new();
        let mut off = start;
        loop {
            match next_record(data, off) {
                Next::Record(r) => {
                    let end =
                        r.payload.as_ptr() as usize - data.as_ptr() as usize + r.payload.len();
                    let raw = &data[off..end];
                    chunk.clear();
                    // Every fast chunk, even one the rank encoding makes larger (a few events):
                    // the result is then exactly what a compact run writes, and a capture
                    // holding an `EVENTS_S` chunk is one that was not compacted.
                    let transcoded = r.kind == record::EVENTS_S
                        && expand_fast(r.payload)
                            .and_then(|stream| transcoder.transcode(&stream, 1, &mut chunk))
                            .is_ok();
                    let bytes = if transcoded { &chunk[..] } else { raw };
                    if transcoded {
                        done.chunks += 1;
                    } else if is_events(r.kind) {
                        // Already compact, or damaged (kept for the reader to report).
                        done.kept_chunks += 1;
                    }
                    w.write_all(bytes)?;
                    done.bytes_after += bytes.len() as u64;
                    off = end;
                }
                Next::End => break,
                Next::Torn { offset } => {
                    // A zero fill is no record at all.
                    if data[offset..].iter().any(|&b| b != 0) {
                        done.torn_bytes = (data.len() - offset) as u64;
                    }
                    break;
                }
            }
        }
        if done.chunks == 0 && out.is_none() {
            // Nothing would change: the capture is left untouched.
            return Ok(());
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.set_permissions(file.metadata()?.permissions())?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
    })();
    if done.chunks == 0 && out.is_none() {
        done.bytes_after = done.bytes_before;
    }
    // After a rename there is no temporary file left; otherwise it goes.
    let _ = std::fs::remove_file(&tmp);
    result.map_err(out_err)?;
    Ok(done)
}

fn is_events(kind: u8) -> bool {
    matches!(
        kind,
        record::EVENTS | record::EVENTS_Z | record::EVENTS_T | record::EVENTS_R | record::EVENTS_S
    )
}

fn temp_beside(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".compact-{}.tmp", std::process::id()));
    target.with_file_name(name)
}

/// The process still writing `path`: the capture's own process (or, after an exec, the same
/// pid) with the file open.
fn still_written(path: &Path, header: &Header) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", header.pid)).ok()?;
    fds.flatten()
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .any(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        .then_some(header.pid)
}
