//! Tokens: how the column encodings since `EVENTS_T` split each number into a token byte, which
//! zstd compresses column by column, and raw extra bits, which skip zstd (it could not compress
//! them). [`BitWriter`] collects the extra bits; the decoder reads them back in
//! [`super::block::ColumnBlock`].

/// Splits numbers into a token byte and extra bits: numbers below `D` are their own token; larger
/// ones are named by their bit length and the `M` bits below the top one, and the remaining low
/// bits follow raw. zstd's entropy coder then sees a small alphabet per column, and the bits it
/// could not compress anyway skip it.
pub(super) struct Tokens<const D: u64, const M: u32>;

/// The tokens of most columns: 256 for every u64.
pub(super) type Long = Tokens<16, 2>;
/// Short tokens, for fields that share a column's symbols with another: 128 for every u64.
pub(super) type Short = Tokens<4, 1>;

impl<const D: u64, const M: u32> Tokens<D, M> {
    /// Bit length of the smallest number that is not its own token.
    const FIRST_LEN: u32 = 64 - D.leading_zeros();

    /// The token of `v`, how many extra bits follow, and those bits.
    #[inline]
    pub(super) fn split(v: u64) -> (u8, u32, u64) {
        if v < D {
            return (v as u8, 0, 0);
        }
        let len = 64 - v.leading_zeros();
        let extra = len - 1 - M;
        let top = (v >> extra) & ((1 << M) - 1);
        (
            (D + ((len - Self::FIRST_LEN) << M) as u64 + top) as u8,
            extra,
            v & ((1u64 << extra) - 1),
        )
    }

    /// Number of extra bits that follow token `t`.
    #[inline]
    pub(super) fn extra(t: u8) -> u32 {
        if (t as u64) < D {
            0
        } else {
            ((t as u64 - D) >> M) as u32 + Self::FIRST_LEN - 1 - M
        }
    }

    /// Value of token `t` with its extra bits `x`.
    #[inline]
    pub(super) fn value(t: u8, x: u64) -> u64 {
        if (t as u64) < D {
            return t as u64;
        }
        let top = (1 << M) | (t as u64 - D) & ((1 << M) - 1);
        (top << Self::extra(t)) | x
    }
}

/// Appends bit fields least significant bit first.
#[derive(Default)]
pub(super) struct BitWriter {
    pub(super) out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Appends `v`, a number of at most `n <= 64` bits.
    #[inline(always)]
    pub(super) fn put(&mut self, v: u64, n: u32) {
        debug_assert!(n >= 64 || v >> n == 0);
        if n > 32 {
            self.put32(v & 0xffff_ffff, 32);
            self.put32(v >> 32, n - 32);
        } else {
            self.put32(v, n);
        }
    }

    /// `v` has at most `n <= 32` bits; fewer than 32 bits are pending, so they fit.
    #[inline(always)]
    fn put32(&mut self, v: u64, n: u32) {
        self.acc |= v << self.n;
        self.n += n;
        if self.n >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.n -= 32;
        }
    }

    pub(super) fn finish(&mut self) {
        while self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n = self.n.saturating_sub(8);
        }
        self.acc = 0;
        self.n = 0;
    }
}
