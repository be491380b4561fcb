//! Latency summaries and throughput counting.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    /// How many samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (reordered in place). `None` when empty.
    pub fn of(samples: &mut [Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        Some(Summary {
            count: samples.len(),
            p50_ms: ms(percentile(samples, 50.0)),
            p99_ms: ms(percentile(samples, 99.0)),
            max_ms: ms(samples[samples.len() - 1]),
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank: the smallest sample with at least p% of samples at or
    // below it. Rounding up keeps p99 of 100 samples at the 99th, not the 100th.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration in milliseconds, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Result of running a closed loop of clients for a while.
#[derive(Debug, Default)]
pub struct Load {
    /// Operations completed successfully.
    pub ops: u64,
    /// Operations that failed (counted, not retried).
    pub errors: u64,
    /// Wall time from the first client's start to the last one's end.
    pub elapsed: Duration,
    /// Latency of each successful operation.
    pub latencies: Vec<Duration>,
}

impl Load {
    /// Successful operations per second.
    pub fn per_sec(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Summary::of(&mut samples).unwrap_or_else(|| panic!("empty"));
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let mut samples = vec![Duration::from_micros(1500)];
        let s = Summary::of(&mut samples).unwrap_or_else(|| panic!("empty"));
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (1.5, 1.5, 1.5));
        assert!(Summary::of(&mut []).is_none());
    }

    #[test]
    fn throughput_of_nothing_is_zero() {
        assert_eq!(Load::default().per_sec(), 0.0);
        let load = Load {
            ops: 500,
            elapsed: Duration::from_millis(250),
            ..Load::default()
        };
        assert_eq!(load.per_sec(), 2000.0);
    }
}
