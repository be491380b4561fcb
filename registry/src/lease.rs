//! Leases and their expiry.
//!
//! A lease lives until its deadline unless a heartbeat pushes the deadline
//! on. Deadlines are kept sorted in [`Deadlines`], so finding the leases
//! that ran out is a look at the front of a set, and ONE background task
//! ([`spawn_sweeper`]) sleeps until the earliest deadline, removes what ran
//! out, and sleeps again. A grant that brings the earliest deadline forward
//! wakes it early. The task stops when its [`SweeperGuard`] is dropped.
//!
//! Times are [`tokio::time::Instant`]s so tests can pause and advance the
//! clock instead of sleeping.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::state::InstanceKey;
use crate::store::Store;

/// A lease: the life of the instances registered under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Random, nonzero, unique among live leases.
    pub id: u64,
    /// Proof of ownership: 128 random bits in hex, given out once by
    /// GrantLease.
    pub secret: String,
    /// How long the lease lives without a heartbeat.
    pub ttl: Duration,
    /// When it dies unless a heartbeat comes first.
    pub deadline: Instant,
    /// The instances registered under it, removed with it; each once. A
    /// `Vec` rather than a set: it is only pushed to, iterated and (on
    /// Deregister) searched, and costs about half as much per instance.
    pub instances: Vec<InstanceKey>,
    /// The KeepAlive stream the lease is attached to, if any: when that
    /// stream ends, the lease is revoked. A newer stream takes it over.
    pub attached: Option<u64>,
}

/// Lease deadlines in time order.
#[derive(Debug, Default, Clone)]
pub struct Deadlines {
    /// `(deadline, lease_id)`: the id breaks ties between equal instants.
    set: BTreeSet<(Instant, u64)>,
}

impl Deadlines {
    /// Tracks a lease's deadline.
    pub fn insert(&mut self, deadline: Instant, lease_id: u64) {
        self.set.insert((deadline, lease_id));
    }

    /// Stops tracking a lease's deadline.
    pub fn remove(&mut self, deadline: Instant, lease_id: u64) {
        self.set.remove(&(deadline, lease_id));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.set.first().map(|(at, _)| *at)
    }

    /// Removes and returns the leases whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.set.first() {
            if at > now {
                break;
            }
            self.set.pop_first();
            due.push(id);
        }
        due
    }

    /// How many deadlines are tracked.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether no deadline is tracked.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Stops the sweeper task when dropped.
#[derive(Debug)]
pub struct SweeperGuard {
    /// The store whose sweeper to stop.
    store: Store,
}

impl Drop for SweeperGuard {
    fn drop(&mut self) {
        self.store.stop_sweeper();
    }
}

/// Starts the task that expires `store`'s leases. It runs until the guard is
/// dropped.
pub fn spawn_sweeper(store: Store) -> SweeperGuard {
    tokio::spawn(sweep(store.clone()));
    SweeperGuard { store }
}

async fn sweep(store: Store) {
    while !store.sweeper_stopped() {
        // Expires what is due and publishes the removals; then sleeps until
        // the next deadline or until woken (an earlier deadline appeared, or
        // the guard was dropped). A wake-up that came in between is not
        // lost: Notify keeps one permit.
        match store.expire_due() {
            Some(next) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = store.sweeper_woken() => {}
                }
            }
            None => store.sweeper_woken().await,
        }
    }
    tracing::debug!("lease sweeper stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ttl;
    use registry_proto::registry::v1 as pb;

    fn instance(id: &str) -> pb::Instance {
        pb::Instance {
            service: "svc".into(),
            instance_id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            weight: 1,
            ..Default::default()
        }
    }

    #[test]
    fn deadlines_pop_in_order() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.insert(t0 + Duration::from_millis(30), 3);
        d.insert(t0 + Duration::from_millis(10), 1);
        d.insert(t0 + Duration::from_millis(20), 2);
        assert_eq!(d.next(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(d.pop_due(t0 + Duration::from_millis(20)), vec![1, 2]);
        assert_eq!(d.len(), 1);
        d.remove(t0 + Duration::from_millis(30), 3);
        assert!(d.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_without_heartbeats_expires_after_its_ttl() {
        let store = Store::new(Ttl::default());
        let _guard = spawn_sweeper(store.clone());
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
        let _guard = spawn_sweeper(store.clone());
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
