//! Watch: a snapshot, then every change in order, with no gap and no
//! duplicate, even while many clients change the registry at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::Registry;

/// Everything the registry holds, keyed like a replica, read with Resolve.
async fn resolved(
    client: &mut Client,
    services: &[&str],
) -> BTreeMap<(String, String), pb::Instance> {
    let mut all = BTreeMap::new();
    for service in services {
        for i in resolve(client, service).await {
            all.insert((i.service.clone(), i.instance_id.clone()), i);
        }
    }
    all
}

#[tokio::test]
async fn watchers_see_every_change_in_order_under_concurrent_load() {
    const SERVICES: [&str; 3] = ["alpha", "beta", "gamma"];
    const WRITERS: usize = 32;
    const ROUNDS: usize = 12;

    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    // Something to snapshot before the storm.
    let seed = grant(&mut client, LONG_TTL).await;
    register(&mut client, &seed, instance("alpha", "seed", 1)).await;

    let mut all_stream = watch(&mut client, &[]).await;
    let mut all = Replica::default();
    follow_until(&mut all_stream, &mut all, |r| r.resets == 1).await;
    assert_eq!(all.instances.len(), 1, "the snapshot holds the seed");
    let mut beta_stream = watch(&mut client, &["beta"]).await;
    let mut beta = Replica::default();

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = registry.client().await;
        writers.push(tokio::spawn(async move {
            let lease = grant(&mut client, LONG_TTL).await;
            for round in 0..ROUNDS {
                let service = SERVICES[(w + round) % SERVICES.len()];
                let id = format!("w{w}-{}", round % 4);
                let mut i = instance(service, &id, 1000 + w as u32);
                i.weight = Some(1 + (round as u32 % 7));
                register(&mut client, &lease, i).await;
                if round % 3 == 2 {
                    deregister(&mut client, &lease, service, &id).await.unwrap();
                }
            }
            if w % 4 == 0 {
                // Some writers leave entirely.
                client
                    .revoke_lease(pb::RevokeLeaseRequest {
                        lease_id: lease.id,
                        lease_secret: lease.secret.clone(),
                    })
                    .await
                    .unwrap();
            }
            lease
        }));
    }

    // A watcher that joins in the middle must fit in just as well.
    let mut late_stream = watch(&mut client, &[]).await;
    let mut late = Replica::default();

    let mut leases = Vec::new();
    for w in writers {
        leases.push(w.await.unwrap());
    }
    let revision = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert!(revision > 100, "the load made changes ({revision})");

    let truth = resolved(&mut client, &SERVICES).await;
    follow_until(&mut all_stream, &mut all, |r| r.revision >= revision).await;
    assert_eq!(all.instances, truth, "replayed events == Resolve");
    assert_eq!(all.resets, 1, "no reset was needed");
    follow_until(&mut late_stream, &mut late, |r| r.revision >= revision).await;
    assert_eq!(late.instances, truth, "late watcher == Resolve");

    // The filtered watcher sees only beta, and all of it.
    let beta_truth = resolved(&mut client, &["beta"]).await;
    follow_until(&mut beta_stream, &mut beta, |r| {
        r.resets >= 1 && r.instances == beta_truth
    })
    .await;
    assert!(
        beta.log
            .iter()
            .all(|e| e.instance.as_ref().unwrap().service == "beta"),
        "a filtered watcher only gets its services"
    );
    assert_eq!(all.registry_id, beta.registry_id);

    // One more change reaches everyone, with the next revision.
    deregister(&mut client, &seed, "alpha", "seed")
        .await
        .unwrap();
    follow_until(&mut all_stream, &mut all, |r| r.revision > revision).await;
    let last = all.log.last().unwrap();
    if !testkit::etcd::under_test() {
        assert_eq!(last.revision, revision + 1);
    }
    assert_eq!(last.kind(), pb::event::Kind::Removed);
    assert_eq!(last.reason(), pb::RemovalReason::Deregistered);
}

#[tokio::test]
async fn registry_id_differs_between_registries() {
    let a = Registry::start(&[]);
    let b = Registry::start(&[]);
    let first = |r: Registry| async move {
        let mut client = r.client().await;
        let mut stream = watch(&mut client, &[]).await;
        let response = stream.message().await.unwrap().unwrap();
        assert!(response.reset);
        if !testkit::etcd::under_test() {
            assert_eq!(response.revision, 0);
        }
        assert!(response.events.is_empty());
        response.registry_id
    };
    assert_ne!(first(a).await, first(b).await);
}

#[tokio::test]
async fn a_snapshot_larger_than_one_message_arrives_in_parts_then_changes_follow() {
    // About 2.8 MB of state, where the registry puts at most about 1 MiB in
    // one message. No rate limit, for this burst from one address.
    const INSTANCES: usize = 6000;
    let registry = Registry::start(&["--max-registrations-per-sec-per-ip", "0"]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, 60_000).await;
    let label = "x".repeat(400);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (mut client, lease, label) = (client.clone(), lease.clone(), label.clone());
            tokio::spawn(async move {
                for n in (w..INSTANCES).step_by(8) {
                    let mut i = instance("big", &format!("i{n:05}"), 1000 + n as u32);
                    i.metadata.insert("label".into(), label.clone());
                    register(&mut client, &lease, i).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let truth = resolved(&mut client, &["big"]).await;
    assert_eq!(truth.len(), INSTANCES);

    let mut stream = watch(&mut client, &[]).await;
    let mut replica = Replica::default();
    let mut messages = 0;
    loop {
        let message = stream.message().await.unwrap().unwrap();
        let size = prost::Message::encoded_len(&message);
        assert!(size <= 1024 * 1024 + 1024, "a snapshot message of {size} B");
        messages += 1;
        let more = message.more;
        replica.apply(message);
        if !more {
            break;
        }
    }
    assert!(messages >= 3, "2.8 MB in {messages} messages");
    assert_eq!(replica.resets, 1);
    assert_eq!(replica.continuations, messages - 1);
    assert_eq!(replica.instances, truth);

    // The next change follows the last part, with the next revision.
    let revision = replica.revision;
    deregister(&mut client, &lease, "big", "i00000")
        .await
        .unwrap();
    follow_until(&mut stream, &mut replica, |r| r.revision > revision).await;
    assert_eq!(replica.instances.len(), INSTANCES - 1);
    if !testkit::etcd::under_test() {
        assert_eq!(replica.log.last().unwrap().revision, revision + 1);
    }
}

#[tokio::test]
async fn a_watch_stream_the_client_drops_is_freed_at_once() {
    // Two streams per connection at most: had a dropped stream stayed open
    // on the registry's side, the third open below would be refused.
    let registry = Registry::start(&["--max-watches-per-connection", "2"]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    register(&mut client, &lease, instance("alpha", "a", 1)).await;
    // Each round opens both streams the limit allows and drops them; the
    // next round can only open its two once the registry freed those.
    for round in 0..6 {
        let what = format!("two streams open in round {round}");
        testkit::eventually(std::time::Duration::from_secs(10), &what, || {
            let mut client = client.clone();
            async move {
                let mut a = client
                    .watch(pb::WatchRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                let b = client.watch(pb::WatchRequest::default()).await.ok()?;
                let first = a.message().await.ok()??;
                assert!(first.reset);
                drop(b);
                Some(())
            }
        })
        .await;
    }
}

#[tokio::test]
async fn a_slow_reader_falls_behind_then_catches_up_with_an_exact_copy() {
    // A 64 KiB buffer per watcher, and a client that stops reading while
    // several MB of changes go by: more than its HTTP/2 window (2 MiB in
    // tonic) and its buffer together, so the registry drops it to "fallen
    // behind". When it reads again it must get a fresh snapshot and end up
    // with exactly the registry's state.
    let registry = Registry::start(&[
        "--max-registrations-per-sec-per-ip",
        "0",
        "--watch-buffer-bytes",
        "65536",
    ]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    let label = "y".repeat(1000);
    let writer = client.clone();
    let change = |round: u32| {
        let (mut client, lease, label) = (writer.clone(), lease.clone(), label.clone());
        async move {
            for n in 0..200u32 {
                let mut i = instance("slow", &format!("i{n:03}"), 2000 + n);
                i.weight = Some(1 + round);
                i.metadata.insert("label".into(), label.clone());
                register(&mut client, &lease, i).await;
            }
        }
    };
    change(0).await;
    let mut stream = watch(&mut client, &[]).await;
    let mut replica = Replica::default();
    follow_until(&mut stream, &mut replica, |r| r.resets == 1 && !r.more).await;
    assert_eq!(replica.instances, resolved(&mut client, &["slow"]).await);

    // Not a message read while about 6 MB of changes are made.
    for round in 1..=30 {
        change(round).await;
    }
    let truth = resolved(&mut client, &["slow"]).await;
    let revision = truth.values().map(|i| i.revision).max().unwrap();
    follow_until(&mut stream, &mut replica, |r| {
        r.revision >= revision && !r.more
    })
    .await;
    assert!(
        replica.resets >= 2,
        "it fell behind and got a fresh snapshot"
    );
    assert_eq!(replica.instances, truth, "an exact copy after catching up");
    assert!(replica.instances.values().all(|i| i.weight == Some(31)));

    // And it follows the next change as usual.
    change(31).await;
    let truth = resolved(&mut client, &["slow"]).await;
    let revision = truth.values().map(|i| i.revision).max().unwrap();
    let resets = replica.resets;
    follow_until(&mut stream, &mut replica, |r| r.revision >= revision).await;
    assert_eq!(replica.instances, truth);
    assert_eq!(replica.resets, resets, "no reset while it keeps up");
}
