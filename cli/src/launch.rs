//! What `memtrack run` checks before it launches a command: that it exists, and that
//! `LD_PRELOAD` can track it at all.

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
