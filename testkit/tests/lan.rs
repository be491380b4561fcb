//! Multi-host tests on a LAN of network namespaces (testkit::netns): first
//! the harness itself, then the registry, node hosts and client as separate
//! machines.
//!
//! Scenarios (registry on host A, node hosts on B and C, client on D; the
//! test process watches the registry from the bridge's address):
//! - nodes register their own LAN addresses; `client` on D lists and calls;
//! - kill -9 of a node during a long `client call --repeat`: no call fails,
//!   its instances go at once;
//! - a cut cable expires the node within the lease TTL; healing brings it back;
//! - a registry restarted empty: nodes register again, calls go on;
//! - `u`, `r`, `q` on a node's stdin and an edit of its file, seen from D;
//! - garbage, malformed HTTP/2, invalid fields, a huge message and a flood
//!   of registrations: the registry keeps serving and loses nothing.
//!
//! Each test needs root and iproute2, so each is `#[ignore]`d: `cargo test`
//! reports them as ignored, and `scripts/test.sh` runs them with
//! `-- --ignored` when it is root (CI is). Run by hand without root, they
//! fail saying so. Timings are printed on stdout as `TIMING name=value`
//! lines (`cargo test -p testkit --test lan -- --nocapture | grep TIMING`):
//! crash_to_gone_ms, crash_to_gone_on_client_watch_ms, cut_to_expired_ms,
//! heal_to_reregistered_ms, restart_to_reregistered_ms,
//! config_edit_to_seen_ms, flood_1024_registrations_ms,
//! harness_heal_to_echo_ms.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry_proto::registry::v1::registry_client::RegistryClient;
use registry_proto::registry::v1::{Instance, WatchRequest, event};
use testkit::netns::{Host, Lan, lan_for_test};
use testkit::{Process, READY_TIMEOUT, TempDir};

const PROBE_PORT: u16 = 7000;

/// Sends lines on `session` until one of them is echoed; returns how long
/// it took. Each attempt waits the probe's own timeout.
fn echo_until_through(session: &mut testkit::Process, tag: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let cursor = session.line_count();
        session.send_line(&format!("{tag}{n}"));
        let (_, line) = session.wait_for_line_after(cursor, "", Duration::from_secs(10));
        if line.starts_with("echo ") {
            // Some echo came back (maybe of an earlier line): the link works.
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "no echo within {within:?}");
    }
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn harness_hosts_reach_each_other_and_cut_drops_silently() {
    let lan = lan_for_test(2);
    let (a, b) = (lan.host(0), lan.host(1));
    assert_ne!(a.ip(), b.ip());
    let listener = a.spawn(
        "listen",
        "lan-probe",
        &["listen", &format!("0.0.0.0:{PROBE_PORT}")],
    );
    listener.wait_for_line("listening on", READY_TIMEOUT);
    let target = format!("{}:{PROBE_PORT}", a.ip());

    // B reaches A by its LAN address, and so does the test process (via the bridge).
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &target, "3000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "connected");
    let addr: SocketAddr = target.parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    // A port where nothing listens: refused at once, not hung.
    let other = format!("{}:{}", a.ip(), PROBE_PORT + 1);
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &other, "3000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "refused");

    // A long-lived connection B -> A.
    let mut session = b.spawn("session", "lan-probe", &["connect", &target, "700"]);
    session.wait_for_line("connected", READY_TIMEOUT);
    session.send_line("before");
    session.wait_for_line("echo before", Duration::from_secs(5));

    lan.cut(a);
    let cut_at = session.line_count();
    session.send_line("during");
    let (_, line) = session.wait_for_line_after(cut_at, "", Duration::from_secs(10));
    assert_eq!(line, "timeout", "a cut link must drop silently");
    // New connections time out: no RST, no refusal.
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &target, "700"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "timeout");
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_err());

    lan.heal(a);
    // The connection made before the cut survived it: no reset reached B.
    let took = echo_until_through(&mut session, "after", Duration::from_secs(20));
    println!("TIMING harness_heal_to_echo_ms={}", took.as_millis());
    let lines = session.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l == "reset" || l == "closed" || l.starts_with("error")),
        "the connection saw an error: {lines:?}"
    );
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &target, "3000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "connected");
}

/// Lists namespaces and links, for checking what a LAN left behind.
fn ip_show() -> String {
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&ns.stdout).into_owned() + &String::from_utf8_lossy(&links.stdout)
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn harness_drop_removes_everything_and_new_removes_leftovers() {
    // A leftover of a killed run: namespace and bridge owned by a pid that
    // cannot exist (above any pid_max).
    let dead = "tklan254-p999999999-h0";
    // (Without root or iproute2 these fail, and lan_for_test below says so.)
    let _ = std::process::Command::new("ip")
        .args(["netns", "add", dead])
        .status();
    let _ = std::process::Command::new("ip")
        .args(["link", "add", "name", "tkbr254", "type", "bridge"])
        .status();
    let _ = std::process::Command::new("ip")
        .args([
            "link",
            "set",
            "tkbr254",
            "alias",
            "testkit-lan pid=999999999",
        ])
        .status();

    let lan = lan_for_test(3);
    let names: Vec<String> = lan.hosts().iter().map(|h| h.netns().to_string()).collect();
    let bridge = lan.bridge().to_string();
    let shown = ip_show();
    assert!(
        !shown.contains(dead),
        "leftover namespace not removed:\n{shown}"
    );
    assert!(
        !shown.contains("tkbr254:"),
        "leftover bridge not removed:\n{shown}"
    );
    for n in &names {
        assert!(shown.contains(n.as_str()), "{n} missing:\n{shown}");
    }
    // A process inside a host does not keep its namespace alive past Drop.
    let _sleeper = lan
        .host(0)
        .spawn("listen", "lan-probe", &["listen", "0.0.0.0:7001"]);
    drop(lan);
    let shown = ip_show();
    for n in &names {
        assert!(!shown.contains(n.as_str()), "{n} left behind:\n{shown}");
    }
    assert!(
        !shown.contains(&format!("{bridge}:")),
        "{bridge} left behind:\n{shown}"
    );
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[test]
fn harness_parallel_lans_get_distinct_subnets() {
    let one = lan_for_test(1);
    let two = Lan::new(1).unwrap();
    assert_ne!(one.gateway(), two.gateway());
    assert_ne!(one.host(0).ip(), two.host(0).ip());
    assert_ne!(one.bridge(), two.bridge());
}

// ---------------------------------------------------------------------------
// Scenarios with the real binaries: registry on host A, node hosts on B and C,
// client on D. The test process sits on the LAN too (the bridge's address)
// and follows the registry with a Watch stream of its own.
// ---------------------------------------------------------------------------

/// The registry's port on host A.
const REGISTRY_PORT: u16 = 50051;
/// The registry's default lease TTL, which the nodes use.
const TTL: Duration = Duration::from_millis(1500);

/// What the watcher knew after one message.
#[derive(Clone, Debug, Default)]
struct View {
    /// Identity of the registry process the view came from.
    registry_id: String,
    /// (service, instance_id) -> instance.
    instances: BTreeMap<(String, String), Instance>,
}

impl View {
    /// (service, weight) of the instances whose host is `ip`, sorted.
    fn on(&self, ip: Ipv4Addr) -> Vec<(String, u32)> {
        let ip = ip.to_string();
        let mut v: Vec<_> = self
            .instances
            .values()
            .filter(|i| i.host == ip)
            .map(|i| (i.service.clone(), i.effective_weight()))
            .collect();
        v.sort();
        v
    }
}

/// A Watch stream from the test process, reconnecting when it breaks; keeps
/// every successive view with the time it was received.
struct Watcher {
    log: Arc<Mutex<Vec<(Instant, View)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(url: String) -> Watcher {
        let log: Arc<Mutex<Vec<(Instant, View)>>> = Arc::default();
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                loop {
                    if let Err(e) = Self::follow(&url, &log).await {
                        eprintln!("[watcher] {e}; reconnecting");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Watcher { log, task }
    }

    async fn follow(url: &str, log: &Mutex<Vec<(Instant, View)>>) -> Result<(), String> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(1));
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = RegistryClient::new(channel);
        let mut stream = client
            .watch(WatchRequest::default())
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
            let now = Instant::now();
            let mut log = log.lock().unwrap();
            let mut view = if msg.reset {
                View::default()
            } else {
                log.last().map(|(_, v)| v.clone()).unwrap_or_default()
            };
            view.registry_id = msg.registry_id.clone();
            for ev in msg.events {
                let Some(inst) = ev.instance else { continue };
                let key = (inst.service.clone(), inst.instance_id.clone());
                if ev.kind == event::Kind::Removed as i32 {
                    view.instances.remove(&key);
                } else {
                    view.instances.insert(key, inst);
                }
            }
            log.push((now, view));
        }
        Err("watch stream ended".into())
    }

    /// The latest view.
    fn now(&self) -> View {
        let log = self.log.lock().unwrap();
        log.last().map(|(_, v)| v.clone()).unwrap_or_default()
    }

    /// Waits until a view received at or after `from` (or the one in force
    /// at `from`) satisfies `cond`; returns when that view arrived (`from`
    /// itself if it was already true then).
    async fn wait(
        &self,
        from: Instant,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&View) -> bool,
    ) -> Instant {
        let cond = &cond;
        testkit::eventually(timeout, what, || async move {
            let log = self.log.lock().unwrap();
            let first = log.iter().rposition(|(t, _)| *t <= from).unwrap_or(0);
            log.iter()
                .skip(first)
                .find(|(_, v)| cond(v))
                .map(|(t, _)| (*t).max(from))
        })
        .await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registry on host 0 (A), node hosts on 1 (B) and 2 (C), host 3 (D) for
/// the client. Fields drop in order: processes first, the LAN last.
struct Cluster {
    registry: Process,
    /// node host on B: calculator, weight 3.
    b: Process,
    /// node host on C: calculator weight 1, echo weight 2.
    c: Process,
    watcher: Watcher,
    dir: TempDir,
    lan: Lan,
}

const B_CONFIG: &str = "[plugins.calculator]\nweight = 3\n";
const C_CONFIG: &str = "[plugins.calculator]\nweight = 1\n\n[plugins.echo]\nweight = 2\n";

impl Cluster {
    /// Starts everything and waits until the watcher sees B's and C's
    /// instances.
    async fn start() -> Cluster {
        let lan = lan_for_test(4);
        let dir = TempDir::new("testkit-lan");
        let registry = start_registry(lan.host(0));
        let registry_addr = format!("{}:{REGISTRY_PORT}", lan.host(0).ip());
        std::fs::write(dir.join("b.toml"), B_CONFIG).unwrap();
        std::fs::write(dir.join("c.toml"), C_CONFIG).unwrap();
        let b = start_node(lan.host(1), "node-b", &dir.join("b.toml"), &registry_addr);
        let c = start_node(lan.host(2), "node-c", &dir.join("c.toml"), &registry_addr);
        let watcher = Watcher::start(format!("http://{registry_addr}"));
        let cluster = Cluster {
            registry,
            b,
            c,
            watcher,
            dir,
            lan,
        };
        let (bip, cip) = (cluster.b_ip(), cluster.c_ip());
        cluster
            .watcher
            .wait(Instant::now(), READY_TIMEOUT, "B and C registered", |v| {
                v.on(bip) == b_expected() && v.on(cip) == c_expected()
            })
            .await;
        cluster
    }

    fn registry_addr(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.lan.host(0).ip())
    }

    fn b_ip(&self) -> Ipv4Addr {
        self.lan.host(1).ip()
    }

    fn c_ip(&self) -> Ipv4Addr {
        self.lan.host(2).ip()
    }

    fn d(&self) -> &Host {
        self.lan.host(3)
    }

    /// `client ARGS` on host D, to completion.
    fn client(&self, args: &[&str]) -> (std::process::ExitStatus, String, String) {
        let mut cmd = self.d().command("client");
        cmd.env("REGISTRY_ADDR", self.registry_addr()).args(args);
        testkit::run(cmd, Duration::from_secs(60))
    }
}

fn b_expected() -> Vec<(String, u32)> {
    vec![("calculator".into(), 3)]
}

fn c_expected() -> Vec<(String, u32)> {
    vec![("calculator".into(), 1), ("echo".into(), 2)]
}

fn start_registry(host: &Host) -> Process {
    let listen = format!("0.0.0.0:{REGISTRY_PORT}");
    let registry = host.spawn("registry", "registry", &["--listen", &listen]);
    registry.wait_for_line("registry listening on", READY_TIMEOUT);
    registry
}

fn start_node(host: &Host, name: &str, config: &Path, registry: &str) -> Process {
    let config = config.to_str().unwrap();
    let node = host.spawn(
        name,
        "node-host",
        &["--config", config, "--registry", registry],
    );
    let line = node.wait_for_line("node-host serving on", READY_TIMEOUT);
    let addr = testkit::addr_from_line(&line);
    assert_eq!(
        addr.ip(),
        host.ip(),
        "a node must advertise its LAN address"
    );
    node
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// `client call calculator/Add a=1 b=2 --repeat N` running on D, N more
/// calls than any scenario lasts: [`finish`](Self::finish) ends them with
/// SIGINT, as Ctrl-C would, so they span the whole scenario however fast
/// or slow this machine is at the moment. One process throughout: it keeps
/// its view of the registry, as a long-running client would.
struct RepeatedCalls {
    process: Process,
}

impl RepeatedCalls {
    const N: u32 = 10_000_000;

    fn start(cl: &Cluster) -> RepeatedCalls {
        let mut cmd = cl.d().command("client");
        cmd.env("REGISTRY_ADDR", cl.registry_addr())
            .env("RUST_LOG", "warn");
        cmd.args([
            "call",
            "calculator/Add",
            "a=1",
            "b=2",
            "--repeat",
            &Self::N.to_string(),
        ]);
        let process = Process::spawn("calls", cmd);
        // The first reply is printed as soon as it arrives.
        process.wait_for_line("\"value\"", READY_TIMEOUT);
        RepeatedCalls { process }
    }

    /// Asserts the calls are still going (so they span what happens next).
    fn assert_running(&mut self, what: &str) {
        assert!(
            self.process.is_running(),
            "the calls ended before {what}: {:?}",
            self.process.lines()
        );
    }

    /// Stops the calls (SIGINT), asserts that every call made succeeded and
    /// returns the summary line.
    fn finish(mut self) -> String {
        self.assert_running("the end of the scenario");
        self.process.signal(2);
        let status = self.process.wait_exit(Duration::from_secs(30));
        let line = self
            .process
            .wait_for_line(" calls to calculator (", Duration::from_secs(1));
        assert!(line.ends_with(", 0 failed"), "some calls failed: {line}");
        assert!(status.success(), "{status:?}: {line}");
        line
    }
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_nodes_register_their_lan_addresses_and_client_calls_across_hosts() {
    let cl = Cluster::start().await;
    let (bip, cip) = (cl.b_ip().to_string(), cl.c_ip().to_string());

    let (status, out, _) = cl.client(&["list", "--json"]);
    assert!(status.success());
    let json: serde_json::Value = serde_json::from_str(&out).expect("list --json prints JSON");
    let text = json.to_string();
    assert!(text.contains(&bip) && text.contains(&cip), "{text}");
    assert!(
        !text.contains("127.0.0.1"),
        "a node registered a loopback address: {text}"
    );

    let (status, out, _) = cl.client(&["call", "calculator/Add", r#"{"a":2,"b":3}"#]);
    assert!(status.success());
    assert!(out.contains('5'), "{out}");
    let (status, out, _) = cl.client(&["call", "echo/Echo", r#"{"message":"hi from D"}"#]);
    assert!(status.success());
    assert!(out.contains("hi from D"), "{out}");
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_kill9_of_a_node_fails_no_call_and_its_instances_go_at_once() {
    let mut cl = Cluster::start().await;
    let bip = cl.b_ip();
    let b_addr = format!("{bip}:");
    // A second watcher: the client's own `watch`, on host D.
    let mut cmd = cl.d().command("client");
    cmd.env("REGISTRY_ADDR", cl.registry_addr()).arg("watch");
    let d_watch = Process::spawn("watch", cmd);
    d_watch.wait_for_line(&format!("+ calculator {b_addr}"), READY_TIMEOUT);
    let cursor = d_watch.line_count();
    let mut calls = RepeatedCalls::start(&cl);
    std::thread::sleep(Duration::from_millis(1000)); // calls under way, on both nodes

    calls.assert_running("the crash");
    let crash = Instant::now();
    cl.b.kill9();
    let gone = cl
        .watcher
        .wait(crash, Duration::from_secs(10), "B's instances gone", |v| {
            v.on(bip).is_empty()
        })
        .await;
    println!("TIMING crash_to_gone_ms={}", ms(gone - crash));
    d_watch.wait_for_line_after(
        cursor,
        &format!("- calculator {b_addr}"),
        Duration::from_secs(10),
    );
    println!(
        "TIMING crash_to_gone_on_client_watch_ms={}",
        ms(crash.elapsed())
    );
    // A crash breaks the KeepAlive connection: no need to wait for the TTL.
    assert!(gone - crash < TTL, "took {:?}", gone - crash);
    calls.assert_running("B was gone");
    std::thread::sleep(Duration::from_millis(500)); // calls to C alone

    let summary = calls.finish();
    println!("calls across the crash: {summary}");
    assert_eq!(cl.watcher.now().on(cl.c_ip()), c_expected());
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_cut_link_expires_the_node_and_heal_brings_it_back() {
    let cl = Cluster::start().await;
    let bip = cl.b_ip();

    let cut = Instant::now();
    cl.lan.cut(cl.lan.host(1));
    let expired = cl
        .watcher
        .wait(cut, 3 * TTL + Duration::from_secs(5), "B expired", |v| {
            v.on(bip).is_empty()
        })
        .await;
    println!("TIMING cut_to_expired_ms={}", ms(expired - cut));
    assert!(expired - cut < 3 * TTL, "expiry took {:?}", expired - cut);
    assert_eq!(
        cl.watcher.now().on(cl.c_ip()),
        c_expected(),
        "C must not be touched"
    );

    let heal = Instant::now();
    cl.lan.heal(cl.lan.host(1));
    let back = cl
        .watcher
        .wait(heal, Duration::from_secs(60), "B registered again", |v| {
            v.on(bip) == b_expected()
        })
        .await;
    println!("TIMING heal_to_reregistered_ms={}", ms(back - heal));
    assert!(
        back - heal < Duration::from_secs(30),
        "took {:?}",
        back - heal
    );
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_registry_restart_nodes_register_again_and_calls_go_on() {
    let mut cl = Cluster::start().await;
    let (bip, cip) = (cl.b_ip(), cl.c_ip());
    let old_id = cl.watcher.now().registry_id;
    let mut calls = RepeatedCalls::start(&cl);
    std::thread::sleep(Duration::from_millis(1000));

    calls.assert_running("the registry was killed");
    cl.registry.kill9();
    std::thread::sleep(Duration::from_millis(500)); // clients and nodes notice it gone
    let restart = Instant::now();
    cl.registry = start_registry(cl.lan.host(0));
    let back = cl
        .watcher
        .wait(
            restart,
            Duration::from_secs(60),
            "B and C on the new registry",
            |v| v.registry_id != old_id && v.on(bip) == b_expected() && v.on(cip) == c_expected(),
        )
        .await;
    println!("TIMING restart_to_reregistered_ms={}", ms(back - restart));
    assert!(
        back - restart < Duration::from_secs(30),
        "took {:?}",
        back - restart
    );
    calls.assert_running("the nodes were back");
    std::thread::sleep(Duration::from_millis(500)); // calls on the new registry's view

    let summary = calls.finish();
    println!("calls across the restart: {summary}");
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_stdin_commands_and_config_edits_are_seen_from_another_host() {
    let mut cl = Cluster::start().await;
    let (bip, cip) = (cl.b_ip(), cl.c_ip());
    let long = Duration::from_secs(20);

    // u: B's instances leave; B keeps serving.
    cl.b.send_line("u");
    cl.watcher
        .wait(Instant::now(), long, "B unregistered", |v| {
            v.on(bip).is_empty()
        })
        .await;
    let (_, out, _) = cl.client(&["list", "--json"]);
    assert!(!out.contains(&bip.to_string()), "{out}");
    // r: back.
    cl.b.send_line("r");
    cl.watcher
        .wait(Instant::now(), long, "B back", |v| {
            v.on(bip) == b_expected()
        })
        .await;
    let (_, out, _) = cl.client(&["list", "--json"]);
    assert!(out.contains(&bip.to_string()), "{out}");

    // An edit of C's file: echo goes, calculator gets weight 7.
    let edit = Instant::now();
    std::fs::write(cl.dir.join("c.toml"), "[plugins.calculator]\nweight = 7\n").unwrap();
    let seen = cl
        .watcher
        .wait(edit, long, "C's edit applied", |v| {
            v.on(cip) == vec![("calculator".to_string(), 7)]
        })
        .await;
    println!("TIMING config_edit_to_seen_ms={}", ms(seen - edit));
    let (_, out, _) = cl.client(&["list", "--json"]);
    assert!(out.contains(&cip.to_string()), "{out}");

    // q: C deregisters and exits cleanly.
    cl.c.send_line("q");
    let status = cl.c.wait_exit(long);
    assert!(status.success(), "{status:?}");
    cl.watcher
        .wait(Instant::now(), long, "C gone", |v| v.on(cip).is_empty())
        .await;
    let (_, out, _) = cl.client(&["list", "--json"]);
    assert!(!out.contains(&cip.to_string()), "{out}");
    assert_eq!(cl.watcher.now().on(bip), b_expected());
}

/// Writes `bytes` to the registry on a fresh connection, then reads until
/// the registry closes it (or a short while passes).
fn send_raw(addr: SocketAddr, bytes: &[u8]) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// An HTTP/2 frame header: 24-bit length, type, flags, stream id.
fn frame(len: u32, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_registry_fed_bad_input_keeps_serving_and_loses_nothing() {
    use registry_proto::registry::v1::{GrantLeaseRequest, RegisterRequest, ResolveRequest};
    let mut cl = Cluster::start().await;
    let (bip, cip) = (cl.b_ip(), cl.c_ip());
    let addr: SocketAddr = cl.registry_addr().parse().unwrap();
    let start = Instant::now();

    // Idle connections that never say anything, held open throughout.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap())
        .collect();
    // Garbage, then malformed HTTP/2.
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    send_raw(addr, &garbage);
    send_raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let settings = frame(0, 4, 0, 0, &[]);
    for bad in [
        frame(5, 4, 0, 0, &[1, 2, 3, 4, 5]), // SETTINGS of a bad length
        frame(8, 1, 4, 1, &[0xff; 8]),       // HEADERS with a broken HPACK block
        frame(0x00ff_ffff, 0, 0, 1, &[0; 1024]), // DATA far over the frame size limit
        frame(4, 3, 0, 0, &[0, 0, 0, 1]),    // RST_STREAM on stream 0
        frame(4, 8, 0, 0, &[0x7f, 0xff, 0xff, 0xff]), // WINDOW_UPDATE overflow
    ] {
        let mut bytes = preface.clone();
        bytes.extend(&settings);
        bytes.extend(bad);
        send_raw(addr, &bytes);
    }

    // Invalid fields and a huge message, over gRPC.
    let mut client = RegistryClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let lease = client
        .grant_lease(GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    let instance = |service: &str, port: u32, weight: u32| Instance {
        service: service.to_string(),
        host: cl.lan.gateway().to_string(),
        port,
        weight: Some(weight),
        ..Default::default()
    };
    let register = |inst: Instance, fds: Vec<u8>| RegisterRequest {
        lease_id: lease.lease_id,
        lease_secret: lease.lease_secret.clone(),
        instance: Some(inst),
        file_descriptor_set: fds,
    };
    let bad_requests = vec![
        register(instance("bad name!", 1, 1), vec![]),
        register(instance(&"x".repeat(1000), 1, 1), vec![]),
        register(instance("flood", 0, 1), vec![]),
        register(instance("flood", 1, 100_000), vec![]),
        register(instance("flood", 1, 1), vec![0xff; 100]),
        register(instance("flood", 1, 1), vec![0; 8 * 1024 * 1024]),
        RegisterRequest {
            lease_secret: "wrong".into(),
            ..register(instance("flood", 1, 1), vec![])
        },
        RegisterRequest {
            instance: None,
            ..register(instance("flood", 1, 1), vec![])
        },
    ];
    for req in bad_requests {
        let err = client
            .register(req)
            .await
            .expect_err("a bad Register was accepted");
        eprintln!(
            "bad register refused: {:?} {}",
            err.code(),
            err.message().chars().take(120).collect::<String>()
        );
    }

    // A flood of registrations: many instances, many concurrent calls.
    let flood_start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16u32 {
        let mut client = client.clone();
        let reqs: Vec<_> = (0..64u32)
            .map(|i| register(instance("flood", 1 + worker * 64 + i, 1), vec![]))
            .collect();
        tasks.spawn(async move {
            let mut ok = 0;
            for r in reqs {
                if client.register(r).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut accepted = 0;
    while let Some(n) = tasks.join_next().await {
        accepted += n.unwrap();
    }
    println!(
        "TIMING flood_1024_registrations_ms={} accepted={accepted}",
        ms(flood_start.elapsed())
    );

    // Still serving, and the well-behaved nodes never lost an instance.
    assert!(cl.registry.is_running(), "the registry died");
    let calc = client
        .resolve(ResolveRequest {
            service: "calculator".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let hosts: Vec<_> = calc.instances.iter().map(|i| i.host.clone()).collect();
    assert!(
        hosts.contains(&bip.to_string()) && hosts.contains(&cip.to_string()),
        "{hosts:?}"
    );
    let (status, out, _) = cl.client(&["call", "calculator/Add", "a=2", "b=3"]);
    assert!(status.success() && out.contains('5'), "{out}");
    {
        let log = cl.watcher.log.lock().unwrap();
        for (t, v) in log.iter().filter(|(t, _)| *t >= start) {
            assert!(
                v.on(bip) == b_expected() && v.on(cip) == c_expected(),
                "a well-behaved node lost an instance at +{:?}: {v:?}",
                *t - start
            );
        }
    }
    drop(idle);
}
