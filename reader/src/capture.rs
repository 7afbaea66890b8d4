//! Opening, indexing and the ordered event stream of a capture.

use crate::stacks::StackTable;
use memmap2::Mmap;
use memtrack_format::chunk::{CompactEvents, Item, Op, StreamEvents};
use memtrack_format::{
    next_record, op, record, AllocKind, ChunkHeader, Cursor, EndRecord, FormatError, Header,
    ModulesRecord, Next,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Errors reading a capture. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a memtrack capture (it does not start with the MEMTRACK magic)")]
    NotACapture { path: PathBuf },
    #[error("{path}: the file is empty or was cut off inside its header; the traced process may not have started")]
    TruncatedHeader { path: PathBuf },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: FormatError },
}

/// Something odd that did not stop the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// The file ends inside a record at this offset: everything before it was read.
    TornTail { offset: u64 },
    /// A record of this type could not be decoded and was skipped.
    BadRecord {
        offset: u64,
        kind: u8,
        error: String,
    },
}

/// An events chunk found in the file.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRef {
    /// Offset of the chunk's ops (after its header) in the file.
    pub ops_offset: usize,
    pub end: usize,
    pub header: ChunkHeader,
    /// The compact encoding (`EVENTS_Z`) rather than the stream encoding (`EVENTS`).
    pub compact: bool,
}

/// An opened capture: the header, the record index, and the mapped bytes.
pub struct Capture {
    path: PathBuf,
    map: Option<Mmap>,
    pub header: Header,
    pub chunks: Vec<ChunkRef>,
    pub modules: Vec<ModulesRecord>,
    pub end: Option<EndRecord>,
    pub warnings: Vec<Warning>,
    /// Number of distinct threads with events.
    pub threads: usize,
    /// The largest time seen in any chunk's header (clock units).
    pub last_chunk_time: u64,
    /// Headers of the program images that followed the first one through `exec`.
    pub images: Vec<Header>,
    /// Sequence numbers at which an `exec` replaced the image: blocks live before are gone.
    pub exec_boundaries: Vec<u64>,
}

/// One event, in global order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    /// Clock units since the capture started (see `Header::clock_unit_ns`).
    pub time: u64,
    pub tid: u32,
    pub kind: EventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Alloc {
        kind: AllocKind,
        addr: u64,
        size: u64,
        stack: u32,
    },
    Free {
        addr: u64,
    },
    /// The old block of a realloc was released; the thread's next event completes the realloc.
    ReallocFree {
        addr: u64,
    },
    ReallocFailed,
}

impl Capture {
    /// Opens and indexes a capture. Fails only when the file cannot be read or is not a capture;
    /// a torn tail is a [`Warning`], not an error.
    pub fn open(path: impl AsRef<Path>) -> Result<Capture, ReadError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| ReadError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // SAFETY: the capture is opened read-only; a writer still appending only adds bytes past
        // what this reader indexes.
        let map = if len == 0 {
            None
        } else {
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        let data: &[u8] = map.as_deref().unwrap_or(&[]);
        let (header, first) = match Header::decode(data) {
            Ok(h) => h,
            Err(FormatError::BadMagic) => return Err(ReadError::NotACapture { path }),
            Err(FormatError::Truncated) => return Err(ReadError::TruncatedHeader { path }),
            Err(source) => return Err(ReadError::Format { path, source }),
        };
        let mut cap = Capture {
            path,
            map: None,
            header,
            chunks: Vec::new(),
            modules: Vec::new(),
            end: None,
            warnings: Vec::new(),
            threads: 0,
            last_chunk_time: 0,
            images: Vec::new(),
            exec_boundaries: Vec::new(),
        };
        cap.index(data, first);
        cap.map = map;
        Ok(cap)
    }

    fn index(&mut self, data: &[u8], mut off: usize) {
        let mut tids = std::collections::HashSet::new();
        loop {
            let r = match next_record(data, off) {
                Next::Record(r) => r,
                Next::End => break,
                Next::Torn { offset } => {
                    self.warnings.push(Warning::TornTail {
                        offset: offset as u64,
                    });
                    break;
                }
            };
            let payload_off = r.payload.as_ptr() as usize - data.as_ptr() as usize;
            off = payload_off + r.payload.len();
            let bad = |e: FormatError| Warning::BadRecord {
                offset: r.offset as u64,
                kind: r.kind,
                error: e.to_string(),
            };
            match r.kind {
                record::EVENTS | record::EVENTS_Z => {
                    let mut c = Cursor::new(r.payload);
                    match ChunkHeader::decode(&mut c) {
                        Ok(h) => {
                            tids.insert(h.tid);
                            self.last_chunk_time = self.last_chunk_time.max(h.base_time);
                            self.chunks.push(ChunkRef {
                                ops_offset: payload_off + c.pos(),
                                end: off,
                                header: h,
                                compact: r.kind == record::EVENTS_Z,
                            });
                            // A later END is only final if no events follow it (exec that failed).
                            self.end = None;
                        }
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::MODULES => match ModulesRecord::decode(r.payload) {
                    Ok(m) => self.modules.push(m),
                    Err(e) => self.warnings.push(bad(e)),
                },
                record::END => match EndRecord::decode(r.payload) {
                    Ok(e) => {
                        if e.reason == memtrack_format::EndReason::Exec {
                            self.exec_boundaries.push(e.seq);
                        }
                        self.end = Some(e);
                    }
                    Err(e) => self.warnings.push(bad(e)),
                },
                record::IMAGE => match Header::decode(r.payload) {
                    Ok((h, _)) => self.images.push(h),
                    Err(e) => self.warnings.push(bad(e)),
                },
                _ => {} // a record type from a newer writer: skipped
            }
        }
        self.threads = tids.len();
        // Stable: chunks of one thread never overlap in sequence numbers.
        self.chunks.sort_by_key(|c| c.header.base_seq);
    }

    /// The header of the image that ran last (the launched program, or what it exec'd into).
    pub fn last_image(&self) -> &Header {
        self.images.last().unwrap_or(&self.header)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn data(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// True when the capture ended with an `END` record and nothing was cut off.
    pub fn complete(&self) -> bool {
        self.end.is_some()
            && !self
                .warnings
                .iter()
                .any(|w| matches!(w, Warning::TornTail { .. }))
    }

    /// Converts a time in clock units to seconds since the start.
    pub fn seconds(&self, time: u64) -> f64 {
        time as f64 * self.header.clock_unit_ns as f64 / 1e9
    }

    /// The merged, ordered event stream. Stack nodes met on the way are added to `stacks`.
    pub fn events<'a>(&'a self, stacks: &'a mut StackTable) -> Events<'a> {
        Events {
            data: self.data(),
            chunks: &self.chunks,
            next_chunk: 0,
            heap: BinaryHeap::new(),
            cursors: Vec::new(),
            free_slots: Vec::new(),
            stacks,
            errors: 0,
        }
    }
}

/// Stack node ids are dense; one past this is damage (it would make the table absurdly big).
const MAX_STACK_ID: u64 = 1 << 27;

enum Decoder<'a> {
    Stream(StreamEvents<'a>),
    Compact(Box<CompactEvents>),
    /// A chunk that could not be opened (damaged): no events.
    Broken,
}

/// Decoding state of one chunk.
struct ChunkCursor<'a> {
    dec: Decoder<'a>,
    tid: u32,
    pending: Option<Event>,
}

impl<'a> ChunkCursor<'a> {
    fn new(data: &'a [u8], ch: &ChunkRef) -> Self {
        let ops = &data[ch.ops_offset..ch.end];
        let dec = if ch.compact {
            match CompactEvents::new(ops, &ch.header) {
                Ok(z) => Decoder::Compact(Box::new(z)),
                Err(_) => Decoder::Broken,
            }
        } else {
            Decoder::Stream(StreamEvents::new(ops, &ch.header))
        };
        ChunkCursor {
            dec,
            tid: ch.header.tid,
            pending: None,
        }
    }

    /// Decodes up to the next event; stack nodes on the way go to `stacks`.
    #[inline]
    fn advance(&mut self, stacks: &mut StackTable) -> Result<Option<Event>, FormatError> {
        loop {
            let item = match &mut self.dec {
                Decoder::Stream(s) => s.next_item()?,
                Decoder::Compact(z) => z.next_item()?,
                Decoder::Broken => return Err(FormatError::Compression),
            };
            let Some(item) = item else { return Ok(None) };
            let (seq, time, op) = match item {
                Item::Node { id, parent, ip } => {
                    if id > MAX_STACK_ID || parent >= id {
                        return Err(FormatError::BadOp(op::STACK_NODE));
                    }
                    stacks.insert(id as u32, parent as u32, ip);
                    continue;
                }
                Item::Event { seq, time, op } => (seq, time, op),
            };
            let kind = match op {
                Op::Alloc {
                    kind,
                    addr,
                    size,
                    stack,
                } => EventKind::Alloc {
                    kind,
                    addr,
                    size,
                    stack: stack as u32,
                },
                Op::Free { addr } => EventKind::Free { addr },
                Op::ReallocFree { addr } => EventKind::ReallocFree { addr },
                Op::ReallocFailed => EventKind::ReallocFailed,
            };
            return Ok(Some(Event {
                seq,
                time,
                tid: self.tid,
                kind,
            }));
        }
    }
}

/// Iterator over all events in global sequence order (a k-way merge of the chunks).
pub struct Events<'a> {
    data: &'a [u8],
    chunks: &'a [ChunkRef],
    next_chunk: usize,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    cursors: Vec<ChunkCursor<'a>>,
    free_slots: Vec<usize>,
    stacks: &'a mut StackTable,
    /// Chunks whose decoding failed part-way (their remaining events are skipped).
    pub errors: usize,
}

impl Events<'_> {
    fn load(&mut self, slot: usize) {
        match self.cursors[slot].advance(self.stacks) {
            Ok(Some(ev)) => {
                self.cursors[slot].pending = Some(ev);
                self.heap.push(Reverse((ev.seq, slot)));
            }
            Ok(None) => self.free_slots.push(slot),
            Err(_) => {
                self.errors += 1;
                self.free_slots.push(slot);
            }
        }
    }
}

impl Iterator for Events<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        // Open every chunk that starts before the smallest pending event.
        while let Some(ch) = self.chunks.get(self.next_chunk) {
            if let Some(Reverse((min, _))) = self.heap.peek() {
                if ch.header.base_seq > *min {
                    break;
                }
            }
            self.next_chunk += 1;
            let cur = ChunkCursor::new(self.data, ch);
            let slot = match self.free_slots.pop() {
                Some(s) => {
                    self.cursors[s] = cur;
                    s
                }
                None => {
                    self.cursors.push(cur);
                    self.cursors.len() - 1
                }
            };
            self.load(slot);
        }
        let Reverse((_, slot)) = self.heap.pop()?;
        let ev = self.cursors[slot].pending.take();
        self.load(slot);
        ev
    }
}
