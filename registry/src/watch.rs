//! The fan-out of changes to watchers.
//!
//! Every mutation publishes its events as one [`Batch`] on a tokio broadcast
//! channel, under the state lock, so batches arrive in revision order. A new
//! watcher takes its snapshot and subscribes under that same lock (see
//! [`Store::subscribe`]): the first batch it receives is the first change
//! after its snapshot, so there is no gap and no duplicate. Under the lock
//! the snapshot is only a cheap copy; its events are built after the lock
//! is released (`State::snapshot_copy`), so a new watcher of 100 000
//! instances holds up writers and heartbeats for about 10 ms, not 30-90.
//!
//! A watcher that falls more than [`CAPACITY`] batches behind (its client
//! reads too slowly) gets `Lagged` from the channel; it then starts over
//! with a fresh snapshot (a `reset` message) instead of the batches it
//! missed.
//!
//! A snapshot larger than [`SNAPSHOT_CHUNK_BYTES`] is cut into several
//! messages (`more` set on all but the last): one message holding 100 000
//! instances is over 10 MiB, more than gRPC clients accept by default.

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

/// About the largest snapshot message, in encoded bytes. Small enough for
/// any client's default limit (4 MiB in tonic and grpc-go), large enough
/// that the per-message overhead does not matter.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

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

/// The messages of one snapshot: `events` in messages of at most about
/// `chunk_bytes` each, the first with `reset`, all but the last with
/// `more`. An empty state is one empty message.
fn snapshot(
    events: Vec<Event>,
    revision: u64,
    registry_id: &str,
    chunk_bytes: usize,
) -> Vec<pb::WatchResponse> {
    let mut chunks: Vec<Vec<Event>> = vec![Vec::new()];
    let mut size = 0;
    for event in events {
        // The event plus its field tag and length prefix.
        let len = prost::Message::encoded_len(&event) + 6;
        if size + len > chunk_bytes && chunks.last().is_some_and(|c| !c.is_empty()) {
            chunks.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(event);
        }
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, events)| pb::WatchResponse {
            reset: i == 0,
            revision,
            events,
            registry_id: registry_id.to_string(),
            more: i < last,
        })
        .collect()
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
            let messages = snapshot(events, revision, &registry_id, SNAPSHOT_CHUNK_BYTES);
            (messages, receiver)
        };
        let (mut messages, mut receiver) = reset(&store);
        loop {
            // A client that stops reading must not hold up shutdown.
            for message in messages {
                tokio::select! {
                    sent = tx.send(Ok(message)) => if sent.is_err() { return },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            messages = tokio::select! {
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
                            Vec::new()
                        } else {
                            vec![pb::WatchResponse {
                                reset: false,
                                revision: batch.revision,
                                events,
                                registry_id: registry_id.clone(),
                                more: false,
                            }]
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "a watcher fell behind; sending it a fresh snapshot");
                        let (fresh, fresh_receiver) = reset(&store);
                        receiver = fresh_receiver;
                        fresh
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
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

    fn added(n: usize) -> Event {
        pb::Event {
            kind: pb::event::Kind::Added.into(),
            revision: n as u64 + 1,
            instance: Some(pb::Instance {
                service: "svc".into(),
                instance_id: format!("i{n:04}"),
                host: "10.0.0.1".into(),
                port: 1,
                weight: 1,
                ..Default::default()
            }),
            reason: 0,
        }
    }

    #[test]
    fn a_snapshot_is_cut_into_messages_that_together_hold_it_in_order() {
        let events: Vec<Event> = (0..1000).map(added).collect();
        let messages = snapshot(events.clone(), 1000, "reg", 4096);
        assert!(messages.len() > 5, "{} messages", messages.len());
        for (n, m) in messages.iter().enumerate() {
            assert_eq!(m.reset, n == 0, "only the first resets");
            assert_eq!(m.more, n + 1 < messages.len(), "all but the last say more");
            assert_eq!(m.revision, 1000);
            assert_eq!(m.registry_id, "reg");
            assert!(!m.events.is_empty());
            let size = prost::Message::encoded_len(m);
            assert!(size <= 4096 + 64, "message {n} is {size} B");
        }
        let joined: Vec<Event> = messages.into_iter().flat_map(|m| m.events).collect();
        assert_eq!(joined, events);
    }

    #[test]
    fn small_and_empty_snapshots_are_one_message_and_big_events_are_not_dropped() {
        let empty = snapshot(Vec::new(), 7, "reg", 4096);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].reset && !empty[0].more && empty[0].events.is_empty());
        let small = snapshot((0..3).map(added).collect(), 7, "reg", 4096);
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].events.len(), 3);
        // An event larger than the chunk still goes out, alone.
        let huge = snapshot((0..3).map(added).collect(), 7, "reg", 10);
        assert_eq!(huge.len(), 3);
        assert!(huge.iter().all(|m| m.events.len() == 1));
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
