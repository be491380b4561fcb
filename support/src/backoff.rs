//! Exponential backoff with jitter, for every retry loop of the system (the
//! node host's registry sessions and rate-limited registrations, the
//! client's watch reconnection).
//!
//! Why not a crate: `backon` (the maintained one; `backoff` is archived)
//! adds its jitter on top of the delay, within `(0, delay)`, so delays
//! range up to twice the ceiling and past the maximum, and its `Retryable`
//! wraps one future, while our loops sleep in a `select!` that a shutdown
//! or a configuration change cuts short, and reset after a success. What
//! they need is a few lines: the delay drawn within `[ceiling/2, ceiling]`,
//! a count of failures for the logs, and a reset.

use std::time::Duration;

/// Delays that double from `start` to `max`, each drawn between half and
/// all of the current ceiling (unless [`without_jitter`](Self::without_jitter)).
/// Jitter keeps a room full of nodes from reconnecting in lockstep after a
/// registry restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The first ceiling, and the one [`reset`](Self::reset) goes back to.
    start: Duration,
    /// The largest ceiling.
    max: Duration,
    /// The current ceiling.
    ceiling: Duration,
    /// Whether delays are drawn below the ceiling (true) or are the ceiling.
    jitter: bool,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    /// Delays from `start` doubling up to `max`, with jitter.
    pub const fn new(start: Duration, max: Duration) -> Backoff {
        Backoff {
            start,
            max,
            ceiling: start,
            jitter: true,
            failures: 0,
        }
    }

    /// Each delay is exactly the ceiling: for a pause a server asked for,
    /// where waiting less than asked only earns another refusal.
    pub const fn without_jitter(mut self) -> Backoff {
        self.jitter = false;
        self
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The largest ceiling.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }

    /// Records a failure and returns the delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.ceiling;
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        if !self.jitter {
            return ceiling;
        }
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::random_range(ms / 2..=ms))
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.ceiling = self.start;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(START, MAX);
        let mut ceilings = vec![];
        for _ in 0..8 {
            let ceiling = b.ceiling;
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert!(b.next_delay() <= START);
    }

    #[test]
    fn without_jitter_each_delay_is_the_ceiling_and_failures_count() {
        let mut b = Backoff::new(START, MAX).without_jitter();
        let delays: Vec<u128> = (0..3).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400]);
        assert_eq!(b.failures(), 3);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.ceiling(), START);
    }
}
