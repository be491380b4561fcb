//! A LAN of network namespaces for multi-host tests.
//!
//! [`Lan::new`] makes one network namespace per host, each with an `eth0`
//! plugged by a veth pair into one Linux bridge in the root namespace:
//!
//! ```text
//!   test process (root ns) 198.18.K.1 ── bridge tkbrK ─┬─ tkvKh0 ═ eth0 [ns host 0] 198.18.K.10
//!                                                     ├─ tkvKh1 ═ eth0 [ns host 1] 198.18.K.11
//!                                                     └─ ...
//! ```
//!
//! The bridge lives in the root namespace and has an address of its own, so
//! the test process itself reaches every host directly (a tonic client
//! against `198.18.K.10:50051` works from the test).
//!
//! # Parallel LANs
//! Tests run in parallel threads and several test binaries may run at once;
//! LANs in the root namespace must not share a subnet. Each LAN claims an
//! index `K` by creating the bridge `tkbrK` (creation fails if another LAN
//! holds it, so the claim is atomic across processes) and uses
//! 198.18.K.0/24. The first LAN on a machine gets K = 0: hosts 198.18.0.10,
//! 198.18.0.11, ...
//!
//! # Cleanup
//! Dropping the [`Lan`] (also while unwinding from a panic) kills every
//! process left in its namespaces, then deletes the namespaces, the veths and
//! the bridge. A run that was killed cannot clean up: its bridge carries the
//! alias `testkit-lan pid=N` and its namespaces are named `tklanK-pN-hI`, so
//! the next [`Lan::new`] removes the leftovers of processes that no longer
//! exist.
//!
//! # Two networks
//! [`Lan::plug`] gives a host of one LAN a second interface on another (a
//! back-end network: registry replicas that reach etcd on a LAN of their
//! own), so that cutting one cable leaves the other up.
//!
//! # etcd in the LAN
//! [`EtcdCluster`] runs one etcd member per host (client port 2379, peer
//! port 2380 on the host's address), as a real cluster would be.
//!
//! # Cutting a cable
//! [`Lan::cut`] sets the bridge-side end of a host's veth down: the host's
//! `eth0` loses carrier and every frame to or from it is dropped silently. No
//! one gets a TCP reset or an ICMP error from the far side; connections just
//! stop hearing from each other, as with a pulled cable. [`Lan::heal`] sets
//! it up again, and connections that survived resume.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{Process, bin_path};

/// Alias written on every bridge a LAN creates; followed by `pid=N`.
const ALIAS: &str = "testkit-lan";

/// Most hosts on one LAN: host addresses run from .10 to .254.
pub const MAX_HOSTS: usize = 245;

/// Why a LAN could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LanError {
    /// `ip` could not be started (iproute2 missing?).
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    NoIpTool(#[source] std::io::Error),
    /// An `ip` command failed (not root? no network namespace support?).
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments given to `ip`.
        args: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Every subnet index 0..=255 is taken by another live LAN.
    #[error("no free 198.18.K.0/24 subnet: 256 LANs exist")]
    NoFreeSubnet,
    /// More hosts than one /24 holds.
    #[error("{0} hosts asked for; at most {MAX_HOSTS}")]
    TooManyHosts(usize),
}

/// Runs `ip` with `args`; its stdout on success.
fn ip(args: &[&str]) -> Result<String, LanError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(LanError::NoIpTool)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LanError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Kills (SIGKILL) every process inside namespace `ns`.
fn kill_all_in(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").arg("-9").arg(pid).status();
        }
    }
}

/// Whether a process with this pid exists.
fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Names of the existing network namespaces.
fn netns_list() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        // Lines look like `name (id: 3)` or just `name`.
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Parses `tklan{K}-p{PID}-h{I}` into (K, PID).
fn parse_ns_name(name: &str) -> Option<(u8, u32)> {
    let rest = name.strip_prefix("tklan")?;
    let (k, rest) = rest.split_once("-p")?;
    let (pid, _) = rest.split_once("-h")?;
    Some((k.parse().ok()?, pid.parse().ok()?))
}

/// Removes what dead test processes left behind: namespaces and bridges
/// whose owner pid no longer exists. Errors are ignored: another process may
/// be cleaning the same leftovers at the same time.
fn remove_leftovers() {
    for ns in netns_list() {
        if let Some((_, pid)) = parse_ns_name(&ns)
            && !pid_alive(pid)
        {
            kill_all_in(&ns);
            let _ = ip(&["netns", "del", &ns]);
        }
    }
    let bridges = ip(&["-o", "link", "show", "type", "bridge"]).unwrap_or_default();
    for line in bridges.lines() {
        // `6: tkbr3: <...> ... alias testkit-lan pid=123`
        let Some(name) = line.split_whitespace().nth(1) else {
            continue;
        };
        let name = name.trim_end_matches(':');
        if !name.starts_with("tkbr") {
            continue;
        }
        let owner = line
            .split(&format!("{ALIAS} pid="))
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<u32>().ok());
        // A bridge without alias is being created right now by a live LAN.
        if let Some(pid) = owner
            && !pid_alive(pid)
        {
            let _ = ip(&["link", "del", name]);
        }
    }
}

/// A set of hosts (network namespaces) on one bridged subnet. Dropping it
/// removes everything it created.
#[derive(Debug)]
pub struct Lan {
    /// K in 198.18.K.0/24, claimed through the bridge's name.
    index: u8,
    /// The bridge in the root namespace, `tkbrK`.
    bridge: String,
    /// The hosts, in creation order.
    hosts: Vec<Host>,
}

/// One host of a [`Lan`]: a network namespace with `lo` and `eth0` up.
#[derive(Debug, Clone)]
pub struct Host {
    /// Name of the network namespace (`ip netns exec NAME ...`).
    netns: String,
    /// Its address on `eth0` (on a LAN it was [plugged](Lan::plug) into:
    /// on that interface).
    ip: Ipv4Addr,
    /// The bridge-side end of its veth pair, in the root namespace; what
    /// [`Lan::cut`] sets down.
    veth: String,
    /// Whether the LAN holding this handle made the namespace (and so
    /// deletes it), or only plugged it in.
    owned: bool,
}

impl Lan {
    /// Builds a LAN of `n_hosts` hosts. Needs root (CAP_NET_ADMIN and
    /// CAP_SYS_ADMIN) and iproute2; see [`lan_for_test`] for tests.
    pub fn new(n_hosts: usize) -> Result<Lan, LanError> {
        if n_hosts > MAX_HOSTS {
            return Err(LanError::TooManyHosts(n_hosts));
        }
        remove_leftovers();
        let pid = std::process::id();
        let index = claim_bridge(pid)?;
        // From here on, Drop undoes whatever was made, even if a later step fails.
        let mut lan = Lan {
            index,
            bridge: bridge_name(index),
            hosts: Vec::new(),
        };
        let gateway = format!("{}/24", lan.gateway());
        ip(&["addr", "add", &gateway, "dev", &lan.bridge])?;
        ip(&["link", "set", &lan.bridge, "up"])?;
        for i in 0..n_hosts {
            let host = Host {
                netns: format!("tklan{index}-p{pid}-h{i}"),
                ip: Ipv4Addr::new(198, 18, index, 10 + i as u8),
                veth: format!("tkv{index}h{i}"),
                owned: true,
            };
            ip(&["netns", "add", &host.netns])?;
            lan.hosts.push(host.clone());
            let ns = host.netns.as_str();
            ip(&[
                "link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            ip(&["link", "set", &host.veth, "master", &lan.bridge])?;
            ip(&["link", "set", &host.veth, "up"])?;
            let addr = format!("{}/24", host.ip);
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(lan)
    }

    /// Host number `i` (0-based), address 198.18.K.(10 + i).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Plugs `host`, a host of another LAN, into this one too: a second
    /// interface (`lanK`) with the next address of this LAN. Returns the
    /// host as this LAN sees it: the same namespace, this LAN's address,
    /// and the cable [`cut`](Self::cut) unplugs (this one only). Dropping
    /// this LAN removes the interface, not the host.
    pub fn plug(&mut self, host: &Host) -> Result<Host, LanError> {
        let i = self.hosts.len();
        if i >= MAX_HOSTS {
            return Err(LanError::TooManyHosts(i + 1));
        }
        let index = self.index;
        let plugged = Host {
            netns: host.netns.clone(),
            ip: Ipv4Addr::new(198, 18, index, 10 + i as u8),
            veth: format!("tkv{index}h{i}"),
            owned: false,
        };
        let inside = format!("lan{index}");
        let ns = plugged.netns.as_str();
        ip(&[
            "link",
            "add",
            &plugged.veth,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
            "netns",
            ns,
        ])?;
        self.hosts.push(plugged.clone());
        ip(&["link", "set", &plugged.veth, "master", &self.bridge])?;
        ip(&["link", "set", &plugged.veth, "up"])?;
        let addr = format!("{}/24", plugged.ip);
        ip(&["-n", ns, "addr", "add", &addr, "dev", &inside])?;
        ip(&["-n", ns, "link", "set", &inside, "up"])?;
        Ok(plugged)
    }

    /// All hosts.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The bridge's own address, 198.18.K.1: the test process's address on
    /// this LAN.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, 1)
    }

    /// The bridge's interface name in the root namespace, `tkbrK`.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Unplugs `host`'s cable: everything it sends or is sent is dropped
    /// silently (no TCP reset, no ICMP error from anyone). Panics if `ip`
    /// fails.
    pub fn cut(&self, host: &Host) {
        ip(&["link", "set", &host.veth, "down"]).unwrap_or_else(|e| panic!("cut: {e}"));
    }

    /// Plugs `host`'s cable back in.
    pub fn heal(&self, host: &Host) {
        ip(&["link", "set", &host.veth, "up"]).unwrap_or_else(|e| panic!("heal: {e}"));
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for host in &self.hosts {
            if host.owned {
                kill_all_in(&host.netns);
            }
            // Deleting one end of a veth pair deletes both.
            let _ = ip(&["link", "del", &host.veth]);
            if host.owned {
                let _ = ip(&["netns", "del", &host.netns]);
            }
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// `tkbrK`.
fn bridge_name(index: u8) -> String {
    format!("tkbr{index}")
}

/// Creates the first free bridge `tkbrK` and marks it as owned by `pid`.
fn claim_bridge(pid: u32) -> Result<u8, LanError> {
    for index in 0..=u8::MAX {
        let name = bridge_name(index);
        match ip(&["link", "add", "name", &name, "type", "bridge"]) {
            Ok(_) => {
                let alias = format!("{ALIAS} pid={pid}");
                let marked = ip(&["link", "set", &name, "alias", &alias]).and_then(|_| {
                    // No STP: ports forward as soon as they are up (heal).
                    ip(&["link", "set", &name, "type", "bridge", "forward_delay", "0"])
                });
                if let Err(e) = marked {
                    let _ = ip(&["link", "del", &name]);
                    return Err(e);
                }
                return Ok(index);
            }
            Err(LanError::Ip { stderr, .. }) if stderr.contains("exists") => continue,
            Err(e) => return Err(e),
        }
    }
    Err(LanError::NoFreeSubnet)
}

impl Host {
    /// Its address on the LAN.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The name of its network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A `Command` that runs workspace binary `bin` inside this host
    /// (`ip netns exec NS <bin> ...`; `ip` execs the binary, so the child's
    /// pid is the binary's own). Logs at `info` unless RUST_LOG is set.
    pub fn command(&self, bin: &str) -> Command {
        self.command_path(bin_path(bin))
    }

    /// Like [`command`](Self::command) for any program.
    pub fn command_path(&self, program: impl Into<PathBuf>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns")
            .arg("exec")
            .arg(&self.netns)
            .arg(program.into());
        for var in crate::BINARY_ENV {
            cmd.env_remove(var);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }

    /// Starts workspace binary `bin` with `args` inside this host; `name`
    /// prefixes its captured output.
    pub fn spawn(&self, name: &str, bin: &str, args: &[&str]) -> Process {
        let mut cmd = self.command(bin);
        cmd.args(args);
        Process::spawn(name, cmd)
    }

    /// Runs workspace binary `bin` with `args` inside this host to
    /// completion: exit status, stdout, stderr. Panics after `timeout`.
    pub fn run(
        &self,
        bin: &str,
        args: &[&str],
        timeout: Duration,
    ) -> (std::process::ExitStatus, String, String) {
        let mut cmd = self.command(bin);
        cmd.args(args);
        crate::run(cmd, timeout)
    }
}

/// etcd's client port on each member's host.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port on each member's host.
pub const ETCD_PEER_PORT: u16 = 2380;

/// A scratch directory only its owner may read, as etcd wants its data
/// directory.
fn private_dir(what: &str) -> crate::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::TempDir::new(what);
    let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700));
    dir
}

/// One member of an [`EtcdCluster`].
struct EtcdMember {
    /// `eI`.
    name: String,
    /// Where it runs.
    host: Host,
    /// `None` while killed.
    process: Option<Process>,
    /// Its data directory, kept across restarts.
    data: crate::TempDir,
}

/// A real etcd cluster, one member per host, on the hosts' LAN addresses
/// (client port [`ETCD_CLIENT_PORT`], peer port [`ETCD_PEER_PORT`]). The
/// members are killed when it is dropped (and by the LAN's drop anyway).
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    /// `e0=http://IP0:2380,...`.
    initial: String,
}

impl EtcdCluster {
    /// Starts one member on each of `hosts` and waits until every one
    /// serves clients (which etcd does once the cluster has a leader).
    pub fn start(hosts: &[&Host]) -> EtcdCluster {
        let initial = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| format!("e{i}=http://{}:{ETCD_PEER_PORT}", h.ip()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: hosts
                .iter()
                .enumerate()
                .map(|(i, h)| EtcdMember {
                    name: format!("e{i}"),
                    host: (*h).clone(),
                    process: None,
                    data: private_dir(&format!("etcd-e{i}")),
                })
                .collect(),
            initial,
        };
        // All at once: each waits for the others to elect a leader.
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new");
        }
        for i in 0..cluster.members.len() {
            cluster.wait_serving(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let member = &mut self.members[i];
        let ip = member.host.ip();
        let client = format!("http://{ip}:{ETCD_CLIENT_PORT}");
        let peer = format!("http://{ip}:{ETCD_PEER_PORT}");
        let mut cmd = member.host.command_path(crate::etcd::etcd_bin());
        cmd.arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.data.path().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!(
                "--initial-cluster-token=testkit-{}",
                std::process::id()
            ))
            .arg("--logger=zap")
            // Info: the ready line below is logged at info.
            .arg("--log-level=info");
        member.process = Some(Process::spawn(&member.name, cmd));
    }

    fn wait_serving(&self, i: usize) {
        if let Some(p) = &self.members[i].process {
            // etcd 3.4's zap logger: "serving client traffic insecurely".
            p.wait_for_line("serving client traffic", crate::READY_TIMEOUT);
        }
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never: a cluster has members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `IP0:2379,IP1:2379,...`: every member's client address.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}:{ETCD_CLIENT_PORT}", m.host.ip()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The registry's `--store` for this cluster, keys under `prefix`.
    pub fn store(&self, prefix: &str) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoints(),
            prefix.trim_start_matches('/')
        )
    }

    /// The member that leads the cluster now: of those that logged etcd's
    /// `... became leader at term N`, the one with the highest term.
    /// Panics when none did (the cluster serves only once one has).
    pub fn leader(&self) -> usize {
        let term = |line: &str| -> Option<u64> {
            let (_, after) = line.split_once("became leader at term ")?;
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        self.members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let lines = m.process.as_ref()?.lines();
                Some((lines.iter().filter_map(|l| term(l)).max()?, i))
            })
            .max()
            .map(|(_, i)| i)
            .unwrap_or_else(|| panic!("no etcd member logged that it became the leader"))
    }

    /// SIGKILL of member `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill9();
        }
    }

    /// Starts member `i` again on its data (after [`kill9`](Self::kill9));
    /// waits until it serves clients.
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i, "existing");
        self.wait_serving(i);
    }

    /// Whether member `i` is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i]
            .process
            .as_mut()
            .is_some_and(Process::is_running)
    }
}

/// The reason every test that needs a [`Lan`] is `#[ignore]`d with, so
/// `cargo test` reports it as ignored (never as passed) where it cannot run;
/// `scripts/test.sh` runs them (`-- --ignored`) when it is root.
pub const NEEDS_ROOT: &str = "needs root (network namespaces); scripts/test.sh runs it as root";

/// A LAN for a test. Panics, saying the test needs root, when this machine
/// cannot make one (not root, no iproute2, no namespaces): such tests are
/// `#[ignore]`d (see [`NEEDS_ROOT`]) and run on purpose, so this is a
/// failure, never a silent pass.
pub fn lan_for_test(n_hosts: usize) -> Lan {
    Lan::new(n_hosts).unwrap_or_else(|e| {
        panic!("this test needs root and iproute2 (`ip`) to build a LAN of network namespaces: {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_parse() {
        assert_eq!(parse_ns_name("tklan3-p1234-h0"), Some((3, 1234)));
        assert_eq!(parse_ns_name("tklan255-p9-h12"), Some((255, 9)));
        assert_eq!(parse_ns_name("other"), None);
        assert_eq!(parse_ns_name("tklanx-p1-h0"), None);
    }

    #[test]
    fn interface_names_fit_in_15_chars() {
        let longest_veth = format!("tkv{}h{}", u8::MAX, MAX_HOSTS - 1);
        assert!(longest_veth.len() <= 15, "{longest_veth}");
        assert!(bridge_name(u8::MAX).len() <= 15);
    }
}
