//! The node keeps serving when the registry is away, retries with backoff,
//! and registers everything again when it comes back, even after a restart
//! that lost all state. And `q` lets in-flight calls finish.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{CHANGE, Node, resolve, wait_for_weights};
use futures::StreamExt;
use registry_proto::echo::v1::EchoStreamRequest;
use registry_proto::echo::v1::echo_client::EchoClient;
use registry_proto::registry::v1::registry_client::RegistryClient;
use testkit::Registry;
use tonic::transport::Channel;

const BOTH: &str = "[plugins.calculator]\nweight = 7\n\n[plugins.echo]\nweight = 3\n";

/// A loopback address with no listener (a port the OS just handed out).
fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_unreachable_at_start_then_started() {
    let addr = free_addr();
    let node = Node::start(addr, BOTH);
    node.process
        .wait_for_line("still serving, retrying", CHANGE);
    // Serving meanwhile.
    let mut calc = registry_proto::calculator::v1::calculator_client::CalculatorClient::new(
        node.channel().await,
    );
    calc.add(registry_proto::calculator::v1::BinaryRequest { a: 1.0, b: 1.0 })
        .await
        .unwrap();

    let registry = Registry::start_on(&addr.to_string(), &[]);
    let mut client = registry.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_restart_on_the_same_port_brings_every_instance_back() {
    let mut first = Registry::start(&[]);
    let addr = first.addr;
    let nodes = [
        Node::start(addr, BOTH),
        Node::start(addr, "[plugins.echo]\nweight = 9\n"),
    ];
    // Both nodes' instances, with their weights, at `client`'s registry.
    let registered = |mut client: RegistryClient<Channel>| {
        let nodes = [nodes[0].addr, nodes[1].addr];
        async move {
            wait_for_weights(&mut client, nodes[0], &[("calculator", 7), ("echo", 3)]).await;
            wait_for_weights(&mut client, nodes[1], &[("echo", 9)]).await;
            client
        }
    };
    registered(first.client().await).await;

    first.process.kill9();
    for node in &nodes {
        node.process
            .wait_for_line("still serving, retrying", CHANGE);
    }
    let second = Registry::start_on(&addr.to_string(), &[]);
    let mut client = registered(second.client().await).await;
    assert_eq!(resolve(&mut client, "echo").await.len(), 2);

    // And the new registration is a live one: q still removes it.
    let mut nodes = nodes;
    nodes[1].process.send_line("q");
    assert!(
        nodes[1]
            .process
            .wait_exit(Duration::from_secs(20))
            .success()
    );
    wait_for_weights(&mut client, nodes[1].addr, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_lets_in_flight_calls_finish() {
    let registry = Registry::start(&[]);
    let mut node = Node::start(registry.addr, BOTH);
    let mut client = registry.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;

    let mut echo = EchoClient::new(node.channel().await);
    let mut stream = echo
        .echo_stream(EchoStreamRequest {
            message: "slow".into(),
            count: 5,
            interval_ms: 200,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.message, "slow");

    node.process.send_line("q");
    // Deregistered at once, while the call goes on.
    wait_for_weights(&mut client, node.addr, &[]).await;
    let rest: Vec<_> = stream.collect().await;
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(rest.iter().all(|r| r.is_ok()), "{rest:?}");
    assert!(node.process.wait_exit(Duration::from_secs(20)).success());
}

/// A node killed right after its instance appears is removed because its
/// KeepAlive stream broke, not because its lease ran out: the node
/// registers only once the lease is attached to that stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_registering_is_noticed_by_the_stream_not_the_ttl() {
    use registry_proto::registry::v1::{RemovalReason, event::Kind};

    // A TTL far longer than the wait below: expiry cannot be the cause.
    let registry = Registry::start(&["--default-ttl-ms", "60000"]);
    let mut client = registry.client().await;
    let mut watch = testkit::calls::watch(&mut client, &["calculator"]).await;
    let mut node = Node::start(registry.addr, "[plugins.calculator]\nweight = 2\n");
    let mut seen_added = false;
    let removed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let batch = watch.next().await.unwrap().unwrap();
            for event in batch.events {
                match Kind::try_from(event.kind).unwrap() {
                    Kind::Added if !batch.reset => {
                        seen_added = true;
                        node.process.kill9();
                    }
                    Kind::Removed if seen_added => return event,
                    _ => {}
                }
            }
        }
    })
    .await
    .expect("the killed node's instance was not removed within 20 s (TTL is 60 s)");
    assert_eq!(
        RemovalReason::try_from(removed.reason).unwrap(),
        RemovalReason::KeepaliveClosed
    );
}
