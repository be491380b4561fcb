//! What an operator can tune: lease TTLs, access tokens, TLS, limits, the
//! HTTP listener.

use support::TokenPolicy;
use tonic::transport::ServerTlsConfig;

pub use crate::lease::Ttl;
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
    /// Where the registry's state lives (`--store`): memory by default.
    pub store: crate::store::etcd::StoreUrl,
    /// TLS (`--etcd-ca` ...) and the user (`--etcd-user`) to etcd.
    pub etcd_access: crate::store::etcd_client::EtcdAccess,
}
