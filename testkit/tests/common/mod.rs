//! Helpers of the end-to-end security tests: node hosts, the client binary,
//! registry connections from chosen source addresses, and places to run
//! them (loopback addresses or LAN hosts).
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use registry_proto::registry::v1 as pb;
use support::{BearerToken, RegistryConn, TlsArgs, registry_client};
use testkit::Registry;
use testkit::netns::Host;

/// How long a change may take to show: generous, CI machines are small.
pub const CHANGE: Duration = Duration::from_secs(20);

/// A node configuration with the calculator only.
pub const CALC: &str = "[plugins.calculator]\nweight = 2\n";
/// A node configuration with both plugins.
pub const BOTH: &str = "[plugins.calculator]\nweight = 2\n\n[plugins.echo]\nweight = 3\n";

#[allow(unused_imports)] // not every test file uses both
pub use testkit::{NodeHost as Node, TempDir};

/// A node host on this machine with `toml` as its file, registering with
/// `registry`, with `extra` flags (advertising 127.0.0.1 unless they say
/// otherwise) and `env`.
pub fn node_with(registry: &str, toml: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
    env.iter()
        .fold(Node::launch(registry, toml).args(extra), |node, (k, v)| {
            node.env(k, v)
        })
        .start()
}

/// A registry connection from `local` (any loopback address: the registry
/// sees it as the peer's IP), sending `token`.
pub async fn conn(
    registry: SocketAddr,
    local: Option<Ipv4Addr>,
    token: Option<&str>,
) -> RegistryConn {
    let endpoint = TlsArgs::default()
        .endpoint(&registry.to_string())
        .unwrap()
        .local_address(local.map(IpAddr::V4));
    registry_client(
        endpoint.connect().await.unwrap(),
        BearerToken::new(token).unwrap(),
    )
}

/// Every instance of `calculator` and `echo`, in order.
pub async fn instances(client: &mut RegistryConn) -> Vec<pb::Instance> {
    let mut all = resolve(client, "calculator").await;
    all.extend(resolve(client, "echo").await);
    all
}

pub use testkit::calls::resolve;

/// Waits until calculator and echo have `n` instances together.
pub async fn wait_for_count(client: &mut RegistryConn, n: usize) {
    let what = format!("{n} instances of calculator and echo");
    testkit::eventually(CHANGE, &what, || {
        let mut c = client.clone();
        async move { (instances(&mut c).await.len() == n).then_some(()) }
    })
    .await;
}

/// A Register request.
pub fn register_request(
    lease_id: u64,
    secret: &str,
    service: &str,
    id: &str,
    host: Ipv4Addr,
) -> pb::RegisterRequest {
    pb::RegisterRequest {
        lease_id,
        lease_secret: secret.into(),
        instance: Some(pb::Instance {
            service: service.into(),
            instance_id: id.into(),
            host: host.to_string(),
            port: 9,
            weight: Some(1),
            ..Default::default()
        }),
        file_descriptor_set: Vec::new(),
    }
}

/// `client --registry ADDR ARGS` on this machine, with `env`.
pub fn client(
    registry: SocketAddr,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let mut cmd = testkit::command("client");
    cmd.arg("--registry")
        .arg(registry.to_string())
        .args(args)
        .envs(env.iter().copied());
    testkit::run(cmd, Duration::from_secs(60))
}

/// Where a process runs: this machine, on a loopback address, or a host of
/// the LAN harness.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// This machine, using this loopback address.
    Loopback(Ipv4Addr),
    /// A network namespace of the LAN.
    Lan(&'a Host),
}

impl Place<'_> {
    /// The address others reach it at.
    pub fn ip(&self) -> Ipv4Addr {
        match self {
            Place::Loopback(ip) => *ip,
            Place::Lan(host) => host.ip(),
        }
    }

    fn command(&self, bin: &str) -> Command {
        match self {
            Place::Loopback(_) => testkit::command(bin),
            Place::Lan(host) => host.command(bin),
        }
    }

    /// Starts a registry here with `flags`.
    pub fn registry(&self, flags: &[String]) -> Registry {
        let cmd = self.command("registry");
        let listen = match self {
            Place::Loopback(ip) => format!("{ip}:0"),
            Place::Lan(_) => "0.0.0.0:0".to_string(),
        };
        let mut registry = Registry::launch()
            .command(cmd)
            .listen(&listen)
            .args(flags)
            .start();
        // A LAN host listens on 0.0.0.0: others reach it at its address.
        registry.addr = SocketAddr::new(IpAddr::V4(self.ip()), registry.addr.port());
        registry
    }

    /// Starts a node host here with the calculator, registering with
    /// `registry`, advertising this place's address.
    pub fn node(&self, registry: SocketAddr, flags: &[String]) -> Node {
        let node = Node::launch(registry, CALC)
            .command(self.command("node-host"))
            .advertise(Some(&self.ip().to_string()))
            .args(flags)
            .start();
        assert_eq!(node.addr.ip(), IpAddr::V4(self.ip()));
        node
    }

    /// Runs the client here to completion.
    pub fn client(&self, registry: SocketAddr, args: &[String]) -> (ExitStatus, String, String) {
        let mut cmd = self.command("client");
        cmd.arg("--registry").arg(registry.to_string()).args(args);
        testkit::run(cmd, Duration::from_secs(60))
    }
}
