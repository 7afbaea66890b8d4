//! Regions: named spans of a thread's execution (a pipeline step, a request, a start-up phase)
//! whose allocations the reader ranks. A mark is an event of the thread's stream
//! ([`crate::EventKind::RegionBegin`], [`crate::EventKind::RegionEnd`]); a name is written once
//! per capture as a `REGION_NAME` record.

use crate::{put_bytes, put_uvarint, Cursor, FormatError};

/// The payload of a `REGION_NAME` record: the name behind a region id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionNameRecord {
    /// The id marks name (ids start at 1 in the tracker; any u32 is valid).
    pub id: u32,
    /// The name as the program gave it (bytes: C strings need not be UTF-8).
    pub name: Vec<u8>,
}

impl RegionNameRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.name.len() + 8);
        put_uvarint(&mut b, self.id as u64);
        put_bytes(&mut b, &self.name);
        b
    }

    pub fn decode(payload: &[u8]) -> Result<RegionNameRecord, FormatError> {
        let mut c = Cursor::new(payload);
        let id = c.uvarint()?;
        let name = c.len_bytes()?.to_vec();
        Ok(RegionNameRecord {
            id: id.min(u32::MAX as u64) as u32,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{record, ChunkHeader, EventKind};

    #[test]
    fn a_name_round_trips() {
        let r = RegionNameRecord {
            id: 7,
            name: b"search_batch".to_vec(),
        };
        assert_eq!(RegionNameRecord::decode(&r.encode()).unwrap(), r);
        assert!(RegionNameRecord::decode(&[7, 20, b'a']).is_err());
    }

    /// The transcoder keeps the heap events in `EVENTS_R` and moves the marks, with their
    /// sequence numbers and times, to a `REGIONS` record after it.
    #[test]
    fn marks_leave_the_transcoder_as_a_regions_record() {
        let header = ChunkHeader {
            tid: 9,
            base_seq: 100,
            base_time: 5,
        };
        let alloc = EventKind::Alloc {
            kind: crate::AllocKind::Malloc,
            addr: 0x1000,
            size: 48,
            stack: 0,
        };
        let items = [
            (100, 5, EventKind::RegionBegin { region: 3 }),
            (101, 6, alloc),
            (102, 6, EventKind::RegionBegin { region: 4 }),
            (103, 7, EventKind::Free { addr: 0x1000 }),
            (104, 9, EventKind::RegionEnd),
            (105, 9, EventKind::RegionEnd),
        ];
        let (types, marks) = crate::mapped::side_records(&header, &items, record::REGIONS);
        assert_eq!(types, [record::EVENTS_R, record::REGIONS]);
        let want: Vec<_> = items.iter().copied().filter(|e| !e.2.is_heap()).collect();
        assert_eq!(marks, want);
    }
}
