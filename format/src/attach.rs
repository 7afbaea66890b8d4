//! The `ATTACH` record: the recording began in a process that was already running.

use crate::{put_uvarint, Cursor, FormatError};

/// How a recording of a running process began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachHow {
    /// `memtrack attach PID`: loaded into the process from outside.
    Attach,
    /// `memtrack_start` called by the program itself (`memtrack.Tracker`).
    InProcess,
}

/// The payload of an `ATTACH` record: `how` uvarint (1 attach, 2 in process), then
/// `process_age_ms` uvarint (how long the process had run when recording began; 0 unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachRecord {
    pub how: AttachHow,
    pub process_age_ms: u64,
}

impl AttachRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12);
        put_uvarint(
            &mut b,
            match self.how {
                AttachHow::Attach => 1,
                AttachHow::InProcess => 2,
            },
        );
        put_uvarint(&mut b, self.process_age_ms);
        b
    }

    pub fn decode(payload: &[u8]) -> Result<AttachRecord, FormatError> {
        let mut c = Cursor::new(payload);
        let how = match c.uvarint()? {
            1 => AttachHow::Attach,
            _ => AttachHow::InProcess,
        };
        Ok(AttachRecord {
            how,
            process_age_ms: c.uvarint()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_a_cut_payload() {
        let r = AttachRecord {
            how: AttachHow::Attach,
            process_age_ms: 252_000,
        };
        let p = r.encode();
        assert_eq!(AttachRecord::decode(&p).unwrap(), r);
        assert_eq!(AttachRecord::decode(&p[..1]), Err(FormatError::Truncated));
        let q = AttachRecord {
            how: AttachHow::InProcess,
            process_age_ms: 0,
        };
        assert_eq!(AttachRecord::decode(&q.encode()).unwrap(), q);
    }
}
