//! The column block of a column-encoded chunk: its columns decompressed into one buffer, and the
//! reads every column decoder makes from it (a field's next byte, a number with its extra bits).
//! Damage anywhere is an error, never a panic or a read out of bounds.

use super::tokens::Tokens;
use crate::{read_uvarint, unzigzag, Cursor, FormatError, Item};

/// Columns of the widest encoding (`EVENTS_T` and `EVENTS_R` have ten).
pub(super) const MAX_COLUMNS: usize = 10;

/// Every field in a column of its own, as the token encodings store them.
const OWN_COLUMNS: [usize; MAX_COLUMNS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

/// Largest decompressed column block accepted (damage guard: a chunk holds what one thread
/// buffered, a few hundred KiB of stream encoding, and its columns are no larger).
const MAX_BLOCK: u64 = 1 << 26;

/// A column of the decompressed block, read front to back.
#[derive(Clone, Copy, Default)]
struct Col {
    pos: usize,
    end: usize,
}

thread_local! {
    /// One zstd decompression context per reading thread, reused across chunks.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// One chunk's decompressed columns, with the extra bits (token encodings) after them.
pub(super) struct ColumnBlock {
    block: Vec<u8>,
    cols: [Col; MAX_COLUMNS],
    /// Field to column (`EVENTS_Z` shares one column between the address fields).
    map: [usize; MAX_COLUMNS],
    tokens: bool,
    // The extra-bit reader: `acc` holds `nbits` unread bits; `bits` is where it refills from.
    bits: Col,
    acc: u64,
    nbits: u32,
}

impl ColumnBlock {
    /// The block of an `EVENTS_Z` payload (after the chunk header), whose `ncols` columns hold
    /// the fields as `map` says; and the chunk's op count.
    pub(super) fn varint(
        c: &mut Cursor<'_>,
        map: &[usize; MAX_COLUMNS],
        ncols: usize,
    ) -> Result<(Self, u64), FormatError> {
        let (block, spans, left) = varint_block(c, ncols)?;
        Ok((Self::new(block, spans, *map, false, c.rest()), left))
    }

    /// The block of an `EVENTS_T` or `EVENTS_R` payload (after the chunk header) of `ncols`
    /// columns, one per field; and the chunk's op count.
    pub(super) fn tokens(c: &mut Cursor<'_>, ncols: usize) -> Result<(Self, u64), FormatError> {
        let (block, spans, left) = token_block(c, ncols)?;
        Ok((Self::new(block, spans, OWN_COLUMNS, true, c.rest()), left))
    }

    fn new(
        mut block: Vec<u8>,
        cols: [Col; MAX_COLUMNS],
        map: [usize; MAX_COLUMNS],
        tokens: bool,
        extra: &[u8],
    ) -> Self {
        let bits = Col {
            pos: block.len(),
            end: block.len() + extra.len(),
        };
        block.extend_from_slice(extra);
        ColumnBlock {
            block,
            cols,
            map,
            tokens,
            bits,
            acc: 0,
            nbits: 0,
        }
    }

    /// The next byte of field `f` (an op, a token with a symbol, a kind).
    #[inline]
    pub(super) fn u8(&mut self, f: usize) -> Result<u8, FormatError> {
        let col = &mut self.cols[self.map[f]];
        if col.pos >= col.end {
            return Err(FormatError::Truncated);
        }
        let b = self.block[col.pos];
        col.pos += 1;
        Ok(b)
    }

    /// Reads `n` (at most 56) extra bits.
    #[inline]
    fn read_bits(&mut self, n: u32) -> Result<u64, FormatError> {
        if self.nbits < n {
            let b = &mut self.bits;
            if b.pos + 8 <= b.end {
                // Branch-free refill: bits beyond the whole bytes taken are reloaded next time
                // with the same values, so OR-ing them in early is harmless.
                let w = u64::from_le_bytes(self.block[b.pos..b.pos + 8].try_into().unwrap());
                self.acc |= w << self.nbits;
                b.pos += ((63 - self.nbits) >> 3) as usize;
                self.nbits |= 56;
            } else {
                while self.nbits <= 56 && b.pos < b.end {
                    self.acc |= (self.block[b.pos] as u64) << self.nbits;
                    b.pos += 1;
                    self.nbits += 8;
                }
                if self.nbits < n {
                    return Err(FormatError::Truncated);
                }
            }
        }
        let v = self.acc & ((1u64 << n) - 1);
        self.acc >>= n;
        self.nbits -= n;
        Ok(v)
    }

    /// The next value of field `f`.
    #[inline(always)]
    pub(super) fn uv(&mut self, f: usize) -> Result<u64, FormatError> {
        if self.tokens {
            // Every field has its own column here: no mapping.
            let col = &mut self.cols[f];
            if col.pos >= col.end {
                return Err(FormatError::Truncated);
            }
            let t = self.block[col.pos];
            col.pos += 1;
            if t < 16 {
                return Ok(t as u64);
            }
            return self.token_rest::<16, 2>(t);
        }
        let col = &mut self.cols[self.map[f]];
        read_uvarint(&self.block, &mut col.pos, col.end)
    }

    /// The number of token `t` of kind `Tokens<D, M>`, with its extra bits.
    #[inline]
    pub(super) fn token_rest<const D: u64, const M: u32>(
        &mut self,
        t: u8,
    ) -> Result<u64, FormatError> {
        if (t as u64) < D {
            return Ok(t as u64);
        }
        let n = Tokens::<D, M>::extra(t);
        let x = if n <= 56 {
            self.read_bits(n)?
        } else {
            let lo = self.read_bits(32)?;
            lo | (self.read_bits(n - 32)? << 32)
        };
        Ok(Tokens::<D, M>::value(t, x))
    }

    /// The next value of field `f`, zigzag-decoded (a wrapping delta).
    #[inline(always)]
    pub(super) fn iv(&mut self, f: usize) -> Result<u64, FormatError> {
        Ok(unzigzag(self.uv(f)?))
    }
}

/// Stack node definitions as every column encoding stores them, in one field: the id as a zigzag
/// delta from the previous node's, `id - parent`, and the ip as a zigzag delta from the previous
/// node's.
#[derive(Default)]
pub(super) struct Nodes {
    id: u64,
    ip: u64,
}

impl Nodes {
    /// The next node definition, from field `f` of `b`.
    #[inline]
    pub(super) fn next(&mut self, b: &mut ColumnBlock, f: usize) -> Result<Item, FormatError> {
        let id = self.id.wrapping_add(b.iv(f)?);
        let parent = id.wrapping_sub(b.uv(f)?);
        let ip = self.ip.wrapping_add(b.iv(f)?);
        self.id = id;
        self.ip = ip;
        Ok(Item::Node { id, parent, ip })
    }
}

/// `EVENTS_Z`: one zstd frame holding the op count, the `ncols` column lengths and the columns.
fn varint_block(
    c: &mut Cursor<'_>,
    ncols: usize,
) -> Result<(Vec<u8>, [Col; MAX_COLUMNS], u64), FormatError> {
    let raw_len = c.uvarint()?;
    if raw_len > MAX_BLOCK {
        return Err(FormatError::Compression);
    }
    let block = zstd::bulk::decompress(c.bytes(c.remaining())?, raw_len as usize)
        .map_err(|_| FormatError::Compression)?;
    if block.len() as u64 != raw_len {
        return Err(FormatError::Compression);
    }
    let mut b = Cursor::new(&block);
    let left = b.uvarint()?;
    let mut spans = [Col::default(); MAX_COLUMNS];
    let mut pos = 0u64;
    let mut lens = [0u64; MAX_COLUMNS];
    for l in lens[..ncols].iter_mut() {
        *l = b.uvarint()?;
    }
    pos += b.pos() as u64;
    for (span, &len) in spans.iter_mut().zip(&lens[..ncols]) {
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= block.len() as u64)
            .ok_or(FormatError::Truncated)?;
        *span = Col {
            pos: pos as usize,
            end: end as usize,
        };
        pos = end;
    }
    Ok((block, spans, left))
}

/// `EVENTS_T` and `EVENTS_R`: the op count, each of the `ncols` columns' length and packed
/// length, the columns (each a zstd frame, or stored when its packed length is 0); the extra
/// bits follow.
fn token_block(
    c: &mut Cursor<'_>,
    ncols: usize,
) -> Result<(Vec<u8>, [Col; MAX_COLUMNS], u64), FormatError> {
    let left = c.uvarint()?;
    let mut lens = [(0u64, 0u64); MAX_COLUMNS];
    let mut total = 0u64;
    for l in lens[..ncols].iter_mut() {
        *l = (c.uvarint()?, c.uvarint()?);
        total = total.saturating_add(l.0);
    }
    if total > MAX_BLOCK {
        return Err(FormatError::Compression);
    }
    // Room for the extra bits too, which the caller appends.
    // Zeroed by the allocator (untouched pages until written): a damaged length that passes
    // the bound costs address space, not memory, until decompression fails.
    let mut block = vec![0u8; total as usize];
    let mut spans = [Col::default(); MAX_COLUMNS];
    let mut pos = 0usize;
    for (span, &(raw, packed)) in spans.iter_mut().zip(&lens) {
        let out = &mut block[pos..pos + raw as usize];
        if packed == 0 {
            out.copy_from_slice(c.bytes(raw as usize)?);
        } else {
            let z = c.bytes(usize::try_from(packed).map_err(|_| FormatError::Truncated)?)?;
            let n = DCTX
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = zstd::bulk::Decompressor::new().ok();
                    }
                    d.as_mut().map(|d| d.decompress_to_buffer(z, out))
                })
                .and_then(|r| r.ok())
                .ok_or(FormatError::Compression)?;
            if n as u64 != raw {
                return Err(FormatError::Compression);
            }
        }
        *span = Col {
            pos,
            end: pos + raw as usize,
        };
        pos += raw as usize;
    }
    Ok((block, spans, left))
}
