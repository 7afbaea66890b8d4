//! What memtrack reads about a process it attaches to, from `/proc` and the files the process
//! maps: its state, its tracer, its mappings, the symbols of a mapped module, and its memory
//! (`process_vm_readv`/`process_vm_writev`).

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSegment, ObjectSymbol};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    /// The device as `major:minor` numbers.
    pub dev: (u32, u32),
    pub inode: u64,
    pub path: String,
}

impl Mapping {
    pub fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }

    /// The file name of the mapped path ("" for anonymous mappings).
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// A process seen through `/proc/PID`.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub pid: i32,
}

/// What `/proc/PID/stat` says.
pub struct Stat {
    pub state: char,
    /// Field 22, in clock ticks since boot: with the pid, names the process across a reuse.
    pub start_time: u64,
}

impl Target {
    pub fn proc_path(&self, rest: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{rest}", self.pid))
    }

    /// None when the process does not exist (any more).
    pub fn stat(&self) -> Option<Stat> {
        let text = std::fs::read_to_string(self.proc_path("stat")).ok()?;
        // The command name is in parentheses and may hold anything, ')' included.
        let after = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        Some(Stat {
            state: fields.first()?.chars().next()?,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }

    /// `/proc/PID/status` as `(key, value)` pairs.
    pub fn status(&self) -> Result<Vec<(String, String)>> {
        let text = std::fs::read_to_string(self.proc_path("status"))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.to_string(), v.trim().to_string()))
            })
            .collect())
    }

    pub fn comm(&self) -> String {
        std::fs::read_to_string(self.proc_path("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// The parsed `/proc/PID/maps`; the I/O error as it came (`EACCES` without permission).
    pub fn maps(&self) -> std::io::Result<Vec<Mapping>> {
        let text = std::fs::read_to_string(self.proc_path("maps"))?;
        Ok(text.lines().filter_map(parse_maps_line).collect())
    }

    /// A file the process maps, as the process sees it (its root, its mount namespace).
    pub fn file_of(&self, m: &Mapping) -> PathBuf {
        self.proc_path("root").join(m.path.trim_start_matches('/'))
    }

    /// Reads `len` bytes at `addr` in the process.
    pub fn read_mem(&self, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: `local` describes `buf`, which lives and is writable for `len` bytes; the
        // remote range is only read by the kernel, which checks it.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("read {n} of {len} bytes at {addr:#x}"),
            ));
        }
        Ok(buf)
    }

    pub fn read_u32(&self, addr: u64) -> std::io::Result<u32> {
        let b = self.read_mem(addr, 4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a NUL-terminated string of at most `max` bytes.
    pub fn read_cstr(&self, addr: u64, max: usize) -> std::io::Result<String> {
        let mut out = Vec::new();
        let mut at = addr;
        while out.len() < max {
            // Page by page: a string near the end of a mapping must not fail the whole read.
            let to_page_end = 4096 - (at % 4096) as usize;
            let chunk = self.read_mem(at, to_page_end.min(max - out.len()))?;
            if let Some(nul) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..nul]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk);
            at += chunk.len() as u64;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Writes `data` at `addr` in the process (writable memory only).
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        let local = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: `local` describes `data`, which the kernel only reads; the remote range is
        // checked by the kernel.
        let n = unsafe { libc::process_vm_writev(self.pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != data.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("wrote {n} of {} bytes at {addr:#x}", data.len()),
            ));
        }
        Ok(())
    }

    pub fn write_u32(&self, addr: u64, v: u32) -> std::io::Result<()> {
        self.write_mem(addr, &v.to_ne_bytes())
    }
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.to_string();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    Some(Mapping {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms,
        offset,
        dev: (
            u32::from_str_radix(maj, 16).ok()?,
            u32::from_str_radix(min, 16).ok()?,
        ),
        inode,
        path,
    })
}

/// A module (shared object) mapped into the process: where it is loaded and the file it was
/// loaded from.
#[derive(Debug, Clone)]
pub struct Module {
    /// The load bias: symbol values of the file plus this are addresses in the process.
    pub base: u64,
    /// The path the process mapped.
    pub path: String,
    /// Its executable ranges.
    pub text: Vec<(u64, u64)>,
}

impl Module {
    pub fn contains_text(&self, addr: u64) -> bool {
        self.text.iter().any(|&(s, e)| s <= addr && addr < e)
    }
}

/// The module of `maps` whose file name satisfies `is_it`, with its load bias computed from the
/// file (read through the process's root): None when no mapping matches.
pub fn find_module(
    target: &Target,
    maps: &[Mapping],
    is_it: impl Fn(&str) -> bool,
) -> Result<Option<(Module, Elf)>> {
    let Some(first) = maps
        .iter()
        .find(|m| m.offset == 0 && m.inode != 0 && is_it(m.file_name()))
    else {
        return Ok(None);
    };
    let file = target.file_of(first);
    let elf = Elf::read(&file)?;
    // The file must be the one mapped: the same device and inode, or (overlayfs on some
    // kernels shows the lower file's device in maps) the same first page as in memory.
    let same_file = dev_ino(&file).is_ok_and(|d| d == (first.dev, first.inode)) || {
        let n = elf
            .data
            .len()
            .min(4096)
            .min((first.end - first.start) as usize);
        target
            .read_mem(first.start, n)
            .is_ok_and(|mem| mem == elf.data[..n])
    };
    if !same_file {
        bail!(
            "{} is not the file process {} mapped (it was replaced since)",
            file.display(),
            target.pid
        );
    }
    // The mapping at file offset 0 holds the first PT_LOAD segment (page-aligned down).
    let base = first.start.wrapping_sub(elf.first_load & !0xfff);
    let text = maps
        .iter()
        .filter(|m| m.inode == first.inode && m.dev == first.dev && m.executable())
        .map(|m| (m.start, m.end))
        .collect();
    Ok(Some((
        Module {
            base,
            path: first.path.clone(),
            text,
        },
        elf,
    )))
}

/// The dynamic symbols of an ELF file and the facts about it preflight needs.
pub struct Elf {
    data: Vec<u8>,
    pub first_load: u64,
    pub interp: bool,
    pub x86_64: bool,
}

impl Elf {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Elf> {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let (first_load, interp, x86_64) = {
            let obj = object::File::parse(&*data)
                .map_err(|e| anyhow!("{} is not an ELF file: {e}", path.display()))?;
            let first_load = obj.segments().map(|s| s.address()).min().unwrap_or(0);
            let interp = elf_has_interp(&data);
            (
                first_load,
                interp,
                obj.architecture() == object::Architecture::X86_64,
            )
        };
        Ok(Elf {
            data,
            first_load,
            interp,
            x86_64,
        })
    }

    /// The value of the defined dynamic symbol `name` (any version), None when absent.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        let obj = object::File::parse(&*self.data).ok()?;
        obj.dynamic_symbols()
            .chain(obj.symbols())
            .find(|s| s.is_definition() && s.name() == Ok(name))
            .map(|s| s.address())
    }
}

/// Whether the ELF image has a `PT_INTERP` program header.
fn elf_has_interp(data: &[u8]) -> bool {
    use object::read::elf::{FileHeader, ProgramHeader};
    let Ok(hdr) = object::elf::FileHeader64::<object::Endianness>::parse(data) else {
        return false;
    };
    let Ok(endian) = hdr.endian() else {
        return false;
    };
    let Ok(phdrs) = hdr.program_headers(endian, data) else {
        return false;
    };
    phdrs
        .iter()
        .any(|p| p.p_type(endian) == object::elf::PT_INTERP)
}

/// Device and inode of a file, as `/proc/PID/maps` shows them.
pub fn dev_ino(path: &Path) -> std::io::Result<((u32, u32), u64)> {
    let m = std::fs::metadata(path)?;
    Ok(((libc::major(m.dev()), libc::minor(m.dev())), m.ino()))
}

/// Is this file name glibc's C library?
pub fn is_glibc(name: &str) -> bool {
    name == "libc.so.6" || (name.starts_with("libc-2.") && name.ends_with(".so"))
}

/// Is this file name the dynamic loader (glibc's or musl's)?
pub fn is_loader(name: &str) -> bool {
    name.starts_with("ld-linux") || name.starts_with("ld-musl") || name.starts_with("ld-2.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse_with_spaces_in_paths_and_anonymous_ones() {
        let m = parse_maps_line(
            "7f3a1c000000-7f3a1c028000 r-xp 00028000 fd:01 1311234                    /opt/my app/libc.so.6",
        )
        .unwrap();
        assert_eq!((m.start, m.end), (0x7f3a_1c00_0000, 0x7f3a_1c02_8000));
        assert!(m.executable());
        assert_eq!(m.offset, 0x28000);
        assert_eq!(m.dev, (0xfd, 1));
        assert_eq!(m.inode, 1_311_234);
        assert_eq!(m.path, "/opt/my app/libc.so.6");
        assert_eq!(m.file_name(), "libc.so.6");
        let anon = parse_maps_line("7ffd5e1d0000-7ffd5e1f1000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(anon.path, "");
        assert!(!anon.executable());
        assert!(parse_maps_line("garbage").is_none());
    }

    #[test]
    fn glibc_and_loader_names() {
        assert!(is_glibc("libc.so.6"));
        assert!(is_glibc("libc-2.31.so"));
        assert!(!is_glibc("libc.musl-x86_64.so.1"));
        assert!(is_loader("ld-linux-x86-64.so.2"));
        assert!(is_loader("ld-musl-x86_64.so.1"));
        assert!(!is_loader("libdl.so.2"));
    }
}
