//! Aggregated recording: the `CHECKPOINT` record. An aggregated capture holds no events: the
//! tracker replays them as they come and writes, every few seconds and at the end, the heap's
//! figures and every stack's, now and at the peak so far. A reader reads the last one.

use crate::{put_uvarint, Cursor, FormatError};

/// One stack's figures in a checkpoint (bytes and counts are weighted estimates when the
/// checkpoint's `sample_rate` is not 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackFigures {
    /// The stack's trie node id.
    pub stack: u32,
    pub live_bytes: u64,
    pub live_count: u64,
    pub total_bytes: u64,
    pub total_count: u64,
    /// Live when the heap was at its peak.
    pub peak_bytes: u64,
    pub peak_count: u64,
}

/// One point of the memory-over-time series: an earlier checkpoint's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeriesPoint {
    pub time: u64,
    pub heap_bytes: u64,
    pub peak_bytes: u64,
    pub rss_bytes: u64,
}

/// The payload of a `CHECKPOINT` record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// 1 for the image's first checkpoint, counting up.
    pub number: u64,
    /// Written when the image ended (exit, exec, `_exit`, abort): the figures are final.
    pub last: bool,
    /// Clock units since start.
    pub time: u64,
    /// Every event numbered below it is counted, none at or above it.
    pub seq: u64,
    /// Mean bytes between samples when the events were sampled (0: every event).
    pub sample_rate: u64,
    pub heap_bytes: u64,
    pub heap_count: u64,
    pub peak_bytes: u64,
    pub peak_count: u64,
    pub peak_time: u64,
    pub peak_seq: u64,
    /// Resident memory when written (0: unknown).
    pub rss_bytes: u64,
    pub total_bytes: u64,
    pub total_count: u64,
    pub total_frees: u64,
    /// Heap events counted.
    pub events: u64,
    pub unmatched_frees: u64,
    /// Variance of the sampled estimates of the heap now and at the peak (0 when exact).
    pub heap_variance: f64,
    pub peak_variance: f64,
    /// Stacks with any figure not 0, by increasing id.
    pub stacks: Vec<StackFigures>,
    /// The earlier checkpoints' points, oldest first (thinned on long runs).
    pub series: Vec<SeriesPoint>,
}

const FLAG_LAST: u64 = 1;

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(128 + self.stacks.len() * 16 + self.series.len() * 12);
        for v in [
            self.number,
            if self.last { FLAG_LAST } else { 0 },
            self.time,
            self.seq,
            self.sample_rate,
            self.heap_bytes,
            self.heap_count,
            self.peak_bytes,
            self.peak_count,
            self.peak_time,
            self.peak_seq,
            self.rss_bytes,
            self.total_bytes,
            self.total_count,
            self.total_frees,
            self.events,
            self.unmatched_frees,
        ] {
            put_uvarint(&mut o, v);
        }
        o.extend_from_slice(&self.heap_variance.to_le_bytes());
        o.extend_from_slice(&self.peak_variance.to_le_bytes());
        put_uvarint(&mut o, self.stacks.len() as u64);
        let mut prev = 0u32;
        for s in &self.stacks {
            put_uvarint(&mut o, s.stack.wrapping_sub(prev) as u64);
            prev = s.stack;
            for v in [
                s.live_bytes,
                s.live_count,
                s.total_bytes,
                s.total_count,
                s.peak_bytes,
                s.peak_count,
            ] {
                put_uvarint(&mut o, v);
            }
        }
        put_uvarint(&mut o, self.series.len() as u64);
        let mut t = 0u64;
        for p in &self.series {
            put_uvarint(&mut o, p.time.wrapping_sub(t));
            t = p.time;
            put_uvarint(&mut o, p.heap_bytes);
            put_uvarint(&mut o, p.peak_bytes);
            put_uvarint(&mut o, p.rss_bytes);
        }
        o
    }

    pub fn decode(payload: &[u8]) -> Result<Checkpoint, FormatError> {
        let mut c = Cursor::new(payload);
        let mut f = [0u64; 17];
        for v in &mut f {
            *v = c.uvarint()?;
        }
        let heap_variance = f64_le(c.bytes(8)?);
        let peak_variance = f64_le(c.bytes(8)?);
        let n = c.uvarint()?;
        // Each stack takes at least 7 bytes: a damaged count must not allocate wildly.
        let mut stacks = Vec::with_capacity((n as usize).min(c.remaining() / 7));
        let mut prev = 0u32;
        for _ in 0..n {
            let stack = prev.wrapping_add(c.uvarint()? as u32);
            prev = stack;
            stacks.push(StackFigures {
                stack,
                live_bytes: c.uvarint()?,
                live_count: c.uvarint()?,
                total_bytes: c.uvarint()?,
                total_count: c.uvarint()?,
                peak_bytes: c.uvarint()?,
                peak_count: c.uvarint()?,
            });
        }
        let n = c.uvarint()?;
        let mut series = Vec::with_capacity((n as usize).min(c.remaining() / 4));
        let mut t = 0u64;
        for _ in 0..n {
            t = t.wrapping_add(c.uvarint()?);
            series.push(SeriesPoint {
                time: t,
                heap_bytes: c.uvarint()?,
                peak_bytes: c.uvarint()?,
                rss_bytes: c.uvarint()?,
            });
        }
        Ok(Checkpoint {
            number: f[0],
            last: f[1] & FLAG_LAST != 0,
            time: f[2],
            seq: f[3],
            sample_rate: f[4],
            heap_bytes: f[5],
            heap_count: f[6],
            peak_bytes: f[7],
            peak_count: f[8],
            peak_time: f[9],
            peak_seq: f[10],
            rss_bytes: f[11],
            total_bytes: f[12],
            total_count: f[13],
            total_frees: f[14],
            events: f[15],
            unmatched_frees: f[16],
            heap_variance,
            peak_variance,
            stacks,
            series,
        })
    }

    /// This checkpoint as a point of the series.
    pub fn point(&self) -> SeriesPoint {
        SeriesPoint {
            time: self.time,
            heap_bytes: self.heap_bytes,
            peak_bytes: self.peak_bytes,
            rss_bytes: self.rss_bytes,
        }
    }
}

fn f64_le(b: &[u8]) -> f64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    f64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_and_a_cut_one_is_an_error() {
        let c = Checkpoint {
            number: 7,
            last: true,
            time: 35_000_000,
            seq: 123_456,
            sample_rate: 0,
            heap_bytes: 1000,
            heap_count: 3,
            peak_bytes: 5000,
            peak_count: 9,
            peak_time: 20_000,
            peak_seq: 777,
            rss_bytes: 4 << 20,
            total_bytes: 99_999,
            total_count: 500,
            total_frees: 497,
            events: 997,
            unmatched_frees: 1,
            heap_variance: 0.5,
            peak_variance: 2.25,
            stacks: vec![
                StackFigures {
                    stack: 3,
                    live_bytes: 1000,
                    live_count: 3,
                    total_bytes: 4000,
                    total_count: 10,
                    peak_bytes: 2000,
                    peak_count: 5,
                },
                StackFigures {
                    stack: 90,
                    total_bytes: 95_999,
                    total_count: 490,
                    peak_bytes: 3000,
                    peak_count: 4,
                    ..Default::default()
                },
            ],
            series: vec![
                SeriesPoint {
                    time: 5,
                    heap_bytes: 1,
                    peak_bytes: 2,
                    rss_bytes: 3,
                },
                SeriesPoint {
                    time: 9,
                    heap_bytes: 4,
                    peak_bytes: 5,
                    rss_bytes: 6,
                },
            ],
        };
        let b = c.encode();
        assert_eq!(Checkpoint::decode(&b).unwrap(), c);
        assert_eq!(
            Checkpoint::decode(&b[..b.len() - 1]),
            Err(FormatError::Truncated)
        );
    }
}
