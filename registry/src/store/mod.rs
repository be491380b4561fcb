//! The shared handle on the registry: the [`State`] behind a lock, the
//! [`Publish`] sink its changes go to (the watch hub, see
//! [`crate::watch`]; this module knows nothing of watchers), and the lease
//! sweeper: the one task that expires leases at their deadline
//! ([`Store::spawn_sweeper`]). Cheap to clone; every gRPC handler holds one.
//!
//! # Why one `std::sync::Mutex`
//! Watchers need a single total order of revisions, and a new watcher must
//! take its snapshot and subscribe to later changes with nothing in between.
//! So every change is made AND published while holding one lock, and a
//! subscription happens under that same lock ([`Store::read`]). Every section under the lock
//! is short and synchronous (no `.await`), which is exactly the case where a
//! std mutex is cheaper than tokio's and cannot be held across a suspension
//! point by mistake (its guard is not `Send`).

pub mod etcd;
pub mod etcd_client;
pub mod etcd_failover;
pub mod etcd_store;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use registry_proto::registry::v1 as pb;
use support::AbortOnDropHandle;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Result;
use crate::lease::Ttl;
use crate::limits::Quotas;
use crate::state::{Event, Granted, State};
use crate::validate;

/// Where the store's changes go: called with the events of each mutation
/// (and the revision after it) under the store's lock, so in revision
/// order. Must be quick and must not call back into the store.
pub trait Publish: Send + Sync + std::fmt::Debug {
    /// Takes the events of one mutation (never called with none).
    fn publish(&self, revision: u64, events: Vec<Event>);

    /// The state starts at `revision` (loaded from elsewhere), before any
    /// change is published: nothing before it can be replayed.
    fn start(&self, _revision: u64) {}
}

/// Where the registry's writes go: the seam between the gRPC service and
/// the store behind it. Reads and Watch are always served from the local
/// [`Store`] (its state and hub); writes go through this. The memory
/// store ([`Store`] itself) applies them to its state; the etcd store
/// commits them to etcd and returns once its local mirror (a [`Store`]
/// too) has applied them, so a write is visible to a read on the same
/// replica as soon as it returns.
#[tonic::async_trait]
pub trait Writes: Send + Sync + std::fmt::Debug {
    /// Grants a lease (see [`State::grant_lease`]).
    async fn grant_lease(&self, ttl_ms: u64) -> Result<Granted>;
    /// A heartbeat, attaching the lease to KeepAlive stream `stream` if
    /// set; returns the lease's TTL.
    async fn keep_alive(&self, lease: u64, secret: &str, stream: Option<u64>) -> Result<Duration>;
    /// KeepAlive stream `stream` ended: revokes its lease if still
    /// attached. How many instances went, or `None` if the lease was gone
    /// or had moved to another stream.
    async fn stream_closed(&self, lease_id: u64, stream: u64) -> Option<usize>;
    /// Revokes a lease; returns how many instances it took.
    async fn revoke_lease(&self, lease_id: u64, secret: &str) -> Result<u32>;
    /// Registers an instance; returns it as stored and the revision.
    async fn register(&self, request: validate::Register) -> Result<(pb::Instance, u64)>;
    /// Updates an instance; returns it as stored and the revision.
    async fn update(&self, request: validate::Update) -> Result<(pb::Instance, u64)>;
    /// Deregisters an instance; returns the revision.
    async fn deregister(&self, request: validate::Deregister) -> Result<u64>;

    /// Waits (briefly) until the local store has reached `revision`, which
    /// a client saw on another replica: a watcher resuming here must not
    /// get a snapshot just because this replica is a moment behind. The
    /// memory store is always there.
    async fn reach(&self, _revision: u64) {}

    /// Turns true while this replica cannot reach its store (etcd
    /// partitioned away): it then refuses writes and heartbeats, reports
    /// NOT_SERVING and ends its Watch streams with UNAVAILABLE, so nodes
    /// and watchers move to another replica. `None`: never (memory).
    fn lost(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// The memory store: every write applied to the state at once.
#[tonic::async_trait]
impl Writes for Store {
    async fn grant_lease(&self, ttl_ms: u64) -> Result<Granted> {
        Store::grant_lease(self, ttl_ms)
    }

    async fn keep_alive(&self, lease: u64, secret: &str, stream: Option<u64>) -> Result<Duration> {
        Store::keep_alive(self, lease, secret, stream)
    }

    async fn stream_closed(&self, lease_id: u64, stream: u64) -> Option<usize> {
        Store::stream_closed(self, lease_id, stream)
    }

    async fn revoke_lease(&self, lease_id: u64, secret: &str) -> Result<u32> {
        Store::revoke_lease(self, lease_id, secret)
    }

    async fn register(&self, request: validate::Register) -> Result<(pb::Instance, u64)> {
        Store::register(self, request)
    }

    async fn update(&self, request: validate::Update) -> Result<(pb::Instance, u64)> {
        Store::update(self, request)
    }

    async fn deregister(&self, request: validate::Deregister) -> Result<u64> {
        Store::deregister(self, request)
    }
}

/// The sink of a store nobody watches.
#[derive(Debug)]
struct Nobody;

impl Publish for Nobody {
    fn publish(&self, _revision: u64, _events: Vec<Event>) {}
}

/// The shared registry. See the module docs.
#[derive(Clone, Debug)]
pub struct Store {
    /// Everything shared between handlers.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The state; see the module docs for why a std mutex.
    state: Mutex<State>,
    /// Where changes go, in revision order (published under `state`'s lock).
    publisher: Arc<dyn Publish>,
    /// Wakes the lease sweeper: an earlier deadline appeared.
    sweeper: Notify,
    /// When the running sweeper last ticked (it does every [`TICK`]), or
    /// `None` while no sweeper runs. A gap over [`crate::lease::STALL`]
    /// means the registry was not scheduled (SIGSTOP, a VM pause); it is
    /// noticed by whichever comes first after it, a call or the sweeper.
    ticked: Mutex<Option<Instant>>,
    /// Random identity of this process's registry, sent to watchers so they
    /// can tell a restart (fresh state, revisions from 0) from a reconnect.
    registry_id: String,
}

impl Store {
    /// An empty registry. Leases only expire once
    /// [`Store::spawn_sweeper`] runs for it.
    pub fn new(ttl: Ttl) -> Store {
        Store::with_quotas(ttl, Quotas::default())
    }

    /// An empty registry enforcing `quotas` (instances per lease and per
    /// service).
    pub fn with_quotas(ttl: Ttl, quotas: Quotas) -> Store {
        Store::with_publisher(ttl, quotas, |_| Arc::new(Nobody))
    }

    /// An empty registry whose changes go to the sink `make` returns
    /// (given the registry's id).
    pub fn with_publisher(
        ttl: Ttl,
        quotas: Quotas,
        make: impl FnOnce(&str) -> Arc<dyn Publish>,
    ) -> Store {
        Store::with_id(ttl, quotas, format!("{:016x}", rand::random::<u64>()), make)
    }

    /// [`Store::with_publisher`] with the registry id `registry_id` (the
    /// etcd store's, shared by every replica over the same cluster and
    /// prefix) instead of a random one.
    pub fn with_id(
        ttl: Ttl,
        quotas: Quotas,
        registry_id: String,
        make: impl FnOnce(&str) -> Arc<dyn Publish>,
    ) -> Store {
        let mut state = State::new(ttl);
        state.set_quotas(quotas);
        Store {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                publisher: make(&registry_id),
                sweeper: Notify::new(),
                ticked: Mutex::new(None),
                registry_id,
            }),
        }
    }

    /// This registry's random identity.
    pub fn registry_id(&self) -> &str {
        &self.shared.registry_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state it leaves is
        // still better served than a registry that refuses every call.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a mutation: first expires the leases that are due (so no call
    /// ever sees a dead lease alive), then `op`, then publishes the events
    /// of both, all under the lock. Returns `op`'s value and the revision
    /// after it.
    fn write<T>(&self, op: impl FnOnce(&mut State) -> Result<(T, Vec<Event>)>) -> Result<(T, u64)> {
        let mut state = self.lock();
        self.renew_if_stalled(&mut state);
        let mut events = state.expire(Instant::now());
        let value = op(&mut state).map(|(value, more)| {
            events.extend(more);
            value
        });
        let revision = state.revision();
        self.publish(revision, events);
        drop(state);
        value.map(|v| (v, revision))
    }

    /// Grants a lease (see [`State::grant_lease`]).
    pub fn grant_lease(&self, ttl_ms: u64) -> Result<Granted> {
        let ((granted, earliest), _) = self.write(|s| {
            let before = s.next_deadline();
            let granted = s.grant_lease(ttl_ms, Instant::now())?;
            Ok(((granted, s.next_deadline() != before), Vec::new()))
        })?;
        if earliest {
            // The sweeper may be sleeping towards a later deadline.
            self.shared.sweeper.notify_one();
        }
        Ok(granted)
    }

    /// A heartbeat, attaching the lease to KeepAlive stream `stream` if set.
    pub fn keep_alive(&self, lease_id: u64, secret: &str, stream: Option<u64>) -> Result<Duration> {
        self.write(|s| {
            Ok((
                s.keep_alive(lease_id, secret, stream, Instant::now())?,
                Vec::new(),
            ))
        })
        .map(|(ttl, _)| ttl)
    }

    /// KeepAlive stream `stream` ended: revokes its lease if still attached.
    /// Returns how many instances went, or `None` if the lease was gone or
    /// had moved to another stream.
    pub fn stream_closed(&self, lease_id: u64, stream: u64) -> Option<usize> {
        self.write(|s| {
            Ok(match s.stream_closed(lease_id, stream) {
                Some(events) => (Some(events.len()), events),
                None => (None, Vec::new()),
            })
        })
        .ok()
        .and_then(|(removed, _)| removed)
    }

    /// Revokes a lease; returns how many instances it took.
    pub fn revoke_lease(&self, lease_id: u64, secret: &str) -> Result<u32> {
        self.write(|s| s.revoke_lease(lease_id, secret))
            .map(|(n, _)| n)
    }

    /// Registers an instance; returns it as stored and the revision.
    pub fn register(&self, request: validate::Register) -> Result<(pb::Instance, u64)> {
        self.write(|s| s.register(request))
    }

    /// Updates an instance; returns it as stored and the revision.
    pub fn update(&self, request: validate::Update) -> Result<(pb::Instance, u64)> {
        self.write(|s| s.update(request))
    }

    /// Deregisters an instance; returns the revision.
    pub fn deregister(&self, request: validate::Deregister) -> Result<u64> {
        self.write(|s| Ok(((), s.deregister(request)?)))
            .map(|(_, revision)| revision)
    }

    /// Services with instances, and the current revision.
    pub fn list_services(&self) -> (Vec<pb::ServiceSummary>, u64) {
        let state = self.lock();
        (state.list_services(), state.revision())
    }

    /// Instances of `service`, and the current revision.
    pub fn resolve(&self, service: &str) -> (Vec<pb::Instance>, u64) {
        let state = self.lock();
        (state.resolve(service), state.revision())
    }

    /// How many leases are alive.
    pub fn lease_count(&self) -> usize {
        self.lock().lease_count()
    }

    /// The descriptors of `service` and its proto_service.
    pub fn descriptors(&self, service: &str) -> Result<(String, Arc<[u8]>)> {
        self.lock().descriptors(service)
    }

    /// The instances of `service` as they are now (see
    /// [`State::instances_of`]): the lock is held for one reference count.
    pub fn instances_of(&self, service: &str) -> Option<crate::state::ServiceInstances> {
        self.lock().instances_of(service)
    }

    /// Runs `f` on the state under the lock: no change is made or
    /// published meanwhile, so a watcher can copy the state and take its
    /// place in the stream of changes with nothing in between. Keep `f`
    /// short: writers and heartbeats wait for it.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock())
    }

    /// Applies changes made elsewhere (the etcd store's mirror): `f`'s
    /// events are published under the lock, like a write's, with the
    /// revision after them.
    pub fn apply(&self, f: impl FnOnce(&mut State) -> Vec<Event>) {
        let mut state = self.lock();
        let events = f(&mut state);
        let revision = state.revision();
        self.publish(revision, events);
    }

    /// Loads the state from elsewhere before anyone watches: `f`'s changes
    /// are not published, and the sink starts at the revision after them
    /// (nothing before it can be replayed).
    pub fn load(&self, f: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        f(&mut state);
        self.shared.publisher.start(state.revision());
    }

    /// Hands a mutation's events to the sink (under the lock).
    fn publish(&self, revision: u64, events: Vec<Event>) {
        if !events.is_empty() {
            self.shared.publisher.publish(revision, events);
        }
    }
}

// The lease sweeper: one task per store that sleeps until the earliest
// lease deadline, expires what ran out (publishing the removals), and
// sleeps again. A grant that brings the earliest deadline forward wakes it
// early (`Shared::sweeper`). Which leases end, and how, is `crate::lease`.

/// Stops the sweeper task when dropped.
#[derive(Debug)]
pub struct SweeperGuard {
    /// The task; aborted on drop. It only ever waits in a sleep or for a
    /// wake-up, so aborting it interrupts no change half-made.
    _task: AbortOnDropHandle<()>,
}

impl Drop for SweeperGuard {
    fn drop(&mut self) {
        tracing::debug!("lease sweeper stopped");
    }
}

impl Store {
    /// Starts the task that expires this store's leases at their deadlines.
    /// It runs until the guard is dropped. (Without it, leases still end
    /// when due, but only at the next mutation.)
    pub fn spawn_sweeper(&self) -> SweeperGuard {
        SweeperGuard {
            _task: AbortOnDropHandle::new(tokio::spawn(sweep(self.clone()))),
        }
    }

    /// Gives every lease a fresh TTL (see [`State::renew_all`]) when the
    /// registry was not scheduled for over [`crate::lease::STALL`] since the
    /// sweeper's last tick. Called, under the lock, before anything expires:
    /// the first heartbeat read after a stall must not expire the leases
    /// whose heartbeats are still unread behind it (seen: all of them).
    fn renew_if_stalled(&self, state: &mut State) {
        let now = Instant::now();
        let mut ticked = self
            .shared
            .ticked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(last) = ticked.as_mut() else {
            return;
        };
        let gap = now.saturating_duration_since(*last);
        *last = now;
        if gap > crate::lease::STALL {
            tracing::warn!(
                stalled_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
                "the registry was not running for a while: every lease gets a fresh TTL instead of expiring"
            );
            state.renew_all(now);
        }
    }

    /// Expires the leases that are due; returns the next deadline.
    fn expire_due(&self) -> Option<Instant> {
        let mut state = self.lock();
        self.renew_if_stalled(&mut state);
        let events = state.expire(Instant::now());
        if !events.is_empty() {
            tracing::info!(removed = events.len(), "leases expired");
        }
        let revision = state.revision();
        self.publish(revision, events);
        state.next_deadline()
    }
}

/// How often the sweeper wakes even with no deadline due, so that a gap in
/// its ticks means the registry was stalled (well below `lease::STALL`).
const TICK: Duration = Duration::from_millis(250);

async fn sweep(store: Store) {
    *store
        .shared
        .ticked
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    loop {
        // Expires what is due (after renewing everything if the registry
        // was stalled) and publishes the removals; then sleeps until the
        // next deadline, the next tick, or until woken (an earlier deadline
        // appeared). A wake-up that came in between is not lost: Notify
        // keeps one permit.
        let next = store.expire_due();
        let tick = Instant::now() + TICK;
        let wake = next.map_or(tick, |next| next.min(tick));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = store.shared.sweeper.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> pb::Instance {
        pb::Instance {
            service: "svc".into(),
            instance_id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            weight: Some(1),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_without_heartbeats_expires_after_its_ttl() {
        let store = Store::new(Ttl::default());
        let _guard = store.spawn_sweeper();
        let grant = store.grant_lease(1000).unwrap();
        let register = |id: &str| crate::validate::Register {
            lease_id: grant.lease_id,
            lease_secret: grant.lease_secret.clone(),
            instance: instance(id),
            descriptors: None,
        };
        store.register(register("a")).unwrap();
        store.register(register("b")).unwrap();
        let count = || store.resolve("svc").0.len();

        // Heartbeats keep it alive past its first deadline.
        tokio::time::sleep(Duration::from_millis(900)).await;
        store
            .keep_alive(grant.lease_id, &grant.lease_secret, None)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(count(), 2);

        // Without them it dies one TTL after the last one, not before.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(count(), 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count(), 0);
        assert!(
            store
                .keep_alive(grant.lease_id, &grant.lease_secret, None)
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_wakes_the_sweeper() {
        let store = Store::new(Ttl::default());
        let _guard = store.spawn_sweeper();
        // The sweeper first sleeps towards a far deadline...
        store.grant_lease(60_000).unwrap();
        tokio::task::yield_now().await;
        // ...then a short lease appears: it must still go on time.
        let short = store.grant_lease(200).unwrap();
        store
            .register(crate::validate::Register {
                lease_id: short.lease_id,
                lease_secret: short.lease_secret.clone(),
                instance: instance("x"),
                descriptors: None,
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(store.resolve("svc").0.is_empty());
    }
}
