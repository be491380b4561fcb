//! The three xDS resources of one registered service, as a gRPC xDS client
//! dialing `xds:///SERVICE` asks for them (gRFC A27):
//!
//! - a `Listener` named `SERVICE` whose `api_listener` is an
//!   `HttpConnectionManager` with its route table inline (no RDS round
//!   trip) and the router filter last (clients NACK a listener without it);
//! - a `Cluster` named `SERVICE` of type EDS, its endpoints over ADS;
//! - a `ClusterLoadAssignment` for `SERVICE` with **one locality per
//!   instance**, weighted by the instance's weight.
//!
//! Why localities: gRPC's xDS clients ignore the per-endpoint
//! `load_balancing_weight` under their default policy (round robin), but
//! split traffic between localities by locality weight
//! (gRFC A27; grpc/grpc#32004). One locality per instance makes the
//! registered weight the share of calls. A locality of weight 0 would get
//! no traffic, and neither does an instance of weight 0: it is left out.
//!
//! A gRPC client takes an endpoint's address as an IP literal only (it
//! NACKs the whole assignment otherwise), so an instance registered under a
//! DNS name is left out of the assignment too (logged once per change).

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality,
    SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;

/// Type URL of a Listener (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of a Cluster (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of a ClusterLoadAssignment (EDS).
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of a RouteConfiguration (RDS). Never needed: routes are inline.
pub const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The region every locality is in; the zone is the instance's id.
pub const REGION: &str = "registry";

/// What the assignment needs of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The instance's id, unique within its service: its locality's zone.
    pub instance_id: String,
    /// An IP literal or a DNS name (the latter is left out, see the module docs).
    pub host: String,
    /// 1 to 65535.
    pub port: u32,
    /// The instance's weight; 0 gets no traffic.
    pub weight: u32,
}

impl Backend {
    /// The host as an IP address, `None` for a DNS name.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        host.parse().ok()
    }
}

/// The Listener of `service`: an API listener whose only route sends every
/// call to the cluster of the same name.
pub fn listener(service: &str) -> Any {
    let routes = RouteConfiguration {
        name: service.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: service.to_string(),
            // The client matches the authority it dials (`SERVICE`); any
            // name will do, as this route table serves one service.
            domains: vec!["*".to_string()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(service.to_string())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::RouteConfig(routes)),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_string(),
            config_type: Some(ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    pack_any(Listener {
        name: service.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    })
}

/// The Cluster of `service`: endpoints by EDS over the same ADS stream,
/// round robin within a locality.
pub fn cluster(service: &str) -> Any {
    pack_any(Cluster {
        name: service.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds.into())),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                resource_api_version: ApiVersion::V3.into(),
                ..Default::default()
            }),
            service_name: service.to_string(),
        }),
        lb_policy: LbPolicy::RoundRobin.into(),
        ..Default::default()
    })
}

/// The ClusterLoadAssignment of `service`: one locality per instance of
/// non-zero weight and IP address, weighted by it. `endpoints` in any order;
/// the assignment lists them by instance id, so equal inputs give equal
/// bytes. Returns it and how many instances were left out for a DNS-name
/// host.
pub fn assignment<'a>(
    service: &str,
    endpoints: impl IntoIterator<Item = &'a Backend>,
) -> (Any, usize) {
    let mut named = 0;
    let mut localities: Vec<LocalityLbEndpoints> = Vec::new();
    for e in endpoints {
        if e.weight == 0 {
            continue;
        }
        let Some(ip) = e.ip() else {
            named += 1;
            continue;
        };
        localities.push(LocalityLbEndpoints {
            locality: Some(Locality {
                region: REGION.to_string(),
                zone: e.instance_id.clone(),
                sub_zone: String::new(),
            }),
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(AddressKind::SocketAddress(SocketAddress {
                            address: ip.to_string(),
                            port_specifier: Some(PortSpecifier::PortValue(e.port)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                health_status: HealthStatus::Healthy.into(),
                load_balancing_weight: Some(UInt32Value { value: e.weight }),
                ..Default::default()
            }],
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            priority: 0,
            ..Default::default()
        });
    }
    localities.sort_by(|a, b| {
        let zone = |l: &LocalityLbEndpoints| l.locality.as_ref().map(|l| l.zone.clone());
        zone(a).cmp(&zone(b))
    });
    let assignment = ClusterLoadAssignment {
        cluster_name: service.to_string(),
        endpoints: localities,
        ..Default::default()
    };
    (pack_any(assignment), named)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn decode<T: Message + Default>(any: &Any) -> T {
        T::decode(any.value.as_slice()).unwrap()
    }

    fn endpoint(id: &str, host: &str, weight: u32) -> Backend {
        Backend {
            instance_id: id.to_string(),
            host: host.to_string(),
            port: 7000,
            weight,
        }
    }

    #[test]
    fn the_listener_routes_everything_to_the_cluster_and_ends_with_the_router() {
        let any = listener("calculator");
        assert_eq!(any.type_url, LISTENER);
        let l: Listener = decode(&any);
        assert_eq!(l.name, "calculator");
        let api = l.api_listener.unwrap().api_listener.unwrap();
        assert!(api.type_url.ends_with(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
        ));
        let m: HttpConnectionManager = decode(&api);
        let last = m.http_filters.last().unwrap();
        let Some(ConfigType::TypedConfig(router)) = &last.config_type else {
            panic!("router filter without typed config")
        };
        assert_eq!(
            router.type_url,
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        );
        let Some(RouteSpecifier::RouteConfig(rc)) = m.route_specifier else {
            panic!("routes are not inline")
        };
        let route = &rc.virtual_hosts[0].routes[0];
        let Some(Action::Route(action)) = &route.action else {
            panic!("no route action")
        };
        assert_eq!(
            action.cluster_specifier,
            Some(ClusterSpecifier::Cluster("calculator".into()))
        );
    }

    #[test]
    fn the_cluster_is_eds_over_ads() {
        let c: Cluster = decode(&cluster("calculator"));
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds.into()))
        );
        let eds = c.eds_cluster_config.unwrap();
        assert_eq!(eds.service_name, "calculator");
        assert!(matches!(
            eds.eds_config.unwrap().config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ));
    }

    #[test]
    fn one_weighted_locality_per_instance_and_no_weight_zero_or_dns_names() {
        let endpoints = [
            endpoint("b", "10.0.0.2", 1),
            endpoint("a", "10.0.0.1", 3),
            endpoint("drained", "10.0.0.3", 0),
            endpoint("named", "node.example", 5),
            endpoint("v6", "[::1]", 2),
        ];
        let (any, named) = assignment("calculator", &endpoints);
        assert_eq!(named, 1);
        let cla: ClusterLoadAssignment = decode(&any);
        assert_eq!(cla.cluster_name, "calculator");
        let got: Vec<(String, u32, String)> = cla
            .endpoints
            .iter()
            .map(|l| {
                let Some(HostIdentifier::Endpoint(e)) = &l.lb_endpoints[0].host_identifier else {
                    panic!("no endpoint")
                };
                let Some(AddressKind::SocketAddress(a)) =
                    e.address.as_ref().unwrap().address.as_ref()
                else {
                    panic!("no socket address")
                };
                (
                    l.locality.as_ref().unwrap().zone.clone(),
                    l.load_balancing_weight.unwrap().value,
                    a.address.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 3, "10.0.0.1".into()),
                ("b".into(), 1, "10.0.0.2".into()),
                ("v6".into(), 2, "::1".into()),
            ]
        );
        // Same instances in another order: the same bytes (no spurious push).
        let mut reversed = endpoints.clone();
        reversed.reverse();
        assert_eq!(assignment("calculator", &reversed).0, any);
    }
}
