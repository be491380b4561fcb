//! A registry that is not scheduled for a while (SIGSTOP here; a VM pause or
//! a swap storm does the same) does not expire the leases of healthy nodes
//! when it resumes: their heartbeats were waiting in its sockets. A node
//! that really went silent meanwhile still goes, within one TTL of the
//! resume.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use registry_proto::registry::v1::event::Kind;
use testkit::Registry;

const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;
/// The registry's default lease TTL.
const TTL: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_stopped_for_3_s_keeps_healthy_leases_and_expires_a_dead_node() {
    let registry = Registry::start(&[]);
    let reg = registry.addr.to_string();
    let calc = |w: u32| format!("[plugins.calculator]\nweight = {w}\n");
    let healthy: Vec<common::Node> = (1..=3)
        .map(|w| common::node_with(&reg, &calc(w), &[], &[]))
        .collect();
    let frozen = common::node_with(&reg, &calc(9), &[], &[]);
    let mut client = registry.client().await;
    testkit::eventually(Duration::from_secs(10), "4 instances", || {
        let mut client = client.clone();
        async move {
            let request = registry_proto::registry::v1::ResolveRequest {
                service: "calculator".into(),
            };
            let n = client
                .resolve(request)
                .await
                .ok()?
                .into_inner()
                .instances
                .len();
            (n == 4).then_some(())
        }
    })
    .await;

    let mut watch = testkit::calls::watch(&mut client, &["calculator"]).await;
    let snapshot = watch.message().await.unwrap().unwrap();
    assert!(snapshot.reset);

    // The registry stops for 3 s (two TTLs); the fourth node freezes too
    // and stays frozen: its lease must go, and only its.
    registry.process.signal(SIGSTOP);
    frozen.process.signal(SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    registry.process.signal(SIGCONT);
    let resumed = Instant::now();

    let frozen_port = u32::from(frozen.addr.port());
    let mut removed = Vec::new();
    // Three TTLs after the resume: long enough for any wrong expiry.
    let until = resumed + 3 * TTL;
    while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(until.into(), watch.message()).await {
        for event in msg.events {
            if event.kind() == Kind::Removed {
                let port = event.instance.as_ref().map_or(0, |i| i.port);
                removed.push((port, resumed.elapsed()));
            }
        }
    }
    frozen.process.signal(SIGCONT);
    let ports: Vec<u32> = removed.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        ports,
        [frozen_port],
        "only the frozen node goes; healthy ones were removed: {removed:?} (healthy: {:?})",
        healthy.iter().map(|n| n.addr.port()).collect::<Vec<_>>()
    );
    let (_, after) = removed[0];
    assert!(
        after <= TTL + Duration::from_millis(500),
        "the frozen node went {after:?} after the resume, more than one TTL"
    );
}
