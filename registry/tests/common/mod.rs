//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::registry_client::RegistryClient;
use tonic::transport::Channel;

/// A client of the registry.
pub type Client = RegistryClient<Channel>;

/// A granted lease.
#[derive(Clone, Debug)]
pub struct Lease {
    pub id: u64,
    pub secret: String,
}

/// Grants a lease of `ttl_ms` (0: default).
pub async fn grant(client: &mut Client, ttl_ms: u64) -> Lease {
    let r = client
        .grant_lease(pb::GrantLeaseRequest { ttl_ms })
        .await
        .unwrap()
        .into_inner();
    Lease {
        id: r.lease_id,
        secret: r.lease_secret,
    }
}

/// An instance of `service` on 127.0.0.1:`port`.
pub fn instance(service: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        host: "127.0.0.1".into(),
        port,
        weight: Some(1),
        ..Default::default()
    }
}

/// A Register request under `lease`.
pub fn register_request(lease: &Lease, instance: pb::Instance) -> pb::RegisterRequest {
    pb::RegisterRequest {
        lease_id: lease.id,
        lease_secret: lease.secret.clone(),
        instance: Some(instance),
        file_descriptor_set: Vec::new(),
    }
}

/// Registers `instance` under `lease`.
pub async fn register(
    client: &mut Client,
    lease: &Lease,
    instance: pb::Instance,
) -> pb::RegisterResponse {
    client
        .register(register_request(lease, instance))
        .await
        .unwrap()
        .into_inner()
}

/// Deregisters an instance.
pub async fn deregister(
    client: &mut Client,
    lease: &Lease,
    service: &str,
    id: &str,
) -> Result<pb::DeregisterResponse, tonic::Status> {
    client
        .deregister(pb::DeregisterRequest {
            lease_id: lease.id,
            lease_secret: lease.secret.clone(),
            service: service.into(),
            instance_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Instance ids of `service`, in order.
pub async fn ids(client: &mut Client, service: &str) -> Vec<String> {
    resolve(client, service)
        .await
        .into_iter()
        .map(|i| i.instance_id)
        .collect()
}

#[allow(unused_imports)] // not every test file uses both
pub use testkit::calls::{resolve, watch};

/// Everything observable: the service list and every service's instances.
pub async fn everything(client: &mut Client) -> (Vec<pb::ServiceSummary>, Vec<pb::Instance>) {
    let services = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    let mut instances = Vec::new();
    for s in &services {
        instances.extend(resolve(client, &s.name).await);
    }
    (services, instances)
}

/// Generous bound for things that should happen "promptly".
pub const PROMPTLY: Duration = Duration::from_secs(5);

/// A watcher's exact local copy of the registry, kept from a Watch stream;
/// it checks the stream's promises as it goes: strictly increasing
/// revisions, no ADDED for a known instance, no UPDATED/REMOVED for an
/// unknown one.
#[derive(Debug, Default)]
pub struct Replica {
    pub instances: std::collections::BTreeMap<(String, String), pb::Instance>,
    pub revision: u64,
    pub registry_id: String,
    pub resets: usize,
    /// Messages that continued a snapshot (`more` on the one before).
    pub continuations: usize,
    /// Whether the last message said the snapshot continues.
    pub more: bool,
    /// Every event applied, in order.
    pub log: Vec<pb::Event>,
}

impl Replica {
    /// Applies one Watch message.
    pub fn apply(&mut self, response: pb::WatchResponse) {
        use pb::event::Kind;
        assert!(!response.registry_id.is_empty(), "registry_id missing");
        if !self.registry_id.is_empty() {
            assert_eq!(
                self.registry_id, response.registry_id,
                "registry_id changed"
            );
        }
        self.registry_id = response.registry_id.clone();
        if response.reset || self.more {
            if response.reset {
                assert!(!self.more, "a new snapshot before the last one ended");
                self.resets += 1;
                self.instances.clear();
                assert!(
                    response.revision >= self.revision,
                    "reset went back in time"
                );
            } else {
                self.continuations += 1;
                assert_eq!(
                    response.revision, self.revision,
                    "a snapshot's messages share its revision"
                );
                assert!(!response.events.is_empty(), "empty continuation");
            }
            for e in response.events {
                assert_eq!(e.kind(), Kind::Added, "snapshot events are all ADDED");
                assert!(e.revision <= response.revision);
                let i = e.instance.unwrap();
                let key = (i.service.clone(), i.instance_id.clone());
                assert!(
                    self.instances.insert(key.clone(), i).is_none(),
                    "{key:?} twice in one snapshot"
                );
            }
            self.revision = response.revision;
            self.more = response.more;
            return;
        }
        assert!(!response.more, "`more` on a change message");
        assert!(!response.events.is_empty(), "empty change message");
        for e in &response.events {
            assert!(
                e.revision > self.revision,
                "revision {} after {}: not strictly increasing",
                e.revision,
                self.revision
            );
            self.revision = e.revision;
            let i = e.instance.clone().unwrap();
            let key = (i.service.clone(), i.instance_id.clone());
            match e.kind() {
                Kind::Added => assert!(
                    self.instances.insert(key.clone(), i).is_none(),
                    "ADDED for an instance already there: {key:?} (duplicate)"
                ),
                Kind::Updated => assert!(
                    self.instances.insert(key.clone(), i).is_some(),
                    "UPDATED for an unknown instance: {key:?} (gap)"
                ),
                Kind::Removed => assert!(
                    self.instances.remove(&key).is_some(),
                    "REMOVED for an unknown instance: {key:?} (gap)"
                ),
                Kind::Unspecified => panic!("event without kind"),
            }
        }
        assert!(response.revision >= self.revision);
        self.revision = response.revision;
        self.log.extend(response.events);
    }
}

/// Reads Watch messages into `replica` until `done` holds (panics after a
/// generous timeout).
pub async fn follow_until(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    replica: &mut Replica,
    mut done: impl FnMut(&Replica) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(replica) {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("watch: condition not reached in time")
            .expect("watch stream failed")
            .expect("watch stream ended");
        replica.apply(message);
    }
}

/// The next Watch message, or a panic after [`PROMPTLY`].
pub async fn next(stream: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    tokio::time::timeout(PROMPTLY, stream.message())
        .await
        .expect("no watch message in time")
        .unwrap()
        .expect("watch stream ended")
}

/// A KeepAlive stream: the sender of heartbeats and the stream of answers.
pub struct KeepAlive {
    pub tx: tokio::sync::mpsc::Sender<pb::KeepAliveRequest>,
    pub responses: tonic::Streaming<pb::KeepAliveResponse>,
}

impl KeepAlive {
    /// Sends one heartbeat for `lease` (its answer is read from
    /// `responses`: a test may wait for it, or expect a refusal).
    pub async fn send(&self, lease: &Lease) {
        self.tx
            .send(pb::KeepAliveRequest {
                lease_id: lease.id,
                lease_secret: lease.secret.clone(),
            })
            .await
            .expect("the KeepAlive stream is open");
    }
}

/// Opens a KeepAlive stream for `lease` and sends the first heartbeat.
pub async fn keep_alive(client: &mut Client, lease: &Lease) -> KeepAlive {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let heartbeat = pb::KeepAliveRequest {
        lease_id: lease.id,
        lease_secret: lease.secret.clone(),
    };
    tx.send(heartbeat).await.unwrap();
    let mut responses = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!(first.lease_id, lease.id);
    KeepAlive { tx, responses }
}

/// A TTL for leases in tests that do not keep them alive: long enough that
/// no loaded machine makes them expire mid-test.
pub const LONG_TTL: u64 = 120_000;
