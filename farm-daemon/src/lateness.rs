//! Heartbeat lateness as a histogram: how long after its due time a heartbeat was sent, and how
//! long after its arrival (the kernel's receive timestamp) a received one was judged. Both stay
//! near zero while nothing delays the heartbeat thread; a busy or starved member shows here
//! first, long before a peer is declared lost.
//!
//! Pure: the heartbeat thread records samples, status and metrics read copies.

use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (the last bucket is unbounded).
pub const BOUNDS_US: [u64; 13] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// One lateness histogram (cumulative since start).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Histogram {
    /// Samples per bucket (`BOUNDS_US`, then one more for larger values); not cumulative.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_us: u64,
    pub max_us: u64,
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; BOUNDS_US.len() + 1];
        }
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BOUNDS_US.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// The upper bound of the bucket that holds quantile `q` (0..=1), capped by the largest
    /// sample; zero without samples.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return BOUNDS_US
                    .get(i)
                    .copied()
                    .unwrap_or(u64::MAX)
                    .min(self.max_us);
            }
        }
        self.max_us
    }

    /// Cumulative (bound in seconds, samples at or below it) pairs, as Prometheus wants them;
    /// the last pair is +Inf.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        let mut out = Vec::with_capacity(BOUNDS_US.len() + 1);
        for i in 0..=BOUNDS_US.len() {
            acc += self.counts.get(i).copied().unwrap_or(0);
            let bound = BOUNDS_US.get(i).map_or(f64::INFINITY, |&b| b as f64 / 1e6);
            out.push((bound, acc));
        }
        out
    }
}

/// Both directions.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lateness {
    /// From a heartbeat's due time to its send.
    pub send: Histogram,
    /// From a heartbeat's arrival on the socket to its processing.
    pub receive: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds_capped_by_the_largest_sample() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_us(0.99), 0);
        for _ in 0..98 {
            h.record(Duration::from_micros(50));
        }
        h.record(Duration::from_millis(3));
        h.record(Duration::from_millis(40));
        assert_eq!(h.count, 100);
        assert_eq!(h.quantile_us(0.5), 100);
        assert_eq!(h.quantile_us(0.99), 5_000);
        assert_eq!(h.quantile_us(1.0), 40_000);
        assert_eq!(h.max_us, 40_000);
        let c = h.cumulative();
        assert_eq!(c.first(), Some(&(0.0001, 98)));
        assert_eq!(
            c.last().map(|&(b, n)| (b.is_infinite(), n)),
            Some((true, 100))
        );
    }

    #[test]
    fn a_second_and_more_goes_to_the_last_bucket() {
        let mut h = Histogram::default();
        h.record(Duration::from_secs(3));
        assert_eq!(h.counts[BOUNDS_US.len()], 1);
        assert_eq!(h.quantile_us(0.99), 3_000_000);
    }
}
