//! Leases against the real binary: TTL expiry when heartbeats stop, prompt
//! removal when the KeepAlive stream breaks, revocation.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::Registry;
use tonic::Code;

/// Waits for the REMOVED event of `service/id` and returns its reason.
async fn removal_reason(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    replica: &mut Replica,
    id: &str,
) -> pb::RemovalReason {
    follow_until(stream, replica, |r| {
        r.log.iter().any(|e| {
            e.kind() == pb::event::Kind::Removed && e.instance.as_ref().unwrap().instance_id == id
        })
    })
    .await;
    replica
        .log
        .iter()
        .find(|e| {
            e.instance.as_ref().unwrap().instance_id == id && e.kind() == pb::event::Kind::Removed
        })
        .unwrap()
        .reason()
}

#[tokio::test]
async fn ttl_is_clamped_and_defaulted() {
    let registry = Registry::start(&[
        "--default-ttl-ms",
        "700",
        "--min-ttl-ms",
        "200",
        "--max-ttl-ms",
        "5000",
    ]);
    let mut client = registry.client().await;
    for (asked, granted) in [(0, 700), (1, 200), (3000, 3000), (99_999, 5000)] {
        let r = client
            .grant_lease(pb::GrantLeaseRequest { ttl_ms: asked })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ttl_ms, granted, "asked for {asked}");
    }
}

#[tokio::test]
async fn lease_expires_after_its_ttl_when_heartbeats_stop() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let mut stream = watch(&mut client, &[]).await;
    let mut replica = Replica::default();
    follow_until(&mut stream, &mut replica, |r| r.resets == 1).await;

    // Heartbeats every 400 ms against a TTL of 2 s: room for a loaded
    // machine's hiccups.
    let lease = grant(&mut client, 2000).await;
    let mut ka = keep_alive(&mut client, &lease).await;
    register(&mut client, &lease, instance("svc", "a", 1)).await;
    // Heartbeats keep it alive well past its TTL.
    let mut last_heartbeat = tokio::time::Instant::now();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        last_heartbeat = tokio::time::Instant::now();
        ka.send(&lease).await;
        let answer = ka.responses.message().await.unwrap().unwrap();
        assert_eq!(answer.ttl_ms, 2000);
    }
    assert_eq!(ids(&mut client, "svc").await, ["a"]);

    // Heartbeats stop (the stream stays open): gone after the TTL, which
    // the registry counts from when it received the last one.
    let reason = removal_reason(&mut stream, &mut replica, "a").await;
    assert_eq!(reason, pb::RemovalReason::LeaseExpired);
    assert!(
        last_heartbeat.elapsed() >= Duration::from_millis(1950),
        "expired too early: {:?} after the last heartbeat",
        last_heartbeat.elapsed()
    );
    assert!(ids(&mut client, "svc").await.is_empty());

    // The next heartbeat learns the lease is gone.
    ka.send(&lease).await;
    let err = ka.responses.message().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // And so does everything else under it.
    let err = client
        .register(register_request(&lease, instance("svc", "b", 2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn closing_the_keepalive_stream_revokes_the_lease_at_once() {
    // A long TTL: only the stream's end can explain a prompt removal.
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let mut stream = watch(&mut client, &[]).await;
    let mut replica = Replica::default();

    let lease = grant(&mut client, 60_000).await;
    let ka = keep_alive(&mut client, &lease).await;
    register(&mut client, &lease, instance("svc", "a", 1)).await;
    drop(ka.tx); // the client ends its side of the stream
    let started = tokio::time::Instant::now();
    let reason = removal_reason(&mut stream, &mut replica, "a").await;
    assert_eq!(reason, pb::RemovalReason::KeepaliveClosed);
    assert!(started.elapsed() < PROMPTLY);
}

/// Set in the environment of the child process that plays a node.
const CHILD_ENV: &str = "REGISTRY_TEST_CHILD_NODE";

#[tokio::test]
async fn a_killed_node_process_is_removed_at_once() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let mut stream = watch(&mut client, &[]).await;
    let mut replica = Replica::default();

    // This test executable, run again as a child, registers under a lease
    // with a long TTL and waits; SIGKILL then breaks its connection without
    // a word, like a crashed node.
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_node", "--ignored", "--nocapture"])
        .env(CHILD_ENV, registry.url());
    let mut child = testkit::Process::spawn("node", cmd);
    child.wait_for_line("child registered", testkit::READY_TIMEOUT);
    assert_eq!(ids(&mut client, "svc").await, ["child"]);
    child.kill9();
    let killed = tokio::time::Instant::now();
    let reason = removal_reason(&mut stream, &mut replica, "child").await;
    assert_eq!(reason, pb::RemovalReason::KeepaliveClosed);
    assert!(killed.elapsed() < PROMPTLY);
}

/// Not a test: the node played by a child process in
/// `a_killed_node_process_is_removed_at_once`.
#[tokio::test]
#[ignore = "helper run as a child process by another test"]
async fn child_node() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut node = pb::registry_client::RegistryClient::connect(url)
        .await
        .unwrap();
    let lease = grant(&mut node, 60_000).await;
    let _ka = keep_alive(&mut node, &lease).await;
    register(&mut node, &lease, instance("svc", "child", 1)).await;
    println!("child registered");
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn keepalive_checks_lease_and_secret() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    for (lease_id, secret, code) in [
        (lease.id ^ 1, lease.secret.clone(), Code::NotFound),
        (lease.id, "0".repeat(32), Code::PermissionDenied),
        (0, lease.secret.clone(), Code::InvalidArgument),
    ] {
        let request = pb::KeepAliveRequest {
            lease_id,
            lease_secret: secret,
        };
        let result = client.keep_alive(tokio_stream::iter([request])).await;
        let code_seen = match result {
            Err(status) => status.code(),
            Ok(response) => response.into_inner().message().await.unwrap_err().code(),
        };
        assert_eq!(code_seen, code, "lease {lease_id}");
    }
}

#[tokio::test]
async fn revoke_needs_the_secret() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let a = grant(&mut client, LONG_TTL).await;
    let b = grant(&mut client, LONG_TTL).await;
    register(&mut client, &a, instance("svc", "a", 1)).await;
    let err = client
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: a.id,
            lease_secret: b.secret.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(ids(&mut client, "svc").await, ["a"]);
    let err = client
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: 42,
            lease_secret: b.secret.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
