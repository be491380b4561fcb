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
            // A client that stops reading must not hold up shutdown.
            tokio::select! {
                sent = tx.send(Ok(response)) => if sent.is_err() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ttl;
    use crate::validate::Register;
    use std::collections::BTreeMap;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn a_lagging_watcher_gets_a_fresh_snapshot() {
        let store = Store::new(Ttl::default());
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let mut stream = stream(store.clone(), BTreeSet::new(), stopped);
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.reset && first.events.is_empty());

        // Far more changes than the channel holds while the watcher cannot
        // run (this test never yields in between).
        let g = store.grant_lease(0).unwrap();
        let changes = CAPACITY + 100;
        for i in 0..changes {
            let instance = pb::Instance {
                service: "svc".into(),
                instance_id: format!("i{}", i % 50),
                host: "127.0.0.1".into(),
                port: 1,
                weight: 1 + u32::from((i / 50) % 2 == 1),
                ..Default::default()
            };
            store
                .register(Register {
                    lease_id: g.lease_id,
                    lease_secret: g.lease_secret.clone(),
                    instance,
                    descriptors: None,
                })
                .unwrap();
        }
        let (truth, revision) = store.resolve("svc");
        assert_eq!(revision, changes as u64);

        let mut copy = BTreeMap::new();
        let mut resets = 0;
        let mut seen = 0;
        while seen < revision {
            let message = stream.next().await.unwrap().unwrap();
            assert_eq!(message.registry_id, store.registry_id());
            if message.reset {
                resets += 1;
                copy.clear();
            }
            for e in message.events {
                let i = e.instance.unwrap();
                copy.insert(i.instance_id.clone(), i);
            }
            seen = message.revision;
        }
        assert!(resets >= 1, "the lagging watcher was reset");
        assert_eq!(copy.into_values().collect::<Vec<_>>(), truth);
    }

    #[tokio::test]
    async fn the_stream_ends_on_shutdown() {
        let store = Store::new(Ttl::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut stream = stream(store, BTreeSet::new(), stopped);
        assert!(stream.next().await.unwrap().unwrap().reset);
        stop.send(true).unwrap();
        assert!(stream.next().await.is_none());
    }
}
