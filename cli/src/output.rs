//! Standard output and output files: report text that never panics on a closed pipe, and the
//! guard that keeps a report from being written over a capture.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Standard output for reports written line by line, in place of std's `println!`, which
/// panics when standard output fails ("failed printing to stdout: Broken pipe" under
/// `| head`). When it cannot write: the reader of a pipe went away, so memtrack stops quietly
/// with exit 0 (as `cat` would have, killed by SIGPIPE, without the status); any other error
/// (a full disk) is one message and exit 2.
pub(crate) struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stdout().lock().write(buf) {
            Err(e) if e.kind() != std::io::ErrorKind::Interrupted => stdout_failed(&e),
            r => r,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match std::io::stdout().lock().flush() {
            Err(e) => stdout_failed(&e),
            r => r,
        }
    }
}

/// Standard output for a report whose verdict is the exit code (`check`): a reader that went
/// away must not turn 1 into 0, so a closed pipe is ignored.
pub(crate) struct ClosedIsFine<W>(pub W);

impl<W: Write> Write for ClosedIsFine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
            r => r,
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r,
        }
    }
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("memtrack: error: cannot write to standard output: {e}");
    std::process::exit(2);
}

/// Whether an error comes from a reader of standard output that went away.
pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    })
}

/// Refuses an `-o` that would destroy data: one of the command's `inputs` (the same file by
/// device and inode, so links and `./` spellings count), any memtrack capture (a process
/// tree's FILE.<pid> included), or a directory. `-` (standard output) and new files pass.
pub(crate) fn check_output(output: Option<&Path>, inputs: &[&PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(out) = output.filter(|o| o.as_os_str() != "-") else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(out) else {
        return Ok(());
    };
    if meta.is_dir() {
        bail!("cannot write {}: it is a directory", out.display());
    }
    for input in inputs {
        if std::fs::metadata(input).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()) {
            bail!(
                "refusing to write the report over {}, the capture it reads; choose another -o",
                out.display()
            );
        }
    }
    let mut head = [0u8; 8];
    // Regular files only: opening a FIFO or `/dev/stdout` to read would block or steal input.
    let is_capture = meta.is_file()
        && std::fs::File::open(out)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok()
        && &head == memtrack_format::MAGIC;
    if is_capture {
        bail!(
            "refusing to write the report over {}: it is a memtrack capture; choose another -o",
            out.display()
        );
    }
    Ok(())
}

/// Writes `bytes` to `output`, or to standard output when it is absent or `-`.
pub(crate) fn write_out(output: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match output.filter(|o| o.as_os_str() != "-") {
        Some(o) => {
            std::fs::write(o, bytes).with_context(|| format!("cannot write {}", o.display()))
        }
        None => Ok(std::io::stdout().lock().write_all(bytes)?),
    }
}
