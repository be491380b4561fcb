//! A real Prometheus server scrapes a registry and two node hosts; the test
//! makes calls, kills a node, and reads the counts back through
//! Prometheus' HTTP query API. `promtool check metrics` checks each
//! program's exposition.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use registry_proto::calculator::v1::BinaryRequest;
use registry_proto::calculator::v1::calculator_client::CalculatorClient;
use testkit::{NodeHost as Node, Process, READY_TIMEOUT, Registry, TempDir, http};

/// How long Prometheus may take to show a value: a few 500 ms scrapes.
const SHOW: Duration = Duration::from_secs(20);

/// A node host serving /metrics on a free port, set by `--http` or, when
/// `toml` names it, by the file's `http`.
fn start_node(registry: SocketAddr, toml: &str) -> Node {
    Node::launch(registry, toml).http().start()
}

/// A registry on `listen` with `--http` on `http` (port 0: a free one).
fn start_registry(listen: &str, http: &str) -> (Registry, SocketAddr, SocketAddr) {
    let registry = Registry::launch().listen(listen).http(http).start();
    let (grpc, http) = (registry.addr, registry.http.unwrap());
    (registry, grpc, http)
}

/// `promtool check metrics` on what `addr` serves at /metrics.
fn promtool_accepts(addr: SocketAddr) -> String {
    let response = http::get(addr, "/metrics", &[]);
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        response.headers
    );
    let (status, out, err) = testkit::run_with_stdin(
        promtool(),
        Some(response.body.as_bytes()),
        Duration::from_secs(30),
    );
    assert!(
        status.success(),
        "promtool check metrics rejected {addr}/metrics:\n{out}{err}\n{}",
        response.body
    );
    response.body
}

fn promtool() -> Command {
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "metrics"]);
    cmd
}

/// A free loopback port for Prometheus (which prints no ready line with
/// its port).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start_prometheus(
    dir: &Path,
    registry: SocketAddr,
    nodes: [SocketAddr; 2],
) -> (Process, SocketAddr) {
    assert!(
        Command::new("prometheus").arg("--version").output().is_ok(),
        "prometheus not installed: run scripts/test-deps.sh (Debian package `prometheus`)"
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n\
             scrape_configs:\n\
             \x20 - job_name: registry\n    static_configs:\n      - targets: ['{registry}']\n\
             \x20 - job_name: node\n    static_configs:\n      - targets: ['{}', '{}']\n",
            nodes[0], nodes[1]
        ),
    )
    .unwrap();
    let listen = free_port();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .arg("--log.level=warn");
    let process = Process::spawn("prometheus", cmd);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ready = std::net::TcpStream::connect(listen).is_ok()
            && http::get(listen, "/-/ready", &[]).status == 200;
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus not ready on {listen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (process, listen)
}

/// The samples of an instant query: (labels, value).
fn query(prometheus: SocketAddr, promql: &str) -> Vec<(serde_json::Value, f64)> {
    let response = http::get(
        prometheus,
        &format!("/api/v1/query?query={}", http::encode(promql)),
        &[],
    );
    assert_eq!(response.status, 200, "{promql}: {}", response.body);
    let json: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(json["status"], "success", "{promql}: {json}");
    json["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sample| {
            let value = sample["value"][1].as_str().unwrap().parse().unwrap();
            (sample["metric"].clone(), value)
        })
        .collect()
}

/// Waits until `promql` has exactly one sample, of value `want`.
fn eventually_equals(prometheus: SocketAddr, promql: &str, want: f64) {
    let deadline = Instant::now() + SHOW;
    loop {
        let samples = query(prometheus, promql);
        if samples.len() == 1 && samples[0].1 == want {
            eprintln!("prometheus: {promql} = {want}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{promql}: want one sample of {want}, got {samples:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

async fn add(node: SocketAddr, times: usize) {
    let mut client = CalculatorClient::connect(format!("http://{node}"))
        .await
        .unwrap();
    for n in 0..times {
        let reply = client
            .add(BinaryRequest {
                a: n as f64,
                b: 1.0,
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().value, n as f64 + 1.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_calls_instances_and_removals() {
    let (mut first_registry, registry, registry_http) =
        start_registry("127.0.0.1:0", "127.0.0.1:0");
    let mut a = start_node(registry, "[plugins.calculator]\nweight = 2\n");
    let mut b = start_node(
        registry,
        "http = \"127.0.0.1:0\"\n[plugins.calculator]\nweight = 1\n\n[plugins.echo]\nweight = 3\n",
    );
    let dir = TempDir::new("prometheus");
    let (_prometheus, prom) = start_prometheus(
        dir.path(),
        registry_http,
        [a.http.unwrap(), b.http.unwrap()],
    );

    // Calls: 5 Add on a, 3 Add and one refused Divide on b.
    add(a.addr, 5).await;
    add(b.addr, 3).await;
    let mut client = CalculatorClient::connect(format!("http://{}", b.addr))
        .await
        .unwrap();
    let refused = client
        .divide(BinaryRequest { a: 1.0, b: 0.0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let add_ok = |node: &Node| {
        format!(
            "node_host_grpc_requests_total{{instance=\"{}\",service=\"calculator.v1.Calculator\",method=\"Add\",code=\"OK\"}}",
            node.http.unwrap()
        )
    };
    eventually_equals(prom, &add_ok(&a), 5.0);
    eventually_equals(prom, &add_ok(&b), 3.0);
    eventually_equals(
        prom,
        &format!(
            "node_host_grpc_requests_total{{instance=\"{}\",method=\"Divide\",code=\"INVALID_ARGUMENT\"}}",
            b.http.unwrap()
        ),
        1.0,
    );
    eventually_equals(
        prom,
        &format!(
            "node_host_grpc_request_duration_seconds_count{{instance=\"{}\",method=\"Add\"}}",
            a.http.unwrap()
        ),
        5.0,
    );
    eventually_equals(prom, "registry_instances{service=\"calculator\"}", 2.0);
    eventually_equals(prom, "registry_instances{service=\"echo\"}", 1.0);
    eventually_equals(prom, "registry_leases", 2.0);
    eventually_equals(
        prom,
        &format!(
            "node_host_plugin_registered{{instance=\"{}\",plugin=\"echo\"}}",
            b.http.unwrap()
        ),
        1.0,
    );
    eventually_equals(
        prom,
        "sum(registry_grpc_requests_total{method=\"Register\",code=\"OK\"})",
        3.0,
    );

    // Every program's exposition passes promtool, while it has data.
    for addr in [registry_http, a.http.unwrap(), b.http.unwrap()] {
        promtool_accepts(addr);
    }

    // b crashes: its two instances go with its KeepAlive stream.
    b.process.kill9();
    eventually_equals(prom, "registry_instances{service=\"calculator\"}", 1.0);
    eventually_equals(
        prom,
        "registry_instance_removals_total{reason=\"keepalive_closed\"}",
        2.0,
    );
    eventually_equals(
        prom,
        "registry_lease_removals_total{reason=\"keepalive_closed\"}",
        1.0,
    );
    eventually_equals(prom, "registry_leases", 1.0);
    // echo has no instance left: its series is gone, not stuck at 1.
    let deadline = Instant::now() + SHOW;
    while !query(prom, "registry_instances{service=\"echo\"}").is_empty() {
        assert!(
            Instant::now() < deadline,
            "registry_instances{{service=\"echo\"}} still there"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eventually_equals(
        prom,
        &format!("up{{instance=\"{}\"}}", b.http.unwrap()),
        0.0,
    );

    // a's file: echo added, a typo refused, echo removed (deregistered).
    let config = a.dir.path().join("services.toml");
    let reloads = |outcome: &str, reason: &str| {
        format!(
            "node_host_reloads_total{{instance=\"{}\",outcome=\"{outcome}\",reason=\"{reason}\"}}",
            a.http.unwrap()
        )
    };
    std::fs::write(
        &config,
        "[plugins.calculator]\nweight = 2\n[plugins.echo]\n",
    )
    .unwrap();
    eventually_equals(prom, "registry_instances{service=\"echo\"}", 1.0);
    std::fs::write(&config, "[plugins.calcualtor]\nweight = 2\n").unwrap();
    eventually_equals(prom, &reloads("refused", "unknown_plugin"), 1.0);
    std::fs::write(&config, "[plugins.calculator]\nweight = 2\n").unwrap();
    eventually_equals(
        prom,
        "registry_instance_removals_total{reason=\"deregistered\"}",
        1.0,
    );
    eventually_equals(prom, &reloads("applied", "none"), 2.0);
    eventually_equals(prom, "registry_instances{service=\"calculator\"}", 1.0);

    // The registry restarts, empty, on the same addresses: a is granted a
    // new lease (a re-grant) and registers again, its only GrantLease there.
    first_registry.process.kill9();
    let (_registry, again, again_http) =
        start_registry(&registry.to_string(), &registry_http.to_string());
    assert_eq!((again, again_http), (registry, registry_http));
    eventually_equals(
        prom,
        &format!(
            "node_host_lease_regrants_total{{instance=\"{}\"}}",
            a.http.unwrap()
        ),
        1.0,
    );
    eventually_equals(
        prom,
        "registry_grpc_requests_total{method=\"GrantLease\",code=\"OK\"}",
        1.0,
    );
    eventually_equals(prom, "registry_instances{service=\"calculator\"}", 1.0);

    // a quits: its lease is revoked with its last instance.
    a.process.send_line("q");
    a.process.wait_exit(Duration::from_secs(20));
    eventually_equals(
        prom,
        "registry_instance_removals_total{reason=\"revoked\"}",
        1.0,
    );
    eventually_equals(
        prom,
        "registry_lease_removals_total{reason=\"revoked\"}",
        1.0,
    );
    eventually_equals(
        prom,
        "registry_instance_removals_total{reason=\"expired\"}",
        0.0,
    );
    eventually_equals(prom, "registry_leases", 0.0);
    promtool_accepts(registry_http);
}

#[test]
fn promtool_refuses_a_broken_exposition() {
    // The check above means something only if promtool rejects bad input.
    let (status, _, _) = testkit::run_with_stdin(
        promtool(),
        Some(b"# TYPE x counter\nx{a=\"1\"} not-a-number\n"),
        Duration::from_secs(30),
    );
    assert!(!status.success());
}

#[test]
fn an_external_plugin_restart_is_counted() {
    let (_registry, registry, _) = start_registry("127.0.0.1:0", "127.0.0.1:0");
    let root = testkit::workspace_root();
    let toml = format!(
        "[plugins.inventory]\ncommand = [{:?}, {:?}]\nweight = 3\n",
        testkit::python3().display().to_string(),
        root.join("examples/plugins/inventory.py")
            .display()
            .to_string(),
    );
    let node = start_node(registry, &toml);
    let started = node
        .process
        .wait_for_line("plugin inventory started: pid", READY_TIMEOUT);
    let pid = started
        .split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no pid in {started:?}"))
        .to_string();
    node.process.wait_for_line(
        "plugin inventory (inventory.v1.Inventory) is SERVING",
        READY_TIMEOUT,
    );
    let count = "node_host_plugin_restarts_total{plugin=\"inventory\"}";
    assert!(
        !promtool_accepts(node.http.unwrap()).contains(count),
        "no restart yet"
    );
    // The plugin process (a child of this node, named by its own log) dies.
    let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(killed.success());
    node.process
        .wait_for_line("plugin inventory: it was killed by SIGKILL", READY_TIMEOUT);
    let deadline = Instant::now() + SHOW;
    loop {
        let body = promtool_accepts(node.http.unwrap());
        if body.contains(&format!("{count} 1")) {
            break;
        }
        assert!(Instant::now() < deadline, "no restart counted:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
