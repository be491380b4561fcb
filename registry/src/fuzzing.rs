//! Fuzzing entry point: arbitrary bytes as a sequence of registry requests,
//! run through validation and the state machine, with the invariants the
//! protocol promises checked after every step. The `registry_requests`
//! cargo-fuzz target calls [`requests`], and `tests/fuzz_corpus.rs` replays
//! the committed corpus through it, so both run the same code.
//!
//! # Input format
//! A sequence of operations, each `[op] [len: u8] [len bytes]`:
//! - `op & 0x07` picks the request: 0 GrantLease, 1 Register, 2 Update,
//!   3 Deregister, 4 KeepAlive, 5 RevokeLease, 6 Watch/Resolve/GetDescriptors,
//!   7 time passes (`len` * 50 ms) or, with bit 3, a KeepAlive stream ends.
//! - the `len` bytes are the request as protobuf (prost) bytes;
//! - `op & 0x40` replaces the decoded `lease_id` by that of the lease granted
//!   `(op >> 3) & 0x07`-th (mod the leases granted), and `op & 0x80` its
//!   secret by the real one, so the fuzzer reaches the paths past ownership
//!   checks without guessing 128-bit secrets.
//!
//! A `file_descriptor_set` of exactly `calc` or `echo` stands for the real
//! calculator or echo descriptors (a valid set is too big to be found by
//! mutation).
//!
//! Panics (that is: fuzzer crashes) on any broken invariant.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use prost_reflect::prost::Message;
use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::event::Kind;
use tokio::time::Instant;

use crate::error::Error;
use crate::lease::Ttl;
use crate::limits::Quotas;
use crate::state::{Event, Granted, State};
use crate::validate::{self, Limits};

/// Most operations run per input: keeps every run fast.
const MAX_OPS: usize = 256;

/// Limits low enough for the fuzzer to reach them.
fn limits() -> Limits {
    Limits {
        leases: 8,
        instances: 32,
        descriptor_bytes: registry_proto::CALCULATOR_DESCRIPTORS.len()
            + registry_proto::ECHO_DESCRIPTORS.len() / 2,
    }
}

/// Quotas low enough for the fuzzer to reach them.
const QUOTAS: Quotas = Quotas {
    instances_per_lease: 6,
    instances_per_service: 10,
};

/// The harness: the state, what was granted, and a replica built only from
/// the events, which must always equal the state's snapshot.
struct Harness {
    state: State,
    start: Instant,
    now_ms: u64,
    granted: Vec<Granted>,
    replica: BTreeMap<(String, String), pb::Instance>,
    last_revision: u64,
    /// A GetDescriptors answer still being sent while later requests run.
    in_flight: Option<Arc<[u8]>>,
}

/// Runs `data` as a sequence of requests; panics on a broken invariant.
pub fn requests(data: &[u8]) {
    run(data);
}

/// [`requests`], returning the harness so tests can look at the outcome.
fn run(data: &[u8]) -> Harness {
    let start = Instant::now();
    let mut state = State::with_limits(Ttl::default(), limits());
    state.set_quotas(QUOTAS);
    let mut h = Harness {
        state,
        start,
        now_ms: 0,
        granted: Vec::new(),
        replica: BTreeMap::new(),
        last_revision: 0,
        in_flight: None,
    };
    let mut rest = data;
    let mut ops = 0;
    while let [op, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (chunk, after) = tail.split_at(len);
        rest = after;
        h.step(*op, chunk);
        h.check();
        ops += 1;
        if ops >= MAX_OPS {
            break;
        }
    }
    h
}

/// Errors the state may return for a request that passed validation: all
/// about leases, ownership and limits, never about the request's shape.
fn check_state_error(what: &str, e: &Error) {
    assert!(
        !matches!(e, Error::Invalid { .. }),
        "{what}: validated request refused as invalid by the state: {e}"
    );
    assert!(!e.to_string().is_empty(), "{what}: empty error message");
    assert!(
        !matches!(e.code(), tonic::Code::Internal | tonic::Code::Unknown),
        "{what}: internal error {e}"
    );
}

fn check_invalid(what: &str, e: &Error) {
    assert!(
        matches!(e, Error::Invalid { .. }),
        "{what}: validation failed with a non-validation error {e:?}"
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
    assert!(!e.to_string().is_empty(), "{what}: empty error message");
}

impl Harness {
    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.now_ms)
    }

    /// Applies the owner substitution of `op` (see the module docs).
    fn owner(&self, op: u8, lease_id: &mut u64, secret: &mut String) {
        if self.granted.is_empty() {
            return;
        }
        let g = &self.granted[usize::from((op >> 3) & 0x07) % self.granted.len()];
        if op & 0x40 != 0 {
            *lease_id = g.lease_id;
        }
        if op & 0x80 != 0 {
            secret.clone_from(&g.lease_secret);
        }
    }

    fn step(&mut self, op: u8, chunk: &[u8]) {
        // As the store does before every call.
        let mut events = self.state.expire(self.now());
        match op & 0x07 {
            0 => {
                let Ok(r) = pb::GrantLeaseRequest::decode(chunk) else {
                    return self.events(events);
                };
                match self.state.grant_lease(r.ttl_ms, self.now()) {
                    Ok(g) => {
                        let ttl = Ttl::default();
                        assert!(g.ttl >= ttl.min && g.ttl <= ttl.max, "ttl {:?}", g.ttl);
                        assert!(g.lease_id != 0 && !g.lease_secret.is_empty());
                        self.granted.push(g);
                    }
                    Err(e) => {
                        check_state_error("grant", &e);
                        assert!(matches!(e, Error::Limit { .. }), "grant: {e}");
                    }
                }
            }
            1 => {
                let Ok(mut r) = pb::RegisterRequest::decode(chunk) else {
                    return self.events(events);
                };
                self.owner(op, &mut r.lease_id, &mut r.lease_secret);
                match r.file_descriptor_set.as_slice() {
                    b"calc" => {
                        r.file_descriptor_set = registry_proto::CALCULATOR_DESCRIPTORS.to_vec();
                    }
                    b"echo" => r.file_descriptor_set = registry_proto::ECHO_DESCRIPTORS.to_vec(),
                    _ => {}
                }
                match validate::register(r) {
                    Err(e) => check_invalid("register", &e),
                    Ok(v) => {
                        let sent = v.instance.clone();
                        match self.state.register(v) {
                            Ok((stored, more)) => {
                                assert_eq!(
                                    (stored.service.as_str(), stored.instance_id.as_str()),
                                    (sent.service.as_str(), sent.instance_id.as_str())
                                );
                                assert!(
                                    (0..=validate::MAX_WEIGHT).contains(&stored.effective_weight())
                                );
                                assert!(
                                    stored.revision > 0 && stored.revision <= self.state.revision()
                                );
                                events.extend(more);
                            }
                            Err(e) => check_state_error("register", &e),
                        }
                    }
                }
            }
            2 => {
                let Ok(mut r) = pb::UpdateRequest::decode(chunk) else {
                    return self.events(events);
                };
                self.owner(op, &mut r.lease_id, &mut r.lease_secret);
                match validate::update(r) {
                    Err(e) => check_invalid("update", &e),
                    Ok(v) => match self.state.update(v.clone()) {
                        Ok((stored, more)) => {
                            if let Some(w) = v.weight {
                                assert_eq!(stored.weight, Some(w));
                            }
                            if let Some(m) = &v.metadata {
                                assert_eq!(&stored.metadata, m);
                            }
                            events.extend(more);
                        }
                        Err(e) => check_state_error("update", &e),
                    },
                }
            }
            3 => {
                let Ok(mut r) = pb::DeregisterRequest::decode(chunk) else {
                    return self.events(events);
                };
                self.owner(op, &mut r.lease_id, &mut r.lease_secret);
                match validate::deregister(r) {
                    Err(e) => check_invalid("deregister", &e),
                    Ok(v) => {
                        let key = (v.service.clone(), v.instance_id.clone());
                        match self.state.deregister(v) {
                            Ok(more) => {
                                assert_eq!(more.len(), 1, "deregister removes exactly one");
                                assert!(
                                    !self
                                        .state
                                        .resolve(&key.0)
                                        .iter()
                                        .any(|i| i.instance_id == key.1)
                                );
                                events.extend(more);
                            }
                            Err(e) => check_state_error("deregister", &e),
                        }
                    }
                }
            }
            4 => {
                let Ok(mut r) = pb::KeepAliveRequest::decode(chunk) else {
                    return self.events(events);
                };
                self.owner(op, &mut r.lease_id, &mut r.lease_secret);
                // KeepAlive messages on a stream: the stream id is the
                // lease index, so "stream ended" below can name it.
                let stream = (op & 0x20 != 0).then_some(u64::from((op >> 3) & 0x03));
                match validate::lease(r.lease_id, &r.lease_secret) {
                    Err(e) => check_invalid("keepalive", &e),
                    Ok(()) => {
                        match self
                            .state
                            .keep_alive(r.lease_id, &r.lease_secret, stream, self.now())
                        {
                            Ok(ttl) => assert!(ttl > Duration::ZERO),
                            Err(e) => check_state_error("keepalive", &e),
                        }
                    }
                }
            }
            5 => {
                let Ok(mut r) = pb::RevokeLeaseRequest::decode(chunk) else {
                    return self.events(events);
                };
                self.owner(op, &mut r.lease_id, &mut r.lease_secret);
                match validate::lease(r.lease_id, &r.lease_secret) {
                    Err(e) => check_invalid("revoke", &e),
                    Ok(()) => match self.state.revoke_lease(r.lease_id, &r.lease_secret) {
                        Ok((removed, more)) => {
                            assert_eq!(removed as usize, more.len());
                            assert!(
                                self.state
                                    .keep_alive(r.lease_id, &r.lease_secret, None, self.now())
                                    .is_err(),
                                "a revoked lease lives on"
                            );
                            events.extend(more);
                        }
                        Err(e) => check_state_error("revoke", &e),
                    },
                }
            }
            6 => {
                let Ok(r) = pb::WatchRequest::decode(chunk) else {
                    return self.events(events);
                };
                let asked = r.services.clone();
                match validate::watch(r) {
                    Err(e) => check_invalid("watch", &e),
                    Ok(services) => self.reads(&services),
                }
                // Resolve and GetDescriptors take any name, valid or not.
                for name in &asked {
                    let resolved = self.state.resolve(name);
                    assert!(resolved.iter().all(|i| &i.service == name));
                    match self.state.descriptors(name) {
                        Ok((_, bytes)) => self.in_flight = Some(bytes),
                        Err(e) => {
                            assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
                            assert_eq!(
                                matches!(e, Error::ServiceNotFound(_)),
                                resolved.is_empty(),
                                "{e}"
                            );
                        }
                    }
                }
            }
            _ => {
                if op & 0x08 != 0 {
                    if let Some(g) = self
                        .granted
                        .get(usize::from(op >> 4) % self.granted.len().max(1))
                    {
                        let stream = chunk.first().map_or(0, |b| u64::from(b & 0x03));
                        if let Some(more) = self.state.stream_closed(g.lease_id, stream) {
                            events.extend(more);
                        }
                    }
                } else {
                    // Time passes; the answer in flight is sent by now.
                    self.now_ms += 50 * chunk.len() as u64;
                    self.in_flight = None;
                }
            }
        }
        self.events(events);
    }

    /// The reads a watcher and a client do: snapshot, list, resolve.
    fn reads(&self, services: &BTreeSet<String>) {
        let snapshot = self.state.snapshot(services);
        for e in &snapshot {
            assert_eq!(e.kind(), Kind::Added);
            let i = e
                .instance
                .as_ref()
                .expect("snapshot events carry instances");
            assert!(services.is_empty() || services.contains(&i.service));
            assert!(e.revision <= self.state.revision());
        }
    }

    /// Checks a step's events and folds them into the replica.
    fn events(&mut self, events: Vec<Event>) {
        for e in events {
            assert!(
                e.revision > self.last_revision,
                "revision went back: {} after {}",
                e.revision,
                self.last_revision
            );
            self.last_revision = e.revision;
            let i = e.instance.clone().expect("events carry instances");
            if e.kind() != Kind::Removed {
                // A removed instance keeps the revision of its last change.
                assert_eq!(i.revision, e.revision, "instance revision is the event's");
            }
            let key = (i.service.clone(), i.instance_id.clone());
            match e.kind() {
                Kind::Added => assert!(self.replica.insert(key, i).is_none(), "ADDED twice"),
                Kind::Updated => assert!(self.replica.insert(key, i).is_some(), "UPDATED unknown"),
                Kind::Removed => {
                    assert!(self.replica.remove(&key).is_some(), "REMOVED unknown");
                    assert_ne!(e.reason(), pb::RemovalReason::Unspecified);
                }
                Kind::Unspecified => panic!("unspecified event kind"),
            }
        }
        assert_eq!(
            self.state.revision(),
            self.last_revision,
            "revision without event"
        );
    }

    /// Invariants that hold between any two requests.
    fn check(&self) {
        let all = self.state.snapshot(&BTreeSet::new());
        let snapshot: BTreeMap<_, _> = all
            .into_iter()
            .filter_map(|e| e.instance)
            .map(|i| ((i.service.clone(), i.instance_id.clone()), i))
            .collect();
        assert_eq!(snapshot, self.replica, "events do not replay to the state");
        assert_eq!(self.state.instance_count(), snapshot.len());

        let listed = self.state.list_services();
        let mut total = 0usize;
        for s in &listed {
            let resolved = self.state.resolve(&s.name);
            assert!(
                !resolved.is_empty(),
                "listed service {:?} without instances",
                s.name
            );
            assert_eq!(
                s.instance_count as usize,
                resolved.len(),
                "list vs resolve for {:?}",
                s.name
            );
            assert!(
                resolved
                    .windows(2)
                    .all(|w| w[0].instance_id < w[1].instance_id)
            );
            total += resolved.len();
        }
        assert!(listed.windows(2).all(|w| w[0].name < w[1].name));
        assert!(
            listed
                .iter()
                .all(|s| s.instance_count as usize <= QUOTAS.instances_per_service),
            "service quota exceeded"
        );
        let mut per_lease: BTreeMap<u64, usize> = BTreeMap::new();
        for i in snapshot.values() {
            *per_lease.entry(i.lease_id).or_default() += 1;
        }
        assert!(
            per_lease.values().all(|&n| n <= QUOTAS.instances_per_lease),
            "lease quota exceeded"
        );
        assert_eq!(total, self.state.instance_count(), "list vs instance count");

        let limits = limits();
        assert!(self.state.lease_count() <= limits.leases);
        assert!(self.state.instance_count() <= limits.instances);
        if self.state.instance_count() == 0 {
            assert_eq!(
                self.state.descriptor_count(),
                0,
                "descriptor sets kept with no instance left"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[op, len, bytes..]` for a message.
    fn op(op: u8, msg: &impl Message) -> Vec<u8> {
        let bytes = msg.encode_to_vec();
        let mut out = vec![op, u8::try_from(bytes.len()).unwrap_or(u8::MAX)];
        out.extend(bytes);
        out
    }

    #[test]
    fn a_grant_register_revoke_sequence_runs() {
        let mut data = op(0, &pb::GrantLeaseRequest { ttl_ms: 500 });
        data.extend(op(
            0xC1,
            &pb::RegisterRequest {
                lease_id: 1,
                lease_secret: "x".into(),
                instance: Some(pb::Instance {
                    service: "calc".into(),
                    host: "127.0.0.1".into(),
                    port: 7,
                    ..Default::default()
                }),
                file_descriptor_set: b"calc".to_vec(),
            },
        ));
        data.extend(op(
            6,
            &pb::WatchRequest {
                services: vec!["calc".into()],
                ..Default::default()
            },
        ));
        data.extend(op(
            0xC5,
            &pb::RevokeLeaseRequest {
                lease_id: 1,
                lease_secret: "x".into(),
            },
        ));
        let h = run(&data);
        // Each step took effect: one lease, its instance ADDED (revision 1)
        // with the real calculator descriptors, then REMOVED by the revoke
        // (revision 2), leaving nothing behind.
        assert_eq!(h.granted.len(), 1);
        assert_eq!(h.last_revision, 2);
        assert_eq!(h.state.revision(), 2);
        assert!(h.replica.is_empty());
        assert_eq!(h.state.lease_count(), 0);
        assert_eq!(h.state.descriptor_count(), 0);
        // The Watch step read the descriptors while the instance was there.
        assert_eq!(
            h.in_flight.as_deref(),
            Some(registry_proto::CALCULATOR_DESCRIPTORS)
        );

        assert_eq!(run(&[]).state.revision(), 0);
        // Garbage: no panic, and whatever ran left the invariants intact
        // (checked after every step by `run` itself).
        run(&[0xff; 100]);
    }
}
