//! `--method gdb`: the same two calls (`dlopen`, `memtrack_start`) made by gdb in batch mode,
//! as heaptrack injects. Weaker than the ptrace method: gdb stops every thread, calls from
//! wherever each one happens to be (no safe point), and materialises the string arguments by
//! calling `malloc` in the process, which can deadlock a thread stopped inside the allocator.

use super::{not_permitted, refuse, ATTACH};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// A C string literal for gdb's expression parser.
fn quoted(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains(['"', '\\', '\n']) {
        bail!("--method gdb cannot pass the path {s} (quote, backslash or newline in it)");
    }
    Ok(format!("\"{s}\""))
}

/// The string gdb printed for `print (char*)...` after `marker`: `$N = 0x... "text"`.
fn printed_string(out: &str, marker: &str) -> String {
    out.split(marker)
        .nth(1)
        .and_then(|rest| rest.lines().find(|l| l.starts_with('$')))
        .and_then(|l| {
            let start = l.find('"')?;
            let end = l.rfind('"')?;
            (end > start).then(|| l[start + 1..end].to_string())
        })
        .unwrap_or_else(|| "no reason given".to_string())
}

/// Loads `lib` into process `pid` and calls `memtrack_start_with(out, ATTACHED, duration_ms,
/// ..how)` through gdb. Returns once the process runs again.
pub fn inject(pid: i32, lib: &Path, out: &Path, duration_ms: u64, how: super::How) -> Result<()> {
    let lib_name = lib
        .file_name()
        .and_then(|n| n.to_str())
        .context("the library has no file name")?;
    let script = format!(
        "set $h = (void *) dlopen({lib}, 258)\n\
         if $h == 0\n\
           echo MEMTRACK_DLOPEN_FAILED\\n\n\
           print (char *) dlerror()\n\
         else\n\
           sharedlibrary {lib_name}\n\
           set $r = (int) memtrack_start_with({out}, {flags}, (unsigned long) {duration_ms}, (unsigned long) {rate}, (unsigned long) {seed}, (unsigned long) {ckpt})\n\
           if $r != 0\n\
             echo MEMTRACK_START_FAILED\\n\n\
             print (char *) memtrack_last_error()\n\
           else\n\
             echo MEMTRACK_STARTED\\n\n\
           end\n\
         end\n\
         detach\n",
        lib = quoted(lib)?,
        out = quoted(out)?,
        flags = how.start_flags(),
        rate = how.sample_rate,
        seed = how.sample_seed_plus_one,
        ckpt = how.checkpoint_interval_ms,
    );
    let dir = std::env::temp_dir().join(format!("memtrack-gdb-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script_path = dir.join("attach.gdb");
    std::fs::write(&script_path, script)?;
    let result = Command::new("gdb")
        .args(["-batch", "-nx", "-n", "-p", &pid.to_string()])
        .args(["-iex", "set auto-solib-add off"])
        .args(["-iex", "set debuginfod enabled off"])
        .args(["-ex", "sharedlibrary libc\\.so"])
        .args(["-ex", "set unwindonsignal on"])
        .arg("-x")
        .arg(&script_path)
        .env_remove("DEBUGINFOD_URLS")
        .stdin(std::process::Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let output = match result {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("--method gdb needs gdb on the PATH; the ptrace method (the default) does not")
        }
        Err(e) => bail!("cannot run gdb: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if text.contains("MEMTRACK_STARTED") {
        return Ok(());
    }
    if text.contains("ptrace: Operation not permitted") {
        return Err(not_permitted(
            ATTACH,
            pid,
            "gdb: ptrace: Operation not permitted",
        ));
    }
    if text.contains("MEMTRACK_DLOPEN_FAILED") {
        let why = printed_string(&text, "MEMTRACK_DLOPEN_FAILED");
        return Err(refuse(
            ATTACH,
            pid,
            format!("the process could not load {}: {why}", lib.display()),
            "check that the library is readable by the process's user at that path",
        ));
    }
    if text.contains("MEMTRACK_START_FAILED") {
        let why = printed_string(&text, "MEMTRACK_START_FAILED");
        return Err(refuse(
            ATTACH,
            pid,
            format!("the library refused to start: {why}"),
            "see the reason; `memtrack detach` stops an earlier recording",
        ));
    }
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!(
        "gdb did not start the recording in process {pid}; its last lines:\n{}",
        tail.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_string_gdb_printed_after_a_marker() {
        let out = "[Thread debugging using libthread_db enabled]\nMEMTRACK_START_FAILED\n$1 = 0x7f12345678 \"the file exists\"\n[Inferior 1 (process 42) detached]\n";
        assert_eq!(
            printed_string(out, "MEMTRACK_START_FAILED"),
            "the file exists"
        );
        assert_eq!(
            printed_string(out, "MEMTRACK_DLOPEN_FAILED"),
            "no reason given"
        );
        assert_eq!(quoted(Path::new("/a b/c.cap")).unwrap(), "\"/a b/c.cap\"");
        assert!(quoted(Path::new("/a\"b")).is_err());
    }
}
