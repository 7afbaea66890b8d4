//! Sampled recording: which allocations a sampled capture holds, and what each stands for.
//!
//! The tracker samples by bytes: the gaps between sampled bytes are exponentially distributed
//! with mean `rate` (a Poisson process over the bytes allocated, as tcmalloc and jemalloc
//! sample). An allocation of `size` bytes is recorded when a sampled byte falls in it, with
//! probability `1 - exp(-size / rate)`, independently of every other allocation. Weighting each
//! recorded block by the inverse of that probability (Horvitz-Thompson) estimates any sum of
//! sizes without bias; [`variance`] is the block's share of the estimate's variance.

use crate::{put_uvarint, Cursor, FormatError};

/// The `SAMPLING` record: how the capture was sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplingRecord {
    /// Mean bytes between samples.
    pub rate_bytes: u64,
}

impl SamplingRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_uvarint(&mut out, self.rate_bytes);
        out
    }

    pub fn decode(payload: &[u8]) -> Result<SamplingRecord, FormatError> {
        let mut c = Cursor::new(payload);
        Ok(SamplingRecord {
            rate_bytes: c.uvarint()?,
        })
    }
}

/// The probability that an allocation of `size` bytes is sampled at mean gap `rate`.
pub fn probability(size: u64, rate: u64) -> f64 {
    if rate <= 1 {
        return 1.0;
    }
    // -expm1(-x) keeps precision for sizes far below the rate.
    -(-(size as f64) / rate as f64).exp_m1()
}

/// The bytes a sampled block of `size` bytes stands for: `size / (1 - exp(-size / rate))`.
pub fn weight(size: u64, rate: u64) -> f64 {
    let p = probability(size, rate);
    if p <= 0.0 {
        return 0.0;
    }
    size as f64 / p
}

/// The count of allocations a sampled block stands for: `1 / (1 - exp(-size / rate))`.
pub fn count_weight(size: u64, rate: u64) -> f64 {
    let p = probability(size, rate);
    if p <= 0.0 {
        return 0.0;
    }
    1.0 / p
}

/// A sampled block's term in the variance estimate of a sum of weighted sizes:
/// `(1 - p) * weight^2` (unbiased for the Horvitz-Thompson estimator of independent samples).
pub fn variance(size: u64, rate: u64) -> f64 {
    let p = probability(size, rate);
    let w = weight(size, rate);
    (1.0 - p) * w * w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_match_the_formula() {
        let rate = 512 * 1024;
        // A block far larger than the rate stands for itself.
        assert_eq!(weight(64 << 20, rate), (64u64 << 20) as f64);
        assert!(variance(64 << 20, rate) < 1e-30);
        // A 16-byte block stands for about rate bytes (+ half its size).
        let w = weight(16, rate);
        assert!((w - (rate as f64 + 8.0)).abs() < 0.01, "{w}");
        assert!((count_weight(16, rate) * 16.0 - w).abs() < 1e-6);
        // Rate 1 (or 0) means every allocation is recorded.
        assert_eq!(weight(16, 1), 16.0);
        assert_eq!(variance(16, 0), 0.0);
        let r = SamplingRecord { rate_bytes: rate };
        assert_eq!(SamplingRecord::decode(&r.encode()).unwrap(), r);
        assert_eq!(SamplingRecord::decode(&[]), Err(FormatError::Truncated));
    }
}
