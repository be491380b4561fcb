//! High availability: several registry replicas, and nodes and clients
//! that fail over between them (`--registry a:1,b:2`).
//!
//! - On loopback, with the memory store (each replica has a state of its
//!   own): kill -9 of the replica a node is on moves the node to the other
//!   one (a fresh lease there: the other replica never heard of the old
//!   one), the client's watch follows without removing anything (the grace
//!   period bridges the re-registration), calls go on; a one-shot command
//!   tries the next replica; with every replica down, the error names them
//!   all; a watch whose stream broke resumes from its last revision and
//!   gets what it missed as events.
//! - A stalled replica (SIGSTOP) is left after the lease TTL, not waited
//!   for as a single registry is.
//! - In network namespaces (root): a front LAN (replicas, two node hosts, a
//!   client host) and a store LAN (a three-member etcd, one member per
//!   host, and a second interface of every replica, so a replica can be cut
//!   off from etcd alone). The harness itself; a memory-store replica
//!   killed; and with three replicas over the etcd cluster
//!   (`--store etcd://...`), two node hosts, two `client watch`es and a
//!   client calling in a loop:
//!   - kill -9 of the replica the nodes are on: they resume their leases
//!     (same ids) elsewhere, the watch resumes, nothing is removed, no call
//!     fails;
//!   - kill -9 of the etcd leader: writes (`u`, `r` on a node) reach every
//!     watcher, nothing else is removed (the replicas ride out the
//!     election: no node moves);
//!   - the replica the nodes are on cut off from etcd (its store cable
//!     down, its front one up): it refuses heartbeats and writes, its nodes
//!     resume their leases elsewhere and its watch resumes elsewhere within
//!     2 s, nothing is removed, no call fails; with the cable back it
//!     serves again, caught up with a change made meanwhile;
//!   - every replica killed and started again: the same instances with the
//!     same revisions on every replica, leases kept, nothing removed, no
//!     call failed; both watchers resume (one frozen through the restart
//!     and a change after it) and get that change once;
//!   - kill -9 of a node host reaches every watcher at once; a cut node
//!     link expires within the TTL.
//!
//! Timings are printed as `TIMING name=value` lines
//! (`cargo test -p testkit --test ha -- --include-ignored --nocapture |
//! grep TIMING`): memory_failover_node_reregistered_ms,
//! stalled_replica_left_ms, etcd_member_killed_to_healthy_ms,
//! memory_replica_killed_to_nodes_reregistered_ms,
//! etcd_replica_killed_to_leases_resumed_ms,
//! etcd_replica_killed_to_watch_resumed_ms,
//! etcd_member_killed_to_write_seen_ms, etcd_replica_cut_to_refusing_ms,
//! etcd_replica_cut_to_leases_resumed_ms,
//! etcd_replica_cut_to_watch_resumed_ms, etcd_replica_healed_to_serving_ms,
//! etcd_all_replicas_restart_ms,
//! etcd_all_replicas_killed_to_watcher_back_ms,
//! etcd_node_killed_to_every_watcher_ms, etcd_node_cut_to_expired_ms.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use testkit::{NodeHost, Process, READY_TIMEOUT, Registry, TempDir};

/// `registry 127.0.0.1:4711: lease 3 granted` (or `resumed`) in a node's
/// log: the replica's address and the lease id.
fn lease_line(line: &str, verb: &str) -> Option<(String, u64)> {
    let (before, after) = line.split_once(": lease ")?;
    let addr = before.rsplit("registry ").next()?.to_string();
    let (id, rest) = after.split_once(' ')?;
    rest.starts_with(verb).then_some(())?;
    Some((addr, id.parse().ok()?))
}

/// Waits for the node's next `lease N <verb>` line from `cursor` on; returns
/// the cursor after it, the replica and the lease id.
fn wait_lease(node: &Process, cursor: usize, verb: &str, within: Duration) -> (usize, String, u64) {
    let deadline = Instant::now() + within;
    let mut from = cursor;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (next, line) = node.wait_for_line_after(from, ": lease ", left);
        if let Some((addr, id)) = lease_line(&line, verb) {
            return (next, addr, id);
        }
        from = next;
    }
}

/// A node host serving the calculator (weight 1), registering with
/// `registries`; its process.
fn start_node(registries: &str) -> Process {
    NodeHost::start(registries, CALCULATOR).process
}

const CALCULATOR: &str = "[plugins.calculator]\nweight = 1\n";

/// `client` arguments that call the calculator until interrupted.
const CALL_LOOP: &[&str] = &[
    "call",
    "calculator/Add",
    "a=1",
    "b=2",
    "--repeat",
    "10000000",
];

fn client(registries: &str) -> std::process::Command {
    let mut cmd = testkit::command("client");
    cmd.args(["--registry", registries])
        .env_remove("REGISTRY_TOKEN")
        .env_remove("REGISTRY_ADDR");
    cmd
}

#[test]
fn lease_lines_parse() {
    let line = "2026-12-01T21:00:00Z  INFO node_host::registration: registry 10.0.0.1:50051: lease 42 granted (ttl 1.5s)";
    assert_eq!(
        lease_line(line, "granted"),
        Some(("10.0.0.1:50051".to_string(), 42))
    );
    assert_eq!(lease_line(line, "resumed"), None);
}

/// Each loopback replica with a state of its own, even where testkit's
/// TESTKIT_ETCD would put registries over etcd.
const MEMORY: &[&str] = &["--store", "memory"];

/// A loopback address nothing listens on (one the OS just handed out).
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn memory_store_failover_moves_the_node_and_the_watch_and_loses_no_call() {
    // With the memory store each replica has a state of its own, so all
    // must start on the same one: B is down at first (everyone starting on
    // it moves to A at once), and started once everyone is on A.
    let mut a = Registry::start(MEMORY);
    let b_addr = free_addr();
    let addrs = vec![a.addr.to_string(), b_addr.to_string()];
    // In either order: where each starts is random anyway.
    let list = format!("{b_addr},{}", a.addr);
    let node = start_node(&list);
    let (cursor, first, lease) = wait_lease(&node, 0, "granted", READY_TIMEOUT);
    assert_eq!(first, addrs[0]);

    let mut watch_cmd = client(&list);
    watch_cmd.arg("watch");
    let watch = Process::spawn("watch", watch_cmd);
    watch.wait_for_line("+ calculator 127.0.0.1:", READY_TIMEOUT);
    let mut calls_cmd = client(&list);
    calls_cmd.args(CALL_LOOP).env("RUST_LOG", "warn");
    let calls = Process::spawn("calls", calls_cmd);
    calls.wait_for_line("\"value\"", READY_TIMEOUT);

    let mut b = Registry::start_on(&addrs[1], MEMORY);
    // Kill the replica the node is on.
    let other = addrs[1].clone();
    let killed = Instant::now();
    a.process.kill9();
    let (granted, moved_to, new_lease) =
        wait_lease(&node, cursor, "granted", Duration::from_secs(10));
    // The lease comes first, the instance a Register later: a fresh client
    // asking the other replica before that finds no calculator there.
    node.wait_for_line_after(granted, "registered calculator", Duration::from_secs(5));
    let took = killed.elapsed();
    println!(
        "TIMING memory_failover_node_reregistered_ms={}",
        took.as_millis()
    );
    assert_eq!(moved_to, other);
    // The other replica never heard of the old lease: a new one, after the
    // resume was refused.
    assert_ne!(new_lease, lease);
    let resume_refused = node
        .lines()
        .iter()
        .any(|l| l.contains(&format!("lease {lease} is gone")));
    assert!(resume_refused, "the node did not offer its lease first");
    // Within a round of reconnection, not a backoff's worth of rounds.
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The watch follows to the other replica, and the node is there: a
    // call through a fresh client (which starts on either replica, the
    // dead one too) works.
    let (status, out, err) = testkit::run(
        {
            let mut c = client(&list);
            c.args(["call", "calculator/Add", "a=2", "b=3"]);
            c
        },
        Duration::from_secs(30),
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains('5'), "{out}");
    let (status, out, err) = testkit::run(
        {
            let mut c = client(&list);
            c.args(["describe", "calculator"]);
            c
        },
        Duration::from_secs(30),
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("Add"), "{out}");
    // Past the grace period (5 s) of the instances the dead replica knew:
    // nothing was ever removed at the watcher.
    std::thread::sleep(Duration::from_secs(6));
    let removed = removals(&watch);
    assert!(removed.is_empty(), "the watcher saw removals: {removed:?}");

    finish_calls(calls);

    // Every replica down: the error names each address.
    b.process.kill9();
    let (status, out, err) = testkit::run(
        {
            let mut c = client(&list);
            c.arg("list");
            c
        },
        Duration::from_secs(30),
    );
    assert!(!status.success(), "{out}");
    for addr in &addrs {
        assert!(
            err.contains(&format!("{addr}: connection refused")),
            "{err}"
        );
    }
}

#[test]
fn a_broken_watch_resumes_from_its_revision_and_gets_what_it_missed_as_events() {
    let registry = Registry::start(MEMORY);
    let addr = registry.addr.to_string();
    let mut node = start_node(&addr);
    let mut watch_cmd = client(&addr);
    watch_cmd.arg("watch");
    let watch = Process::spawn("watch", watch_cmd);
    let added = watch.wait_for_line("+ calculator 127.0.0.1:", READY_TIMEOUT);
    let instance = added.split_whitespace().nth(2).unwrap().to_string();

    // A stalled registry: the client's HTTP/2 pings go unanswered and it
    // drops the connection (2 s + 2 s), while the registry keeps its state.
    registry.process.signal(19);
    watch.wait_for_line("! registry unreachable", Duration::from_secs(15));
    // Meanwhile the node dies; the registry sees it once it runs again.
    node.kill9();
    registry.process.signal(18);
    // The watch resumed (no snapshot), so the removal arrives as the event
    // itself, with its cause, not as "gone while disconnected".
    watch.wait_for_line("watch resumed", Duration::from_secs(15));
    watch.wait_for_line(
        &format!("- calculator {instance} (node disconnected)"),
        Duration::from_secs(10),
    );
    assert!(
        !watch
            .lines()
            .iter()
            .any(|l| l.contains("gone while disconnected")),
        "the watch got a snapshot, not a resume"
    );
}

#[test]
fn a_stalled_replica_is_left_after_the_ttl_not_waited_for() {
    // Memory store: everyone on A first (B down), then B started.
    let a = Registry::start(MEMORY);
    let b_addr = free_addr();
    let list = format!("{b_addr},{}", a.addr);
    let node = start_node(&list);
    let (cursor, first, _) = wait_lease(&node, 0, "granted", READY_TIMEOUT);
    assert_eq!(first, a.addr.to_string());
    let _b = Registry::start_on(&b_addr.to_string(), MEMORY);

    // A stalls (SIGSTOP): no reset, no error, only silence. With another
    // replica to go to, the node does not give it the single registry's
    // stall tolerance (TTL + 4 s).
    a.process.signal(19);
    let stalled = Instant::now();
    let (_, moved_to, _) = wait_lease(&node, cursor, "granted", Duration::from_secs(15));
    let took = stalled.elapsed();
    a.process.signal(18);
    println!("TIMING stalled_replica_left_ms={}", took.as_millis());
    assert_eq!(moved_to, b_addr.to_string());
    // A single registry is given 4 s past the TTL, and HTTP/2 pings 4 s
    // (node-host's STALL_TOLERANCE): about 4.5 s. With replicas: 1 s past
    // the TTL (REPLICA_SILENCE), plus a second for a busy machine.
    let bound = TTL + Duration::from_secs(2);
    assert!(
        took < bound,
        "took {took:?}: waited for as a single registry is"
    );
}

#[test]
fn a_bad_replica_list_is_refused_naming_the_problem() {
    let (status, _, err) = testkit::run(
        {
            let mut c = client("127.0.0.1:1,,127.0.0.1:2");
            c.arg("list");
            c
        },
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(err.contains("empty address"), "{err}");
    let many: Vec<String> = (1..=17).map(|p| format!("127.0.0.1:{p}")).collect();
    let dir = TempDir::new("testkit-ha");
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "[plugins.calculator]\n").unwrap();
    let mut cmd = testkit::command("node-host");
    cmd.args(["--registry", &many.join(",")])
        .arg("--config")
        .arg(&config);
    let (status, _, err) = testkit::run(cmd, Duration::from_secs(30));
    assert!(!status.success());
    assert!(err.contains("17 addresses; at most 16"), "{err}");
}

// ---------------------------------------------------------------------------
// In network namespaces: a front LAN with the registry replicas (hosts 0..R),
// two node hosts and a client host; a store LAN with one etcd member per
// host, into which every replica is plugged by a second interface, so a
// replica can be cut off from etcd alone. The test process reaches both.
// ---------------------------------------------------------------------------

use testkit::netns::{EtcdCluster, Host, Lan, lan_for_test};

/// The nodes' lease TTL (the registry's default).
const TTL: Duration = Duration::from_millis(1500);

/// Every replica's port on its front host.
const REGISTRY_PORT: u16 = 50051;

/// The hosts of the front LAN: replicas first, then the two nodes, then
/// the client.
struct Ha {
    /// `None` while killed.
    replicas: Vec<Option<Process>>,
    nodes: Vec<NodeHost>,
    /// `--store` of every replica; `None`: each its own memory store.
    store: Option<String>,
    etcd: EtcdCluster,
    /// Dropped before `front`: it only removes the interfaces it plugged
    /// into the replicas' hosts.
    store_lan: Lan,
    front: Lan,
}

impl Ha {
    /// `n_replicas` replica hosts (none started), two node hosts and a
    /// client host on the front LAN; a three-member etcd cluster on the
    /// store LAN, running.
    fn new(n_replicas: usize) -> Ha {
        let front = lan_for_test(n_replicas + 3);
        let mut store_lan = lan_for_test(3);
        for i in 0..n_replicas {
            store_lan.plug(front.host(i)).unwrap();
        }
        let members: Vec<&Host> = store_lan.hosts()[..3].iter().collect();
        let etcd = EtcdCluster::start(&members);
        Ha {
            replicas: (0..n_replicas).map(|_| None).collect(),
            nodes: Vec::new(),
            store: None,
            etcd,
            store_lan,
            front,
        }
    }

    fn replica_host(&self, i: usize) -> &Host {
        self.front.host(i)
    }

    fn node_host(&self, i: usize) -> &Host {
        self.front.host(self.replicas.len() + i)
    }

    fn client_host(&self) -> &Host {
        self.front.host(self.replicas.len() + 2)
    }

    fn replica_addr(&self, i: usize) -> String {
        format!("{}:{REGISTRY_PORT}", self.replica_host(i).ip())
    }

    /// Every replica's address, comma-separated.
    fn list(&self) -> String {
        (0..self.replicas.len())
            .map(|i| self.replica_addr(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_replica(&mut self, i: usize) {
        let listen = format!("0.0.0.0:{REGISTRY_PORT}");
        let mut args = vec!["--listen", listen.as_str()];
        if let Some(store) = &self.store {
            args.extend(["--store", store.as_str()]);
        }
        let p = self
            .replica_host(i)
            .spawn(&format!("r{i}"), "registry", &args);
        p.wait_for_line("registry listening on", READY_TIMEOUT);
        self.replicas[i] = Some(p);
    }

    fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].take() {
            p.kill9();
        }
    }

    /// Starts node `i` (calculator, weight 1 + i) on its host, registering
    /// with `registries`.
    fn start_node(&mut self, i: usize, registries: &str) {
        let toml = format!("[plugins.calculator]\nweight = {}\n", 1 + i);
        let node = NodeHost::launch(registries, &toml)
            .advertise(None)
            .command(self.node_host(i).command("node-host"))
            .start();
        self.nodes.push(node);
    }

    /// A long-running `client ARGS` on the client host, on every replica.
    fn client(&self, name: &str, args: &[&str]) -> Process {
        let mut cmd = self.client_host().command("client");
        cmd.args(["--registry", &self.list()]).args(args);
        if args.first() == Some(&"call") {
            cmd.env("RUST_LOG", "warn");
        }
        Process::spawn(name, cmd)
    }

    /// A `client watch` on the client host, once it lists both nodes.
    fn watching_both(&self, name: &str) -> Process {
        let watch = self.client(name, &["watch"]);
        for i in 0..2 {
            let ip = self.node_host(i).ip();
            watch.wait_for_line(&format!("+ calculator {ip}:"), READY_TIMEOUT);
        }
        watch
    }

    /// A client calling the calculator in a loop, once a call answered.
    fn calling(&self) -> Process {
        let calls = self.client("calls", CALL_LOOP);
        calls.wait_for_line("\"value\"", READY_TIMEOUT);
        calls
    }

    /// `client ARGS` on the client host, to completion.
    fn run_client(&self, args: &[&str]) -> (std::process::ExitStatus, String, String) {
        let mut cmd = self.client_host().command("client");
        cmd.args(["--registry", &self.list()]).args(args);
        testkit::run(cmd, Duration::from_secs(60))
    }
}

/// `GET /health` of etcd member at `ip`: whether it says the cluster is
/// healthy (it has a leader and can commit).
fn etcd_healthy(ip: std::net::Ipv4Addr) -> bool {
    let addr = std::net::SocketAddr::from((ip, testkit::netns::ETCD_CLIENT_PORT));
    std::panic::catch_unwind(|| testkit::http::get(addr, "/health", &[]))
        .is_ok_and(|r| r.status == 200 && r.body.contains("\"health\":\"true\""))
}

fn wait_etcd_healthy(ip: std::net::Ipv4Addr, within: Duration) -> Duration {
    let start = Instant::now();
    while !etcd_healthy(ip) {
        assert!(
            start.elapsed() < within,
            "etcd at {ip} not healthy within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Stops `calls` (SIGINT, as Ctrl-C) and asserts none failed.
fn finish_calls(mut calls: Process) -> String {
    assert!(
        calls.is_running(),
        "the calls ended early: {:?}",
        calls.lines()
    );
    calls.signal(2);
    calls.wait_exit(Duration::from_secs(30));
    let summary = calls.wait_for_line(" calls to calculator (", Duration::from_secs(1));
    assert!(
        summary.ends_with(", 0 failed"),
        "some calls failed: {summary}"
    );
    summary
}

/// Lines of a `client watch` that report a removal.
fn removals(watch: &Process) -> Vec<String> {
    watch
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("- "))
        .collect()
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn ha_harness_a_three_member_etcd_cluster_survives_one_member() {
    let mut ha = Ha::new(2);
    let ips: Vec<_> = ha.store_lan.hosts()[..3].iter().map(Host::ip).collect();
    for ip in &ips {
        wait_etcd_healthy(*ip, READY_TIMEOUT);
    }
    // Each replica host reaches every member over its store interface, and
    // not over the front LAN (the store LAN is the only way there).
    let target = format!("{}:{}", ips[0], testkit::netns::ETCD_CLIENT_PORT);
    let (_, out, _) = ha.replica_host(0).run(
        "lan-probe",
        &["connect", &target, "3000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "connected");
    let (_, out, _) = ha.node_host(0).run(
        "lan-probe",
        &["connect", &target, "1000"],
        Duration::from_secs(10),
    );
    assert_ne!(out.trim(), "connected", "a node host reached etcd");
    // Cutting the replica's store cable leaves its front one up.
    let plugged = ha.store_lan.host(3).clone();
    ha.store_lan.cut(&plugged);
    let (_, out, _) = ha.replica_host(0).run(
        "lan-probe",
        &["connect", &target, "1000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "timeout");
    ha.store_lan.heal(&plugged);

    ha.etcd.kill9(0);
    let took = wait_etcd_healthy(ips[1], Duration::from_secs(15));
    println!(
        "TIMING etcd_member_killed_to_healthy_ms={}",
        took.as_millis()
    );
    assert!(etcd_healthy(ips[2]));
    ha.etcd.restart(0);
    wait_etcd_healthy(ips[0], READY_TIMEOUT);
    assert!(ha.etcd.is_running(0));
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn ha_memory_store_replica_killed_nodes_move_and_no_call_fails() {
    let mut ha = Ha::new(2);
    // Each memory replica has a state of its own: everyone starts on r0
    // (r1 is down, so whoever picks it moves to r0 at once); r1 is started
    // once everyone is on r0.
    ha.start_replica(0);
    let list = ha.list();
    ha.start_node(0, &list);
    ha.start_node(1, &list);
    let watch = ha.watching_both("watch");
    let calls = ha.calling();
    ha.start_replica(1);
    let cursors: Vec<usize> = ha.nodes.iter().map(|n| n.process.line_count()).collect();

    let killed = Instant::now();
    ha.kill_replica(0);
    let r1 = ha.replica_addr(1);
    for (i, cursor) in cursors.iter().enumerate() {
        let node = &ha.nodes[i].process;
        let (granted, addr, _) = wait_lease(node, *cursor, "granted", Duration::from_secs(10));
        assert_eq!(addr, r1);
        // Registered there too, not only leased: the call below may ask r1.
        node.wait_for_line_after(granted, "registered calculator", Duration::from_secs(5));
    }
    let took = killed.elapsed();
    println!(
        "TIMING memory_replica_killed_to_nodes_reregistered_ms={}",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let (status, out, err) = ha.run_client(&["call", "calculator/Add", "a=2", "b=3"]);
    assert!(status.success(), "{out}{err}");
    // Past the watcher's grace period for what r0 knew.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(removals(&watch), Vec::<String>::new());
    let summary = finish_calls(calls);
    println!("calls across the failover: {summary}");
}

// ---------------------------------------------------------------------------
// Over etcd: three replicas of one registry (`--store etcd://...`), two node
// hosts, a client calling in a loop and two `client watch`es.
// ---------------------------------------------------------------------------

/// A running etcd-backed cluster: the nodes, the first watcher and the
/// calls all on replica 0 (started alone first); replicas 1 and 2 up after,
/// and a second watcher on whichever replica it picks.
struct EtcdHa {
    ha: Ha,
    watches: Vec<Process>,
    calls: Option<Process>,
    /// Each node's lease id when everything was up.
    leases: Vec<u64>,
}

impl EtcdHa {
    fn start() -> EtcdHa {
        let mut ha = Ha::new(3);
        ha.store = Some(ha.etcd.store("/registry-ha"));
        ha.start_replica(0);
        let list = ha.list();
        ha.start_node(0, &list);
        ha.start_node(1, &list);
        let r0 = ha.replica_addr(0);
        let leases = (0..2)
            .map(|i| {
                let (_, addr, id) = wait_lease(&ha.nodes[i].process, 0, "granted", READY_TIMEOUT);
                assert_eq!(addr, r0);
                id
            })
            .collect();
        let first = ha.watching_both("w0");
        let calls = ha.calling();
        ha.start_replica(1);
        ha.start_replica(2);
        let second = ha.client("w1", &["watch"]);
        let cluster = EtcdHa {
            ha,
            watches: vec![first, second],
            calls: Some(calls),
            leases,
        };
        for w in &cluster.watches {
            for i in 0..2 {
                let ip = cluster.ha.node_host(i).ip();
                w.wait_for_line(&format!("+ calculator {ip}:"), READY_TIMEOUT);
            }
        }
        // A change once every replica runs, so every watcher has a
        // revision to resume from.
        cluster.ha.nodes[1].write_config("[plugins.calculator]\nweight = 3\n");
        let ip = cluster.ha.node_host(1).ip();
        for w in &cluster.watches {
            w.wait_for_line(&format!("~ calculator {ip}:"), READY_TIMEOUT);
        }
        cluster
    }

    fn node_cursors(&self) -> Vec<usize> {
        self.ha
            .nodes
            .iter()
            .map(|n| n.process.line_count())
            .collect()
    }

    fn watch_cursors(&self) -> Vec<usize> {
        self.watches.iter().map(Process::line_count).collect()
    }

    /// Waits until every watcher printed a line containing `needle` after
    /// its cursor; returns how long after `since` the last one did.
    fn seen_by_all(
        &self,
        cursors: &[usize],
        needle: &str,
        within: Duration,
        since: Instant,
    ) -> Duration {
        let mut slowest = Duration::ZERO;
        for (w, cursor) in self.watches.iter().zip(cursors) {
            w.wait_for_line_after(*cursor, needle, within);
            slowest = slowest.max(since.elapsed());
        }
        slowest
    }

    /// Waits until every node resumed its lease (the same id) on a replica
    /// other than `left`, from `cursors` on; returns when the last did.
    fn wait_resumed(&self, cursors: &[usize], left: &str, since: Instant) -> Duration {
        let mut last = Duration::ZERO;
        for (i, cursor) in cursors.iter().enumerate() {
            let (_, addr, id) = wait_lease(
                &self.ha.nodes[i].process,
                *cursor,
                "resumed",
                Duration::from_secs(15),
            );
            last = last.max(since.elapsed());
            assert_ne!(addr, left, "node {i} resumed on the replica it left");
            assert_eq!(id, self.leases[i], "node {i} changed lease");
        }
        last
    }

    /// Nothing was removed at any watcher and no node took a new lease
    /// since `cursors`.
    fn assert_nothing_lost(&self, cursors: &[usize]) {
        for w in &self.watches {
            assert_eq!(removals(w), Vec::<String>::new());
        }
        for (i, cursor) in cursors.iter().enumerate() {
            let granted: Vec<String> = self.ha.nodes[i].process.lines()[*cursor..]
                .iter()
                .filter(|l| lease_line(l, "granted").is_some())
                .cloned()
                .collect();
            assert!(granted.is_empty(), "node {i} registered again: {granted:?}");
        }
    }

    fn finish_calls(&mut self) {
        if let Some(calls) = self.calls.take() {
            let summary = finish_calls(calls);
            println!("calls across the failure: {summary}");
        }
    }
}

type ReplicaClient =
    registry_proto::registry::v1::registry_client::RegistryClient<tonic::transport::Channel>;

/// `call` with a client of replica `addr`, in a runtime of its own (the
/// tests are synchronous).
fn on_replica<T>(addr: &str, call: impl AsyncFnOnce(ReplicaClient) -> T) -> T {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = ReplicaClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        call(client).await
    })
}

/// The calculator's instances as replica `addr` resolves them: instance id
/// to (lease id, revision).
fn resolved(addr: &str) -> std::collections::BTreeMap<String, (u64, u64)> {
    use registry_proto::registry::v1::ResolveRequest;
    on_replica(addr, async |mut client| {
        let reply = client
            .resolve(ResolveRequest {
                service: "calculator".into(),
            })
            .await
            .unwrap()
            .into_inner();
        reply
            .instances
            .into_iter()
            .map(|i| (i.instance_id, (i.lease_id, i.revision)))
            .collect()
    })
}

/// A GrantLease on replica `addr` (default TTL): its lease id or the
/// refusal.
fn grant_lease(addr: &str) -> Result<u64, tonic::Status> {
    use registry_proto::registry::v1::GrantLeaseRequest;
    on_replica(addr, async |mut client| {
        let reply = client
            .grant_lease(GrantLeaseRequest::default())
            .await?
            .into_inner();
        Ok(reply.lease_id)
    })
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn ha_etcd_replica_killed_nodes_keep_their_leases_and_nothing_is_removed() {
    let mut cl = EtcdHa::start();
    let cursors = cl.node_cursors();
    let watch_cursor = cl.watches[0].line_count();
    let r0 = cl.ha.replica_addr(0);
    let killed = Instant::now();
    cl.ha.kill_replica(0);
    let resumed = cl.wait_resumed(&cursors, &r0, killed);
    println!(
        "TIMING etcd_replica_killed_to_leases_resumed_ms={}",
        resumed.as_millis()
    );
    cl.watches[0].wait_for_line_after(watch_cursor, "watch resumed", Duration::from_secs(15));
    println!(
        "TIMING etcd_replica_killed_to_watch_resumed_ms={}",
        killed.elapsed().as_millis()
    );
    // Past the lease TTL: nothing expired behind the nodes' backs.
    std::thread::sleep(2 * TTL);
    cl.assert_nothing_lost(&cursors);
    let (status, out, err) = cl.ha.run_client(&["call", "calculator/Add", "a=2", "b=3"]);
    assert!(status.success(), "{out}{err}");
    cl.finish_calls();
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn ha_etcd_replica_cut_off_from_etcd_stops_serving_and_its_nodes_and_watchers_move() {
    let mut cl = EtcdHa::start();
    let cursors = cl.node_cursors();
    let watch_cursor = cl.watches[0].line_count();
    let r0 = cl.ha.replica_addr(0);
    let log_cursor = cl.ha.replicas[0].as_ref().unwrap().line_count();
    // Replica 0's cable to the store LAN (members are its hosts 0..3, the
    // replicas' second interfaces after them); its front cable stays up.
    let cable = cl.ha.store_lan.host(3).clone();
    let cut = Instant::now();
    cl.ha.store_lan.cut(&cable);
    let replica = cl.ha.replicas[0].as_ref().unwrap();
    replica.wait_for_line_after(log_cursor, "etcd does not answer", Duration::from_secs(10));
    println!(
        "TIMING etcd_replica_cut_to_refusing_ms={}",
        cut.elapsed().as_millis()
    );
    let resumed = cl.wait_resumed(&cursors, &r0, cut);
    println!(
        "TIMING etcd_replica_cut_to_leases_resumed_ms={}",
        resumed.as_millis()
    );
    cl.watches[0].wait_for_line_after(watch_cursor, "watch resumed", Duration::from_secs(15));
    let watch_moved = cut.elapsed();
    println!(
        "TIMING etcd_replica_cut_to_watch_resumed_ms={}",
        watch_moved.as_millis()
    );
    // The issue's 2 s, plus a second for a loaded machine.
    let bound = Duration::from_secs(3);
    assert!(resumed < bound, "the nodes moved after {resumed:?}");
    assert!(watch_moved < bound, "the watch moved after {watch_moved:?}");
    // Past the etcd leases' own TTL (the registry TTL rounded up, + 2 s):
    // the replicas the nodes moved to keep them alive; nothing expired.
    std::thread::sleep(TTL + Duration::from_secs(4));
    cl.assert_nothing_lost(&cursors);
    let (status, out, err) = cl.ha.run_client(&["call", "calculator/Add", "a=2", "b=3"]);
    assert!(status.success(), "{out}{err}");
    // The cut replica refuses writes meanwhile, naming the reason.
    let refused = grant_lease(&r0).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("cannot reach etcd"),
        "{refused:?}"
    );

    // A change while it is cut off (node 1 is on another replica now):
    // the cut replica must catch up with it once back.
    let ip1 = cl.ha.node_host(1).ip();
    let watch_cursors = cl.watch_cursors();
    cl.ha.nodes[1].write_config("[plugins.calculator]\nweight = 4\n");
    cl.seen_by_all(
        &watch_cursors,
        &format!("~ calculator {ip1}:"),
        READY_TIMEOUT,
        Instant::now(),
    );

    // Cable back: it serves again, the same state as the others.
    let log_cursor = cl.ha.replicas[0].as_ref().unwrap().line_count();
    let healed = Instant::now();
    cl.ha.store_lan.heal(&cable);
    let replica = cl.ha.replicas[0].as_ref().unwrap();
    replica.wait_for_line_after(log_cursor, "etcd answers again", Duration::from_secs(15));
    println!(
        "TIMING etcd_replica_healed_to_serving_ms={}",
        healed.elapsed().as_millis()
    );
    let expected = resolved(&cl.ha.replica_addr(1));
    assert_eq!(expected.len(), 2, "{expected:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while resolved(&r0) != expected {
        assert!(
            Instant::now() < deadline,
            "replica 0 serves {:?}, the others {expected:?}",
            resolved(&r0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cl.assert_nothing_lost(&cursors);
    cl.finish_calls();
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn ha_etcd_member_killed_writes_and_watches_go_on() {
    let mut cl = EtcdHa::start();
    let cursors = cl.node_cursors();
    let watch_cursors = cl.watch_cursors();
    // The leader: the cluster then elects another, and answers no quorum
    // read meanwhile (1-2 s), which the replicas must ride out.
    let leader = cl.ha.etcd.leader();
    let replica_cursors: Vec<usize> = cl
        .ha
        .replicas
        .iter()
        .map(|r| r.as_ref().map_or(0, Process::line_count))
        .collect();
    cl.ha.etcd.kill9(leader);
    let killed = Instant::now();
    // A write: node 1 deregisters everything (`u`) and registers again (`r`).
    let ip = cl.ha.node_host(1).ip();
    let within = Duration::from_secs(15);
    cl.ha.nodes[1].process.send_line("u");
    let seen = cl.seen_by_all(
        &watch_cursors,
        &format!("- calculator {ip}:"),
        within,
        killed,
    );
    println!(
        "TIMING etcd_member_killed_to_write_seen_ms={}",
        seen.as_millis()
    );
    cl.ha.nodes[1].process.send_line("r");
    cl.seen_by_all(
        &watch_cursors,
        &format!("+ calculator {ip}:"),
        within,
        killed,
    );
    std::thread::sleep(2 * TTL);
    // Only the removal asked for: node 0 is still there everywhere.
    let ip0 = cl.ha.node_host(0).ip();
    for w in &cl.watches {
        let removed = removals(w);
        assert!(
            removed.iter().all(|l| !l.contains(&format!("{ip0}:"))),
            "{removed:?}"
        );
    }
    let granted_again = cl.ha.nodes[0].process.lines()[cursors[0]..]
        .iter()
        .any(|l| lease_line(l, "granted").is_some());
    assert!(!granted_again, "node 0 registered again");
    for (i, (replica, cursor)) in cl.ha.replicas.iter().zip(&replica_cursors).enumerate() {
        let lines = replica.as_ref().map(Process::lines).unwrap_or_default();
        let lost: Vec<&String> = lines[*cursor..]
            .iter()
            .filter(|l| l.contains("etcd does not answer"))
            .collect();
        assert!(lost.is_empty(), "replica {i} took etcd for lost: {lost:?}");
    }
    cl.finish_calls();
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn ha_etcd_every_replica_restarted_state_intact_and_the_watch_misses_nothing() {
    let mut cl = EtcdHa::start();
    let before = resolved(&cl.ha.replica_addr(1));
    assert_eq!(before.len(), 2, "{before:?}");
    let cursors = cl.node_cursors();
    let watch_cursors = cl.watch_cursors();
    // The first watcher is frozen through the restart and a change after
    // it: when it runs again it resumes from a revision older than every
    // replica's start, and must get that change, once, as an event.
    cl.watches[0].signal(19);
    let killed = Instant::now();
    for i in 0..3 {
        cl.ha.kill_replica(i);
    }
    for i in 0..3 {
        cl.ha.start_replica(i);
    }
    println!(
        "TIMING etcd_all_replicas_restart_ms={}",
        killed.elapsed().as_millis()
    );
    cl.watches[1].wait_for_line_after(
        watch_cursors[1],
        "! reconnected to the registry",
        Duration::from_secs(15),
    );
    let back = killed.elapsed();
    println!(
        "TIMING etcd_all_replicas_killed_to_watcher_back_ms={}",
        back.as_millis()
    );
    // Every replica serves the same state as before, revisions included.
    for i in 0..3 {
        assert_eq!(resolved(&cl.ha.replica_addr(i)), before, "replica {i}");
    }
    let ip1 = cl.ha.node_host(1).ip();
    cl.ha.nodes[1].write_config("[plugins.calculator]\nweight = 5\n");
    let changed = format!("~ calculator {ip1}:");
    cl.watches[1].wait_for_line_after(watch_cursors[1], &changed, READY_TIMEOUT);
    let thawed = cl.watches[0].line_count();
    cl.watches[0].signal(18);
    cl.watches[0].wait_for_line_after(thawed, &changed, Duration::from_secs(15));
    std::thread::sleep(2 * TTL);
    cl.assert_nothing_lost(&cursors);
    // Both resumed (no snapshot) from before the restart, and each got the
    // one change since, once: no gap, no duplicate.
    for (n, (w, cursor)) in cl.watches.iter().zip(&watch_cursors).enumerate() {
        let lines = &w.lines()[*cursor..];
        assert!(
            lines.iter().any(|l| l.contains("watch resumed")),
            "watcher {n} took a snapshot: {lines:?}"
        );
        let changes: Vec<&String> = lines
            .iter()
            .filter(|l| ["+ ", "- ", "~ "].iter().any(|p| l.starts_with(p)))
            .collect();
        assert_eq!(changes.len(), 1, "watcher {n}: {changes:?}");
        assert!(
            changes[0].starts_with(&changed) && changes[0].ends_with("weight=5"),
            "watcher {n}: {changes:?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("gone while disconnected")),
            "watcher {n}: {lines:?}"
        );
    }
    cl.finish_calls();
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn ha_etcd_a_killed_node_reaches_every_watcher_at_once_and_a_cut_one_expires_within_the_ttl() {
    let mut cl = EtcdHa::start();
    let watch_cursors = cl.watch_cursors();
    let ip0 = cl.ha.node_host(0).ip();
    let crash = Instant::now();
    cl.ha.nodes[0].process.kill9();
    let gone = format!("- calculator {ip0}:");
    let slowest = cl.seen_by_all(&watch_cursors, &gone, Duration::from_secs(10), crash);
    println!(
        "TIMING etcd_node_killed_to_every_watcher_ms={}",
        slowest.as_millis()
    );
    // The issue's bound is 100 ms; asserted generously (CI machines are
    // busy): well under the TTL, which only a missed KeepAlive break would
    // take.
    assert!(slowest < TTL, "took {slowest:?}");

    let ip1 = cl.ha.node_host(1).ip();
    let node1 = cl.ha.node_host(1).clone();
    let cut = Instant::now();
    cl.ha.front.cut(&node1);
    let gone = format!("- calculator {ip1}:");
    let within = 3 * TTL + Duration::from_secs(5);
    let slowest = cl.seen_by_all(&watch_cursors, &gone, within, cut);
    println!("TIMING etcd_node_cut_to_expired_ms={}", slowest.as_millis());
    assert!(slowest < 2 * TTL, "took {slowest:?}");
    cl.ha.front.heal(&node1);
    cl.calls.take();
}
