//! What `memtrack run` works out before it launches a command: where the preload library is,
//! that the command exists and that `LD_PRELOAD` can track it at all, and whether it runs Python.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The file `program` runs: itself when it has a slash, else the first executable match on
/// `PATH` (as `execvp` searches).
pub fn resolve(program: &Path) -> Result<PathBuf> {
    if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        if !program.exists() {
            bail!("cannot run {}: no such file", program.display());
        }
        return Ok(program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(program);
        if cand
            .metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return Ok(cand);
        }
    }
    bail!(
        "cannot run {}: command not found on PATH",
        program.display()
    )
}

/// Refuses what `LD_PRELOAD` cannot track: a statically linked executable (no dynamic loader
/// to load the library), a set-user-ID or set-group-ID one (the loader ignores `LD_PRELOAD`
/// for it). Scripts and other files are left to the kernel.
pub fn check_trackable(exe: &Path) -> Result<()> {
    let meta = exe
        .metadata()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if meta.is_dir() {
        bail!("cannot run {}: it is a directory", exe.display());
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        bail!("cannot run {}: it is not executable", exe.display());
    }
    if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
        bail!(
            "cannot track {}: it is set-user-ID or set-group-ID, and the dynamic loader ignores LD_PRELOAD for such programs; run a copy without those bits",
            exe.display()
        );
    }
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(exe) {
        let _ = f.take(64 * 1024).read_to_end(&mut head);
    }
    if elf_is_static(&head) == Some(true) {
        bail!(
            "cannot track {}: it is statically linked, so no dynamic loader runs to load memtrack's LD_PRELOAD library",
            exe.display()
        );
    }
    Ok(())
}

/// `Some(true)` for a 64-bit little-endian ELF executable without a program interpreter
/// (`PT_INTERP`); `None` when `head` is not such an ELF file or its headers lie beyond it.
fn elf_is_static(head: &[u8]) -> Option<bool> {
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    const PT_INTERP: u32 = 3;
    let e_type = u16_at(16)?;
    if e_type != ET_EXEC && e_type != ET_DYN {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = u16_at(54)? as usize;
    let phnum = u16_at(56)? as usize;
    if phentsize < 56 {
        return None;
    }
    let mut interp = false;
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            interp = true;
        }
    }
    // Without an interpreter the kernel starts the program itself (static, static PIE, or a
    // shared library run directly): no loader reads LD_PRELOAD.
    Some(!interp)
}

/// Finds `libmemtrack.so`: `MEMTRACK_PRELOAD`, else beside this executable (a cargo build's
/// target/release), else in `../lib/memtrack/` or `../lib/` from it (`install.sh PREFIX`
/// puts them in PREFIX/bin and PREFIX/lib/memtrack).
pub fn find_preload() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MEMTRACK_PRELOAD") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "MEMTRACK_PRELOAD names {}, which is not a file",
                p.display()
            );
        }
        return Ok(std::path::absolute(&p)?);
    }
    let exe = std::env::current_exe().context("cannot locate the memtrack executable")?;
    let (found, tried) = beside_exe(
        &exe,
        &[
            "libmemtrack.so",
            "../lib/memtrack/libmemtrack.so",
            "../lib/libmemtrack.so",
        ],
        |p| p.is_file(),
    );
    if let Some(p) = found {
        return Ok(p);
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "libmemtrack.so (the library memtrack preloads into the command) not found; looked in {}. Install memtrack with `./install.sh [PREFIX]` or `pip install .` from its source tree (both put the two in place), or build it with `cargo build --release` and run target/release/memtrack, or set MEMTRACK_PRELOAD=/path/to/libmemtrack.so",
        tried.join(", ")
    )
}

/// The folder that holds the `memtrack` Python package (region marks), for `PYTHONPATH`: next
/// to the executable (`python/`), where `install.sh` puts it (`../lib/memtrack/python`), or in
/// the source tree of a build (`target/release/memtrack` -> `python/`). None when not found.
pub fn find_python_package() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let (found, _) = beside_exe(
        &exe,
        &["python", "../lib/memtrack/python", "../../python"],
        |p| p.join("memtrack/__init__.py").is_file(),
    );
    std::fs::canonicalize(found?).ok()
}

/// The first of `rel` (paths relative to the executable's folder, then to the folder of the
/// file it links to: `~/bin/memtrack -> the build`) that `found` accepts, and every path tried.
fn beside_exe(
    exe: &Path,
    rel: &[&str],
    found: impl Fn(&Path) -> bool,
) -> (Option<PathBuf>, Vec<PathBuf>) {
    let real = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    let mut tried = Vec::new();
    for e in [exe, &real] {
        let Some(dir) = e.parent() else { continue };
        for r in rel {
            let cand = dir.join(r);
            if found(&cand) {
                return (Some(cand), tried);
            }
            if !tried.contains(&cand) {
                tried.push(cand);
            }
        }
    }
    (None, tried)
}

fn is_python(cmd: &Path) -> bool {
    let name = cmd.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_prefix("python")
        .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// A Python interpreter, or a script run by one (a console script: `#!/usr/bin/python3`,
/// `#!/usr/bin/env python3`).
pub fn runs_python(cmd: &Path) -> bool {
    if is_python(cmd) {
        return true;
    }
    let Ok(exe) = resolve(cmd) else {
        return false;
    };
    let mut head = [0u8; 256];
    let n = std::fs::File::open(exe)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    let Some(line) = head[..n].strip_prefix(b"#!") else {
        return false;
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let words: Vec<&[u8]> = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    let interp = match words.as_slice() {
        [env, prog, ..] if env.ends_with(b"/env") => prog,
        [prog, ..] => prog,
        [] => return false,
    };
    is_python(Path::new(&*String::from_utf8_lossy(interp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_elf_check_reads_interpreters() {
        // This test binary is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_is_static(&me[..64 * 1024]), Some(false));
        assert_eq!(elf_is_static(b"#!/bin/sh\n"), None);
        assert_eq!(elf_is_static(&[]), None);
    }
}
