//! Leases: what they are, and how each one ends.
//!
//! A lease lives until its deadline unless a heartbeat pushes the deadline
//! on. [`Leases`] is the table of live leases with their deadlines kept
//! sorted ([`Deadlines`]), so finding the leases that ran out is a look at
//! the front of a set.
//!
//! # How a lease ends
//! Only through [`Leases`], in one of three ways, each a method that takes
//! the lease out of the table (and out of the deadlines) and hands it back:
//! - revoked by its owner (RevokeLease, a node shutting down or pausing):
//!   [`Leases::end`];
//! - its KeepAlive stream closed or broke while it was attached to it:
//!   [`Leases::end_attached`];
//! - its deadline passed without a heartbeat: [`Leases::end_due`], called
//!   by the state before every mutation and by the store's sweeper task at
//!   the earliest deadline (see `crate::store`).
//!
//! The state then removes the instances the lease held, with the matching
//! `RemovalReason` (`State::end_lease`). Nothing else removes a lease.
//!
//! This module depends on nothing else in the crate. Times are
//! [`tokio::time::Instant`]s so tests can pause and advance the clock
//! instead of sleeping.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Lease TTL bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl {
    /// TTL of a lease whose GrantLease asked for 0.
    pub default: Duration,
    /// Shortest TTL granted: shorter requests are raised to it, so a node
    /// cannot make the registry sweep (and watchers churn) every millisecond.
    pub min: Duration,
    /// Longest TTL granted: a dead node's instances must vanish eventually.
    pub max: Duration,
}

impl Default for Ttl {
    fn default() -> Ttl {
        Ttl {
            default: Duration::from_millis(1500),
            min: Duration::from_millis(100),
            max: Duration::from_millis(300_000),
        }
    }
}

impl Ttl {
    /// The TTL granted for a request of `requested_ms` (0: the default),
    /// clamped to `min..=max`.
    pub fn granted(&self, requested_ms: u64) -> Duration {
        let requested = if requested_ms == 0 {
            self.default
        } else {
            Duration::from_millis(requested_ms)
        };
        requested.clamp(self.min, self.max.max(self.min))
    }
}

/// An instance's key: (service, instance id). Shared (`Arc<str>`) between
/// the state's maps and the lease that holds the instance.
pub type InstanceKey = (Arc<str>, Arc<str>);

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
    /// The instances registered under it, removed with it; each once.
    pub instances: LeaseInstances,
    /// The KeepAlive stream the lease is attached to, if any: when that
    /// stream ends, the lease is revoked. A newer stream takes it over.
    pub attached: Option<u64>,
}

/// The instances a lease holds, grouped by service: a lease nearly always
/// holds instances of one service or a few, so each instance costs its id
/// (an `Arc<str>`, 16 bytes) here rather than a whole [`InstanceKey`] (32).
/// Vectors rather than sets: they are only pushed to, iterated and (on
/// Deregister) searched, and cost about half as much per instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseInstances {
    /// Each service with the ids held in it, in the order first held.
    services: Vec<(Arc<str>, Vec<Arc<str>>)>,
    /// How many ids, all services together.
    len: usize,
}

impl LeaseInstances {
    /// How many instances.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Holds `key` too (the caller holds each key once).
    pub fn push(&mut self, key: InstanceKey) {
        let (service, id) = key;
        match self.services.iter_mut().find(|(s, _)| *s == service) {
            Some((_, ids)) => ids.push(id),
            None => self.services.push((service, vec![id])),
        }
        self.len += 1;
    }

    /// No longer holds `key`.
    pub fn remove(&mut self, key: &InstanceKey) {
        let Some(at) = self.services.iter().position(|(s, _)| *s == key.0) else {
            return;
        };
        let ids = &mut self.services[at].1;
        let before = ids.len();
        ids.retain(|id| *id != key.1);
        self.len -= before - ids.len();
        if ids.is_empty() {
            self.services.swap_remove(at);
        }
    }

    /// Every key held, service by service.
    pub fn iter(&self) -> impl Iterator<Item = InstanceKey> + '_ {
        self.services
            .iter()
            .flat_map(|(service, ids)| ids.iter().map(|id| (service.clone(), id.clone())))
    }
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

/// How late past its deadline the lease sweeper may wake before the
/// registry counts as having been stopped meanwhile (SIGSTOP, a VM pause, a
/// swap storm): it then renews every lease instead of expiring them (etcd
/// renews its leases after a leader change for the same reason). A timer is
/// normally late by well under a millisecond; a loaded machine, by tens.
pub const STALL: Duration = Duration::from_secs(1);

/// The live leases, by id, and their deadlines. Every lease that ends
/// leaves through one of the `end*` methods (see the module docs).
#[derive(Debug, Default, Clone)]
pub struct Leases {
    /// Live leases by id.
    by_id: HashMap<u64, Lease>,
    /// Their deadlines in time order; exactly one entry per live lease.
    deadlines: Deadlines,
}

impl Leases {
    /// How many leases are alive.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no lease is alive.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The lease `id`, if alive.
    pub fn get(&self, id: u64) -> Option<&Lease> {
        self.by_id.get(&id)
    }

    /// The lease `id`, if alive, to change its instances or the stream it
    /// is attached to. Its deadline changes only through [`renew`](Self::renew).
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Lease> {
        self.by_id.get_mut(&id)
    }

    /// The earliest deadline: when [`end_due`](Self::end_due) next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.next()
    }

    /// A new lease of `ttl` that dies at `now + ttl` unless renewed, with a
    /// random nonzero id unused by any live lease and a 128-bit secret.
    pub fn grant(&mut self, ttl: Duration, now: Instant) -> &Lease {
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 && !self.by_id.contains_key(&id) {
                break id;
            }
        };
        let deadline = now + ttl;
        self.deadlines.insert(deadline, id);
        self.by_id.entry(id).or_insert(Lease {
            id,
            secret: format!("{:032x}", rand::random::<u128>()),
            ttl,
            deadline,
            instances: LeaseInstances::default(),
            attached: None,
        })
    }

    /// A heartbeat: lease `id` now dies at `now + ttl`. Returns its TTL, or
    /// `None` if it is not alive.
    pub fn renew(&mut self, id: u64, now: Instant) -> Option<Duration> {
        let lease = self.by_id.get_mut(&id)?;
        let old = lease.deadline;
        lease.deadline = now + lease.ttl;
        self.deadlines.remove(old, id);
        self.deadlines.insert(lease.deadline, id);
        Some(lease.ttl)
    }

    /// Ends lease `id` (revoked by its owner); `None` if it is not alive.
    pub fn end(&mut self, id: u64) -> Option<Lease> {
        let lease = self.by_id.remove(&id)?;
        self.deadlines.remove(lease.deadline, id);
        Some(lease)
    }

    /// Ends lease `id` if it is attached to KeepAlive stream `stream`: that
    /// stream ended. A lease a newer stream took over stays.
    pub fn end_attached(&mut self, id: u64, stream: u64) -> Option<Lease> {
        match self.by_id.get(&id) {
            Some(lease) if lease.attached == Some(stream) => self.end(id),
            _ => None,
        }
    }

    /// Gives every lease a fresh TTL from `now`, after the registry was not
    /// scheduled for a while (see [`STALL`]): the heartbeats of healthy
    /// nodes are still waiting in its sockets, so a deadline that passed
    /// meanwhile says nothing about the node.
    pub fn renew_all(&mut self, now: Instant) {
        let mut deadlines = Deadlines::default();
        for (id, lease) in &mut self.by_id {
            lease.deadline = now + lease.ttl;
            deadlines.insert(lease.deadline, *id);
        }
        self.deadlines = deadlines;
    }

    /// Ends every lease whose deadline is at or before `now`, earliest
    /// first.
    pub fn end_due(&mut self, now: Instant) -> Vec<Lease> {
        self.deadlines
            .pop_due(now)
            .into_iter()
            .filter_map(|id| self.by_id.remove(&id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_defaulted_and_clamped() {
        let t = Ttl::default();
        assert_eq!(t.granted(0), Duration::from_millis(1500));
        assert_eq!(t.granted(1), Duration::from_millis(100));
        assert_eq!(t.granted(5000), Duration::from_millis(5000));
        assert_eq!(t.granted(u64::MAX), Duration::from_millis(300_000));
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

    #[test]
    fn each_way_out_removes_the_lease_and_its_deadline() {
        let t0 = Instant::now();
        let ttl = Duration::from_millis(100);
        let mut leases = Leases::default();
        let a = leases.grant(ttl, t0).id;
        let b = leases.grant(ttl * 2, t0).id;
        let c = leases.grant(ttl * 3, t0).id;
        assert_eq!(leases.len(), 3);
        assert_eq!(leases.next_deadline(), Some(t0 + ttl));

        // A renewal moves the deadline: `a` is no longer due first.
        assert_eq!(leases.renew(a, t0 + ttl), Some(ttl));
        assert_eq!(leases.next_deadline(), Some(t0 + ttl * 2));

        // Only the stream it is attached to ends it.
        leases.get_mut(b).expect("alive").attached = Some(7);
        assert!(leases.end_attached(b, 8).is_none());
        assert_eq!(leases.end_attached(b, 7).map(|l| l.id), Some(b));

        assert_eq!(leases.end(c).map(|l| l.id), Some(c));
        assert!(leases.end(c).is_none(), "ends once");

        let due: Vec<u64> = leases.end_due(t0 + ttl * 2).iter().map(|l| l.id).collect();
        assert_eq!(due, vec![a]);
        assert!(leases.is_empty());
        assert_eq!(leases.next_deadline(), None);
        assert!(leases.renew(a, t0).is_none());
    }
}
