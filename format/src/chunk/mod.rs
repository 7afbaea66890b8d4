//! Events chunks in every encoding: the stream encoding the tracker writes, the transcoder into
//! the rank encoding the file holds, and the decoders of every column encoding ever written.
//!
//! - [`stream`]: `EVENTS`, one op byte and varints per event, cheap enough for the hot path. Its
//!   encoder and decoder.
//! - [`rank`]: `EVENTS_R` (format version 4). [`rank::encode`] is the transcoder, stream in,
//!   rank out; [`rank::decode`] its decoder.
//! - [`legacy`]: `EVENTS_Z` (version 2) and `EVENTS_T` (version 3), decoded only.
//! - [`fast`]: `EVENTS_S` (version 5), the stream with its ops in one zstd frame: what the
//!   writer writes with the fast encoding instead of transcoding.
//! - [`block`], [`tokens`], [`live`]: what the column encodings share: the decompressed column
//!   block and the reads from it, numbers split into tokens and extra bits, and the live set
//!   behind the rank encoding's frees.
//!
//! Every chunk decodes on its own: its running values start from its [`ChunkHeader`] and its
//! history from empty.

mod block;
mod fast;
mod legacy;
mod live;
mod rank;
mod stream;
mod tokens;

#[cfg(test)]
pub(crate) mod tests;

pub use fast::{expand_fast, FastEncoder};
pub use rank::encode::Transcoder;
pub use stream::{encode_stream, op, StreamDecoder, StreamEncoder};

use crate::{ChunkHeader, Cursor, FormatError, Item};
use block::ColumnBlock;
use legacy::LegacyDecoder;
use rank::decode::RankDecoder;
use stream::OwnedStream;

/// Asks the CPU to bring the cache line holding `p` into the nearest cache, ahead of a read
/// (the transcoder names its lookups and the stream some way ahead). Reads nothing the program
/// sees; any address will do.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it neither faults nor changes memory, whatever `p` is.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A zstd compressor kept between chunks, made again only when the level changes (the
/// transcoder and the fast encoder each keep one).
pub(crate) type CachedCompressor = Option<(i32, zstd::bulk::Compressor<'static>)>;

/// The compressor of `cache` at `level`, made when missing or at another level.
pub(crate) fn compressor(
    cache: &mut CachedCompressor,
    level: i32,
) -> Result<&mut zstd::bulk::Compressor<'static>, FormatError> {
    if cache.as_ref().map(|z| z.0) != Some(level) {
        let z = zstd::bulk::Compressor::new(level).map_err(|_| FormatError::Compression)?;
        *cache = Some((level, z));
    }
    cache
        .as_mut()
        .map(|(_, z)| z)
        .ok_or(FormatError::Compression)
}

/// The compressed encodings of events chunks, one per record type, every chunk decoding on its
/// own: the column encodings a writer transcodes its chunks into (fields in columns, each
/// compressed with zstd on its own), and the zstd-compressed stream of the fast encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnEncoding {
    /// `EVENTS_Z` (format version 2): varint columns, four address fields sharing one.
    Varint,
    /// `EVENTS_T` (format version 3): token columns and a raw bit stream of extra bits.
    Token,
    /// `EVENTS_R` (format version 4): `EVENTS_T`'s tokens; frees by rank among live blocks,
    /// three ops to a byte, addresses after block ends, sizes relative to the reused block.
    Rank,
    /// `EVENTS_S` (format version 5): the stream encoding, its ops in one zstd frame (the fast
    /// encoding: no transcoding).
    ZstdStream,
}

impl ColumnEncoding {
    /// The encoding of an events record of type `kind` (`None`: not a column encoding).
    pub fn of_record(kind: u8) -> Option<ColumnEncoding> {
        match kind {
            crate::record::EVENTS_Z => Some(ColumnEncoding::Varint),
            crate::record::EVENTS_T => Some(ColumnEncoding::Token),
            crate::record::EVENTS_R => Some(ColumnEncoding::Rank),
            crate::record::EVENTS_S => Some(ColumnEncoding::ZstdStream),
            _ => None,
        }
    }
}

/// Decoder of the compressed encodings: the chunk's decompressed bytes, and the decoder of its
/// encoding reading items from them.
pub struct ColumnDecoder {
    items: Items,
}

enum Items {
    Legacy(ColumnBlock, LegacyDecoder),
    Rank(ColumnBlock, RankDecoder),
    Stream(OwnedStream),
}

impl ColumnDecoder {
    /// `data` is the payload after the chunk header.
    pub fn new(
        data: &[u8],
        header: &ChunkHeader,
        encoding: ColumnEncoding,
    ) -> Result<Self, FormatError> {
        let mut c = Cursor::new(data);
        let items = match encoding {
            ColumnEncoding::Varint => {
                let (block, left) = ColumnBlock::varint(
                    &mut c,
                    &legacy::VARINT_COLUMNS,
                    legacy::VARINT_COLUMN_COUNT,
                )?;
                Items::Legacy(block, LegacyDecoder::new(header, left))
            }
            ColumnEncoding::Token => {
                let (block, left) = ColumnBlock::tokens(&mut c, legacy::field::COUNT)?;
                Items::Legacy(block, LegacyDecoder::new(header, left))
            }
            ColumnEncoding::Rank => {
                let (block, left) = ColumnBlock::tokens(&mut c, rank::col::COUNT)?;
                Items::Rank(block, RankDecoder::new(header, left))
            }
            ColumnEncoding::ZstdStream => {
                Items::Stream(OwnedStream::new(fast::decompress_ops(data)?, header))
            }
        };
        Ok(ColumnDecoder { items })
    }

    /// The next item, `None` after the chunk's last.
    #[inline]
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        match &mut self.items {
            Items::Rank(b, d) => d.next_item(b),
            Items::Legacy(b, d) => d.next_item(b),
            Items::Stream(s) => s.next_item(),
        }
    }
}
