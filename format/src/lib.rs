//! The memtrack capture format, shared by the writer (`memtrack-tracker`) and the reader
//! (`memtrack-reader`).
//!
//! **What.** A capture is a [`Header`] followed by framed records (a type byte, the payload
//! length, the payload; [`record`] lists the types). Most records are chunks of one thread's
//! allocation events ([`Item`]s: events and the stack trie nodes they name); the rest say which
//! modules were loaded, which Python code objects stacks name, and how the capture ended.
//!
//! **Why.** Framing lets a reader skip record types it does not know and stop cleanly at a torn
//! tail when the traced process was killed mid-write; every chunk decodes on its own, so the
//! reader decodes chunks on several threads and a lost chunk loses only its own events. The
//! tracker writes each chunk in the cheap *stream* encoding on the program's threads, and its
//! writer thread *transcodes* it into the *rank* encoding, several times smaller, before it
//! reaches the file.
//!
//! **How.** Integers are LEB128 varints ([`put_uvarint`], [`Cursor`]); within a chunk, sequence
//! numbers, times and addresses are deltas from the chunk's [`ChunkHeader`]; stacks are ids of
//! nodes in a trie. The stream codec is [`StreamEncoder`] / [`StreamDecoder`], the transcoder
//! [`Transcoder`], and [`ColumnDecoder`] reads every column encoding ([`ColumnEncoding`]) ever
//! written. The byte layout is in `FORMAT.md` beside this crate; the structure of the code in
//! `docs/design/format.md`.
//!
//! Nothing here allocates on the tracker's hot path: the stream encoder writes through any
//! [`ByteSink`], the tracker's own buffers included.
//!
//! ```
//! use memtrack_format::*;
//!
//! // A thread's chunk as the tracker writes it: a stack node, then events naming it.
//! let header = ChunkHeader { tid: 7, base_seq: 1, base_time: 0 };
//! let items = [
//!     Item::Node { id: 1, parent: 0, ip: 0x5555_0000_1234 },
//!     Item::Event {
//!         seq: 1,
//!         time: 3,
//!         kind: EventKind::Alloc { kind: AllocKind::Malloc, addr: 0x1000, size: 24, stack: 1 },
//!     },
//!     Item::Event { seq: 2, time: 4, kind: EventKind::Free { addr: 0x1000 } },
//! ];
//! let payload = encode_stream(&header, &items);
//!
//! // The writer transcodes it into a framed EVENTS_R record...
//! let mut file = Vec::new();
//! Transcoder::new().transcode(&payload, 1, &mut file).unwrap();
//!
//! // ...which the reader finds and decodes back to the same items.
//! let Next::Record(r) = next_record(&file, 0) else { panic!("no record") };
//! let encoding = ColumnEncoding::of_record(r.kind).unwrap();
//! let mut c = Cursor::new(r.payload);
//! let h = ChunkHeader::decode(&mut c).unwrap();
//! let mut decoder = ColumnDecoder::new(c.rest(), &h, encoding).unwrap();
//! let mut back = Vec::new();
//! while let Some(item) = decoder.next_item().unwrap() {
//!     back.push(item);
//! }
//! assert_eq!((h, &back[..]), (header, &items[..]));
//! ```

mod attach;
mod checkpoint;
mod chunk;
mod cursor;
mod event;
mod frame;
pub mod hash;
mod header;
mod mapped;
mod python;
pub mod record;
mod records;
mod region;
mod rss;
pub mod sampling;
mod varint;

pub use attach::{AttachHow, AttachRecord};
pub use checkpoint::{Checkpoint, SeriesPoint, StackFigures};
pub use chunk::{
    encode_stream, expand_fast, op, ColumnDecoder, ColumnEncoding, FastEncoder, StreamDecoder,
    StreamEncoder, Transcoder,
};
pub use cursor::Cursor;
pub use event::{AllocKind, ChunkHeader, EventKind, Item};
pub use frame::{frame_in_place, next_record, put_record, Next, RawRecord, MAX_FRAME_PREFIX};
pub use header::{Header, FIXED_HEADER_LEN, FORMAT_VERSION, MAGIC};
pub use mapped::MapFileRecord;
pub use python::{pyframe, PyCodeRecord, PythonEndRecord};
pub use records::{
    DroppedProcess, DroppedRecord, EndReason, EndRecord, Module, ModulesRecord, Segment,
    END_RECORD_LEN,
};
pub use region::RegionNameRecord;
pub use rss::RssRecord;
pub use sampling::SamplingRecord;
pub use varint::{
    push_uvarint_bytewise, put_bytes, put_ivarint, put_uvarint, read_uvarint, uvarint_word,
    ByteSink,
};
pub(crate) use varint::{unzigzag, zigzag};

/// Errors from decoding. The reader wraps them with the file name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("unexpected end of data")]
    Truncated,
    #[error("varint longer than 10 bytes")]
    BadVarint,
    #[error("not a memtrack capture (bad magic)")]
    BadMagic,
    #[error("format version {0} is newer than this reader ({FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("invalid UTF-8 in a string field")]
    BadString,
    #[error("unknown op code {0:#04x} in an events chunk")]
    BadOp(u8),
    #[error("a compressed events chunk does not decompress")]
    Compression,
    #[error("an events chunk of {0} bytes is too large to transcode")]
    TooLarge(usize),
}
