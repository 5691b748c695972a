//! Load shapes and the seeded RNG.
//!
//! * Closed loop: `concurrency` workers, each sends its next request as soon as the previous one
//!   ends; the scheduled send time of a request is the moment its worker is free.
//! * Open loop: send times are fixed in advance (constant spacing `1/rate`, or Poisson arrivals:
//!   exponential gaps with mean `1/rate`) and do not wait for responses, so a slow server cannot
//!   slow the client down and hide latency (coordinated omission). Latency is measured from the
//!   scheduled time; the gap between scheduled and actual send is reported as send lag.

/// xoshiro256** seeded through splitmix64: deterministic for a given seed on every platform.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.next_f64()).ln()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    Closed { concurrency: usize },
    Constant { rate: f64 },
    Poisson { rate: f64 },
}

impl Load {
    #[must_use]
    pub fn label(&self) -> String {
        match self {
            Load::Closed { concurrency } => format!("closed c={concurrency}"),
            Load::Constant { rate } => format!("open rate={rate}/s"),
            Load::Poisson { rate } => format!("open poisson rate={rate}/s"),
        }
    }
}

/// Open-loop send offsets (ns from the start of the run), generated lazily.
#[derive(Clone, Debug)]
pub struct Arrivals {
    poisson: bool,
    gap_ns: f64,
    next_ns: f64,
    index: u64,
    rng: Rng,
}

impl Arrivals {
    /// `rate` requests per second (> 0).
    #[must_use]
    pub fn new(rate: f64, poisson: bool, seed: u64) -> Self {
        Self {
            poisson,
            gap_ns: 1e9 / rate,
            next_ns: 0.0,
            index: 0,
            rng: Rng::new(seed),
        }
    }
}

impl Iterator for Arrivals {
    type Item = u64;

    /// The first request is due at 0; constant spacing is `index * gap` (no accumulated rounding).
    fn next(&mut self) -> Option<u64> {
        let at = if self.poisson {
            let at = self.next_ns;
            self.next_ns += self.rng.exponential(self.gap_ns);
            at
        } else {
            self.index as f64 * self.gap_ns
        };
        self.index += 1;
        Some(at.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_spacing_is_exact() {
        let offs: Vec<u64> = Arrivals::new(1000.0, false, 1).take(5).collect();
        assert_eq!(offs, vec![0, 1_000_000, 2_000_000, 3_000_000, 4_000_000]);
        // A rate that does not divide 1e9: the n-th offset is round(n * gap), no drift.
        let offs: Vec<u64> = Arrivals::new(3.0, false, 1).take(4).collect();
        assert_eq!(offs, vec![0, 333_333_333, 666_666_667, 1_000_000_000]);
        let last = Arrivals::new(7.0, false, 1).nth(700_000);
        assert_eq!(last, Some(100_000_000_000_000));
    }

    #[test]
    fn poisson_mean_and_variance_within_statistical_bounds() {
        // Fixed seed: deterministic. n = 100k exponential gaps of mean 1 ms: the sample mean has a
        // standard error of 1/sqrt(n) = 0.32 %; 5 sigma is 1.6 %. The coefficient of variation
        // of an exponential is 1.
        let n = 100_000usize;
        let offs: Vec<u64> = Arrivals::new(1000.0, true, 42).take(n + 1).collect();
        let gaps: Vec<f64> = offs.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 1e6).abs() < 0.016 * 1e6, "mean gap {mean}");
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        let cv = var.sqrt() / mean;
        assert!((cv - 1.0).abs() < 0.03, "cv {cv}");
        assert!(offs.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(offs[0], 0);
    }

    #[test]
    fn same_seed_same_schedule() {
        let a: Vec<u64> = Arrivals::new(500.0, true, 9).take(100).collect();
        let b: Vec<u64> = Arrivals::new(500.0, true, 9).take(100).collect();
        let c: Vec<u64> = Arrivals::new(500.0, true, 10).take(100).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn rng_helpers_stay_in_range() {
        let mut r = Rng::new(3);
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            let k = r.range(64, 256);
            assert!((64..=256).contains(&k));
        }
        assert_eq!(r.range(5, 5), 5);
        let n = 50_000;
        let mean = (0..n).map(|_| r.normal()).sum::<f64>() / f64::from(n);
        assert!(mean.abs() < 0.03, "normal mean {mean}");
    }
}
