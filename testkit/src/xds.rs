//! xDS requests as a gRPC xDS client sends them, for the registry's ADS
//! unit tests and the end-to-end xDS tests.

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

/// A request for resources `names` of type `kind`, acknowledging `nonce`
/// (empty: the first request of that type).
pub fn ask(kind: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: kind.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}
