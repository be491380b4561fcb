//! Issue 14's attack, end to end: Watch streams opened over raw HTTP/2 and
//! never read, against a registry holding a few thousand instances with
//! large metadata. Were each watcher to copy the state (as the registry
//! once did), the watchers here would need about 48 GB; the registry's RSS
//! must instead stay under [`RSS_BOUND_MB`], a well-behaved node keep its
//! lease, and `client call` keep answering. Once the attackers close their
//! sockets their streams are freed: a second wave as large as the first
//! reuses that memory instead of adding to it.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{CALC, CHANGE, Node};
use registry_proto::registry::v1 as pb;
use testkit::Registry;

/// Instances registered, each with about 16 KiB of metadata (64 labels of
/// 247 bytes: inside every documented limit): a state of about 48 MB.
const INSTANCES: usize = 3000;
/// Connections of the attacker, and Watch streams on each (under the
/// default limit of 64 per connection).
const CONNECTIONS: usize = 20;
const STREAMS: usize = 50;
/// What the registry's RSS must stay under during the attack, in MB: the
/// state (about 48 MB of metadata, stored once) and what the watch path
/// may hold for 1000 streams that do not read. Copying the state per
/// watcher would be 1000 x 48 MB.
const RSS_BOUND_MB: u64 = 600;

fn rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .to_string();
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

fn big_instance(id: usize) -> pb::Instance {
    pb::Instance {
        service: format!("big{}", id % 10),
        instance_id: format!("i{id:05}"),
        host: "127.0.0.1".into(),
        port: 9,
        weight: 1,
        metadata: (0..64)
            .map(|k| {
                (
                    format!("label{k:02}"),
                    format!("{id}-{k}-").repeat(240)[..240].to_string(),
                )
            })
            .collect(),
        ..Default::default()
    }
}

/// One attacking connection: `STREAMS` Watch calls, a 1 KiB window per
/// stream, and never a byte of any response read. The connection itself is
/// driven (it answers pings), so it looks alive to the registry.
async fn attacker(addr: SocketAddr) -> Attacker {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut responses = Vec::new();
    let mut client = client.ready().await.unwrap();
    for _ in 0..STREAMS {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/registry.v1.Registry/Watch"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        // A gRPC frame: uncompressed, length 0: an empty WatchRequest
        // (every service).
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        responses.push(response);
        client = client.ready().await.unwrap();
    }
    Attacker {
        _client: client,
        _responses: responses,
        connection,
    }
}

/// An attacking connection; dropping it closes its socket.
struct Attacker {
    _client: h2::client::SendRequest<Bytes>,
    _responses: Vec<h2::client::ResponseFuture>,
    /// The task that drives the connection (it owns the socket).
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_that_never_read_cannot_sink_the_registry() {
    let registry = Registry::start(&["--max-registrations-per-sec-per-ip", "0"]);
    let pid = registry.process.pid();
    let mut client = registry.client().await;
    let lease = client
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 300_000 })
        .await
        .unwrap()
        .into_inner();
    let done = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (mut client, lease, done) = (client.clone(), lease.clone(), done.clone());
            tokio::spawn(async move {
                for id in (w..INSTANCES).step_by(8) {
                    client
                        .register(pb::RegisterRequest {
                            lease_id: lease.lease_id,
                            lease_secret: lease.lease_secret.clone(),
                            instance: Some(big_instance(id)),
                            file_descriptor_set: Vec::new(),
                        })
                        .await
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), INSTANCES);

    // A well-behaved node, and a well-behaved watcher of its service that
    // notes any removal.
    let node = Node::start(&registry.addr.to_string(), CALC, &[], &[]);
    let mut watch = client
        .watch(pb::WatchRequest {
            services: vec!["calculator".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let removed = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    {
        let (removed, seen) = (removed.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok(Some(m)) = watch.message().await {
                for e in m.events {
                    if e.kind() == pb::event::Kind::Removed {
                        removed.fetch_add(1, Ordering::Relaxed);
                    }
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    testkit::eventually(CHANGE, "the node's instance in the watch", || {
        let seen = seen.clone();
        async move { (seen.load(Ordering::Relaxed) >= 1).then_some(()) }
    })
    .await;
    let baseline = rss_mb(pid);
    println!("RSS with {INSTANCES} instances: {baseline} MB");

    // The attack.
    let mut attackers = Vec::new();
    for _ in 0..CONNECTIONS {
        attackers.push(attacker(registry.addr).await);
    }
    let mut peak = 0;
    let churn_lease = lease.clone();
    for round in 0..6u32 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Changes meanwhile: more than the watchers' buffer (4 MiB) in all,
        // so the attackers fall behind and their snapshots are dropped.
        for id in 0..100 {
            let mut i = big_instance(id);
            i.weight = 2 + round;
            client
                .register(pb::RegisterRequest {
                    lease_id: churn_lease.lease_id,
                    lease_secret: churn_lease.lease_secret.clone(),
                    instance: Some(i),
                    file_descriptor_set: Vec::new(),
                })
                .await
                .unwrap();
        }
        let rss = rss_mb(pid);
        peak = peak.max(rss);
        println!(
            "RSS with {} never-reading watchers: {rss} MB",
            CONNECTIONS * STREAMS
        );
        assert!(
            rss < RSS_BOUND_MB,
            "RSS {rss} MB over the {RSS_BOUND_MB} MB bound"
        );
        let (status, out, err) = common::client(
            registry.addr,
            &["call", "calculator/Add", "a=1", "b=2"],
            &[],
        );
        assert!(
            status.success(),
            "client call failed during the attack: {out}{err}"
        );
        assert!(out.contains('3'), "{out}");
    }
    assert_eq!(
        removed.load(Ordering::Relaxed),
        0,
        "the node lost its lease"
    );
    let instances = client
        .resolve(pb::ResolveRequest {
            service: "calculator".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(instances.len(), 1, "the node is still registered");

    // The attackers go away, and as many come back: the memory the first
    // wave took was freed and is reused (glibc keeps freed memory in its
    // arenas, so RSS itself does not shrink; it must not grow either).
    drop(attackers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut second = Vec::new();
    for _ in 0..CONNECTIONS {
        second.push(attacker(registry.addr).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = rss_mb(pid);
    println!(
        "RSS with a second wave of {} watchers: {again} MB (first wave: {peak} MB)",
        CONNECTIONS * STREAMS
    );
    // A wave whose memory were not reused would add its whole share again
    // (peak - baseline); half of it is allowed for what glibc's arenas keep
    // per thread under a loaded machine (seen: +47 MB over a 173 MB share
    // during a full parallel test run).
    assert!(
        again <= peak + (peak - baseline) / 2,
        "the second wave added to the first: {again} MB after {peak} MB"
    );
    drop(second);
    let (status, out, err) = common::client(
        registry.addr,
        &["call", "calculator/Add", "a=1", "b=2"],
        &[],
    );
    assert!(status.success(), "{out}{err}");
    assert_eq!(
        removed.load(Ordering::Relaxed),
        0,
        "the node lost its lease"
    );
    drop(node);
}
