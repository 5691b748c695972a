//! Token buckets as GCRA (generic cell rate algorithm) on integers, and the local limiter store.
//!
//! A bucket is one number, its theoretical arrival time (TAT): the instant at which it would be
//! full again. Admitting `cost` tokens moves the TAT forward by `cost` emission intervals; the
//! request fits while the TAT stays within `burst` intervals of now. A rejection changes nothing,
//! so a refused request leaves no count behind.
//!
//! Time is kept *scaled by the rate* (`ns × rate_per_min`), so one token is exactly
//! `60e9` scaled units and nothing is ever rounded: remaining / reset / retry-after values are
//! exact for any rate. The clock is a parameter (`now_ns`, any monotonic origin), so tests use
//! a fake clock; the binding layer supplies a monotonic one.

use std::collections::HashMap;

/// Nanoseconds per minute: one token's emission interval, in rate-scaled time.
const TOKEN: u128 = 60_000_000_000;
const NS_PER_MS: u128 = 1_000_000;

/// The outcome of one admission decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Tokens still available right after this decision.
    pub remaining: u64,
    /// Milliseconds (rounded up) until the bucket is full again.
    pub reset_ms: u64,
    /// Milliseconds (rounded up) until this request would fit; 0 when allowed. A cost larger
    /// than the burst never fits: then it is `reset_ms` (the best the bucket can do).
    pub retry_after_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Theoretical arrival time in `ns × rate` units.
    tat: u128,
    rate: u64,
}

impl Bucket {
    /// Re-express the TAT for a new rate (the key's tier changed): the same instant, new scale.
    fn rescale(&mut self, rate: u64) {
        if self.rate != rate {
            self.tat = (self.tat / u128::from(self.rate)).saturating_mul(u128::from(rate));
            self.rate = rate;
        }
    }
}

fn ceil_div(a: u128, b: u128) -> u128 {
    a.div_ceil(b)
}

fn saturate(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Scaled time -> milliseconds, rounded up.
fn ms(scaled: u128, rate: u64) -> u64 {
    saturate(ceil_div(scaled, u128::from(rate) * NS_PER_MS))
}

/// One GCRA step on `tat` (`None`: a full bucket). Returns the decision and the new TAT if
/// the request was admitted. `rate` and `burst` must be > 0.
fn decide(
    tat: Option<u128>,
    cost: u64,
    rate: u64,
    burst: u64,
    now_ns: u64,
) -> (Decision, Option<u128>) {
    let now = u128::from(now_ns) * u128::from(rate);
    let tolerance = u128::from(burst) * TOKEN;
    let start = tat.map_or(now, |t| t.max(now));
    let new_tat = start.saturating_add(u128::from(cost) * TOKEN);
    let used = new_tat - now;
    if used <= tolerance {
        let decision = Decision {
            allowed: true,
            remaining: saturate((tolerance - used) / TOKEN),
            reset_ms: ms(used, rate),
            retry_after_ms: 0,
        };
        return (decision, Some(new_tat));
    }
    let held = start - now;
    let reset_ms = ms(held, rate);
    let retry_after_ms = if u128::from(cost) > u128::from(burst) {
        reset_ms
    } else {
        ms(used - tolerance, rate)
    };
    let decision = Decision {
        allowed: false,
        remaining: saturate(tolerance.saturating_sub(held) / TOKEN),
        reset_ms,
        retry_after_ms,
    };
    (decision, None)
}

/// Buckets keyed by string (a principal, team, ...), bounded in size.
///
/// A bucket whose TAT has passed is full, which is exactly what an absent bucket means, so idle
/// buckets are dropped without changing any decision. When the store reaches `max_keys`, one
/// sweep drops every idle bucket; if all of them are busy (more distinct active keys than the
/// bound), arbitrary busy ones are dropped too (those keys start over with a full bucket:
/// fail-open, counted in `evicted_busy`), so memory never grows past the bound.
#[derive(Debug)]
pub struct LocalLimiter {
    buckets: HashMap<String, Bucket>,
    max_keys: usize,
    evicted_busy: u64,
}

impl LocalLimiter {
    #[must_use]
    pub fn new(max_keys: usize) -> Self {
        Self {
            buckets: HashMap::new(),
            max_keys: max_keys.max(1),
            evicted_busy: 0,
        }
    }

    /// Admit `cost` tokens against a bucket of `burst` tokens refilled at `rate_per_min`.
    /// `cost = 0` is a pure read (never refused). Returns `None` if `rate_per_min` or `burst` is 0.
    pub fn acquire(
        &mut self,
        key: &str,
        cost: u64,
        rate_per_min: u64,
        burst: u64,
        now_ns: u64,
    ) -> Option<Decision> {
        if rate_per_min == 0 || burst == 0 {
            return None;
        }
        if let Some(b) = self.buckets.get_mut(key) {
            b.rescale(rate_per_min);
            let (decision, new_tat) = decide(Some(b.tat), cost, rate_per_min, burst, now_ns);
            if let Some(t) = new_tat {
                b.tat = t;
            }
            return Some(decision);
        }
        let (decision, new_tat) = decide(None, cost, rate_per_min, burst, now_ns);
        if let (Some(tat), true) = (new_tat, cost > 0) {
            self.make_room(now_ns);
            self.buckets.insert(
                key.to_owned(),
                Bucket {
                    tat,
                    rate: rate_per_min,
                },
            );
        }
        Some(decision)
    }

    /// Give back `amount` tokens taken earlier (settling a reservation with smaller real use).
    /// The bucket never holds more than its burst: a TAT in the past means full. Unknown keys
    /// (already full and dropped) are a no-op.
    pub fn refund(&mut self, key: &str, amount: u64) {
        if let Some(b) = self.buckets.get_mut(key) {
            b.tat = b.tat.saturating_sub(u128::from(amount) * TOKEN);
        }
    }

    /// Take `amount` tokens unconditionally (real use beyond the reservation): later requests
    /// wait for it. The bucket is created if absent.
    pub fn charge(&mut self, key: &str, amount: u64, rate_per_min: u64, now_ns: u64) {
        if rate_per_min == 0 || amount == 0 {
            return;
        }
        let now = u128::from(now_ns) * u128::from(rate_per_min);
        let extra = u128::from(amount) * TOKEN;
        if let Some(b) = self.buckets.get_mut(key) {
            b.rescale(rate_per_min);
            b.tat = b.tat.max(now).saturating_add(extra);
            return;
        }
        self.make_room(now_ns);
        self.buckets.insert(
            key.to_owned(),
            Bucket {
                tat: now.saturating_add(extra),
                rate: rate_per_min,
            },
        );
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    #[must_use]
    pub fn evicted_busy(&self) -> u64 {
        self.evicted_busy
    }

    /// Drop every idle (full) bucket; returns how many remain.
    pub fn sweep(&mut self, now_ns: u64) -> usize {
        self.buckets
            .retain(|_, b| b.tat > u128::from(now_ns) * u128::from(b.rate));
        self.buckets.len()
    }

    fn make_room(&mut self, now_ns: u64) {
        if self.buckets.len() < self.max_keys {
            return;
        }
        // Sweep down to 7/8 of the bound so a store full of busy keys does not sweep per insert.
        let target = self.max_keys - self.max_keys / 8 - 1;
        if self.sweep(now_ns) <= target {
            return;
        }
        let excess = self.buckets.len() - target;
        let victims: Vec<String> = self.buckets.keys().take(excess).cloned().collect();
        for k in &victims {
            self.buckets.remove(k);
        }
        self.evicted_busy += victims.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::{Decision, LocalLimiter};

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn d(allowed: bool, remaining: u64, reset_ms: u64, retry_after_ms: u64) -> Decision {
        Decision {
            allowed,
            remaining,
            reset_ms,
            retry_after_ms,
        }
    }

    /// 60 per minute, burst 3: one token per second; each step is (now, cost) -> decision.
    #[test]
    fn gcra_table_with_a_fake_clock() {
        let table: &[(u64, u64, Decision)] = &[
            (0, 1, d(true, 2, 1_000, 0)),
            (0, 1, d(true, 1, 2_000, 0)),
            (0, 1, d(true, 0, 3_000, 0)),
            (0, 1, d(false, 0, 3_000, 1_000)), // refused: no count left behind
            (500 * MS, 1, d(false, 0, 2_500, 500)),
            (S, 1, d(true, 0, 3_000, 0)), // one token refilled after 1 s
            (S, 0, d(true, 0, 3_000, 0)), // cost 0 reads without taking
            (4 * S, 2, d(true, 1, 2_000, 0)), // full again at 4 s
            (4 * S, 2, d(false, 1, 2_000, 1_000)),
            (4 * S, 4, d(false, 1, 2_000, 2_000)), // more than the burst never fits
            (100 * S, 3, d(true, 0, 3_000, 0)),
        ];
        let mut lim = LocalLimiter::new(16);
        for (i, &(now, cost, want)) in table.iter().enumerate() {
            let got = lim.acquire("k", cost, 60, 3, now);
            assert_eq!(got, Some(want), "step {i}: now={now} cost={cost}");
        }
    }

    #[test]
    fn rates_that_do_not_divide_a_minute_stay_exact() {
        // 7 per minute: 60/7 s = 8571.428.. ms per token; 3 tokens taken -> reset 25714.28.. ms.
        let mut lim = LocalLimiter::new(4);
        assert_eq!(lim.acquire("k", 3, 7, 7, 0), Some(d(true, 4, 25_715, 0)));
        assert_eq!(
            lim.acquire("k", 5, 7, 7, 0),
            Some(d(false, 4, 25_715, 8_572))
        );
        // 8571428571 ns later exactly one token is not yet back; 1 ns later it is.
        assert_eq!(
            lim.acquire("k", 5, 7, 7, 8_571_428_571).map(|x| x.allowed),
            Some(false)
        );
        assert_eq!(
            lim.acquire("k", 5, 7, 7, 8_571_428_572).map(|x| x.allowed),
            Some(true)
        );
    }

    #[test]
    fn keys_are_independent_and_limits_must_be_positive() {
        let mut lim = LocalLimiter::new(4);
        assert!(lim.acquire("a", 1, 1, 1, 0).is_some_and(|x| x.allowed));
        assert!(lim.acquire("a", 1, 1, 1, 0).is_some_and(|x| !x.allowed));
        assert!(lim.acquire("b", 1, 1, 1, 0).is_some_and(|x| x.allowed));
        assert_eq!(lim.acquire("a", 1, 0, 1, 0), None);
        assert_eq!(lim.acquire("a", 1, 1, 0, 0), None);
    }

    #[test]
    fn refund_returns_unused_reservation_and_never_overfills() {
        let mut lim = LocalLimiter::new(4);
        // 600 tokens/min, burst 600: reserve 500, use 120 -> refund 380.
        assert_eq!(
            lim.acquire("k", 500, 600, 600, 0),
            Some(d(true, 100, 50_000, 0))
        );
        lim.refund("k", 380);
        assert_eq!(
            lim.acquire("k", 0, 600, 600, 0),
            Some(d(true, 480, 12_000, 0))
        );
        lim.refund("k", 10_000); // more than was taken: just full
        assert_eq!(lim.acquire("k", 0, 600, 600, 0), Some(d(true, 600, 0, 0)));
        lim.refund("unknown", 5); // no-op, no bucket created
        assert_eq!(lim.len(), 1);
    }

    #[test]
    fn charge_takes_beyond_the_burst_and_later_requests_wait() {
        let mut lim = LocalLimiter::new(4);
        assert!(lim.acquire("k", 10, 60, 10, 0).is_some_and(|x| x.allowed));
        lim.charge("k", 5, 60, 0); // real use was 15
        assert_eq!(
            lim.acquire("k", 1, 60, 10, 0),
            Some(d(false, 0, 15_000, 6_000))
        );
        lim.charge("new", 2, 60, 0);
        assert_eq!(lim.acquire("new", 0, 60, 10, 0), Some(d(true, 8, 2_000, 0)));
    }

    #[test]
    fn a_tier_change_keeps_the_instant_of_the_tat() {
        let mut lim = LocalLimiter::new(4);
        assert!(lim.acquire("k", 2, 60, 10, 0).is_some_and(|x| x.allowed)); // full again at 2 s
                                                                            // At 120/min the same instant (2 s) is 4 tokens of a 10-token bucket.
        assert_eq!(lim.acquire("k", 0, 120, 10, 0), Some(d(true, 6, 2_000, 0)));
    }

    #[test]
    fn store_is_bounded_and_drops_idle_buckets_first() {
        let mut lim = LocalLimiter::new(8);
        for i in 0..8 {
            assert!(lim
                .acquire(&format!("k{i}"), 1, 60, 5, 0)
                .is_some_and(|x| x.allowed));
        }
        assert_eq!(lim.len(), 8);
        // At 2 s every bucket is full again: the insert sweeps them all, nothing busy is lost.
        assert!(lim
            .acquire("fresh", 1, 60, 5, 2 * S)
            .is_some_and(|x| x.allowed));
        assert_eq!((lim.len(), lim.evicted_busy()), (1, 0));
        // All busy: the bound still holds, and the evictions are counted.
        for i in 0..100 {
            assert!(lim
                .acquire(&format!("b{i}"), 1, 60, 5, 2 * S)
                .is_some_and(|x| x.allowed));
            assert!(lim.len() <= 8);
        }
        assert!(lim.evicted_busy() > 0);
        // Reads of unknown keys create nothing.
        assert!(lim
            .acquire("read-only", 0, 60, 5, 2 * S)
            .is_some_and(|x| x.remaining == 5));
        assert!(lim.len() <= 8);
    }

    #[test]
    fn huge_values_saturate_instead_of_overflowing() {
        let mut lim = LocalLimiter::new(4);
        let got = lim.acquire("k", u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert!(got.is_some_and(|x| x.allowed));
        let got = lim.acquire("k", u64::MAX, 1, u64::MAX, u64::MAX);
        assert!(got.is_some_and(|x| !x.allowed));
        let got = lim.acquire("j", 1, 1, 1, u64::MAX);
        assert!(got.is_some_and(|x| x.allowed && x.reset_ms == 60_000));
        lim.charge("k", u64::MAX, u64::MAX, u64::MAX);
    }
}
