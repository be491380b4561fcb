//! The watcher's stream, driven directly (no transport): "not reading" is
//! not polling.

use super::*;
use crate::lease::Ttl;
use crate::state::{Event, State};
use crate::validate::Register;
use registry_proto::registry::v1 as pb;
use std::collections::BTreeMap;
use tokio_stream::StreamExt;

fn watchers(buffer_bytes: usize) -> Watchers {
    Watchers::new(
        Ttl::default(),
        Quotas::default(),
        WatchLimits {
            buffer_bytes,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            resume_bytes: 0,
        },
    )
}

fn register(store: &Store, lease: &crate::state::Granted, id: usize, weight: u32, label: usize) {
    let mut instance = pb::Instance {
        service: if id.is_multiple_of(2) { "even" } else { "odd" }.into(),
        instance_id: format!("i{id:05}"),
        host: "127.0.0.1".into(),
        port: 1,
        weight: Some(weight),
        ..Default::default()
    };
    if label > 0 {
        instance.metadata.insert("label".into(), "x".repeat(label));
    }
    store
        .register(Register {
            lease_id: lease.lease_id,
            lease_secret: lease.lease_secret.clone(),
            instance,
            descriptors: None,
        })
        .unwrap();
}

/// A client's copy, kept from the messages as the protocol says.
#[derive(Default)]
struct Replica {
    instances: BTreeMap<(String, String), pb::Instance>,
    building: Option<BTreeMap<(String, String), pb::Instance>>,
    revision: u64,
    resets: usize,
}

impl Replica {
    fn apply(&mut self, m: pb::WatchResponse) {
        let key = |i: &pb::Instance| (i.service.clone(), i.instance_id.clone());
        if m.reset {
            self.resets += 1;
            self.building = Some(BTreeMap::new());
        }
        if let Some(building) = self.building.as_mut() {
            for e in m.events {
                let i = e.instance.unwrap();
                building.insert(key(&i), i);
            }
            if !m.more {
                self.instances = self.building.take().unwrap();
                self.revision = m.revision;
            }
            return;
        }
        for e in m.events {
            let kind = e.kind();
            let i = e.instance.unwrap();
            match kind {
                pb::event::Kind::Removed => {
                    self.instances.remove(&key(&i));
                }
                _ => {
                    self.instances.insert(key(&i), i);
                }
            }
        }
        self.revision = m.revision;
    }
}

fn truth(store: &Store, services: &[&str]) -> BTreeMap<(String, String), pb::Instance> {
    let mut all = BTreeMap::new();
    for s in services {
        for i in store.resolve(s).0 {
            all.insert((i.service.clone(), i.instance_id.clone()), i);
        }
    }
    all
}

async fn follow<S>(stream: &mut S, replica: &mut Replica, revision: u64)
where
    S: Stream<Item = Result<Encoded, Status>> + Unpin,
{
    while replica.revision < revision || replica.building.is_some() {
        let m = stream.next().await.unwrap().unwrap().decode().unwrap();
        replica.apply(m);
    }
}

#[tokio::test]
async fn a_watcher_that_stops_reading_falls_behind_then_catches_up_with_an_exact_copy() {
    let w = watchers(64 * 1024);
    let store = w.store().clone();
    let lease = store.grant_lease(0).unwrap();
    for id in 0..200 {
        register(&store, &lease, id, 1, 100);
    }
    let mut stream = Box::pin(w.open(BTreeSet::new()).unwrap());
    let mut replica = Replica::default();
    follow(&mut stream, &mut replica, store.read(State::revision)).await;
    assert_eq!(replica.instances, truth(&store, &["even", "odd"]));
    assert_eq!(replica.resets, 1);

    // It stops reading while far more than its budget of changes goes by.
    for round in 0..20 {
        for id in 0..200 {
            register(&store, &lease, id, 2 + round, 100);
        }
    }
    assert!(
        w.hub().log_bytes() <= 64 * 1024 + 4096,
        "the log stays within its budget"
    );
    let revision = store.read(State::revision);
    follow(&mut stream, &mut replica, revision).await;
    assert_eq!(replica.resets, 2, "it got one fresh snapshot");
    assert_eq!(replica.instances, truth(&store, &["even", "odd"]));

    // And follows ordinary changes after it, one message each.
    register(&store, &lease, 7, 999, 0);
    follow(&mut stream, &mut replica, revision + 1).await;
    assert_eq!(replica.instances, truth(&store, &["even", "odd"]));
}

#[tokio::test]
async fn falling_behind_again_during_the_fresh_snapshot_ends_the_stream() {
    // A state of several parts, so a snapshot takes more than one read.
    let w = watchers(64 * 1024);
    let store = w.store().clone();
    let lease = store.grant_lease(0).unwrap();
    for id in 0..300 {
        register(&store, &lease, id, 1, 1000);
    }
    let mut stream = Box::pin(w.open(BTreeSet::new()).unwrap());
    let churn = |round: u32| {
        for id in 0..100 {
            register(&store, &lease, id, 2 + round, 1000);
        }
    };
    let first = stream.next().await.unwrap().unwrap().decode().unwrap();
    assert!(first.reset && first.more);
    churn(0);
    // Behind: the next read is a fresh snapshot...
    let fresh = stream.next().await.unwrap().unwrap().decode().unwrap();
    assert!(fresh.reset && fresh.more, "a fresh snapshot starts");
    churn(1);
    // ...and behind again before it was taken whole: the end.
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("--watch-buffer-bytes"),
        "{status:?}"
    );
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn watchers_of_the_same_services_at_the_same_revision_share_one_snapshot() {
    let w = watchers(DEFAULT_BUFFER_BYTES);
    let store = w.store().clone();
    let lease = store.grant_lease(0).unwrap();
    for id in 0..2000 {
        register(&store, &lease, id, 1, 200);
    }
    let mut a = Box::pin(w.open(BTreeSet::new()).unwrap());
    let used_by_one = w.hub().memory_used();
    let mut b = Box::pin(w.open(BTreeSet::new()).unwrap());
    assert_eq!(
        w.hub().memory_used(),
        used_by_one + STREAM_CHARGE,
        "the second watcher adds its stream, not another copy"
    );
    let first_a = a.next().await.unwrap().unwrap();
    let first_b = b.next().await.unwrap().unwrap();
    assert_eq!(first_a.0.as_ptr(), first_b.0.as_ptr(), "the same bytes");
    // A filtered watcher has a job of its own.
    let only: BTreeSet<String> = ["odd".to_string()].into();
    let mut c = Box::pin(w.open(only).unwrap());
    assert!(w.hub().memory_used() > used_by_one + 2 * STREAM_CHARGE);
    let mut replica = Replica::default();
    follow(&mut c, &mut replica, store.read(State::revision)).await;
    assert_eq!(replica.instances, truth(&store, &["odd"]));
    // Dropped streams give their memory back at once.
    drop((a, b, c));
    assert_eq!(w.hub().memory_used(), 0);
}

#[tokio::test]
async fn the_memory_budget_refuses_a_watch_beyond_it() {
    let w = Watchers::new(
        Ttl::default(),
        Quotas::default(),
        WatchLimits {
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            memory_bytes: 2 * STREAM_CHARGE,
            resume_bytes: 0,
        },
    );
    // Each watcher costs its stream and its job's parts: one fits, two not.
    let a = w.open(BTreeSet::new()).unwrap();
    let status = w.open(["x".to_string()].into()).err().unwrap();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("--watch-memory-bytes"),
        "{status:?}"
    );
    drop(a);
    assert!(w.open(BTreeSet::new()).is_ok(), "room again");
}

#[tokio::test]
async fn a_filtered_watcher_gets_only_its_services_and_the_revision() {
    let w = watchers(DEFAULT_BUFFER_BYTES);
    let store = w.store().clone();
    let lease = store.grant_lease(0).unwrap();
    let only: BTreeSet<String> = ["odd".to_string()].into();
    let mut stream = Box::pin(w.open(only).unwrap());
    let first = stream.next().await.unwrap().unwrap().decode().unwrap();
    assert!(first.reset && first.events.is_empty() && !first.more);
    assert_eq!(first.registry_id, store.registry_id());
    for id in 0..10 {
        register(&store, &lease, id, 1, 0);
    }
    let mut replica = Replica::default();
    replica.apply(first);
    follow(&mut stream, &mut replica, 10).await;
    assert_eq!(replica.instances, truth(&store, &["odd"]));
    let _: Option<Event> = None;
}

#[tokio::test]
async fn the_stream_ends_on_shutdown() {
    let w = watchers(DEFAULT_BUFFER_BYTES);
    let mut stream = Box::pin(w.open(BTreeSet::new()).unwrap());
    assert!(
        stream
            .next()
            .await
            .unwrap()
            .unwrap()
            .decode()
            .unwrap()
            .reset
    );
    w.close();
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn the_log_keeps_only_what_some_watcher_has_yet_to_take() {
    let w = watchers(DEFAULT_BUFFER_BYTES);
    let store = w.store().clone();
    let lease = store.grant_lease(0).unwrap();
    for id in 0..100 {
        register(&store, &lease, id, 1, 100);
    }
    assert_eq!(w.hub().log_bytes(), 0, "nobody watches: nothing is kept");
    let mut stream = Box::pin(w.open(BTreeSet::new()).unwrap());
    let mut replica = Replica::default();
    follow(&mut stream, &mut replica, 100).await;
    for id in 0..10 {
        register(&store, &lease, id, 2, 100);
    }
    assert!(w.hub().log_bytes() > 0, "kept for the watcher");
    follow(&mut stream, &mut replica, 110).await;
    assert_eq!(w.hub().log_bytes(), 0, "all taken: nothing is kept");
    assert_eq!(replica.instances, truth(&store, &["even", "odd"]));
    drop(stream);
    register(&store, &lease, 1, 3, 100);
    assert_eq!(w.hub().log_bytes(), 0);
}
