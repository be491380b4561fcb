//! The registry's web dashboard (`registry --http`), driven in headless
//! Chromium through Selenium (`dashboard_driver.py`): a node started while
//! the page is open appears without a reload, its weight edit shows, its
//! `kill -9` removes it with the reason; 1 000 services of 10 instances
//! render and filter with no script error. Also, without a browser: the
//! read token guards page, stream and metrics, and the number of open
//! event streams is bounded.
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::registry_client::RegistryClient;
use serde_json::{Value, json};
use testkit::{NodeHost, Process, READY_TIMEOUT, Registry, http};

/// The bound the issue sets for a new node to show on an open page.
const LIVE: Duration = Duration::from_secs(1);

fn start_registry(extra: &[&str]) -> (Registry, SocketAddr, SocketAddr) {
    let registry = Registry::launch().http("127.0.0.1:0").args(extra).start();
    let (grpc, http) = (registry.addr, registry.http.unwrap());
    (registry, grpc, http)
}

/// The Selenium driver script, spoken to one JSON line at a time.
struct Browser {
    process: Process,
    cursor: usize,
}

impl Browser {
    fn start() -> Browser {
        let script = testkit::workspace_root().join("testkit/tests/dashboard_driver.py");
        let mut cmd = std::process::Command::new(testkit::python3());
        cmd.arg(script);
        let process = Process::spawn("chromium", cmd);
        let (cursor, line) = process.wait_for_line_after(0, "DRIVER ", Duration::from_secs(60));
        assert!(line.starts_with("DRIVER ok"), "{line}");
        Browser { process, cursor }
    }

    fn ask(&mut self, command: Value) -> Value {
        self.process.send_line(&command.to_string());
        let (cursor, line) =
            self.process
                .wait_for_line_after(self.cursor, "DRIVER ", Duration::from_secs(90));
        self.cursor = cursor;
        let answer = line.strip_prefix("DRIVER ok ").unwrap_or_else(|| {
            panic!("browser: {command} failed: {line}");
        });
        serde_json::from_str(answer).unwrap()
    }

    fn wait_text(&mut self, css: &str, text: &str) -> u64 {
        self.ask(json!(["wait_text", css, text, 20_000]))
            .as_u64()
            .unwrap()
    }

    fn severe(&mut self) -> Vec<Value> {
        self.ask(json!(["severe"])).as_array().unwrap().clone()
    }
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Waits until the registry lists `addr` under `service` (polled every
/// 5 ms, with the read token); returns the wall-clock time it was first
/// seen.
async fn registered_at(
    client: &mut RegistryClient<tonic::transport::Channel>,
    service: &str,
    addr: SocketAddr,
) -> u64 {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let mut request = tonic::Request::new(pb::ResolveRequest {
            service: service.into(),
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer r3ad".parse().unwrap());
        let instances = client
            .resolve(request)
            .await
            .unwrap()
            .into_inner()
            .instances;
        if instances.iter().any(|i| i.port == u32::from(addr.port())) {
            return now_ms();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never registered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_follows_the_fleet_live_in_chromium() {
    let (_registry, grpc, http_addr) = start_registry(&[
        "--read-token",
        "r3ad",
        "--max-registrations-per-sec-per-ip",
        "0",
    ]);
    let mut client = RegistryClient::new(
        tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );

    let _echo = NodeHost::start(
        grpc,
        "[plugins.echo]\nweight = 3\nmetadata = { zone = \"rack-b\" }\n",
    );
    let mut browser = Browser::start();
    // The token once in the address; a cookie keeps it, the address loses it.
    let url = browser.ask(json!(["open", format!("http://{http_addr}/?token=r3ad")]));
    assert_eq!(url, json!(format!("http://{http_addr}/")));
    browser.ask(json!(["eval", "window.__notReloaded = true"]));
    browser.wait_text("#services .service-row", "echo");

    // A node started while the page is open shows within a second of its
    // registration, without a reload.
    let mut calc = NodeHost::start(
        grpc,
        "[plugins.calculator]\nweight = 5\nmetadata = { zone = \"rack-a\", version = \"1.0\" }\n",
    );
    let registered = registered_at(&mut client, "calculator", calc.addr).await;
    let shown = browser.wait_text("#services .service-row", "calculator");
    eprintln!(
        "TIMING dashboard: calculator shown {} ms after it registered",
        shown.saturating_sub(registered)
    );
    assert!(
        shown <= registered + LIVE.as_millis() as u64,
        "calculator showed {} ms after it registered",
        shown.saturating_sub(registered)
    );
    browser.ask(json!(["click", "#services .service-row", "calculator"]));
    let row = format!("127.0.0.1:{}", calc.addr.port());
    browser.wait_text("#instances .instance-row", &row);
    browser.wait_text("#instances .instance-row", "zone=rack-a");
    browser.wait_text("#feed li", "registered");

    // Its weight edited in its file: the row and the feed show it.
    std::fs::write(
        &calc.config,
        "[plugins.calculator]\nweight = 9\nmetadata = { zone = \"rack-a\", version = \"1.0\" }\n",
    )
    .unwrap();
    browser.wait_text("#feed li", "weight 5 → 9");
    let weight = browser.ask(json!([
        "eval",
        "document.querySelector('#instances .instance-row .weight').textContent"
    ]));
    assert_eq!(weight, json!("9"));

    // A second calculator, then kill -9 of the first: its row goes, the
    // feed says why.
    let second = NodeHost::start(
        grpc,
        "[plugins.calculator]\nweight = 1\nmetadata = { zone = \"rack-b\" }\n",
    );
    browser.wait_text("#instances .instance-row", "zone=rack-b");
    calc.process.kill9();
    browser.ask(json!([
        "wait_no_text",
        "#instances .instance-row",
        row,
        20_000
    ]));
    browser.wait_text("#feed li.removed", "crash: keepalive closed");
    browser.wait_text("#selected", "calculator: 1 instance");
    browser.ask(json!([
        "screenshot",
        screenshot_path().display().to_string()
    ]));
    drop(second);
    let still = browser.ask(json!(["eval", "window.__notReloaded === true"]));
    assert_eq!(still, json!(true), "the page was reloaded");

    // 1 000 services × 10 instances arrive while the page is open.
    bulk_register(grpc, 1000, 10).await;
    browser.ask(json!(["wait_text", "#instance-count", "10001", 60_000]));
    browser.wait_text("#service-count", "1001");
    // Virtualized: a handful of rows in the DOM, not a thousand.
    let rows = browser.ask(json!(["count", "#services .service-row"]));
    assert!(
        rows.as_u64().unwrap() < 100,
        "{rows} service rows in the DOM"
    );
    browser.ask(json!(["type", "#service-filter", "svc-0042"]));
    browser.wait_text("#services-shown", "1 of 1001 services match");
    browser.ask(json!(["click", "#services .service-row", "svc-0042"]));
    browser.wait_text("#selected", "svc-0042: 10 instances");
    browser.ask(json!(["type", "#instance-filter", "slot=7"]));
    browser.wait_text("#instances-shown", "1 of 10 shown");
    // Metadata is text, never markup.
    browser.wait_text("#instances .instance-row", &format!("note={XSS}"));
    let images = browser.ask(json!(["count", "#instances img"]));
    assert_eq!(images, json!(0));
    // The address names the service shown.
    browser.ask(json!(["eval", "location.hash = 'svc-0999'"]));
    browser.ask(json!(["type", "#instance-filter", ""]));
    browser.wait_text("#selected", "svc-0999: 10 instances");
    // A reload takes the whole fleet as one snapshot.
    browser.ask(json!(["reload"]));
    browser.wait_text("#instance-count", "10001");
    browser.wait_text("#selected", "svc-0999: 10 instances");
    browser.ask(json!(["type", "#service-filter", "svc-09"]));
    browser.wait_text("#services-shown", "100 of 1001 services match");
    let bulk = std::env::temp_dir().join(format!("dashboard-bulk-{}.png", std::process::id()));
    browser.ask(json!(["screenshot", bulk.display().to_string()]));

    let severe = browser.severe();
    assert!(severe.is_empty(), "console errors: {severe:#?}");
    browser.ask(json!(["quit"]));
}

/// Where the test's screenshot goes: `DASHBOARD_SCREENSHOT` (README's
/// picture is taken with `DASHBOARD_SCREENSHOT=docs/dashboard.png`), else a
/// scratch file.
fn screenshot_path() -> PathBuf {
    match std::env::var_os("DASHBOARD_SCREENSHOT") {
        Some(path) => testkit::workspace_root().join(path),
        None => std::env::temp_dir().join(format!("dashboard-{}.png", std::process::id())),
    }
}

/// Labels of bulk instance `i`: its slot, and for slot 7 a value that
/// would run a script if the page put it into HTML unescaped.
fn metadata(i: usize) -> std::collections::HashMap<String, String> {
    let mut labels = std::collections::HashMap::from([("slot".to_string(), i.to_string())]);
    if i == 7 {
        labels.insert("note".into(), XSS.into());
    }
    labels
}

/// Shown as text, it is harmless; run, it logs a console error.
const XSS: &str = "<img src=x onerror=console.error('xss')>";

/// `services` services of `per` instances each, under two long leases
/// (no heartbeat needed for the test's length), 16 calls at a time.
async fn bulk_register(grpc: SocketAddr, services: usize, per: usize) {
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = RegistryClient::new(channel);
    let mut leases = Vec::new();
    for _ in 0..2 {
        leases.push(
            client
                .clone()
                .grant_lease(pb::GrantLeaseRequest { ttl_ms: 300_000 })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let jobs: Vec<(usize, usize)> = (0..services)
        .flat_map(|s| (0..per).map(move |i| (s, i)))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in jobs.chunks(jobs.len().div_ceil(16)) {
        let chunk = chunk.to_vec();
        let mut client = client.clone();
        let leases = leases.clone();
        tasks.spawn(async move {
            for (s, i) in chunk {
                let lease = &leases[s % 2];
                client
                    .register(pb::RegisterRequest {
                        lease_id: lease.lease_id,
                        lease_secret: lease.lease_secret.clone(),
                        instance: Some(pb::Instance {
                            service: format!("svc-{s:04}"),
                            host: format!("10.{}.{}.{}", s / 250, s % 250, i + 1),
                            port: 7000,
                            weight: Some(u32::try_from(i + 1).unwrap()),
                            metadata: metadata(i),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Reads an event stream up to its first `event: snapshot` line.
fn open_stream(
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> (u16, Option<std::io::BufReader<std::net::TcpStream>>) {
    let (status, _, mut reader) = http::open(addr, "/events", headers);
    if status != 200 {
        return (status, None);
    }
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
        if line.starts_with("event: snapshot") {
            return (status, Some(reader));
        }
    }
}

#[test]
fn event_streams_are_bounded_and_every_path_needs_the_read_token() {
    let (_registry, _grpc, addr) = start_registry(&[
        "--read-token",
        "r3ad",
        "--write-token",
        "wr1te",
        "--max-dashboard-clients",
        "2",
    ]);
    let bearer = [("Authorization", "Bearer r3ad")];

    // No token, a wrong one: 401 naming the way in, never the token.
    for path in ["/", "/events", "/metrics", "/app.js", "/?token=nope"] {
        let response = http::get(addr, path, &[]);
        assert_eq!(response.status, 401, "{path}: {}", response.body);
        assert!(
            response.body.contains("/?token="),
            "{path}: {}",
            response.body
        );
        assert!(!response.body.contains("r3ad"), "{}", response.body);
    }
    assert_eq!(
        http::get(addr, "/metrics", &[("Authorization", "Bearer nope")]).status,
        401
    );
    // The right one: as a header, or once in the address for a cookie.
    let metrics = http::get(addr, "/metrics", &bearer);
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("registry_dashboard_clients 0"));
    let write = http::get(addr, "/metrics", &[("Authorization", "Bearer wr1te")]);
    assert_eq!(write.status, 200, "the write token reads too");
    let login = http::get(addr, "/?token=r3ad", &[]);
    assert_eq!(login.status, 303);
    assert_eq!(login.header("location"), Some("/"));
    let cookie = login.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = http::get(addr, "/", &[("Cookie", &cookie)]);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<script src=\"app.js\">"));

    // Two streams may be open; a third is refused until one closes.
    let (status, first) = open_stream(addr, &[("Cookie", &cookie)]);
    assert_eq!(status, 200);
    let (status, second) = open_stream(addr, &bearer);
    assert_eq!(status, 200);
    let refused = http::get(addr, "/events", &bearer);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body.contains("--max-dashboard-clients"),
        "{}",
        refused.body
    );
    let metrics = http::get(addr, "/metrics", &bearer);
    assert!(
        metrics.body.contains("registry_dashboard_clients 2"),
        "{}",
        metrics.body
    );
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        // The server notices the closed stream at its next write (a
        // keep-alive comment at the latest).
        let (status, third) = open_stream(addr, &bearer);
        if status == 200 {
            drop(third);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a closed stream was never uncounted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(second);
}
