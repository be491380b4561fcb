//! External plugins end to end: the real registry, node-host and client,
//! and the Python example plugin (examples/plugins/inventory.py) run by
//! node-host from a `[plugins.NAME]` table with `command`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{CHANGE, Node, resolve};
use registry_proto::registry::v1::WatchRequest;
use testkit::{Process, READY_TIMEOUT, Registry, command};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a Python plugin may take to be SERVING here (it compiles its
/// .proto when it starts; CI machines are slow).
const PLUGIN_READY: Duration = Duration::from_secs(30);

fn example(file: &str) -> PathBuf {
    testkit::workspace_root()
        .join("examples/plugins")
        .join(file)
}

/// A `[plugins.NAME]` table running `script` with the test virtualenv's
/// Python, with extra `env` entries (TOML inline-table body).
fn python_table(name: &str, script: &std::path::Path, weight: u32, env: &str) -> String {
    format!(
        "[plugins.{name}]\ncommand = [{:?}, {:?}]\nweight = {weight}\nenv = {{ {env} }}\n",
        testkit::python3().display().to_string(),
        script.display().to_string(),
    )
}

fn inventory_table(weight: u32, env: &str) -> String {
    python_table("inventory", &example("inventory.py"), weight, env)
}

/// A node whose plugins must be SERVING within 3 s.
fn start_impatient(registry: &Registry, toml: &str) -> Node {
    Node::start_with(
        registry.addr,
        toml,
        &[
            "--advertise",
            "127.0.0.1",
            "--plugin-start-timeout-ms",
            "3000",
        ],
    )
}

/// Runs `client ARGS` against `registry`: (success, stdout, stderr).
fn client(registry: &Registry, args: &[&str]) -> (bool, String, String) {
    let mut cmd = command("client");
    cmd.arg("--registry")
        .arg(registry.addr.to_string())
        .args(args);
    let (status, out, err) = testkit::run(cmd, Duration::from_secs(30));
    (status.success(), out, err)
}

/// The pid in the node's line `plugin NAME started: pid N, ...` found
/// after line `from`; returns the index after it and the pid.
fn started_pid(node: &Process, from: usize, name: &str) -> (usize, u32) {
    let (next, line) =
        node.wait_for_line_after(from, &format!("plugin {name} started: pid "), PLUGIN_READY);
    let pid = line
        .split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    (next, pid)
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

async fn wait_gone(pid: u32, what: &str) {
    testkit::eventually(CHANGE, what, || async move { (!alive(pid)).then_some(()) }).await;
}

/// Waits until the registry lists `n` instances of `service`.
async fn wait_instances(registry: &Registry, service: &str, n: usize) {
    let mut client = registry.client().await;
    let what = format!("{n} instances of {service}");
    testkit::eventually(CHANGE, &what, || {
        let mut client = client.clone();
        async move { (resolve(&mut client, service).await.len() == n).then_some(()) }
    })
    .await;
    let _ = &mut client;
}

#[tokio::test]
async fn an_external_plugin_is_called_through_the_client_like_a_built_in_one() {
    let registry = Registry::start(&[]);
    let toml = format!(
        "[plugins.calculator]\nweight = 2\n{}",
        inventory_table(3, "")
    );
    let node = Node::start(registry.addr, &toml);
    node.process.wait_for_line(
        "plugin inventory (inventory.v1.Inventory) is SERVING",
        PLUGIN_READY,
    );
    wait_instances(&registry, "inventory", 1).await;

    // Unary.
    let (ok, out, err) = client(
        &registry,
        &["call", "inventory/Put", "name=apple", "count=3"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"count\": \"3\""), "{out}");
    client(
        &registry,
        &["call", "inventory/Put", "name=avocado", "count=1"],
    );
    client(
        &registry,
        &["call", "inventory/Put", "name=banana", "count=9"],
    );

    // Server streaming: one reply per item, in order.
    let (ok, out, err) = client(&registry, &["call", "inventory/List", "prefix=a"]);
    assert!(ok, "{err}");
    let apple = out.find("\"apple\"").expect(&out);
    let avocado = out.find("\"avocado\"").expect(&out);
    assert!(apple < avocado, "{out}");
    assert!(!out.contains("banana"), "{out}");

    // An error status reaches the client unchanged: code and message.
    let (ok, _, err) = client(&registry, &["call", "inventory/Get", "name=pear"]);
    assert!(!ok);
    assert!(err.contains("NotFound: no item named 'pear'"), "{err}");
    let (ok, _, err) = client(
        &registry,
        &["call", "inventory/Take", "name=apple", "count=5"],
    );
    assert!(!ok);
    assert!(
        err.contains("FailedPrecondition: only 3 of 'apple', cannot take 5"),
        "{err}"
    );

    // A deadline is honoured: the client gives up, and the plugin sees the
    // call end (the deadline travelled as grpc-timeout) long before its
    // 5 s delay.
    let from = node.process.line_count();
    let started = Instant::now();
    let (ok, _, err) = client(
        &registry,
        &[
            "call",
            "inventory/Get",
            "name=apple",
            "delay_ms=5000",
            "--timeout-ms",
            "300",
        ],
    );
    assert!(!ok);
    // The client's own timer, the node's (DEADLINE_EXCEEDED), or its tonic
    // server answering for the deadline (CANCELLED "Timeout expired", as
    // for a built-in plugin): whichever comes first.
    assert!(
        err.contains("DeadlineExceeded") || err.contains("Cancelled: Timeout expired"),
        "{err}"
    );
    assert!(!err.contains("Unavailable"), "{err}");
    node.process
        .wait_for_line_after(from, "the caller gave up", Duration::from_secs(10));
    eprintln!("TIMING deadline: client back after {:?}", started.elapsed());

    // Describe shows its methods, from the descriptors the node registered.
    let (ok, out, err) = client(&registry, &["describe", "inventory"]);
    assert!(ok, "{err}");
    for method in [
        "rpc Put(inventory.v1.PutRequest) returns (inventory.v1.Item)",
        "rpc Get(inventory.v1.GetRequest) returns (inventory.v1.Item)",
        "rpc List(inventory.v1.ListRequest) returns (stream inventory.v1.Item)",
    ] {
        assert!(out.contains(method), "{method} missing in\n{out}");
    }

    // The built-in plugin beside it is unaffected.
    let (ok, out, err) = client(&registry, &["call", "calculator/Add", "a=2", "b=3"]);
    assert!(ok, "{err}");
    assert!(out.contains("5"), "{out}");

    // The plugin's output is in the node's log, prefixed with its name.
    node.process
        .wait_for_line("plugin inventory: INFO put apple = 3", CHANGE);
}

/// Bytes in, bytes out: what the node must pass through untouched.
#[derive(Default)]
struct Raw;
impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}
impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}
/// Protobuf: field `number`, length-delimited.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = bytes.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(bytes);
    out
}

/// A raw gRPC call through the node: metadata both ways, trailing metadata,
/// status, and a message over a megabyte, byte for byte.
#[tokio::test]
async fn forwarding_keeps_metadata_trailers_and_large_messages() {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, &inventory_table(1, ""));
    node.process.wait_for_line(
        "plugin inventory (inventory.v1.Inventory) is SERVING",
        PLUGIN_READY,
    );
    let mut grpc = tonic::client::Grpc::new(node.channel().await)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);

    // NOT_FOUND with trailing metadata, one entry echoing our header.
    let mut request = tonic::Request::new(field(1, b"nothing"));
    request
        .metadata_mut()
        .insert("x-request-id", "test-42".parse().unwrap());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            request,
            http::uri::PathAndQuery::from_static("/inventory.v1.Inventory/Get"),
            Raw,
        )
        .await
        .expect_err("no such item");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no item named 'nothing'");
    assert_eq!(
        status
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("test-42"),
        "{:?}",
        status.metadata()
    );
    assert_eq!(
        status
            .metadata()
            .get("inventory-known")
            .and_then(|v| v.to_str().ok()),
        Some("0")
    );

    // 3 MiB of note in, the same 3 MiB back.
    let note: Vec<u8> = (0..3 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let mut put = field(1, b"big");
    put.extend(field(3, &note));
    grpc.ready().await.unwrap();
    let reply = grpc
        .unary(
            tonic::Request::new(put),
            http::uri::PathAndQuery::from_static("/inventory.v1.Inventory/Put"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let wanted = field(3, &note);
    assert!(
        reply.windows(wanted.len()).any(|w| w == wanted.as_slice()),
        "the {}-byte reply does not hold the note",
        reply.len()
    );
}

#[tokio::test]
async fn health_not_serving_takes_it_out_and_serving_brings_it_back() {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, &inventory_table(2, ""));
    let (_, pid) = started_pid(&node.process, 0, "inventory");
    wait_instances(&registry, "inventory", 1).await;
    let mut health = HealthClient::new(node.channel().await);
    let status_of = |health: &mut HealthClient<_>| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "inventory.v1.Inventory".into(),
                })
                .await
                .map(|r| r.into_inner().status())
                .ok()
        }
    };
    assert_eq!(status_of(&mut health).await, Some(ServingStatus::Serving));

    let asked = Instant::now();
    signal(pid, "USR1");
    wait_instances(&registry, "inventory", 0).await;
    eprintln!(
        "TIMING NOT_SERVING -> out of the registry: {:?}",
        asked.elapsed()
    );
    assert_eq!(
        status_of(&mut health).await,
        Some(ServingStatus::NotServing)
    );

    let asked = Instant::now();
    signal(pid, "USR2");
    wait_instances(&registry, "inventory", 1).await;
    eprintln!("TIMING SERVING -> in the registry: {:?}", asked.elapsed());
    assert_eq!(status_of(&mut health).await, Some(ServingStatus::Serving));
    assert!(alive(pid), "the same process all along");
}

#[tokio::test]
async fn a_killed_plugin_is_deregistered_at_once_and_restarted_while_calls_go_elsewhere() {
    let registry = Registry::start(&[]);
    let a = Node::start(registry.addr, &inventory_table(1, ""));
    let b = Node::start(registry.addr, &inventory_table(1, ""));
    let (after_a, pid) = started_pid(&a.process, 0, "inventory");
    wait_instances(&registry, "inventory", 2).await;

    // A watcher on the registry, already past its snapshot.
    let mut watch = registry
        .client()
        .await
        .watch(WatchRequest {
            services: vec!["inventory".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The snapshot first, possibly in parts.
    while watch.message().await.unwrap().unwrap().more {}

    // Calls in a loop on both instances, through the kill and the restart.
    let mut cmd = command("client");
    cmd.arg("--registry")
        .arg(registry.addr.to_string())
        .args(["call", "inventory/Put", "name=k", "count=1"])
        .args([
            "--repeat",
            "1000000",
            "--concurrency",
            "2",
            "--lb",
            "random",
        ]);
    let mut calls = Process::spawn("client", cmd);
    calls.wait_for_line("\"count\": \"1\"", READY_TIMEOUT);

    let killed = Instant::now();
    signal(pid, "KILL");
    let event = tokio::time::timeout(CHANGE, watch.message())
        .await
        .expect("a watch event after the kill")
        .unwrap()
        .unwrap();
    let seen = killed.elapsed();
    eprintln!("TIMING kill -9 of a plugin -> watch event: {seen:?}");
    assert!(
        event
            .events
            .iter()
            .any(|e| e.kind() == registry_proto::registry::v1::event::Kind::Removed),
        "{event:?}"
    );

    // Restarted (a new process) and registered again.
    let (_, new_pid) = started_pid(&a.process, after_a, "inventory");
    assert_ne!(new_pid, pid);
    wait_instances(&registry, "inventory", 2).await;
    eprintln!("TIMING kill -9 -> registered again: {:?}", killed.elapsed());
    // Some calls on the restarted one too, then stop the loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    calls.signal(2);
    calls.wait_exit(Duration::from_secs(20));
    let summary = calls
        .lines()
        .into_iter()
        .find(|l| l.contains("calls to inventory"))
        .expect("the client's summary");
    assert!(summary.ends_with(", 0 failed"), "{summary}");
    drop(b);
}

#[tokio::test]
async fn editing_the_command_restarts_it_and_removing_the_table_stops_it() {
    let registry = Registry::start(&[]);
    let calc = "[plugins.calculator]\nweight = 4\n";
    let node = Node::start(registry.addr, &format!("{calc}{}", inventory_table(2, "")));
    let (next, first) = started_pid(&node.process, 0, "inventory");
    wait_instances(&registry, "inventory", 1).await;
    wait_instances(&registry, "calculator", 1).await;

    // A weight change is an update in place: same process.
    node.write_config(&format!("{calc}{}", inventory_table(7, "")));
    let mut client = registry.client().await;
    testkit::eventually(CHANGE, "inventory at weight 7", || {
        let mut client = client.clone();
        async move {
            let got = resolve(&mut client, "inventory").await;
            (got.len() == 1 && got[0].weight == Some(7)).then_some(())
        }
    })
    .await;
    assert!(alive(first));

    // A changed env (so command line or environment) restarts it.
    let db = node.dir.path().join("inventory.json");
    let env = format!("INVENTORY_DB = {:?}", db.display().to_string());
    node.write_config(&format!("{calc}{}", inventory_table(7, &env)));
    let (_, second) = started_pid(&node.process, next, "inventory");
    assert_ne!(first, second);
    wait_gone(first, "the first plugin process gone").await;
    wait_instances(&registry, "inventory", 1).await;
    let (ok, _, err) = client_call_put(&registry);
    assert!(ok, "{err}");
    assert!(db.exists(), "the new process got the new environment");

    // Removing the table deregisters it, stops it, and leaves no process.
    node.write_config(calc);
    wait_instances(&registry, "inventory", 0).await;
    wait_gone(
        second,
        "the plugin process gone after its table was removed",
    )
    .await;
    node.process.wait_for_line(
        "plugin inventory removed: deregistered, then stopped",
        CHANGE,
    );
    // The calculator was never touched.
    assert_eq!(resolve(&mut client, "calculator").await.len(), 1);

    // SIGTERM on the host stops every plugin the same way.
    let from = node.process.line_count();
    node.write_config(&format!("{calc}{}", inventory_table(2, "")));
    let (_, third) = started_pid(&node.process, from, "inventory");
    wait_instances(&registry, "inventory", 1).await;
    let mut node = node;
    node.process.signal(15);
    let status = node.process.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    wait_gone(third, "the plugin process gone after SIGTERM on the host").await;
}

fn client_call_put(registry: &Registry) -> (bool, String, String) {
    client(registry, &["call", "inventory/Put", "name=x", "count=1"])
}

#[tokio::test]
async fn kill_9_of_the_host_leaves_no_plugin_behind() {
    let registry = Registry::start(&[]);
    let mut node = Node::start(registry.addr, &inventory_table(1, ""));
    let (_, pid) = started_pid(&node.process, 0, "inventory");
    node.process.wait_for_line(
        "plugin inventory (inventory.v1.Inventory) is SERVING",
        PLUGIN_READY,
    );
    assert!(alive(pid));
    node.process.kill9();
    wait_gone(pid, "the plugin gone after kill -9 of its host").await;
}

#[tokio::test]
async fn broken_plugins_are_reported_clearly_and_leave_the_others_alone() {
    let registry = Registry::start(&[]);
    // Writes 50 lines to stderr, then exits at once.
    let quits = "[plugins.quits]\ncommand = [\"sh\", \"-c\", \"for i in $(seq 1 50); do echo line $i >&2; done; exit 3\"]\n";
    let twins = python_table(
        "twins",
        &testkit::workspace_root().join("host/tests/external/twins.py"),
        1,
        "",
    );
    let toml = format!(
        "[plugins.calculator]\nweight = 2\n{}{quits}{twins}",
        inventory_table(3, "")
    );
    let node = start_impatient(&registry, &toml);

    // Exits at once: its status and its last 20 stderr lines, no more.
    let line = node.process.wait_for_line(
        "plugin quits: it exited with status 3 before it was SERVING",
        PLUGIN_READY,
    );
    assert!(line.contains("its last stderr lines: line 31 | "), "{line}");
    assert!(line.contains("line 50; starting it again in"), "{line}");
    assert!(!line.contains("line 30 |"), "{line}");
    // ... and it is not restarted in a hot loop: 250 ms, doubling.
    node.process.wait_for_line(
        "plugin quits is crash-looping (3 failures in a row)",
        CHANGE,
    );
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let starts = node
        .process
        .lines()
        .iter()
        .filter(|l| l.contains("plugin quits started"))
        .count();
    eprintln!("quits started {starts} times in {:?}", first.elapsed());
    assert!(starts <= 6, "{starts} starts: restarted too often");

    // Two services: the error names both and says how to choose.
    let line = node
        .process
        .wait_for_line("plugin twins: its reflection lists", PLUGIN_READY);
    assert!(
        line.contains(
            "its reflection lists 2 services (inventory.v1.Inventory, inventory.v1.Twin): choose one with `service = \"inventory.v1.Inventory\"` in [plugins.twins]"
        ),
        "{line}"
    );
    assert!(
        line.contains("not started again until [plugins.twins] changes"),
        "{line}"
    );

    // The others are untouched.
    wait_instances(&registry, "inventory", 1).await;
    wait_instances(&registry, "calculator", 1).await;
    let (ok, _, err) = client_call_put(&registry);
    assert!(ok, "{err}");
    let mut client = registry.client().await;
    assert!(resolve(&mut client, "quits").await.is_empty());
    assert!(resolve(&mut client, "twins").await.is_empty());
    let after = twins_processes(&node);
    assert!(after.iter().all(|pid| !alive(*pid)), "twins is stopped");
}

/// Pids the node started for `twins`.
fn twins_processes(node: &Node) -> Vec<u32> {
    node.process
        .lines()
        .iter()
        .filter(|l| l.contains("plugin twins started: pid "))
        .filter_map(|l| l.split("pid ").nth(1)?.split(',').next()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_plugin_never_healthy_times_out_naming_its_health() {
    let registry = Registry::start(&[]);
    let toml = format!(
        "[plugins.calculator]\nweight = 2\n{}",
        inventory_table(3, "INVENTORY_START_HEALTH = \"NOT_SERVING\"")
    );
    let node = start_impatient(&registry, &toml);
    let (_, pid) = started_pid(&node.process, 0, "inventory");
    let line = node
        .process
        .wait_for_line("plugin inventory: not SERVING within 3s", PLUGIN_READY);
    assert!(
        line.contains("(start timeout): its health says NOT_SERVING"),
        "{line}"
    );
    assert!(line.contains("its last stderr lines: "), "{line}");
    assert!(line.contains("health: NOT_SERVING"), "{line}");
    // That process was stopped; another one is started later.
    wait_gone(pid, "the never-healthy process stopped").await;
    let mut client = registry.client().await;
    assert!(resolve(&mut client, "inventory").await.is_empty());
    wait_instances(&registry, "calculator", 1).await;
}

#[tokio::test]
async fn the_nodes_tls_covers_an_external_plugin() {
    let registry = Registry::start(&[]);
    let (node, ca, _dir) = common::tls_node(registry.addr, &inventory_table(1, ""));
    node.process.wait_for_line(
        "plugin inventory (inventory.v1.Inventory) is SERVING",
        PLUGIN_READY,
    );
    let channel = ca.channel(node.addr, "localhost").await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let reply = grpc
        .unary(
            tonic::Request::new(field(1, b"over-tls")),
            http::uri::PathAndQuery::from_static("/inventory.v1.Inventory/Put"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    assert!(reply.windows(8).any(|w| w == b"over-tls"), "{reply:?}");
    // Plaintext is refused (at connect or at the call).
    let plain = match tonic::transport::Channel::from_shared(node.url())
        .unwrap()
        .connect()
        .await
    {
        Ok(channel) => {
            let mut grpc = tonic::client::Grpc::new(channel);
            match grpc.ready().await {
                Err(_) => true,
                Ok(()) => grpc
                    .unary(
                        tonic::Request::new(field(1, b"plain")),
                        http::uri::PathAndQuery::from_static("/inventory.v1.Inventory/Put"),
                        Raw,
                    )
                    .await
                    .is_err(),
            }
        }
        Err(_) => true,
    };
    assert!(plain);
}
