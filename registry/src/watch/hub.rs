//! The log of published changes that every watcher reads from, the shared
//! snapshot jobs, and the registry-wide memory budget of the watch path.
//!
//! # The log
//! Each mutation's events are encoded once ([`Batch`]) and appended to one
//! log, under the store's lock (so in revision order). A watcher is only a
//! position in that log: nothing is queued per watcher. The log keeps a
//! batch only while some watcher has yet to take it, and at most
//! [`WatchLimits::buffer_bytes`] of batches (counted with what they take in
//! memory, `Batch::bytes`); beyond that the oldest are dropped, and a
//! watcher whose position was dropped has *fallen behind*: it is more than
//! that many bytes of changes behind, and starts over with a fresh
//! snapshot. So the log's memory is bounded whatever the watchers do, a
//! slow watcher costs nothing, and with every watcher caught up (or none)
//! the log holds nothing.
//!
//! # Snapshot jobs
//! A new watcher needs the state as of its revision. A [`Job`] holds a copy
//! of it (taken under the store's lock) and produces its messages one part
//! at a time, as watchers ask for them; the last few parts are kept, so
//! watchers of the same services at the same revision (a hundred clients
//! reconnecting together) share one copy and one encoding. A job whose
//! revision the log no longer reaches is of no use (its watchers fell
//! behind): it is killed, its copy freed, even if its watchers are never
//! polled again.
//!
//! # The memory budget
//! [`WatchLimits::memory_bytes`] bounds the rest: each open stream is
//! charged [`STREAM_CHARGE`] for what HTTP/2 may hold for it, and each job
//! its copy and its cached parts. A Watch that would go over it is
//! refused with RESOURCE_EXHAUSTED, naming the flag.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use bytes::Bytes;
use tokio::sync::Notify;
use tonic::Status;

use crate::state::{Event, Position, SnapshotCopy, State};
use crate::store::Publish;
use crate::watch::encode::{Batch, EVENTS, MESSAGE_BYTES, RegistryId, finish, message_buf};

/// Default of `--watch-buffer-bytes`: how far (in encoded bytes of
/// changes) a watcher may lag before it is reset. A few seconds of heavy
/// churn; a client that reads at all keeps up.
pub const DEFAULT_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Default of `--watch-memory-bytes`: what all watchers together may hold
/// (4096 open streams at [`STREAM_CHARGE`] each, or fewer with snapshots
/// in progress).
pub const DEFAULT_MEMORY_BYTES: usize = 2 * 1024 * 1024 * 1024;
/// What each open Watch stream is charged against `--watch-memory-bytes`:
/// the most HTTP/2 holds for a stream whose peer does not read (hyper's
/// 400 KiB send buffer, and a message in hand), plus its own state.
pub const STREAM_CHARGE: usize = 512 * 1024;
/// Default of `--watch-resume-bytes`: how much of the changes every
/// watcher already took the log still keeps, so a watcher whose stream
/// broke can resume from its last revision (a second or so of heavy
/// churn) instead of taking a fresh snapshot.
pub const DEFAULT_RESUME_BYTES: usize = 256 * 1024;

/// The watch path's budgets (flags of the `registry` binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    /// `--watch-buffer-bytes`: changes a watcher may lag by, in bytes,
    /// before it falls behind; also the most the log of changes holds.
    pub buffer_bytes: usize,
    /// `--watch-memory-bytes`: what all watchers together may hold.
    pub memory_bytes: usize,
    /// `--watch-resume-bytes`: changes kept after every watcher took them,
    /// for watchers that resume (within `buffer_bytes`).
    pub resume_bytes: usize,
}

impl Default for WatchLimits {
    fn default() -> WatchLimits {
        WatchLimits {
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            resume_bytes: DEFAULT_RESUME_BYTES,
        }
    }
}

/// Parts of a snapshot kept for the watchers that follow the first one.
pub const JOB_CACHED_PARTS: usize = 4;

/// The services a watcher follows (all when empty).
pub(crate) type Services = Arc<BTreeSet<String>>;

/// What a watcher finds at its position in the log.
#[derive(Debug)]
pub(crate) enum Read {
    /// The batch at that position.
    Batch(Arc<Batch>),
    /// Nothing yet.
    Nothing,
    /// The position was dropped: the watcher fell behind.
    Behind,
}

/// The registry-wide memory budget of the watch path.
#[derive(Debug)]
pub(crate) struct Memory {
    /// Bytes charged now.
    used: AtomicUsize,
    /// `--watch-memory-bytes`.
    max: usize,
}

/// Bytes charged to the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    memory: Arc<Memory>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.memory.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Memory {
    /// Charges `bytes`, or says why not (naming the flag).
    fn charge(self: &Arc<Self>, bytes: usize, what: &str) -> Result<Charge, Status> {
        let max = self.max;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= max)
            })
            .map(|_| Charge {
                memory: self.clone(),
                bytes,
            })
            .map_err(|used| {
                Status::resource_exhausted(format!(
                    "watch memory: {what} needs {bytes} bytes, and {used} of the {max} bytes \
                     watchers may use are taken (--watch-memory-bytes)"
                ))
            })
    }
}

/// The fan-out hub. See the module docs.
#[derive(Debug)]
pub struct Hub {
    /// The log and the jobs. A std mutex: every section is short and never
    /// awaits. Taken after the store's lock when both are held.
    log: Mutex<Log>,
    /// Woken on every append, and at [`Hub::close`].
    appended: Notify,
    /// Set by [`Hub::close`]: every stream ends. An atomic, not a token
    /// each watcher polls: a token's check takes a lock that a thousand
    /// watchers woken together contend for (it was a tenth of the
    /// registry's samples in `perf` at 1000 watchers).
    closed: AtomicBool,
    /// The budgets.
    limits: WatchLimits,
    /// Written in every message.
    registry_id: RegistryId,
    /// The registry-wide budget.
    memory: Arc<Memory>,
}

#[derive(Debug, Default)]
struct Log {
    /// Batches, oldest first.
    entries: VecDeque<Arc<Batch>>,
    /// Position of `entries[0]`.
    first: u64,
    /// Size of `entries`.
    bytes: usize,
    /// Snapshot jobs by (log position of their revision, services).
    jobs: BTreeMap<(u64, Services), Weak<Job>>,
    /// The positions of the watchers that have not fallen behind, with how
    /// many are at each: a batch before the lowest is of use to nobody.
    readers: BTreeMap<u64, usize>,
    /// When `jobs` is next swept of finished jobs.
    sweep_jobs_at: usize,
    /// The revision through which changes left the log (or at which it
    /// started): a watcher may resume from any revision at or after it.
    base: u64,
}

impl Log {
    /// The position the next batch will have.
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// A watcher is now at `at`.
    fn enter(&mut self, at: u64) {
        *self.readers.entry(at).or_default() += 1;
    }

    /// A watcher is no longer at `at` (nothing if it was forgotten when it
    /// fell behind).
    fn leave(&mut self, at: u64) {
        if let Some(count) = self.readers.get_mut(&at) {
            *count -= 1;
            if *count == 0 {
                self.readers.remove(&at);
            }
        }
    }

    /// Drops the batches nobody needs any more (but the last `retain`
    /// bytes of them, for watchers that resume), then the oldest while over
    /// `budget` (keeping the last). Returns whether any watcher lost its
    /// place.
    fn trim(&mut self, budget: usize, retain: usize) -> bool {
        let needed = self.readers.keys().next().copied().unwrap_or(u64::MAX);
        let mut lost = false;
        while let Some(front) = self.entries.front() {
            let unread = self.first >= needed;
            let keep = unread || self.bytes <= retain;
            if keep && (self.bytes <= budget || self.entries.len() == 1) {
                break;
            }
            self.base = self.base.max(front.revision());
            self.bytes -= front.bytes();
            self.entries.pop_front();
            self.first += 1;
            lost |= unread;
        }
        if lost {
            // Those watchers fell behind; they are counted again (elsewhere)
            // when they start over.
            let first = self.first;
            self.readers = self.readers.split_off(&first);
        }
        lost
    }
}

impl Hub {
    /// A hub for the registry `registry_id`, with no watcher yet.
    pub fn new(limits: WatchLimits, registry_id: &str) -> Hub {
        Hub {
            log: Mutex::new(Log::default()),
            appended: Notify::new(),
            closed: AtomicBool::new(false),
            memory: Arc::new(Memory {
                used: AtomicUsize::new(0),
                max: limits.memory_bytes,
            }),
            limits,
            registry_id: registry_id.into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The budgets.
    pub(crate) fn limits(&self) -> &WatchLimits {
        &self.limits
    }

    /// Bytes charged to the memory budget now.
    pub fn memory_used(&self) -> usize {
        self.memory.used.load(Ordering::Acquire)
    }

    /// Bytes of changes the log holds now.
    pub fn log_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Charges one more open stream.
    pub(crate) fn charge_stream(&self) -> Result<Charge, Status> {
        self.memory.charge(STREAM_CHARGE, "one more Watch stream")
    }

    /// Resolves on the next append or at [`Hub::close`]. Create it
    /// before checking [`Hub::is_closed`] and calling [`Hub::read`], so
    /// neither is missed in between.
    pub(crate) fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.appended.notified()
    }

    /// Ends every stream, at its next poll (those waiting are woken).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.appended.notify_waiters();
    }

    /// Whether [`Hub::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// What is at log position `at`; a watcher that takes a batch moves
    /// on to `at + 1`.
    pub(crate) fn read(&self, at: u64) -> Read {
        let mut log = self.lock();
        if at < log.first {
            return Read::Behind;
        }
        let index = usize::try_from(at - log.first).unwrap_or(usize::MAX);
        let Some(batch) = log.entries.get(index).cloned() else {
            return Read::Nothing;
        };
        log.leave(at);
        log.enter(at + 1);
        log.trim(self.limits.buffer_bytes, self.limits.resume_bytes);
        Read::Batch(batch)
    }

    /// A watcher at `at` goes away (or starts over elsewhere).
    pub(crate) fn leave(&self, at: u64) {
        let mut log = self.lock();
        log.leave(at);
        log.trim(self.limits.buffer_bytes, self.limits.resume_bytes);
    }

    /// Where a watcher resuming after `revision` starts in the log (and
    /// counts it there), or `None` if changes after it left the log or it
    /// is ahead of `now` (the registry's revision). Call under the store's
    /// lock, so that no batch is appended in between.
    pub(crate) fn resume(&self, now: u64, revision: u64) -> Option<u64> {
        let mut log = self.lock();
        if revision < log.base || revision > now {
            return None;
        }
        let taken = log
            .entries
            .iter()
            .take_while(|batch| batch.revision() <= revision)
            .count();
        let at = log.first + taken as u64;
        log.enter(at);
        Some(at)
    }

    /// Whether position `at` was dropped from the log.
    pub(crate) fn is_behind(&self, at: u64) -> bool {
        at < self.lock().first
    }

    /// The snapshot job for `services` at `state`'s revision (shared with
    /// any watcher that asked for the same at the same revision), and the
    /// log position of the first change after it. Call under the store's
    /// lock, so that no batch is appended in between.
    pub(crate) fn open_job(
        &self,
        state: &State,
        services: &Services,
    ) -> Result<(Arc<Job>, u64), Status> {
        let at = {
            let log = self.lock();
            let at = log.end();
            let shared = log
                .jobs
                .get(&(at, services.clone()))
                .and_then(Weak::upgrade)
                .filter(|job| !job.is_killed());
            if let Some(job) = shared {
                drop(log);
                self.lock().enter(at);
                return Ok((job, at));
            }
            at
        };
        // The copy outside the log's lock: watchers keep reading meanwhile
        // (the store's lock keeps appends out).
        let copy = state.snapshot_copy(services);
        let charge = self.memory.charge(
            copy.footprint() + JOB_CACHED_PARTS * MESSAGE_BYTES,
            "a snapshot",
        )?;
        let job = Arc::new(Job::new(
            copy,
            state.revision(),
            self.registry_id.clone(),
            charge,
        ));
        let mut log = self.lock();
        if log.jobs.len() >= log.sweep_jobs_at {
            log.jobs.retain(|_, job| job.strong_count() > 0);
            log.sweep_jobs_at = (2 * log.jobs.len()).max(64);
        }
        log.jobs
            .insert((at, services.clone()), Arc::downgrade(&job));
        log.enter(at);
        Ok((job, at))
    }
}

impl Publish for Hub {
    fn start(&self, revision: u64) {
        let mut log = self.lock();
        log.base = log.base.max(revision);
    }

    fn publish(&self, revision: u64, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let batch = Arc::new(Batch::encode(revision, &events, &self.registry_id));
        let dead = {
            let mut log = self.lock();
            log.bytes += batch.bytes();
            log.entries.push_back(batch);
            if log.trim(self.limits.buffer_bytes, self.limits.resume_bytes) {
                // Jobs before the log's start: every watcher of theirs
                // fell behind.
                let first = log.first;
                let keep = log.jobs.split_off(&(first, Services::default()));
                std::mem::replace(&mut log.jobs, keep)
            } else {
                BTreeMap::new()
            }
        };
        for job in dead.values().filter_map(Weak::upgrade) {
            job.kill();
        }
        self.appended.notify_waiters();
    }
}

/// The messages of one snapshot, produced lazily and shared. See the
/// module docs.
#[derive(Debug)]
pub(crate) struct Job {
    /// The revision of the state it copies.
    revision: u64,
    /// Written in every part.
    registry_id: RegistryId,
    /// The copy and what was produced of it.
    inner: Mutex<JobInner>,
}

#[derive(Debug)]
struct JobInner {
    /// The state being sent; `None` once killed.
    copy: Option<SnapshotCopy>,
    /// Where each part produced so far starts in `copy` (and the next one).
    starts: Vec<Position>,
    /// How many parts there are, once the last was produced.
    parts: Option<usize>,
    /// The last parts produced, by number.
    cache: VecDeque<(usize, Bytes)>,
    /// The job's share of the memory budget.
    _charge: Option<Charge>,
}

impl Job {
    fn new(copy: SnapshotCopy, revision: u64, registry_id: RegistryId, charge: Charge) -> Job {
        Job {
            revision,
            registry_id,
            inner: Mutex::new(JobInner {
                copy: Some(copy),
                starts: vec![Position::default()],
                parts: None,
                cache: VecDeque::new(),
                _charge: Some(charge),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, JobInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_killed(&self) -> bool {
        self.lock().copy.is_none()
    }

    /// Frees the copy: its watchers fell behind.
    fn kill(&self) {
        let mut inner = self.lock();
        inner.copy = None;
        inner.cache.clear();
        inner._charge = None;
    }

    /// Part `n` (the first has `reset`, all but the last `more`), and
    /// whether it is the last. `None` if the job was killed (or `n` is past
    /// what a watcher can ask for).
    pub(crate) fn part(&self, n: usize) -> Option<(Bytes, bool)> {
        let mut inner = self.lock();
        let last = |inner: &JobInner| inner.parts == Some(n + 1);
        if let Some((_, bytes)) = inner.cache.iter().find(|(i, _)| *i == n) {
            return Some((bytes.clone(), last(&inner)));
        }
        let from = inner.starts.get(n)?;
        let copy = inner.copy.as_ref()?;
        let mut buf = message_buf(MESSAGE_BYTES + 2048);
        let next = copy.encode_events(from, MESSAGE_BYTES, EVENTS, &mut buf);
        let is_last = next.is_none();
        let bytes = finish(&mut buf, n == 0, self.revision, &self.registry_id, !is_last);
        match next {
            None => inner.parts = Some(n + 1),
            Some(next) if inner.starts.len() == n + 1 => inner.starts.push(next),
            Some(_) => {}
        }
        inner.cache.push_back((n, bytes.clone()));
        if inner.cache.len() > JOB_CACHED_PARTS {
            inner.cache.pop_front();
        }
        Some((bytes, is_last))
    }
}
