//! One ADS stream, state of the world: what the client subscribed to per
//! resource type, what it was last sent, and the nonce it must answer.
//!
//! The rules followed (xDS protocol, "state of the world"; gRFC A27):
//! - Every response carries `version_info` (the registry revision it shows)
//!   and a fresh `nonce`. A request whose `response_nonce` is not the last
//!   nonce sent for its type is stale (the client had not yet seen our
//!   latest response) and is ignored.
//! - A request with `error_detail` is a NACK: logged with the client's
//!   message. Nothing is resent until the resources change, so a client
//!   that rejects something is not sent it again in a loop.
//! - A response is sent when a subscribed resource changed, appeared or
//!   went, or the client subscribed to a name it was not sent yet.
//! - Listener and Cluster responses hold every subscribed resource that
//!   exists (the protocol says a name missing from one is deleted), and
//!   name each subscribed one that does not in `resource_errors` with
//!   NOT_FOUND (xRFC TP3, honoured by gRPC per gRFC A88): a client dialing
//!   an unknown service fails its calls at once, saying so, instead of
//!   waiting out its 15 s does-not-exist timer.
//! - Assignments have no such rule, so an unknown (or vanished) service's
//!   is sent empty: no endpoints, calls fail with UNAVAILABLE at once.
//! - An empty subscription to Listeners or Clusters is a wildcard (every
//!   service); to assignments, nothing.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, ResourceError, ResourceName,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use envoy_types::util::pack_any;
use tonic::Status;

use crate::xds::cache::Snapshot;
use crate::xds::resources::{CLUSTER, ENDPOINTS, LISTENER};

/// Most resource names one stream may subscribe to per type (Listeners,
/// Clusters, assignments). A gRPC client subscribes to one of each per
/// service it dials.
pub const MAX_NAMES_PER_TYPE: usize = 1024;

/// How the registry names itself in responses (`control_plane.identifier`).
pub const CONTROL_PLANE_ID: &str = "registry";

/// The resource types served, in the order a client needs them.
const TYPES: [&str; 3] = [LISTENER, CLUSTER, ENDPOINTS];

/// What one resource was at when sent: the revision of its content, or
/// `ABSENT` for "does not exist".
type Version = u64;
const ABSENT: Version = u64::MAX;

/// One type's subscription on one stream.
#[derive(Debug, Default)]
struct Subscription {
    /// The names asked for; empty with `wildcard` set means every service.
    names: BTreeSet<String>,
    /// An empty subscription to Listeners or Clusters.
    wildcard: bool,
    /// Each name sent and at which version; `None` before the first
    /// response of this type.
    sent: Option<BTreeMap<String, Version>>,
    /// The nonce of the last response of this type.
    nonce: String,
}

/// The protocol state of one ADS stream.
#[derive(Debug, Default)]
pub struct AdsStream {
    /// By type URL; only the [`TYPES`] a client asked for.
    subscriptions: BTreeMap<&'static str, Subscription>,
    /// Numbers the nonces of this stream.
    responses: u64,
    /// The client's node id, for logs.
    node: String,
}

impl AdsStream {
    /// Takes one request. Returns an error (ending the stream) only for a
    /// request past a limit.
    pub fn request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        if let Some(node) = &request.node
            && self.node.is_empty()
        {
            self.node = node.id.clone();
        }
        let Some(&kind) = TYPES.iter().find(|t| **t == request.type_url) else {
            tracing::debug!(
                node = self.node,
                type_url = request.type_url,
                "xDS: a request for a type this registry does not serve; ignored"
            );
            return Ok(());
        };
        if request.resource_names.len() > MAX_NAMES_PER_TYPE {
            return Err(Status::resource_exhausted(format!(
                "xDS: {} resource names of type {kind} in one subscription (max {MAX_NAMES_PER_TYPE} per type per stream)",
                request.resource_names.len()
            )));
        }
        let sub = self.subscriptions.entry(kind).or_default();
        if !request.response_nonce.is_empty() && request.response_nonce != sub.nonce {
            tracing::debug!(
                node = self.node,
                type_url = kind,
                nonce = request.response_nonce,
                "xDS: stale request (the client has not seen our latest response); ignored"
            );
            return Ok(());
        }
        if let Some(error) = &request.error_detail {
            tracing::warn!(
                node = self.node,
                type_url = kind,
                rejected_nonce = request.response_nonce,
                kept_version = request.version_info,
                code = error.code,
                error = error.message,
                "xDS: the client rejected (NACKed) our resources; not resending them until they change"
            );
        }
        sub.wildcard = request.resource_names.is_empty() && kind != ENDPOINTS;
        sub.names = request.resource_names.into_iter().collect();
        Ok(())
    }

    /// The responses `snapshot` calls for, one per type at most (in
    /// Listener, Cluster, assignment order).
    pub fn responses(&mut self, snapshot: &Snapshot) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        for kind in TYPES {
            let Some(sub) = self.subscriptions.get_mut(kind) else {
                continue;
            };
            let wanted: Vec<&str> = if sub.wildcard {
                snapshot.services.keys().map(String::as_str).collect()
            } else {
                sub.names.iter().map(String::as_str).collect()
            };
            let versions: BTreeMap<String, Version> = wanted
                .iter()
                .map(|name| {
                    let version = match snapshot.services.get(*name) {
                        None => ABSENT,
                        Some(s) if kind == ENDPOINTS => s.changed,
                        Some(s) => s.created,
                    };
                    (name.to_string(), version)
                })
                .collect();
            let news = match &sub.sent {
                None => true,
                Some(sent) => versions.iter().any(|(n, v)| sent.get(n) != Some(v)),
            };
            if !news {
                // Forget what was unsubscribed, so subscribing again resends.
                sub.sent = Some(versions);
                continue;
            }
            let resources: Vec<Any> = wanted
                .iter()
                .filter_map(|name| match (snapshot.services.get(*name), kind) {
                    (Some(s), LISTENER) => Some(s.listener.clone()),
                    (Some(s), CLUSTER) => Some(s.cluster.clone()),
                    (Some(s), _) => Some(snapshot.assignment(s).clone()),
                    (None, ENDPOINTS) => Some(pack_any(ClusterLoadAssignment {
                        cluster_name: name.to_string(),
                        ..Default::default()
                    })),
                    (None, _) => None,
                })
                .collect();
            // xRFC TP3: say which subscribed names do not exist, so the
            // client fails at once (without it, a gRPC client waits 15 s
            // for a resource it never received before giving up).
            let resource_errors: Vec<ResourceError> = if kind == ENDPOINTS {
                Vec::new()
            } else {
                wanted
                    .iter()
                    .filter(|name| !snapshot.services.contains_key(**name))
                    .map(|name| ResourceError {
                        resource_name: Some(ResourceName {
                            name: name.to_string(),
                            ..Default::default()
                        }),
                        error_detail: Some(RpcStatus {
                            code: tonic::Code::NotFound as i32,
                            message: format!(
                                "no service {name:?} is registered (no instance of it) in the registry"
                            ),
                            details: Vec::new(),
                        }),
                    })
                    .collect()
            };
            self.responses += 1;
            sub.nonce = self.responses.to_string();
            sub.sent = Some(versions);
            tracing::debug!(
                node = self.node,
                type_url = kind,
                version = snapshot.revision,
                resources = resources.len(),
                "xDS: sending"
            );
            out.push(DiscoveryResponse {
                version_info: snapshot.revision.to_string(),
                resources,
                type_url: kind.to_string(),
                nonce: sub.nonce.clone(),
                resource_errors,
                control_plane: Some(envoy_types::pb::envoy::config::core::v3::ControlPlane {
                    identifier: CONTROL_PLANE_ID.to_string(),
                }),
                ..Default::default()
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::xds::ask;

    /// `instances` (service, id, weight) registered, one revision each.
    fn snapshot(instances: &[(&str, &str, u32)]) -> Snapshot {
        then(Snapshot::empty(), instances)
    }

    /// `base` with `instances` added, as the cache does it.
    fn then(base: Snapshot, instances: &[(&str, &str, u32)]) -> Snapshot {
        let puts: Vec<_> = instances
            .iter()
            .map(|&(service, id, weight)| (service, id, "127.0.0.1", weight))
            .collect();
        base.with_puts(&puts)
    }

    #[test]
    fn subscribe_ack_change_and_nack_follow_the_protocol() {
        let mut stream = AdsStream::default();
        let s1 = snapshot(&[("calc", "a", 1)]);
        stream.request(ask(LISTENER, &["calc"], "")).unwrap();
        let r = stream.responses(&s1);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].type_url.as_str(), r[0].resources.len()),
            (LISTENER, 1)
        );
        assert_eq!(r[0].version_info, "1");
        let nonce = r[0].nonce.clone();
        // The ACK changes nothing: no response.
        stream.request(ask(LISTENER, &["calc"], &nonce)).unwrap();
        assert!(stream.responses(&s1).is_empty());
        // EDS then; a new instance is pushed, the listener is not resent.
        stream.request(ask(ENDPOINTS, &["calc"], "")).unwrap();
        let r = stream.responses(&s1);
        assert_eq!((r.len(), r[0].type_url.as_str()), (1, ENDPOINTS));
        let eds_nonce = r[0].nonce.clone();
        let s2 = then(s1.clone(), &[("calc", "b", 1)]);
        let r = stream.responses(&s2);
        assert_eq!((r.len(), r[0].type_url.as_str()), (1, ENDPOINTS));
        assert_ne!(r[0].nonce, eds_nonce);
        // A request answering the older nonce is stale: ignored, even its names.
        stream
            .request(ask(ENDPOINTS, &["other"], &eds_nonce))
            .unwrap();
        assert!(stream.responses(&s2).is_empty());
        // A NACK of the latest: logged, nothing resent.
        let mut nack = ask(ENDPOINTS, &["calc"], &r[0].nonce);
        nack.error_detail = Some(Default::default());
        stream.request(nack).unwrap();
        assert!(stream.responses(&s2).is_empty());
    }

    #[test]
    fn a_missing_service_is_reported_at_once() {
        let mut stream = AdsStream::default();
        let empty = snapshot(&[]);
        stream.request(ask(LISTENER, &["nope"], "")).unwrap();
        stream.request(ask(ENDPOINTS, &["nope"], "")).unwrap();
        let r = stream.responses(&empty);
        assert_eq!(r.len(), 2);
        assert!(r[0].resources.is_empty(), "no listener: it does not exist");
        let error = &r[0].resource_errors[0];
        assert_eq!(error.resource_name.as_ref().unwrap().name, "nope");
        assert_eq!(
            error.error_detail.as_ref().unwrap().code,
            tonic::Code::NotFound as i32
        );
        assert_eq!(r[1].resources.len(), 1, "an empty assignment");
        // It appears: both are pushed.
        let r = stream.responses(&then(empty, &[("nope", "a", 1)]));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].resources.len(), 1);
        assert!(r[0].resource_errors.is_empty());
    }

    #[test]
    fn wildcard_and_limits() {
        let mut stream = AdsStream::default();
        stream.request(ask(CLUSTER, &[], "")).unwrap();
        let r = stream.responses(&snapshot(&[("a", "1", 1), ("b", "1", 1)]));
        assert_eq!(r[0].resources.len(), 2);
        let names: Vec<String> = (0..=MAX_NAMES_PER_TYPE).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let err = stream.request(ask(LISTENER, &refs, "")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // Unknown types are ignored, not an error.
        stream
            .request(ask("type.googleapis.com/x.Y", &["a"], ""))
            .unwrap();
    }
}
