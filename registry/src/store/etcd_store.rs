//! The etcd store: the registry's [`Writes`] committed to etcd as
//! transactions, and the local [`Store`] (which serves reads and Watch) a
//! mirror of the prefix, fed by one etcd watch. Any number of replicas can
//! run over the same cluster and prefix; each serves any request.
//!
//! # Writes
//! A write is checked against the mirror first (ownership, quotas), so
//! the mirror never has to refuse what etcd accepted, then committed as a
//! transaction that compares the instance key's `mod_revision` with the
//! one the check saw and that the lease record still exists: a concurrent
//! write on another replica makes it fail, and it is checked again once
//! the mirror has caught up. It returns once the mirror has applied the
//! transaction's revision, so a read on the same replica sees it.
//!
//! # Revisions
//! One etcd revision can carry several instance changes (a lease's
//! instances all go in one transaction), but a Watch stream's revisions
//! strictly increase: a change's revision is `etcd_revision << 20 |
//! index` ([`revision`]), the index being its place in the transaction
//! (stored in the instance record for a put; counted for deletes, which
//! etcd delivers in the same order to every watcher). So every replica
//! gives every change the same revision, and a watcher resumes on any.
//!
//! # Leases
//! A registry lease is an etcd lease (the same id) of the registry TTL
//! rounded up to whole seconds plus [`FAILOVER_MARGIN`]; its record and
//! instances are attached to it. The replica holding it (the one that
//! granted it or last got a heartbeat for it, named in its record)
//! enforces the registry TTL itself, keeps the etcd lease alive, and ends
//! the lease at once when its KeepAlive stream breaks. A replica that gets
//! a heartbeat for a lease it does not hold checks the secret against the
//! record's hash and adopts it: nothing is removed, nothing re-registered.
//! If no replica adopts a lease, etcd expires it after its own TTL.
//!
//! Registrations and updates made while a transaction is in flight share
//! the next one (`batch_puts`).
//!
//! Instances removed together go in one transaction that also puts
//! `PREFIX/reason` (why), so watchers on every replica get the reason;
//! deletes without it are an etcd lease that expired.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_api::pb as etcd;
use etcd_api::pb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_api::pb::request_op::Request as Op;
use prost::Message;
use registry_proto::registry::v1 as pb;
use support::AbortOnDropHandle;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Limit, Result};
use crate::lease::Ttl;
use crate::limits::Quotas;
use crate::state::{Event, Granted, RemovalReason, State};
use crate::store::etcd::{EtcdUrl, InstanceRecord, Key, LeaseRecord, secret_matches};
use crate::store::etcd_client::{EtcdAccess, EtcdClient, EtcdError};
use crate::store::{Store, Writes};
use crate::validate::{self, Limits};
use crate::watch::{WatchLimits, Watchers};

/// How much longer than the registry TTL an etcd lease lives: the time a
/// node has to reconnect its KeepAlive to another replica after the one
/// holding its lease died (etcd's TTL has whole-second steps and a 2 s
/// floor anyway; the registry TTL is enforced by the holding replica).
pub const FAILOVER_MARGIN: Duration = Duration::from_secs(2);

/// Bits of a registry revision below the etcd revision.
pub const INDEX_BITS: u32 = 20;

/// How often the etcd leases this replica holds are kept alive.
const ETCD_KEEPALIVE_EVERY: Duration = Duration::from_millis(500);

/// Most instance deletes in one transaction (etcd's default
/// `--max-txn-ops` is 128).
const DELETES_PER_TXN: usize = 100;

/// How often a write is checked and tried again after its transaction
/// lost a race with another replica's.
const RETRIES: usize = 8;

/// How long an etcd call, or the mirror catching up with one, may take
/// before the write is UNAVAILABLE.
const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// How many etcd revisions of history before its start a replica
/// replays into its mirror (etcd keeps them until compaction), so a
/// watcher whose last revision is older than every replica's start (all
/// restarted) still resumes. What the mirror's log keeps of them is
/// bounded by `--watch-resume-bytes`, as for any change.
const HISTORY_REVISIONS: i64 = 10_000;

/// How long that replay may take before the replica gives up starting.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a Watch resuming from a revision this replica has not reached
/// yet waits for it before it gets a snapshot instead.
const REACH_WAIT: Duration = Duration::from_secs(1);

/// How long no etcd member may answer this replica's probes (every
/// [`PROBE_EVERY`]) before etcd counts as lost: then the replica
/// refuses writes and heartbeats and ends its Watch streams, so its nodes
/// and watchers move on within about 2 s.
pub const LOST_AFTER: Duration = Duration::from_millis(1000);
/// How long members that answer may go without answering a quorum read
/// before etcd counts as lost: longer than etcd's leader election after
/// its leader died (a follower notices after its randomized election
/// timeout, 1-2 s with etcd's defaults, then a vote), so killing the
/// leader moves no node; short enough that a cluster without its quorum
/// stops this replica serving a view nobody can change.
pub const ELECTION_GRACE: Duration = Duration::from_secs(5);
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How often the holding replica looks for leases past their registry TTL
/// when none is due sooner (so a gap means it was not scheduled).
const TICK: Duration = Duration::from_millis(250);

/// Keys per page when loading the prefix (descriptor chunks: fewer).
const PAGE: i64 = 2000;
const CHUNK_PAGE: i64 = 8;

/// The registry revision of the change at `index` in etcd revision
/// `etcd_revision`.
pub fn revision(etcd_revision: i64, index: u32) -> u64 {
    (u64::try_from(etcd_revision).unwrap_or(0) << INDEX_BITS) | u64::from(index)
}

/// The etcd store. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.inner.url.prefix)
            .field("replica", &self.inner.replica)
            .finish()
    }
}

/// Stops the etcd store's tasks (the mirror's watch, the lease keeper)
/// when dropped.
#[derive(Debug)]
pub struct EtcdGuard {
    _tasks: Vec<AbortOnDropHandle<()>>,
}

struct Inner {
    client: EtcdClient,
    url: EtcdUrl,
    /// The mirror: serves reads and Watch.
    mirror: Store,
    ttl: Ttl,
    quotas: Quotas,
    limits: Limits,
    /// This process's name in the lease records it holds.
    replica: String,
    /// What the mirror knows beyond the state: lease records, instance
    /// keys, descriptor chunks.
    view: Mutex<View>,
    /// The last etcd revision the mirror applied.
    applied: tokio::sync::watch::Sender<i64>,
    /// The leases this replica holds.
    held: Mutex<Holding>,
    /// Wakes the expiry task (an earlier deadline) and the etcd keeper (a
    /// lease adopted).
    wake_expiry: Notify,
    wake_keeper: Notify,
    /// Asks the mirror's watch for a progress report (see `caught_up`).
    want_progress: Notify,
    /// True while etcd does not answer this replica (see [`LOST_AFTER`]).
    lost: tokio::sync::watch::Sender<bool>,
    /// Puts on their way to [`batch_puts`].
    puts: mpsc::Sender<PendingPut>,
    /// Whether etcd's progress reports on the current watch can be
    /// believed: only once the watch brought back the replica's own write
    /// made after it was created. etcd 3.4 answers a progress request with
    /// its current revision even while the watch is still replaying older
    /// history: believed then, a write would be answered before the mirror
    /// has it (seen: a Register answered NOT_FOUND for its own instance).
    synced: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct View {
    leases: HashMap<u64, LeaseRecord>,
    instances: HashMap<Vec<u8>, Seen>,
    per_lease: HashMap<u64, BTreeSet<Vec<u8>>>,
    chunks: HashMap<String, BTreeMap<u16, Vec<u8>>>,
    sets: HashMap<String, Arc<[u8]>>,
}

/// An instance key as the mirror last saw it.
struct Seen {
    service: String,
    instance_id: String,
    lease_id: u64,
    mod_revision: i64,
    descriptors_sha256: String,
}

struct Holding {
    leases: HashMap<u64, Held>,
    /// When the expiry task last ran (a long gap: the process was stopped).
    ticked: Instant,
}

/// A lease this replica holds.
struct Held {
    ttl: Duration,
    deadline: Instant,
    attached: Option<u64>,
    secret_sha256: String,
    /// The etcd revision of the record naming this replica the holder
    /// (`i64::MAX` until it is written): only a later record naming
    /// another holder takes the lease away.
    since: i64,
}

impl Held {
    /// A lease this replica starts holding now, its record not yet written.
    fn new(ttl: Duration, attached: Option<u64>, secret_sha256: String) -> Held {
        Held {
            ttl,
            deadline: Instant::now() + ttl,
            attached,
            secret_sha256,
            since: i64::MAX,
        }
    }
}

impl View {
    /// Drops the instance at `key` (and its place in its lease's keys);
    /// what the view had of it.
    fn forget_instance(&mut self, key: &[u8]) -> Option<Seen> {
        let seen = self.instances.remove(key)?;
        if let Some(keys) = self.per_lease.get_mut(&seen.lease_id) {
            keys.remove(key);
            if keys.is_empty() {
                self.per_lease.remove(&seen.lease_id);
            }
        }
        Some(seen)
    }

    /// The descriptor set `hash`, if all its chunks arrived.
    fn set(&mut self, hash: &str) -> Option<Arc<[u8]>> {
        if let Some(set) = self.sets.get(hash) {
            return Some(set.clone());
        }
        let chunks = self.chunks.get(hash)?;
        let joined = crate::store::etcd::join_chunks(hash, chunks.values().map(Vec::as_slice))?;
        let set: Arc<[u8]> = joined.into();
        self.sets.insert(hash.to_string(), set.clone());
        Some(set)
    }
}

fn unavailable(what: &str, status: &tonic::Status) -> Error {
    Error::Unavailable(format!("etcd {what}: {}", status.message()))
}

fn put(key: Vec<u8>, value: Vec<u8>, lease: u64) -> etcd::RequestOp {
    etcd::RequestOp {
        request: Some(Op::RequestPut(etcd::PutRequest {
            key,
            value,
            lease: i64::try_from(lease).unwrap_or(0),
            prev_kv: false,
        })),
    }
}

fn delete(key: Vec<u8>) -> etcd::RequestOp {
    etcd::RequestOp {
        request: Some(Op::RequestDeleteRange(etcd::DeleteRangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// `key` exists.
fn exists(key: Vec<u8>) -> etcd::Compare {
    etcd::Compare {
        result: CompareResult::Greater as i32,
        target: CompareTarget::Version as i32,
        key,
        target_union: Some(TargetUnion::Version(0)),
        range_end: Vec::new(),
    }
}

/// `key` was last changed at `mod_revision` (0: does not exist).
fn unchanged(key: Vec<u8>, mod_revision: i64) -> etcd::Compare {
    etcd::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key,
        target_union: Some(TargetUnion::ModRevision(mod_revision)),
        range_end: Vec::new(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lease_i64(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(0)
}

impl EtcdStore {
    /// Connects to etcd at `url`, loads the prefix into a mirror and
    /// follows it. Returns the store (for writes), the mirror's watchers
    /// (for reads and Watch) and the guard of its tasks.
    pub async fn start(
        url: &EtcdUrl,
        access: &EtcdAccess,
        ttl: Ttl,
        quotas: Quotas,
        limits: WatchLimits,
    ) -> Result<(EtcdStore, Watchers, EtcdGuard), EtcdError> {
        Self::start_with_limits(url, access, ttl, quotas, limits, Limits::default()).await
    }

    /// [`EtcdStore::start`] with registry-wide limits other than the
    /// defaults.
    pub async fn start_with_limits(
        url: &EtcdUrl,
        access: &EtcdAccess,
        ttl: Ttl,
        quotas: Quotas,
        limits: WatchLimits,
        registry_limits: Limits,
    ) -> Result<(EtcdStore, Watchers, EtcdGuard), EtcdError> {
        let client = EtcdClient::connect(url, access).await?;
        let registry_id = crate::store::etcd_client::registry_id(client.cluster_id, &url.prefix);
        let watchers = Watchers::with_registry_id(ttl, quotas, limits, registry_id);
        let (applied, _) = tokio::sync::watch::channel(0);
        let (puts, waiting) = mpsc::channel(4 * BATCH_PUTS);
        let inner = Arc::new(Inner {
            client,
            url: url.clone(),
            mirror: watchers.store().clone(),
            ttl,
            quotas,
            limits: registry_limits,
            replica: format!("{:016x}", rand::random::<u64>()),
            view: Mutex::new(View::default()),
            applied,
            held: Mutex::new(Holding {
                leases: HashMap::new(),
                ticked: Instant::now(),
            }),
            wake_expiry: Notify::new(),
            wake_keeper: Notify::new(),
            want_progress: Notify::new(),
            lost: tokio::sync::watch::channel(false).0,
            puts,
            synced: std::sync::atomic::AtomicBool::new(false),
        });
        let unreachable = |status| EtcdError::Unreachable {
            endpoints: url.endpoints.join(","),
            status,
        };
        // The prefix as it was HISTORY_REVISIONS ago, then etcd's history
        // since replayed through the watch: the mirror's log then holds the
        // changes from before this replica started, and a watcher that
        // last saw one of them resumes here (every replica restarted).
        let now = inner.current_revision().await.map_err(unreachable)?;
        let from = (now - HISTORY_REVISIONS).max(1);
        let at = match inner.load(from).await {
            Ok(at) => at,
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                // Compacted: no history to replay, the prefix as it is now.
                tracing::info!(
                    revision = from,
                    "etcd compacted its history: a watcher resuming from before this replica's start gets a snapshot"
                );
                inner.load(0).await.map_err(unreachable)?
            }
            Err(status) => return Err(unreachable(status)),
        };
        let tasks = vec![
            AbortOnDropHandle::new(tokio::spawn(follow(inner.clone(), at + 1))),
            AbortOnDropHandle::new(tokio::spawn(expire(inner.clone()))),
            AbortOnDropHandle::new(tokio::spawn(keep_etcd_leases(inner.clone()))),
            AbortOnDropHandle::new(tokio::spawn(probe(inner.clone()))),
            AbortOnDropHandle::new(tokio::spawn(collect_descriptors(inner.clone()))),
            AbortOnDropHandle::new(tokio::spawn(batch_puts(inner.clone(), waiting))),
        ];
        // Served only once the replay reached the last change under the
        // prefix. Not by a progress report: etcd 3.4 sends one with its
        // current revision even while the watch is still replaying.
        let last = inner.last_change(now).await.map_err(unreachable)?;
        let mut applied = inner.applied.subscribe();
        let replayed = tokio::time::timeout(
            REPLAY_TIMEOUT,
            applied
                .wait_for(|a| *a >= last && inner.synced.load(std::sync::atomic::Ordering::SeqCst)),
        );
        if !matches!(replayed.await, Ok(Ok(_))) {
            return Err(unreachable(tonic::Status::deadline_exceeded(format!(
                "replaying etcd's history from revision {at} to {last} took over {REPLAY_TIMEOUT:?}"
            ))));
        }
        tracing::info!(
            store = %crate::store::etcd::StoreUrl::Etcd(url.clone()),
            revision = now,
            history_from = at,
            instances = inner.mirror.read(State::instance_count),
            "etcd store loaded"
        );
        Ok((EtcdStore { inner }, watchers, EtcdGuard { _tasks: tasks }))
    }
}

impl Inner {
    fn view(&self) -> MutexGuard<'_, View> {
        lock(&self.view)
    }

    fn held(&self) -> MutexGuard<'_, Holding> {
        lock(&self.held)
    }

    /// etcd's current revision.
    async fn current_revision(&self) -> Result<i64, tonic::Status> {
        let mut kv = self.client.kv.clone();
        let read = kv.range(etcd::RangeRequest {
            key: self.url.reason_key(),
            count_only: true,
            ..Default::default()
        });
        let response = tokio::time::timeout(ETCD_TIMEOUT, read)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("etcd did not answer a read"))??;
        Ok(response.into_inner().header.map_or(0, |h| h.revision))
    }

    /// The etcd revision of the last put under the prefix as of revision
    /// `at` (0: none): the prefix's keys only, page by page.
    async fn last_change(&self, at: i64) -> Result<i64, tonic::Status> {
        let prefix = self.url.all_keys();
        let end = etcd_api::prefix_end(&prefix);
        let mut from = prefix;
        let mut last = 0;
        loop {
            let mut kv = self.client.kv.clone();
            let read = kv.range(etcd::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: PAGE,
                revision: at,
                keys_only: true,
                ..Default::default()
            });
            let response = tokio::time::timeout(ETCD_TIMEOUT, read)
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("etcd did not answer a read"))??
                .into_inner();
            last = response
                .kvs
                .iter()
                .map(|kv| kv.mod_revision)
                .fold(last, i64::max);
            match response.kvs.last() {
                Some(kv) if response.more => {
                    from = kv.key.clone();
                    from.push(0);
                }
                _ => return Ok(last),
            }
        }
    }

    /// Every key of the prefix at etcd revision `at` (0: the current one),
    /// and that revision. OUT_OF_RANGE: `at` was compacted.
    async fn read_prefix(&self, at: i64) -> Result<(Vec<etcd::KeyValue>, i64), tonic::Status> {
        let mut kvs = Vec::new();
        let mut at = at;
        for (under, page) in [("desc/", CHUNK_PAGE), ("inst/", PAGE), ("lease/", PAGE)] {
            let prefix = format!("{}/{under}", self.url.prefix).into_bytes();
            let end = etcd_api::prefix_end(&prefix);
            let mut from = prefix;
            loop {
                let response = self
                    .client
                    .kv
                    .clone()
                    .range(etcd::RangeRequest {
                        key: from.clone(),
                        range_end: end.clone(),
                        limit: page,
                        revision: at,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if at == 0 {
                    at = response.header.map_or(0, |h| h.revision);
                }
                let more = response.more;
                if let Some(last) = response.kvs.last() {
                    from = last.key.clone();
                    from.push(0);
                }
                kvs.extend(response.kvs);
                if !more {
                    break;
                }
            }
        }
        Ok((kvs, at))
    }

    /// Reads every key of the prefix at etcd revision `at` (0: the current
    /// one) into the mirror; returns that revision. OUT_OF_RANGE: `at` was
    /// compacted.
    async fn load(&self, at: i64) -> Result<i64, tonic::Status> {
        let (kvs, at) = self.read_prefix(at).await?;
        // Instances in revision order, after the chunks and leases they use.
        let mut instances = Vec::new();
        let mut view = self.view();
        for kv in kvs {
            match self.url.parse(&kv.key) {
                Key::Chunk(hash, n) => {
                    view.chunks.entry(hash).or_default().insert(n, kv.value);
                }
                Key::Lease(id) => {
                    if let Ok(record) = LeaseRecord::decode(kv.value.as_slice()) {
                        view.leases.insert(id, record);
                    }
                }
                Key::Instance => {
                    if let Ok(record) = InstanceRecord::decode(kv.value.as_slice()) {
                        instances.push((revision(kv.mod_revision, record.index), kv, record));
                    }
                }
                Key::Reason | Key::Other => {}
            }
        }
        instances.sort_by_key(|(revision, _, _)| *revision);
        self.mirror.load(|state| {
            for (revision, kv, record) in instances {
                mirror_put(&mut view, state, kv, record, revision);
            }
            state.advance_to(crate::store::etcd_store::revision(
                at,
                (1 << INDEX_BITS) - 1,
            ));
        });
        drop(view);
        self.applied.send_replace(at);
        Ok(at)
    }

    /// Catches up with etcd after its history was compacted past what this
    /// replica applied (a long partition): reads the prefix as it is now
    /// and applies the difference with the mirror as changes (puts in
    /// revision order, then the removals at the end of the new revision,
    /// reason `LEASE_EXPIRED`: what a partition's removals were, and the
    /// history that would say otherwise is gone). Returns the revision.
    async fn recover(&self) -> Result<i64, tonic::Status> {
        let (kvs, at) = self.read_prefix(0).await?;
        let mut leases = HashMap::new();
        let mut chunks: HashMap<String, BTreeMap<u16, Vec<u8>>> = HashMap::new();
        let mut instances = HashMap::new();
        for kv in kvs {
            match self.url.parse(&kv.key) {
                Key::Chunk(hash, n) => {
                    chunks.entry(hash).or_default().insert(n, kv.value);
                }
                Key::Lease(id) => {
                    if let Ok(record) = LeaseRecord::decode(kv.value.as_slice()) {
                        leases.insert(id, record);
                    }
                }
                Key::Instance => {
                    if let Ok(record) = InstanceRecord::decode(kv.value.as_slice()) {
                        instances.insert(kv.key.clone(), (kv, record));
                    }
                }
                Key::Reason | Key::Other => {}
            }
        }
        let mut view = self.view();
        let lost: Vec<u64> = view
            .leases
            .keys()
            .filter(|id| leases.get(id).is_none_or(|r| r.holder != self.replica))
            .copied()
            .collect();
        view.leases = leases;
        view.sets.retain(|hash, _| chunks.contains_key(hash));
        view.chunks = chunks;
        let gone: Vec<Vec<u8>> = view
            .instances
            .keys()
            .filter(|key| !instances.contains_key(*key))
            .cloned()
            .collect();
        let mut changed: Vec<(u64, etcd::KeyValue, InstanceRecord)> = instances
            .into_values()
            .filter(|(kv, _)| {
                view.instances
                    .get(&kv.key)
                    .is_none_or(|seen| seen.mod_revision != kv.mod_revision)
            })
            .map(|(kv, record)| (revision(kv.mod_revision, record.index), kv, record))
            .collect();
        changed.sort_by_key(|(revision, _, _)| *revision);
        let (puts, removals) = (changed.len(), gone.len());
        self.mirror.apply(|state| {
            let mut out = Vec::new();
            for (revision, kv, record) in changed {
                out.extend(mirror_put(&mut view, state, kv, record, revision));
            }
            // The removals take the last indexes of the new revision:
            // after every put, which all came at it or before.
            let top = (1u32 << INDEX_BITS) - 1;
            let mut index = top.saturating_sub(u32::try_from(gone.len()).unwrap_or(top));
            for key in gone {
                let Some(seen) = view.forget_instance(&key) else {
                    continue;
                };
                index = (index + 1).min(top);
                out.extend(state.apply_delete(
                    &seen.service,
                    &seen.instance_id,
                    RemovalReason::LeaseExpired,
                    revision(at, index),
                ));
            }
            state.advance_to(revision(at, top));
            out
        });
        drop(view);
        {
            let mut held = self.held();
            for id in lost {
                if held.leases.remove(&id).is_some() {
                    tracing::info!(lease = id, "lease taken over by another replica, or gone");
                }
            }
        }
        self.applied.send_replace(at);
        tracing::warn!(
            revision = at,
            puts,
            removals,
            "etcd compacted the history this replica missed: caught up from the prefix as it is"
        );
        Ok(at)
    }

    /// Applies the events of etcd revision `at` to the view and the
    /// mirror (publishing the mirror's changes as one batch).
    fn apply(&self, at: i64, events: &[etcd::Event]) {
        let is_put = |e: &etcd::Event| e.r#type == etcd::event::EventType::Put as i32;
        let reason = events
            .iter()
            .filter(|e| is_put(e))
            .filter_map(|e| e.kv.as_ref())
            .find(|kv| self.url.parse(&kv.key) == Key::Reason)
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<i32>().ok())
            .and_then(|n| RemovalReason::try_from(n).ok())
            .unwrap_or(RemovalReason::LeaseExpired);
        tracing::debug!(
            revision = at,
            events = events.len(),
            "etcd revision applied"
        );
        let mut lost = Vec::new();
        let mut view = self.view();
        self.mirror.apply(|state| {
            let mut out = Vec::new();
            let mut deletes = 0u32;
            for event in events {
                let Some(kv) = &event.kv else { continue };
                let put = is_put(event);
                match self.url.parse(&kv.key) {
                    Key::Lease(id) if put => match LeaseRecord::decode(kv.value.as_slice()) {
                        Ok(record) => {
                            if record.holder != self.replica {
                                lost.push((id, kv.mod_revision));
                            }
                            view.leases.insert(id, record);
                        }
                        Err(e) => tracing::warn!(lease = id, "unreadable lease record: {e}"),
                    },
                    Key::Lease(id) => {
                        view.leases.remove(&id);
                        lost.push((id, i64::MAX));
                    }
                    Key::Instance if put => match InstanceRecord::decode(kv.value.as_slice()) {
                        Ok(record) => {
                            let revision = revision(kv.mod_revision, record.index);
                            out.extend(mirror_put(&mut view, state, kv.clone(), record, revision));
                        }
                        Err(e) => tracing::warn!("unreadable instance record: {e}"),
                    },
                    Key::Instance => {
                        let Some(seen) = view.forget_instance(&kv.key) else {
                            continue;
                        };
                        let revision = revision(at, deletes);
                        deletes += 1;
                        out.extend(state.apply_delete(
                            &seen.service,
                            &seen.instance_id,
                            reason,
                            revision,
                        ));
                    }
                    Key::Chunk(hash, n) if put => {
                        view.chunks
                            .entry(hash)
                            .or_default()
                            .insert(n, kv.value.clone());
                    }
                    Key::Chunk(hash, n) => {
                        // Collected (see `collect_descriptors`).
                        view.sets.remove(&hash);
                        if let Some(chunks) = view.chunks.get_mut(&hash) {
                            chunks.remove(&n);
                            if chunks.is_empty() {
                                view.chunks.remove(&hash);
                            }
                        }
                    }
                    Key::Reason | Key::Other => {}
                }
            }
            out
        });
        drop(view);
        if !lost.is_empty() {
            let mut held = self.held();
            for (id, at) in lost {
                let taken = held
                    .leases
                    .get(&id)
                    .is_some_and(|lease| at == i64::MAX || at > lease.since);
                if taken && held.leases.remove(&id).is_some() {
                    tracing::info!(lease = id, "lease taken over by another replica, or gone");
                }
            }
        }
        self.applied.send_if_modified(|applied| {
            let newer = at > *applied;
            *applied = (*applied).max(at);
            newer
        });
    }

    /// UNAVAILABLE while etcd is lost: a heartbeat answered here would
    /// keep a node on a replica whose etcd lease for it nobody renews.
    fn check_reachable(&self) -> Result<()> {
        if *self.lost.borrow() {
            return Err(Error::Unavailable(format!(
                "this replica cannot reach etcd (no answer for over {LOST_AFTER:?}): use another replica"
            )));
        }
        Ok(())
    }

    /// The key of instance `instance_id` of `service`, once etcd is
    /// reachable and `secret` opens lease `lease_id` (whether the lease
    /// owns the instance is the caller's to check, on its view).
    async fn owned_key(&self, owned: &validate::Owned) -> Result<Vec<u8>> {
        self.check_reachable()?;
        self.owned_lease(owned.lease_id, &owned.lease_secret)
            .await?;
        Ok(self.url.instance_key(&owned.service, &owned.instance_id))
    }

    /// Lease `id`'s record naming this replica was written at `at`.
    fn hold_since(&self, id: u64, at: i64) {
        if let Some(lease) = self.held().leases.get_mut(&id) {
            lease.since = at;
        }
    }

    /// Waits until the mirror has applied etcd revision `at`. A revision
    /// may carry no change under the prefix (a failed comparison answers
    /// with etcd's current revision, which other prefixes move on): if
    /// the watch brings nothing for a moment, the mirror asks etcd for a
    /// progress report, which says the watch has seen all up to it.
    async fn caught_up(&self, at: i64) -> Result<()> {
        let mut applied = self.applied.subscribe();
        let deadline = Instant::now() + ETCD_TIMEOUT;
        let mut wait = Duration::from_millis(50);
        loop {
            if *applied.borrow_and_update() >= at {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Unavailable(format!(
                    "this replica's view of etcd did not reach revision {at} within {ETCD_TIMEOUT:?}"
                )));
            }
            if tokio::time::timeout_at((now + wait).min(deadline), applied.changed())
                .await
                .is_err()
            {
                self.want_progress.notify_one();
                wait = Duration::from_millis(250);
            }
        }
    }

    async fn txn(&self, request: etcd::TxnRequest) -> Result<etcd::TxnResponse> {
        match tokio::time::timeout(ETCD_TIMEOUT, self.client.kv.clone().txn(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(unavailable("transaction", &status)),
            Err(_) => Err(Error::Unavailable(format!(
                "etcd did not answer a transaction within {ETCD_TIMEOUT:?}"
            ))),
        }
    }

    /// A transaction that must succeed; returns its revision.
    async fn commit(&self, success: Vec<etcd::RequestOp>) -> Result<i64> {
        let response = self
            .txn(etcd::TxnRequest {
                compare: Vec::new(),
                success,
                failure: Vec::new(),
            })
            .await?;
        Ok(response.header.map_or(0, |h| h.revision))
    }

    /// The record of lease `id`: from the view, else read from etcd (a
    /// lease granted on another replica a moment ago).
    async fn lease_record(&self, id: u64) -> Result<LeaseRecord> {
        if let Some(record) = self.view().leases.get(&id) {
            return Ok(record.clone());
        }
        let mut kv = self.client.kv.clone();
        let read = kv.range(etcd::RangeRequest {
            key: self.url.lease_key(id),
            ..Default::default()
        });
        let response = match tokio::time::timeout(ETCD_TIMEOUT, read).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Err(unavailable("read", &status)),
            Err(_) => return Err(Error::Unavailable("etcd did not answer a read".into())),
        };
        response
            .kvs
            .first()
            .and_then(|kv| LeaseRecord::decode(kv.value.as_slice()).ok())
            .ok_or(Error::LeaseNotFound(id))
    }

    /// The record of lease `id` if `secret` opens it.
    async fn owned_lease(&self, id: u64, secret: &str) -> Result<LeaseRecord> {
        let record = self.lease_record(id).await?;
        if !record.opens_with(secret) {
            return Err(Error::WrongSecret(id));
        }
        Ok(record)
    }

    /// The registry-wide bound on distinct descriptor sets in use
    /// ([`Limits::descriptor_bytes`], as the memory store counts it): a set
    /// no instance uses yet must fit beside those that are. Checked against
    /// this replica's view, so new sets registered at the same moment on
    /// two replicas may each pass (by at most one set each).
    fn check_descriptor_bytes(&self, hash: &str, len: usize) -> Result<()> {
        let mut view = self.view();
        let used: BTreeSet<String> = view
            .instances
            .values()
            .map(|seen| seen.descriptors_sha256.clone())
            .filter(|h| !h.is_empty())
            .collect();
        if used.contains(hash) {
            return Ok(());
        }
        let bytes: usize = used
            .iter()
            .filter_map(|h| view.set(h))
            .map(|set| set.len())
            .sum();
        if bytes + len > self.limits.descriptor_bytes {
            return Err(Error::limit(
                Limit::DescriptorBytes,
                format!(
                    "at most {} bytes of distinct descriptor sets",
                    self.limits.descriptor_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Stores a descriptor set's chunks (once: content-addressed); returns
    /// its hash.
    async fn put_descriptors(&self, set: &[u8]) -> Result<String> {
        let (hash, parts) = crate::store::etcd::chunks(set);
        self.check_descriptor_bytes(&hash, set.len())?;
        if self.view().set(&hash).is_some() {
            return Ok(hash);
        }
        let mut last = 0;
        for (n, part) in parts.iter().enumerate() {
            last = self
                .commit(vec![put(self.url.chunk_key(&hash, n), part.to_vec(), 0)])
                .await?;
        }
        self.caught_up(last).await?;
        Ok(hash)
    }

    /// Removes lease `id` and its instances with `reason`; returns how
    /// many instances went.
    /// With `since` (the revision of the record naming this replica the
    /// holder), only while no other replica has adopted it meanwhile.
    async fn end_lease(&self, id: u64, reason: RemovalReason, since: Option<i64>) -> Result<usize> {
        let keys: Vec<Vec<u8>> = self
            .view()
            .per_lease
            .get(&id)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default();
        let why = put(
            self.url.reason_key(),
            (reason as i32).to_string().into_bytes(),
            0,
        );
        let batches: Vec<&[Vec<u8>]> = if keys.is_empty() {
            vec![&[]]
        } else {
            keys.chunks(DELETES_PER_TXN).collect()
        };
        let mut last = 0;
        for (n, batch) in batches.iter().enumerate() {
            let mut ops = vec![why.clone()];
            ops.extend(batch.iter().cloned().map(delete));
            if n + 1 == batches.len() {
                ops.push(delete(self.url.lease_key(id)));
            }
            let compare = since
                .filter(|since| *since != i64::MAX)
                .map(|since| unchanged(self.url.lease_key(id), since))
                .into_iter()
                .collect();
            let response = self
                .txn(etcd::TxnRequest {
                    compare,
                    success: ops,
                    failure: Vec::new(),
                })
                .await?;
            if !response.succeeded {
                tracing::info!(
                    lease = id,
                    "lease adopted by another replica: not ended here"
                );
                return Ok(0);
            }
            last = response.header.map_or(0, |h| h.revision);
        }
        // Anything registered under it meanwhile goes with the etcd lease.
        let mut leases = self.client.lease.clone();
        let revoke = leases.lease_revoke(etcd::LeaseRevokeRequest { id: lease_i64(id) });
        // (Its revision is not waited for: with nothing left to delete it
        // is just etcd's current one.)
        match tokio::time::timeout(ETCD_TIMEOUT, revoke).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) if status.message().contains("not found") => {}
            Ok(Err(status)) => {
                tracing::warn!(lease = id, "etcd lease revoke: {}", status.message())
            }
            Err(_) => tracing::warn!(lease = id, "etcd lease revoke: no answer"),
        }
        self.caught_up(last).await?;
        Ok(keys.len())
    }

    /// Ends a lease this replica held, logging a failure (etcd then
    /// expires it after its own TTL).
    async fn end_held(&self, id: u64, reason: RemovalReason, since: i64) -> Option<usize> {
        if *self.lost.borrow() {
            // Its node is moving to another replica, which adopts it.
            tracing::warn!(
                lease = id,
                "etcd lost: the lease is left to another replica or to etcd's expiry"
            );
            return None;
        }
        match self.end_lease(id, reason, Some(since)).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(lease = id, "could not end the lease in etcd: {e}");
                None
            }
        }
    }

    /// Checks a put of `instance` under `lease_id` at `key` against the
    /// view; returns the key's mod_revision (0: new).
    fn check_put(&self, key: &[u8], instance: &pb::Instance, lease_id: u64) -> Result<i64> {
        let view = self.view();
        if let Some(seen) = view.instances.get(key) {
            if seen.lease_id != lease_id {
                return Err(Error::NotOwner {
                    service: instance.service.clone(),
                    instance_id: instance.instance_id.clone(),
                });
            }
            return Ok(seen.mod_revision);
        }
        let held = view.per_lease.get(&lease_id).map_or(0, BTreeSet::len);
        self.quotas.check_lease(lease_id, held)?;
        let (count, total) = self
            .mirror
            .read(|s| (s.service_len(&instance.service), s.instance_count()));
        self.quotas.check_service(&instance.service, count)?;
        if total >= self.limits.instances {
            return Err(Error::limit(
                Limit::Instances,
                format!("at most {} instances", self.limits.instances),
            ));
        }
        Ok(0)
    }

    /// The instance at `key` if lease `lease_id` owns it: its mod_revision,
    /// descriptor hash, and the instance.
    fn owned_instance(
        &self,
        key: &[u8],
        owned: &validate::Owned,
    ) -> Result<(i64, String, pb::Instance)> {
        let (lease_id, service, instance_id) = (owned.lease_id, &owned.service, &owned.instance_id);
        let view = self.view();
        let not_found = || Error::InstanceNotFound {
            service: service.to_string(),
            instance_id: instance_id.to_string(),
        };
        let seen = view.instances.get(key).ok_or_else(not_found)?;
        if seen.lease_id != lease_id {
            return Err(Error::NotOwner {
                service: service.to_string(),
                instance_id: instance_id.to_string(),
            });
        }
        let instance = self
            .mirror
            .read(|s| s.get(service, instance_id))
            .ok_or_else(not_found)?;
        Ok((seen.mod_revision, seen.descriptors_sha256.clone(), instance))
    }

    /// Puts an instance record under `lease_id` if the lease still exists
    /// and `key` is still at `mod_revision`; the transaction's revision and
    /// whether it did. Puts made meanwhile by other calls share one
    /// transaction ([`batch_puts`]).
    async fn put_instance(
        &self,
        key: &[u8],
        mod_revision: i64,
        lease_id: u64,
        record: InstanceRecord,
    ) -> Result<(bool, i64)> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = PendingPut {
            key: key.to_vec(),
            mod_revision,
            lease_id,
            record,
            reply,
        };
        let gone = || Error::Unavailable("the etcd store is shutting down".into());
        self.puts.send(pending).await.map_err(|_| gone())?;
        let (done, at) = answer.await.map_err(|_| gone())??;
        self.caught_up(at).await?;
        Ok((done, at))
    }

    /// One transaction putting `batch` (each under its comparisons): whether
    /// every comparison held, and its revision.
    async fn put_together(&self, batch: &mut [PendingPut]) -> Result<(bool, i64)> {
        let mut compare = Vec::new();
        let mut leases = BTreeSet::new();
        let mut success = Vec::new();
        let mut sets = BTreeSet::new();
        for (index, pending) in batch.iter_mut().enumerate() {
            if leases.insert(pending.lease_id) {
                compare.push(exists(self.url.lease_key(pending.lease_id)));
            }
            // Its descriptor set is still there: not collected since it
            // was written or seen (see `collect_descriptors`).
            let hash = &pending.record.descriptors_sha256;
            if !hash.is_empty() && sets.insert(hash.clone()) {
                compare.push(exists(self.url.chunk_key(hash, 0)));
            }
            compare.push(unchanged(pending.key.clone(), pending.mod_revision));
            pending.record.index = u32::try_from(index).unwrap_or(0);
            success.push(put(
                pending.key.clone(),
                pending.record.encode_to_vec(),
                pending.lease_id,
            ));
        }
        let response = self
            .txn(etcd::TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            })
            .await?;
        Ok((
            response.succeeded,
            response.header.map_or(0, |h| h.revision),
        ))
    }

    /// The instance as the mirror holds it after a write.
    fn stored(&self, service: &str, instance_id: &str) -> Result<(pb::Instance, u64)> {
        let instance = self
            .mirror
            .read(|s| s.get(service, instance_id))
            .ok_or_else(|| Error::InstanceNotFound {
                service: service.to_string(),
                instance_id: instance_id.to_string(),
            })?;
        let revision = instance.revision;
        Ok((instance, revision))
    }
}

/// A put waiting for [`batch_puts`].
struct PendingPut {
    key: Vec<u8>,
    mod_revision: i64,
    lease_id: u64,
    record: InstanceRecord,
    reply: tokio::sync::oneshot::Sender<Result<(bool, i64)>>,
}

/// Most puts in one transaction (each brings a comparison or two; etcd's
/// default `--max-txn-ops` is 128) and most bytes of records in it.
const BATCH_PUTS: usize = 40;
const BATCH_BYTES: usize = 512 * 1024;

/// Registrations and updates that arrive while a transaction is in flight
/// go together in the next one (one etcd round trip and disk sync for all
/// of them). If its comparisons fail (one of them lost a race), each is
/// tried alone, so one conflict does not fail the others.
async fn batch_puts(inner: Arc<Inner>, mut puts: mpsc::Receiver<PendingPut>) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(first) => first,
            None => match puts.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = first.record.encoded_len();
        let mut keys = std::collections::HashSet::from([first.key.clone()]);
        let mut batch = vec![first];
        while batch.len() < BATCH_PUTS && bytes < BATCH_BYTES {
            let Ok(pending) = puts.try_recv() else { break };
            if !keys.insert(pending.key.clone()) {
                // etcd refuses a key twice in one transaction.
                next = Some(pending);
                break;
            }
            bytes += pending.record.encoded_len();
            batch.push(pending);
        }
        tracing::debug!(puts = batch.len(), "puts in one etcd transaction");
        let together = inner.put_together(&mut batch).await;
        match together {
            Ok((true, at)) => {
                for pending in batch {
                    let _ = pending.reply.send(Ok((true, at)));
                }
            }
            Ok((false, _)) if batch.len() > 1 => {
                for mut pending in batch {
                    let alone = inner.put_together(std::slice::from_mut(&mut pending)).await;
                    let _ = pending.reply.send(alone);
                }
            }
            Ok(answer) => {
                for pending in batch {
                    let _ = pending.reply.send(Ok(answer));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for pending in batch {
                    let _ = pending.reply.send(Err(Error::Unavailable(message.clone())));
                }
            }
        }
    }
}

/// Sets an instance put in etcd in the view and the mirror's state.
fn mirror_put(
    view: &mut View,
    state: &mut State,
    kv: etcd::KeyValue,
    record: InstanceRecord,
    revision: u64,
) -> Option<Event> {
    let mut instance = record.instance?;
    instance.revision = 0;
    let descriptors = if record.descriptors_sha256.is_empty() {
        None
    } else {
        let set = view.set(&record.descriptors_sha256);
        if set.is_none() {
            tracing::warn!(
                service = %instance.service,
                instance = %instance.instance_id,
                "descriptor chunks missing in etcd"
            );
        }
        set
    };
    let lease_id = instance.lease_id;
    if let Some(old) = view.instances.get(&kv.key)
        && old.lease_id != lease_id
        && let Some(keys) = view.per_lease.get_mut(&old.lease_id)
    {
        keys.remove(&kv.key);
    }
    view.per_lease
        .entry(lease_id)
        .or_default()
        .insert(kv.key.clone());
    view.instances.insert(
        kv.key,
        Seen {
            service: instance.service.clone(),
            instance_id: instance.instance_id.clone(),
            lease_id,
            mod_revision: kv.mod_revision,
            descriptors_sha256: record.descriptors_sha256,
        },
    );
    state.apply_put(instance, descriptors, revision)
}

#[tonic::async_trait]
impl Writes for EtcdStore {
    async fn grant_lease(&self, ttl_ms: u64) -> Result<Granted> {
        let inner = &self.inner;
        inner.check_reachable()?;
        let ttl = inner.ttl.granted(ttl_ms);
        if inner.view().leases.len() >= inner.limits.leases {
            return Err(Error::limit(
                Limit::Leases,
                format!("at most {} live leases", inner.limits.leases),
            ));
        }
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0) + FAILOVER_MARGIN.as_secs();
        let mut leases = inner.client.lease.clone();
        let grant = leases.lease_grant(etcd::LeaseGrantRequest {
            ttl: i64::try_from(seconds).unwrap_or(i64::MAX),
            id: 0,
        });
        let granted = match tokio::time::timeout(ETCD_TIMEOUT, grant).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Err(unavailable("lease grant", &status)),
            Err(_) => return Err(Error::Unavailable("etcd did not grant a lease".into())),
        };
        if !granted.error.is_empty() {
            return Err(Error::Unavailable(format!(
                "etcd lease grant: {}",
                granted.error
            )));
        }
        let id = u64::try_from(granted.id).unwrap_or(0);
        let secret = format!("{:032x}", rand::random::<u128>());
        let mut record =
            LeaseRecord::new(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX), &secret);
        record.holder = inner.replica.clone();
        inner
            .held()
            .leases
            .insert(id, Held::new(ttl, None, record.secret_sha256.clone()));
        inner.wake_expiry.notify_one();
        let at = inner
            .commit(vec![put(
                inner.url.lease_key(id),
                record.encode_to_vec(),
                id,
            )])
            .await;
        let at = match at {
            Ok(at) => at,
            Err(e) => {
                inner.held().leases.remove(&id);
                return Err(e);
            }
        };
        inner.hold_since(id, at);
        inner.caught_up(at).await?;
        Ok(Granted {
            lease_id: id,
            lease_secret: secret,
            ttl,
        })
    }

    async fn keep_alive(&self, id: u64, secret: &str, stream: Option<u64>) -> Result<Duration> {
        let inner = &self.inner;
        inner.check_reachable()?;
        {
            let mut held = inner.held();
            if let Some(lease) = held.leases.get_mut(&id) {
                if !secret_matches(&lease.secret_sha256, secret) {
                    return Err(Error::WrongSecret(id));
                }
                lease.deadline = Instant::now() + lease.ttl;
                if stream.is_some() {
                    lease.attached = stream;
                }
                return Ok(lease.ttl);
            }
        }
        // Held by another replica (or by one that died): adopt it.
        let mut record = inner.owned_lease(id, secret).await?;
        let ttl = Duration::from_millis(record.ttl_ms);
        inner
            .held()
            .leases
            .insert(id, Held::new(ttl, stream, record.secret_sha256.clone()));
        inner.wake_keeper.notify_one();
        inner.wake_expiry.notify_one();
        record.holder = inner.replica.clone();
        let key = inner.url.lease_key(id);
        let adopted = inner
            .txn(etcd::TxnRequest {
                compare: vec![exists(key.clone())],
                success: vec![put(key, record.encode_to_vec(), id)],
                failure: Vec::new(),
            })
            .await;
        match adopted {
            Ok(response) if response.succeeded => {
                inner.hold_since(id, response.header.map_or(0, |h| h.revision));
                tracing::info!(lease = id, "lease adopted from another replica");
                Ok(ttl)
            }
            Ok(_) => {
                inner.held().leases.remove(&id);
                Err(Error::LeaseNotFound(id))
            }
            Err(e) => {
                inner.held().leases.remove(&id);
                Err(e)
            }
        }
    }

    async fn stream_closed(&self, lease_id: u64, stream: u64) -> Option<usize> {
        let inner = &self.inner;
        let since = {
            let mut held = inner.held();
            let attached = held
                .leases
                .get(&lease_id)
                .is_some_and(|lease| lease.attached == Some(stream));
            if !attached {
                return None;
            }
            held.leases.remove(&lease_id)?.since
        };
        inner
            .end_held(lease_id, RemovalReason::KeepaliveClosed, since)
            .await
    }

    async fn revoke_lease(&self, lease_id: u64, secret: &str) -> Result<u32> {
        let inner = &self.inner;
        inner.check_reachable()?;
        inner.owned_lease(lease_id, secret).await?;
        inner.held().leases.remove(&lease_id);
        let removed = inner
            .end_lease(lease_id, RemovalReason::LeaseRevoked, None)
            .await?;
        Ok(u32::try_from(removed).unwrap_or(u32::MAX))
    }

    async fn register(&self, request: validate::Register) -> Result<(pb::Instance, u64)> {
        let inner = &self.inner;
        inner.check_reachable()?;
        let lease_id = request.lease_id;
        inner.owned_lease(lease_id, &request.lease_secret).await?;
        let (mut instance, descriptors) = (request.instance, request.descriptors);
        instance.lease_id = lease_id;
        instance.revision = 0;
        let key = inner
            .url
            .instance_key(&instance.service, &instance.instance_id);
        for _ in 0..RETRIES {
            // Again on each try: a set collected meanwhile is written back.
            let hash = match &descriptors {
                Some(set) => inner.put_descriptors(set).await?,
                None => String::new(),
            };
            let seen = inner.check_put(&key, &instance, lease_id)?;
            let record = InstanceRecord {
                instance: Some(instance.clone()),
                descriptors_sha256: hash.clone(),
                index: 0,
            };
            let (done, _) = inner.put_instance(&key, seen, lease_id, record).await?;
            if done {
                return inner.stored(&instance.service, &instance.instance_id);
            }
            if !inner.view().leases.contains_key(&lease_id) {
                return Err(Error::LeaseNotFound(lease_id));
            }
        }
        Err(Error::Unavailable(format!(
            "register kept losing races with other replicas' writes ({RETRIES} tries)"
        )))
    }

    async fn update(&self, request: validate::Update) -> Result<(pb::Instance, u64)> {
        let inner = &self.inner;
        let owned = &request.owned;
        let key = inner.owned_key(owned).await?;
        for _ in 0..RETRIES {
            let (seen, hash, mut instance) = inner.owned_instance(&key, owned)?;
            if let Some(weight) = request.weight {
                instance.weight = Some(weight);
            }
            if let Some(labels) = &request.metadata {
                instance.metadata = labels.clone();
            }
            instance.revision = 0;
            let record = InstanceRecord {
                instance: Some(instance),
                descriptors_sha256: hash,
                index: 0,
            };
            let (done, _) = inner
                .put_instance(&key, seen, owned.lease_id, record)
                .await?;
            if done {
                return inner.stored(&owned.service, &owned.instance_id);
            }
            if !inner.view().leases.contains_key(&owned.lease_id) {
                return Err(Error::LeaseNotFound(owned.lease_id));
            }
        }
        Err(Error::Unavailable(format!(
            "update kept losing races with other replicas' writes ({RETRIES} tries)"
        )))
    }

    fn lost(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.inner.lost.subscribe())
    }

    async fn reach(&self, revision: u64) {
        let at = i64::try_from(revision >> INDEX_BITS).unwrap_or(i64::MAX);
        let mut applied = self.inner.applied.subscribe();
        let _ = tokio::time::timeout(REACH_WAIT, applied.wait_for(|a| *a >= at)).await;
    }

    async fn deregister(&self, request: validate::Deregister) -> Result<u64> {
        let inner = &self.inner;
        let key = inner.owned_key(&request).await?;
        for _ in 0..RETRIES {
            let (seen, _, _) = inner.owned_instance(&key, &request)?;
            let response = inner
                .txn(etcd::TxnRequest {
                    compare: vec![
                        exists(inner.url.lease_key(request.lease_id)),
                        unchanged(key.clone(), seen),
                    ],
                    success: vec![
                        put(
                            inner.url.reason_key(),
                            (RemovalReason::Deregistered as i32)
                                .to_string()
                                .into_bytes(),
                            0,
                        ),
                        delete(key.clone()),
                    ],
                    failure: Vec::new(),
                })
                .await?;
            let at = response.header.map_or(0, |h| h.revision);
            inner.caught_up(at).await?;
            if response.succeeded {
                return Ok(revision(at, 0));
            }
            if !inner.view().leases.contains_key(&request.lease_id) {
                return Err(Error::LeaseNotFound(request.lease_id));
            }
        }
        Err(Error::Unavailable(format!(
            "deregister kept losing races with other replicas' writes ({RETRIES} tries)"
        )))
    }
}

/// The mirror's feed: watches the prefix from etcd revision `next` and
/// applies each revision; reconnects after a break.
async fn follow(inner: Arc<Inner>, mut next: i64) {
    loop {
        match watch_from(&inner, next).await {
            Ok(()) => tracing::warn!("etcd watch ended; watching again"),
            Err(status) => {
                tracing::warn!("etcd watch failed: {}; watching again", status.message())
            }
        }
        next = *inner.applied.borrow() + 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watch_from(inner: &Inner, start: i64) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(1);
    let key = inner.url.all_keys();
    let create = etcd::WatchRequest {
        request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(
            etcd::WatchCreateRequest {
                range_end: etcd_api::prefix_end(&key),
                key,
                start_revision: start,
                progress_notify: true,
                prev_kv: false,
                fragment: false,
            },
        )),
    };
    tx.send(create)
        .await
        .map_err(|_| tonic::Status::internal("watch request not sent"))?;
    let mut stream = inner
        .client
        .watch
        .clone()
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    inner
        .synced
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // A write after the watch exists: once the watch brings it back, it has
    // caught up, and its progress reports tell the truth.
    let marker = inner
        .commit(vec![put(inner.url.sync_key(), Vec::new(), 0)])
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    loop {
        let response = tokio::select! {
            response = stream.message() => response?,
            () = inner.want_progress.notified() => {
                let progress = etcd::WatchRequest {
                    request_union: Some(etcd::watch_request::RequestUnion::ProgressRequest(
                        etcd::WatchProgressRequest {},
                    )),
                };
                tx.send(progress)
                    .await
                    .map_err(|_| tonic::Status::internal("watch request not sent"))?;
                continue;
            }
        };
        let Some(response) = response else { break };
        if response.compact_revision > 0 {
            // Fell behind etcd's compaction: what was missed is read as it
            // is now, and the watch goes on from there.
            inner.recover().await?;
            return Ok(());
        }
        if response.canceled {
            return Err(tonic::Status::aborted(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason
            )));
        }
        let mut events = response.events.as_slice();
        while let Some(first) = events.first() {
            let at = first.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            let len = events
                .iter()
                .take_while(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision) == at)
                .count();
            if at >= marker {
                // Before applying, so a waiter woken by this revision sees it.
                inner
                    .synced
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            inner.apply(at, &events[..len]);
            events = &events[len..];
        }
        if response.events.is_empty()
            && let Some(header) = response.header
            && !response.created
            && inner.synced.load(std::sync::atomic::Ordering::SeqCst)
        {
            // A progress notification: everything up to it was sent.
            inner.applied.send_if_modified(|applied| {
                let newer = header.revision > *applied;
                *applied = (*applied).max(header.revision);
                newer
            });
        }
    }
    drop(tx);
    Ok(())
}

/// Reads from etcd every [`PROBE_EVERY`]: a quorum read (a member cut off
/// from the others does not answer it), and beside it a read the member
/// answers alone. etcd lost is no answer at all for [`LOST_AFTER`] (this
/// replica is cut off), or members that answer but no quorum read for
/// [`ELECTION_GRACE`] (the cluster lost its quorum). A leader election
/// in between (the leader died) is ridden out: heartbeats go on here,
/// writes wait for the new leader.
async fn probe(inner: Arc<Inner>) {
    let mut answered = Instant::now();
    let mut reachable = answered;
    let mut slept = answered;
    loop {
        // Back from a sleep far longer than asked: this process was not
        // running (stopped, or its machine paused), which says nothing of
        // etcd; the silence is measured from now.
        let woke = Instant::now();
        if woke.saturating_duration_since(slept) > 2 * PROBE_EVERY {
            answered = woke;
            reachable = woke;
        }
        inner.client.renew_token().await;
        let (member, _) = inner.client.members.pinned();
        let read = |serializable| {
            let mut kv = inner.client.kv.clone();
            let key = inner.url.reason_key();
            async move {
                let read = kv.range(etcd::RangeRequest {
                    key,
                    count_only: true,
                    serializable,
                    ..Default::default()
                });
                matches!(tokio::time::timeout(LOST_AFTER, read).await, Ok(Ok(_)))
            }
        };
        let (quorum, local) = tokio::join!(read(false), read(true));
        let now = Instant::now();
        if now.saturating_duration_since(woke) > LOST_AFTER + crate::lease::STALL {
            // Stopped while reading (the reads time out at LOST_AFTER).
            answered = now;
            reachable = now;
        }
        if quorum {
            answered = now;
        } else {
            // Whether this member is down, cut off from the others or
            // waiting for a leader, another may answer the next probe.
            inner.client.members.failed(member);
        }
        if quorum || local {
            reachable = now;
        }
        let lost = now.saturating_duration_since(reachable) >= LOST_AFTER
            || now.saturating_duration_since(answered) >= ELECTION_GRACE;
        inner.lost.send_if_modified(|was| {
            let changed = *was != lost;
            if changed && lost {
                tracing::error!("etcd does not answer: this replica stops serving until it does");
            } else if changed {
                tracing::info!("etcd answers again: serving");
            }
            *was = lost;
            changed
        });
        slept = Instant::now();
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// How often a replica looks for descriptor sets no instance uses.
const COLLECT_EVERY: Duration = Duration::from_secs(30);

/// Deletes from etcd the descriptor sets no instance used at two looks in
/// a row ([`COLLECT_EVERY`] apart: a set just written for a Register on
/// its way is not taken from under it), so sets a client stops using do
/// not pile up in etcd and in every replica's memory.
async fn collect_descriptors(inner: Arc<Inner>) {
    let mut candidates = BTreeSet::new();
    loop {
        tokio::time::sleep(COLLECT_EVERY).await;
        if let Err(e) = inner.collect_round(&mut candidates).await {
            tracing::debug!("descriptor sets not collected this time: {e}");
        }
    }
}

impl Inner {
    /// One look for unused descriptor sets: deletes those that were unused
    /// at the last look too (`candidates`), and keeps the others unused now
    /// as the next candidates. Returns how many sets went.
    ///
    /// The delete holds only if no instance key changed since the view it
    /// was decided on (a comparison on the whole instance range): a set a
    /// Register on another replica just used stays. A Register racing the
    /// other way, on a set deleted first, fails its own comparison on the
    /// set's first chunk and writes the set again.
    async fn collect_round(&self, candidates: &mut BTreeSet<String>) -> Result<usize> {
        let at = *self.applied.borrow();
        let unused: BTreeSet<String> = {
            let view = self.view();
            let used: BTreeSet<&str> = view
                .instances
                .values()
                .map(|seen| seen.descriptors_sha256.as_str())
                .collect();
            view.chunks
                .keys()
                .filter(|hash| !used.contains(hash.as_str()))
                .cloned()
                .collect()
        };
        let due: Vec<String> = unused.intersection(candidates).cloned().collect();
        *candidates = unused;
        let mut collected = 0;
        for batch in due.chunks(DELETES_PER_TXN) {
            let instances = self.url.instance_keys();
            let untouched = etcd::Compare {
                result: CompareResult::Less as i32,
                target: CompareTarget::Mod as i32,
                range_end: etcd_api::prefix_end(&instances),
                key: instances,
                target_union: Some(TargetUnion::ModRevision(at + 1)),
            };
            let deletes = batch
                .iter()
                .map(|hash| {
                    let key = self.url.chunk_keys(hash);
                    etcd::RequestOp {
                        request: Some(Op::RequestDeleteRange(etcd::DeleteRangeRequest {
                            range_end: etcd_api::prefix_end(&key),
                            key,
                            ..Default::default()
                        })),
                    }
                })
                .collect();
            let response = self
                .txn(etcd::TxnRequest {
                    compare: vec![untouched],
                    success: deletes,
                    failure: Vec::new(),
                })
                .await?;
            if !response.succeeded {
                // Instances changed meanwhile: decided again next time.
                return Ok(collected);
            }
            for hash in batch {
                candidates.remove(hash);
            }
            collected += batch.len();
            tracing::info!(
                sets = batch.len(),
                "unused descriptor sets deleted from etcd"
            );
        }
        Ok(collected)
    }
}

/// Ends the leases this replica holds once their registry TTL passed
/// without a heartbeat.
async fn expire(inner: Arc<Inner>) {
    loop {
        let now = Instant::now();
        let (due, next) = {
            let mut held = inner.held();
            let gap = now.saturating_duration_since(held.ticked);
            held.ticked = now;
            if gap > crate::lease::STALL {
                tracing::warn!(
                    stalled_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
                    "the registry was not running for a while: every lease it holds gets a fresh TTL"
                );
                for lease in held.leases.values_mut() {
                    lease.deadline = now + lease.ttl;
                }
            }
            let due: Vec<(u64, i64)> = held
                .leases
                .iter()
                .filter(|(_, lease)| lease.deadline <= now)
                .map(|(id, lease)| (*id, lease.since))
                .collect();
            for (id, _) in &due {
                held.leases.remove(id);
            }
            let next = held.leases.values().map(|lease| lease.deadline).min();
            (due, next)
        };
        for (id, since) in due {
            let inner = inner.clone();
            tokio::spawn(async move {
                if let Some(removed) = inner.end_held(id, RemovalReason::LeaseExpired, since).await
                {
                    tracing::info!(lease = id, removed, "lease expired");
                }
            });
        }
        let tick = now + TICK;
        let wake = next.map_or(tick, |next| next.min(tick));
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = inner.wake_expiry.notified() => {}
        }
    }
}

/// Keeps the etcd leases of the leases this replica holds alive, over one
/// LeaseKeepAlive stream (opened again when it breaks).
async fn keep_etcd_leases(inner: Arc<Inner>) {
    loop {
        let (tx, rx) = mpsc::channel(1024);
        // Sending runs beside the opening: etcd answers the call (and so
        // lets it open) only once it has a first request.
        let sender = AbortOnDropHandle::new(tokio::spawn(send_keepalives(inner.clone(), tx)));
        let opened = inner
            .client
            .lease
            .clone()
            .lease_keep_alive(ReceiverStream::new(rx))
            .await;
        match opened {
            Ok(response) => {
                let mut responses = response.into_inner();
                loop {
                    match responses.message().await {
                        Ok(Some(response)) if response.ttl <= 0 => {
                            let id = u64::try_from(response.id).unwrap_or(0);
                            if inner.held().leases.remove(&id).is_some() {
                                tracing::warn!(lease = id, "etcd lease already gone");
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!("etcd lease keepalive broke: {}", status.message());
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::warn!("etcd lease keepalive: {}", status.message()),
        }
        drop(sender);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends a keepalive for every held lease every [`ETCD_KEEPALIVE_EVERY`],
/// and at once when a lease is adopted.
async fn send_keepalives(inner: Arc<Inner>, tx: mpsc::Sender<etcd::LeaseKeepAliveRequest>) {
    let mut every = tokio::time::interval(ETCD_KEEPALIVE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = inner.wake_keeper.notified() => {}
        }
        let ids: Vec<u64> = inner.held().leases.keys().copied().collect();
        for id in ids {
            let request = etcd::LeaseKeepAliveRequest { id: lease_i64(id) };
            if tx.send(request).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_order_by_etcd_revision_then_index() {
        assert!(revision(5, (1 << INDEX_BITS) - 1) < revision(6, 0));
        assert!(revision(6, 0) < revision(6, 1));
        assert_eq!(revision(1, 0), 1 << INDEX_BITS);
        assert_eq!(revision(-1, 0), 0);
    }

    /// `write` again while it is UNAVAILABLE (on a loaded machine etcd may
    /// miss the 1 s probe deadline, and the replica then refuses for a
    /// moment), for up to 20 s.
    async fn settled<T, F: std::future::Future<Output = Result<T>>>(
        mut write: impl FnMut() -> F,
    ) -> Result<T> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match write().await {
                Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// An etcd store over a fresh etcd, with a lease granted.
    struct Fixture {
        store: EtcdStore,
        watchers: Watchers,
        grant: Granted,
        url: EtcdUrl,
        _guard: EtcdGuard,
        _etcd: testkit::etcd::Etcd,
    }

    impl Fixture {
        async fn start(prefix: &str, limits: Limits) -> Fixture {
            let etcd = testkit::etcd::Etcd::start();
            let url = match etcd.store(prefix).parse() {
                Ok(crate::store::etcd::StoreUrl::Etcd(url)) => url,
                other => panic!("{other:?}"),
            };
            let (store, watchers, guard) = EtcdStore::start_with_limits(
                &url,
                &EtcdAccess::default(),
                Ttl::default(),
                Quotas::default(),
                WatchLimits::default(),
                limits,
            )
            .await
            .unwrap();
            let grant = settled(|| store.grant_lease(60_000)).await.unwrap();
            Fixture {
                store,
                watchers,
                grant,
                url,
                _guard: guard,
                _etcd: etcd,
            }
        }

        /// Registers instance `id` of `svc` with a 600-byte descriptor set
        /// of `byte`s.
        async fn put(&self, id: &str, byte: u8) -> Result<(pb::Instance, u64)> {
            let request = validate::Register {
                lease_id: self.grant.lease_id,
                lease_secret: self.grant.lease_secret.clone(),
                instance: pb::Instance {
                    service: "svc".into(),
                    instance_id: id.into(),
                    host: "10.0.0.1".into(),
                    port: 1,
                    ..Default::default()
                },
                descriptors: Some(vec![byte; 600]),
            };
            settled(|| self.store.register(request.clone())).await
        }

        async fn deregister(&self, id: &str) {
            let request = validate::Deregister {
                lease_id: self.grant.lease_id,
                lease_secret: self.grant.lease_secret.clone(),
                service: "svc".into(),
                instance_id: id.into(),
            };
            settled(|| self.store.deregister(request.clone()))
                .await
                .unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distinct_descriptor_sets_in_use_are_bounded_as_in_the_memory_store() {
        let limits = Limits {
            descriptor_bytes: 1000,
            ..Limits::default()
        };
        let f = Fixture::start("limits", limits).await;
        f.put("a", 1).await.unwrap();
        // The same set again costs nothing.
        f.put("b", 1).await.unwrap();
        // Another one would make 1200 bytes of distinct sets: refused, as
        // the memory store refuses it (state.rs's limit test).
        let refused = f.put("c", 2).await;
        assert!(
            matches!(
                &refused,
                Err(Error::Limit {
                    limit: Limit::DescriptorBytes,
                    ..
                })
            ),
            "{refused:?}"
        );
        // Once no instance uses the first set, the second fits.
        for id in ["a", "b"] {
            f.deregister(id).await;
        }
        f.put("c", 2).await.unwrap();
        assert_eq!(f.watchers.store().resolve("svc").0.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_descriptor_set_no_instance_uses_is_deleted_and_written_again_when_used() {
        let f = Fixture::start("gc", Limits::default()).await;
        let inner = f.store.inner.clone();
        let chunks_in_etcd = || async {
            let mut kv = inner.client.kv.clone();
            let key = format!("{}/desc/", f.url.prefix).into_bytes();
            kv.range(etcd::RangeRequest {
                range_end: etcd_api::prefix_end(&key),
                key,
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .count
        };
        f.put("a", 1).await.unwrap();
        f.put("b", 2).await.unwrap();
        assert_eq!(chunks_in_etcd().await, 2);

        // In use: never collected, however many looks.
        let mut candidates = BTreeSet::new();
        for _ in 0..3 {
            assert_eq!(inner.collect_round(&mut candidates).await.unwrap(), 0);
        }
        // b's instance goes: its set is a candidate at the next look and
        // deleted at the one after, from etcd and from the view.
        f.deregister("b").await;
        assert_eq!(inner.collect_round(&mut candidates).await.unwrap(), 0);
        assert_eq!(inner.collect_round(&mut candidates).await.unwrap(), 1);
        assert_eq!(chunks_in_etcd().await, 1);
        let hash_b = crate::store::etcd::chunks(&[2; 600]).0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while inner.view().set(&hash_b).is_some() {
            assert!(Instant::now() < deadline, "the view kept the deleted set");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // a's set stays; used again, b's set is written back whole.
        f.put("c", 2).await.unwrap();
        assert_eq!(chunks_in_etcd().await, 2);
        assert_eq!(f.watchers.store().resolve("svc").0.len(), 2);
        assert!(inner.view().set(&hash_b).is_some());
    }

    #[test]
    fn a_hash_is_hex_sha256() {
        assert_eq!(crate::store::etcd::sha256_hex(b"").len(), 64);
    }
}
