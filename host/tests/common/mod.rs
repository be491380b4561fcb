//! Helpers shared by node-host's integration tests: a node-host process with
//! its own configuration file in a private directory, and registry queries.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use registry_proto::registry::v1::registry_client::RegistryClient;
use registry_proto::registry::v1::{Instance, ResolveRequest};
use testkit::{Process, READY_TIMEOUT, addr_from_line, command};
use tonic::transport::Channel;

/// How long a change may take to reach the registry in these tests: the
/// issue asks for about a second; CI machines are slow, so be generous.
pub const CHANGE: Duration = Duration::from_secs(5);

pub use testkit::TempDir;

/// A running node-host with its configuration file.
pub struct Node {
    pub process: Process,
    /// The advertised address from its ready line.
    pub addr: SocketAddr,
    /// Its services.toml.
    pub config: PathBuf,
    pub dir: TempDir,
}

impl Node {
    /// Starts node-host against `registry` with `toml` as its file and
    /// `--advertise 127.0.0.1` (tests only ever talk to loopback).
    pub fn start(registry: SocketAddr, toml: &str) -> Node {
        Node::start_with(registry, toml, &["--advertise", "127.0.0.1"])
    }

    /// Like [`start`](Self::start) with other extra flags.
    pub fn start_with(registry: SocketAddr, toml: &str, extra: &[&str]) -> Node {
        let dir = TempDir::new("node-host-test");
        let config = dir.0.join("services.toml");
        std::fs::write(&config, toml).unwrap();
        let mut cmd = command("node-host");
        cmd.arg("--config")
            .arg(&config)
            .arg("--registry")
            .arg(registry.to_string())
            .args(extra);
        let process = Process::spawn("node-host", cmd);
        let line = process.wait_for_line("node-host serving on", READY_TIMEOUT);
        Node {
            process,
            addr: addr_from_line(&line),
            config,
            dir,
        }
    }

    /// Replaces the configuration file in place (a plain write).
    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.config, toml).unwrap();
    }

    /// Replaces the configuration file the way editors do: write a temporary
    /// file beside it and rename it over.
    pub fn rename_config_over(&self, toml: &str) {
        let tmp = self.dir.0.join(".services.toml.swp");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// `http://addr` of the node, for typed plugin clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

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
                out.insert(s.to_string(), i.weight);
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
