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
//! The directory knows instances only; what they serve (descriptors) is
//! [`crate::descriptors`]' job, one layer up.
//!
//! # Layout
//! - this file: the public types ([`Snapshot`], [`Change`], ...) and the
//!   [`Directory`] handle with the state it shares with its watch task.
//! - `watch.rs`: the watch task: one stream at a time, reconnection with
//!   backoff, publishing, the grace timer of stale instances.
//! - `apply.rs`: pure: joining a snapshot sent in parts, and applying one
//!   watch message to a [`Snapshot`].

mod apply;
mod watch;

use crate::connect::Connector;
use registry_proto::registry::v1::{Instance, RemovalReason};
use registry_proto::security::{RegistryConn, SecurityError};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{broadcast, watch as follow};
use tokio_util::task::AbortOnDropHandle;

/// How long instances of a restarted registry's predecessor are kept.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

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

    /// Whether `service` has stale instances, used or not (shadowed by live
    /// ones): while it does, its [`instances`](Self::instances) can change
    /// with no [`Change`] of its own.
    pub fn has_stale(&self, service: &str) -> bool {
        self.stale.get(service).is_some_and(|l| !l.is_empty())
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
    snapshots: follow::Sender<Arc<Snapshot>>,
    /// Every change, for `watch` output.
    changes: broadcast::Sender<Change>,
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
            snapshots: follow::channel(Arc::new(Snapshot::default())).0,
            changes: broadcast::channel(1024).0,
            grace,
        });
        let task = tokio::spawn(watch::run(shared.clone()));
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
    pub fn snapshots(&self) -> follow::Receiver<Arc<Snapshot>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
