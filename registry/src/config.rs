//! What an operator can tune: lease TTLs, access tokens, TLS, limits, the
//! HTTP listener.

use std::time::Duration;

use support::TokenPolicy;
use tonic::transport::ServerTlsConfig;

use crate::limits::{PeerConfig, Quotas};
use crate::watch::WatchLimits;

/// Settings of one registry server.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Lease TTL bounds.
    pub ttl: Ttl,
    /// Tokens required by calls (none by default: anyone may read and
    /// write, as on a trusted LAN).
    pub tokens: TokenPolicy,
    /// TLS for the listener; `None` serves plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// Instances per lease and per service.
    pub quotas: Quotas,
    /// Per-peer limits: registrations per second, Watch streams per
    /// connection.
    pub peers: PeerConfig,
    /// The watch path's memory budgets.
    pub watch: WatchLimits,
    /// The HTTP listener's limits (metrics and dashboard).
    pub http: crate::http::HttpConfig,
    /// The DNS interface (`--dns`); `None`: off.
    pub dns: Option<crate::dns::DnsConfig>,
}

/// Lease TTL bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl {
    /// TTL of a lease whose GrantLease asked for 0.
    pub default: Duration,
    /// Shortest TTL granted: shorter requests are raised to it, so a node
    /// cannot make the registry sweep (and watchers churn) every millisecond.
    pub min: Duration,
    /// Longest TTL granted: a dead node's instances must vanish eventually.
    pub max: Duration,
}

impl Default for Ttl {
    fn default() -> Ttl {
        Ttl {
            default: Duration::from_millis(1500),
            min: Duration::from_millis(100),
            max: Duration::from_millis(300_000),
        }
    }
}

impl Ttl {
    /// The TTL granted for a request of `requested_ms` (0: the default),
    /// clamped to `min..=max`.
    pub fn granted(&self, requested_ms: u64) -> Duration {
        let requested = if requested_ms == 0 {
            self.default
        } else {
            Duration::from_millis(requested_ms)
        };
        requested.clamp(self.min, self.max.max(self.min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_defaulted_and_clamped() {
        let t = Ttl::default();
        assert_eq!(t.granted(0), Duration::from_millis(1500));
        assert_eq!(t.granted(1), Duration::from_millis(100));
        assert_eq!(t.granted(5000), Duration::from_millis(5000));
        assert_eq!(t.granted(u64::MAX), Duration::from_millis(300_000));
    }
}
