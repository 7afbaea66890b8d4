//! Mapped memory: `mmap`, `munmap` and `mremap` events ([`crate::EventKind::Map`],
//! [`crate::EventKind::Unmap`], [`crate::EventKind::Remap`]) travel in the thread's stream and
//! leave the transcoder as a `MAPPED` record beside the chunk's `EVENTS_R`; the file behind a
//! file-backed mapping is named once per capture by a `MAP_FILE` record.

use crate::{FormatError, RegionNameRecord};

/// The payload of a `MAP_FILE` record: the file behind the `MAP` events that name `id`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFileRecord {
    pub id: u32,
    /// The path as the kernel gave it (`/proc/self/fd/N`; bytes, not necessarily UTF-8).
    pub path: Vec<u8>,
}

impl MapFileRecord {
    pub fn encode(&self) -> Vec<u8> {
        RegionNameRecord {
            id: self.id,
            name: self.path.clone(),
        }
        .encode()
    }

    pub fn decode(payload: &[u8]) -> Result<MapFileRecord, FormatError> {
        let r = RegionNameRecord::decode(payload)?;
        Ok(MapFileRecord {
            id: r.id,
            path: r.name,
        })
    }
}

/// Test help: the records the transcoder makes of `items` (their types), and the events of
/// those of type `side` (a record beside `EVENTS_R`: `REGIONS` or `MAPPED`).
#[cfg(test)]
pub(crate) fn side_records(
    header: &crate::ChunkHeader,
    items: &[(u64, u64, crate::EventKind)],
    side: u8,
) -> (Vec<u8>, Vec<(u64, u64, crate::EventKind)>) {
    use crate::{next_record, ChunkHeader, Cursor, Item, Next, StreamDecoder, StreamEncoder};
    let mut payload = Vec::new();
    let mut enc = StreamEncoder::begin(&mut payload, header);
    for &(seq, time, kind) in items {
        enc.event(&mut payload, seq, time, kind);
    }
    let mut out = Vec::new();
    crate::Transcoder::new()
        .transcode(&payload, 1, &mut out)
        .unwrap();
    let mut pos = 0;
    let mut types = Vec::new();
    let mut events = Vec::new();
    while let Next::Record(r) = next_record(&out, pos) {
        types.push(r.kind);
        if r.kind == side {
            let mut c = Cursor::new(r.payload);
            let h = ChunkHeader::decode(&mut c).unwrap();
            assert_eq!(&h, header);
            let mut d = StreamDecoder::new(c.rest(), &h);
            while let Some(Item::Event { seq, time, kind }) = d.next_item().unwrap() {
                events.push((seq, time, kind));
            }
        }
        pos = r.payload.as_ptr() as usize - out.as_ptr() as usize + r.payload.len();
    }
    (types, events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{record, ChunkHeader, EventKind};

    #[test]
    fn a_file_name_round_trips() {
        let r = MapFileRecord {
            id: 3,
            path: b"/etc/hostname".to_vec(),
        };
        assert_eq!(MapFileRecord::decode(&r.encode()).unwrap(), r);
    }

    /// The transcoder keeps the heap events in `EVENTS_R` and moves the mapped-memory events,
    /// every field intact, to a `MAPPED` record after it.
    #[test]
    fn mapped_events_leave_the_transcoder_as_a_mapped_record() {
        let header = ChunkHeader {
            tid: 4,
            base_seq: 10,
            base_time: 1,
        };
        let alloc = EventKind::Alloc {
            kind: crate::AllocKind::Malloc,
            addr: 0x1000,
            size: 48,
            stack: 0,
        };
        let items = [
            (10, 1, alloc),
            (
                11,
                2,
                EventKind::Map {
                    addr: 0x7f00_0000_0000,
                    size: 1 << 20,
                    stack: 7,
                    file: 2,
                    shared: true,
                },
            ),
            (12, 2, EventKind::RegionBegin { region: 5 }),
            (
                13,
                3,
                EventKind::Remap {
                    old_addr: 0x7f00_0000_0000,
                    old_size: 1 << 20,
                    addr: 0x7e00_0000_0000,
                    size: 3 << 20,
                    stack: 8,
                },
            ),
            (
                14,
                3,
                EventKind::Unmap {
                    addr: 0x7e00_0010_0000,
                    size: 4096,
                },
            ),
            (15, 4, EventKind::Free { addr: 0x1000 }),
        ];
        let (types, mapped) = side_records(&header, &items, record::MAPPED);
        assert_eq!(types, [record::EVENTS_R, record::REGIONS, record::MAPPED]);
        let want: Vec<_> = items.iter().copied().filter(|e| e.2.is_mapped()).collect();
        assert_eq!(mapped, want);
        assert!(want.iter().all(|e| !e.2.is_heap()));
    }
}
