//! The fan-out of changes to watchers.
//!
//! Every mutation publishes its events as one [`Batch`] on a tokio broadcast
//! channel, under the state lock, so batches arrive in revision order. A new
//! watcher takes its snapshot and subscribes under that same lock (see
//! [`Store::subscribe`]): the first batch it receives is the first change
//! after its snapshot, so there is no gap and no duplicate.
//!
//! A watcher that falls more than [`CAPACITY`] batches behind (its client
//! reads too slowly) gets `Lagged` from the channel; it then starts over
//! with a fresh snapshot (a `reset` message) instead of the batches it
//! missed.

use std::collections::BTreeSet;
use std::sync::Arc;

use registry_proto::registry::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::state::Event;
use crate::store::Store;

/// How many batches a watcher may fall behind before it is reset.
pub const CAPACITY: usize = 4096;

/// The events of one mutation.
#[derive(Debug)]
pub struct Batch {
    /// The registry's revision after the mutation.
    pub revision: u64,
    /// What changed, in revision order.
    pub events: Vec<Event>,
}

/// The broadcast side.
#[derive(Debug)]
pub struct Hub {
    /// Shared by every watcher; batches are `Arc`'d so fan-out copies a
    /// pointer, not the events.
    sender: broadcast::Sender<Arc<Batch>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// A hub with no watcher.
    pub fn new() -> Hub {
        Hub {
            sender: broadcast::channel(CAPACITY).0,
        }
    }

    /// Sends a batch to every watcher (nothing if `events` is empty).
    /// Call with the state lock held, to keep revision order.
    pub fn publish(&self, revision: u64, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        // An error only means nobody is watching.
        let _ = self.sender.send(Arc::new(Batch { revision, events }));
    }

    /// A receiver of every batch published from now on.
    /// Call with the state lock held, together with taking a snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.sender.subscribe()
    }
}

/// Whether an event concerns one of `services` (all when empty).
fn wanted(services: &BTreeSet<String>, event: &Event) -> bool {
    services.is_empty()
        || event
            .instance
            .as_ref()
            .is_some_and(|i| services.contains(&i.service))
}

/// The response stream of one Watch call: a reset with the current state of
/// `services` (all when empty), then every change to them. It ends when the
/// client goes away or `shutdown` turns true.
pub fn stream(
    store: Store,
    services: BTreeSet<String>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> ReceiverStream<Result<pb::WatchResponse, Status>> {
    // A small buffer: a slow client makes the broadcast lag (and then
    // reset) instead of growing this queue without bound.
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let registry_id = store.registry_id().to_string();
        let reset = |store: &Store| {
            let (events, revision, receiver) = store.subscribe(&services);
            let response = pb::WatchResponse {
                reset: true,
                revision,
                events,
                registry_id: registry_id.clone(),
            };
            (response, receiver)
        };
        let (first, mut receiver) = reset(&store);
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            let response = tokio::select! {
                _ = tx.closed() => return,
                _ = shutdown.wait_for(|stop| *stop) => return,
                received = receiver.recv() => match received {
                    Ok(batch) => {
                        let events: Vec<Event> = batch
                            .events
                            .iter()
                            .filter(|e| wanted(&services, e))
                            .cloned()
                            .collect();
                        if events.is_empty() {
                            continue;
                        }
                        pb::WatchResponse {
                            reset: false,
                            revision: batch.revision,
                            events,
                            registry_id: registry_id.clone(),
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "a watcher fell behind; sending it a fresh snapshot");
                        let (response, fresh) = reset(&store);
                        receiver = fresh;
                        response
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
