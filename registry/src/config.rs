//! What an operator can tune: the lease TTLs.

use std::time::Duration;

/// Settings of one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// TTL of a lease whose GrantLease asked for 0.
    pub default_ttl: Duration,
    /// Shortest TTL granted: shorter requests are raised to it, so a node
    /// cannot make the registry sweep (and watchers churn) every millisecond.
    pub min_ttl: Duration,
    /// Longest TTL granted: a dead node's instances must vanish eventually.
    pub max_ttl: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            default_ttl: Duration::from_millis(1500),
            min_ttl: Duration::from_millis(100),
            max_ttl: Duration::from_millis(300_000),
        }
    }
}

impl Config {
    /// The TTL granted for a request of `requested_ms` (0: the default),
    /// clamped to `min_ttl..=max_ttl`.
    pub fn ttl_for(&self, requested_ms: u64) -> Duration {
        let requested = if requested_ms == 0 {
            self.default_ttl
        } else {
            Duration::from_millis(requested_ms)
        };
        requested.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_defaulted_and_clamped() {
        let c = Config::default();
        assert_eq!(c.ttl_for(0), Duration::from_millis(1500));
        assert_eq!(c.ttl_for(1), Duration::from_millis(100));
        assert_eq!(c.ttl_for(5000), Duration::from_millis(5000));
        assert_eq!(c.ttl_for(u64::MAX), Duration::from_millis(300_000));
    }
}
