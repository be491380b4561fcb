//! Helpers shared by the client's integration tests: `client` runs and
//! registry queries (node hosts are `testkit::NodeHost`).

#![allow(dead_code, clippy::unwrap_used)]

use registry_proto::registry::v1::{
    GrantLeaseRequest, Instance, KeepAliveRequest, RegisterRequest,
};
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;
use testkit::{READY_TIMEOUT, Registry, command};

pub use testkit::NodeHost as Node;

/// calculator with weight `calc`, echo with weight `echo`.
pub fn both(calc: u32, echo: u32) -> String {
    format!("[plugins.calculator]\nweight = {calc}\n[plugins.echo]\nweight = {echo}\n")
}

/// A registry and one node host serving calculator with weight `calc` and
/// echo with weight `echo`, once both are listed.
pub fn registry_with_both(calc: u32, echo: u32) -> (Registry, Node) {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, &both(calc, echo));
    wait_instances(registry.addr, "calculator", 1);
    wait_instances(registry.addr, "echo", 1);
    (registry, node)
}

/// Runs `client ARGS` against `registry` to completion.
pub fn client(registry: SocketAddr, args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = command("client");
    cmd.env("REGISTRY_ADDR", registry.to_string()).args(args);
    testkit::run(cmd, Duration::from_secs(60))
}

/// `client watch` against `registry`, once it says it is watching.
pub fn client_watch(registry: SocketAddr) -> testkit::Process {
    let mut cmd = command("client");
    cmd.env("REGISTRY_ADDR", registry.to_string()).arg("watch");
    let watch = testkit::Process::spawn("watch", cmd);
    watch.wait_for_line("watching the registry", READY_TIMEOUT);
    watch
}

/// Runs `client ARGS`, asserts success and returns stdout.
pub fn client_ok(registry: SocketAddr, args: &[&str]) -> String {
    let (status, out, err) = client(registry, args);
    assert!(status.success(), "client {args:?} failed: {err}");
    out
}

/// Runs `client ARGS`, asserts failure and returns stderr.
pub fn client_err(registry: SocketAddr, args: &[&str]) -> String {
    let (status, out, err) = client(registry, args);
    assert!(!status.success(), "client {args:?} succeeded: {out}");
    assert_eq!(status.code(), Some(1), "{err}");
    err
}

/// The JSON values printed one after another on stdout.
pub fn json_values(out: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(out)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .collect()
}

/// The rows of the spread table a `call --repeat` prints: (instance,
/// weight, calls). The weight is parsed as `W` (`String` keeps it as
/// printed).
pub fn spread<W: std::str::FromStr>(out: &str) -> Vec<(String, W, u32)>
where
    W::Err: std::fmt::Debug,
{
    out.lines()
        .skip_while(|l| !l.starts_with("instance"))
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (
                cols[0].to_string(),
                cols[1].parse().unwrap(),
                cols[3].parse().unwrap(),
            )
        })
        .collect()
}

/// The calls `addr` served in `spread`'s rows (0 when it has no row).
pub fn calls_to<W>(rows: &[(String, W, u32)], addr: SocketAddr) -> u32 {
    rows.iter()
        .find(|r| r.0 == addr.to_string())
        .map_or(0, |r| r.2)
}

/// Waits until `client list --json` shows `n` instances of `service`.
pub fn wait_instances(registry: SocketAddr, service: &str, n: usize) {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let (_, out, _) = client(registry, &["list", "--json"]);
        let count = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| {
                v["services"].as_array().and_then(|s| {
                    s.iter()
                        .find(|s| s["name"] == service)
                        .and_then(|s| s["instances"].as_array().map(Vec::len))
                })
            })
            .unwrap_or(0);
        if count == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{service} never had {n} instances: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Registers `instance` (with `descriptors`, if any) under a fresh lease of
/// `ttl_ms` (0: the registry's default) and keeps the lease alive until the
/// registry goes away.
pub async fn register_by_hand(
    registry: &Registry,
    ttl_ms: u64,
    instance: Instance,
    descriptors: Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    let mut client = registry.client().await;
    let lease = client
        .grant_lease(GrantLeaseRequest { ttl_ms })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let heartbeat = KeepAliveRequest {
        lease_id: lease.lease_id,
        lease_secret: lease.lease_secret.clone(),
    };
    tx.send(heartbeat.clone()).await.unwrap();
    let mut replies = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    client
        .register(RegisterRequest {
            lease_id: lease.lease_id,
            lease_secret: lease.lease_secret,
            instance: Some(instance),
            file_descriptor_set: descriptors,
        })
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if tx.send(heartbeat.clone()).await.is_err() {
                return;
            }
            if !matches!(replies.message().await, Ok(Some(_))) {
                return;
            }
        }
    })
}
