//! What services.toml mounts is what gets registered, and the terminal
//! commands u / r / q and the signals do what they say.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{CHANGE, Node, resolve, wait_for_weights};
use registry_proto::registry::v1::registry_client::RegistryClient;
use testkit::Registry;
use tonic::transport::Channel;

const BOTH: &str = r#"
[plugins.calculator]
weight = 7
metadata = { zone = "lab", version = "1.2" }

[plugins.echo]
weight = 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_plugins_are_registered_with_weight_metadata_and_address() {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, BOTH);
    let mut client = registry.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;

    let calc = resolve(&mut client, "calculator").await;
    assert_eq!(calc.len(), 1);
    let calc = &calc[0];
    assert_eq!(calc.host, "127.0.0.1");
    assert_eq!(calc.port, u32::from(node.addr.port()));
    assert_eq!(calc.instance_id, node.addr.to_string());
    assert_eq!(calc.proto_service, "calculator.v1.Calculator");
    assert_eq!(calc.metadata.get("zone").map(String::as_str), Some("lab"));
    assert_eq!(
        calc.metadata.get("version").map(String::as_str),
        Some("1.2")
    );
    let echo = &resolve(&mut client, "echo").await[0];
    assert_eq!(echo.proto_service, "echo.v1.Echo");
    assert!(echo.metadata.is_empty());

    // The descriptors registered are the plugin's own.
    let d = testkit::calls::descriptors(&mut client, "calculator").await;
    assert_eq!(d.proto_service, "calculator.v1.Calculator");
    assert_eq!(
        d.file_descriptor_set,
        registry_proto::CALCULATOR_DESCRIPTORS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_and_absent_plugins_are_not_registered_and_missing_weight_is_random() {
    let registry = Registry::start(&[]);
    // One node leaves calculator out of its file, the other disables it.
    let absent = Node::start(registry.addr, "[plugins.echo]\n");
    let disabled = Node::start(
        registry.addr,
        "[plugins.echo]\nweight = 2\n\n[plugins.calculator]\nenabled = false\nweight = 4\n",
    );
    let mut client = registry.client().await;
    let echo = testkit::eventually(CHANGE, "both echoes registered", || {
        let mut client = client.clone();
        async move {
            let echoes = resolve(&mut client, "echo").await;
            (echoes.len() == 2).then_some(echoes)
        }
    })
    .await;
    let random = echo
        .iter()
        .find(|i| i.port == u32::from(absent.addr.port()))
        .unwrap();
    assert!(
        (1..=10).contains(&random.effective_weight()),
        "random weight {}",
        random.effective_weight()
    );
    absent.process.wait_for_line(
        &format!("using random weight {}", random.effective_weight()),
        CHANGE,
    );
    // A node registers its plugins in name order in one pass: calculator
    // would have gone before echo, so it is not merely late.
    assert!(resolve(&mut client, "calculator").await.is_empty());
    // Nor is it served by either node.
    for node in [&absent, &disabled] {
        let err = common::calculator_refused(node).await;
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{}", node.addr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_address_defaults_to_a_reachable_ip() {
    let registry = Registry::start(&[]);
    let node = Node::launch(registry.addr, BOTH).advertise(None).start();
    let mut client = registry.client().await;
    // The registry is on loopback: the node advertises this machine's LAN
    // address when it has one, loopback otherwise (the LAN tests check a
    // registry on another host). Either way, this asserts.
    let expected = match local_ip_address::local_ip() {
        Ok(lan) if !lan.is_loopback() && !lan.is_unspecified() => lan,
        _ => std::net::IpAddr::from([127, 0, 0, 1]),
    };
    assert_eq!(node.addr.ip(), expected);
    // What the registry lists is what the node printed.
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_unregisters_r_registers_q_deregisters_and_exits_zero() {
    let registry = Registry::start(&[]);
    let mut node = Node::start(registry.addr, BOTH);
    let mut client = registry.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;

    node.process.send_line("u");
    node.process
        .wait_for_line("unregistered 2 services", CHANGE);
    wait_for_weights(&mut client, node.addr, &[]).await;
    // Still serving while unregistered.
    let mut calc = registry_proto::calculator::v1::calculator_client::CalculatorClient::new(
        node.channel().await,
    );
    let r = calc
        .add(registry_proto::calculator::v1::BinaryRequest { a: 1.0, b: 2.0 })
        .await
        .unwrap();
    assert_eq!(r.into_inner().value, 3.0);

    node.process.send_line("r");
    node.process.wait_for_line("registered 2 services", CHANGE);
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;

    node.process.send_line("what");
    let (after, _) =
        node.process
            .wait_for_line_after(0, "unknown command \"what\"; commands: u =", CHANGE);
    node.process.send_line("help");
    let (_, line) = node
        .process
        .wait_for_line_after(after, "commands: u =", CHANGE);
    assert!(line.starts_with("commands:"), "{line}");

    node.process.send_line("q");
    left_cleanly(&mut node, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_stdin_keeps_running_and_sigterm_acts_like_q() {
    let registry = Registry::start(&[]);
    let mut node = Node::start(registry.addr, BOTH);
    let mut client = registry.client().await;
    node.process.close_stdin();
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;
    // Two heartbeats' worth later it is still there and registered.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(node.process.is_running());
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;

    node.process.signal(15);
    left_cleanly(&mut node, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_acts_like_q() {
    let registry = Registry::start(&[]);
    let mut node = Node::start(registry.addr, BOTH);
    let mut client = registry.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;
    node.process.signal(2);
    let status = node.process.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    node.process
        .wait_for_line("deregistered 2 services", CHANGE);
    assert!(resolve(&mut client, "echo").await.is_empty());
}

#[test]
fn bad_flags_and_bad_files_are_clear_errors() {
    let (status, _, stderr) = testkit::run(
        {
            let mut c = testkit::command("node-host");
            c.args(["--port", "70000"]);
            c
        },
        Duration::from_secs(20),
    );
    assert!(!status.success());
    assert!(stderr.contains("70000"), "{stderr}");
    assert!(stderr.contains("--port"), "{stderr}");

    let dir = common::TempDir::new("node-host-test");
    let path = dir.join("services.toml");
    std::fs::write(
        &path,
        "[plugins.calculator]\nweight = 2\n\n[plugins.calcualtor]\n",
    )
    .unwrap();
    let (status, _, stderr) = testkit::run(
        {
            let mut c = testkit::command("node-host");
            c.arg("--config").arg(&path);
            c
        },
        Duration::from_secs(20),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("services.toml:4: unknown plugin `calcualtor`, known: calculator, echo"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_values_apply_and_flags_override_them() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let dir = common::TempDir::new("node-host-test");
    let path = dir.join("services.toml");

    // The file alone names registry, advertise and port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &path,
        format!(
            "registry = \"{}\"\nadvertise = \"127.0.0.1\"\nport = {port}\n[plugins.echo]\nweight = 4\n",
            registry.addr
        ),
    )
    .unwrap();
    let mut cmd = testkit::command("node-host");
    cmd.arg("--config").arg(&path).env_remove("REGISTRY_ADDR");
    let node = testkit::Process::spawn("node-host", cmd);
    let addr = testkit::addr_from_line(
        &node.wait_for_line("node-host serving on", testkit::READY_TIMEOUT),
    );
    assert_eq!(addr, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    wait_for_weights(&mut client, addr, &[("echo", 4)]).await;
    drop(node);

    // Flags (and REGISTRY_ADDR) win over a file naming a dead registry.
    std::fs::write(
        &path,
        "registry = \"127.0.0.1:1\"\nadvertise = \"10.1.2.3\"\n[plugins.echo]\nweight = 5\n",
    )
    .unwrap();
    let mut cmd = testkit::command("node-host");
    cmd.arg("--config")
        .arg(&path)
        .args(["--advertise", "127.0.0.1"])
        .env("REGISTRY_ADDR", registry.addr.to_string());
    let node = testkit::Process::spawn("node-host", cmd);
    let addr = testkit::addr_from_line(
        &node.wait_for_line("node-host serving on", testkit::READY_TIMEOUT),
    );
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    wait_for_weights(&mut client, addr, &[("echo", 5)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_register_is_retried_until_it_passes() {
    // One registration per second from this address: the lease takes the
    // first, so each Register is refused at least once. The refusal carries
    // a RetryInfo detail, which the node reads as "wait and retry" (any
    // other RESOURCE_EXHAUSTED would leave the plugin unregistered until its
    // settings change).
    let registry = Registry::start(&["--max-registrations-per-sec-per-ip", "1"]);
    let node = Node::start(registry.addr, BOTH);
    let mut client = registry.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7), ("echo", 3)]).await;
}

/// Waits for `node` to exit with success, its lease revoked: gone because
/// the registry reported removing both services, not merely because the
/// exit broke the KeepAlive stream.
async fn left_cleanly(node: &mut Node, client: &mut RegistryClient<Channel>) {
    let status = node.process.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    node.process
        .wait_for_line("deregistered 2 services", CHANGE);
    assert!(resolve(client, "calculator").await.is_empty());
    assert!(resolve(client, "echo").await.is_empty());
}
