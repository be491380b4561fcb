//! The registry as an xDS control plane, driven by xDS clients no one here
//! wrote: gRPC Python (grpcio, from PyPI) and gRPC Node (@grpc/grpc-js with
//! @grpc/grpc-js-xds, from npm) dial `xds:///SERVICE` through a bootstrap
//! file naming the registry; real node hosts serve the calls. The limits
//! a client controls are pushed past with a plain tonic ADS client.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Node, node_with};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use serde_json::Value;
use testkit::xds::ask;
use testkit::{Process, Registry, TempDir, workspace_root};
use tokio_stream::StreamExt;

const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The registry's documented limits (registry::xds).
const MAX_NAMES_PER_TYPE: usize = 1024;
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How long one command of a client script may take.
const ANSWER: Duration = Duration::from_secs(60);

/// A bootstrap file naming `registry` as the one xDS server.
fn bootstrap(dir: &TempDir, registry: SocketAddr) -> std::path::PathBuf {
    let path = dir.path().join("xds-bootstrap.json");
    let json = serde_json::json!({
        "xds_servers": [{
            "server_uri": registry.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": "xds-test", "locality": {}},
    });
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

/// A node host serving calculator and echo, both with `weight`.
fn node(registry: &Registry, weight: u32) -> Node {
    node_with(
        &registry.addr.to_string(),
        &both(weight),
        &["--advertise", "127.0.0.1"],
        &[],
    )
}

fn both(weight: u32) -> String {
    format!("[plugins.calculator]\nweight = {weight}\n\n[plugins.echo]\nweight = {weight}\n")
}

/// A client script answering one `xds-result {json}` line per command.
struct Script {
    process: Process,
    cursor: usize,
}

impl Script {
    fn start(name: &str, mut cmd: std::process::Command, bootstrap: &std::path::Path) -> Script {
        cmd.env("GRPC_XDS_BOOTSTRAP", bootstrap);
        let process = Process::spawn(name, cmd);
        let (cursor, _) = process.wait_for_line_after(0, "xds-result ", ANSWER);
        Script { process, cursor }
    }

    fn ask(&mut self, command: &str) -> Value {
        self.process.send_line(command);
        let (cursor, line) = self
            .process
            .wait_for_line_after(self.cursor, "xds-result ", ANSWER);
        self.cursor = cursor;
        let json = line.split_once("xds-result ").unwrap().1;
        serde_json::from_str(json).unwrap()
    }
}

/// The Python client; its generated stubs go to `out` (the test's own
/// scratch directory, removed with it).
fn python(bootstrap: &std::path::Path, out: &std::path::Path, env: &[(&str, &str)]) -> Script {
    let mut cmd = std::process::Command::new(testkit::python3());
    cmd.envs(env.iter().copied());
    cmd.arg(workspace_root().join("testkit/py/xds_client.py"))
        .arg(workspace_root().join("proto/proto"))
        .arg(out);
    Script::start("python-xds", cmd, bootstrap)
}

/// Calls per server, as the script counted them.
fn counts(answer: &Value) -> BTreeMap<String, u64> {
    answer["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

/// Asserts that `n` calls split as `shares` (percent) to within 5 points.
fn assert_split(answer: &Value, n: u64, shares: &[(SocketAddr, f64)]) {
    let counts = counts(answer);
    assert_eq!(answer["failed"], 0, "no call failed: {answer}");
    assert_eq!(counts.values().sum::<u64>(), n, "{answer}");
    for (addr, share) in shares {
        let got = counts.get(&addr.to_string()).copied().unwrap_or(0) as f64 * 100.0 / n as f64;
        eprintln!("SPLIT {addr}: {got:.1}% (expected {share}%)");
        assert!(
            (got - share).abs() <= 5.0,
            "{addr} got {got:.1}% of {n} calls, expected {share}% ± 5: {answer}"
        );
    }
}

/// Waits until the registry lists `addr` under `service` with `weight`.
async fn wait_for_weight(registry: &Registry, service: &str, addr: SocketAddr, weight: u32) {
    let client = registry.client().await;
    testkit::eventually(Duration::from_secs(20), "the new weight", || {
        let mut c = client.clone();
        async move {
            let r = c
                .resolve(registry_proto::registry::v1::ResolveRequest {
                    service: service.into(),
                })
                .await
                .ok()?;
            r.into_inner()
                .instances
                .iter()
                .any(|i| i.port == u32::from(addr.port()) && i.weight == Some(weight))
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpc_dials_xds_follows_weights_new_nodes_kills_and_edits() {
    let registry = Registry::start(&[]);
    let dir = TempDir::new("xds-python");
    let a = node(&registry, 3);
    let mut b = node(&registry, 1);
    wait_for_weight(&registry, "echo", b.addr, 1).await;
    wait_for_weight(&registry, "echo", a.addr, 3).await;
    let mut py = python(&bootstrap(&dir, registry.addr), dir.path(), &[]);

    // Calls succeed, with the right answers.
    let calc = py.ask("calc 50");
    assert_eq!(
        (calc["ok"].as_u64(), calc["failed"].as_u64()),
        (Some(50), Some(0)),
        "{calc}"
    );

    // An unknown service fails at once, saying why, when the client reads
    // xRFC TP3 errors (gRPC 1.85 does behind this variable; without it, it
    // gives up after its 15 s does-not-exist timer).
    let fast_out = dir.path().join("fast");
    std::fs::create_dir_all(&fast_out).unwrap();
    let mut fast = python(
        &bootstrap(&dir, registry.addr),
        &fast_out,
        &[("GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING", "true")],
    );
    let missing = fast.ask("missing nosuch");
    drop(fast);
    assert_eq!(missing["code"], "StatusCode.UNAVAILABLE", "{missing}");
    assert!(
        missing["details"].as_str().unwrap().contains("nosuch"),
        "{missing}"
    );
    assert!(missing["ms"].as_f64().unwrap() < 4000.0, "{missing}");

    // Weights 3 and 1: 75 % / 25 %.
    let split = py.ask("split 4000");
    assert_split(&split, 4000, &[(a.addr, 75.0), (b.addr, 25.0)]);

    // A weight edited in services.toml changes the split: 3 and 3.
    std::fs::write(b.dir.path().join("services.toml"), both(3)).unwrap();
    wait_for_weight(&registry, "echo", b.addr, 3).await;
    // The push follows the registry's event; one call to let it land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let split = py.ask("split 4000");
    assert_split(&split, 4000, &[(a.addr, 50.0), (b.addr, 50.0)]);

    // A node started afterwards gets traffic within a second of serving.
    let c = node(&registry, 3);
    let until = py.ask(&format!("until {} 10", c.addr));
    eprintln!(
        "TIMING new node's first call {} ms after it served",
        until["ms"]
    );
    assert_eq!(until["seen"], true, "{until}");
    assert!(until["ms"].as_f64().unwrap() < 1000.0, "{until}");

    // A node killed with -9 mid-load: only calls in flight at the kill may
    // fail (at most one per caller, each started before the kill was
    // done); every call started after it succeeds.
    const THREADS: usize = 4;
    py.process.send_line(&format!("load 3 {THREADS}"));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    b.process.kill9();
    let killed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (cursor, line) = py
        .process
        .wait_for_line_after(py.cursor, "xds-result ", ANSWER);
    py.cursor = cursor;
    let load: Value = serde_json::from_str(line.split_once("xds-result ").unwrap().1).unwrap();
    let failures = load["failures"].as_array().unwrap();
    eprintln!(
        "KILL at {killed_ms:.0} ms: {} failed calls: {failures:?}",
        failures.len()
    );
    assert!(
        failures.len() <= THREADS,
        "more calls failed than were in flight ({THREADS}): {load}"
    );
    for f in failures {
        let at = f["ms"].as_f64().unwrap();
        assert!(
            at < killed_ms,
            "a call started {at} ms in failed, after the kill at {killed_ms:.0} ms: {load}"
        );
    }
    let served = counts(&load);
    assert!(
        served.get(&c.addr.to_string()).copied().unwrap_or(0) > 0,
        "{load}"
    );
    // After the kill, everything goes to the survivors.
    let split = py.ask("split 400");
    let after = counts(&split);
    assert_eq!(split["failed"], 0, "{split}");
    assert!(!after.contains_key(&b.addr.to_string()), "{split}");
    drop(a);
}

/// A plain tonic ADS client (envoy-types' generated stub).
async fn ads(registry: &Registry) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(registry.url())
        .await
        .unwrap()
}

/// Opens an ADS stream that sends `first`, and returns a sender for more.
async fn open(
    client: &mut AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    first: DiscoveryRequest,
) -> Result<
    (
        tokio::sync::mpsc::Sender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(first).await.unwrap();
    let stream = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

async fn next(
    stream: &mut tonic::Streaming<DiscoveryResponse>,
) -> Result<DiscoveryResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a response within 10 s")
        .expect("the stream is open")
}

#[tokio::test]
async fn ads_pushes_changes_and_bounds_what_a_client_controls() {
    let registry = Registry::start(&["--max-watches-per-connection", "2"]);
    let mut client = ads(&registry).await;

    // Subscribe to an assignment of a service that does not exist yet: an
    // empty one, then the instance as soon as it registers.
    let (tx, mut stream) = open(&mut client, ask(ENDPOINTS, &["calculator"], ""))
        .await
        .unwrap();
    let empty = next(&mut stream).await.unwrap();
    assert_eq!(empty.type_url, ENDPOINTS);
    assert_eq!(empty.resources.len(), 1);
    tx.send(ask(ENDPOINTS, &["calculator"], &empty.nonce))
        .await
        .unwrap();
    let node = node(&registry, 2);
    let pushed = next(&mut stream).await.unwrap();
    assert_ne!(pushed.nonce, empty.nonce);
    assert!(
        pushed.version_info.parse::<u64>().unwrap() > empty.version_info.parse::<u64>().unwrap()
    );
    let cla: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
        prost::Message::decode(pushed.resources[0].value.as_slice()).unwrap();
    assert_eq!(cla.endpoints.len(), 1);
    assert_eq!(cla.endpoints[0].load_balancing_weight.unwrap().value, 2);
    drop(node);

    // A second stream on the same connection is fine; a third is refused.
    let second = open(&mut client, ask(LISTENER, &["calculator"], ""))
        .await
        .unwrap();
    let third = match open(&mut client, ask(LISTENER, &["calculator"], "")).await {
        Err(status) => status,
        Ok((_tx, mut s)) => next(&mut s).await.unwrap_err(),
    };
    assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{third}");
    assert!(
        third.message().contains("--max-watches-per-connection"),
        "{third}"
    );
    drop(second);
    drop((tx, stream));

    // More names than allowed in one subscription ends the stream.
    let mut client = ads(&registry).await;
    let names: Vec<String> = (0..=MAX_NAMES_PER_TYPE)
        .map(|i| format!("svc{i}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_tx, mut s) = open(&mut client, ask(LISTENER, &refs, "")).await.unwrap();
    let status = next(&mut s).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("max 1024"), "{status}");

    // A request over the size limit is refused before it is decoded.
    let mut client = ads(&registry).await.max_encoding_message_size(usize::MAX);
    let mut huge = ask(LISTENER, &["calculator"], "");
    huge.resource_names.push("x".repeat(MAX_REQUEST_BYTES + 1));
    let status = match open(&mut client, huge).await {
        Err(status) => status,
        Ok((_tx, mut s)) => next(&mut s).await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");

    // Delta xDS is not served, and says so.
    let mut client = ads(&registry).await;
    let (_dtx, drx) = tokio::sync::mpsc::channel(1);
    let status = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(drx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // And the registry still serves.
    let (_tx, mut s) = open(&mut client, ask(LISTENER, &["calculator"], ""))
        .await
        .unwrap();
    assert_eq!(next(&mut s).await.unwrap().type_url, LISTENER);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_grpc_js_xds_dials_and_calls() {
    let registry = Registry::start(&[]);
    let dir = TempDir::new("xds-node");
    let a = node(&registry, 3);
    let b = node(&registry, 1);
    wait_for_weight(&registry, "calculator", a.addr, 3).await;
    wait_for_weight(&registry, "calculator", b.addr, 1).await;
    let js = workspace_root().join("testkit/js");
    assert!(
        js.join("node_modules/@grpc/grpc-js-xds").exists(),
        "{}/node_modules missing: run scripts/test-deps.sh (npm ci there)",
        js.display()
    );
    let mut cmd = std::process::Command::new("node");
    cmd.arg(js.join("xds_client.js"))
        .arg(workspace_root().join("proto/proto"));
    let mut script = Script::start("node-xds", cmd, &bootstrap(&dir, registry.addr));

    let calc = script.ask("calc 400");
    assert_eq!(
        (calc["ok"].as_u64(), calc["failed"].as_u64()),
        (Some(400), Some(0)),
        "{calc}"
    );
    // grpc-js names the server of each call: both nodes served, by weight.
    let peers: BTreeMap<String, u64> = calc["peers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    eprintln!("NODE peers {peers:?}");
    let share = |addr: SocketAddr| peers.get(&addr.to_string()).copied().unwrap_or(0);
    assert!(share(a.addr) > share(b.addr) && share(b.addr) > 0, "{calc}");
}
