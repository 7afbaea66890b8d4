//! Opening, indexing and the ordered event stream of a capture.

use crate::stacks::StackTable;
use memmap2::Mmap;
use memtrack_format::{
    op, record, ChunkHeader, ColumnDecoder, ColumnEncoding, Cursor, EndRecord, EventKind,
    FormatError, Header, Item, ModulesRecord, StreamDecoder,
};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Errors reading a capture. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    // Not `source` fields: the message already holds the cause, and a source would repeat it
    // in error chains.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a memtrack capture (it does not start with the MEMTRACK magic)")]
    NotACapture { path: PathBuf },
    #[error("{path}: the file is empty or was cut off inside its header; the traced process may not have started")]
    TruncatedHeader { path: PathBuf },
    #[error("{path}: {error}")]
    Format { path: PathBuf, error: FormatError },
}

impl ReadError {
    /// The error of a header that did not decode: not a capture, cut off inside the header, or
    /// another format error.
    pub(crate) fn of_header(path: PathBuf, error: FormatError) -> ReadError {
        match error {
            FormatError::BadMagic => ReadError::NotACapture { path },
            FormatError::Truncated => ReadError::TruncatedHeader { path },
            error => ReadError::Format { path, error },
        }
    }
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

/// What indexing carries from one stretch of records to the next (see
/// [`Capture::index_records`]).
#[derive(Default)]
pub(crate) struct IndexState {
    /// Threads with events.
    pub(crate) tids: std::collections::HashSet<u32>,
    /// An exec's END, until the new image's header says the exec took place: an exec that
    /// failed is followed by more events of the same image, whose heap is still live.
    exec_end: Option<u64>,
}

/// An events chunk found in the file.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRef {
    /// Offset of the chunk's ops (after its header) in the file.
    pub ops_offset: usize,
    pub end: usize,
    pub header: ChunkHeader,
    /// The column encoding the chunk is in, or `None` for the stream encoding (`EVENTS`).
    pub compact: Option<ColumnEncoding>,
}

/// An opened capture: the header, the record index, and the mapped bytes.
pub struct Capture {
    path: PathBuf,
    map: Option<Mmap>,
    pub header: Header,
    pub chunks: Vec<ChunkRef>,
    pub modules: Vec<ModulesRecord>,
    /// Python code objects met in stacks (`PYCODE` records), by id.
    pub pycode: std::sync::Arc<std::collections::HashMap<u32, memtrack_format::PyCodeRecord>>,
    pub end: Option<EndRecord>,
    pub warnings: Vec<Warning>,
    /// Number of distinct threads with events.
    pub threads: usize,
    /// The largest time seen in any chunk's header (clock units).
    pub last_chunk_time: u64,
    /// For the merge: the smallest file offset among `chunks[i..]`.
    min_offset_from: Vec<usize>,
    /// Chunks opened by the current or last read (for a progress display).
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Headers of the program images that followed the first one through `exec`.
    pub images: Vec<Header>,
    /// Sequence numbers at which an `exec` replaced the image (its END, followed by the new
    /// image's header): blocks live before are gone. An exec that failed is none.
    pub exec_boundaries: Vec<u64>,
    /// Short helper processes of the tree whose captures `memtrack run` removed (`DROPPED`).
    pub dropped: Vec<memtrack_format::DroppedProcess>,
    /// Where a Python program's own code ended and interpreter shutdown began (`PYTHON_END`),
    /// when the last program image was CPython and got that far: `--leaks` is what was live
    /// there.
    pub python_end: Option<memtrack_format::PythonEndRecord>,
    /// Region names by id (`REGION_NAME` records; the first record of an id wins).
    pub region_names: std::collections::HashMap<u32, String>,
    /// Resident memory samples (`RSS` records), in file order (which is sample order).
    pub rss: Vec<memtrack_format::RssRecord>,
    /// The files behind file-backed mappings, by id (`MAP_FILE` records; the first of an id
    /// wins).
    pub map_files: std::collections::HashMap<u32, String>,
    /// How the capture was sampled (`SAMPLING`), None for a capture of every allocation.
    pub sampling: Option<memtrack_format::SamplingRecord>,
    /// The recording began in a process already running (`ATTACH`: `memtrack attach`,
    /// `memtrack.Tracker`): blocks allocated before it are not in the capture.
    pub attached: Option<memtrack_format::AttachRecord>,
    /// The last complete `CHECKPOINT` of an aggregated capture (`memtrack run --aggregate`):
    /// its figures stand for the events it does not hold.
    pub checkpoint: Option<memtrack_format::Checkpoint>,
    /// Every complete `CHECKPOINT` record that decoded, in file order: (payload offset, length).
    /// [`Capture::checkpoints`] reads them one at a time.
    checkpoint_at: Vec<(usize, usize)>,
    /// The final checkpoints of the images before the last one (an aggregated capture that
    /// went through `exec`).
    pub image_checkpoints: Vec<memtrack_format::Checkpoint>,
}

/// The iterator of [`Capture::checkpoints`].
pub struct Checkpoints<'a> {
    cap: &'a Capture,
    next: usize,
    /// Opened when a record lies beyond the mapping (a capture indexed without one).
    file: Option<File>,
}

impl Iterator for Checkpoints<'_> {
    type Item = memtrack_format::Checkpoint;

    fn next(&mut self) -> Option<Self::Item> {
        use std::os::unix::fs::FileExt;
        loop {
            let &(off, len) = self.cap.checkpoint_at.get(self.next)?;
            self.next += 1;
            let data = self.cap.data();
            let decoded = if off.checked_add(len).is_some_and(|e| e <= data.len()) {
                memtrack_format::Checkpoint::decode(&data[off..off + len]).ok()
            } else {
                if self.file.is_none() {
                    self.file = File::open(&self.cap.path).ok();
                }
                let f = self.file.as_ref()?;
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, off as u64)
                    .ok()
                    .and_then(|()| memtrack_format::Checkpoint::decode(&buf).ok())
            };
            if let Some(c) = decoded {
                return Some(c);
            }
        }
    }
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

impl Capture {
    /// Opens and indexes a capture. Fails only when the file cannot be read or is not a capture;
    /// a torn tail is a [`Warning`], not an error.
    pub fn open(path: impl AsRef<Path>) -> Result<Capture, ReadError> {
        let path = path.as_ref().to_path_buf();
        let io = |error| ReadError::Io {
            path: path.clone(),
            error,
        };
        let file = File::open(&path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            // Else mapping it fails with "No such device".
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "this is a directory; give a capture file (a .cap written by `memtrack run`)",
            )));
        }
        let len = meta.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the capture is opened read-only; a writer still appending only adds bytes
            // past what this reader indexes.
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        let data: &[u8] = map.as_deref().unwrap_or(&[]);
        let (header, first) = match Header::decode(data) {
            Ok(h) => h,
            Err(e) => return Err(ReadError::of_header(path, e)),
        };
        let mut cap = Capture::unmapped(path, header);
        cap.index(&file, data.len(), first);
        if let Some(m) = &map {
            let _ = m.advise(memmap2::Advice::Sequential);
        }
        cap.map = map;
        Ok(cap)
    }

    /// A capture of `header` with nothing indexed yet (no mapping: its events are read by
    /// whoever indexes it, see [`crate::Follower`]).
    pub(crate) fn unmapped(path: PathBuf, header: Header) -> Capture {
        Capture {
            path,
            map: None,
            header,
            chunks: Vec::new(),
            modules: Vec::new(),
            pycode: Default::default(),
            end: None,
            warnings: Vec::new(),
            threads: 0,
            last_chunk_time: 0,
            images: Vec::new(),
            exec_boundaries: Vec::new(),
            dropped: Vec::new(),
            python_end: None,
            region_names: Default::default(),
            map_files: Default::default(),
            sampling: None,
            attached: None,
            rss: Vec::new(),
            checkpoint: None,
            checkpoint_at: Vec::new(),
            image_checkpoints: Vec::new(),
            min_offset_from: Vec::new(),
            progress: Default::default(),
        }
    }

    /// Indexes the records with small reads of the file, not through the mapping: touching
    /// the mapping at every chunk would make the kernel map large parts of the file at once.
    fn index(&mut self, file: &File, len: usize, off: usize) {
        let mut state = IndexState::default();
        let (_, torn) = self.index_records(file, len, off, &mut state);
        if let Some(offset) = torn {
            self.warnings.push(Warning::TornTail {
                offset: offset as u64,
            });
        }
        self.threads = state.tids.len();
        // A mark of an image that exec replaced says nothing of the last one's heap.
        if let (Some(p), Some(&b)) = (self.python_end, self.exec_boundaries.last()) {
            if p.seq < b {
                self.python_end = None;
            }
        }
        // Stable: chunks of one thread never overlap in sequence numbers.
        self.chunks.sort_by_key(|c| c.header.base_seq);
        self.min_offset_from = vec![usize::MAX; self.chunks.len()];
        let mut min = usize::MAX;
        for (i, c) in self.chunks.iter().enumerate().rev() {
            min = min.min(c.ops_offset);
            self.min_offset_from[i] = min;
        }
    }

    /// Indexes the complete records of `file` from `off` to `len`: events chunks are appended
    /// to `chunks` (in file order), every other record goes to its field. Returns the offset
    /// after the last complete record, and the offset of a record cut off there (a torn tail,
    /// or one still being written), if any.
    pub(crate) fn index_records(
        &mut self,
        file: &File,
        len: usize,
        mut off: usize,
        state: &mut IndexState,
    ) -> (usize, Option<usize>) {
        use std::os::unix::fs::FileExt;
        let read = |at: usize, n: usize| -> Vec<u8> {
            let mut buf = vec![0u8; n.min(len.saturating_sub(at))];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], (at + got) as u64) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
            buf.truncate(got);
            buf
        };
        let IndexState { tids, exec_end } = state;
        while off < len {
            let head = read(off, 64);
            let Some(&kind) = head.first() else { break };
            let mut c = Cursor::new(&head[1..]);
            let Ok(plen) = c.uvarint() else {
                return (off, Some(off));
            };
            let prefix = 1 + c.pos();
            let payload_off = off + prefix;
            let end = match (payload_off as u64).checked_add(plen) {
                Some(e) if kind != 0 && e <= len as u64 => e as usize,
                _ => {
                    // A zero type byte is never written: it is the zero fill of a torn tail.
                    return (off, Some(off));
                }
            };
            let bad = |e: FormatError| Warning::BadRecord {
                offset: off as u64,
                kind,
                error: e.to_string(),
            };
            match kind {
                record::EVENTS
                | record::EVENTS_Z
                | record::EVENTS_T
                | record::EVENTS_R
                | record::EVENTS_S
                | record::REGIONS
                | record::MAPPED => {
                    let visible =
                        &head[prefix.min(head.len())..(prefix + plen as usize).min(head.len())];
                    let mut c = Cursor::new(visible);
                    match ChunkHeader::decode(&mut c) {
                        Ok(h) => {
                            tids.insert(h.tid);
                            self.last_chunk_time = self.last_chunk_time.max(h.base_time);
                            self.chunks.push(ChunkRef {
                                ops_offset: payload_off + c.pos(),
                                end,
                                header: h,
                                compact: ColumnEncoding::of_record(kind),
                            });
                            // A later END is only final if no events follow it (exec that failed).
                            self.end = None;
                            *exec_end = None;
                        }
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::MODULES | record::END | record::IMAGE => {
                    let payload = read(payload_off, plen as usize);
                    match kind {
                        record::MODULES => match ModulesRecord::decode(&payload) {
                            Ok(m) => self.modules.push(m),
                            Err(e) => self.warnings.push(bad(e)),
                        },
                        record::END => match EndRecord::decode(&payload) {
                            Ok(e) => {
                                if e.reason == memtrack_format::EndReason::Exec {
                                    *exec_end = Some(e.seq);
                                }
                                self.end = Some(e);
                            }
                            Err(e) => self.warnings.push(bad(e)),
                        },
                        _ => match Header::decode(&payload) {
                            Ok((h, _)) => {
                                self.images.push(h);
                                self.exec_boundaries.extend(exec_end.take());
                            }
                            Err(e) => self.warnings.push(bad(e)),
                        },
                    }
                }
                record::PYCODE => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::PyCodeRecord::decode(&payload) {
                        Ok(p) => {
                            // Copied only when a symbolizer still holds the map.
                            std::sync::Arc::make_mut(&mut self.pycode).insert(p.id, p);
                        }
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::PYTHON_END => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::PythonEndRecord::decode(&payload) {
                        Ok(p) => self.python_end = Some(p),
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::REGION_NAME => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::RegionNameRecord::decode(&payload) {
                        Ok(r) => {
                            self.region_names
                                .entry(r.id)
                                .or_insert_with(|| String::from_utf8_lossy(&r.name).into_owned());
                        }
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::MAP_FILE => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::MapFileRecord::decode(&payload) {
                        Ok(r) => {
                            self.map_files
                                .entry(r.id)
                                .or_insert_with(|| String::from_utf8_lossy(&r.path).into_owned());
                        }
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::CHECKPOINT => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::Checkpoint::decode(&payload) {
                        Ok(c) => {
                            // After an image's final checkpoint, the next is the next image's.
                            if let Some(prev) = self.checkpoint.take_if(|p| p.last) {
                                self.image_checkpoints.push(prev);
                            }
                            self.checkpoint = Some(c);
                            self.checkpoint_at.push((payload_off, plen as usize));
                        }
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::RSS => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::RssRecord::decode(&payload) {
                        Ok(r) => self.rss.push(r),
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::ATTACH => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::AttachRecord::decode(&payload) {
                        Ok(r) => {
                            self.attached.get_or_insert(r);
                        }
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::SAMPLING => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::SamplingRecord::decode(&payload) {
                        // The first one holds: every image of a process samples alike.
                        Ok(r) if r.rate_bytes > 1 => {
                            self.sampling.get_or_insert(r);
                        }
                        Ok(_) => {}
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                record::DROPPED => {
                    let payload = read(payload_off, plen as usize);
                    match memtrack_format::DroppedRecord::decode(&payload) {
                        Ok(d) => self.dropped.extend(d.processes),
                        Err(e) => self.warnings.push(bad(e)),
                    }
                }
                _ => {} // a record type from a newer writer: skipped
            }
            off = end;
        }
        (off, None)
    }

    /// Every checkpoint of an aggregated capture, oldest first, decoded one at a time as the
    /// iterator goes (a long run holds many; only one is in memory at once). Only complete
    /// records are indexed, so a capture still being written gives the checkpoints written
    /// so far. A record that cannot be read again is left out (its index-time error is a
    /// warning already).
    pub fn checkpoints(&self) -> Checkpoints<'_> {
        Checkpoints {
            cap: self,
            next: 0,
            file: None,
        }
    }

    /// Mean bytes between samples when the capture is sampled (its heap figures are then
    /// estimates); None when every allocation was recorded.
    pub fn sample_rate(&self) -> Option<u64> {
        self.sampling.map(|s| s.rate_bytes).or_else(|| {
            // An aggregated capture's checkpoint says so too.
            self.checkpoint
                .as_ref()
                .map(|c| c.sample_rate)
                .filter(|&r| r > 0)
        })
    }

    /// True when the capture holds a sample of the allocations.
    pub fn sampled(&self) -> bool {
        self.sample_rate().is_some()
    }

    /// The header of the image that ran last (the launched program, or what it exec'd into).
    /// True for an aggregated capture (checkpoints, no events).
    pub fn aggregated(&self) -> bool {
        self.checkpoint.is_some()
    }

    pub fn last_image(&self) -> &Header {
        self.images.last().unwrap_or(&self.header)
    }

    /// A counter of the chunks read so far by the running read, out of `chunks.len()`. Reads
    /// that pass over the events several times (the peak view of `table`) count each pass.
    pub fn progress(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        self.progress.clone()
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

    /// The sequence number at which `--leaks` looks at the heap: where a Python program's code
    /// ended ([`Capture::python_end`]), else after the last event.
    pub fn leaks_seq(&self) -> u64 {
        self.python_end.map_or(u64::MAX, |p| p.seq)
    }

    /// Converts a time in clock units to seconds since the start.
    pub fn seconds(&self, time: u64) -> f64 {
        time as f64 * self.header.clock_unit_ns as f64 / 1e9
    }

    /// The merged, ordered event stream. Stack nodes met on the way are added to `stacks`.
    pub fn events<'a>(&'a self, stacks: &'a mut StackTable) -> Events<'a> {
        self.progress.store(0, std::sync::atomic::Ordering::Relaxed);
        Events {
            progress: &self.progress,
            data: self.data(),
            map: self.map.as_ref(),
            chunks: &self.chunks,
            min_offset_from: &self.min_offset_from,
            released: 0,
            next_chunk: 0,
            top: None,
            heap: BinaryHeap::new(),
            cursors: Vec::new(),
            free_slots: Vec::new(),
            stacks,
            errors: 0,
            prefetch: Vec::new(),
            recycle: None,
        }
    }
}

/// Where a chunk's stack nodes go as it is decoded.
trait NodeSink {
    fn node(&mut self, id: u32, parent: u32, ip: u64);
}

impl NodeSink for StackTable {
    #[inline]
    fn node(&mut self, id: u32, parent: u32, ip: u64) {
        self.insert(id, parent, ip);
    }
}

impl NodeSink for Vec<(u32, u32, u64)> {
    #[inline]
    fn node(&mut self, id: u32, parent: u32, ip: u64) {
        self.push((id, parent, ip));
    }
}

/// A chunk decoded by a worker thread.
pub(crate) struct Decoded {
    pub(crate) events: Vec<Event>,
    pub(crate) nodes: Vec<(u32, u32, u64)>,
    pub(crate) damaged: bool,
}

/// Decodes the chunk `ch` of `data` (offsets in `ch` are into `data`), into `events`'s storage.
pub(crate) fn decode_chunk(data: &[u8], ch: &ChunkRef, mut events: Vec<Event>) -> Decoded {
    let mut cur = ChunkCursor::new(data, ch);
    // A compact chunk takes about 2 bytes per event: sized once rather than grown by copying.
    let bytes = ch.end.saturating_sub(ch.ops_offset);
    events.clear();
    events.reserve((bytes / 2).min(1 << 20));
    let mut d = Decoded {
        events,
        nodes: Vec::new(),
        damaged: false,
    };
    loop {
        match cur.advance(&mut d.nodes) {
            Ok(Some(ev)) => d.events.push(ev),
            Ok(None) => break,
            Err(_) => {
                d.damaged = true;
                break;
            }
        }
    }
    d
}

/// Decoding threads used by [`Capture::with_events`].
const DECODERS: usize = 2;

impl Capture {
    /// Runs `f` on the events in sequence order (as [`Capture::events`]), with the chunks
    /// decoded ahead by worker threads: decoding is the larger share of the work, so it is
    /// spread over the machine's cores while the merge and `f` run on the calling thread.
    pub fn with_events<R>(
        &self,
        stacks: &mut StackTable,
        f: impl FnOnce(&mut Events<'_>) -> R,
    ) -> R {
        std::thread::scope(|scope| {
            let mut rxs = Vec::with_capacity(DECODERS);
            // Up to this many vectors in flight: 2 queued and 1 being filled per worker, 1 read.
            let (back_tx, back_rx) = crossbeam_channel::bounded::<Vec<Event>>(3 * DECODERS + 1);
            for w in 0..DECODERS {
                let (tx, rx) = crossbeam_channel::bounded::<Decoded>(2);
                rxs.push(rx);
                let data = self.data();
                let chunks = &self.chunks;
                let back_rx = back_rx.clone();
                scope.spawn(move || {
                    for ch in chunks.iter().skip(w).step_by(DECODERS) {
                        let reuse = back_rx.try_recv().unwrap_or_default();
                        // The merge stopped early (dropped its receivers): stop too.
                        if tx.send(decode_chunk(data, ch, reuse)).is_err() {
                            break;
                        }
                    }
                });
            }
            let mut events = self.events(stacks);
            events.prefetch = rxs;
            events.recycle = Some(back_tx);
            f(&mut events)
        })
    }
}

/// Stack node ids are dense; one past this is damage (it would make the table absurdly big).
const MAX_STACK_ID: u64 = 1 << 27;

enum Decoder<'a> {
    Stream(StreamDecoder<'a>),
    Columns(Box<ColumnDecoder>),
    /// Decoded ahead by a worker thread (its nodes already in the table); `true` when the
    /// chunk was damaged after these events.
    Ready {
        events: Vec<Event>,
        next: usize,
        damaged: bool,
    },
    /// A chunk that could not be opened (damaged): no events.
    Broken,
}

/// Decoding state of one chunk.
struct ChunkCursor<'a> {
    dec: Decoder<'a>,
    tid: u32,
    pending: Option<Event>,
    /// Where the chunk lies in the file (usize::MAX once it is done).
    offset: usize,
}

impl<'a> ChunkCursor<'a> {
    fn new(data: &'a [u8], ch: &ChunkRef) -> Self {
        let ops = &data[ch.ops_offset..ch.end];
        let dec = match ch.compact {
            Some(encoding) => match ColumnDecoder::new(ops, &ch.header, encoding) {
                Ok(z) => Decoder::Columns(Box::new(z)),
                Err(_) => Decoder::Broken,
            },
            None => Decoder::Stream(StreamDecoder::new(ops, &ch.header)),
        };
        ChunkCursor {
            dec,
            tid: ch.header.tid,
            pending: None,
            offset: ch.ops_offset,
        }
    }

    /// Decodes up to the next event; stack nodes on the way go to `stacks`.
    #[inline]
    fn advance(&mut self, stacks: &mut impl NodeSink) -> Result<Option<Event>, FormatError> {
        loop {
            let item = match &mut self.dec {
                Decoder::Stream(s) => s.next_item()?,
                Decoder::Columns(z) => z.next_item()?,
                Decoder::Broken => return Err(FormatError::Compression),
                Decoder::Ready {
                    events,
                    next,
                    damaged,
                } => {
                    return match events.get(*next) {
                        Some(&ev) => {
                            *next += 1;
                            Ok(Some(ev))
                        }
                        None if *damaged => Err(FormatError::Compression),
                        None => Ok(None),
                    };
                }
            };
            let Some(item) = item else { return Ok(None) };
            let (seq, time, kind) = match item {
                Item::Node { id, parent, ip } => {
                    if id > MAX_STACK_ID || parent >= id {
                        return Err(FormatError::BadOp(op::STACK_NODE));
                    }
                    stacks.node(id as u32, parent as u32, ip);
                    continue;
                }
                Item::Event { seq, time, kind } => (seq, time, kind),
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

/// Iterator over all events in global sequence order (a k-way merge of the chunks). The chunk
/// holding the smallest pending event is kept out of the heap, so a stretch of events from one
/// chunk (the common case) costs no heap operation. Pages of the mapped file that no chunk still
/// to be read lies in are released as the merge moves on, so memory follows the live set, not
/// the file's size.
pub struct Events<'a> {
    progress: &'a std::sync::atomic::AtomicUsize,
    data: &'a [u8],
    map: Option<&'a Mmap>,
    chunks: &'a [ChunkRef],
    /// `min_offset_from[i]`: the smallest file offset among `chunks[i..]`.
    min_offset_from: &'a [usize],
    released: usize,
    next_chunk: usize,
    /// The cursor with the smallest pending event, if any.
    top: Option<usize>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    cursors: Vec<ChunkCursor<'a>>,
    free_slots: Vec<usize>,
    stacks: &'a mut StackTable,
    /// Chunks whose decoding failed part-way (their remaining events are skipped).
    pub errors: usize,
    /// Chunk `i` decoded ahead arrives on `prefetch[i % len]` (empty: decoded here).
    prefetch: Vec<crossbeam_channel::Receiver<Decoded>>,
    /// Event vectors of finished chunks go back to the decoding workers.
    recycle: Option<crossbeam_channel::Sender<Vec<Event>>>,
}

/// Release mapped pages in steps of at least this much.
const RELEASE_STEP: usize = 32 << 20;

impl Events<'_> {
    /// Decodes the next event of `slot`; false when the chunk is done.
    fn load(&mut self, slot: usize) -> bool {
        let r = self.cursors[slot].advance(self.stacks);
        if !matches!(r, Ok(Some(_))) {
            if let (Some(tx), Decoder::Ready { events, .. }) =
                (&self.recycle, &mut self.cursors[slot].dec)
            {
                let _ = tx.try_send(std::mem::take(events));
            }
        }
        match r {
            Ok(Some(ev)) => {
                self.cursors[slot].pending = Some(ev);
                true
            }
            Ok(None) => {
                self.cursors[slot].offset = usize::MAX;
                self.free_slots.push(slot);
                false
            }
            Err(_) => {
                self.errors += 1;
                self.cursors[slot].offset = usize::MAX;
                self.free_slots.push(slot);
                false
            }
        }
    }

    /// Calls `f` on every event in sequence order until it returns false. Where the open
    /// chunk's remaining events all come before any other chunk's (always, in a one-thread
    /// capture), they are handed to `f` straight from the decoded chunk, without a merge step
    /// per event.
    pub fn for_each_while(&mut self, mut f: impl FnMut(&Event) -> bool) {
        self.for_each_with_stacks(|ev, _| f(ev))
    }

    /// [`Events::for_each_while`], with the stack table as it stands (every node of the
    /// events handed so far defined): a report can symbolize in the middle of the pass.
    pub fn for_each_with_stacks(&mut self, mut f: impl FnMut(&Event, &StackTable) -> bool) {
        loop {
            let Some(ev) = self.next() else { return };
            if !f(&ev, self.stacks) {
                return;
            }
            let Some(slot) = self.top else { continue };
            if !self.heap.is_empty() {
                continue;
            }
            let next_base = self
                .chunks
                .get(self.next_chunk)
                .map_or(u64::MAX, |c| c.header.base_seq);
            let cur = &mut self.cursors[slot];
            let Decoder::Ready { events, next, .. } = &mut cur.dec else {
                continue;
            };
            let Some(first) = cur.pending else { continue };
            let rest = &events[*next..];
            if rest.last().unwrap_or(&first).seq >= next_base {
                continue;
            }
            cur.pending = None;
            if !f(&first, self.stacks) {
                return;
            }
            for e in rest {
                if !f(e, self.stacks) {
                    return;
                }
            }
            *next = events.len();
            // Ends the chunk (counting it if it was damaged) and frees its slot.
            self.load(slot);
            self.top = None;
        }
    }

    fn seq_of(&self, slot: usize) -> u64 {
        self.cursors[slot].pending.map_or(u64::MAX, |e| e.seq)
    }

    /// Makes `slot` (which has a pending event) a candidate: the new top if it is smallest.
    fn offer(&mut self, slot: usize) {
        let seq = self.seq_of(slot);
        match self.top {
            None => self.top = Some(slot),
            Some(t) if seq < self.seq_of(t) => {
                self.heap.push(Reverse((self.seq_of(t), t)));
                self.top = Some(slot);
            }
            Some(_) => self.heap.push(Reverse((seq, slot))),
        }
    }

    /// Drops the mapped pages below every chunk still open or to be opened.
    fn release_pages(&mut self) {
        let Some(map) = self.map else { return };
        let pending = self
            .min_offset_from
            .get(self.next_chunk)
            .copied()
            .unwrap_or(map.len());
        let open = self
            .cursors
            .iter()
            .map(|c| c.offset)
            .min()
            .unwrap_or(usize::MAX);
        let low = pending.min(open).min(map.len()) & !(PAGE - 1);
        if low >= self.released + RELEASE_STEP {
            // SAFETY: the mapping is read-only and private: dropped pages read back from the file
            // if touched again, and no chunk below `low` is read any more.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.released,
                    low - self.released,
                )
            };
            self.released = low;
        }
    }
}

const PAGE: usize = 4096;

impl Iterator for Events<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        // Open every chunk that starts before the smallest pending event.
        let mut opened = false;
        while let Some(ch) = self.chunks.get(self.next_chunk) {
            if let Some(t) = self.top {
                if ch.header.base_seq > self.seq_of(t) {
                    break;
                }
            }
            let index = self.next_chunk;
            self.next_chunk += 1;
            opened = true;
            let cur = match self.prefetch.get(index % self.prefetch.len().max(1)) {
                Some(rx) => {
                    let d = rx.recv().unwrap_or(Decoded {
                        events: Vec::new(),
                        nodes: Vec::new(),
                        damaged: true,
                    });
                    for &(id, parent, ip) in &d.nodes {
                        self.stacks.insert(id, parent, ip);
                    }
                    ChunkCursor {
                        dec: Decoder::Ready {
                            events: d.events,
                            next: 0,
                            damaged: d.damaged,
                        },
                        tid: ch.header.tid,
                        pending: None,
                        offset: usize::MAX,
                    }
                }
                None => ChunkCursor::new(self.data, ch),
            };
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
            if self.load(slot) {
                self.offer(slot);
            }
        }
        if opened {
            self.progress
                .store(self.next_chunk, std::sync::atomic::Ordering::Relaxed);
            self.release_pages();
        }
        let slot = self.top?;
        let ev = self.cursors[slot].pending.take();
        // The same chunk usually holds the next event too.
        if self.load(slot) {
            let seq = self.seq_of(slot);
            let heap_min = self.heap.peek().map_or(u64::MAX, |Reverse((s, _))| *s);
            let next_chunk = self
                .chunks
                .get(self.next_chunk)
                .map_or(u64::MAX, |c| c.header.base_seq);
            if seq <= heap_min && seq <= next_chunk {
                return ev;
            }
            self.heap.push(Reverse((seq, slot)));
        }
        self.top = self.heap.pop().map(|Reverse((_, s))| s);
        ev
    }
}
