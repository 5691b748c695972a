//! A log-bucketed (HDR-style) histogram of nanosecond values.
//!
//! Values below `2^SUB_BITS` ns are stored exactly; above, each power of two is split into
//! `2^SUB_BITS` equal sub-buckets, so a recorded value is known to a relative error below
//! `2^-SUB_BITS` (< 0.1 %: 25 µs at 25 ms). Memory is fixed (`BUCKETS` u64 counters, 256 KiB),
//! recording is a few shifts and an add. Percentiles use the nearest-rank definition
//! (`sorted[ceil(q * n) - 1]`) and answer the midpoint of the bucket that holds that rank
//! (exact below 1024 ns); min, max and the mean are tracked exactly.
//!
//! Why our own and not the `hdrhistogram` crate: this is ~100 lines, it is all we need
//! (record, merge, quantile), and it keeps the dependency tree small (CI builds on 2 cores).

/// Sub-bucket bits: 1024 sub-buckets per power of two.
const SUB_BITS: u32 = 10;
const SUB_COUNT: u64 = 1 << SUB_BITS;
/// Largest exponent tracked: values up to 2^44 ns (~4.9 hours); larger ones are clamped.
const MAX_EXP: u32 = 44;
const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 1) as usize + 1) * SUB_COUNT as usize;
/// The largest value stored without clamping.
pub const MAX_VALUE: u64 = (1 << (MAX_EXP + 1)) - 1;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// Bucket index of a value (already clamped to `MAX_VALUE`).
fn index_of(v: u64) -> usize {
    if v < SUB_COUNT {
        return v as usize;
    }
    let exp = v.ilog2(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) - SUB_COUNT; // 0..SUB_COUNT
    ((u64::from(shift) + 1) * SUB_COUNT + sub) as usize
}

/// Lowest value and width of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB_COUNT {
        return (i, 1);
    }
    let shift = i / SUB_COUNT - 1;
    let sub = i % SUB_COUNT;
    ((SUB_COUNT + sub) << shift, 1 << shift)
}

impl Histogram {
    #[must_use]
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn record(&mut self, value_ns: u64) {
        let v = value_ns.min(MAX_VALUE);
        self.counts[index_of(v)] += 1;
        self.count += 1;
        self.sum += u128::from(value_ns);
        self.min = self.min.min(value_ns);
        self.max = self.max.max(value_ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.count = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    #[must_use]
    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    #[must_use]
    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    #[must_use]
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// Nearest-rank quantile `q` in [0, 1]; `None` when empty. The answer is the midpoint of the
    /// bucket holding the rank, clamped to the exact [min, max].
    #[must_use]
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = nearest_rank(q, self.count);
        if rank >= self.count {
            return Some(self.max);
        }
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                let mid = low + (width - 1) / 2;
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

/// 1-based nearest rank: `ceil(q * n)`, at least 1.
#[must_use]
pub fn nearest_rank(q: f64, n: u64) -> u64 {
    let q = q.clamp(0.0, 1.0);
    ((q * n as f64).ceil() as u64).clamp(1, n)
}

/// Exact nearest-rank quantile of a sorted slice (the reference the histogram is tested against).
#[must_use]
pub fn exact_quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = nearest_rank(q, sorted.len() as u64);
    sorted.get((rank - 1) as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Rng;

    const QS: [f64; 8] = [0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0];

    fn check(values: &[u64]) {
        let mut h = Histogram::new();
        for &v in values {
            h.record(v);
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        for q in QS {
            let exact = exact_quantile(&sorted, q).unwrap_or(0);
            let got = h.quantile(q).unwrap_or(0);
            let err = got.abs_diff(exact);
            // One bucket's half-width: exact < 1024, else < exact / 1024.
            assert!(
                err <= exact / SUB_COUNT,
                "q={q} exact={exact} got={got} n={}",
                values.len()
            );
        }
        assert_eq!(h.min(), sorted.first().copied());
        assert_eq!(h.max(), sorted.last().copied());
        assert_eq!(h.count(), values.len() as u64);
    }

    #[test]
    fn small_values_are_exact() {
        let values: Vec<u64> = (0..1024).rev().collect();
        let mut h = Histogram::new();
        for &v in &values {
            h.record(v);
        }
        let mut sorted = values.clone();
        sorted.sort_unstable();
        for q in QS {
            assert_eq!(h.quantile(q), exact_quantile(&sorted, q), "q={q}");
        }
    }

    #[test]
    fn quantiles_match_sorted_array_within_bucket_error() {
        let mut rng = Rng::new(7);
        for n in [1usize, 2, 3, 10, 999, 10_000] {
            // Log-uniform over 1 µs .. 10 s, the range latencies live in.
            let values: Vec<u64> = (0..n)
                .map(|_| (1_000.0 * (10f64.powf(rng.next_f64() * 7.0))) as u64)
                .collect();
            check(&values);
        }
        check(&[5, 5, 5, 5]);
        check(&[25_000_000; 3]);
        check(&[1, 1 << 20, 1 << 40]);
    }

    #[test]
    fn index_and_range_round_trip() {
        for v in [
            0u64,
            1,
            1023,
            1024,
            1025,
            2047,
            2048,
            4097,
            1 << 30,
            (1 << 30) + 12_345,
            MAX_VALUE,
        ] {
            let (low, width) = bucket_range(index_of(v));
            assert!(low <= v && v < low + width, "v={v} low={low} width={width}");
        }
        assert!(index_of(MAX_VALUE) < BUCKETS);
    }

    #[test]
    fn clamps_huge_values_and_keeps_exact_max() {
        let mut h = Histogram::new();
        h.record(u64::MAX);
        h.record(3);
        assert_eq!(h.max(), Some(u64::MAX));
        assert_eq!(h.quantile(0.0), Some(3));
        assert_eq!(h.quantile(1.0), Some(u64::MAX));
    }

    #[test]
    fn merge_equals_recording_into_one() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        let mut all = Histogram::new();
        for v in 0..5000u64 {
            let x = v * 7919 % 100_000;
            if v % 2 == 0 { &mut a } else { &mut b }.record(x);
            all.record(x);
        }
        a.merge(&b);
        for q in QS {
            assert_eq!(a.quantile(q), all.quantile(q));
        }
        assert_eq!(a.mean(), all.mean());
    }

    #[test]
    fn empty_has_no_quantiles() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.min(), None);
        assert_eq!(h.mean(), None);
        assert_eq!(exact_quantile(&[], 0.5), None);
    }

    #[test]
    fn nearest_rank_definition() {
        assert_eq!(nearest_rank(0.5, 10), 5);
        assert_eq!(nearest_rank(0.99, 10), 10);
        assert_eq!(nearest_rank(0.0, 10), 1);
        assert_eq!(nearest_rank(0.999, 1000), 999);
        assert_eq!(exact_quantile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(exact_quantile(&[1, 2, 3, 4], 0.51), Some(3));
    }
}
