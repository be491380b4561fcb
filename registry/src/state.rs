//! The registry's state as a plain, synchronous state machine: no I/O, no
//! locks, no clock of its own (the caller passes `now`), so it can be tested
//! exhaustively and its callers decide how to share it.
//!
//! It holds services and their instances, the leases that own them, and the
//! global revision. Every mutation returns the [`Event`]s it produced, each
//! with its own revision, in order; a mutation that changes nothing produces
//! none and leaves the revision alone. Replaying the events of every
//! mutation onto an empty map gives back exactly [`State::snapshot`]: that
//! is what Watch relies on.
//!
//! Descriptor sets are stored once per distinct content (interned in a set
//! of `Arc<[u8]>`), so a hundred thousand instances of one service share one
//! copy; the copy goes when its last instance does.
//!
//! Memory per instance matters (a registry may hold 100 000 of them), so an
//! instance is not stored as its `pb::Instance`: the service name and the
//! instance id are the map keys, shared (`Arc<str>`) with the lease's index
//! rather than copied, and the rest is a compact `Stored` that is turned
//! back into a `pb::Instance` when answering.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use registry_proto::limits::DEFAULT_WEIGHT;
use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::event::Kind;
use support::constant_time_eq;
use tokio::time::Instant;

use crate::error::{Error, Limit, Result};
use crate::lease::Ttl;
use crate::lease::{Lease, Leases};
use crate::limits::Quotas;
use crate::validate::{self, Limits};

pub use registry_proto::registry::v1::Event;
pub use registry_proto::registry::v1::RemovalReason;

/// Identifies an instance: `(service, instance_id)`. The strings are those
/// of the services map, shared, not copies.
pub use crate::lease::InstanceKey;

/// What GrantLease hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// The new lease's id.
    pub lease_id: u64,
    /// Its secret: needed for every change under the lease.
    pub lease_secret: String,
    /// The TTL actually granted.
    pub ttl: Duration,
}

/// One service's instances by id. Boxed because B-tree nodes are often
/// only half full: half-empty slots of 8-byte pointers cost far less than of
/// whole records.
type Instances = BTreeMap<Arc<str>, Box<Stored>>;

/// A service's instances as the state holds them: shared with the Watch
/// snapshots taken since its last change (copy on write, see
/// [`State::snapshot_copy`]).
type SharedInstances = Arc<Instances>;

/// One instance as stored: everything of its `pb::Instance` but the service
/// name and instance id, which are the keys it is stored under.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    /// Address to dial.
    host: Host,
    /// Fully-qualified protobuf service it serves (`None` if it does not
    /// say). A thin `Arc`, shared with the other instances of the service
    /// that name the same one (see [`State::register`]): 8 bytes inline.
    proto_service: Option<Arc<String>>,
    /// Free-form labels; `None` when there are none, because even an empty
    /// `HashMap` takes 48 bytes inline and most instances have none. An
    /// `Arc` (8 bytes inline, like a `Box`), so that a Watch snapshot copies
    /// it under the store's lock with a reference count, not a map clone.
    metadata: Option<Arc<HashMap<String, String>>>,
    /// Its descriptor set, shared with every instance that sent the same
    /// bytes. Behind a thin pointer (8 bytes, an `Arc<[u8]>` is 16): that
    /// keeps a `Stored` at 64 bytes, an allocation size class smaller.
    descriptors: Option<SharedDescriptors>,
    /// The lease that owns it.
    lease_id: u64,
    /// Revision of its last change.
    revision: u64,
    /// Port to dial.
    port: u32,
    /// Weight for balancing.
    weight: u32,
}

impl Stored {
    /// Stores `instance` (its service and id are dropped: they are keys).
    fn new(
        instance: pb::Instance,
        descriptors: Option<SharedDescriptors>,
        proto_service: Option<Arc<String>>,
    ) -> Stored {
        Stored {
            host: Host::new(instance.host),
            proto_service,
            metadata: metadata(instance.metadata),
            descriptors,
            lease_id: instance.lease_id,
            revision: instance.revision,
            port: instance.port,
            weight: instance.weight.unwrap_or(DEFAULT_WEIGHT),
        }
    }

    /// The protobuf service it serves, "" if it does not say.
    fn proto_service(&self) -> &str {
        self.proto_service.as_deref().map_or("", String::as_str)
    }

    /// The instance as clients see it.
    fn to_pb(&self, service: &str, instance_id: &str) -> pb::Instance {
        pb::Instance {
            service: service.to_string(),
            instance_id: instance_id.to_string(),
            host: self.host.to_string(),
            port: self.port,
            weight: Some(self.weight),
            metadata: self.metadata.as_deref().cloned().unwrap_or_default(),
            proto_service: self.proto_service().to_string(),
            lease_id: self.lease_id,
            revision: self.revision,
        }
    }
}

/// An interned descriptor set as an instance holds it: a thin pointer to
/// the shared bytes.
type SharedDescriptors = Arc<Arc<[u8]>>;

/// A host as stored, in 16 bytes: an IPv4 address inline (no allocation)
/// when it reads back exactly as given, which is the usual case; an IPv6
/// address or a name behind a thin pointer. (`IpAddr` inline would make
/// this 24 bytes, and [`Stored`] a size class larger for every instance.)
#[derive(Debug, Clone, PartialEq)]
enum Host {
    /// An IPv4 address written in its canonical form.
    V4(Ipv4Addr),
    /// An IPv6 address written in its canonical form.
    V6(Box<Ipv6Addr>),
    /// Anything else, as given. Boxed on purpose: a `String` inline is 24
    /// bytes, a `Box<str>` 16; this is 8.
    #[allow(clippy::box_collection)]
    Name(Box<String>),
}

impl Host {
    fn new(host: String) -> Host {
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if ip.to_string() == host => Host::V4(ip),
            Ok(IpAddr::V6(ip)) if ip.to_string() == host => Host::V6(Box::new(ip)),
            _ => Host::Name(Box::new(host)),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Digit by digit (see `write_ipv4`): every Resolve and event
            // writes the host of each instance it carries, and core's
            // `Ipv4Addr` Display took about 1 600 instructions an address,
            // 17% of a Resolve of 10 instances (callgrind).
            Host::V4(ip) => {
                let mut text = [0u8; 15];
                let len = write_ipv4(*ip, &mut text);
                f.pad(std::str::from_utf8(&text[..len]).unwrap_or_default())
            }
            Host::V6(ip) => ip.fmt(f),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// Labels as stored: no allocation at all when there are none.
fn metadata(labels: HashMap<String, String>) -> Option<Arc<HashMap<String, String>>> {
    (!labels.is_empty()).then(|| Arc::new(labels))
}

/// The whole registry state. See the module docs.
#[derive(Debug)]
pub struct State {
    /// Service name -> instance id -> instance. Sorted maps, because
    /// ListServices and Resolve answer in name order. A service with no
    /// instance left is removed.
    /// Names are `Arc<str>` shared with the leases' [`InstanceKey`]s.
    /// Each service's map is copied on write: a snapshot takes a reference
    /// to it, and the first change after that copies that one service.
    services: BTreeMap<Arc<str>, SharedInstances>,
    /// Live leases and their deadlines: the only way a lease ends (see
    /// [`crate::lease`]).
    leases: Leases,
    /// Revision of the last change; 0 before the first.
    revision: u64,
    /// Interned descriptor sets: one copy per distinct content, with how
    /// many stored instances use it. Counted explicitly rather than read
    /// off `Arc::strong_count`: a GetDescriptors answer still holding a
    /// clone must not keep a set alive once its last instance is gone.
    /// The pointer instances hold comes with the count.
    descriptors: HashMap<Arc<[u8]>, (usize, SharedDescriptors)>,
    /// Total size of `descriptors`.
    descriptor_bytes: usize,
    /// How many instances are stored, all services together.
    instance_count: usize,
    /// TTL bounds for new leases.
    ttl: Ttl,
    /// Registry-wide limits.
    limits: Limits,
    /// Instances per lease and per service.
    quotas: Quotas,
}

impl State {
    /// An empty registry.
    pub fn new(ttl: Ttl) -> State {
        State::with_limits(ttl, Limits::default())
    }

    /// An empty registry with other limits than the defaults.
    pub fn with_limits(ttl: Ttl, limits: Limits) -> State {
        State {
            services: BTreeMap::new(),
            leases: Leases::default(),
            revision: 0,
            descriptors: HashMap::new(),
            descriptor_bytes: 0,
            instance_count: 0,
            ttl,
            limits,
            quotas: Quotas::default(),
        }
    }

    /// Sets the instance quotas (per lease, per service) for later
    /// registrations.
    pub fn set_quotas(&mut self, quotas: Quotas) {
        self.quotas = quotas;
    }

    /// The revision of the last change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// How many leases are alive.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// How many distinct descriptor sets are stored.
    pub fn descriptor_count(&self) -> usize {
        self.descriptors.len()
    }

    /// The earliest lease deadline: when [`State::expire`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.leases.next_deadline()
    }

    /// How many instances are registered.
    pub fn instance_count(&self) -> usize {
        self.instance_count
    }

    /// Creates a lease of `ttl_ms` (0: the default; clamped to the allowed
    /// range) that dies at `now + ttl` unless kept alive.
    pub fn grant_lease(&mut self, ttl_ms: u64, now: Instant) -> Result<Granted> {
        if self.leases.len() >= self.limits.leases {
            return Err(Error::limit(
                Limit::Leases,
                format!("at most {} live leases", self.limits.leases),
            ));
        }
        let lease = self.leases.grant(self.ttl.granted(ttl_ms), now);
        Ok(Granted {
            lease_id: lease.id,
            lease_secret: lease.secret.clone(),
            ttl: lease.ttl,
        })
    }

    /// The lease `id` if `secret` is its secret.
    fn owned_lease(&mut self, id: u64, secret: &str) -> Result<&mut Lease> {
        let lease = self.leases.get_mut(id).ok_or(Error::LeaseNotFound(id))?;
        if !constant_time_eq(lease.secret.as_bytes(), secret.as_bytes()) {
            return Err(Error::WrongSecret(id));
        }
        Ok(lease)
    }

    /// A heartbeat: the lease now dies at `now + ttl`. With `stream`, the
    /// lease is attached to that KeepAlive stream (taking it over from any
    /// other). Returns the TTL.
    pub fn keep_alive(
        &mut self,
        id: u64,
        secret: &str,
        stream: Option<u64>,
        now: Instant,
    ) -> Result<Duration> {
        let lease = self.owned_lease(id, secret)?;
        if stream.is_some() {
            lease.attached = stream;
        }
        self.leases.renew(id, now).ok_or(Error::LeaseNotFound(id))
    }

    /// Revokes a lease on its owner's request; returns how many instances
    /// went with it.
    pub fn revoke_lease(&mut self, id: u64, secret: &str) -> Result<(u32, Vec<Event>)> {
        self.owned_lease(id, secret)?;
        let lease = self.leases.end(id);
        let events = self.end_lease(lease, RemovalReason::LeaseRevoked);
        let removed = u32::try_from(events.len()).unwrap_or(u32::MAX);
        Ok((removed, events))
    }

    /// The KeepAlive stream `stream` ended: revokes the lease if it is still
    /// attached to that stream (a newer stream may have taken it over).
    /// `None` when nothing was revoked.
    pub fn stream_closed(&mut self, id: u64, stream: u64) -> Option<Vec<Event>> {
        let lease = self.leases.end_attached(id, stream)?;
        Some(self.end_lease(Some(lease), RemovalReason::KeepaliveClosed))
    }

    /// Gives every lease a fresh TTL from `now`: after the registry was not
    /// scheduled for a while (see [`crate::lease::STALL`]), the heartbeats of
    /// healthy nodes are still waiting in its sockets, so a deadline that
    /// passed meanwhile says nothing about the node.
    pub fn renew_all(&mut self, now: Instant) {
        self.leases.renew_all(now);
    }

    /// Removes every lease whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        for lease in self.leases.end_due(now) {
            events.extend(self.end_lease(Some(lease), RemovalReason::LeaseExpired));
        }
        events
    }

    /// A lease ended (taken out of [`Leases`] by one of its `end*`
    /// methods, see [`crate::lease`]): removes the instances it held, each
    /// with `reason`.
    fn end_lease(&mut self, lease: Option<Lease>, reason: RemovalReason) -> Vec<Event> {
        let Some(lease) = lease else {
            return Vec::new();
        };
        lease
            .instances
            .iter()
            .filter_map(|key| self.remove_instance(&key, reason))
            .collect()
    }

    /// Registers or (same lease, same id) updates an instance.
    pub fn register(&mut self, request: validate::Register) -> Result<(pb::Instance, Vec<Event>)> {
        let validate::Register {
            lease_id,
            lease_secret,
            mut instance,
            descriptors,
        } = request;
        self.owned_lease(lease_id, &lease_secret)?;
        let existing = self
            .services
            .get(instance.service.as_str())
            .and_then(|s| s.get(instance.instance_id.as_str()));
        if let Some(existing) = existing
            && existing.lease_id != lease_id
        {
            return Err(Error::NotOwner {
                service: instance.service,
                instance_id: instance.instance_id,
            });
        }
        if existing.is_none() {
            let held = self.leases.get(lease_id).map_or(0, |l| l.instances.len());
            self.quotas.check_lease(lease_id, held)?;
            let count = self
                .services
                .get(instance.service.as_str())
                .map_or(0, |instances| instances.len());
            self.quotas.check_service(&instance.service, count)?;
        }
        if existing.is_none() && self.instance_count >= self.limits.instances {
            return Err(Error::limit(
                Limit::Instances,
                format!("at most {} instances", self.limits.instances),
            ));
        }
        if let Some(bytes) = &descriptors
            && !self.descriptors.contains_key(bytes.as_slice())
            && self.descriptor_bytes + bytes.len() > self.limits.descriptor_bytes
        {
            return Err(Error::limit(
                Limit::DescriptorBytes,
                format!(
                    "at most {} bytes of distinct descriptor sets",
                    self.limits.descriptor_bytes
                ),
            ));
        }
        let descriptors = descriptors.map(|bytes| self.intern(bytes));
        instance.lease_id = lease_id;
        let key = self.key_for(&instance.service, &instance.instance_id);
        // Share the proto_service name with the service's first instance
        // when it is the same (it nearly always is): 8 bytes per instance
        // instead of an allocation each.
        let proto_service = (!instance.proto_service.is_empty()).then(|| {
            self.services
                .get(&key.0)
                .and_then(|instances| instances.values().next())
                .and_then(|first| first.proto_service.clone())
                .filter(|shared| **shared == instance.proto_service)
                .unwrap_or_else(|| Arc::new(std::mem::take(&mut instance.proto_service)))
        });
        let stored = Stored::new(instance, descriptors, proto_service);
        let event = match self.services.get(&key.0).and_then(|s| s.get(&key.1)) {
            Some(old) => self.replace(&key, Stored::clone(old), stored),
            None => Some(self.insert(key.clone(), stored)),
        };
        Ok((self.instance(&key), event.into_iter().collect()))
    }

    /// The key for `(service, id)`, reusing the stored names when they exist
    /// so each name is held once however many maps refer to it.
    fn key_for(&self, service: &str, id: &str) -> InstanceKey {
        let Some((name, instances)) = self.services.get_key_value(service) else {
            return (service.into(), id.into());
        };
        let id = instances
            .get_key_value(id)
            .map_or_else(|| id.into(), |(id, _)| id.clone());
        (name.clone(), id)
    }

    /// Changes weight and/or metadata of an instance in place.
    pub fn update(&mut self, request: validate::Update) -> Result<(pb::Instance, Vec<Event>)> {
        let (key, old) = self.owned_instance(&request.owned)?;
        let mut new = old.clone();
        // `new` is one more user of the descriptors until `replace` settles.
        self.retain(&new.descriptors);
        if let Some(weight) = request.weight {
            new.weight = weight;
        }
        if let Some(labels) = request.metadata {
            new.metadata = metadata(labels);
        }
        let event = self.replace(&key, old, new);
        Ok((self.instance(&key), event.into_iter().collect()))
    }

    /// Removes one instance of its own lease.
    pub fn deregister(&mut self, request: validate::Deregister) -> Result<Vec<Event>> {
        let (key, _) = self.owned_instance(&request)?;
        if let Some(lease) = self.leases.get_mut(request.lease_id) {
            lease.instances.remove(&key);
        }
        Ok(self
            .remove_instance(&key, RemovalReason::Deregistered)
            .into_iter()
            .collect())
    }

    /// The instance `owned` names, with its key, if it belongs to the lease
    /// it names and the secret is right.
    fn owned_instance(&mut self, owned: &validate::Owned) -> Result<(InstanceKey, Stored)> {
        let (id, service, instance_id) = (
            owned.lease_id,
            owned.service.as_str(),
            owned.instance_id.as_str(),
        );
        self.owned_lease(id, &owned.lease_secret)?;
        let found = self.services.get_key_value(service).and_then(|(name, s)| {
            s.get_key_value(instance_id)
                .map(|(iid, stored)| ((name.clone(), iid.clone()), stored))
        });
        let Some((key, stored)) = found else {
            return Err(Error::InstanceNotFound {
                service: service.to_string(),
                instance_id: instance_id.to_string(),
            });
        };
        if stored.lease_id != id {
            return Err(Error::NotOwner {
                service: service.to_string(),
                instance_id: instance_id.to_string(),
            });
        }
        Ok((key, Stored::clone(stored)))
    }

    /// The stored instance `key` (which must exist), as clients see it.
    fn instance(&self, key: &InstanceKey) -> pb::Instance {
        self.services
            .get(&key.0)
            .and_then(|s| s.get(&key.1))
            .map(|s| s.to_pb(&key.0, &key.1))
            .unwrap_or_default()
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn insert(&mut self, key: InstanceKey, mut stored: Stored) -> Event {
        let revision = self.next_revision();
        stored.revision = revision;
        let event = event(Kind::Added, revision, stored.to_pb(&key.0, &key.1), None);
        if let Some(lease) = self.leases.get_mut(stored.lease_id) {
            lease.instances.push(key.clone());
        }
        Arc::make_mut(self.services.entry(key.0).or_default()).insert(key.1, Box::new(stored));
        self.instance_count += 1;
        event
    }

    /// Replaces `old` by `new` under `key`; no event if nothing changed.
    fn replace(&mut self, key: &InstanceKey, old: Stored, mut new: Stored) -> Option<Event> {
        new.revision = old.revision;
        // Descriptors compare by pointer first (interned: equal bytes are
        // one `Arc`).
        if new == old {
            self.release(new.descriptors);
            return None;
        }
        let revision = self.next_revision();
        new.revision = revision;
        let event = event(Kind::Updated, revision, new.to_pb(&key.0, &key.1), None);
        if let Some(slot) = self
            .services
            .get_mut(&key.0)
            .and_then(|s| Arc::make_mut(s).get_mut(&key.1))
        {
            **slot = new;
        }
        self.release(old.descriptors);
        Some(event)
    }

    /// Removes `key` from the services (not from its lease's set: callers
    /// do that, or are dropping the whole lease).
    fn remove_instance(&mut self, key: &InstanceKey, reason: RemovalReason) -> Option<Event> {
        let instances = Arc::make_mut(self.services.get_mut(&key.0)?);
        let stored = instances.remove(&key.1)?;
        if instances.is_empty() {
            self.services.remove(&key.0);
        }
        self.instance_count -= 1;
        let revision = self.next_revision();
        let instance = stored.to_pb(&key.0, &key.1);
        self.release(stored.descriptors);
        Some(event(Kind::Removed, revision, instance, Some(reason)))
    }

    /// The shared copy of `bytes`, counted as one more user.
    fn intern(&mut self, bytes: Vec<u8>) -> SharedDescriptors {
        if let Some((users, shared)) = self.descriptors.get_mut(bytes.as_slice()) {
            *users += 1;
            return shared.clone();
        }
        self.intern_new(bytes.into())
    }

    /// Interns `bytes`, not interned yet, with one user.
    fn intern_new(&mut self, bytes: Arc<[u8]>) -> SharedDescriptors {
        let shared = Arc::new(bytes.clone());
        self.descriptor_bytes += bytes.len();
        self.descriptors.insert(bytes, (1, shared.clone()));
        shared
    }

    /// Counts one more user of an interned descriptor set.
    fn retain(&mut self, descriptors: &Option<SharedDescriptors>) {
        if let Some((users, _)) = descriptors
            .as_ref()
            .and_then(|shared| self.descriptors.get_mut(&***shared))
        {
            *users += 1;
        }
    }

    /// Drops one user of a descriptor set; forgets it when no instance uses
    /// it any more.
    fn release(&mut self, descriptors: Option<SharedDescriptors>) {
        let Some(shared) = descriptors else { return };
        if let Some((users, _)) = self.descriptors.get_mut(&**shared) {
            *users = users.saturating_sub(1);
            if *users == 0 {
                self.descriptors.remove(&**shared);
                self.descriptor_bytes -= shared.len();
            }
        }
    }

    // The etcd store's mirror (`crate::store::etcd_store`): changes etcd
    // already accepted, applied at the revision etcd gave them. No checks
    // (the mirror must never refuse what etcd holds) and no lease index
    // (the etcd store keeps its own).

    /// Sets an instance as etcd holds it, at `revision` (above the current
    /// one): added, or replaced in place. No event if nothing changed.
    pub fn apply_put(
        &mut self,
        mut instance: pb::Instance,
        descriptors: Option<Arc<[u8]>>,
        revision: u64,
    ) -> Option<Event> {
        let before = self.revision;
        if revision <= before {
            return None;
        }
        let descriptors = descriptors.map(|bytes| self.intern_shared(bytes));
        let key = self.key_for(&instance.service, &instance.instance_id);
        let proto_service = (!instance.proto_service.is_empty())
            .then(|| Arc::new(std::mem::take(&mut instance.proto_service)));
        let stored = Stored::new(instance, descriptors, proto_service);
        self.revision = revision - 1;
        let event = match self.services.get(&key.0).and_then(|s| s.get(&key.1)) {
            Some(old) => self.replace(&key, Stored::clone(old), stored),
            None => Some(self.insert(key, stored)),
        };
        if event.is_none() {
            self.revision = before;
        }
        event
    }

    /// Removes an instance etcd deleted, at `revision` (above the current
    /// one), with `reason`. No event if it was not there.
    pub fn apply_delete(
        &mut self,
        service: &str,
        instance_id: &str,
        reason: RemovalReason,
        revision: u64,
    ) -> Option<Event> {
        let before = self.revision;
        if revision <= before {
            return None;
        }
        let key = self.key_for(service, instance_id);
        self.revision = revision - 1;
        let event = self.remove_instance(&key, reason);
        if event.is_none() {
            self.revision = before;
        }
        event
    }

    /// Moves the revision forward to `revision` (where a load from etcd
    /// stood), never back.
    pub fn advance_to(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// The instance `instance_id` of `service`, if registered.
    pub fn get(&self, service: &str, instance_id: &str) -> Option<pb::Instance> {
        self.services
            .get(service)
            .and_then(|s| s.get(instance_id))
            .map(|s| s.to_pb(service, instance_id))
    }

    /// How many instances `service` has.
    pub fn service_len(&self, service: &str) -> usize {
        self.services.get(service).map_or(0, |s| s.len())
    }

    /// The shared copy of `bytes` (already shared elsewhere), counted as
    /// one more user.
    fn intern_shared(&mut self, bytes: Arc<[u8]>) -> SharedDescriptors {
        if let Some((users, shared)) = self.descriptors.get_mut(&*bytes) {
            *users += 1;
            return shared.clone();
        }
        self.intern_new(bytes)
    }

    /// Services with at least one instance, sorted by name. A service's
    /// proto_service is that of its first instance (by id) that names one.
    pub fn list_services(&self) -> Vec<pb::ServiceSummary> {
        self.services
            .iter()
            .map(|(name, instances)| pb::ServiceSummary {
                name: name.to_string(),
                proto_service: instances
                    .values()
                    .find_map(|s| s.proto_service.as_deref().cloned())
                    .unwrap_or_default(),
                instance_count: u32::try_from(instances.len()).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// The instances of `service`, sorted by instance id (empty if none).
    pub fn resolve(&self, service: &str) -> Vec<pb::Instance> {
        self.services
            .get(service)
            .map(|instances| {
                instances
                    .iter()
                    .map(|(id, s)| s.to_pb(service, id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The descriptors of `service`: those of its first instance (by id)
    /// that registered some, with that instance's proto_service.
    pub fn descriptors(&self, service: &str) -> Result<(String, Arc<[u8]>)> {
        let instances = self
            .services
            .get(service)
            .ok_or_else(|| Error::ServiceNotFound(service.to_string()))?;
        instances
            .values()
            .find_map(|s| {
                s.descriptors
                    .as_ref()
                    .map(|d| (s.proto_service().to_string(), Arc::clone(&**d)))
            })
            .ok_or_else(|| Error::NoDescriptors(service.to_string()))
    }

    /// The instances of `service` as they are now (`None` if it has none),
    /// taken with one reference count: read them after the store's lock is
    /// released. Hold it briefly: the service's next change copies its map
    /// while it lives (copy on write, as for [`State::snapshot_copy`]).
    pub fn instances_of(&self, service: &str) -> Option<ServiceInstances> {
        self.services.get(service).cloned().map(ServiceInstances)
    }

    /// The current state as ADDED events (each with the revision its
    /// instance was last changed at), limited to `services` unless empty.
    pub fn snapshot(&self, services: &BTreeSet<String>) -> Vec<Event> {
        self.snapshot_copy(services).into_events()
    }

    /// What [`snapshot`](Self::snapshot) returns, as a copy that is cheap
    /// to take: a reference to each service's map (one reference count per
    /// service, whatever its size), turned into events later. The store
    /// takes it under its lock, so a new watcher holds writers and
    /// heartbeats back for as long as counting its services takes, not for
    /// copying or encoding instances. The price is paid later, by the first
    /// change to each of those services while the copy lives: that one
    /// service's map is copied then (see [`SharedInstances`]).
    pub fn snapshot_copy(&self, services: &BTreeSet<String>) -> SnapshotCopy {
        let selected: Vec<(Arc<str>, SharedInstances)> = if services.is_empty() {
            self.services
                .iter()
                .map(|(name, instances)| (name.clone(), instances.clone()))
                .collect()
        } else {
            services
                .iter()
                .filter_map(|name| self.services.get_key_value(name.as_str()))
                .map(|(name, instances)| (name.clone(), instances.clone()))
                .collect()
        };
        let len = selected.iter().map(|(_, i)| i.len()).sum();
        SnapshotCopy {
            services: selected,
            len,
        }
    }
}

/// One service's instances, taken by [`State::instances_of`].
#[derive(Debug, Clone)]
pub struct ServiceInstances(SharedInstances);

impl ServiceInstances {
    /// Each instance's id, host, port and weight, in id order: what
    /// endpoint lists (xDS, DNS) need, without building a `pb::Instance`.
    pub fn endpoints(&self) -> impl Iterator<Item = Endpoint<'_>> {
        self.0.iter().map(|(id, stored)| Endpoint {
            instance_id: id,
            host: &stored.host,
            port: stored.port,
            weight: stored.weight,
        })
    }
}

/// One instance as an endpoint list needs it (see
/// [`ServiceInstances::endpoints`]).
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    /// Its id.
    pub instance_id: &'a str,
    /// Its host, written as registered (`Display`).
    pub host: &'a dyn std::fmt::Display,
    /// Port to dial.
    pub port: u32,
    /// Weight for balancing.
    pub weight: u32,
}

impl std::fmt::Debug for Endpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("instance_id", &self.instance_id)
            .field("host", &format_args!("{}", self.host))
            .field("port", &self.port)
            .field("weight", &self.weight)
            .finish()
    }
}

/// A copy of some services' instances, taken by [`State::snapshot_copy`].
#[derive(Debug)]
pub struct SnapshotCopy {
    /// The services, in name order, as they were.
    services: Vec<(Arc<str>, SharedInstances)>,
    /// How many instances they hold.
    len: usize,
}

/// A place in a [`SnapshotCopy`]: the service, and the first instance id to
/// include (`None`: its first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    service: usize,
    from: Option<Arc<str>>,
}

impl SnapshotCopy {
    /// How many instances it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no instance.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most this copy can come to cost, in bytes: nothing while the
    /// state is unchanged, each service's map once that service changes
    /// (a B-tree slot and a boxed record per instance; the names and labels
    /// stay shared).
    pub fn footprint(&self) -> usize {
        self.services.len() * 64 + self.len * (std::mem::size_of::<Stored>() + 40)
    }

    /// Appends the ADDED events of the instances from `from` on to `out`,
    /// each as field `tag` of the enclosing message
    /// (`WatchResponse.events`), until at least `max_bytes` were appended
    /// (always at least one event when any is left). Encoded straight from
    /// the stored form: no `pb::Instance` is built, so no string is
    /// allocated per instance. Returns where the next part starts, or
    /// `None` when the copy is all sent.
    pub fn encode_events(
        &self,
        from: &Position,
        max_bytes: usize,
        tag: u32,
        out: &mut bytes::BytesMut,
    ) -> Option<Position> {
        use std::ops::Bound;
        let start = out.len();
        let mut scratch = Vec::new();
        let mut first = true;
        for (index, (name, instances)) in self.services.iter().enumerate().skip(from.service) {
            let lower = match (&from.from, index == from.service) {
                (Some(id), true) => Bound::Included(&**id),
                _ => Bound::Unbounded,
            };
            let range = instances.range::<str, _>((lower, Bound::Unbounded));
            for (id, stored) in range {
                if !first && out.len() - start >= max_bytes {
                    return Some(Position {
                        service: index,
                        from: Some(id.clone()),
                    });
                }
                first = false;
                scratch.clear();
                stored.encode_instance(name, id, &mut scratch);
                encode_added(tag, stored.revision, &scratch, out);
            }
        }
        None
    }
}

/// Writes, as field `tag`, an ADDED `Event` at `revision` around an already
/// encoded `Instance`.
fn encode_added(tag: u32, revision: u64, instance: &[u8], out: &mut impl bytes::BufMut) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let kind = Kind::Added as u64;
    // kind (1), revision (2), instance (3); reason (4) is 0 and omitted.
    let event_len = 1
        + encoded_len_varint(kind)
        + if revision == 0 {
            0
        } else {
            1 + encoded_len_varint(revision)
        }
        + 1
        + encoded_len_varint(instance.len() as u64)
        + instance.len();
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(event_len as u64, out);
    encode_key(1, WireType::Varint, out);
    encode_varint(kind, out);
    if revision != 0 {
        encode_key(2, WireType::Varint, out);
        encode_varint(revision, out);
    }
    encode_key(3, WireType::LengthDelimited, out);
    encode_varint(instance.len() as u64, out);
    out.put_slice(instance);
}

/// Writes a string field (omitted when empty, as prost does).
fn encode_str(tag: u32, value: &str, out: &mut Vec<u8>) {
    encode_bytes(tag, value.as_bytes(), out);
}

/// Writes a string or bytes field (omitted when empty, as prost does).
fn encode_bytes(tag: u32, value: &[u8], out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value);
}

/// Writes `ip` in dotted decimal (what `Ipv4Addr`'s `Display` writes) into
/// `out`; returns its length.
fn write_ipv4(ip: Ipv4Addr, out: &mut [u8; 15]) -> usize {
    let mut len = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            out[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            out[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        out[len] = b'0' + octet % 10;
        len += 1;
    }
    len
}

/// Writes an integer field (omitted when 0, as prost does).
fn encode_u64(tag: u32, value: u64, out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    if value == 0 {
        return;
    }
    encode_key(tag, WireType::Varint, out);
    encode_varint(value, out);
}

/// Writes an `optional` integer field: always, 0 included (explicit
/// presence, as prost does for `Some(0)`).
fn encode_present_u64(tag: u32, value: u64, out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    encode_key(tag, WireType::Varint, out);
    encode_varint(value, out);
}

impl Stored {
    /// Appends the `pb::Instance` this is (field numbers of
    /// `registry.v1.Instance`) to `out`, without building it.
    fn encode_instance(&self, service: &str, instance_id: &str, out: &mut Vec<u8>) {
        use std::io::Write;
        encode_str(1, service, out);
        encode_str(2, instance_id, out);
        match &self.host {
            // The usual case, written digit by digit: through `fmt` it was
            // about a third of a snapshot's encoding time (perf, 100 000
            // instances).
            Host::V4(ip) => {
                let mut text = [0u8; 15];
                let len = write_ipv4(*ip, &mut text);
                encode_bytes(3, &text[..len], out);
            }
            Host::V6(_) | Host::Name(_) => {
                // Formatted on the stack (at most 253 bytes).
                let mut host = [0u8; 256];
                let mut cursor = std::io::Cursor::new(&mut host[..]);
                let host = match write!(cursor, "{}", self.host) {
                    Ok(()) => {
                        let len = usize::try_from(cursor.position()).unwrap_or(0);
                        std::str::from_utf8(&host[..len]).unwrap_or_default()
                    }
                    Err(_) => "",
                };
                encode_str(3, host, out);
            }
        }
        encode_u64(4, u64::from(self.port), out);
        // `optional`: written even when 0, so the field is present.
        encode_present_u64(5, u64::from(self.weight), out);
        if let Some(labels) = &self.metadata {
            prost::encoding::hash_map::encode(
                prost::encoding::string::encode,
                prost::encoding::string::encoded_len,
                prost::encoding::string::encode,
                prost::encoding::string::encoded_len,
                6,
                labels,
                out,
            );
        }
        encode_str(7, self.proto_service(), out);
        encode_u64(8, self.lease_id, out);
        encode_u64(9, self.revision, out);
    }
}

impl SnapshotCopy {
    /// One ADDED event per instance, in the order of [`State::snapshot`].
    pub fn into_events(self) -> Vec<Event> {
        self.services
            .iter()
            .flat_map(|(name, instances)| {
                instances
                    .iter()
                    .map(|(id, s)| event(Kind::Added, s.revision, s.to_pb(name, id), None))
            })
            .collect()
    }
}

fn event(
    kind: Kind,
    revision: u64,
    instance: pb::Instance,
    reason: Option<RemovalReason>,
) -> Event {
    Event {
        kind: kind as i32,
        revision,
        instance: Some(instance),
        reason: reason.unwrap_or(RemovalReason::Unspecified) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_hosts_are_written_as_core_writes_them() {
        let mut ips: Vec<Ipv4Addr> = [0u32, 1, 9, 10, 99, 100, 255]
            .iter()
            .flat_map(|&o| [o, o << 8, o << 16, o << 24, o * 0x0101_0101, !o])
            .map(Ipv4Addr::from)
            .collect();
        // And a spread of addresses over the whole space.
        ips.extend((0..10_000u32).map(|k| Ipv4Addr::from(k.wrapping_mul(2_654_435_761))));
        for ip in ips {
            assert_eq!(Host::V4(ip).to_string(), ip.to_string());
        }
        // Width and alignment still apply, as for Ipv4Addr.
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(format!("{:>12}|", Host::V4(ip)), format!("{ip:>12}|"));
    }

    #[test]
    fn the_mirror_applies_changes_at_the_revisions_etcd_gave_them() {
        let mut s = State::new(Ttl::default());
        let mut i = instance("svc", "a", 1);
        i.lease_id = 7;
        let added = s.apply_put(i.clone(), None, 100).unwrap();
        assert_eq!((added.kind(), added.revision), (Kind::Added, 100));
        assert_eq!(s.revision(), 100);
        assert!(s.apply_put(i.clone(), None, 101).is_none(), "unchanged");
        assert_eq!(s.revision(), 100, "no change, no revision");
        assert!(s.apply_put(i.clone(), None, 99).is_none(), "never back");
        i.weight = Some(3);
        let updated = s.apply_put(i, None, 200).unwrap();
        assert_eq!((updated.kind(), updated.revision), (Kind::Updated, 200));
        assert_eq!(s.get("svc", "a").unwrap().revision, 200);
        let removed = s
            .apply_delete("svc", "a", RemovalReason::KeepaliveClosed, 300)
            .unwrap();
        assert_eq!(removed.reason(), RemovalReason::KeepaliveClosed);
        assert!(s.get("svc", "a").is_none());
        assert!(
            s.apply_delete("svc", "a", RemovalReason::Deregistered, 301)
                .is_none()
        );
        s.advance_to(400);
        assert_eq!(s.revision(), 400);
        assert_eq!(s.service_len("svc"), 0);
    }
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn instance(service: &str, id: &str, weight: u32) -> pb::Instance {
        pb::Instance {
            service: service.into(),
            instance_id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            weight: Some(weight),
            ..Default::default()
        }
    }

    fn register(g: &Granted, i: pb::Instance, descriptors: Option<&[u8]>) -> validate::Register {
        validate::Register {
            lease_id: g.lease_id,
            lease_secret: g.lease_secret.clone(),
            instance: i,
            descriptors: descriptors.map(<[u8]>::to_vec),
        }
    }

    fn deregister(g: &Granted, service: &str, id: &str) -> validate::Deregister {
        validate::Deregister {
            lease_id: g.lease_id,
            lease_secret: g.lease_secret.clone(),
            service: service.into(),
            instance_id: id.into(),
        }
    }

    fn kinds(events: &[Event]) -> Vec<(Kind, u64)> {
        events.iter().map(|e| (e.kind(), e.revision)).collect()
    }

    #[test]
    fn instances_read_back_exactly_as_registered() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        // IPs are stored inline only when they print back the same; other
        // spellings and names are kept verbatim.
        let hosts = ["10.0.0.7", "::1", "::FFFF:1.2.3.4", "node-a.local"];
        for (n, host) in hosts.iter().enumerate() {
            let mut i = instance("svc", &n.to_string(), 1);
            i.host = (*host).into();
            if n == 0 {
                i.metadata.insert("zone".into(), "b".into());
                i.proto_service = "echo.v1.Echo".into();
            }
            s.register(register(&g, i, None)).unwrap();
        }
        let got = s.resolve("svc");
        let hosts_back: Vec<&str> = got.iter().map(|i| i.host.as_str()).collect();
        assert_eq!(hosts_back, hosts);
        assert_eq!(got[0].metadata.get("zone").map(String::as_str), Some("b"));
        assert_eq!(got[0].proto_service, "echo.v1.Echo");
        assert!(got[1].metadata.is_empty());
        assert_eq!(
            (got[3].service.as_str(), got[3].lease_id),
            ("svc", g.lease_id)
        );
    }

    #[test]
    fn a_stored_instance_fits_the_64_byte_size_class() {
        // Every instance is one `Box<Stored>`: jemalloc (the registry's
        // allocator) has a 64-byte size class, then 80. 16 bytes on each of
        // 100 000 instances is what the per-instance memory target of issue
        // 7 (200 B over the payload) has no room for.
        assert!(
            std::mem::size_of::<Stored>() <= 64,
            "{}",
            std::mem::size_of::<Stored>()
        );
        assert_eq!(std::mem::size_of::<Host>(), 16);
    }

    #[test]
    fn an_ipv4_host_is_written_as_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.99.100.9",
        ] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            let mut text = [0u8; 15];
            let len = write_ipv4(ip, &mut text);
            assert_eq!(std::str::from_utf8(&text[..len]).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn a_proto_service_name_is_shared_within_its_service() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        for (id, proto) in [
            ("1", "echo.v1.Echo"),
            ("2", "echo.v1.Echo"),
            ("3", "other.v1.X"),
        ] {
            let mut i = instance("echo", id, 1);
            i.proto_service = proto.into();
            s.register(register(&g, i, None)).unwrap();
        }
        let echo = &s.services["echo"];
        let arc = |id: &str| echo[id].proto_service.clone().unwrap();
        assert!(Arc::ptr_eq(&arc("1"), &arc("2")));
        assert!(!Arc::ptr_eq(&arc("1"), &arc("3")));
        let back: Vec<String> = s
            .resolve("echo")
            .into_iter()
            .map(|i| i.proto_service)
            .collect();
        assert_eq!(back, ["echo.v1.Echo", "echo.v1.Echo", "other.v1.X"]);
    }

    #[test]
    fn a_snapshot_copy_is_the_state_when_it_was_taken() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        for (svc, id) in [("a", "1"), ("b", "1"), ("b", "2")] {
            let mut i = instance(svc, id, 1);
            i.metadata.insert("zone".into(), format!("z{id}"));
            i.proto_service = "echo.v1.Echo".into();
            s.register(register(&g, i, None)).unwrap();
        }
        let only_b: BTreeSet<String> = ["b".to_string()].into();
        let copy = s.snapshot_copy(&only_b);
        let before = s.resolve("b");
        // The state moves on before the copy becomes events (as it may once
        // the store's lock is released): the events still show the state
        // the copy was taken from.
        s.update(validate::Update {
            owned: deregister(&g, "b", "1"),
            weight: Some(7),
            metadata: Some([("zone".to_string(), "moved".to_string())].into()),
        })
        .unwrap();
        s.deregister(deregister(&g, "b", "2")).unwrap();
        let events = copy.into_events();
        assert!(events.iter().all(|e| e.kind == Kind::Added as i32));
        let instances: Vec<pb::Instance> = events.into_iter().filter_map(|e| e.instance).collect();
        assert_eq!(instances, before);
        assert_eq!(instances[0].metadata["zone"], "z1");
        assert_eq!(s.resolve("b")[0].metadata["zone"], "moved");
        // And the revisions are those of the instances' last change then.
        assert_eq!(
            instances.iter().map(|i| i.revision).collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[test]
    fn snapshot_events_encode_exactly_as_prost_encodes_them() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        let hosts = ["10.0.0.7", "::1", "node-a.local", &"h".repeat(253)];
        for (n, host) in hosts.iter().enumerate() {
            let mut i = instance("svc", &n.to_string(), 1 + n as u32);
            i.host = (*host).into();
            if n % 2 == 0 {
                i.metadata.insert("zone".into(), "b".into());
                i.metadata.insert("k".into(), "v".repeat(1000));
                i.proto_service = "echo.v1.Echo".into();
            }
            s.register(register(&g, i, None)).unwrap();
        }
        let copy = s.snapshot_copy(&BTreeSet::new());
        let mut out = bytes::BytesMut::new();
        // A budget of one byte still makes progress: one event at a time.
        let mut at = Position::default();
        let mut parts = 0;
        loop {
            parts += 1;
            match copy.encode_events(&at, 1, 3, &mut out) {
                Some(next) => at = next,
                None => break,
            }
        }
        assert_eq!(parts, hosts.len(), "one event per part");
        let decoded = <pb::WatchResponse as prost::Message>::decode(out.freeze()).unwrap();
        assert_eq!(decoded.events, s.snapshot(&BTreeSet::new()));
        assert_eq!(decoded.events.len(), hosts.len());
    }

    #[test]
    fn a_snapshot_copy_shares_the_maps_and_a_change_copies_only_its_service() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        for (svc, id) in [("a", "1"), ("a", "2"), ("b", "1")] {
            s.register(register(&g, instance(svc, id, 1), None))
                .unwrap();
        }
        let copy = s.snapshot_copy(&BTreeSet::new());
        let shared = |s: &State, name: &str| {
            copy.services
                .iter()
                .any(|(n, m)| &**n == name && Arc::ptr_eq(m, &s.services[name]))
        };
        assert!(
            shared(&s, "a") && shared(&s, "b"),
            "taking it copied nothing"
        );
        s.register(register(&g, instance("a", "3", 1), None))
            .unwrap();
        assert!(!shared(&s, "a"), "a change to a copies that service");
        assert!(shared(&s, "b"), "and no other");
        assert_eq!(copy.len(), 3);
        assert_eq!(s.resolve("a").len(), 3);
    }

    #[test]
    fn register_update_and_no_op() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        assert_eq!(g.ttl, Duration::from_millis(1500));
        let (i, ev) = s
            .register(register(&g, instance("a", "1", 1), None))
            .unwrap();
        assert_eq!((i.lease_id, i.revision), (g.lease_id, 1));
        assert_eq!(kinds(&ev), [(Kind::Added, 1)]);
        // The same again changes nothing: no event, same revision.
        let (i, ev) = s
            .register(register(&g, instance("a", "1", 1), None))
            .unwrap();
        assert!(ev.is_empty());
        assert_eq!(i.revision, 1);
        let (i, ev) = s
            .register(register(&g, instance("a", "1", 2), None))
            .unwrap();
        assert_eq!(kinds(&ev), [(Kind::Updated, 2)]);
        assert_eq!((i.weight, i.revision), (Some(2), 2));
        assert_eq!(s.revision(), 2);
    }

    #[test]
    fn ownership_is_enforced() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let a = s.grant_lease(0, now).unwrap();
        let b = s.grant_lease(0, now).unwrap();
        s.register(register(&a, instance("svc", "x", 1), None))
            .unwrap();
        let shadow = s.register(register(&b, instance("svc", "x", 5), None));
        assert!(matches!(shadow, Err(Error::NotOwner { .. })));
        assert!(matches!(
            s.deregister(deregister(&b, "svc", "x")),
            Err(Error::NotOwner { .. })
        ));
        let mut wrong = deregister(&a, "svc", "x");
        wrong.lease_secret = b.lease_secret.clone();
        assert!(matches!(s.deregister(wrong), Err(Error::WrongSecret(_))));
        let mut unknown = deregister(&a, "svc", "x");
        unknown.lease_id = 12345;
        assert!(matches!(
            s.deregister(unknown),
            Err(Error::LeaseNotFound(12345))
        ));
        assert_eq!(s.resolve("svc")[0].weight, Some(1), "nothing changed");
        assert_eq!(s.revision(), 1);
    }

    #[test]
    fn expiry_and_revocation_remove_the_leases_instances() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let short = s.grant_lease(200, now).unwrap();
        let long = s.grant_lease(5000, now).unwrap();
        s.register(register(&short, instance("svc", "1", 1), None))
            .unwrap();
        s.register(register(&short, instance("svc", "2", 1), None))
            .unwrap();
        s.register(register(&long, instance("svc", "3", 1), None))
            .unwrap();
        assert!(s.expire(now + Duration::from_millis(199)).is_empty());
        let ev = s.expire(now + Duration::from_millis(200));
        assert_eq!(kinds(&ev), [(Kind::Removed, 4), (Kind::Removed, 5)]);
        assert!(ev.iter().all(|e| e.reason() == RemovalReason::LeaseExpired));
        assert_eq!(s.lease_count(), 1);
        let (removed, ev) = s.revoke_lease(long.lease_id, &long.lease_secret).unwrap();
        assert_eq!(removed, 1);
        assert_eq!(ev[0].reason(), RemovalReason::LeaseRevoked);
        assert!(s.list_services().is_empty());
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_closed_stream_revokes_only_the_lease_attached_to_it() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        s.register(register(&g, instance("svc", "1", 1), None))
            .unwrap();
        s.keep_alive(g.lease_id, &g.lease_secret, Some(1), now)
            .unwrap();
        // Stream 2 takes the lease over; stream 1 ending changes nothing.
        s.keep_alive(g.lease_id, &g.lease_secret, Some(2), now)
            .unwrap();
        assert!(s.stream_closed(g.lease_id, 1).is_none());
        let ev = s.stream_closed(g.lease_id, 2).unwrap();
        assert_eq!(ev[0].reason(), RemovalReason::KeepaliveClosed);
        assert_eq!(s.lease_count(), 0);
    }

    #[test]
    fn descriptors_are_stored_once_and_dropped_with_their_last_user() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        let bytes = registry_proto::CALCULATOR_DESCRIPTORS;
        for id in 0..100 {
            let mut i = instance("calc", &id.to_string(), 1);
            i.proto_service = "calculator.v1.Calculator".into();
            s.register(register(&g, i, Some(bytes))).unwrap();
        }
        assert_eq!(s.descriptor_count(), 1);
        let (proto, d) = s.descriptors("calc").unwrap();
        assert_eq!(proto, "calculator.v1.Calculator");
        assert_eq!(&*d, bytes);
        drop(d);
        // Other content: a second copy; replacing it releases it.
        s.register(register(&g, instance("calc", "0", 1), Some(b"other")))
            .unwrap();
        assert_eq!(s.descriptor_count(), 2);
        s.register(register(&g, instance("calc", "0", 1), None))
            .unwrap();
        assert_eq!(s.descriptor_count(), 1);
        s.revoke_lease(g.lease_id, &g.lease_secret).unwrap();
        assert_eq!(s.descriptor_count(), 0);
        assert!(matches!(
            s.descriptors("calc"),
            Err(Error::ServiceNotFound(_))
        ));
    }

    #[test]
    fn a_descriptor_answer_in_flight_does_not_keep_the_set() {
        // Found by the registry_requests fuzz target: a GetDescriptors
        // answer still holding the bytes when the last instance went made
        // the set (and its bytes in the budget) stay forever.
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        let calc = Some(registry_proto::CALCULATOR_DESCRIPTORS);
        s.register(register(&g, instance("calc", "1", 1), calc))
            .unwrap();
        s.register(register(&g, instance("calc", "2", 1), calc))
            .unwrap();
        let (_, in_flight) = s.descriptors("calc").unwrap();
        s.update(validate::Update {
            owned: deregister(&g, "calc", "1"),
            weight: Some(1),
            metadata: None,
        })
        .unwrap();
        s.deregister(deregister(&g, "calc", "1")).unwrap();
        assert_eq!(s.descriptor_count(), 1, "instance 2 still uses it");
        s.deregister(deregister(&g, "calc", "2")).unwrap();
        assert_eq!(s.descriptor_count(), 0);
        assert_eq!(s.descriptor_bytes, 0);
        drop(in_flight);
    }

    #[test]
    fn limits_refuse_with_resource_exhausted_and_change_nothing() {
        let now = Instant::now();
        let limits = Limits {
            leases: 2,
            instances: 3,
            descriptor_bytes: registry_proto::CALCULATOR_DESCRIPTORS.len() + 10,
        };
        let mut s = State::with_limits(Ttl::default(), limits);
        let g = s.grant_lease(0, now).unwrap();
        s.grant_lease(0, now).unwrap();
        let err = s.grant_lease(0, now).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.lease_count(), 2);

        let calc = Some(registry_proto::CALCULATOR_DESCRIPTORS);
        for id in ["1", "2", "3"] {
            s.register(register(&g, instance("svc", id, 1), calc))
                .unwrap();
        }
        let err = s
            .register(register(&g, instance("svc", "4", 1), None))
            .unwrap_err();
        assert!(matches!(err, Error::Limit { .. }), "{err}");
        // Updating an existing instance is still fine at the limit...
        s.register(register(&g, instance("svc", "3", 2), calc))
            .unwrap();
        // ...but not with a second, distinct descriptor set over the budget.
        let err = s
            .register(register(
                &g,
                instance("svc", "3", 2),
                Some(registry_proto::ECHO_DESCRIPTORS),
            ))
            .unwrap_err();
        assert!(matches!(err, Error::Limit { .. }), "{err}");
        assert_eq!(s.instance_count(), 3);
        assert_eq!(s.descriptor_count(), 1);
        s.deregister(deregister(&g, "svc", "1")).unwrap();
        s.register(register(&g, instance("svc", "4", 1), None))
            .unwrap();
        assert_eq!(s.instance_count(), 3);
    }

    #[test]
    fn snapshot_filters_by_service() {
        let now = Instant::now();
        let mut s = State::new(Ttl::default());
        let g = s.grant_lease(0, now).unwrap();
        for svc in ["a", "b", "c"] {
            s.register(register(&g, instance(svc, "1", 1), None))
                .unwrap();
        }
        let only: BTreeSet<String> = ["b".to_string(), "zz".to_string()].into();
        let snap = s.snapshot(&only);
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].instance.as_ref().unwrap().service, "b");
        assert_eq!(s.snapshot(&BTreeSet::new()).len(), 3);
    }

    // ---- Model test: random operations against a trivially correct model.

    #[derive(Debug, Clone)]
    enum Op {
        Grant {
            ttl_ms: u64,
        },
        Register {
            lease: usize,
            service: u8,
            id: u8,
            weight: u32,
            wrong_secret: bool,
        },
        Update {
            lease: usize,
            service: u8,
            id: u8,
            weight: u32,
        },
        Deregister {
            lease: usize,
            service: u8,
            id: u8,
        },
        Revoke {
            lease: usize,
        },
        KeepAlive {
            lease: usize,
        },
        Advance {
            ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let lease = 0usize..6;
        prop_oneof![
            (100u64..1000).prop_map(|ttl_ms| Op::Grant { ttl_ms }),
            (
                lease.clone(),
                0u8..3,
                0u8..4,
                1u32..4,
                proptest::bool::weighted(0.1)
            )
                .prop_map(|(lease, service, id, weight, wrong_secret)| Op::Register {
                    lease,
                    service,
                    id,
                    weight,
                    wrong_secret
                }),
            (lease.clone(), 0u8..3, 0u8..4, 1u32..4).prop_map(|(lease, service, id, weight)| {
                Op::Update {
                    lease,
                    service,
                    id,
                    weight,
                }
            }),
            (lease.clone(), 0u8..3, 0u8..4).prop_map(|(lease, service, id)| Op::Deregister {
                lease,
                service,
                id
            }),
            lease.clone().prop_map(|lease| Op::Revoke { lease }),
            lease.prop_map(|lease| Op::KeepAlive { lease }),
            (0u64..700).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    /// The model: which lease (by grant order) owns which instance, with
    /// what weight; and when each lease dies.
    #[derive(Default)]
    struct Model {
        instances: BTreeMap<(String, String), (usize, u32)>,
        deadlines: BTreeMap<usize, u64>,
        ttls: Vec<u64>,
    }

    impl Model {
        fn expire(&mut self, now_ms: u64) {
            let dead: Vec<usize> = self
                .deadlines
                .iter()
                .filter(|&(_, &d)| d <= now_ms)
                .map(|(&l, _)| l)
                .collect();
            for l in dead {
                self.drop_lease(l);
            }
        }
        fn drop_lease(&mut self, lease: usize) {
            self.deadlines.remove(&lease);
            self.instances.retain(|_, (owner, _)| *owner != lease);
        }
        fn alive(&self, lease: usize) -> bool {
            self.deadlines.contains_key(&lease)
        }
        /// The error the registry must give for a change of `key` by `lease`.
        fn refusal(
            &self,
            lease: usize,
            key: &(String, String),
            must_exist: bool,
        ) -> Option<&'static str> {
            if !self.alive(lease) {
                return Some("lease");
            }
            match self.instances.get(key) {
                None if must_exist => Some("missing"),
                Some((owner, _)) if *owner != lease => Some("owner"),
                _ => None,
            }
        }
    }

    fn error_kind(e: &Error) -> &'static str {
        match e {
            Error::LeaseNotFound(_) => "lease",
            Error::WrongSecret(_) => "secret",
            Error::InstanceNotFound { .. } => "missing",
            Error::NotOwner { .. } => "owner",
            _ => "other",
        }
    }

    fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let start = Instant::now();
        let mut now_ms = 0u64;
        let mut state = State::new(Ttl::default());
        let mut model = Model::default();
        let mut granted: Vec<Granted> = Vec::new();
        let mut replica: BTreeMap<(String, String), pb::Instance> = BTreeMap::new();
        let mut last_revision = 0u64;

        for op in ops {
            let now = start + Duration::from_millis(now_ms);
            // As the store does before every call.
            let mut events = state.expire(now);
            model.expire(now_ms);
            let key = |service: u8, id: u8| (format!("svc{service}"), format!("i{id}"));
            let pick = |lease: usize| lease.checked_rem(granted.len().max(1)).unwrap_or(0);

            let outcome: Result<(), Error> = match op.clone() {
                Op::Grant { ttl_ms } => {
                    granted.push(state.grant_lease(ttl_ms, now).unwrap());
                    let l = granted.len() - 1;
                    model.ttls.push(ttl_ms);
                    model.deadlines.insert(l, now_ms + ttl_ms);
                    Ok(())
                }
                _ if granted.is_empty() => Ok(()),
                Op::Register {
                    lease,
                    service,
                    id,
                    weight,
                    wrong_secret,
                } => {
                    let l = pick(lease);
                    let g = &granted[l];
                    let k = key(service, id);
                    let mut request = register(g, instance(&k.0, &k.1, weight), None);
                    if wrong_secret {
                        request.lease_secret = "wrong".into();
                    }
                    let expected = if !model.alive(l) {
                        Some("lease")
                    } else if wrong_secret {
                        Some("secret")
                    } else {
                        model.refusal(l, &k, false)
                    };
                    let result = state.register(request);
                    prop_assert_eq!(result.as_ref().err().map(error_kind), expected);
                    if expected.is_none() {
                        model.instances.insert(k, (l, weight));
                    }
                    result.map(|(_, e)| events.extend(e))
                }
                Op::Update {
                    lease,
                    service,
                    id,
                    weight,
                } => {
                    let l = pick(lease);
                    let g = &granted[l];
                    let k = key(service, id);
                    let expected = model.refusal(l, &k, true);
                    let result = state.update(validate::Update {
                        owned: validate::Owned {
                            lease_id: g.lease_id,
                            lease_secret: g.lease_secret.clone(),
                            service: k.0.clone(),
                            instance_id: k.1.clone(),
                        },
                        weight: Some(weight),
                        metadata: None,
                    });
                    prop_assert_eq!(result.as_ref().err().map(error_kind), expected);
                    if expected.is_none() {
                        model.instances.insert(k, (l, weight));
                    }
                    result.map(|(_, e)| events.extend(e))
                }
                Op::Deregister { lease, service, id } => {
                    let l = pick(lease);
                    let k = key(service, id);
                    let expected = model.refusal(l, &k, true);
                    let result = state.deregister(deregister(&granted[l], &k.0, &k.1));
                    prop_assert_eq!(result.as_ref().err().map(error_kind), expected);
                    if expected.is_none() {
                        model.instances.remove(&k);
                    }
                    result.map(|e| events.extend(e))
                }
                Op::Revoke { lease } => {
                    let l = pick(lease);
                    let g = &granted[l];
                    let alive = model.alive(l);
                    let owned = model.instances.values().filter(|(o, _)| *o == l).count();
                    let result = state.revoke_lease(g.lease_id, &g.lease_secret);
                    prop_assert_eq!(result.is_ok(), alive);
                    if let Ok((removed, _)) = &result {
                        prop_assert_eq!(*removed as usize, owned);
                    }
                    model.drop_lease(l);
                    result.map(|(_, e)| events.extend(e))
                }
                Op::KeepAlive { lease } => {
                    let l = pick(lease);
                    let g = &granted[l];
                    let alive = model.alive(l);
                    let result = state.keep_alive(g.lease_id, &g.lease_secret, None, now);
                    prop_assert_eq!(result.is_ok(), alive);
                    if alive {
                        model.deadlines.insert(l, now_ms + model.ttls[l]);
                    }
                    result.map(|_| ())
                }
                Op::Advance { ms } => {
                    now_ms += ms;
                    Ok(())
                }
            };
            let _ = outcome;

            // Revisions strictly increase, and end at the state's.
            for e in &events {
                prop_assert!(e.revision > last_revision, "revision went back: {:?}", e);
                last_revision = e.revision;
                let i = e.instance.clone().unwrap_or_default();
                let k = (i.service.clone(), i.instance_id.clone());
                match e.kind() {
                    Kind::Added => prop_assert!(replica.insert(k, i).is_none(), "ADDED twice"),
                    Kind::Updated => {
                        prop_assert!(replica.insert(k, i).is_some(), "UPDATED unknown")
                    }
                    Kind::Removed => prop_assert!(replica.remove(&k).is_some(), "REMOVED unknown"),
                    Kind::Unspecified => prop_assert!(false, "unspecified event"),
                }
            }
            prop_assert_eq!(state.revision(), last_revision);

            // Replaying the events gives exactly the state...
            let snapshot: BTreeMap<_, _> = state
                .snapshot(&BTreeSet::new())
                .into_iter()
                .filter_map(|e| e.instance)
                .map(|i| ((i.service.clone(), i.instance_id.clone()), i))
                .collect();
            prop_assert_eq!(&snapshot, &replica);
            // ...and the state is the model's.
            let seen: BTreeMap<_, _> = snapshot
                .iter()
                .map(|(k, i)| (k.clone(), (i.lease_id, i.weight)))
                .collect();
            let expected: BTreeMap<_, _> = model
                .instances
                .iter()
                .map(|(k, (l, w))| (k.clone(), (granted[*l].lease_id, Some(*w))))
                .collect();
            prop_assert_eq!(seen, expected);
            prop_assert_eq!(state.lease_count(), model.deadlines.len());
            prop_assert_eq!(state.instance_count(), model.instances.len());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_operations_match_the_model(ops in proptest::collection::vec(op(), 1..80)) {
            run_model(ops)?;
        }
    }
}
