//! Python in a capture: Python frames inside stacks ([`pyframe`]), the code objects they name
//! (`PYCODE` records) and the start of interpreter shutdown (`PYTHON_END`).

use crate::{put_bytes, put_uvarint, Cursor, FormatError};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
