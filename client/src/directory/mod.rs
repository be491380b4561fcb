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
//! When the stream breaks, the directory reconnects and keeps serving its
//! last copy meanwhile: a registry outage does not stop calls to instances
//! that are still up. Given several registry replicas (`a:1,b:2`), it moves
//! to the next one at once, and pauses with exponential backoff only after
//! every replica failed in a row. When it reconnects to a *restarted*
//! registry, or to a replica with a state of its own (a different
//! `registry_id`), that registry may not know every node yet: instances
//! missing from its snapshot are kept as *stale* fallbacks for a grace
//! period, used only for services that have no live instance, and dropped
//! when the period ends or they register again.
//!
//! The directory knows instances only; what they serve (descriptors) is
//! [`crate::descriptors`]' job, one layer up.
//!
//! # Layout
//! Each file uses only those listed after it.
//! - this file: the [`Directory`] handle and its errors.
//! - `watch.rs`: the watch task (one stream at a time, reconnection with
//!   backoff, publishing, the grace timer of stale instances) and the state
//!   it shares with the handles.
//! - `apply.rs`: pure: joining a snapshot sent in parts, and applying one
//!   watch message to a [`Snapshot`].
//! - `snapshot.rs`: the public types: [`Snapshot`], [`Change`], ...

mod apply;
mod snapshot;
mod watch;

pub use snapshot::{Change, ChangeKind, Instances, RemovalCause, Snapshot, address};

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{AbortOnDropHandle, Connector, RegistryConn, Replicas, SecurityError};
use thiserror::Error;
use tokio::sync::{broadcast, watch as follow};
use watch::{Shared, State};

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

impl Directory {
    /// Starts following the registry at `addr` (`HOST:PORT` or a URL, or
    /// several replicas' comma-separated) with the default grace period. Returns at once; see [`wait_synced`](Self::wait_synced).
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
        let replicas = connector
            .replicas(addr, |endpoint| {
                endpoint
                    .connect_timeout(Duration::from_secs(1))
                    // Notice a registry that vanished without closing the
                    // connection.
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(2))
            })
            .map_err(|e| match e {
                // The address at fault (or the whole list, when the list is).
                SecurityError::Address { addr, reason } => {
                    DirectoryError::BadAddress { addr, reason }
                }
                other => DirectoryError::Security(other),
            })?;
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            replicas,
            connector,
            refused: Mutex::new(None),
            unreachable: Mutex::new(None),
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
        self.wait(timeout, false).await
    }

    /// As [`wait_synced`](Self::wait_synced), but gives up at the first
    /// connection attempt that failed for good (nothing listens at the
    /// address, no route to it), as a one-shot command should: the
    /// directory itself keeps retrying either way.
    pub async fn wait_answer(&self, timeout: Duration) -> Result<(), DirectoryError> {
        self.wait(timeout, true).await
    }

    async fn wait(&self, timeout: Duration, fail_fast: bool) -> Result<(), DirectoryError> {
        let mut rx = self.shared.snapshots.subscribe();
        // Reduced to a bool at once: the `Ref` that `wait_for` returns holds
        // the snapshot channel's read lock, and taking `state` below while
        // holding it would deadlock against `publish` (`state`, then the
        // channel's write lock).
        let synced = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| {
                s.synced
                    || self.shared.refused().is_some()
                    || (fail_fast && self.shared.unreachable().is_some())
            }),
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

    /// A client for the registry replica the watch is on (shares the
    /// directory's connection and sends its token).
    pub fn registry(&self) -> RegistryConn {
        self.shared.replicas.current().conn()
    }

    /// Every registry replica, for calls that should go to the next one
    /// when one is down ([`Replicas::call`]).
    pub fn replicas(&self) -> &Replicas {
        &self.shared.replicas
    }

    /// How this directory connects (TLS, token): for connections to
    /// instances too.
    pub fn connector(&self) -> &Connector {
        &self.shared.connector
    }
}
