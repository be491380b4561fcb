//! A tonic [`Channel`] that follows the registry: for programs that have
//! generated stubs and only want discovery.
//!
//! The directory's [`Change`](crate::directory::Change)s of the service
//! are turned straight into `Change::Insert` / `Change::Remove` for
//! [`Channel::balance_channel`] (as linkerd2-proxy's `from_resolve` does),
//! against a map of what the channel already has, so an update that changes
//! nothing (a weight, say: the channel ignores weights) sends nothing. The
//! channel balances with tower's power of two choices and ignores weights;
//! for weighted policies use [`Caller`](crate::call::Caller).
//!
//! The changes say what the registry did, which is what the channel follows,
//! with two exceptions where it resynchronises from a snapshot instead: when
//! it fell behind the broadcast (lagged), and while the service has *stale*
//! instances after a registry restart, whose use depends on whether live
//! ones exist (see [`Snapshot::instances`](crate::directory::Snapshot::instances))
//! and changes without a `Change` of its own.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use registry_client::{balanced_channel, Directory};
//! let directory = Directory::connect("127.0.0.1:50051")?;
//! directory.wait_synced(std::time::Duration::from_secs(3)).await?;
//! let channel = balanced_channel(&directory, "calculator");
//! // Any generated client works on it, e.g.
//! // CalculatorClient::new(channel).add(BinaryRequest { a: 1.0, b: 2.0 }).await?;
//! # let _ = channel; Ok(()) }
//! ```

use crate::directory::{self, ChangeKind, Directory, address};
use registry_proto::registry::v1::Instance;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tonic::transport::Channel;
use tonic::transport::channel::Change;

/// A channel balancing over the instances of `service`, kept up to date
/// from `directory` for as long as the channel lives. Must be called within
/// a tokio runtime.
///
/// Calls made while the service has no instance wait until one appears (or
/// until the request's own timeout).
pub fn balanced_channel(directory: &Directory, service: &str) -> Channel {
    let (channel, tx) = Channel::balance_channel::<String>(64);
    let directory = directory.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let mut active = Active::default();
        let mut snapshots = directory.snapshots();
        let (snapshot, mut changes) = directory.subscribe();
        let mut stale = snapshot.has_stale(&service);
        let mut updates = active.reset(&snapshot.instances(&service));
        loop {
            for update in updates.drain(..) {
                let change = match update {
                    Update::Remove(addr) => Change::Remove(addr),
                    Update::Insert(addr) => match directory.connector().endpoint(&addr) {
                        Ok(endpoint) => {
                            Change::Insert(addr, endpoint.connect_timeout(Duration::from_secs(1)))
                        }
                        Err(e) => {
                            tracing::warn!(address = %addr, "skipping an instance: {e}");
                            continue;
                        }
                    },
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
            let resync = tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => {
                        if change.instance.service == service && !stale {
                            updates = active.apply(&change);
                        }
                        false
                    }
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => return,
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Reduced to a bool at once: `subscribe` below takes the
                    // lock under which the directory publishes snapshots.
                    let now = snapshots.borrow_and_update().has_stale(&service);
                    // Once more as the stale instances go, then not again.
                    let resync = now || stale;
                    stale = now;
                    resync
                },
                // Every clone of the channel was dropped.
                () = tx.closed() => return,
            };
            if resync {
                let (snapshot, fresh) = directory.subscribe();
                changes = fresh;
                stale = snapshot.has_stale(&service);
                updates = active.reset(&snapshot.instances(&service));
            }
        }
    });
    channel
}

/// An endpoint of the balanced channel to add or drop, by address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Update {
    /// A new address.
    Insert(String),
    /// An address no instance has any more.
    Remove(String),
}

/// What the channel holds. Its endpoints are addresses, so two instances
/// at one address are one endpoint, dropped when the last of them goes.
#[derive(Debug, Default)]
struct Active {
    /// The address of each instance, by instance id.
    by_id: BTreeMap<String, String>,
    /// How many instances each address has.
    by_addr: BTreeMap<String, usize>,
}

impl Active {
    /// Follows one change of the directory.
    fn apply(&mut self, change: &directory::Change) -> Vec<Update> {
        let id = &change.instance.instance_id;
        match change.kind {
            ChangeKind::Added | ChangeKind::Updated => self.insert(id, address(&change.instance)),
            ChangeKind::Removed(_) => self.remove(id).into_iter().collect(),
        }
    }

    /// Replaces everything with `instances`: what went first, then what is new.
    fn reset(&mut self, instances: &[Instance]) -> Vec<Update> {
        let before: Vec<String> = self.by_addr.keys().cloned().collect();
        self.by_id = instances
            .iter()
            .map(|i| (i.instance_id.clone(), address(i)))
            .collect();
        self.by_addr.clear();
        for addr in self.by_id.values() {
            *self.by_addr.entry(addr.clone()).or_default() += 1;
        }
        let gone = before
            .iter()
            .filter(|a| !self.by_addr.contains_key(*a))
            .map(|a| Update::Remove(a.clone()));
        let new = self
            .by_addr
            .keys()
            .filter(|a| !before.contains(a))
            .map(|a| Update::Insert(a.clone()));
        gone.chain(new).collect()
    }

    /// Instance `id` is at `addr` now; nothing when it already was.
    fn insert(&mut self, id: &str, addr: String) -> Vec<Update> {
        if self.by_id.get(id) == Some(&addr) {
            return Vec::new();
        }
        let mut updates: Vec<Update> = self.remove(id).into_iter().collect();
        let count = self.by_addr.entry(addr.clone()).or_default();
        *count += 1;
        if *count == 1 {
            updates.push(Update::Insert(addr.clone()));
        }
        self.by_id.insert(id.to_string(), addr);
        updates
    }

    /// Instance `id` is gone; nothing when it was not there.
    fn remove(&mut self, id: &str) -> Option<Update> {
        let addr = self.by_id.remove(id)?;
        let count = self.by_addr.get_mut(&addr)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.by_addr.remove(&addr);
        Some(Update::Remove(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::RemovalCause;

    fn change(kind: ChangeKind, id: &str, port: u32) -> directory::Change {
        directory::Change {
            kind,
            instance: Instance {
                service: "calc".into(),
                instance_id: id.into(),
                host: "10.0.0.1".into(),
                port,
                ..Default::default()
            },
        }
    }

    fn insert(port: u32) -> Update {
        Update::Insert(format!("10.0.0.1:{port}"))
    }

    fn remove(port: u32) -> Update {
        Update::Remove(format!("10.0.0.1:{port}"))
    }

    #[test]
    fn changes_map_to_inserts_and_removes_and_no_ops_to_nothing() {
        let mut active = Active::default();
        assert_eq!(
            active.apply(&change(ChangeKind::Added, "a", 1)),
            [insert(1)]
        );
        // Seen again, or updated without moving (a new weight): nothing.
        assert!(active.apply(&change(ChangeKind::Added, "a", 1)).is_empty());
        assert!(
            active
                .apply(&change(ChangeKind::Updated, "a", 1))
                .is_empty()
        );
        // Moved: the old address goes first.
        assert_eq!(
            active.apply(&change(ChangeKind::Updated, "a", 2)),
            [remove(1), insert(2)]
        );
        let gone = ChangeKind::Removed(RemovalCause::Resync);
        assert_eq!(active.apply(&change(gone, "a", 2)), [remove(2)]);
        assert!(active.apply(&change(gone, "a", 2)).is_empty());
    }

    #[test]
    fn one_endpoint_per_address_until_its_last_instance_goes() {
        let mut active = Active::default();
        let gone = ChangeKind::Removed(RemovalCause::Resync);
        assert_eq!(
            active.apply(&change(ChangeKind::Added, "a", 1)),
            [insert(1)]
        );
        assert!(active.apply(&change(ChangeKind::Added, "b", 1)).is_empty());
        assert!(active.apply(&change(gone, "a", 1)).is_empty());
        assert_eq!(active.apply(&change(gone, "b", 1)), [remove(1)]);
    }

    #[test]
    fn a_reset_sends_only_the_difference() {
        let mut active = Active::default();
        active.apply(&change(ChangeKind::Added, "a", 1));
        active.apply(&change(ChangeKind::Added, "b", 2));
        let now: Vec<Instance> = [("b", 2), ("c", 3)]
            .iter()
            .map(|(id, port)| change(ChangeKind::Added, id, *port).instance)
            .collect();
        assert_eq!(active.reset(&now), [remove(1), insert(3)]);
        assert!(active.reset(&now).is_empty());
        // Applied changes carry on from the reset.
        assert_eq!(
            active.apply(&change(ChangeKind::Added, "d", 4)),
            [insert(4)]
        );
    }
}
