//! A live local copy of the registry: which instances each service has.
//!
//! A [`Directory`] watches the registry (one `Watch` stream for all services)
//! and applies the reset snapshot (joined first when the registry sends it
//! in several messages, up to a generous limit past which the watch fails
//! and is reconnected) and then each event, in revision order, to a local
//! map. Lookups read the map: no round trip per call. Duplicates and
//! updates that change nothing are dropped, so subscribers only hear about
//! real changes.
//!
//! When the stream breaks, the directory reconnects with exponential backoff
//! and keeps serving its last copy meanwhile: a registry outage does not stop
//! calls to instances that are still up. When it reconnects to a *restarted*
//! registry (a different `registry_id`), the new registry may not know every
//! node yet: instances missing from its snapshot are kept as *stale*
//! fallbacks for a grace period, used only for services that have no live
//! instance, and dropped when the period ends or they register again.
//!
//! Descriptors are cached per service, so calls keep working while the
//! registry is down once a service has been called or described.

use crate::connect::Connector;
use crate::descriptors::{self, DescriptorError};
use crate::status::status_text;
use prost::Message as _;
use prost_reflect::ServiceDescriptor;
use rand::Rng;
use registry_proto::registry::v1::event::Kind as EventKindPb;
use registry_proto::registry::v1::{Instance, RemovalReason, WatchRequest, WatchResponse};
use registry_proto::security::{RegistryConn, SecurityError};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{broadcast, watch};
use tokio_util::task::AbortOnDropHandle;

/// How long instances of a restarted registry's predecessor are kept.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one-shot registry requests (descriptors).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// First and largest delay between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The most a snapshot sent in parts may hold before the client gives up on
/// it. A registry that never ends one (`more` set forever) would otherwise
/// make the client hold every part it sends. Generous: the count is the
/// registry's own cap on instances (`MAX_INSTANCES`), and a million
/// instances of 500 bytes each is under the byte cap, so only a registry
/// that misbehaves meets these.
const SNAPSHOT_LIMITS: SnapshotLimits = SnapshotLimits {
    instances: 1_000_000,
    bytes: 512 * 1024 * 1024,
};

/// Caps on a snapshot being joined from its parts.
#[derive(Debug, Clone, Copy)]
struct SnapshotLimits {
    /// Instances, over all parts.
    instances: usize,
    /// Encoded (wire) size, over all parts.
    bytes: usize,
}

/// A snapshot being joined from its parts.
#[derive(Debug, Default)]
struct Partial {
    /// The parts so far, joined: the first part with the events of the others.
    head: Option<WatchResponse>,
    /// Their encoded size.
    bytes: usize,
    /// How many parts.
    parts: usize,
}

/// Errors of the directory itself.
#[derive(Debug, Error)]
pub enum DirectoryError {
    /// The registry address does not parse.
    #[error("invalid registry address `{addr}`: {reason}")]
    BadAddress {
        /// As given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// TLS files or the token are unusable.
    #[error(transparent)]
    Security(SecurityError),
    /// The registry answered, but refused this client (UNAUTHENTICATED or
    /// PERMISSION_DENIED): retrying will not help.
    #[error("the registry at {addr} refused this client: {reason}")]
    Refused {
        /// As given.
        addr: String,
        /// The registry's message (it names the token it expects).
        reason: String,
    },
    /// No snapshot arrived in time.
    #[error("cannot reach the registry at {addr}: {reason}")]
    Unreachable {
        /// As given.
        addr: String,
        /// The last connection error.
        reason: String,
    },
}

/// Why an instance left the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalCause {
    /// The registry said so, for this reason.
    Registry(RemovalReason),
    /// It was missing from a fresh snapshot after a reconnect.
    Resync,
    /// The registry restarted and it did not register again within the grace
    /// period.
    NotReregistered,
}

impl fmt::Display for RemovalCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemovalCause::Registry(RemovalReason::Deregistered) => "deregistered",
            RemovalCause::Registry(RemovalReason::LeaseExpired) => "lease expired",
            RemovalCause::Registry(RemovalReason::LeaseRevoked) => "lease revoked",
            RemovalCause::Registry(RemovalReason::KeepaliveClosed) => "node disconnected",
            RemovalCause::Registry(RemovalReason::Unspecified) => "removed",
            RemovalCause::Resync => "gone while disconnected",
            RemovalCause::NotReregistered => "not re-registered after a registry restart",
        })
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new instance.
    Added,
    /// Weight, address or metadata changed.
    Updated,
    /// Gone.
    Removed(RemovalCause),
}

/// One change to the directory, as broadcast to subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The instance after the change (before it, when removed).
    pub instance: Instance,
}

/// One service's instances, sorted by instance id: an immutable list shared
/// by every snapshot (and every caller) until the service changes, when a new
/// list is built. Looking instances up is therefore a reference-count
/// increment, not a copy.
pub type Instances = Arc<[Instance]>;

/// Instances by service; each list sorted by instance id.
type ByService = BTreeMap<String, Instances>;

/// An immutable view of the directory at one moment. Cloning it is cheap:
/// the per-service lists are shared.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The registry process this view came from ("" before the first).
    pub registry_id: String,
    /// The registry revision this view reflects.
    pub revision: u64,
    /// Whether a first snapshot has been received.
    pub synced: bool,
    /// Whether the watch stream is currently up.
    pub connected: bool,
    /// Live instances by service, each list sorted by instance id.
    live: ByService,
    /// Instances a previous registry process knew and the current one does
    /// not (yet), kept until the grace period ends.
    stale: ByService,
}

impl Snapshot {
    /// The instances to use for `service`, sorted by instance id: the live
    /// ones, or, if it has none, the stale ones from before a registry
    /// restart. Empty if neither. The list is shared, not copied.
    pub fn instances(&self, service: &str) -> Instances {
        match self.live.get(service) {
            Some(l) if !l.is_empty() => l.clone(),
            _ => self
                .stale
                .get(service)
                .cloned()
                .unwrap_or_else(|| Arc::from([])),
        }
    }

    /// Whether `service`'s instances are stale fallbacks.
    pub fn is_stale(&self, service: &str) -> bool {
        self.live.get(service).is_none_or(|l| l.is_empty())
            && self.stale.get(service).is_some_and(|l| !l.is_empty())
    }

    /// Every service with at least one usable instance, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .live
            .iter()
            .chain(&self.stale)
            .filter(|(_, l)| !l.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The protobuf service `service`'s instances serve, if they say.
    pub fn proto_service(&self, service: &str) -> Option<String> {
        self.instances(service)
            .iter()
            .map(|i| &i.proto_service)
            .find(|p| !p.is_empty())
            .cloned()
    }

    /// Every usable instance, as `Added` changes (the state a new watcher
    /// starts from).
    pub fn as_changes(&self) -> Vec<Change> {
        self.services()
            .iter()
            .flat_map(|s| self.instances(s).to_vec())
            .map(|instance| Change {
                kind: ChangeKind::Added,
                instance,
            })
            .collect()
    }
}

/// `host:port` of an instance, with brackets around an IPv6 host.
pub fn address(instance: &Instance) -> String {
    if instance.host.contains(':') && !instance.host.starts_with('[') {
        format!("[{}]:{}", instance.host, instance.port)
    } else {
        format!("{}:{}", instance.host, instance.port)
    }
}

/// A cheap-to-clone handle on a directory. The background watch stops when
/// the last handle is dropped.
#[derive(Clone)]
pub struct Directory {
    /// State shared with the watch task.
    shared: Arc<Shared>,
    /// Aborts the watch task when the last handle goes.
    _task: Arc<AbortOnDropHandle<()>>,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

struct Shared {
    /// The registry address as given, for messages.
    addr: String,
    /// A lazily connected client; clones share one HTTP/2 connection.
    registry: RegistryConn,
    /// TLS and token, for every connection this directory's users open.
    connector: Connector,
    /// Why the registry refused the last watch (a token problem), if it did;
    /// cleared once a watch is accepted. Not under `state`: `wait_synced`
    /// reads it while holding the snapshot channel's lock, which `publish`
    /// takes while holding `state`.
    refused: Mutex<Option<String>>,
    /// The working copy; a std mutex because it is never held across await.
    state: Mutex<State>,
    /// The latest snapshot, for lookups and for followers (balanced channels).
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// Every change, for `watch` output.
    changes: broadcast::Sender<Change>,
    /// Descriptors by registered service name.
    descriptors: Mutex<HashMap<String, ServiceDescriptor>>,
    /// How long stale instances are kept after a registry restart.
    grace: Duration,
}

struct State {
    /// The working copy, published as an `Arc` clone after each change.
    snapshot: Snapshot,
    /// Why the last connection attempt failed.
    last_error: String,
    /// Bumped whenever stale instances are set aside, so an old expiry timer
    /// does not clear a newer set.
    stale_generation: u64,
}

impl Directory {
    /// Starts following the registry at `addr` (`HOST:PORT` or a URL) with
    /// the default grace period. Returns at once; see [`wait_synced`](Self::wait_synced).
    /// Must be called within a tokio runtime.
    pub fn connect(addr: &str) -> Result<Directory, DirectoryError> {
        Directory::with_grace(addr, DEFAULT_GRACE)
    }

    /// Like [`connect`](Self::connect) with a chosen grace period for stale
    /// instances after a registry restart.
    pub fn with_grace(addr: &str, grace: Duration) -> Result<Directory, DirectoryError> {
        Directory::start(addr, grace, Connector::plaintext())
    }

    /// Like [`connect`](Self::connect) with TLS and/or a token: `connector`
    /// is used for the registry and for every instance this directory's
    /// users call.
    pub fn connect_with(addr: &str, connector: Connector) -> Result<Directory, DirectoryError> {
        Directory::start(addr, DEFAULT_GRACE, connector)
    }

    fn start(
        addr: &str,
        grace: Duration,
        connector: Connector,
    ) -> Result<Directory, DirectoryError> {
        let endpoint = connector.endpoint(addr).map_err(|e| match e {
            SecurityError::Address { reason, .. } => DirectoryError::BadAddress {
                addr: addr.to_string(),
                reason,
            },
            other => DirectoryError::Security(other),
        })?;
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(1))
            // Notice a registry that vanished without closing the connection.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2));
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            registry: connector.registry(endpoint.connect_lazy()),
            connector,
            refused: Mutex::new(None),
            state: Mutex::new(State {
                snapshot: Snapshot::default(),
                last_error: "not connected yet".to_string(),
                stale_generation: 0,
            }),
            snapshots: watch::channel(Arc::new(Snapshot::default())).0,
            changes: broadcast::channel(1024).0,
            descriptors: Mutex::new(HashMap::new()),
            grace,
        });
        let task = tokio::spawn(run(shared.clone()));
        Ok(Directory {
            shared,
            _task: Arc::new(AbortOnDropHandle::new(task)),
        })
    }

    /// Waits until the first snapshot has arrived.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), DirectoryError> {
        let mut rx = self.shared.snapshots.subscribe();
        // Reduced to a bool at once: the `Ref` that `wait_for` returns holds
        // the snapshot channel's read lock, and taking `state` below while
        // holding it would deadlock against `publish` (`state`, then the
        // channel's write lock).
        let synced = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.synced || self.shared.refused().is_some()),
        )
        .await
        .is_ok_and(|r| r.is_ok_and(|s| s.synced));
        if synced {
            return Ok(());
        }
        if let Some(reason) = self.shared.refused() {
            return Err(DirectoryError::Refused {
                addr: self.shared.addr.clone(),
                reason,
            });
        }
        Err(DirectoryError::Unreachable {
            addr: self.shared.addr.clone(),
            reason: self.shared.lock().last_error.clone(),
        })
    }

    /// The registry address, as given.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// The current view.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshots.borrow().clone()
    }

    /// The instances to call for `service` (see [`Snapshot::instances`]):
    /// a shared list, so this costs a few atomic operations, not a copy.
    pub fn instances(&self, service: &str) -> Instances {
        self.snapshot().instances(service)
    }

    /// Follows the snapshots: the receiver sees the latest each time it looks.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snapshots.subscribe()
    }

    /// The current view and every change after it, with nothing missed or
    /// seen twice in between.
    pub fn subscribe(&self) -> (Arc<Snapshot>, broadcast::Receiver<Change>) {
        // Changes are sent with the state lock held, so this is atomic.
        let _state = self.shared.lock();
        (self.snapshot(), self.shared.changes.subscribe())
    }

    /// A client for the registry itself (shares the directory's connection
    /// and sends its token).
    pub fn registry(&self) -> RegistryConn {
        self.shared.registry.clone()
    }

    /// How this directory connects (TLS, token): for connections to
    /// instances too.
    pub fn connector(&self) -> &Connector {
        &self.shared.connector
    }

    /// Descriptors of `service` if already fetched.
    pub fn cached_descriptors(&self, service: &str) -> Option<ServiceDescriptor> {
        self.shared
            .descriptors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned()
    }

    /// Drops the cached descriptors of `service`, so the next lookup asks
    /// again (after a redeploy changed its interface, say).
    pub fn forget_descriptors(&self, service: &str) {
        self.shared
            .descriptors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(service);
    }

    /// Caches `descriptor` as what `service` serves.
    pub(crate) fn remember_descriptors(&self, service: &str, descriptor: ServiceDescriptor) {
        self.shared
            .descriptors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service.to_string(), descriptor);
    }

    /// The protobuf service `service` serves, from the cache, or else from
    /// the registry, or else from an instance's server reflection.
    pub async fn descriptors(&self, service: &str) -> Result<ServiceDescriptor, DescriptorError> {
        if let Some(d) = self.cached_descriptors(service) {
            return Ok(d);
        }
        let mut problems = Vec::new();
        let hint = self.snapshot().proto_service(service).unwrap_or_default();
        let mut found = None;
        match descriptors::from_registry(&mut self.registry(), service, REQUEST_TIMEOUT).await {
            Ok(Some(pair)) => found = Some(pair),
            Ok(None) => problems.push("the registry has none".to_string()),
            Err(e) => problems.push(e),
        }
        if found.is_none() {
            for instance in self.instances(service).iter() {
                let addr = address(instance);
                let channel = match self.connector().endpoint(&addr) {
                    Ok(e) => e.connect_timeout(Duration::from_secs(1)).connect_lazy(),
                    Err(e) => {
                        problems.push(format!("{addr}: {e}"));
                        continue;
                    }
                };
                match descriptors::from_reflection(channel, &hint, REQUEST_TIMEOUT).await {
                    Ok(pair) => {
                        found = Some(pair);
                        break;
                    }
                    Err(e) => problems.push(format!("{addr}: {e}")),
                }
            }
        }
        let Some((proto_service, pool)) = found else {
            return Err(DescriptorError::Unavailable {
                service: service.to_string(),
                reason: problems.join("; "),
            });
        };
        let proto = if proto_service.is_empty() {
            hint
        } else {
            proto_service
        };
        let descriptor = descriptors::service_in(&pool, &proto, service)?;
        self.remember_descriptors(service, descriptor.clone());
        Ok(descriptor)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the registry refused the last watch, if it did.
    fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_refused(&self, why: Option<String>) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Publishes the working copy and the changes, under the lock.
    fn publish(&self, state: &State, changes: Vec<Change>) {
        let snapshot = Arc::new(state.snapshot.clone());
        self.snapshots.send_replace(snapshot);
        for change in changes {
            // No subscriber is fine.
            let _ = self.changes.send(change);
        }
    }
}

/// The watch loop: runs until the directory is dropped.
async fn run(shared: Arc<Shared>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let (received, error, code) = watch_once(&shared).await;
        tracing::debug!(registry = %shared.addr, %error, "registry watch ended");
        if matches!(
            code,
            Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
        ) {
            shared.set_refused(Some(error.clone()));
        } else if received {
            shared.set_refused(None);
        }
        {
            let mut state = shared.lock();
            state.last_error = error;
            state.snapshot.connected = false;
            shared.publish(&state, Vec::new());
        }
        if received {
            backoff = BACKOFF_MIN;
        }
        // Jitter so many clients do not reconnect in lockstep.
        let jitter = rand::rng().random_range(0.5..1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One watch stream, until it fails. Returns whether anything was applied,
/// why it ended, and the status code if the registry sent one.
async fn watch_once(shared: &Arc<Shared>) -> (bool, String, Option<tonic::Code>) {
    let mut registry = shared.registry.clone();
    let mut stream = match registry
        .watch(WatchRequest {
            services: Vec::new(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return (false, status_text(&s), Some(s.code())),
    };
    let mut received = false;
    let mut partial = Partial::default();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => match join_parts(&mut partial, msg, SNAPSHOT_LIMITS) {
                Ok(Some(msg)) => {
                    // Counted only once something is applied: a registry
                    // that never ends its snapshot must not reset the backoff.
                    received = true;
                    apply_and_publish(shared, msg);
                }
                Ok(None) => {}
                Err(too_big) => {
                    tracing::warn!(registry = %shared.addr, "{too_big}; reconnecting");
                    return (received, too_big, None);
                }
            },
            Ok(None) => return (received, "the registry closed the watch".to_string(), None),
            Err(s) => return (received, status_text(&s), Some(s.code())),
        }
    }
}

/// Joins the parts of a snapshot the registry sent in several messages
/// (`more` on all but the last; the first has `reset`, the others carry only
/// further instances): returns a message once it is complete, `None` while
/// parts are missing. Applied part by part, the first part would replace the
/// whole copy and the others be dropped as events of a revision already seen.
///
/// Fails, dropping what was joined, when the parts so far hold more than
/// `limits` allow: the watch then ends with that error and is reconnected.
fn join_parts(
    partial: &mut Partial,
    msg: WatchResponse,
    limits: SnapshotLimits,
) -> Result<Option<WatchResponse>, String> {
    let msg = match partial.head.take() {
        Some(mut head) if !msg.reset => {
            partial.bytes = partial.bytes.saturating_add(msg.encoded_len());
            partial.parts += 1;
            head.events.extend(msg.events);
            head.more = msg.more;
            head
        }
        // No snapshot under way, or a new one starts (the unfinished one
        // is dropped). Sized only when it is the first of several parts:
        // an ordinary event message is not measured.
        _ => {
            partial.bytes = if msg.reset && msg.more {
                msg.encoded_len()
            } else {
                0
            };
            partial.parts = 1;
            msg
        }
    };
    if !(msg.reset && msg.more) {
        return Ok(Some(msg));
    }
    let over = if msg.events.len() > limits.instances {
        Some(format!("{} instances", limits.instances))
    } else if partial.bytes > limits.bytes {
        Some(format!("{} bytes", limits.bytes))
    } else {
        None
    };
    if let Some(limit) = over {
        let (instances, bytes, parts) = (msg.events.len(), partial.bytes, partial.parts);
        *partial = Partial::default();
        return Err(format!(
            "the registry's snapshot is still unfinished after {parts} parts ({instances} instances, {bytes} bytes), over the client's limit of {limit}"
        ));
    }
    partial.head = Some(msg);
    Ok(None)
}

fn apply_and_publish(shared: &Arc<Shared>, msg: WatchResponse) {
    let mut state = shared.lock();
    let outcome = apply(&mut state.snapshot, msg);
    state.snapshot.connected = true;
    if outcome.stale_set_aside {
        state.stale_generation += 1;
        let generation = state.stale_generation;
        let shared = shared.clone();
        let grace = shared.grace;
        tokio::spawn(async move {
            // `sleep`, not `sleep_until(now + grace)`: that sum panics on
            // overflow (a caller's `with_grace(Duration::MAX)`).
            tokio::time::sleep(grace).await;
            expire_stale(&shared, generation);
        });
    }
    shared.publish(&state, outcome.changes);
}

/// Drops the stale instances set aside at `generation`, if still current.
fn expire_stale(shared: &Shared, generation: u64) {
    let mut state = shared.lock();
    if state.stale_generation != generation {
        return;
    }
    let stale = std::mem::take(&mut state.snapshot.stale);
    let changes: Vec<Change> = stale
        .into_values()
        .flat_map(|l| l.to_vec())
        .map(|instance| Change {
            kind: ChangeKind::Removed(RemovalCause::NotReregistered),
            instance,
        })
        .collect();
    if !changes.is_empty() {
        tracing::info!(
            count = changes.len(),
            "dropping instances not re-registered after a registry restart"
        );
    }
    shared.publish(&state, changes);
}

/// What applying one watch message did.
#[derive(Debug, Default)]
struct Outcome {
    /// The real changes, in order.
    changes: Vec<Change>,
    /// Whether instances were set aside as stale (start the grace timer).
    stale_set_aside: bool,
}

/// Whether two records describe the same thing for a caller (lease and
/// revision are bookkeeping).
fn same(a: &Instance, b: &Instance) -> bool {
    a.host == b.host
        && a.port == b.port
        && a.weight == b.weight
        && a.metadata == b.metadata
        && a.proto_service == b.proto_service
}

/// Applies one watch message to a snapshot. Pure, for testing.
fn apply(snap: &mut Snapshot, msg: WatchResponse) -> Outcome {
    let mut out = Outcome::default();
    if msg.reset {
        let restarted = !snap.registry_id.is_empty() && snap.registry_id != msg.registry_id;
        let mut fresh: BTreeMap<String, BTreeMap<String, Instance>> = BTreeMap::new();
        for ev in msg.events {
            if let Some(i) = ev.instance {
                fresh
                    .entry(i.service.clone())
                    .or_default()
                    .insert(i.instance_id.clone(), i);
            }
        }
        let old = std::mem::take(&mut snap.live);
        // Edited as maps and rebuilt once: a reset can touch every instance.
        let mut stale: BTreeMap<String, BTreeMap<String, Instance>> =
            std::mem::take(&mut snap.stale)
                .into_iter()
                .map(|(service, list)| {
                    let m = list
                        .iter()
                        .map(|i| (i.instance_id.clone(), i.clone()))
                        .collect();
                    (service, m)
                })
                .collect();
        // Gone: stale after a restart (maybe not re-registered yet), else removed.
        for (service, instances) in &old {
            for inst in instances.iter() {
                let id = &inst.instance_id;
                if fresh.get(service).is_some_and(|m| m.contains_key(id)) {
                    continue;
                }
                if restarted {
                    stale
                        .entry(service.clone())
                        .or_default()
                        .insert(id.clone(), inst.clone());
                    out.stale_set_aside = true;
                } else {
                    out.changes.push(Change {
                        kind: ChangeKind::Removed(RemovalCause::Resync),
                        instance: inst.clone(),
                    });
                }
            }
        }
        // New or changed.
        for (service, instances) in &fresh {
            let mut stale_here = stale.get_mut(service);
            for (id, inst) in instances {
                let was_stale = stale_here.as_mut().and_then(|m| m.remove(id));
                let changed = match find(&old, service, id).or(was_stale.as_ref()) {
                    None => Some(ChangeKind::Added),
                    Some(b) if same(b, inst) => None,
                    Some(_) => Some(ChangeKind::Updated),
                };
                if let Some(kind) = changed {
                    out.changes.push(Change {
                        kind,
                        instance: inst.clone(),
                    });
                }
            }
        }
        snap.stale = stale
            .into_iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(service, m)| (service, m.into_values().collect()))
            .collect();
        snap.live = fresh
            .into_iter()
            .map(|(service, m)| (service, m.into_values().collect()))
            .collect();
        snap.registry_id = msg.registry_id;
        snap.revision = msg.revision;
        snap.synced = true;
        return out;
    }
    if msg.registry_id != snap.registry_id && !msg.registry_id.is_empty() {
        // Events from another registry without a reset: cannot be applied to
        // this copy. The registry always resets first, so this is defensive.
        tracing::warn!("watch events from an unexpected registry; ignoring");
        return out;
    }
    for ev in msg.events {
        if ev.revision <= snap.revision {
            continue; // a duplicate, or older than our copy
        }
        snap.revision = ev.revision;
        let (kind, reason) = (ev.kind(), ev.reason());
        let Some(inst) = ev.instance else { continue };
        let service = inst.service.clone();
        let id = inst.instance_id.clone();
        match kind {
            EventKindPb::Added | EventKindPb::Updated => {
                let before = find(&snap.live, &service, &id)
                    .or_else(|| find(&snap.stale, &service, &id))
                    .cloned();
                unstale(snap, &service, &id);
                upsert(&mut snap.live, inst.clone());
                match before {
                    Some(b) if same(&b, &inst) => {}
                    Some(_) => out.changes.push(Change {
                        kind: ChangeKind::Updated,
                        instance: inst,
                    }),
                    None => out.changes.push(Change {
                        kind: ChangeKind::Added,
                        instance: inst,
                    }),
                }
            }
            EventKindPb::Removed => {
                if let Some(before) = remove(&mut snap.live, &service, &id) {
                    out.changes.push(Change {
                        kind: ChangeKind::Removed(RemovalCause::Registry(reason)),
                        instance: before,
                    });
                }
            }
            EventKindPb::Unspecified => {}
        }
    }
    snap.revision = snap.revision.max(msg.revision);
    out
}

fn unstale(snap: &mut Snapshot, service: &str, id: &str) {
    remove(&mut snap.stale, service, id);
}

/// Where `id` is (`Ok`) or would go (`Err`) in a list sorted by instance id.
fn position(list: &[Instance], id: &str) -> Result<usize, usize> {
    list.binary_search_by(|i| i.instance_id.as_str().cmp(id))
}

/// The instance `id` of `service`, if present.
fn find<'a>(map: &'a ByService, service: &str, id: &str) -> Option<&'a Instance> {
    let list = map.get(service)?;
    position(list, id).ok().map(|at| &list[at])
}

/// Adds or replaces `inst` in its service's list. The list is rebuilt (the
/// old one may be shared with published snapshots): O(instances of the
/// service) per change, which keeps lookups, far more frequent, free.
fn upsert(map: &mut ByService, inst: Instance) {
    let list = map
        .entry(inst.service.clone())
        .or_insert_with(|| Arc::from([]));
    let mut items = list.to_vec();
    match position(&items, &inst.instance_id) {
        Ok(at) => items[at] = inst,
        Err(at) => items.insert(at, inst),
    }
    *list = items.into();
}

/// Removes instance `id` of `service`, dropping the service when it was the
/// last; returns it.
fn remove(map: &mut ByService, service: &str, id: &str) -> Option<Instance> {
    let list = map.get_mut(service)?;
    let at = position(list, id).ok()?;
    let mut items = list.to_vec();
    let gone = items.remove(at);
    if items.is_empty() {
        map.remove(service);
    } else {
        *list = items.into();
    }
    Some(gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_proto::registry::v1::Event;

    fn inst(service: &str, port: u32, weight: u32) -> Instance {
        Instance {
            service: service.into(),
            instance_id: format!("127.0.0.1:{port}"),
            host: "127.0.0.1".into(),
            port,
            weight,
            ..Default::default()
        }
    }

    fn event(kind: EventKindPb, revision: u64, i: Instance) -> Event {
        Event {
            kind: kind as i32,
            revision,
            instance: Some(i),
            reason: 0,
        }
    }

    fn reset(id: &str, revision: u64, instances: Vec<Instance>) -> WatchResponse {
        let added = instances
            .into_iter()
            .map(|i| event(EventKindPb::Added, revision, i))
            .collect();
        WatchResponse {
            reset: true,
            revision,
            ..events(id, added)
        }
    }

    /// Fields not named here keep their defaults, so a field added to the
    /// message does not break these helpers.
    fn events(id: &str, events: Vec<Event>) -> WatchResponse {
        let revision = events.iter().map(|e| e.revision).max().unwrap_or(0);
        WatchResponse {
            revision,
            registry_id: id.into(),
            events,
            ..WatchResponse::default()
        }
    }

    fn kinds(out: &Outcome) -> Vec<(ChangeKind, u32)> {
        out.changes
            .iter()
            .map(|c| (c.kind, c.instance.port))
            .collect()
    }

    fn ports(snap: &Snapshot, service: &str) -> Vec<u32> {
        snap.instances(service).iter().map(|i| i.port).collect()
    }

    #[test]
    fn addresses() {
        let mut i = Instance {
            host: "10.0.0.1".into(),
            port: 80,
            ..Default::default()
        };
        assert_eq!(address(&i), "10.0.0.1:80");
        i.host = "::1".into();
        assert_eq!(address(&i), "[::1]:80");
    }

    #[test]
    fn reset_then_events_keep_an_exact_copy() {
        let mut s = Snapshot::default();
        let out = apply(
            &mut s,
            reset("r1", 5, vec![inst("calc", 1, 1), inst("echo", 2, 1)]),
        );
        assert_eq!(
            kinds(&out),
            vec![(ChangeKind::Added, 1), (ChangeKind::Added, 2)]
        );
        assert_eq!(s.services(), vec!["calc", "echo"]);
        let out = apply(
            &mut s,
            events(
                "r1",
                vec![
                    event(EventKindPb::Added, 6, inst("calc", 3, 2)),
                    event(EventKindPb::Updated, 7, inst("calc", 1, 9)),
                ],
            ),
        );
        assert_eq!(
            kinds(&out),
            vec![(ChangeKind::Added, 3), (ChangeKind::Updated, 1)]
        );
        assert_eq!(ports(&s, "calc"), vec![1, 3]);
        assert_eq!(s.instances("calc")[0].weight, 9);
        let mut removal = event(EventKindPb::Removed, 8, inst("echo", 2, 1));
        removal.reason = RemovalReason::LeaseExpired as i32;
        let out = apply(&mut s, events("r1", vec![removal]));
        assert_eq!(
            kinds(&out),
            vec![(
                ChangeKind::Removed(RemovalCause::Registry(RemovalReason::LeaseExpired)),
                2
            )]
        );
        assert_eq!(s.services(), vec!["calc"]);
        assert_eq!(s.revision, 8);
    }

    #[test]
    fn lookups_share_one_list_until_the_service_changes() {
        let mut s = Snapshot::default();
        apply(
            &mut s,
            reset("r1", 5, vec![inst("calc", 2, 1), inst("calc", 1, 1)]),
        );
        let first = s.instances("calc");
        assert!(Arc::ptr_eq(&first, &s.instances("calc")));
        assert_eq!(ports(&s, "calc"), vec![1, 2], "sorted by instance id");
        // Another service changing leaves this list alone...
        apply(
            &mut s,
            events("r1", vec![event(EventKindPb::Added, 6, inst("echo", 3, 1))]),
        );
        assert!(Arc::ptr_eq(&first, &s.instances("calc")));
        // ...its own change makes a new one, and the old one is unchanged.
        apply(
            &mut s,
            events("r1", vec![event(EventKindPb::Added, 7, inst("calc", 0, 1))]),
        );
        assert_eq!(ports(&s, "calc"), vec![0, 1, 2]);
        assert_eq!(first.len(), 2);
        assert!(s.instances("nothing").is_empty());
    }

    #[test]
    fn duplicates_and_no_op_updates_are_dropped() {
        let mut s = Snapshot::default();
        apply(&mut s, reset("r1", 5, vec![inst("calc", 1, 1)]));
        // Same revision again, and an older one: ignored.
        let out = apply(
            &mut s,
            events(
                "r1",
                vec![event(EventKindPb::Updated, 5, inst("calc", 1, 7))],
            ),
        );
        assert!(out.changes.is_empty());
        assert_eq!(s.instances("calc")[0].weight, 1);
        // A newer update that changes nothing a caller sees.
        let mut relabelled = inst("calc", 1, 1);
        relabelled.lease_id = 99;
        let out = apply(
            &mut s,
            events("r1", vec![event(EventKindPb::Updated, 6, relabelled)]),
        );
        assert!(out.changes.is_empty());
        // Removing what is not there.
        let out = apply(
            &mut s,
            events(
                "r1",
                vec![event(EventKindPb::Removed, 7, inst("calc", 5, 1))],
            ),
        );
        assert!(out.changes.is_empty());
        assert_eq!(s.revision, 7);
    }

    #[test]
    fn reconnect_to_the_same_registry_diffs_the_snapshot() {
        let mut s = Snapshot::default();
        apply(
            &mut s,
            reset("r1", 5, vec![inst("calc", 1, 1), inst("calc", 2, 1)]),
        );
        let out = apply(
            &mut s,
            reset("r1", 9, vec![inst("calc", 2, 4), inst("calc", 3, 1)]),
        );
        assert_eq!(
            kinds(&out),
            vec![
                (ChangeKind::Removed(RemovalCause::Resync), 1),
                (ChangeKind::Updated, 2),
                (ChangeKind::Added, 3)
            ]
        );
        assert!(!out.stale_set_aside);
    }

    #[test]
    fn restarted_registry_keeps_stale_fallbacks_until_reregistered() {
        let mut s = Snapshot::default();
        apply(
            &mut s,
            reset("r1", 5, vec![inst("calc", 1, 1), inst("echo", 2, 1)]),
        );
        // The new registry knows nothing yet.
        let out = apply(&mut s, reset("r2", 0, vec![]));
        assert!(out.changes.is_empty());
        assert!(out.stale_set_aside);
        assert_eq!(ports(&s, "calc"), vec![1]);
        assert!(s.is_stale("calc"));
        assert_eq!(s.services(), vec!["calc", "echo"]);
        // calc registers again on the new registry (revision restarts at 1).
        let out = apply(
            &mut s,
            events("r2", vec![event(EventKindPb::Added, 1, inst("calc", 1, 1))]),
        );
        assert!(out.changes.is_empty(), "same instance: no change");
        assert!(!s.is_stale("calc"));
        assert_eq!(ports(&s, "calc"), vec![1]);
        // echo is still a stale fallback.
        assert!(s.is_stale("echo"));
        assert_eq!(ports(&s, "echo"), vec![2]);
    }

    #[test]
    fn a_snapshot_in_several_messages_is_applied_whole() {
        let mut s = Snapshot::default();
        apply(&mut s, reset("r1", 5, vec![inst("calc", 1, 1)]));
        let mut first = reset("r1", 9, vec![inst("calc", 1, 1), inst("calc", 2, 1)]);
        first.more = true;
        let mut middle = events("r1", vec![event(EventKindPb::Added, 9, inst("calc", 3, 1))]);
        middle.more = true;
        let last = events("r1", vec![event(EventKindPb::Added, 9, inst("echo", 4, 1))]);
        let mut partial = Partial::default();
        let mut join = |msg| join_parts(&mut partial, msg, SNAPSHOT_LIMITS).expect("within limits");
        assert!(join(first).is_none());
        assert!(join(middle).is_none());
        let whole = join(last).expect("complete");
        let out = apply(&mut s, whole);
        // Nothing removed, the instances of every part added.
        assert_eq!(
            kinds(&out),
            vec![
                (ChangeKind::Added, 2),
                (ChangeKind::Added, 3),
                (ChangeKind::Added, 4)
            ]
        );
        assert_eq!(ports(&s, "calc"), vec![1, 2, 3]);
        assert_eq!(ports(&s, "echo"), vec![4]);
        assert_eq!(s.revision, 9);

        // A new snapshot replaces an unfinished one; plain events pass.
        let mut unfinished = reset("r1", 10, vec![inst("calc", 7, 1)]);
        unfinished.more = true;
        assert!(join(unfinished).is_none());
        let fresh = join(reset("r1", 11, vec![inst("calc", 8, 1)])).expect("complete");
        assert_eq!(fresh.events.len(), 1);
        let plain = events(
            "r1",
            vec![event(EventKindPb::Added, 12, inst("calc", 9, 1))],
        );
        assert!(join(plain).is_some());
        assert!(partial.head.is_none());
    }

    #[test]
    fn a_snapshot_that_never_ends_fails_at_the_limit() {
        let limits = SnapshotLimits {
            instances: 10,
            bytes: 100_000,
        };
        let part = |n: u32| {
            let mut msg = events("r1", vec![event(EventKindPb::Added, 9, inst("calc", n, 1))]);
            msg.more = true;
            msg
        };
        let mut partial = Partial::default();
        let mut first = reset("r1", 9, vec![inst("calc", 0, 1)]);
        first.more = true;
        assert_eq!(join_parts(&mut partial, first, limits), Ok(None));
        // `more` forever: held up to the limit, then an error naming it.
        for n in 1..10 {
            assert_eq!(
                join_parts(&mut partial, part(n), limits),
                Ok(None),
                "part {n}"
            );
        }
        let err = join_parts(&mut partial, part(10), limits).expect_err("over the count");
        assert!(
            err.starts_with(
                "the registry's snapshot is still unfinished after 11 parts (11 instances, "
            ),
            "{err}"
        );
        assert!(
            err.ends_with("over the client's limit of 10 instances"),
            "{err}"
        );
        // What was held is dropped.
        assert!(partial.head.is_none());

        // The same by size: parts of a little over 1000 bytes against a
        // limit of 5000, which the fifth part crosses.
        let limits = SnapshotLimits {
            instances: 1_000_000,
            bytes: 5000,
        };
        let big = |n: u32| {
            let mut i = inst("calc", n, 1);
            i.metadata.insert("k".into(), "x".repeat(1000));
            i
        };
        let mut first = reset("r1", 9, vec![big(0)]);
        first.more = true;
        let mut partial = Partial::default();
        let mut outcomes = Vec::new();
        outcomes.push(join_parts(&mut partial, first, limits));
        for n in 1..5 {
            let mut msg = events("r1", vec![event(EventKindPb::Added, 9, big(n))]);
            msg.more = true;
            outcomes.push(join_parts(&mut partial, msg, limits));
        }
        assert_eq!(outcomes[..4], [Ok(None), Ok(None), Ok(None), Ok(None)]);
        let err = outcomes[4].clone().expect_err("over the size");
        assert!(
            err.ends_with("over the client's limit of 5000 bytes"),
            "{err}"
        );
    }

    #[test]
    fn live_instances_shadow_stale_ones() {
        let mut s = Snapshot::default();
        apply(&mut s, reset("r1", 5, vec![inst("calc", 1, 1)]));
        apply(&mut s, reset("r2", 1, vec![inst("calc", 7, 1)]));
        assert_eq!(ports(&s, "calc"), vec![7]);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_instances_expire_after_the_grace_period() {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        let shared = Arc::new(Shared {
            addr: "test".into(),
            registry: Connector::plaintext().registry(
                tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            ),
            connector: Connector::plaintext(),
            refused: Mutex::new(None),
            state: Mutex::new(State {
                snapshot: Snapshot::default(),
                last_error: String::new(),
                stale_generation: 0,
            }),
            snapshots: tx,
            changes: broadcast::channel(16).0,
            descriptors: Mutex::new(HashMap::new()),
            grace: Duration::from_secs(5),
        });
        let mut changes = shared.changes.subscribe();
        apply_and_publish(&shared, reset("r1", 5, vec![inst("calc", 1, 1)]));
        apply_and_publish(&shared, reset("r2", 0, vec![]));
        assert_eq!(shared.snapshots.borrow().instances("calc").len(), 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(shared.snapshots.borrow().instances("calc").is_empty());
        assert_eq!(
            changes.recv().await.map(|c| c.kind).ok(),
            Some(ChangeKind::Added)
        );
        assert_eq!(
            changes.recv().await.map(|c| c.kind).ok(),
            Some(ChangeKind::Removed(RemovalCause::NotReregistered))
        );
    }
}
