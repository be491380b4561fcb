//! `WatchResponse` messages written straight to bytes, each with its gRPC
//! prefix, so the transport sends them as they are.
//!
//! A change is encoded once, when it is published, and every watcher sends
//! the same [`Bytes`]; a snapshot part likewise, once per snapshot job. So
//! the watch path never builds a `pb::WatchResponse`: it writes the fields
//! itself (tags of `registry.v1.WatchResponse`), the events first and the
//! scalar fields after them, which protobuf allows in any order (every
//! decoder merges fields as they come).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use registry_proto::registry::v1 as pb;
use tonic::Status;

use crate::state::Event;

/// About the largest message the watch path writes, in bytes: a snapshot
/// part or a part of a large batch of changes. Far under any client's
/// default limit (4 MiB in tonic and grpc-go), and small, because it is
/// also about what HTTP/2 holds for a stream whose peer does not read.
pub const MESSAGE_BYTES: usize = 64 * 1024;

/// Memory of a [`Batch`] besides its messages' bytes: the batch itself,
/// its vectors and the buffers' headers (estimated, for the budget).
const BATCH_OVERHEAD: usize = 256;
/// Memory of each event of a batch besides its bytes and service name.
const ENTRY_OVERHEAD: usize = 80;

/// Field numbers of `registry.v1.WatchResponse`.
const RESET: u32 = 1;
const REVISION: u32 = 2;
/// `WatchResponse.events`.
pub(crate) const EVENTS: u32 = 3;
const REGISTRY_ID: u32 = 4;
const MORE: u32 = 5;

/// Length of the gRPC prefix of a message on the wire: a compression flag
/// and the length (4 bytes, big-endian).
pub(crate) const PREFIX: usize = 5;

/// The most a message's own fields take after its events, the registry
/// id's bytes aside: reset and more (key and value, 2 each), the revision
/// (key and up to 10), the registry id's key and length (up to 11).
const TRAILER_BYTES: usize = 2 + 2 + 11 + 11;

/// What an event of `len` bytes takes inside a message: its key, its
/// length and itself.
fn framed_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// One `WatchResponse`, already encoded, with its gRPC prefix: the bytes
/// the transport sends as they are (see [`crate::service::WithWatch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(pub Bytes);

impl Encoded {
    /// The message it holds (for callers that want the struct).
    pub fn decode(&self) -> Result<pb::WatchResponse, Status> {
        let message = self
            .0
            .get(PREFIX..)
            .ok_or_else(|| Status::internal("a watch message is shorter than its gRPC prefix"))?;
        pb::WatchResponse::decode(message)
            .map_err(|e| Status::internal(format!("a watch message does not decode: {e}")))
    }
}

/// A buffer for one message: room for `capacity` bytes, its gRPC prefix
/// reserved (written by [`finish`]).
pub(crate) fn message_buf(capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(PREFIX + capacity);
    buf.put_bytes(0, PREFIX);
    buf
}

/// Ends a message whose events were written into `buf` (made by
/// [`message_buf`]): appends its scalar fields (omitting those at their
/// default, as prost does), writes its gRPC prefix, and splits it off as
/// [`Bytes`]. `buf` is left empty.
pub(crate) fn finish(
    buf: &mut BytesMut,
    reset: bool,
    revision: u64,
    registry_id: &str,
    more: bool,
) -> Bytes {
    debug_assert!(buf.len() >= PREFIX, "a message buffer has its prefix");
    if reset {
        encode_key(RESET, WireType::Varint, buf);
        encode_varint(1, buf);
    }
    if revision != 0 {
        encode_key(REVISION, WireType::Varint, buf);
        encode_varint(revision, buf);
    }
    if !registry_id.is_empty() {
        encode_key(REGISTRY_ID, WireType::LengthDelimited, buf);
        encode_varint(registry_id.len() as u64, buf);
        buf.put_slice(registry_id.as_bytes());
    }
    if more {
        encode_key(MORE, WireType::Varint, buf);
        encode_varint(1, buf);
    }
    // Messages are at most a few MESSAGE_BYTES: the length always fits.
    let len = u32::try_from(buf.len().saturating_sub(PREFIX)).unwrap_or(u32::MAX);
    if let Some(prefix) = buf.get_mut(..PREFIX) {
        prefix[0] = 0; // not compressed
        prefix[1..].copy_from_slice(&len.to_be_bytes());
    }
    buf.split().freeze()
}

/// One published change, encoded as a `WatchResponse.events` entry.
#[derive(Debug)]
struct Entry {
    /// The service it concerns (for watchers of some services only).
    service: String,
    /// Its revision.
    revision: u64,
    /// Field tag, length and the encoded `Event`: a slice of one of the
    /// batch's messages, not a copy.
    bytes: Bytes,
}

/// The events of one mutation, encoded once for every watcher.
#[derive(Debug)]
pub struct Batch {
    /// The registry's revision after the mutation.
    revision: u64,
    /// The whole batch as messages (one unless it is over
    /// [`MESSAGE_BYTES`]): what a watcher of everything sends.
    messages: Vec<Bytes>,
    /// Each event, for watchers of some services only.
    entries: Vec<Entry>,
    /// Size of `messages`.
    bytes: usize,
    /// For the messages built for filtered watchers.
    registry_id: RegistryId,
}

impl Batch {
    /// Encodes `events` (of the mutation that left the registry at
    /// `revision`).
    pub(crate) fn encode(revision: u64, events: &[Event], registry_id: &RegistryId) -> Batch {
        // Each event's length, computed once: it decides where a message
        // ends, prefixes the event, and sizes the buffer, which is then
        // written without growing (a registration's batch used to grow it
        // several times, and `message::encode` measured each event again).
        let lens: Vec<usize> = events.iter().map(Message::encoded_len).collect();
        let framed: usize = lens.iter().map(|&len| framed_len(len)).sum();
        let messages_at_least = framed / MESSAGE_BYTES + 1;
        let per_message = PREFIX + TRAILER_BYTES + registry_id.len();
        let mut buf = message_buf(framed + messages_at_least * per_message);
        let mut messages = Vec::with_capacity(messages_at_least);
        let mut entries = Vec::with_capacity(events.len());
        // (service, revision, range in `buf`) of the current message.
        let mut open: Vec<(String, u64, std::ops::Range<usize>)> = Vec::new();
        let mut close = |buf: &mut BytesMut, open: &mut Vec<_>, revision: u64| {
            let message = finish(buf, false, revision, registry_id, false);
            for (service, revision, range) in open.drain(..) {
                entries.push(Entry {
                    service,
                    revision,
                    bytes: message.slice(range),
                });
            }
            messages.push(message);
        };
        for (event, &len) in events.iter().zip(&lens) {
            if !open.is_empty() && buf.len() + len > MESSAGE_BYTES {
                let last = open.last().map_or(revision, |(_, r, _)| *r);
                close(&mut buf, &mut open, last);
                // The next message starts in what is left of the buffer.
                buf.put_bytes(0, PREFIX);
            }
            let start = buf.len();
            // What `prost::encoding::message::encode` writes, with the
            // length already known.
            encode_key(EVENTS, WireType::LengthDelimited, &mut buf);
            encode_varint(len as u64, &mut buf);
            event.encode_raw(&mut buf);
            let service = event
                .instance
                .as_ref()
                .map(|i| i.service.clone())
                .unwrap_or_default();
            open.push((service, event.revision, start..buf.len()));
        }
        close(&mut buf, &mut open, revision);
        let bytes = messages.iter().map(Bytes::len).sum();
        Batch {
            revision,
            messages,
            entries,
            bytes,
            registry_id: registry_id.clone(),
        }
    }

    /// The registry's revision after it.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// What it takes in memory, as it counts against the buffer budget:
    /// its messages and, per batch and per event, the bookkeeping around
    /// them (allocations, the service name), estimated.
    pub(crate) fn bytes(&self) -> usize {
        BATCH_OVERHEAD
            + self.bytes
            + self
                .entries
                .iter()
                .map(|e| ENTRY_OVERHEAD + e.service.len())
                .sum::<usize>()
    }

    /// The next message of this batch for a watcher of `services` (all
    /// when empty), starting at position `from` (0 at first); with the
    /// position after it. `None` when nothing more is for this watcher.
    ///
    /// A watcher of everything, or of services that every event concerns,
    /// gets the shared messages; any other builds its own from the shared
    /// entries (copied, not encoded again).
    pub(crate) fn next_message(
        &self,
        services: &BTreeSet<String>,
        from: usize,
    ) -> Option<(Encoded, usize)> {
        let all = services.is_empty() || self.entries.iter().all(|e| services.contains(&e.service));
        if all {
            return self
                .messages
                .get(from)
                .map(|m| (Encoded(m.clone()), from + 1));
        }
        let wanted = |e: &Entry| services.contains(&e.service);
        let mut at = from + self.entries.get(from..)?.iter().position(wanted)?;
        let mut buf = message_buf(0);
        let mut revision = 0;
        while let Some(entry) = self.entries.get(at) {
            if !wanted(entry) {
                at += 1;
                continue;
            }
            if buf.len() > PREFIX && buf.len() + entry.bytes.len() > MESSAGE_BYTES {
                break;
            }
            buf.put_slice(&entry.bytes);
            revision = entry.revision;
            at += 1;
        }
        // Nothing more for this watcher in the batch: it is then at the
        // batch's revision, whatever the last events it got.
        if !self.entries[at..].iter().any(wanted) {
            revision = self.revision;
            at = self.entries.len();
        }
        let message = finish(&mut buf, false, revision, &self.registry_id, false);
        Some((Encoded(message), at))
    }
}

/// The registry's id, written in every message: one copy per hub.
pub(crate) type RegistryId = Arc<str>;

#[cfg(test)]
mod tests {
    use super::*;

    fn event(service: &str, n: u64, label: usize) -> Event {
        pb::Event {
            kind: pb::event::Kind::Added.into(),
            revision: n,
            instance: Some(pb::Instance {
                service: service.into(),
                instance_id: format!("i{n:04}"),
                host: "10.0.0.1".into(),
                port: 1,
                weight: Some(1),
                metadata: [("k".to_string(), "v".repeat(label))].into(),
                ..Default::default()
            }),
            reason: 0,
        }
    }

    fn decode(m: &Encoded) -> pb::WatchResponse {
        m.decode().unwrap()
    }

    fn all_messages(batch: &Batch, services: &BTreeSet<String>) -> Vec<pb::WatchResponse> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((m, next)) = batch.next_message(services, at) {
            out.push(decode(&m));
            at = next;
        }
        out
    }

    #[test]
    fn a_batch_decodes_to_the_message_prost_would_send() {
        let events: Vec<Event> = (1..=3).map(|n| event("a", n, 10)).collect();
        let batch = Batch::encode(3, &events, &"reg".into());
        let got = all_messages(&batch, &BTreeSet::new());
        let expected = pb::WatchResponse {
            reset: false,
            revision: 3,
            events,
            registry_id: "reg".into(),
            more: false,
        };
        assert_eq!(got, [expected]);
        // A watcher of a service every event concerns shares the bytes.
        let only_a: BTreeSet<String> = ["a".to_string()].into();
        let (shared, _) = batch.next_message(&only_a, 0).unwrap();
        assert_eq!(shared.0.as_ptr(), batch.messages[0].as_ptr());
    }

    #[test]
    fn a_large_batch_is_cut_into_messages_and_filtered_watchers_get_theirs() {
        // 40 events of about 4 KiB: more than two messages' worth.
        let events: Vec<Event> = (1..=40)
            .map(|n| event(if n % 3 == 0 { "b" } else { "a" }, n, 4000))
            .collect();
        let batch = Batch::encode(40, &events, &"reg".into());
        let all = all_messages(&batch, &BTreeSet::new());
        assert!(all.len() >= 3, "{} messages", all.len());
        for m in &all {
            assert!(prost::Message::encoded_len(m) <= MESSAGE_BYTES + 64);
            assert_eq!(m.registry_id, "reg");
            assert!(!m.reset && !m.more);
            assert_eq!(m.revision, m.events.last().unwrap().revision);
        }
        let joined: Vec<Event> = all.iter().flat_map(|m| m.events.clone()).collect();
        assert_eq!(joined, events);

        let only_b: BTreeSet<String> = ["b".to_string()].into();
        let b = all_messages(&batch, &only_b);
        let got: Vec<Event> = b.iter().flat_map(|m| m.events.clone()).collect();
        let want: Vec<Event> = events
            .iter()
            .filter(|e| e.instance.as_ref().unwrap().service == "b")
            .cloned()
            .collect();
        assert_eq!(got, want);
        assert!(b.iter().all(|m| m.registry_id == "reg"));
        // The last message brings the watcher to the batch's revision even
        // though the batch's last event (40) is not one of its own.
        assert_eq!(b.last().unwrap().revision, 40);
        let none: BTreeSet<String> = ["zz".to_string()].into();
        assert!(batch.next_message(&none, 0).is_none());
    }

    #[test]
    fn finish_writes_what_prost_reads() {
        let mut buf = message_buf(0);
        let m = finish(&mut buf, true, 7, "reg", true);
        assert_eq!(m[0], 0, "not compressed");
        let len = u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
        assert_eq!(len, m.len() - PREFIX, "the prefix holds the length");
        let decoded = pb::WatchResponse::decode(&m[PREFIX..]).unwrap();
        assert_eq!(
            decoded,
            pb::WatchResponse {
                reset: true,
                revision: 7,
                events: Vec::new(),
                registry_id: "reg".into(),
                more: true,
            }
        );
    }
}
