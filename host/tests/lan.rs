//! Two machines on a LAN (network namespaces): the node advertises its LAN
//! address, and a cut cable is noticed on both sides: the registry expires
//! the lease, the node reconnects and registers again once the cable is back.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{TempDir, resolve, wait_for_weights};
use registry_proto::calculator::v1::BinaryRequest;
use registry_proto::calculator::v1::calculator_client::CalculatorClient;
use registry_proto::registry::v1::registry_client::RegistryClient;
use testkit::{READY_TIMEOUT, addr_from_line};

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_address_is_advertised_and_a_cut_cable_heals() {
    let lan = testkit::netns::lan_for_test(2);
    let (registry_host, node_host) = (lan.host(0), lan.host(1));
    let registry = registry_host.spawn("registry", "registry", &["--listen", "0.0.0.0:50051"]);
    registry.wait_for_line("registry listening on", READY_TIMEOUT);
    let registry_addr = SocketAddr::new(IpAddr::V4(registry_host.ip()), 50051);

    let dir = TempDir::new("node-host-test");
    let config = dir.join("services.toml");
    std::fs::write(&config, "[plugins.calculator]\nweight = 7\n").unwrap();
    let node = node_host.spawn(
        "node-host",
        "node-host",
        &[
            "--config",
            config.to_str().unwrap(),
            "--registry",
            &registry_addr.to_string(),
        ],
    );
    let node_addr = addr_from_line(&node.wait_for_line("node-host serving on", READY_TIMEOUT));
    assert_eq!(
        node_addr.ip(),
        IpAddr::V4(node_host.ip()),
        "the LAN address is advertised"
    );

    let mut client = RegistryClient::connect(format!("http://{registry_addr}"))
        .await
        .unwrap();
    wait_for_weights(&mut client, node_addr, &[("calculator", 7)]).await;
    // Reachable from another machine (the test process) on that address.
    let instance = &resolve(&mut client, "calculator").await[0];
    let mut calc = CalculatorClient::connect(format!("http://{}:{}", instance.host, instance.port))
        .await
        .unwrap();
    let r = calc.add(BinaryRequest { a: 2.0, b: 2.0 }).await.unwrap();
    assert_eq!(r.into_inner().value, 4.0);

    lan.cut(node_host);
    // The registry hears nothing: the lease expires after its TTL (1.5 s).
    wait_for_weights(&mut client, node_addr, &[]).await;
    // The node hears nothing either and starts retrying.
    node.wait_for_line("still serving, retrying", Duration::from_secs(10));

    lan.heal(node_host);
    wait_for_weights(&mut client, node_addr, &[("calculator", 7)]).await;
}
