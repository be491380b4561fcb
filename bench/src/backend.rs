//! The operations every measure needs, for every system: our registry, etcd
//! and r-nacos. Each measure is written once against [`Backend`] so all
//! systems run exactly the same workload.
//!
//! `etcd-store` is our registry again, started over etcd: it takes our
//! client unchanged, so its column differs from ours only in the store.
//!
//! The mapping onto etcd is the usual way a registry is built on it: an
//! instance is a key `/registry/<service>/<instance_id>` holding the encoded
//! [`Instance`] and attached to a lease; resolving a service is a range read
//! on its prefix; following it is a watch on that prefix.
//!
//! The mapping onto r-nacos is Nacos's own (see [`crate::nacos`]): the lease
//! is the connection (ephemeral instances live as long as it), so granting
//! one does nothing and revoking it ends the connection; resolving is a
//! ServiceQueryRequest; following a service is a SubscribeServiceRequest and
//! the pushes after it, whose full states are turned into changes.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use futures::stream::BoxStream;
use prost::Message;
use registry_proto::registry::v1::{
    GrantLeaseRequest, Instance, RegisterRequest, ResolveRequest, RevokeLeaseRequest, WatchRequest,
    event::Kind, registry_client::RegistryClient,
};
use tonic::transport::{Channel, Endpoint};

use crate::etcdpb::{
    self, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, WatchCreateRequest,
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
    watch_request::RequestUnion,
};
use crate::nacos;

/// Large enough for a snapshot of the scale test (100 000 instances): tonic's
/// default of 4 MiB would refuse it.
const MAX_MESSAGE: usize = 1 << 30;

/// Which system a [`Backend`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Our `registry` binary (the memory store).
    Ours,
    /// Our `registry` binary over etcd (`--store etcd://...`): the same
    /// client, the same server code, the state in etcd.
    EtcdStore,
    /// An `etcd` server.
    Etcd,
    /// An r-nacos server, over the Nacos 2.x gRPC protocol.
    Rnacos,
}

impl System {
    /// Name used in the report.
    pub fn name(self) -> &'static str {
        match self {
            System::Ours => "ours",
            System::EtcdStore => "etcd-store",
            System::Etcd => "etcd",
            System::Rnacos => "r-nacos",
        }
    }
}

/// A connection to one system (one HTTP/2 connection; clones share it).
#[derive(Clone)]
// A bench holds a few hundred of these at most: their size does not matter,
// and boxing would add an indirection to every measured call.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    /// Our registry.
    /// The client, and its channel (for the snapshot's shallow decode).
    Ours(RegistryClient<Channel>, Channel),
    /// etcd's KV, lease and watch services over one channel.
    Etcd {
        /// Range and Put.
        kv: KvClient<Channel>,
        /// Grant and revoke.
        lease: LeaseClient<Channel>,
        /// Watch streams.
        watch: WatchClient<Channel>,
    },
    /// One Nacos connection to r-nacos (its bi-stream and unary calls).
    Rnacos(nacos::Conn),
}

/// A lease granted by a system.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The lease id (etcd's is an int64, ours a uint64; both fit; 0 for
    /// r-nacos, whose lease is the connection).
    pub id: i64,
    /// Our lease secret; empty for the others.
    pub secret: String,
    /// The TTL the system actually granted (etcd rounds up to its minimum;
    /// zero for r-nacos, whose instances have none).
    pub ttl: Duration,
}

/// What a watcher saw happen to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Added or updated (etcd cannot tell these apart without a prev_kv).
    Put(String),
    /// Removed.
    Removed(String),
}

/// One message from a watch stream.
#[derive(Debug, Default)]
pub struct WatchBatch {
    /// True for our snapshot (all its parts) and for etcd's "watch created"
    /// reply: the watcher is now live.
    pub ready: bool,
    /// Changes in the message, with instance ids.
    pub changes: Vec<Change>,
}

/// A watch, as batches of changes.
pub type WatchStream = BoxStream<'static, Result<WatchBatch>>;

/// The etcd key of an instance.
pub fn etcd_key(service: &str, instance_id: &str) -> Vec<u8> {
    format!("/registry/{service}/{instance_id}").into_bytes()
}

/// The etcd range `[start, end)` holding every instance of `service`, or of
/// every service when `None`.
pub fn etcd_prefix(service: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let start = match service {
        Some(s) => format!("/registry/{s}/"),
        None => "/registry/".to_string(),
    }
    .into_bytes();
    let mut end = start.clone();
    // The prefix ends in '/', so incrementing the last byte never overflows.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    (start, end)
}

/// The instance the bench registers as `instance_id` of `service`: the same
/// bytes are the value of the etcd key, so both systems store one payload.
pub fn instance(service: &str, instance_id: &str) -> Instance {
    Instance {
        service: service.to_string(),
        instance_id: instance_id.to_string(),
        host: "127.0.0.1".to_string(),
        port: 40000,
        weight: Some(1),
        ..Instance::default()
    }
}

async fn channel(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

impl Backend {
    /// Opens a new connection to `url` (`http://ip:port`).
    pub async fn connect(system: System, url: &str) -> Result<Backend> {
        let ch = channel(url).await?;
        Ok(match system {
            System::Ours | System::EtcdStore => Backend::Ours(
                RegistryClient::new(ch.clone())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
                ch,
            ),
            System::Etcd => Backend::Etcd {
                kv: KvClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE),
                lease: LeaseClient::new(ch.clone()),
                watch: WatchClient::new(ch).max_decoding_message_size(MAX_MESSAGE),
            },
            System::Rnacos => Backend::Rnacos(nacos::Conn::connect(ch).await?),
        })
    }

    /// Grants a lease of (at least) `ttl`.
    pub async fn grant(&mut self, ttl: Duration) -> Result<Lease> {
        match self {
            Backend::Ours(c, _) => {
                let r = c
                    .grant_lease(GrantLeaseRequest {
                        ttl_ms: ttl.as_millis() as u64,
                    })
                    .await?
                    .into_inner();
                Ok(Lease {
                    id: r.lease_id as i64,
                    secret: r.lease_secret,
                    ttl: Duration::from_millis(r.ttl_ms),
                })
            }
            Backend::Etcd { lease, .. } => {
                // etcd counts in whole seconds.
                let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
                let r = lease
                    .lease_grant(LeaseGrantRequest { ttl: secs, id: 0 })
                    .await?
                    .into_inner();
                if !r.error.is_empty() {
                    bail!("etcd LeaseGrant: {}", r.error);
                }
                Ok(Lease {
                    id: r.id,
                    secret: String::new(),
                    ttl: Duration::from_secs(r.ttl.max(0) as u64),
                })
            }
            // The connection is the lease: nothing to ask for.
            Backend::Rnacos(_) => Ok(Lease {
                id: 0,
                secret: String::new(),
                ttl: Duration::ZERO,
            }),
        }
    }

    /// Registers `instance_id` of `service` under `lease` (etcd: put with the
    /// lease).
    pub async fn register(
        &mut self,
        lease: &Lease,
        service: &str,
        instance_id: &str,
    ) -> Result<()> {
        let inst = instance(service, instance_id);
        match self {
            Backend::Ours(c, _) => {
                c.register(RegisterRequest {
                    lease_id: lease.id as u64,
                    lease_secret: lease.secret.clone(),
                    instance: Some(inst),
                    file_descriptor_set: Vec::new(),
                })
                .await?;
            }
            Backend::Etcd { kv, .. } => {
                kv.put(PutRequest {
                    key: etcd_key(service, instance_id),
                    value: inst.encode_to_vec(),
                    lease: lease.id,
                    prev_kv: false,
                })
                .await?;
            }
            Backend::Rnacos(c) => c.register(service, instance_id).await?,
        }
        Ok(())
    }

    /// How many instances `service` has, read from the server.
    pub async fn resolve(&mut self, service: &str) -> Result<usize> {
        match self {
            Backend::Ours(c, _) => Ok(c
                .resolve(ResolveRequest {
                    service: service.to_string(),
                })
                .await?
                .into_inner()
                .instances
                .len()),
            Backend::Etcd { kv, .. } => Ok(range(kv, Some(service)).await?.len()),
            Backend::Rnacos(c) => Ok(c.query(service).await?.hosts().len()),
        }
    }

    /// Revokes a lease, removing what was registered under it. For r-nacos
    /// this ends the connection (and every clone of it): Nacos removes a
    /// connection's instances only with the connection.
    pub async fn revoke(&mut self, l: &Lease) -> Result<()> {
        match self {
            Backend::Ours(c, _) => {
                c.revoke_lease(RevokeLeaseRequest {
                    lease_id: l.id as u64,
                    lease_secret: l.secret.clone(),
                })
                .await?;
            }
            Backend::Etcd { lease, .. } => {
                lease.lease_revoke(LeaseRevokeRequest { id: l.id }).await?;
            }
            Backend::Rnacos(c) => c.close().await?,
        }
        Ok(())
    }

    /// Opens a watch of everything and waits for its first `ready` batch:
    /// how many instances the snapshot held.
    pub async fn snapshot_size(&mut self) -> Result<usize> {
        let mut stream = self.watch(None).await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            if batch.ready {
                return Ok(batch.changes.len());
            }
        }
        bail!("the watch ended before its snapshot")
    }

    /// Follows `service` (every service when `None`; not for r-nacos, which
    /// subscribes to one service at a time). The first batch with `ready`
    /// marks the watcher live; for our registry and r-nacos it carries the
    /// snapshot of current instances as `Put`s.
    pub async fn watch(&mut self, service: Option<&str>) -> Result<WatchStream> {
        let stream: WatchStream = match self {
            Backend::Ours(_, channel) => {
                let req = WatchRequest {
                    services: service.map(|s| vec![s.to_string()]).unwrap_or_default(),
                    ..Default::default()
                };
                let s = shallow::watch(channel.clone(), req).await?;
                // A large snapshot comes in parts (`more`): it is handed on
                // as one ready batch once whole, so the scale measure times
                // the complete state.
                s.scan((false, Vec::new()), |(in_snapshot, parts), m| {
                    let batch = m.map_err(anyhow::Error::from).map(|m| {
                        let changes = m.events.into_iter().filter_map(our_change);
                        if !(m.reset || *in_snapshot) {
                            return Some(WatchBatch {
                                ready: false,
                                changes: changes.collect(),
                            });
                        }
                        parts.extend(changes);
                        *in_snapshot = m.more;
                        (!m.more).then(|| WatchBatch {
                            ready: true,
                            changes: std::mem::take(parts),
                        })
                    });
                    futures::future::ready(Some(batch.transpose()))
                })
                .filter_map(futures::future::ready)
                .boxed()
            }
            Backend::Etcd { watch, .. } => {
                let (key, range_end) = etcd_prefix(service);
                let create = etcdpb::WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key,
                        range_end,
                        ..WatchCreateRequest::default()
                    })),
                };
                // The request stream stays open (pending after the create
                // request) so etcd keeps the watch for as long as we listen.
                let requests =
                    futures::stream::once(async { create }).chain(futures::stream::pending());
                let s = watch.watch(requests).await?.into_inner();
                s.map(|m| {
                    let m = m?;
                    if m.canceled {
                        bail!("etcd cancelled the watch: {}", m.cancel_reason);
                    }
                    Ok(WatchBatch {
                        ready: m.created,
                        changes: m.events.into_iter().filter_map(etcd_change).collect(),
                    })
                })
                .boxed()
            }
            Backend::Rnacos(c) => {
                let Some(service) = service else {
                    bail!("Nacos has no subscription to every service: subscribe to each");
                };
                let (first, pushes) = c.subscribe(service).await?;
                // The subscription lasts as long as the connection: the
                // stream keeps it open, as a tonic stream keeps its channel.
                let conn = c.clone();
                let mut tracker = nacos::Tracker::default();
                let ready = WatchBatch {
                    ready: true,
                    changes: nacos_changes(tracker.apply(&first)),
                };
                futures::stream::once(async move { Ok(ready) })
                    .chain(
                        tokio_stream::wrappers::UnboundedReceiverStream::new(pushes).map(
                            move |info| {
                                let _ = &conn;
                                Ok(WatchBatch {
                                    ready: false,
                                    changes: nacos_changes(tracker.apply(&info)),
                                })
                            },
                        ),
                    )
                    .boxed()
            }
        };
        Ok(stream)
    }
}

/// Our Watch responses read only as deep as the bench reads etcd's:
/// etcd's values (the encoded [`Instance`]s) stay bytes and only the key is
/// looked at; here only each event's kind and instance id are read, the
/// instance's other fields skipped undecoded. So the watch and snapshot
/// figures compare what each server delivers, not how much of it the bench
/// parses (until the 2026-12-03 session ours was decoded in full: that
/// roughly doubled our snapshot figure, and on a 2-core machine the bench's
/// own decoding slows the server it shares the cores with).
mod shallow {
    use anyhow::{Context, Result};
    use registry_proto::registry::v1::WatchRequest;
    use tonic::transport::Channel;

    use super::MAX_MESSAGE;

    /// `registry.v1.WatchResponse`, tags as in the proto, only the fields
    /// the bench reads.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchResponse {
        #[prost(bool, tag = "1")]
        pub reset: bool,
        #[prost(message, repeated, tag = "3")]
        pub events: Vec<Event>,
        #[prost(bool, tag = "5")]
        pub more: bool,
    }

    /// `registry.v1.Event`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(enumeration = "registry_proto::registry::v1::event::Kind", tag = "1")]
        pub kind: i32,
        #[prost(message, optional, tag = "3")]
        pub instance: Option<InstanceId>,
    }

    /// `registry.v1.Instance`, its id only.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstanceId {
        #[prost(string, tag = "2")]
        pub instance_id: String,
    }

    /// The Watch call, its responses decoded as above.
    pub async fn watch(
        channel: Channel,
        request: WatchRequest,
    ) -> Result<tonic::Streaming<WatchResponse>> {
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
        grpc.ready().await.context("registry not ready")?;
        let codec = tonic_prost::ProstCodec::<WatchRequest, WatchResponse>::default();
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/registry.v1.Registry/Watch");
        Ok(grpc
            .server_streaming(tonic::Request::new(request), path, codec)
            .await?
            .into_inner())
    }
}

/// Every key-value under `service`'s prefix (every service when `None`).
pub async fn range(
    kv: &mut KvClient<Channel>,
    service: Option<&str>,
) -> Result<Vec<etcdpb::KeyValue>> {
    let (key, range_end) = etcd_prefix(service);
    Ok(kv
        .range(RangeRequest {
            key,
            range_end,
            ..RangeRequest::default()
        })
        .await?
        .into_inner()
        .kvs)
}

fn our_change(e: shallow::Event) -> Option<Change> {
    let kind = e.kind();
    let id = e.instance?.instance_id;
    match kind {
        Kind::Added | Kind::Updated => Some(Change::Put(id)),
        Kind::Removed => Some(Change::Removed(id)),
        Kind::Unspecified => None,
    }
}

fn nacos_changes(d: nacos::Diff) -> Vec<Change> {
    let put = d.put.into_iter().map(Change::Put);
    put.chain(d.removed.into_iter().map(Change::Removed))
        .collect()
}

fn etcd_change(e: etcdpb::Event) -> Option<Change> {
    let kind = e.r#type();
    let kv = e.kv?;
    let key = String::from_utf8_lossy(&kv.key);
    let id = key.rsplit('/').next()?.to_string();
    match kind {
        etcdpb::event::EventType::Put => Some(Change::Put(id)),
        etcdpb::event::EventType::Delete => Some(Change::Removed(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_covers_exactly_the_service() {
        let (start, end) = etcd_prefix(Some("calc"));
        let inside = etcd_key("calc", "a");
        let other = etcd_key("calc2", "a");
        assert!(start <= inside && inside < end);
        assert!(!(start <= other && other < end));
        let (all_start, all_end) = etcd_prefix(None);
        assert!(all_start <= other && other < all_end);
    }

    #[test]
    fn etcd_events_carry_the_instance_id() {
        let e = etcdpb::Event {
            r#type: etcdpb::event::EventType::Delete as i32,
            kv: Some(etcdpb::KeyValue {
                key: etcd_key("svc", "i-7"),
                ..etcdpb::KeyValue::default()
            }),
            prev_kv: None,
        };
        assert_eq!(etcd_change(e), Some(Change::Removed("i-7".into())));
    }
}
