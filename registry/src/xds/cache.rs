//! The registry as xDS and DNS see it: one task follows the registry like
//! any Watch client (a snapshot, then every change) and publishes an
//! immutable [`Snapshot`] on a `tokio::sync::watch` channel after each
//! change: which services exist, the revisions their resources are at, and
//! their Listener and Cluster (encoded once, they never change).
//!
//! The instances themselves are not copied here: a service's endpoints are
//! read from the store when an ADS stream or a DNS answer first needs them
//! (one reference count under the store's lock). The copy of every
//! instance this module used to keep cost every registry about 190 bytes
//! of RSS per instance, xDS client or not (`bench --only scale`: 410 B per
//! instance with it, 219-220 B without).
//!
//! One follower for every ADS stream: a resource is built and encoded once
//! per version that is read, not once per client, and a stream that is slow to read
//! never holds anything up: a watch channel keeps only the newest
//! snapshot, so a slow stream skips straight to the state as it is now
//! (state of the world needs no history).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use envoy_types::pb::google::protobuf::Any;
use futures::{FutureExt, Stream, StreamExt};
use registry_proto::registry::v1 as pb;
use support::CancellationToken;
use tokio::sync::watch;
use tonic::Status;

use crate::state::Event;
use crate::store::Store;
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
    /// How many instances it has, counted from the events (added: one
    /// more, removed: one less); it leaves the snapshot at 0.
    len: usize,
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
    assignment: OnceLock<Any>,
}

/// The state every ADS stream and DNS answer serves from.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The registry revision this snapshot is at.
    pub revision: u64,
    /// The services with at least one instance.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Where the instances are read.
    store: Store,
}

impl Snapshot {
    /// No service yet, at revision 0, reading instances from `store`.
    pub fn new(store: Store) -> Snapshot {
        Snapshot {
            revision: 0,
            services: BTreeMap::new(),
            store,
        }
    }

    /// The instances of `service` as the registry holds them now: at this
    /// snapshot's revision or later (a newer change is in a newer snapshot,
    /// whose versions make streams send again).
    pub fn backends(&self, service: &Service) -> Vec<Backend> {
        let Some(instances) = self.store.instances_of(&service.name) else {
            return Vec::new();
        };
        instances
            .endpoints()
            .map(|e| Backend {
                instance_id: e.instance_id.to_string(),
                host: e.host.to_string(),
                port: e.port,
                weight: e.weight,
            })
            .collect()
    }

    /// The encoded ClusterLoadAssignment of `service` (built on the first
    /// call for each of its versions).
    pub fn assignment<'a>(&self, service: &'a Service) -> &'a Any {
        service.assignment.get_or_init(|| {
            let backends = self.backends(service);
            let (assignment, named) = resources::assignment(&service.name, &backends);
            if named > 0 {
                tracing::debug!(
                    service = service.name,
                    left_out = named,
                    "xDS: instances registered under a DNS name are not in the assignment (gRPC clients need IP addresses)"
                );
            }
            assignment
        })
    }

    /// Applies `events` (at `revision`) in place: a service nobody else
    /// holds (no ADS stream or DNS answer is reading this snapshot) is
    /// changed where it is, one held is copied first (`Arc::make_mut`).
    /// Its assignment is built again only when next read. Copying the
    /// service for every change made a run of registrations into one
    /// service quadratic (perf: the follower took ~45% of the registry's
    /// CPU with 16 clients registering).
    pub(crate) fn apply(&mut self, revision: u64, events: &[Event]) {
        use pb::event::Kind;
        for event in events {
            let Some(instance) = &event.instance else {
                continue;
            };
            let kind = event.kind();
            match self.services.get_mut(&instance.service) {
                Some(shared) => {
                    let service = Arc::make_mut(shared);
                    match kind {
                        Kind::Added => service.len += 1,
                        Kind::Removed => service.len = service.len.saturating_sub(1),
                        _ => {}
                    }
                    service.changed = revision;
                    service.assignment = OnceLock::new();
                    if service.len == 0 {
                        self.services.remove(&instance.service);
                    }
                }
                None if kind == Kind::Removed => {}
                None => {
                    let service = Service {
                        name: instance.service.clone(),
                        created: revision,
                        changed: revision,
                        len: 1,
                        listener: resources::listener(&instance.service),
                        cluster: resources::cluster(&instance.service),
                        assignment: OnceLock::new(),
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
    let store = watchers.store().clone();
    let (tx, rx) = watch::channel(Arc::new(Snapshot::new(store.clone())));
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
            match follow_stream(stream, &store, &tx).await {
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
    store: &Store,
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
                incoming = Some(Snapshot::new(store.clone()));
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

/// Test support: a snapshot over a real store, changed through the
/// store's mirror entry points (as the etcd store does), each change
/// applied to the snapshot as the follower would.
#[cfg(test)]
impl Snapshot {
    /// A new store, and no service yet.
    pub(crate) fn empty() -> Snapshot {
        Snapshot::new(Store::new(crate::lease::Ttl::default()))
    }

    /// `self` after `(service, instance id, host, weight)` are each put (added
    /// or updated, port 7000) in the store, one revision each.
    pub(crate) fn with_puts(mut self, instances: &[(&str, &str, &str, u32)]) -> Snapshot {
        for (service, id, host, weight) in instances {
            let instance = pb::Instance {
                service: service.to_string(),
                instance_id: id.to_string(),
                host: host.to_string(),
                port: 7000,
                weight: Some(*weight),
                ..Default::default()
            };
            let mut events = Vec::new();
            self.store.apply(|state| {
                let revision = state.revision() + 1;
                events.extend(state.apply_put(instance, None, revision));
                events.clone()
            });
            for event in &events {
                self.apply(event.revision, std::slice::from_ref(event));
            }
        }
        self
    }

    /// `self` after the instance `id` of `service` is removed from the store.
    pub(crate) fn with_removal(mut self, service: &str, id: &str) -> Snapshot {
        let mut events = Vec::new();
        self.store.apply(|state| {
            let revision = state.revision() + 1;
            let reason = pb::RemovalReason::Deregistered;
            events.extend(state.apply_delete(service, id, reason, revision));
            events.clone()
        });
        for event in &events {
            self.apply(event.revision, std::slice::from_ref(event));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_copies_a_service_only_while_a_reader_holds_it() {
        let s = Snapshot::empty().with_puts(&[("svc", "a", "10.0.0.1", 1)]);
        let before = Arc::as_ptr(&s.services["svc"]);
        // Nobody holds it: changed where it is.
        let s = s.with_puts(&[("svc", "b", "10.0.0.1", 2)]);
        assert_eq!(Arc::as_ptr(&s.services["svc"]), before);
        // A reader holds it: copied, and the reader's copy is untouched.
        let held = s.services["svc"].clone();
        let read = s.assignment(&held).clone();
        let s = s.with_puts(&[("svc", "c", "10.0.0.1", 3)]);
        assert_ne!(Arc::as_ptr(&s.services["svc"]), before);
        assert_eq!(held.changed, 2);
        assert_eq!(s.assignment(&held), &read);
        assert_eq!(s.backends(&s.services["svc"]).len(), 3);
        assert_ne!(s.assignment(&s.services["svc"]), &read);
    }

    #[test]
    fn a_service_appears_changes_and_goes_with_its_instances() {
        let s = Snapshot::empty()
            .with_puts(&[("svc", "a", "10.0.0.1", 1), ("svc", "b", "10.0.0.2", 2)]);
        let svc = s.services["svc"].clone();
        assert_eq!((svc.created, svc.changed, svc.len), (1, 2, 2));
        let first = s.assignment(&svc).clone();
        let s = s.with_puts(&[("svc", "a", "10.0.0.1", 5)]);
        let after = s.services["svc"].clone();
        assert_eq!(
            (after.created, after.changed, after.len),
            (1, 3, 2),
            "an update adds no instance"
        );
        assert_eq!(after.listener, svc.listener);
        assert_ne!(s.assignment(&after), &first);
        let weights: Vec<u32> = s.backends(&after).iter().map(|b| b.weight).collect();
        assert_eq!(weights, [5, 2], "read from the store, in id order");
        let s = s.with_removal("svc", "a");
        assert_eq!(s.services["svc"].len, 1);
        let s = s.with_removal("svc", "b");
        assert!(s.services.is_empty());
        assert_eq!(s.revision, 5);
        // Removing what is not there changes nothing.
        let s = s.with_removal("svc", "zz");
        assert!(s.services.is_empty());
        assert_eq!(s.revision, 5);
    }
}
