//! The capture header: magic, format version and the traced process, once at the start of the
//! file (and again in an `IMAGE` record after `exec`).

use crate::{put_bytes, put_uvarint, Cursor, FormatError};

/// First eight bytes of every capture.
pub const MAGIC: &[u8; 8] = b"MEMTRACK";
/// Format version written by this crate. Readers accept every version up to this one.
pub const FORMAT_VERSION: u16 = 5;
/// Size of the fixed part of the header: magic, version (u16 LE), header body length (u32 LE).
pub const FIXED_HEADER_LEN: usize = 14;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
