//! A built-in plugin's own health takes the same path as an external
//! plugin's: NOT_SERVING deregisters it (it stays mounted and answers),
//! SERVING registers it again. The node runs in this process (so the test
//! can flip the echo plugin's health switch), against a real registry.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{CHANGE, resolve};
use node_host::config::Config;
use node_host::node::{FixedByFlags, Node, Registry as RegistryLink};
use node_host::plugin::{Plugin, WithHealth};
use node_host::plugins::{calculator::CalculatorPlugin, echo::EchoPlugin};
use registry_proto::echo::v1::EchoRequest;
use registry_proto::echo::v1::echo_client::EchoClient;
use support::Connector;
use testkit::Registry;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn wait_count(registry: &Registry, service: &str, n: usize) {
    let client = registry.client().await;
    testkit::eventually(CHANGE, &format!("{n} instances of {service}"), || {
        let mut client = client.clone();
        async move { (resolve(&mut client, service).await.len() == n).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_in_plugin_that_says_not_serving_is_deregistered_and_comes_back() {
    let registry = Registry::start(&[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (echo, serving) = WithHealth::switch(Arc::new(EchoPlugin));
    let plugins: Vec<Arc<dyn Plugin>> = vec![Arc::new(CalculatorPlugin), Arc::new(echo)];
    let (node, routes) = Node::build(
        plugins,
        addr,
        RegistryLink {
            addr: registry.addr.to_string(),
            lease_ttl_ms: None,
            connector: Connector::plaintext(),
        },
        FixedByFlags::default(),
    )
    .await
    .unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let text = "[plugins.calculator]\nweight = 2\n[plugins.echo]\nweight = 3\n";
    let known = node_host::plugins::names();
    node.apply(Config::parse(text, "services.toml", &known, None).unwrap())
        .await;
    wait_count(&registry, "echo", 1).await;
    wait_count(&registry, "calculator", 1).await;

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone());
    let status = |service: &'static str| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status()
        }
    };
    assert_eq!(status("echo.v1.Echo").await, ServingStatus::Serving);

    serving.send(false).unwrap();
    wait_count(&registry, "echo", 0).await;
    assert_eq!(status("echo.v1.Echo").await, ServingStatus::NotServing);
    assert_eq!(status("echo").await, ServingStatus::NotServing);
    // Still mounted: a caller that has it answers; the calculator is untouched.
    let reply = EchoClient::new(channel.clone())
        .echo(EchoRequest {
            message: "still here".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "still here");
    assert_eq!(
        status("calculator.v1.Calculator").await,
        ServingStatus::Serving
    );
    let mut client = registry.client().await;
    assert_eq!(resolve(&mut client, "calculator").await.len(), 1);

    // A reload while it is NOT_SERVING does not register it.
    let reweighted = "[plugins.calculator]\nweight = 2\n[plugins.echo]\nweight = 5\n";
    let current = node.config().await;
    node.apply(Config::parse(reweighted, "services.toml", &known, Some(&current)).unwrap())
        .await;
    assert!(
        node.registrar()
            .wait_until(CHANGE, |r| !r.contains_key("echo"))
            .await
    );
    assert!(resolve(&mut client, "echo").await.is_empty());

    // SERVING again: registered with the settings in force.
    serving.send(true).unwrap();
    wait_count(&registry, "echo", 1).await;
    assert_eq!(resolve(&mut client, "echo").await[0].weight, Some(5));
    assert_eq!(status("echo.v1.Echo").await, ServingStatus::Serving);
}
