//! The registry as xDS sees it: one task follows the registry like any
//! Watch client (a snapshot, then every change), keeps each service's instances and its
//! three encoded resources, and publishes an immutable [`Snapshot`] on a
//! `tokio::sync::watch` channel after each change.
//!
//! One follower for every ADS stream: a resource is built and encoded once
//! per change, not once per client, and a stream that is slow to read
//! never holds anything up: a watch channel keeps only the newest
//! snapshot, so a slow stream skips straight to the state as it is now
//! (state of the world needs no history).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use futures::{FutureExt, Stream, StreamExt};
use registry_proto::registry::v1 as pb;
use support::CancellationToken;
use tokio::sync::watch;
use tonic::Status;

use crate::state::Event;
use crate::watch::Watchers;
use crate::watch::encode::Encoded;
use crate::xds::resources::{self, Backend};

/// One registered service, as xDS serves it.
#[derive(Debug, Clone)]
pub struct Service {
    /// The registry revision at which the service appeared (its listener
    /// and cluster never change after that).
    pub created: u64,
    /// The registry revision of its last change (its assignment's version).
    pub changed: u64,
    /// The instances, by instance id.
    instances: BTreeMap<String, Backend>,
    /// The encoded Listener.
    pub listener: Any,
    /// The encoded Cluster.
    pub cluster: Any,
    /// The encoded ClusterLoadAssignment.
    pub assignment: Any,
}

impl Service {
    /// Its instances, by instance id.
    pub fn instances(&self) -> impl Iterator<Item = &Backend> {
        self.instances.values()
    }
}

/// The state every ADS stream serves from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The registry revision this snapshot is at.
    pub revision: u64,
    /// The services with at least one instance.
    pub services: BTreeMap<String, Arc<Service>>,
}

fn backend(instance: &pb::Instance) -> Backend {
    Backend {
        instance_id: instance.instance_id.clone(),
        host: instance.host.clone(),
        port: instance.port,
        weight: instance.effective_weight(),
    }
}

impl Snapshot {
    /// Applies `events` (at `revision`), rebuilding the resources of each
    /// service they touch once.
    pub(crate) fn apply(&mut self, revision: u64, events: &[Event]) {
        let mut touched: BTreeMap<String, Option<Service>> = BTreeMap::new();
        for event in events {
            let Some(instance) = &event.instance else {
                continue;
            };
            let service = touched.entry(instance.service.clone()).or_insert_with(|| {
                self.services
                    .get(&instance.service)
                    .map(|s| Service::clone(s))
            });
            let removed = event.kind == i32::from(pb::event::Kind::Removed);
            match service {
                Some(s) if removed => {
                    s.instances.remove(&instance.instance_id);
                }
                Some(s) => {
                    s.instances
                        .insert(instance.instance_id.clone(), backend(instance));
                }
                None if removed => {}
                None => {
                    *service = Some(Service {
                        created: revision,
                        changed: revision,
                        instances: BTreeMap::from([(
                            instance.instance_id.clone(),
                            backend(instance),
                        )]),
                        listener: resources::listener(&instance.service),
                        cluster: resources::cluster(&instance.service),
                        assignment: Any::default(),
                    });
                }
            }
        }
        for (name, service) in touched {
            match service {
                Some(mut s) if !s.instances.is_empty() => {
                    let (assignment, named) = resources::assignment(&name, s.instances.values());
                    if named > 0 {
                        tracing::debug!(
                            service = name,
                            left_out = named,
                            "xDS: instances registered under a DNS name are not in the assignment (gRPC clients need IP addresses)"
                        );
                    }
                    s.changed = revision;
                    s.assignment = assignment;
                    self.services.insert(name, Arc::new(s));
                }
                _ => {
                    self.services.remove(&name);
                }
            }
        }
        self.revision = revision;
    }
}

/// Follows the registry of `watchers` until `shutdown` is cancelled,
/// publishing each new snapshot on the returned channel. It reads the
/// registry as any watcher does (a Watch stream of every service: a
/// snapshot, then each change); until its first snapshot has arrived the
/// channel holds an empty state at revision 0.
pub fn follow(
    watchers: Watchers,
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<Snapshot>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let task = tokio::spawn(async move {
        loop {
            let stream = match watchers.open(BTreeSet::new(), shutdown.clone()) {
                Ok(stream) => stream,
                Err(status) => {
                    tracing::warn!(%status, "xDS cannot watch the registry; retrying in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            match follow_stream(stream, &tx).await {
                // The stream ended: shutdown, or nobody left to serve.
                Ok(()) => return,
                Err(status) => {
                    tracing::warn!(%status, "xDS's watch of the registry ended; watching afresh");
                }
            }
        }
    });
    (rx, task)
}

/// Applies one watch stream's messages, publishing after each complete
/// snapshot and after each run of changes that were ready together.
async fn follow_stream(
    stream: impl Stream<Item = Result<Encoded, Status>>,
    tx: &watch::Sender<Arc<Snapshot>>,
) -> Result<(), Status> {
    let mut stream = std::pin::pin!(stream);
    let mut current = Snapshot::default();
    // A snapshot arriving in parts (`more`), applied once it is whole.
    let mut incoming: Option<Snapshot> = None;
    while let Some(item) = stream.next().await {
        let mut item = Some(item);
        // Everything already here goes out together.
        while let Some(next) = item.take() {
            let message = next?.decode()?;
            if message.reset {
                incoming = Some(Snapshot::default());
            }
            match incoming.as_mut() {
                Some(fresh) => fresh.apply(message.revision, &message.events),
                None => current.apply(message.revision, &message.events),
            }
            if !message.more
                && let Some(fresh) = incoming.take()
            {
                current = fresh;
            }
            item = stream.next().now_or_never().flatten();
        }
        if incoming.is_none() && tx.send(Arc::new(current.clone())).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: pb::event::Kind, id: &str, weight: u32) -> Event {
        pb::Event {
            kind: kind.into(),
            revision: 0,
            instance: Some(pb::Instance {
                service: "svc".into(),
                instance_id: id.into(),
                host: "10.0.0.1".into(),
                port: 1,
                weight: Some(weight),
                ..Default::default()
            }),
            reason: 0,
        }
    }

    #[test]
    fn a_service_appears_changes_and_goes_with_its_instances() {
        use pb::event::Kind::*;
        let mut s = Snapshot::default();
        s.apply(1, &[event(Added, "a", 1), event(Added, "b", 2)]);
        let svc = s.services["svc"].clone();
        assert_eq!((svc.created, svc.changed), (1, 1));
        s.apply(2, &[event(Updated, "a", 5)]);
        let after = s.services["svc"].clone();
        assert_eq!((after.created, after.changed), (1, 2));
        assert_eq!(after.listener, svc.listener);
        assert_ne!(after.assignment, svc.assignment);
        s.apply(3, &[event(Removed, "a", 5), event(Removed, "b", 2)]);
        assert!(s.services.is_empty());
        assert_eq!(s.revision, 3);
        // Removing what is not there changes nothing.
        s.apply(4, &[event(Removed, "zz", 1)]);
        assert!(s.services.is_empty());
    }
}
