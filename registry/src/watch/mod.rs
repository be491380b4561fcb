//! The fan-out of changes to watchers: a snapshot, then every change, with
//! memory bounded per watcher and in total, whatever the clients do.
//!
//! - [`encode`]: messages written straight to bytes, once for every
//!   watcher, each with its gRPC prefix, so the transport sends them as
//!   they are.
//! - [`hub`]: the log of encoded changes every watcher reads from, the
//!   shared snapshot jobs, the memory budget.
//! - this file: one watcher's stream, and the [`Watchers`] handle.
//!
//! The hub is the store's [`Publish`](crate::store::Publish) sink: the
//! store knows nothing of watchers, and this module depends on it, not the
//! reverse.
//!
//! # One watcher
//! Its stream is polled by the transport only when HTTP/2 has room for
//! more, and does its work then: it produces the next snapshot part, or
//! takes the next batch from the log. A client that stops reading stops
//! being polled and so costs what the transport already holds for it (a
//! message or two, see [`encode::MESSAGE_BYTES`]), its share of a job, and
//! a position in the log. A stream that is dropped (the client went away)
//! frees all of it at once: there is no task behind it.
//!
//! # Falling behind
//! A watcher whose position leaves the log (more than
//! [`WatchLimits::buffer_bytes`] of changes arrived since) has fallen
//! behind. The next time it is polled it gets a fresh snapshot (`reset`),
//! as the protocol promises. If it falls behind again before it has taken
//! that snapshot whole, it cannot keep up at all: its stream ends with
//! RESOURCE_EXHAUSTED naming `--watch-buffer-bytes`.

//!
//! # Resuming
//! A watcher whose stream broke may ask to resume after the last revision
//! it applied ([`Resume`]). The log keeps the last
//! [`WatchLimits::resume_bytes`] of changes even once every watcher took
//! them; if every change after that revision is still there (and the
//! registry id is this registry's), the new stream starts there, after one
//! message that says so; otherwise it starts with a snapshot.

pub mod encode;
pub mod hub;

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::Stream;
use support::CancellationToken;
use tonic::Status;

use crate::lease::Ttl;
use crate::limits::Quotas;
use crate::store::Store;
use encode::{Batch, Encoded};
use hub::{Charge, Hub, Job, Read, Services};
// The budgets live with the hub that enforces them (so the hub needs
// nothing from this module); named here, where the flags come from.
pub use hub::{
    DEFAULT_BUFFER_BYTES, DEFAULT_MEMORY_BYTES, DEFAULT_RESUME_BYTES, STREAM_CHARGE, WatchLimits,
};

// Where a resume points is read from the request, so it is defined where
// requests are checked; the watch only consumes it.
pub use crate::validate::Resume;

/// The store and the hub its changes go to. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Watchers {
    /// The registry.
    store: Store,
    /// Its fan-out.
    hub: Arc<Hub>,
}

impl Watchers {
    /// An empty registry whose changes are published to a new hub.
    pub fn new(ttl: Ttl, quotas: Quotas, limits: WatchLimits) -> Watchers {
        let mut hub = None;
        let store = Store::with_publisher(ttl, quotas, |registry_id| {
            let made = Arc::new(Hub::new(limits, registry_id));
            hub = Some(made.clone());
            made
        });
        let hub = hub.unwrap_or_else(|| Arc::new(Hub::new(limits, store.registry_id())));
        Watchers { store, hub }
    }

    /// [`Watchers::new`] for the registry `registry_id` (the etcd store's
    /// mirror: every replica sends watchers the same id).
    pub fn with_registry_id(
        ttl: Ttl,
        quotas: Quotas,
        limits: WatchLimits,
        registry_id: String,
    ) -> Watchers {
        let hub = Arc::new(Hub::new(limits, &registry_id));
        let publish = hub.clone();
        let store = Store::with_id(ttl, quotas, registry_id, move |_| publish);
        Watchers { store, hub }
    }

    /// The registry.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The hub (for its gauges).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The response stream of one Watch call: a reset with the current
    /// state of `services` (all when empty), then every change to them.
    /// It ends at [`Watchers::close`]. Refused with RESOURCE_EXHAUSTED
    /// when the watch memory budget is used up.
    pub fn open(
        &self,
        services: BTreeSet<String>,
    ) -> Result<impl Stream<Item = Result<Encoded, Status>> + Send + 'static, Status> {
        self.open_resumed(services, None)
    }

    /// Ends every stream opened, and any opened after (at shutdown).
    pub fn close(&self) {
        self.hub.close();
    }

    /// Calls [`Watchers::close`] once `shutdown` is cancelled (one task;
    /// the streams themselves only read a flag).
    pub fn close_on(&self, shutdown: CancellationToken) {
        let hub = self.hub.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            hub.close();
        });
    }

    /// As [`Watchers::open`], but when `resume` can be honoured (see
    /// [`Resume`]) the stream starts with a message that says so, then
    /// every change after it.
    pub fn open_resumed(
        &self,
        services: BTreeSet<String>,
        resume: Option<Resume>,
    ) -> Result<impl Stream<Item = Result<Encoded, Status>> + Send + 'static, Status> {
        let charge = self.hub.charge_stream()?;
        let mut watcher = Watcher {
            hub: self.hub.clone(),
            store: self.store.clone(),
            services: Arc::new(services),
            cursor: 0,
            registered: None,
            phase: Phase::Follow { pending: None },
            behind: false,
            done: false,
            accepted: None,
            skip_through: 0,
            _charge: charge,
        };
        let resumed = resume
            .filter(|r| r.revision > 0 && r.registry_id == self.store.registry_id())
            .is_some_and(|r| watcher.resume(r.revision));
        if !resumed {
            watcher.start()?;
        }
        Ok(futures::stream::unfold(watcher, |mut w| async move {
            w.next().await.map(|item| (item, w))
        }))
    }
}

/// Where a watcher is.
enum Phase {
    /// Sending part `part` of a snapshot next.
    Snapshot { job: Arc<Job>, part: usize },
    /// Following the log; `pending` is the rest of a batch being sent
    /// (the batch, and the position in it).
    Follow {
        pending: Option<(Arc<Batch>, usize)>,
    },
}

/// One watcher. See the module docs.
struct Watcher {
    hub: Arc<Hub>,
    store: Store,
    services: Services,
    /// Its position in the log: the next batch it takes.
    cursor: u64,
    /// The position the hub counts it at (until it leaves).
    registered: Option<u64>,
    phase: Phase,
    /// It fell behind and has not yet taken its fresh snapshot whole.
    behind: bool,
    /// Its stream has ended.
    done: bool,
    /// The message that says a resume was accepted, until sent.
    accepted: Option<Encoded>,
    /// Resumed after this revision: messages of the first batch it takes
    /// up to it were already applied (0: none to skip).
    skip_through: u64,
    /// Its share of the memory budget.
    _charge: Charge,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(at) = self.registered.take() {
            self.hub.leave(at);
        }
    }
}

impl Watcher {
    /// Starts (over) with a snapshot of the current state.
    fn start(&mut self) -> Result<(), Status> {
        let (job, cursor) = self.store.read(|state| {
            let held = std::time::Instant::now();
            let opened = self.hub.open_job(state, &self.services);
            crate::metrics::watch_open_locked(held.elapsed());
            opened
        })?;
        if let Some(old) = self.registered.replace(cursor) {
            self.hub.leave(old);
        }
        self.cursor = cursor;
        self.phase = Phase::Snapshot { job, part: 0 };
        self.skip_through = 0;
        Ok(())
    }

    /// Resumes after `revision` if the log still holds every change since.
    fn resume(&mut self, revision: u64) -> bool {
        let resumed = self.store.read(|state| {
            let held = std::time::Instant::now();
            let resumed = self.hub.resume(state.revision(), revision);
            crate::metrics::watch_open_locked(held.elapsed());
            resumed
        });
        let Some(cursor) = resumed else {
            return false;
        };
        self.registered = Some(cursor);
        self.cursor = cursor;
        self.skip_through = revision;
        let mut buf = encode::message_buf(0);
        self.accepted = Some(Encoded(encode::finish(
            &mut buf,
            false,
            revision,
            self.store.registry_id(),
            false,
        )));
        true
    }

    /// It fell behind: a fresh snapshot, or the end if that happened
    /// already while it was taking one.
    fn fell_behind(&mut self) -> Result<(), Status> {
        let limit = self.hub.limits().buffer_bytes;
        if self.behind {
            tracing::warn!(
                limit,
                "a watcher fell behind again during its fresh snapshot; ending its stream"
            );
            return Err(Status::resource_exhausted(format!(
                "this watcher fell more than {limit} bytes of changes behind \
                 (--watch-buffer-bytes), and again while it was taking the fresh snapshot \
                 it got for that: it reads too slowly to follow this registry"
            )));
        }
        tracing::info!(
            limit,
            "a watcher fell behind; it gets a fresh snapshot when it reads again"
        );
        self.behind = true;
        crate::metrics::get().watch_resets.inc();
        self.start()
    }

    /// The next message; `None` at the end.
    async fn next(&mut self) -> Option<Result<Encoded, Status>> {
        if self.done {
            return None;
        }
        let item = self.produce().await;
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }

    async fn produce(&mut self) -> Option<Result<Encoded, Status>> {
        if let Some(accepted) = self.accepted.take() {
            return Some(Ok(accepted));
        }
        loop {
            if self.hub.is_closed() {
                return None;
            }
            match &mut self.phase {
                Phase::Snapshot { job, part } => {
                    let produced = if self.hub.is_behind(self.cursor) {
                        None
                    } else {
                        job.part(*part)
                    };
                    let Some((bytes, last)) = produced else {
                        if let Err(status) = self.fell_behind() {
                            return Some(Err(status));
                        }
                        continue;
                    };
                    if last {
                        self.phase = Phase::Follow { pending: None };
                        self.behind = false;
                    } else {
                        *part += 1;
                    }
                    return Some(Ok(Encoded(bytes)));
                }
                Phase::Follow { pending } => {
                    if let Some((batch, at)) = pending.take() {
                        if let Some((message, next)) = batch.next_message(&self.services, at) {
                            *pending = Some((batch, next));
                            if self.skip_through > 0 && already_applied(&message, self.skip_through)
                            {
                                continue;
                            }
                            return Some(Ok(message));
                        }
                        self.skip_through = 0;
                        continue;
                    }
                    // Borrowed, not cloned: a thousand watchers woken
                    // together would contend for its reference count.
                    let hub = &*self.hub;
                    let appended = hub.appended();
                    if hub.is_closed() {
                        return None;
                    }
                    match hub.read(self.cursor) {
                        Read::Batch(batch) => {
                            // `read` moved it on in the hub's count.
                            self.cursor += 1;
                            self.registered = Some(self.cursor);
                            *pending = Some((batch, 0));
                        }
                        Read::Behind => {
                            drop(appended);
                            if let Err(status) = self.fell_behind() {
                                return Some(Err(status));
                            }
                        }
                        Read::Nothing => appended.await,
                    }
                }
            }
        }
    }
}

/// Whether a resumed watcher already applied `message` (its revision is at
/// or before the one it resumed after). Decodes it: only ever done for the
/// first batch after a resume.
fn already_applied(message: &Encoded, through: u64) -> bool {
    message.decode().is_ok_and(|m| m.revision <= through)
}

#[cfg(test)]
mod tests;
