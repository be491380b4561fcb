//! What forwarding through node-host costs an external plugin's calls: the
//! same unary call (`inventory.v1.Inventory/Put`, examples/plugins) made
//! straight to the Python plugin over loopback TCP, and through a node
//! host that runs another copy of it as an external plugin (client -> node
//! over TCP, node -> plugin over its unix socket).
//!
//! ```sh
//! cargo build --release --bins && cargo run --release -p bench --bin forwarding
//! ```
//! Needs the test virtualenv (`scripts/test-deps.sh`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use testkit::{Process, READY_TIMEOUT, Registry, command};
use tonic::transport::Channel;

/// Measures unary calls to the Python example plugin, straight and
/// through node-host.
#[derive(Debug, Parser)]
struct Args {
    /// Calls per run.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "2")]
    count: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Item {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "2")]
    count: i64,
}

async fn one_call(channel: Channel, i: usize) -> Result<Duration> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let started = Instant::now();
    let request = PutRequest {
        name: format!("k{}", i % 64),
        count: 1,
    };
    grpc.unary::<_, Item, _>(
        tonic::Request::new(request),
        http_path(),
        tonic_prost::ProstCodec::default(),
    )
    .await?;
    Ok(started.elapsed())
}

fn http_path() -> tonic::codegen::http::uri::PathAndQuery {
    tonic::codegen::http::uri::PathAndQuery::from_static("/inventory.v1.Inventory/Put")
}

/// (calls/s, p50, p99) of `calls` calls, `concurrency` at a time.
async fn measure(url: &str, calls: usize, concurrency: usize) -> Result<(f64, Duration, Duration)> {
    let channel = Channel::from_shared(url.to_string())?.connect().await?;
    // Warm up: connections, the plugin's threads.
    for i in 0..100 {
        one_call(channel.clone(), i).await?;
    }
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(calls);
    let mut next = 0;
    while next < calls {
        let batch: Vec<_> = (next..(next + concurrency).min(calls))
            .map(|i| tokio::spawn(one_call(channel.clone(), i)))
            .collect();
        next += batch.len();
        for call in batch {
            latencies.push(call.await??);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok((calls as f64 / elapsed.as_secs_f64(), at(0.50), at(0.99)))
}

fn wait_serving(process: &Process, needle: &str) {
    process.wait_for_line(needle, READY_TIMEOUT);
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.calls == 0 || args.concurrency == 0 {
        bail!("--calls and --concurrency must be at least 1");
    }
    let python = testkit::python3();
    let script = testkit::workspace_root().join("examples/plugins/inventory.py");

    // Straight to the plugin, on a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut direct_cmd = std::process::Command::new(&python);
    direct_cmd
        .arg(&script)
        .env("PLUGIN_LISTEN", format!("127.0.0.1:{port}"));
    let direct = Process::spawn("plugin", direct_cmd);
    wait_serving(&direct, "serving inventory.v1.Inventory");

    // Through a node host running its own copy.
    let registry = Registry::start(&[]);
    let dir = testkit::TempDir::new("bench-forwarding");
    let config = dir.path().join("services.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins.inventory]\ncommand = [{:?}, {:?}]\nweight = 1\n",
            python.display().to_string(),
            script.display().to_string()
        ),
    )?;
    let mut node_cmd = command("node-host");
    node_cmd
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&config)
        .arg("--registry")
        .arg(registry.addr.to_string())
        .args(["--advertise", "127.0.0.1"]);
    let node = Process::spawn("node-host", node_cmd);
    let line = node.wait_for_line("node-host serving on", READY_TIMEOUT);
    let node_addr = testkit::addr_from_line(&line);
    // Its log is at warn: wait until calls go through instead.
    let node_url = format!("http://{node_addr}");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ok = match Channel::from_shared(node_url.clone())?.connect().await {
            Ok(ch) => one_call(ch, 0).await.is_ok(),
            Err(_) => false,
        };
        if ok {
            break;
        }
        if Instant::now() > deadline {
            bail!("the plugin behind node-host never answered");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!(
        "{} unary calls, {} in flight, Python plugin (grpcio), {} build",
        args.calls,
        args.concurrency,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "path", "calls/s", "p50", "p99"
    );
    for (what, url) in [
        ("straight to the plugin", format!("http://127.0.0.1:{port}")),
        ("through node-host", node_url.clone()),
    ] {
        let (rate, p50, p99) = measure(&url, args.calls, args.concurrency)
            .await
            .with_context(|| what.to_string())?;
        println!("{what:<28} {rate:>10.0} {p50:>10.2?} {p99:>10.2?}");
    }
    drop(node);
    drop(direct);
    Ok(())
}
