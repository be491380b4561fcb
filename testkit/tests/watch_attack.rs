//! Issue 14's attack, end to end: Watch streams opened over raw HTTP/2 and
//! never read, against a registry holding a few thousand instances with
//! large metadata. Were each watcher to copy the state (as the registry
//! once did), the watchers here would need about 48 GB; the registry's RSS
//! must instead stay under [`RSS_BOUND_MB`], a well-behaved node keep its
//! lease, and `client call` keep answering. Once the attackers close their
//! sockets their streams are freed and RSS comes back down (to within a
//! quarter of what they took, or [`RESIDUE_MB`]); a second wave as large as
//! the first takes no more than it did.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{CALC, CHANGE, node_with};
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

/// What may stay above the pre-attack RSS once the attackers are gone,
/// however little the wave took, in MB: the allocator's thread caches and
/// metadata and the runtime's slabs, grown by 1000 streams. Since Watch
/// responses go out as the shared bytes (no copy per stream) a wave takes
/// only 6-13 MB, and a quarter of that is less than this residue: seen
/// 2 MB allocated and 4 MB of RSS above the baseline 1.6 s after the close
/// (debug build, 2026-12-03).
const RESIDUE_MB: u64 = 8;

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

/// A gauge of the registry's /metrics (at `http`), e.g. what the watch
/// path holds by its own count.
fn gauge(http: SocketAddr, name: &str) -> u64 {
    let body = testkit::http::get(http, "/metrics", &[]).body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// RSS and what the watch path holds by its own count, printed.
fn report(pid: u32, http: SocketAddr, when: &str) -> u64 {
    let rss = rss_mb(pid);
    println!(
        "{when}: RSS {rss} MB, watch memory {} KiB, watch log {} KiB, \
         allocated {} MB, allocator resident {} MB",
        gauge(http, "registry_watch_memory_bytes") / 1024,
        gauge(http, "registry_watch_log_bytes") / 1024,
        gauge(http, "registry_allocator_allocated_bytes") >> 20,
        gauge(http, "registry_allocator_resident_bytes") >> 20,
    );
    rss
}

fn big_instance(id: usize) -> pb::Instance {
    pb::Instance {
        service: format!("big{}", id % 10),
        instance_id: format!("i{id:05}"),
        host: "127.0.0.1".into(),
        port: 9,
        weight: Some(1),
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
    let registry = Registry::start(&[
        "--max-registrations-per-sec-per-ip",
        "0",
        "--http",
        "127.0.0.1:0",
    ]);
    let pid = registry.process.pid();
    let http = testkit::addr_from_line(
        &registry
            .process
            .wait_for_line("registry http on", testkit::READY_TIMEOUT),
    );
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
    let node = node_with(&registry.addr.to_string(), CALC, &[], &[]);
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
    let baseline = report(pid, http, &format!("{INSTANCES} instances"));
    let watch_baseline = gauge(http, "registry_watch_memory_bytes");

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
            i.weight = Some(2 + round);
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
        let rss = report(
            pid,
            http,
            &format!("{} never-reading watchers", CONNECTIONS * STREAMS),
        );
        peak = peak.max(rss);
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

    // The attackers go away (RSS comes back down), and as many come back:
    // they take no more than the first wave did.
    drop(attackers);
    // Once they are gone, the registry's own count of what watchers hold
    // is back where it was (their streams are freed), and RSS comes back
    // down: within a quarter of what the wave took (or RESIDUE_MB), above
    // the pre-attack value, once the allocator returns the freed pages
    // (jemalloc, about a second; glibc kept them all: 178 MB before,
    // 347 MB 8 s after).
    let margin = ((peak - baseline) / 4).max(RESIDUE_MB);
    let closed = std::time::Instant::now();
    let back = testkit::eventually(
        Duration::from_secs(10),
        &format!(
            "the watch memory back to its {watch_baseline} bytes before the attack, \
             and RSS within {margin} MB of its {baseline} MB"
        ),
        || async {
            let rss = rss_mb(pid);
            let freed = gauge(http, "registry_watch_memory_bytes") <= watch_baseline;
            (freed && rss <= baseline + margin).then_some(rss)
        },
    )
    .await;
    report(
        pid,
        http,
        &format!(
            "{:.1} s after the attackers closed ({back} MB)",
            closed.elapsed().as_secs_f64()
        ),
    );
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
    // A wave that took more than the first would have to hold more per
    // stream; half a wave's share is allowed for timing on a loaded machine
    // (seen with glibc: +47 MB over a 173 MB share during a full parallel
    // test run).
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
