//! Helpers of the end-to-end security tests: node hosts, the client binary,
//! registry connections from chosen source addresses, and places to run
//! them (loopback addresses or LAN hosts).
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use registry_proto::registry::v1 as pb;
use support::{BearerToken, RegistryConn, TlsArgs, registry_client};
use testkit::netns::Host;
use testkit::{Process, READY_TIMEOUT, Registry, addr_from_line};

/// How long a change may take to show: generous, CI machines are small.
pub const CHANGE: Duration = Duration::from_secs(20);

/// A node configuration with the calculator only.
pub const CALC: &str = "[plugins.calculator]\nweight = 2\n";
/// A node configuration with both plugins.
pub const BOTH: &str = "[plugins.calculator]\nweight = 2\n\n[plugins.echo]\nweight = 3\n";

/// Environment variables the binaries read that the test's own environment
/// must not leak into them.
const ENV: [&str; 6] = [
    "REGISTRY_TOKEN",
    "REGISTRY_WRITE_TOKEN",
    "REGISTRY_READ_TOKEN",
    "TLS_CERT",
    "TLS_KEY",
    "TLS_CA",
];

fn clean(cmd: &mut Command) {
    for var in ENV {
        cmd.env_remove(var);
    }
    cmd.env_remove("REGISTRY_ADDR");
}

pub use testkit::TempDir;

/// A running node host.
pub struct Node {
    pub process: Process,
    /// Its advertised address, from the ready line.
    pub addr: SocketAddr,
    /// Holds its services.toml.
    pub dir: TempDir,
}

impl Node {
    /// A node host on this machine with `toml` as its file, registering with
    /// `registry`, advertising 127.0.0.1 unless `extra` says otherwise.
    pub fn start(registry: &str, toml: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let mut cmd = testkit::command("node-host");
        if !extra.contains(&"--advertise") {
            cmd.args(["--advertise", "127.0.0.1"]);
        }
        Node::spawn(cmd, registry, toml, extra, env)
    }

    fn spawn(
        mut cmd: Command,
        registry: &str,
        toml: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let dir = TempDir::new("security-test");
        let config = dir.0.join("services.toml");
        std::fs::write(&config, toml).unwrap();
        clean(&mut cmd);
        cmd.arg("--config")
            .arg(&config)
            .arg("--registry")
            .arg(registry)
            .args(extra)
            .envs(env.iter().copied());
        let process = Process::spawn("node-host", cmd);
        let line = process.wait_for_line("node-host serving on", READY_TIMEOUT);
        Node {
            process,
            addr: addr_from_line(&line),
            dir,
        }
    }
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

/// The instances of `service`.
pub async fn resolve(client: &mut RegistryConn, service: &str) -> Vec<pb::Instance> {
    client
        .resolve(pb::ResolveRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instances
}

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
            weight: 1,
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
    clean(&mut cmd);
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
        let mut cmd = match self {
            Place::Loopback(_) => testkit::command(bin),
            Place::Lan(host) => host.command(bin),
        };
        clean(&mut cmd);
        cmd
    }

    /// Starts a registry here with `flags`.
    pub fn registry(&self, flags: &[String]) -> Registry {
        let mut cmd = self.command("registry");
        let listen = match self {
            Place::Loopback(ip) => format!("{ip}:0"),
            Place::Lan(_) => "0.0.0.0:0".to_string(),
        };
        cmd.arg("--listen").arg(listen).args(flags);
        let process = Process::spawn("registry", cmd);
        let line = process.wait_for_line("registry listening on", READY_TIMEOUT);
        let addr = SocketAddr::new(IpAddr::V4(self.ip()), addr_from_line(&line).port());
        Registry { process, addr }
    }

    /// Starts a node host here with the calculator, registering with
    /// `registry`, advertising this place's address.
    pub fn node(&self, registry: SocketAddr, flags: &[String]) -> Node {
        let mut cmd = self.command("node-host");
        cmd.arg("--advertise").arg(self.ip().to_string());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let node = Node::spawn(cmd, &registry.to_string(), CALC, &flags, &[]);
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
