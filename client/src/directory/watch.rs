//! The watch task: follows the registry's `Watch` stream, reconnecting to
//! the next replica at once and with exponential backoff after a full
//! round of failures, and publishes what [`apply`](super::apply) makes of
//! each message; and the state it shares with the [`Directory`](super::Directory)
//! handles.

use super::apply::{SNAPSHOT_LIMITS, apply, join_parts};
use super::snapshot::{Change, ChangeKind, RemovalCause, Snapshot};
use crate::status::{connect_failure, status_text};
use registry_proto::registry::v1::{WatchRequest, WatchResponse};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use support::{Backoff, Connector, RegistryConn, Replicas, Rotation};
use tokio::sync::{broadcast, watch};

/// First and largest pause between rounds of reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub(super) struct Shared {
    /// The registry address (or replica list) as given, for messages.
    pub(super) addr: String,
    /// Every replica, lazily connected, and the one the watch is on.
    pub(super) replicas: Replicas,
    /// TLS and token, for every connection this directory's users open.
    pub(super) connector: Connector,
    /// Why the registry refused the last watch (a token problem), if it did;
    /// cleared once a watch is accepted. Not under `state`: `wait_synced`
    /// reads it while holding the snapshot channel's lock, which `publish`
    /// takes while holding `state`.
    pub(super) refused: Mutex<Option<String>>,
    /// Why the last round of connection attempts failed for good (nothing
    /// listens at any address, no route to them), if it did; cleared once a
    /// watch is accepted. Beside `refused` for the same reason.
    pub(super) unreachable: Mutex<Option<String>>,
    /// The working copy; a std mutex because it is never held across await.
    pub(super) state: Mutex<State>,
    /// The latest snapshot, for lookups and for followers (balanced channels).
    pub(super) snapshots: watch::Sender<Arc<Snapshot>>,
    /// Every change, for `watch` output.
    pub(super) changes: broadcast::Sender<Change>,
    /// How long stale instances are kept after a registry restart.
    pub(super) grace: Duration,
}

pub(super) struct State {
    /// The working copy, published as an `Arc` clone after each change.
    pub(super) snapshot: Snapshot,
    /// Why the last connection attempt failed.
    pub(super) last_error: String,
    /// Bumped whenever stale instances are set aside, so an old expiry timer
    /// does not clear a newer set.
    pub(super) stale_generation: u64,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the registry refused the last watch, if it did.
    pub(super) fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_refused(&self, why: Option<String>) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why the last connection attempt failed for good, if it did.
    pub(super) fn unreachable(&self) -> Option<String> {
        self.unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_unreachable(&self, why: Option<String>) {
        *self.unreachable.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Publishes the working copy and the changes, under the lock.
    pub(super) fn publish(&self, state: &State, changes: Vec<Change>) {
        let snapshot = Arc::new(state.snapshot.clone());
        self.snapshots.send_replace(snapshot);
        for change in changes {
            // No subscriber is fine.
            let _ = self.changes.send(change);
        }
    }
}

/// The watch loop: runs until the directory is dropped.
pub(super) async fn run(shared: Arc<Shared>) {
    let mut rotation = Rotation::new(Backoff::new(BACKOFF_MIN, BACKOFF_MAX));
    // Whether every failure of this round was final (refused, no route):
    // only then may a one-shot command give up.
    let mut all_gone = true;
    loop {
        let replica = shared.replicas.current();
        let (received, error, code, gone) = watch_once(&shared, replica.conn()).await;
        tracing::debug!(registry = replica.addr(), %error, "registry watch ended");
        if received {
            rotation.succeeded();
            all_gone = true;
            shared.set_unreachable(None);
        }
        all_gone &= gone;
        if matches!(
            code,
            Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
        ) {
            shared.set_refused(Some(error.clone()));
        } else if received {
            shared.set_refused(None);
        }
        let several = shared.replicas.len() > 1;
        let this = if several {
            format!("{}: {error}", replica.addr())
        } else {
            error.clone()
        };
        let pause = rotation.failed(&shared.replicas, replica.index, &error);
        if several {
            tracing::debug!(
                "registry {}: watch ended ({error}); moving to {}",
                replica.addr(),
                shared.replicas.current().addr()
            );
        }
        if pause.is_some() {
            shared.set_unreachable(all_gone.then(|| rotation.last_round()));
            all_gone = true;
        }
        {
            let mut state = shared.lock();
            state.last_error = if pause.is_some() {
                rotation.last_round()
            } else {
                this
            };
            state.snapshot.connected = false;
            shared.publish(&state, Vec::new());
        }
        // With jitter, so many clients do not reconnect in lockstep.
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
}

/// What to ask the registry for: everything, resuming after the last
/// revision applied when there is a copy. The registry that revision came
/// from (a replica of the same cluster, or the same process) then sends only
/// what changed since, with no gap and no duplicate; any other one sends a
/// snapshot, which [`apply`] reconciles as after a restart.
fn request(shared: &Shared) -> WatchRequest {
    let state = shared.lock();
    let snapshot = &state.snapshot;
    let resume = snapshot.synced && !snapshot.registry_id.is_empty();
    WatchRequest {
        services: Vec::new(),
        resume_revision: if resume { snapshot.revision } else { 0 },
        registry_id: if resume {
            snapshot.registry_id.clone()
        } else {
            String::new()
        },
    }
}

/// One watch stream on `registry`, until it fails. Returns whether anything
/// was applied, why it ended, the status code if the registry sent one, and
/// whether the connection itself failed for good (refused, no route).
async fn watch_once(
    shared: &Arc<Shared>,
    mut registry: RegistryConn,
) -> (bool, String, Option<tonic::Code>, bool) {
    let mut stream = match registry.watch(request(shared)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            return match connect_failure(&s) {
                Some(failure) => (false, failure.to_string(), None, failure.is_final()),
                None => (false, status_text(&s), Some(s.code()), false),
            };
        }
    };
    let mut received = false;
    let mut partial = super::apply::Partial::default();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => match join_parts(&mut partial, msg, SNAPSHOT_LIMITS) {
                Ok(Some(msg)) => {
                    if !received {
                        let (registry, revision) = (&msg.registry_id, msg.revision);
                        if msg.reset {
                            tracing::debug!(registry, revision, "watch: snapshot");
                        } else {
                            tracing::info!(registry, revision, "watch resumed");
                        }
                    }
                    // Counted only once something is applied: a registry
                    // that never ends its snapshot must not reset the backoff.
                    received = true;
                    apply_and_publish(shared, msg);
                }
                Ok(None) => {}
                Err(too_big) => {
                    tracing::warn!(registry = %shared.addr, "{too_big}; reconnecting");
                    return (received, too_big, None, false);
                }
            },
            Ok(None) => {
                return (
                    received,
                    "the registry closed the watch".to_string(),
                    None,
                    false,
                );
            }
            Err(s) => return (received, status_text(&s), Some(s.code()), false),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::super::apply::fixtures::{inst, reset};
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stale_instances_expire_after_the_grace_period() {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        let shared = Arc::new(Shared {
            addr: "test".into(),
            replicas: Connector::plaintext()
                .replicas("127.0.0.1:1", |e| e)
                .expect("valid"),
            connector: Connector::plaintext(),
            refused: Mutex::new(None),
            unreachable: Mutex::new(None),
            state: Mutex::new(State {
                snapshot: Snapshot::default(),
                last_error: String::new(),
                stale_generation: 0,
            }),
            snapshots: tx,
            changes: broadcast::channel(16).0,
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
