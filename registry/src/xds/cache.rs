//! The registry as xDS sees it: one task follows the registry like any
//! Watch client (a snapshot, then every change), keeps each service's instances and its
//! three encoded resources, and publishes an immutable [`Snapshot`] on a
//! `tokio::sync::watch` channel after each change.
//!
//! One follower for every ADS stream: a resource is built and encoded once
//! per version that is read, not once per client, and a stream that is slow to read
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
    /// Its name.
    name: String,
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
    /// The encoded ClusterLoadAssignment, built when an ADS stream first
    /// asks for it: a registry nobody asks over xDS encodes none, and one
    /// whose clients read slower than a service changes encodes only the
    /// versions they read (encoding every change made a growing service's
    /// registrations quadratic: with the copy per change, ~45% of the
    /// registry's CPU at 16 clients registering into one service, by perf).
    assignment: std::sync::OnceLock<Any>,
}

impl Service {
    /// Its instances, by instance id.
    pub fn instances(&self) -> impl Iterator<Item = &Backend> {
        self.instances.values()
    }

    /// Its encoded ClusterLoadAssignment (built on the first call).
    pub fn assignment(&self) -> &Any {
        self.assignment.get_or_init(|| {
            let (assignment, named) = resources::assignment(&self.name, self.instances.values());
            if named > 0 {
                tracing::debug!(
                    service = self.name,
                    left_out = named,
                    "xDS: instances registered under a DNS name are not in the assignment (gRPC clients need IP addresses)"
                );
            }
            assignment
        })
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
    /// Applies `events` (at `revision`) in place: a service nobody else
    /// holds (no ADS stream or DNS answer is reading this snapshot) is
    /// changed where it is, one held is copied first (`Arc::make_mut`).
    /// Its assignment is built again only when next read. Copying the
    /// service for every change made a run of registrations into one
    /// service quadratic (perf: the follower took ~45% of the registry's
    /// CPU with 16 clients registering).
    pub(crate) fn apply(&mut self, revision: u64, events: &[Event]) {
        for event in events {
            let Some(instance) = &event.instance else {
                continue;
            };
            let removed = event.kind == i32::from(pb::event::Kind::Removed);
            match self.services.get_mut(&instance.service) {
                Some(shared) => {
                    let service = Arc::make_mut(shared);
                    if removed {
                        service.instances.remove(&instance.instance_id);
                    } else {
                        service
                            .instances
                            .insert(instance.instance_id.clone(), backend(instance));
                    }
                    service.changed = revision;
                    service.assignment = std::sync::OnceLock::new();
                    if service.instances.is_empty() {
                        self.services.remove(&instance.service);
                    }
                }
                None if removed => {}
                None => {
                    let service = Service {
                        name: instance.service.clone(),
                        created: revision,
                        changed: revision,
                        instances: BTreeMap::from([(
                            instance.instance_id.clone(),
                            backend(instance),
                        )]),
                        listener: resources::listener(&instance.service),
                        cluster: resources::cluster(&instance.service),
                        assignment: std::sync::OnceLock::new(),
                    };
                    self.services
                        .insert(instance.service.clone(), Arc::new(service));
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
/// snapshot and after each run of changes that were ready together. The
/// changes are applied to the published snapshot itself
/// (`send_modify`), copied only if a reader holds it.
async fn follow_stream(
    stream: impl Stream<Item = Result<Encoded, Status>>,
    tx: &watch::Sender<Arc<Snapshot>>,
) -> Result<(), Status> {
    let mut stream = std::pin::pin!(stream);
    // A snapshot arriving in parts (`more`), applied once it is whole.
    let mut incoming: Option<Snapshot> = None;
    while let Some(item) = stream.next().await {
        let mut item = Some(item);
        let mut whole: Option<Snapshot> = None;
        let mut changes = Vec::new();
        // Everything already here goes out together.
        while let Some(next) = item.take() {
            let message = next?.decode()?;
            if message.reset {
                incoming = Some(Snapshot::default());
                // What came before a fresh snapshot is in it.
                whole = None;
                changes.clear();
            }
            match incoming.as_mut() {
                Some(fresh) => {
                    fresh.apply(message.revision, &message.events);
                    if !message.more {
                        whole = incoming.take();
                    }
                }
                None => changes.push(message),
            }
            item = stream.next().now_or_never().flatten();
        }
        if tx.is_closed() {
            // Nobody left to serve.
            return Ok(());
        }
        if let Some(fresh) = whole {
            tx.send_replace(Arc::new(fresh));
        }
        if !changes.is_empty() {
            tx.send_modify(|snapshot| {
                let snapshot = Arc::make_mut(snapshot);
                for message in &changes {
                    snapshot.apply(message.revision, &message.events);
                }
            });
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
    fn a_change_copies_a_service_only_while_a_reader_holds_it() {
        use pb::event::Kind::*;
        let mut s = Snapshot::default();
        s.apply(1, &[event(Added, "a", 1)]);
        let before = Arc::as_ptr(&s.services["svc"]);
        // Nobody holds it: changed where it is.
        s.apply(2, &[event(Added, "b", 2)]);
        assert_eq!(Arc::as_ptr(&s.services["svc"]), before);
        // A reader holds it: copied, and the reader's copy is untouched.
        let held = s.services["svc"].clone();
        let read = held.assignment().clone();
        s.apply(3, &[event(Added, "c", 3)]);
        assert_ne!(Arc::as_ptr(&s.services["svc"]), before);
        assert_eq!(held.instances().count(), 2);
        assert_eq!(held.assignment(), &read);
        assert_eq!(s.services["svc"].instances().count(), 3);
        assert_ne!(s.services["svc"].assignment(), &read);
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
        assert_ne!(after.assignment(), svc.assignment());
        s.apply(3, &[event(Removed, "a", 5), event(Removed, "b", 2)]);
        assert!(s.services.is_empty());
        assert_eq!(s.revision, 3);
        // Removing what is not there changes nothing.
        s.apply(4, &[event(Removed, "zz", 1)]);
        assert!(s.services.is_empty());
    }
}
