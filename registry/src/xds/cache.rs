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
    /// Whether this is the registry's state (false until the follower's
    /// first snapshot has arrived: an ADS stream answering from it would
    /// tell clients that no service exists).
    pub ready: bool,
    /// Where the instances are read.
    store: Store,
}

impl Snapshot {
    /// No service yet, at revision 0, reading instances from `store`.
    pub fn new(store: Store) -> Snapshot {
        Snapshot {
            revision: 0,
            services: BTreeMap::new(),
            ready: false,
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

/// Hands out the followed snapshots, and follows the registry only while
/// someone holds one: a registry with no ADS stream open and no DNS server
/// runs no follower. Each change woke the follower, which decoded it and
/// applied it: with nobody to serve that was pure cost, about 0.07 of a
/// registration's registry CPU (perf, `bench --only register --clients 1`).
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Follower {
    /// The registry followed.
    watchers: Watchers,
    /// Ends the following task for good.
    shutdown: CancellationToken,
    /// The channel of the running follower, if one runs. Subscribing and
    /// the follower's decision to stop both happen under this lock, so a
    /// new subscriber never gets a channel whose follower just quit.
    running: Arc<std::sync::Mutex<Option<watch::Sender<Arc<Snapshot>>>>>,
}

impl Follower {
    /// Follows nothing yet: the first [`Follower::subscribe`] starts it.
    pub fn new(watchers: Watchers, shutdown: CancellationToken) -> Follower {
        Follower {
            watchers,
            shutdown,
            running: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<watch::Sender<Arc<Snapshot>>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest snapshot and each one after it, for as long as the
    /// receiver lives; starts following the registry if nobody was. Until
    /// the first snapshot has arrived the receiver holds one that is not
    /// [`Snapshot::ready`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        let mut running = self.lock();
        if let Some(tx) = running.as_ref()
            && !tx.is_closed()
        {
            return tx.subscribe();
        }
        let store = self.watchers.store().clone();
        let (tx, rx) = watch::channel(Arc::new(Snapshot::new(store)));
        *running = Some(tx.clone());
        tokio::spawn(self.clone().follow(tx));
        rx
    }

    /// Whether the follower publishing on `tx` should stop: nobody holds a
    /// receiver (decided under the lock, see [`Follower::running`]).
    fn nobody_left(&self, tx: &watch::Sender<Arc<Snapshot>>) -> bool {
        let mut running = self.lock();
        if !tx.is_closed() {
            return false;
        }
        if running.as_ref().is_some_and(|r| r.same_channel(tx)) {
            *running = None;
        }
        true
    }

    /// Follows the registry, publishing on `tx`, until shutdown or until
    /// nobody holds a receiver. It reads the registry as any watcher does
    /// (a Watch stream of every service: a snapshot, then each change).
    async fn follow(self, tx: watch::Sender<Arc<Snapshot>>) {
        let store = self.watchers.store().clone();
        loop {
            let stream = match self.watchers.open(BTreeSet::new()) {
                Ok(stream) => stream,
                Err(status) => {
                    tracing::warn!(%status, "xDS cannot watch the registry; retrying in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            let ended = tokio::select! {
                ended = follow_stream(stream, &store, &tx) => ended,
                () = tx.closed() => Ok(()),
            };
            if self.shutdown.is_cancelled() || self.nobody_left(&tx) {
                tracing::debug!("xDS stopped following the registry: nobody to serve");
                return;
            }
            if let Err(status) = ended {
                tracing::warn!(%status, "xDS's watch of the registry ended; watching afresh");
            }
        }
    }
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
            // Nobody left to serve (the caller decides under its lock).
            return Ok(());
        }
        if let Some(mut fresh) = whole {
            fresh.ready = true;
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
    pub(crate) fn with_puts(self, instances: &[(&str, &str, &str, u32)]) -> Snapshot {
        instances
            .iter()
            .fold(self, |s, (service, id, host, weight)| {
                let instance = pb::Instance {
                    service: service.to_string(),
                    instance_id: id.to_string(),
                    host: host.to_string(),
                    port: 7000,
                    weight: Some(*weight),
                    ..Default::default()
                };
                s.changed_by(|state, revision| state.apply_put(instance, None, revision))
            })
    }

    /// `self` after the instance `id` of `service` is removed from the store.
    pub(crate) fn with_removal(self, service: &str, id: &str) -> Snapshot {
        let reason = pb::RemovalReason::Deregistered;
        self.changed_by(|state, revision| state.apply_delete(service, id, reason, revision))
    }

    /// `self` after `change` is made to the store at its next revision,
    /// its event (if any) applied here as the follower would.
    fn changed_by(
        mut self,
        change: impl FnOnce(&mut crate::state::State, u64) -> Option<Event>,
    ) -> Snapshot {
        let mut event = None;
        self.store.apply(|state| {
            let revision = state.revision() + 1;
            event = change(state, revision);
            event.iter().cloned().collect()
        });
        if let Some(event) = event {
            self.apply(event.revision, std::slice::from_ref(&event));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_follower_runs_only_while_someone_subscribes() {
        use crate::limits::Quotas;
        use crate::watch::WatchLimits;
        let watchers = Watchers::new(
            crate::lease::Ttl::default(),
            Quotas::default(),
            WatchLimits::default(),
        );
        let mut placed = Snapshot::new(watchers.store().clone());
        placed = placed.with_puts(&[("svc", "a", "10.0.0.1", 1)]);
        let follower = Follower::new(watchers, CancellationToken::new());
        assert!(follower.lock().is_none(), "nobody asked: nothing follows");
        let running = || follower.lock().is_some();
        let mut rx = follower.subscribe();
        let first = rx.wait_for(|s| s.ready).await.unwrap().clone();
        assert_eq!(first.services["svc"].created, 1);
        let mut second = follower.subscribe();
        assert!(second.borrow_and_update().ready, "the same follower");
        // A change reaches every receiver.
        let _placed = placed.with_puts(&[("other", "b", "10.0.0.2", 1)]);
        second
            .wait_for(|s| s.services.contains_key("other"))
            .await
            .unwrap();
        drop((rx, second));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while running() {
            assert!(tokio::time::Instant::now() < deadline, "still following");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Asked again: follows again, from a fresh snapshot.
        let mut rx = follower.subscribe();
        let again = rx.wait_for(|s| s.ready).await.unwrap().clone();
        assert_eq!(again.services.len(), 2);
        assert!(running());
    }

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
