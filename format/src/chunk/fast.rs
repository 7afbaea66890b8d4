//! `EVENTS_S` (format version 5): a chunk in the stream encoding with its ops in one zstd frame
//! at a low level. With the fast encoding the writer writes these instead of transcoding: it
//! spends a third of the rank encoding's CPU per event and writes about three times the bytes.
//! `memtrack compact` turns them into `EVENTS_R` later ([`expand_fast`], then the transcoder).
//!
//! Layout: the chunk header as in `EVENTS`, `raw_len` uvarint (the ops' length), then one zstd
//! frame of the ops.

use crate::{put_record, put_uvarint, record, ChunkHeader, Cursor, FormatError};

/// The largest ops a chunk may decompress to: bounds what damaged lengths can ask for (the
/// tracker's chunks are at most 320 KiB).
const MAX_OPS: u64 = 1 << 26;

/// Compresses stream chunks into `EVENTS_S` records (the writer thread keeps one).
#[derive(Default)]
pub struct FastEncoder {
    zstd: super::CachedCompressor,
    packed: Vec<u8>,
    payload: Vec<u8>,
}

impl FastEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the framed `EVENTS_S` record of an `EVENTS` payload (chunk header and ops, as the
    /// tracker's threads write it) to `out`; `level` is zstd's.
    pub fn encode(
        &mut self,
        payload: &[u8],
        level: i32,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let mut c = Cursor::new(payload);
        ChunkHeader::decode(&mut c)?;
        let (header, ops) = payload.split_at(c.pos());
        let z = super::compressor(&mut self.zstd, level)?;
        self.packed.clear();
        self.packed
            .reserve(zstd::zstd_safe::compress_bound(ops.len()));
        z.compress_to_buffer(ops, &mut self.packed)
            .map_err(|_| FormatError::Compression)?;
        self.payload.clear();
        self.payload.extend_from_slice(header);
        put_uvarint(&mut self.payload, ops.len() as u64);
        self.payload.extend_from_slice(&self.packed);
        put_record(out, record::EVENTS_S, &self.payload);
        Ok(())
    }
}

/// The ops of an `EVENTS_S` chunk; `data` is its payload after the chunk header.
pub(crate) fn decompress_ops(data: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut c = Cursor::new(data);
    let raw_len = c.uvarint()?;
    if raw_len > MAX_OPS {
        return Err(FormatError::Compression);
    }
    let ops =
        zstd::bulk::decompress(c.rest(), raw_len as usize).map_err(|_| FormatError::Compression)?;
    if ops.len() as u64 != raw_len {
        return Err(FormatError::Compression);
    }
    Ok(ops)
}

/// The `EVENTS` payload (chunk header and ops) of an `EVENTS_S` payload: what the tracker's
/// thread handed over, for the transcoder.
pub fn expand_fast(payload: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut c = Cursor::new(payload);
    ChunkHeader::decode(&mut c)?;
    let ops = decompress_ops(c.rest())?;
    let mut out = Vec::with_capacity(c.pos() + ops.len());
    out.extend_from_slice(&payload[..c.pos()]);
    out.extend_from_slice(&ops);
    Ok(out)
}
