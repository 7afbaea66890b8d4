//! Resident memory over time: the `RSS` record, a sample of the traced process's resident set
//! size taken by the tracker's writer thread, placed among the events by a sequence number.

use crate::{put_uvarint, ByteSink, Cursor, FormatError};

/// The payload of an `RSS` record: the process's resident memory at a moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssRecord {
    /// The global sequence value when the sample was taken: events with a lower number
    /// happened before it (those at or above it may have happened before or after).
    pub seq: u64,
    /// Clock units since start, like an event's time.
    pub time: u64,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
}

impl RssRecord {
    /// The longest payload: three uvarints.
    pub const MAX_LEN: usize = 30;

    /// Appends the payload to `sink` (the tracker's writer uses a fixed buffer: no allocation).
    pub fn write_to<S: ByteSink + ?Sized>(&self, sink: &mut S) {
        put_uvarint(sink, self.seq);
        put_uvarint(sink, self.time);
        put_uvarint(sink, self.rss_bytes);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::MAX_LEN);
        self.write_to(&mut b);
        b
    }

    pub fn decode(payload: &[u8]) -> Result<RssRecord, FormatError> {
        let mut c = Cursor::new(payload);
        Ok(RssRecord {
            seq: c.uvarint()?,
            time: c.uvarint()?,
            rss_bytes: c.uvarint()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{next_record, put_record, record, Next};

    #[test]
    fn a_sample_round_trips_in_its_frame() {
        let r = RssRecord {
            seq: 1_234_567,
            time: 250_000,
            rss_bytes: 52_428_800,
        };
        let payload = r.encode();
        assert!(payload.len() <= RssRecord::MAX_LEN);
        assert_eq!(RssRecord::decode(&payload).unwrap(), r);
        let max = RssRecord {
            seq: u64::MAX,
            time: u64::MAX,
            rss_bytes: u64::MAX,
        };
        assert_eq!(max.encode().len(), RssRecord::MAX_LEN);
        assert_eq!(RssRecord::decode(&max.encode()).unwrap(), max);

        let mut file = Vec::new();
        put_record(&mut file, record::RSS, &payload);
        let Next::Record(rec) = next_record(&file, 0) else {
            panic!("no record")
        };
        assert_eq!(rec.kind, record::RSS);
        assert_eq!(RssRecord::decode(rec.payload).unwrap(), r);
        // A cut payload is an error, not a guess.
        assert_eq!(
            RssRecord::decode(&payload[..payload.len() - 1]),
            Err(FormatError::Truncated)
        );
    }
}
