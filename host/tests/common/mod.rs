//! Helpers shared by node-host's integration tests: registry queries (the
//! node-host launcher is `testkit::NodeHost`).
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use registry_proto::registry::v1::registry_client::RegistryClient;
use registry_proto::registry::v1::{Instance, ResolveRequest};
use tonic::transport::Channel;

/// How long a change may take to reach the registry in these tests: the
/// issue asks for about a second; CI machines are slow, so be generous.
pub const CHANGE: Duration = Duration::from_secs(5);

#[allow(unused_imports)] // not every test file uses both
pub use testkit::{NodeHost as Node, TempDir};

/// The instances the registry lists for `service`.
pub async fn resolve(client: &mut RegistryClient<Channel>, service: &str) -> Vec<Instance> {
    client
        .resolve(ResolveRequest {
            service: service.to_string(),
        })
        .await
        .map(|r| r.into_inner().instances)
        .unwrap_or_default()
}

/// Weight of each service's instances at `addr`: service -> weight.
pub async fn weights_at(
    client: &mut RegistryClient<Channel>,
    addr: SocketAddr,
    services: &[&str],
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for s in services {
        for i in resolve(client, s).await {
            if i.host == addr.ip().to_string() && i.port == u32::from(addr.port()) {
                out.insert(s.to_string(), i.effective_weight());
            }
        }
    }
    out
}

/// Waits until the registry holds exactly `want` (service -> weight) for
/// the node at `addr`, among calculator and echo.
pub async fn wait_for_weights(
    client: &mut RegistryClient<Channel>,
    addr: SocketAddr,
    want: &[(&str, u32)],
) {
    let want: BTreeMap<String, u32> = want.iter().map(|(s, w)| (s.to_string(), *w)).collect();
    let what = format!("registry holds {want:?} for {addr}");
    testkit::eventually(CHANGE, &what, || {
        let mut client = client.clone();
        let want = want.clone();
        async move {
            let got = weights_at(&mut client, addr, &["calculator", "echo"]).await;
            (got == want).then_some(())
        }
    })
    .await;
}

/// A node host serving `toml` over TLS (`--tls-cert/--tls-key`, names
/// 127.0.0.1 and localhost) with a certificate from a fresh test CA. The
/// CA's files live in the returned directory: keep it while the node runs.
pub fn tls_node(registry: SocketAddr, toml: &str) -> (Node, testkit::certs::TestCa, TempDir) {
    let dir = TempDir::new("node-host-tls");
    let ca = testkit::certs::TestCa::new(dir.path(), "test");
    let server = ca.server("node", &["127.0.0.1", "localhost"]);
    let node = Node::start_with(
        registry,
        toml,
        &[
            "--advertise",
            "127.0.0.1",
            "--tls-cert",
            server.cert.to_str().unwrap(),
            "--tls-key",
            server.key.to_str().unwrap(),
        ],
    );
    (node, ca, dir)
}

/// Calls `calculator.v1.Calculator/Add` on `node`, which must refuse it.
pub async fn calculator_refused(node: &Node) -> tonic::Status {
    let mut calc = registry_proto::calculator::v1::calculator_client::CalculatorClient::new(
        node.channel().await,
    );
    calc.add(registry_proto::calculator::v1::BinaryRequest { a: 1.0, b: 1.0 })
        .await
        .unwrap_err()
}
