//! `node-host`: serves the plugins a `services.toml` mounts and registers
//! them with the registry. See `node-host --help`.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

/// Serves gRPC plugins (calculator, echo, and programs in any language that
/// serve gRPC) and registers them with a service registry.
///
/// The configuration file says which plugins to mount, with which weight and
/// metadata; it is watched, and edits take effect at once (a file with an
/// error is reported and ignored). Flags override the file's values.
///
/// Commands on stdin: u = unregister everything (keep serving),
/// r = register again, q = deregister and quit. SIGINT/SIGTERM act like q.
#[derive(Debug, Parser)]
#[command(version, about, long_about, after_long_help = EXAMPLES)]
struct Args {
    /// The configuration file (plugins to mount, their weights and metadata).
    #[arg(long, value_name = "PATH", default_value = "services.toml")]
    config: PathBuf,

    /// The registry's address, or the addresses of several registry
    /// replicas, comma-separated (`a:50051,b:50051,c:50051`; the flag may
    /// also be repeated). The node keeps its lease on one replica at a time
    /// and moves to the next one when it fails. Overrides the file's
    /// `registry`; default 127.0.0.1:50051.
    #[arg(
        long,
        value_name = "HOST:PORT[,HOST:PORT...]",
        env = "REGISTRY_ADDR",
        value_delimiter = ','
    )]
    registry: Vec<String>,

    /// The IP to register, the one clients connect to. Overrides the file's
    /// `advertise`; default: the local address that reaches the registry, or
    /// this machine's LAN address when the registry is on this machine.
    #[arg(long, value_name = "IP")]
    advertise: Option<IpAddr>,

    /// The port to serve on. Overrides the file's `port`; default 0: any
    /// free port, chosen by the OS.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16))]
    port: Option<u16>,

    /// The registry's write token (needed when the registry requires one).
    /// Default: none.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "REGISTRY_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// How long an external plugin (a `[plugins.NAME]` table with
    /// `command`) may take from start until its health says SERVING, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    plugin_start_timeout_ms: u64,

    /// Serve Prometheus metrics at http://ADDR/metrics. Overrides the
    /// file's `http`; off by default.
    /// The address used is printed as `node-host http on <ip>:<port>`.
    #[arg(long, value_name = "IP:PORT")]
    http: Option<std::net::SocketAddr>,

    #[command(flatten)]
    tls: support::TlsArgs,
}

const EXAMPLES: &str = r#"Examples:
  node-host                                   # ./services.toml, registry 127.0.0.1:50051
  node-host --config node-a.toml --registry 192.168.1.10:50051
  node-host --registry 10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051   # replicas
  node-host --advertise 192.168.1.20 --port 7001
  node-host --http 0.0.0.0:9101                # Prometheus metrics at /metrics

A services.toml:
  registry = "127.0.0.1:50051"                # or ["a:50051", "b:50051"]: replicas
  [plugins.calculator]
  weight = 5                                  # 1..=1000; missing = random 1..=10
  metadata = { zone = "lab" }
  [plugins.echo]
  enabled = false                             # not mounted, not registered
  [plugins.inventory]                         # a program in any language
  command = ["python3", "inventory.py"]       # see README: plugins in any language

Prints `node-host serving on <ip>:<port>` on stdout once serving."#;

fn main() -> anyhow::Result<()> {
    support::logging::init();
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(node_host::run::run(node_host::run::Options {
        config: args.config,
        registry: (!args.registry.is_empty()).then(|| args.registry.join(",")),
        advertise: args.advertise,
        port: args.port,
        tls: args.tls,
        token: args.token,
        plugin_start_timeout: std::time::Duration::from_millis(args.plugin_start_timeout_ms),
        http: args.http,
    }));
    // A configuration read stuck in the kernel (a hung network file
    // system) must not keep a stopped node alive: blocking threads are
    // not waited for past this.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    result?;
    Ok(())
}
