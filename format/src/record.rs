//! Record types. Records are only ever added; a reader skips types it does not know.

/// A chunk of events of one thread in the stream encoding, as the tracker's threads write it:
/// see [`crate::ChunkHeader`] and [`crate::op`]. Format version 1 writes these to the file;
/// later versions transcode each into their column encoding first (keeping it as it is only if
/// that fails).
pub const EVENTS: u8 = 1;
/// The set of loaded modules at a point in time: see [`crate::ModulesRecord`].
pub const MODULES: u8 = 2;
/// The traced process (or image, before exec) finished its capture: see [`crate::EndRecord`].
pub const END: u8 = 3;
/// A new program image after `exec` continues the capture: the payload is a complete
/// [`crate::Header`] (magic included) of the new image. Its events follow, with sequence
/// numbers above every earlier one; blocks live before the exec are gone.
pub const IMAGE: u8 = 4;
/// A chunk of one thread's events in the varint column encoding (varint columns in one zstd
/// frame): [`crate::ColumnEncoding::Varint`]. Written by format version 2.
pub const EVENTS_Z: u8 = 5;
/// A chunk of one thread's events in the token encoding (token columns, zstd, raw extra
/// bits): [`crate::ColumnEncoding::Token`]. Written by format version 3.
pub const EVENTS_T: u8 = 6;
/// A Python code object met in a stack: see [`crate::PyCodeRecord`] and [`crate::pyframe`].
pub const PYCODE: u8 = 7;
/// A chunk of one thread's events in the rank encoding (`EVENTS_T`'s tokens, with frees
/// named by their rank among live blocks, three ops to a byte, addresses predicted from block
/// ends and sizes from the reused block): [`crate::ColumnEncoding::Rank`]. The writer transcodes
/// every `EVENTS` chunk into one of these ([`crate::Transcoder`]; format version 4).
pub const EVENTS_R: u8 = 8;
/// Short helper processes of the tree whose own captures `memtrack run` removed after the
/// run, with their figures: see [`crate::DroppedRecord`]. Appended after the launched
/// process's `END`.
pub const DROPPED: u8 = 9;
/// A Python program's own code ended and interpreter shutdown began, at a place in the
/// event order: see [`crate::PythonEndRecord`].
pub const PYTHON_END: u8 = 10;
/// The name of a region: `id` uvarint, then the name as bytes. Written once per name, before
/// or after the marks that use it (a reader resolves names after reading): see
/// [`crate::RegionNameRecord`].
pub const REGION_NAME: u8 = 11;
/// A chunk's region marks: the chunk's header, then its `REGION_BEGIN`/`REGION_END` ops in the
/// stream encoding (as an `EVENTS` payload holding only those). Written by the transcoder right
/// after the chunk's `EVENTS_R` record; a reader merges its marks by sequence number like any
/// chunk's events. Old readers skip it and read the heap unchanged.
pub const REGIONS: u8 = 12;
/// A sample of the process's resident memory: `seq` uvarint (the global sequence value when
/// sampled), `time` uvarint, `rss_bytes` uvarint. Written by the tracker's writer thread when
/// the value changed, and once before `END`: see [`crate::RssRecord`]. Old readers skip it.
pub const RSS: u8 = 13;
/// A chunk's mapped-memory events: the chunk's header, then its `MAP`, `UNMAP` and `REMAP` ops
/// in the stream encoding (as an `EVENTS` payload holding only those). Written by the
/// transcoder after the chunk's `EVENTS_R` record (and `REGIONS`, if any); a reader merges
/// them by sequence number like any chunk's events. Old readers skip it and read the heap
/// unchanged.
pub const MAPPED: u8 = 14;
/// The file behind file-backed mappings: `id` uvarint (what `MAP` events name in `file`),
/// then the path as bytes. Written once per path, before the first `MAP` that names it: see
/// [`crate::MapFileRecord`].
pub const MAP_FILE: u8 = 15;
/// The capture records only a sample of the heap's allocations: `rate_bytes` uvarint (the
/// mean gap, in bytes, between sampled bytes: see [`crate::SamplingRecord`]). Written once,
/// right after the header, before any event. A reader that knows it weights each sampled
/// block (see [`crate::sampling::weight`]); an old reader skips it and reports the samples'
/// own sizes.
pub const SAMPLING: u8 = 16;
/// An aggregated capture's checkpoint: per-stack figures now and at the peak so far, heap and
/// RSS. Aggregated captures hold no events; the payload is defined in `crate::checkpoint`
/// (added with aggregated recording).
pub const CHECKPOINT: u8 = 17;
/// The recording started in a process that was already running (`memtrack attach`, or
/// `memtrack_start` from inside the process, as `memtrack.Tracker` does): see
/// [`crate::AttachRecord`]. Written once, right after the header. Blocks allocated before it are
/// not in the capture; frees of them are expected. Old readers skip it.
pub const ATTACH: u8 = 18;
/// A chunk of one thread's events in the stream encoding with its ops in one zstd frame: the
/// chunk header as in [`EVENTS`], the ops' length (uvarint), the zstd frame. Written instead of
/// [`EVENTS_R`] by the fast encoding ([`crate::FastEncoder`]; format version 5), and turned
/// into `EVENTS_R` by `memtrack compact`.
pub const EVENTS_S: u8 = 19;
