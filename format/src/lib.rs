//! The memtrack capture format, shared by the writer (`memtrack-tracker`) and the reader
//! (`memtrack-reader`).
//!
//! **What**: a capture is a header followed by framed records (`type`, `length`, payload).
//! **Why**: framing lets a reader skip record types it does not know and stop cleanly at a
//! torn tail when the traced process was killed mid-write. **How**: integers are LEB128
//! varints, addresses and times are deltas inside an events chunk, stacks are ids of nodes
//! in a trie. The full layout is in `FORMAT.md` beside this crate.
//!
//! This crate has no dependencies on the hot path beyond plain slices: the tracker encodes
//! into a `Vec<u8>` it already owns.
//!
//! ```
//! use memtrack_format::{put_uvarint, Cursor};
//! let mut buf = Vec::new();
//! put_uvarint(&mut buf, 300);
//! let mut cur = Cursor::new(&buf);
//! assert_eq!(cur.uvarint().unwrap(), 300);
//! ```

mod chunk;
mod event;
pub mod hash;
mod stream;

pub use chunk::{ColumnDecoder, ColumnEncoding, Transcoder};
pub use event::{AllocKind, ChunkHeader, EventKind, Item};
pub use stream::{encode_stream, op, StreamDecoder, StreamEncoder};

/// First eight bytes of every capture.
pub const MAGIC: &[u8; 8] = b"MEMTRACK";
/// Format version written by this crate. Readers accept every version up to this one.
pub const FORMAT_VERSION: u16 = 4;
/// Size of the fixed part of the header: magic, version (u16 LE), header body length (u32 LE).
pub const FIXED_HEADER_LEN: usize = 14;

/// Record types. Records are only ever added; a reader skips types it does not know.
pub mod record {
    /// A chunk of events of one thread: see [`crate::ChunkHeader`] and [`crate::op`].
    pub const EVENTS: u8 = 1;
    /// The set of loaded modules at a point in time: see [`crate::ModulesRecord`].
    pub const MODULES: u8 = 2;
    /// The traced process (or image, before exec) finished its capture: see [`crate::EndRecord`].
    pub const END: u8 = 3;
    /// A new program image after `exec` continues the capture: the payload is a complete
    /// [`crate::Header`] (magic included) of the new image. Its events follow, with sequence
    /// numbers above every earlier one; blocks live before the exec are gone.
    pub const IMAGE: u8 = 4;
    /// A chunk of one thread's events in the compact encoding (columns, zstd): see
    /// [`crate::chunk`]. Written by format version 2.
    pub const EVENTS_Z: u8 = 5;
    /// A chunk of one thread's events in the token encoding (token columns, zstd, raw extra
    /// bits): see [`crate::chunk`]. The writer turns every `EVENTS` chunk into one of these
    /// (format version 3).
    pub const EVENTS_T: u8 = 6;
    /// A Python code object met in a stack: see [`crate::PyCodeRecord`] and [`crate::pyframe`].
    pub const PYCODE: u8 = 7;
    /// A chunk of one thread's events in the rank encoding (`EVENTS_T`'s tokens, with frees
    /// named by their rank among live blocks, three ops to a byte, addresses predicted from block
    /// ends and sizes from the reused block): see [`crate::chunk`]. The writer turns every
    /// `EVENTS` chunk into one of these (format version 4).
    pub const EVENTS_R: u8 = 8;
    /// Short helper processes of the tree whose own captures `memtrack run` removed after the
    /// run, with their figures: see [`crate::DroppedRecord`]. Appended after the launched
    /// process's `END`.
    pub const DROPPED: u8 = 9;
    /// A Python program's own code ended and interpreter shutdown began, at a place in the
    /// event order: see [`crate::PythonEndRecord`].
    pub const PYTHON_END: u8 = 10;
}

/// Python frames inside stacks. A stack's frames may end (leaf side) in Python frames: the
/// frames the interpreter was running, innermost first when read leaf to root. Their "address"
/// has the top bit set (no user-space code address does), the next bit set on a frame that
/// started an evaluation loop of its own (an *entry* frame: the first Python frame of each
/// `_PyEval_EvalFrameDefault` call on the native stack), the id of its code object (a
/// [`PyCodeRecord`]) in bits 32..62, and the index of its last instruction, in code units, in bits
/// 0..32.
pub mod pyframe {
    pub const TAG: u64 = 1 << 63;
    pub const ENTRY: u64 = 1 << 62;

    pub fn encode(code_id: u32, lasti: u32, entry: bool) -> u64 {
        TAG | if entry { ENTRY } else { 0 } | ((code_id as u64 & 0x3fff_ffff) << 32) | lasti as u64
    }

    pub fn is_python(addr: u64) -> bool {
        addr & TAG != 0
    }

    /// (code id, last instruction, entry frame).
    pub fn decode(addr: u64) -> (u32, u32, bool) {
        (
            ((addr >> 32) & 0x3fff_ffff) as u32,
            addr as u32,
            addr & ENTRY != 0,
        )
    }
}

/// A Python code object: what the reader needs to name its frames and find their lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PyCodeRecord {
    pub id: u32,
    pub qualname: String,
    pub filename: String,
    pub first_line: u32,
    /// CPython's location table (`co_linetable`), in the format of `linetable_version`.
    pub linetable: Vec<u8>,
    /// Python's version as major * 100 + minor (311: 3.11's location table format).
    pub linetable_version: u32,
}

/// A process of the tree whose capture was removed after the run as a short helper (a shell
/// wrapper, a version-manager shim's helper): who it was and its figures, so that the tree stays
/// whole and nothing it did goes unmentioned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DroppedProcess {
    pub pid: u32,
    pub parent_pid: u32,
    /// CLOCK_MONOTONIC at its start and at its last event, nanoseconds.
    pub start_mono_ns: u64,
    pub end_mono_ns: u64,
    pub executable: String,
    pub argv: Vec<String>,
    pub peak_bytes: u64,
    pub leaked_bytes: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
}

/// The payload of a `DROPPED` record: a count, then each process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DroppedRecord {
    pub processes: Vec<DroppedProcess>,
}

impl DroppedRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_uvarint(&mut b, self.processes.len() as u64);
        for p in &self.processes {
            for v in [
                p.pid as u64,
                p.parent_pid as u64,
                p.start_mono_ns,
                p.end_mono_ns,
            ] {
                put_uvarint(&mut b, v);
            }
            put_bytes(&mut b, p.executable.as_bytes());
            put_uvarint(&mut b, p.argv.len() as u64);
            for a in &p.argv {
                put_bytes(&mut b, a.as_bytes());
            }
            for v in [
                p.peak_bytes,
                p.leaked_bytes,
                p.total_allocations,
                p.total_bytes,
            ] {
                put_uvarint(&mut b, v);
            }
        }
        b
    }

    pub fn decode(payload: &[u8]) -> Result<DroppedRecord, FormatError> {
        let mut c = Cursor::new(payload);
        let n = c.uvarint()?;
        let mut processes = Vec::new();
        for _ in 0..n {
            let pid = c.uvarint()? as u32;
            let parent_pid = c.uvarint()? as u32;
            let start_mono_ns = c.uvarint()?;
            let end_mono_ns = c.uvarint()?;
            let executable = c.string()?;
            let argc = c.uvarint()?;
            if argc > c.remaining() as u64 {
                return Err(FormatError::Truncated);
            }
            let argv = (0..argc).map(|_| c.string()).collect::<Result<_, _>>()?;
            processes.push(DroppedProcess {
                pid,
                parent_pid,
                start_mono_ns,
                end_mono_ns,
                executable,
                argv,
                peak_bytes: c.uvarint()?,
                leaked_bytes: c.uvarint()?,
                total_allocations: c.uvarint()?,
                total_bytes: c.uvarint()?,
            });
        }
        Ok(DroppedRecord { processes })
    }
}

/// The payload of a `PYTHON_END` record: the moment CPython began shutting down, which the
/// reader takes as the end of the program for `--leaks`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonEndRecord {
    /// A sequence number no event has: events below it happened before, events above it
    /// during shutdown.
    pub seq: u64,
    /// Clock units since start.
    pub time: u64,
    /// How the tracker saw it: [`PythonEndRecord::BY_STACK`] or [`PythonEndRecord::BY_FLAG`].
    pub how: u8,
}

impl PythonEndRecord {
    /// An allocation made inside `Py_FinalizeEx` (before `threading._shutdown`, atexit).
    pub const BY_STACK: u8 = 1;
    /// CPython's finalizing flag, set after the atexit handlers, before modules are freed.
    pub const BY_FLAG: u8 = 2;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_uvarint(&mut b, self.seq);
        put_uvarint(&mut b, self.time);
        put_uvarint(&mut b, self.how as u64);
        b
    }

    pub fn decode(payload: &[u8]) -> Result<PythonEndRecord, FormatError> {
        let mut c = Cursor::new(payload);
        Ok(PythonEndRecord {
            seq: c.uvarint()?,
            time: c.uvarint()?,
            how: c.uvarint()?.min(255) as u8,
        })
    }
}

impl PyCodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_uvarint(&mut b, self.id as u64);
        put_bytes(&mut b, self.qualname.as_bytes());
        put_bytes(&mut b, self.filename.as_bytes());
        put_uvarint(&mut b, self.first_line as u64);
        put_uvarint(&mut b, self.linetable_version as u64);
        put_bytes(&mut b, &self.linetable);
        b
    }

    pub fn decode(payload: &[u8]) -> Result<PyCodeRecord, FormatError> {
        let mut c = Cursor::new(payload);
        Ok(PyCodeRecord {
            id: c.uvarint()? as u32,
            qualname: c.string()?,
            filename: c.string()?,
            first_line: c.uvarint()? as u32,
            linetable_version: c.uvarint()? as u32,
            linetable: c.len_bytes()?.to_vec(),
        })
    }

    /// The source line of the instruction at `lasti` (code units), from the location table;
    /// `None` when the table says the instruction has no line or does not cover it.
    pub fn line_of(&self, lasti: u32) -> Option<u32> {
        if self.linetable_version != 311 && self.linetable_version != 312 {
            return None;
        }
        // CPython 3.11+ (Objects/locations.md): entries of a header byte `1 cccc lll` (code,
        // length - 1 in code units) and the code's operands in 6-bit varints.
        let t = &self.linetable;
        let mut i = 0usize;
        let mut line = self.first_line as i64;
        let mut addr = 0u32;
        let varint = |i: &mut usize| -> Option<u64> {
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let b = *t.get(*i)?;
                *i += 1;
                v |= ((b & 63) as u64) << shift;
                if b & 64 == 0 {
                    return Some(v);
                }
                shift += 6;
                if shift > 60 {
                    return None;
                }
            }
        };
        let svarint = |i: &mut usize| -> Option<i64> {
            let u = varint(i)?;
            Some(if u & 1 != 0 {
                -((u >> 1) as i64)
            } else {
                (u >> 1) as i64
            })
        };
        while i < t.len() {
            let h = t[i];
            i += 1;
            if h & 0x80 == 0 {
                return None;
            }
            let code = (h >> 3) & 15;
            let len = (h & 7) as u32 + 1;
            let mut has_line = true;
            match code {
                15 => has_line = false,
                14 => {
                    line += svarint(&mut i)?;
                    varint(&mut i)?; // end line delta
                    varint(&mut i)?; // start column + 1
                    varint(&mut i)?; // end column + 1
                }
                13 => line += svarint(&mut i)?,
                10..=12 => {
                    line += (code - 10) as i64;
                    i += 2; // start and end columns
                }
                _ => i += 1, // short forms: same line, one byte of columns
            }
            if lasti < addr + len {
                return (has_line && line > 0).then_some(line as u32);
            }
            addr += len;
        }
        None
    }
}

/// Errors from decoding. The reader wraps them with the file name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("unexpected end of data")]
    Truncated,
    #[error("varint longer than 10 bytes")]
    BadVarint,
    #[error("not a memtrack capture (bad magic)")]
    BadMagic,
    #[error("format version {0} is newer than this reader ({FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("invalid UTF-8 in a string field")]
    BadString,
    #[error("unknown op code {0:#04x} in an events chunk")]
    BadOp(u8),
    #[error("a compressed events chunk does not decompress")]
    Compression,
}

// ---------------------------------------------------------------- encoding

/// Where encoded bytes go: a `Vec<u8>`, or the tracker's own buffers.
pub trait ByteSink {
    fn push_byte(&mut self, b: u8);
    fn push_slice(&mut self, s: &[u8]);

    /// Appends `v` as an unsigned LEB128 varint (a sink may do it without a check per byte).
    #[inline]
    fn push_uvarint(&mut self, v: u64) {
        push_uvarint_bytewise(self, v);
    }
}

/// Appends `v` as an unsigned LEB128 varint, a byte at a time through `push_byte`.
#[inline]
pub fn push_uvarint_bytewise<S: ByteSink + ?Sized>(buf: &mut S, mut v: u64) {
    while v >= 0x80 {
        buf.push_byte((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push_byte(v as u8);
}

impl ByteSink for Vec<u8> {
    #[inline]
    fn push_byte(&mut self, b: u8) {
        self.push(b);
    }
    #[inline]
    fn push_slice(&mut self, s: &[u8]) {
        self.extend_from_slice(s);
    }
}

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub fn put_uvarint<S: ByteSink + ?Sized>(buf: &mut S, v: u64) {
    buf.push_uvarint(v);
}

/// Appends `v` zigzag-encoded, so small negative deltas stay small.
#[inline]
pub fn put_ivarint<S: ByteSink + ?Sized>(buf: &mut S, v: i64) {
    put_uvarint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

/// `v` as a wrapping delta, zigzag-encoded: small negative deltas become small numbers.
#[inline]
pub(crate) fn zigzag(v: u64) -> u64 {
    let v = v as i64;
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
#[inline]
pub(crate) fn unzigzag(u: u64) -> u64 {
    (((u >> 1) as i64) ^ -((u & 1) as i64)) as u64
}

/// Appends a length-prefixed byte string.
pub fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_uvarint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

/// Appends a framed record: type byte, payload length varint, payload.
pub fn put_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    buf.push(kind);
    put_uvarint(buf, payload.len() as u64);
    buf.extend_from_slice(payload);
}

/// Reads an unsigned varint from `buf[*pos..end]` (the compact decoder's columns).
#[inline]
pub fn read_uvarint(buf: &[u8], pos: &mut usize, end: usize) -> Result<u64, FormatError> {
    let end = end.min(buf.len());
    if *pos < end {
        let b = buf[*pos];
        if b < 0x80 {
            *pos += 1;
            return Ok(b as u64);
        }
    }
    let mut c = Cursor::new(&buf[(*pos).min(end)..end]);
    let v = c.uvarint_slow()?;
    *pos += c.pos();
    Ok(v)
}

/// Largest encoded size of one record frame prefix (type + length varint).
pub const MAX_FRAME_PREFIX: usize = 11;

/// Frames a record in place: `buf` holds [`MAX_FRAME_PREFIX`] reserved bytes, then the payload.
/// The frame prefix is written just before the payload; returns the offset of the record's first
/// byte (the record is `buf[offset..]`, the same bytes [`put_record`] writes). A writer that
/// reserved the room when it began the payload frames it without moving it.
#[inline]
pub fn frame_in_place(buf: &mut [u8], kind: u8) -> usize {
    let mut prefix = [0u8; MAX_FRAME_PREFIX];
    prefix[0] = kind;
    let mut n = 1;
    let mut v = buf.len().saturating_sub(MAX_FRAME_PREFIX) as u64;
    while v >= 0x80 {
        prefix[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    prefix[n] = v as u8;
    n += 1;
    let start = MAX_FRAME_PREFIX.saturating_sub(n);
    if let Some(room) = buf.get_mut(start..MAX_FRAME_PREFIX) {
        room.copy_from_slice(&prefix[..n]);
    }
    start
}

// ---------------------------------------------------------------- decoding

/// A cursor over encoded bytes. Every read fails with [`FormatError::Truncated`] rather than
/// panicking when the data ends early.
#[derive(Clone, Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }

    #[inline]
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        let b = *self.data.get(self.pos).ok_or(FormatError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub fn uvarint(&mut self) -> Result<u64, FormatError> {
        // Most values fit one byte.
        if let Some(&b) = self.data.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(b as u64);
            }
        }
        self.uvarint_slow()
    }

    #[inline]
    fn uvarint_slow(&mut self) -> Result<u64, FormatError> {
        // Up to 8 bytes (56 bits) from one load: addresses and their deltas take 2 to 6.
        if let Some(b) = self.data.get(self.pos..self.pos + 8) {
            let w = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            if let Some(x) = self.squeeze(w) {
                return Ok(x);
            }
        }
        self.uvarint_bytewise()
    }

    /// A varint from the 8 bytes at the position, `w` (read little-endian), when it ends
    /// among them; the position moves past it.
    #[inline(always)]
    fn squeeze(&mut self, w: u64) -> Option<u64> {
        let stops = !w & 0x8080_8080_8080_8080;
        if stops == 0 {
            return None;
        }
        let bits = stops.trailing_zeros() + 1; // through the last byte's stop bit
        self.pos += (bits / 8) as usize;
        let mut x = w & (u64::MAX >> (64 - bits));
        // Squeeze out the continuation bits: 7-bit groups to 14, 28, then 56 bits.
        x = ((x & 0x7f00_7f00_7f00_7f00) >> 1) | (x & 0x007f_007f_007f_007f);
        x = ((x & 0x3fff_0000_3fff_0000) >> 2) | (x & 0x0000_3fff_0000_3fff);
        x = ((x & 0x0fff_ffff_0000_0000) >> 4) | (x & 0x0000_0000_0fff_ffff);
        Some(x)
    }

    /// `uvarint` with one 8-byte load and no bounds check on the way (a stream's items are read
    /// so while far from its end).
    ///
    /// # Safety
    /// At least 8 bytes from the position are in the data.
    #[inline(always)]
    pub(crate) unsafe fn uvarint_unchecked(&mut self) -> Result<u64, FormatError> {
        debug_assert!(self.remaining() >= 8);
        // SAFETY: the caller's guarantee; an unaligned read of plain bytes.
        let w = u64::from_le(unsafe {
            std::ptr::read_unaligned(self.data.as_ptr().add(self.pos) as *const u64)
        });
        if w & 0x80 == 0 {
            self.pos += 1;
            return Ok(w & 0x7f);
        }
        match self.squeeze(w) {
            Some(x) => Ok(x),
            None => self.uvarint_bytewise(),
        }
    }

    #[cold]
    fn uvarint_bytewise(&mut self) -> Result<u64, FormatError> {
        let mut v: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(FormatError::BadVarint);
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(FormatError::BadVarint);
            }
        }
    }

    #[inline]
    pub fn ivarint(&mut self) -> Result<i64, FormatError> {
        let u = self.uvarint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::Truncated);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn len_bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let n = self.uvarint()?;
        if n > self.remaining() as u64 {
            return Err(FormatError::Truncated);
        }
        self.bytes(n as usize)
    }

    pub fn string(&mut self) -> Result<String, FormatError> {
        // Paths and argv are bytes on Unix; keep them readable rather than failing.
        Ok(String::from_utf8_lossy(self.len_bytes()?).into_owned())
    }
}

// ---------------------------------------------------------------- header

/// The capture header, written once at the start of the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub pid: u32,
    /// Wall-clock time of the start, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// Nanoseconds per time unit of event times (events store times relative to the start).
    pub clock_unit_ns: u64,
    /// CLOCK_MONOTONIC at the start, nanoseconds: times are relative to it. An image started by
    /// `exec` continues the same capture on the same clock.
    pub start_mono_ns: u64,
    pub executable: String,
    pub argv: Vec<String>,
    /// Pointer width in bytes and the machine (ELF `e_machine`), for offline symbolization.
    pub pointer_size: u8,
    pub machine: u16,
    /// The pid of the process this one was forked from, when it was tracked with
    /// `--follow-fork` into a capture of its own (0: none). Added in version 3.
    pub parent_pid: u32,
}

impl Header {
    /// Encodes the whole header, fixed part included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_uvarint(&mut body, self.pid as u64);
        put_uvarint(&mut body, self.start_unix_ns);
        put_uvarint(&mut body, self.clock_unit_ns);
        put_uvarint(&mut body, self.start_mono_ns);
        put_bytes(&mut body, self.executable.as_bytes());
        put_uvarint(&mut body, self.argv.len() as u64);
        for a in &self.argv {
            put_bytes(&mut body, a.as_bytes());
        }
        body.push(self.pointer_size);
        put_uvarint(&mut body, self.machine as u64);
        put_uvarint(&mut body, self.parent_pid as u64);
        let mut out = Vec::with_capacity(FIXED_HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a header; returns it and the offset of the first record.
    pub fn decode(data: &[u8]) -> Result<(Header, usize), FormatError> {
        if data.len() < 8 {
            return Err(if MAGIC.starts_with(data) {
                FormatError::Truncated
            } else {
                FormatError::BadMagic
            });
        }
        if &data[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if data.len() < FIXED_HEADER_LEN {
            return Err(FormatError::Truncated);
        }
        let version = u16::from_le_bytes([data[8], data[9]]);
        if version == 0 || version > FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let len = u32::from_le_bytes([data[10], data[11], data[12], data[13]]) as usize;
        let end = FIXED_HEADER_LEN
            .checked_add(len)
            .filter(|&e| e <= data.len())
            .ok_or(FormatError::Truncated)?;
        let mut c = Cursor::new(&data[FIXED_HEADER_LEN..end]);
        let pid = c.uvarint()? as u32;
        let start_unix_ns = c.uvarint()?;
        let clock_unit_ns = c.uvarint()?.max(1);
        let start_mono_ns = c.uvarint()?;
        let executable = c.string()?;
        let argc = c.uvarint()?;
        let mut argv = Vec::new();
        for _ in 0..argc {
            argv.push(c.string()?);
        }
        let pointer_size = c.u8()?;
        let machine = c.uvarint()? as u16;
        // Added in version 3 (absent before).
        let parent_pid = if c.is_empty() { 0 } else { c.uvarint()? as u32 };
        // Fields added in later versions follow; this reader ignores what it does not know.
        Ok((
            Header {
                version,
                pid,
                start_unix_ns,
                clock_unit_ns,
                start_mono_ns,
                executable,
                argv,
                pointer_size,
                machine,
                parent_pid,
            },
            end,
        ))
    }
}

// ---------------------------------------------------------------- records

/// A framed record as found in the file.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
    /// Offset of the record's first byte in the file.
    pub offset: usize,
}

/// Outcome of reading the next record frame.
#[derive(Debug)]
pub enum Next<'a> {
    Record(RawRecord<'a>),
    /// Clean end of data exactly at a record boundary.
    End,
    /// The data ends inside a record: the tail was torn (process killed mid-write).
    Torn {
        offset: usize,
    },
}

/// Reads the record frame starting at `offset`.
pub fn next_record(data: &[u8], offset: usize) -> Next<'_> {
    if offset >= data.len() {
        return Next::End;
    }
    let mut c = Cursor::new(&data[offset..]);
    let kind = match c.u8() {
        Ok(k) => k,
        Err(_) => return Next::Torn { offset },
    };
    let len = match c.uvarint() {
        Ok(l) => l,
        Err(_) => return Next::Torn { offset },
    };
    if kind == 0 || len > c.remaining() as u64 {
        // A zero type byte is never written: it is the zero fill of a torn or preallocated tail.
        return Next::Torn { offset };
    }
    let start = offset + c.pos();
    Next::Record(RawRecord {
        kind,
        payload: &data[start..start + len as usize],
        offset,
    })
}

/// One loaded module (shared object or executable) as mapped in the traced process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    /// Load bias: runtime address = `base + p_vaddr`.
    pub base: u64,
    /// GNU build-id note, empty when the module has none.
    pub build_id: Vec<u8>,
    pub segments: Vec<Segment>,
}

/// A `PT_LOAD` segment of a module, in the module's own (unrelocated) addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    /// `PF_X` = 1, `PF_W` = 2, `PF_R` = 4.
    pub flags: u32,
}

/// The full set of loaded modules, recorded at start and after every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModulesRecord {
    /// Sequence number at the time of the snapshot; events after it see this set.
    pub seq: u64,
    pub time: u64,
    pub modules: Vec<Module>,
}

impl ModulesRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_uvarint(&mut b, self.seq);
        put_uvarint(&mut b, self.time);
        put_uvarint(&mut b, self.modules.len() as u64);
        for m in &self.modules {
            put_bytes(&mut b, m.path.as_bytes());
            put_uvarint(&mut b, m.base);
            put_bytes(&mut b, &m.build_id);
            put_uvarint(&mut b, m.segments.len() as u64);
            for s in &m.segments {
                put_uvarint(&mut b, s.vaddr);
                put_uvarint(&mut b, s.memsz);
                put_uvarint(&mut b, s.flags as u64);
            }
        }
        b
    }
    pub fn decode(payload: &[u8]) -> Result<ModulesRecord, FormatError> {
        let mut c = Cursor::new(payload);
        let seq = c.uvarint()?;
        let time = c.uvarint()?;
        let n = c.uvarint()?;
        let mut modules = Vec::new();
        for _ in 0..n {
            let path = c.string()?;
            let base = c.uvarint()?;
            let build_id = c.len_bytes()?.to_vec();
            let ns = c.uvarint()?;
            let mut segments = Vec::new();
            for _ in 0..ns {
                segments.push(Segment {
                    vaddr: c.uvarint()?,
                    memsz: c.uvarint()?,
                    flags: c.uvarint()? as u32,
                });
            }
            modules.push(Module {
                path,
                base,
                build_id,
                segments,
            });
        }
        Ok(ModulesRecord { seq, time, modules })
    }
}

/// Why a capture ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    /// `exit`, return from `main`, or the end of a `memtrack_tracker::start` session.
    Exit = 0,
    /// `_exit` / `_Exit`.
    ImmediateExit = 1,
    /// The image is being replaced by `exec`.
    Exec = 2,
    /// `abort` (called by the program, `std::terminate`, a Rust abort): the process is about to
    /// die of SIGABRT.
    Abort = 3,
    Other = 255,
}

/// The last record of a capture that ended cleanly. Fixed width (a 2-byte frame prefix and a
/// 21-byte payload), so an image started by `exec` can find it at the end of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndRecord {
    /// The sequence number following the last event.
    pub seq: u64,
    pub time: u64,
    pub reason: EndReason,
    /// The next unused stack node id: an image started by `exec` numbers its nodes from here.
    pub next_stack_id: u32,
}

/// Encoded size of an `END` record, frame included.
pub const END_RECORD_LEN: usize = 2 + END_PAYLOAD_LEN;
const END_PAYLOAD_LEN: usize = 21;

impl EndRecord {
    /// The whole framed record.
    pub fn encode_framed(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(END_RECORD_LEN);
        b.push(record::END);
        b.push(END_PAYLOAD_LEN as u8);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.time.to_le_bytes());
        b.push(self.reason as u8);
        b.extend_from_slice(&self.next_stack_id.to_le_bytes());
        b
    }
    pub fn decode(payload: &[u8]) -> Result<EndRecord, FormatError> {
        if payload.len() < END_PAYLOAD_LEN {
            return Err(FormatError::Truncated);
        }
        let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().unwrap_or([0; 8]));
        let reason = match payload[16] {
            0 => EndReason::Exit,
            1 => EndReason::ImmediateExit,
            2 => EndReason::Exec,
            3 => EndReason::Abort,
            _ => EndReason::Other,
        };
        let next_stack_id = u32::from_le_bytes(payload[17..21].try_into().unwrap_or([0; 4]));
        Ok(EndRecord {
            seq: u64_at(0),
            time: u64_at(8),
            reason,
            next_stack_id,
        })
    }
    /// The `END` record that closes `file_tail`, if the data ends with one.
    pub fn from_tail(file_tail: &[u8]) -> Option<EndRecord> {
        let n = file_tail.len();
        if n < END_RECORD_LEN {
            return None;
        }
        let rec = &file_tail[n - END_RECORD_LEN..];
        if rec[0] != record::END || rec[1] as usize != END_PAYLOAD_LEN {
            return None;
        }
        EndRecord::decode(&rec[2..]).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_records_round_trip_and_reject_truncation() {
        let rec = DroppedRecord {
            processes: vec![DroppedProcess {
                pid: 42,
                parent_pid: 7,
                start_mono_ns: 1_000,
                end_mono_ns: 5_000_000,
                executable: "/bin/bash".into(),
                argv: vec!["bash".into(), "-c".into(), "true".into()],
                peak_bytes: 123_456,
                leaked_bytes: 789,
                total_allocations: 1_234,
                total_bytes: 567_890,
            }],
        };
        let b = rec.encode();
        assert_eq!(DroppedRecord::decode(&b).unwrap(), rec);
        for cut in 0..b.len() {
            assert!(DroppedRecord::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// Lines of every instruction of a function, as CPython 3.11 reports them (`co_lines()`),
    /// against the decoder of its location table.
    #[test]
    fn python_311_location_table_gives_cpythons_lines() {
        let table = [
            128, 0, 216, 8, 9, 136, 65, 137, 5, 128, 65, 216, 7, 8, 136, 50, 130, 118, 128, 118,
            240, 2, 1, 13, 32, 240, 0, 1, 13, 32, 221, 22, 27, 152, 65, 145, 104, 148, 104, 240, 3,
            1, 13, 32, 241, 0, 1, 13, 32, 244, 0, 1, 13, 32, 136, 1, 224, 15, 16, 136, 8, 216, 14,
            15, 216, 14, 15, 240, 3, 1, 9, 17, 240, 0, 1, 9, 17, 128, 65, 240, 4, 3, 5, 13, 216,
            15, 16, 144, 19, 140, 118, 136, 13, 248, 221, 11, 19, 240, 0, 1, 5, 13, 240, 0, 1, 5,
            13, 240, 0, 1, 5, 13, 216, 8, 12, 136, 4, 240, 3, 1, 5, 13, 248, 248, 248, 224, 11, 15,
            136, 52,
        ];
        let lines = [
            1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 4,
            4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 7, 8, 7, 7, 7, 9, 10, 10, 10, 10, 10, 10, 10, 10, 0, 11,
            11, 11, 11, 11, 11, 11, 11, 11, 12, 12, 11, 0, 0, 0, 13, 13,
        ];
        let code = PyCodeRecord {
            first_line: 1,
            linetable: table.to_vec(),
            linetable_version: 311,
            ..Default::default()
        };
        for (lasti, &want) in lines.iter().enumerate() {
            let got = code.line_of(lasti as u32).unwrap_or(0);
            assert_eq!(got, want, "instruction {lasti}");
        }
        assert_eq!(code.line_of(lines.len() as u32), None);
        let frame = pyframe::encode(77, 123, true);
        assert!(pyframe::is_python(frame) && !pyframe::is_python(0x7fff_ffff_ffff));
        assert_eq!(pyframe::decode(frame), (77, 123, true));
    }

    #[test]
    fn python_end_records_round_trip_and_reject_truncation() {
        let rec = PythonEndRecord {
            seq: 1 << 40,
            time: 12_345_678,
            how: PythonEndRecord::BY_FLAG,
        };
        let b = rec.encode();
        assert_eq!(PythonEndRecord::decode(&b).unwrap(), rec);
        for cut in 0..b.len() {
            assert!(PythonEndRecord::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        let values = [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX];
        let mut buf = Vec::new();
        for v in values {
            put_uvarint(&mut buf, v);
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            put_ivarint(&mut buf, v);
        }
        let mut c = Cursor::new(&buf);
        for v in values {
            assert_eq!(c.uvarint().unwrap(), v);
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            assert_eq!(c.ivarint().unwrap(), v);
        }
        assert!(c.is_empty());
        assert_eq!(c.uvarint(), Err(FormatError::Truncated));
    }

    #[test]
    fn varints_of_every_bit_length_round_trip_with_and_without_lookahead() {
        let mut values = vec![0u64];
        for bits in 1..=64 {
            let top = 1u64 << (bits - 1);
            values.extend([top, top | (top >> 1) | 1, top | (top - 1)]);
        }
        let mut buf = Vec::new();
        for &v in &values {
            put_uvarint(&mut buf, v);
        }
        // Each also alone in a buffer of its own (fewer than 8 bytes to look ahead at).
        let mut c = Cursor::new(&buf);
        for &v in &values {
            assert_eq!(c.uvarint().unwrap(), v);
            let mut one = Vec::new();
            put_uvarint(&mut one, v);
            assert_eq!(Cursor::new(&one).uvarint().unwrap(), v);
        }
        assert!(c.is_empty());
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let buf = [0xffu8; 11];
        assert_eq!(Cursor::new(&buf).uvarint(), Err(FormatError::BadVarint));
    }

    #[test]
    fn header_round_trips_and_rejects_bad_magic_and_versions() {
        let h = Header {
            version: FORMAT_VERSION,
            pid: 42,
            start_unix_ns: 1_700_000_000_000_000_000,
            clock_unit_ns: 1000,
            start_mono_ns: 123,
            executable: "/bin/true".into(),
            argv: vec!["true".into(), "--x".into()],
            pointer_size: 8,
            machine: 62,
            parent_pid: 77,
        };
        let enc = h.encode();
        let (d, end) = Header::decode(&enc).unwrap();
        assert_eq!(d, h);
        assert_eq!(end, enc.len());
        assert_eq!(Header::decode(b"NOTMTRAK....."), Err(FormatError::BadMagic));
        assert_eq!(
            Header::decode(&enc[..enc.len() - 1]),
            Err(FormatError::Truncated)
        );
        let mut newer = enc.clone();
        newer[8] = 99;
        assert_eq!(
            Header::decode(&newer),
            Err(FormatError::UnsupportedVersion(99))
        );
    }

    #[test]
    fn torn_record_is_detected_and_unknown_records_skip() {
        let mut buf = Vec::new();
        put_record(&mut buf, 200, b"future record type");
        put_record(&mut buf, record::END, &[0u8; 21]);
        let full = buf.len();
        put_record(&mut buf, record::EVENTS, &[0u8; 40]);
        buf.truncate(full + 20);
        let Next::Record(r) = next_record(&buf, 0) else {
            panic!()
        };
        assert_eq!((r.kind, r.payload), (200, &b"future record type"[..]));
        let off = r.offset + 2 + r.payload.len();
        let Next::Record(r2) = next_record(&buf, off) else {
            panic!()
        };
        assert_eq!(r2.kind, record::END);
        assert!(matches!(next_record(&buf, full), Next::Torn { offset } if offset == full));
        assert!(matches!(next_record(&buf[..full], full), Next::End));
    }

    #[test]
    fn records_framed_in_place_are_those_put_record_writes() {
        for len in [0usize, 1, 127, 128, 300, 16383, 16384, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut buf = vec![0u8; MAX_FRAME_PREFIX];
            buf.extend_from_slice(&payload);
            let start = frame_in_place(&mut buf, record::EVENTS);
            let mut want = Vec::new();
            put_record(&mut want, record::EVENTS, &payload);
            assert_eq!(&buf[start..], &want[..], "{len}");
        }
    }

    #[test]
    fn modules_and_end_round_trip() {
        let m = ModulesRecord {
            seq: 7,
            time: 9,
            modules: vec![Module {
                path: "/lib/libc.so.6".into(),
                base: 0x7f00_0000_0000,
                build_id: vec![1, 2, 3],
                segments: vec![Segment {
                    vaddr: 0x1000,
                    memsz: 0x2000,
                    flags: 5,
                }],
            }],
        };
        assert_eq!(ModulesRecord::decode(&m.encode()).unwrap(), m);
        let e = EndRecord {
            seq: 5,
            time: 6,
            reason: EndReason::Exec,
            next_stack_id: 77,
        };
        let framed = e.encode_framed();
        assert_eq!(framed.len(), END_RECORD_LEN);
        assert_eq!(EndRecord::decode(&framed[2..]).unwrap(), e);
        let mut file = b"whatever came before".to_vec();
        file.extend_from_slice(&framed);
        assert_eq!(EndRecord::from_tail(&file), Some(e));
        assert_eq!(EndRecord::from_tail(&file[..file.len() - 1]), None);
    }
}
