//! The payloads of the records that are not events: `MODULES`, `END` and `DROPPED`.

use crate::{put_bytes, put_uvarint, record, Cursor, FormatError};

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
    /// A recording started in a running process was stopped (`memtrack detach`, the end of
    /// `--duration`, `memtrack_stop`); the process went on unrecorded.
    Detached = 4,
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
            4 => EndReason::Detached,
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
