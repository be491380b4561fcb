//! `registry`: runs the service registry.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use registry::Config;
use registry::config::Ttl;
use registry::limits::{self, PeerConfig, Quotas};
use registry::watch::{self, WatchLimits};
use support::{Signal, Signals, TlsArgs};

/// jemalloc: it gives freed memory back (see `registry::allocator`).
#[global_allocator]
static ALLOCATOR: registry::allocator::Allocator = registry::allocator::Allocator;

/// The service registry: nodes register their service instances here under
/// leases kept alive by heartbeats; clients list, resolve and watch them.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, after_help = EXAMPLES)]
struct Args {
    /// Address to listen on. Port 0 picks a free port; the address actually
    /// used is printed as `registry listening on <ip>:<port>`.
    #[arg(long, default_value = "0.0.0.0:50051", value_name = "IP:PORT")]
    listen: SocketAddr,
    /// TTL, in milliseconds, of a lease whose GrantLease asks for 0. Nodes
    /// heartbeat every TTL/3; a node whose heartbeats stop for this long
    /// loses its instances.
    #[arg(long, default_value_t = 1500, value_name = "MS", value_parser = ttl_ms())]
    default_ttl_ms: u64,
    /// Shortest TTL granted, in milliseconds; shorter requests are raised.
    #[arg(long, default_value_t = 100, value_name = "MS", value_parser = ttl_ms())]
    min_ttl_ms: u64,
    /// Longest TTL granted, in milliseconds; longer requests are lowered.
    #[arg(long, default_value_t = 300_000, value_name = "MS", value_parser = ttl_ms())]
    max_ttl_ms: u64,
    /// Token that calls changing state (leases, register, update,
    /// deregister) must carry as `authorization: Bearer <token>`. Default:
    /// none, anyone may write.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "REGISTRY_WRITE_TOKEN",
        hide_env_values = true
    )]
    write_token: Option<String>,
    /// Token that reading calls (list, resolve, descriptors, watch) must
    /// carry; the write token is accepted too. Default: none, anyone may
    /// read. Health and reflection stay open.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "REGISTRY_READ_TOKEN",
        hide_env_values = true
    )]
    read_token: Option<String>,
    /// TOML file with the tokens (`write = "..."`, `read = "..."`, both
    /// optional), kept out of `ps` and shell history. --write-token and
    /// --read-token (or their environment variables) win over it.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Most instances one lease may hold; more is RESOURCE_EXHAUSTED. 0: no
    /// limit.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_INSTANCES_PER_LEASE)]
    max_instances_per_lease: usize,
    /// Most instances one service may have; more is RESOURCE_EXHAUSTED. 0:
    /// no limit.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_INSTANCES_PER_SERVICE)]
    max_instances_per_service: usize,
    /// Most Watch streams open at once on one connection; more is
    /// RESOURCE_EXHAUSTED. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_WATCHES_PER_CONNECTION)]
    max_watches_per_connection: usize,
    /// Register and GrantLease calls per second accepted from one peer (a token bucket
    /// holding one second's worth); more is RESOURCE_EXHAUSTED, so a flood
    /// from one machine cannot starve the others. A peer is an IPv4 address
    /// or an IPv6 /64. 4096 peers are tracked; while all of them are active,
    /// further peers share one bucket of this size. 0: no limit (load tests
    /// from one machine).
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_REGISTRATIONS_PER_SEC)]
    max_registrations_per_sec_per_ip: u32,
    /// How far, in bytes of encoded changes, a Watch stream may lag behind
    /// before it has "fallen behind": it then gets a fresh snapshot when it
    /// reads again, and if it falls behind again while taking that
    /// snapshot, its stream ends with RESOURCE_EXHAUSTED. Also the most the
    /// registry keeps of recent changes, whatever the number of watchers.
    #[arg(long, value_name = "BYTES", default_value_t = watch::DEFAULT_BUFFER_BYTES,
          value_parser = bytes_flag(65_536))]
    watch_buffer_bytes: usize,
    /// Memory all Watch streams together may hold: each open stream counts
    /// 512 KiB (what HTTP/2 may buffer for a peer that does not read), each
    /// snapshot in progress its copy of the state. A Watch that would go
    /// over it is refused with RESOURCE_EXHAUSTED. The default allows 4096
    /// streams.
    #[arg(long, value_name = "BYTES", default_value_t = watch::DEFAULT_MEMORY_BYTES,
          value_parser = bytes_flag(1_048_576))]
    watch_memory_bytes: usize,
    /// Changes the registry keeps after every watcher took them, so that a
    /// watcher whose stream broke can resume from its last revision
    /// (WatchRequest.resume_revision) instead of taking a fresh snapshot;
    /// one it cannot serve from them gets a snapshot. At most
    /// --watch-buffer-bytes; 0 turns resuming off.
    #[arg(long, value_name = "BYTES", default_value_t = watch::DEFAULT_RESUME_BYTES,
          value_parser = bytes_flag(0))]
    watch_resume_bytes: usize,
    /// Also serve HTTP on this address: Prometheus metrics at /metrics and
    /// a live dashboard of the fleet at /. Off by default. With a read
    /// token set, these need it too (open /?token=TOKEN once). The address
    /// used is printed as `registry http on <ip>:<port>`.
    #[arg(long, value_name = "IP:PORT")]
    http: Option<SocketAddr>,
    /// Most dashboards (event streams) open at once on --http; more are
    /// refused with 503.
    #[arg(long, value_name = "N", default_value_t = registry::http::DEFAULT_MAX_DASHBOARD_CLIENTS)]
    max_dashboard_clients: usize,
    /// Also answer DNS on this address, UDP and TCP (e.g. 127.0.0.1:8600):
    /// A, AAAA and SRV records of SERVICE.service.DOMAIN, TTL 2 s. Off by
    /// default. Logged as `DNS listening (UDP and TCP) addr=<ip>:<port>`
    /// once bound.
    #[arg(long, value_name = "IP:PORT")]
    dns: Option<SocketAddr>,
    /// The DNS zone answered for with --dns: names are SERVICE.service.DOMAIN.
    #[arg(long, value_name = "DOMAIN", default_value = registry::dns::DEFAULT_DOMAIN)]
    dns_domain: String,
    /// Most DNS-over-TCP connections open at once with --dns; one past
    /// that is closed as soon as it is accepted (UDP is not affected).
    #[arg(long, value_name = "N", default_value_t = registry::dns::DEFAULT_MAX_TCP_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    dns_max_tcp_connections: usize,
    /// Where the registry's state lives: `memory` (this process; lost when
    /// it stops) or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (an etcd
    /// cluster, keys under PREFIX, default /registry): any number of
    /// registries over the same cluster and prefix are replicas of one
    /// registry, and nodes and clients may use any of them.
    #[arg(
        long,
        value_name = "URL",
        env = "REGISTRY_STORE",
        default_value = "memory"
    )]
    store: registry::store::etcd::StoreUrl,
    /// PEM CA certificate that etcd's certificate must chain to (TLS to
    /// etcd; without it, --store talks plaintext).
    #[arg(long, value_name = "PATH")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate presented to etcd (with --etcd-key), for an
    /// etcd started with --client-cert-auth.
    #[arg(long, value_name = "PATH", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

const EXAMPLES: &str = "Examples:
  registry                                  # all interfaces, port 50051
  registry --listen 127.0.0.1:0             # a free port, printed on stdout
  registry --default-ttl-ms 3000            # slower networks: longer leases
  REGISTRY_WRITE_TOKEN=s3cret registry      # only nodes with the token may register
  registry --token-file tokens.toml         # write = \"...\", read = \"...\"
  registry --max-registrations-per-sec-per-ip 0   # benchmarks from one machine
  registry --tls-cert reg.pem --tls-key reg-key.pem
  registry --http 0.0.0.0:8080              # metrics at /metrics, dashboard at /
  registry --dns 127.0.0.1:8600             # dig @127.0.0.1 -p 8600 calculator.service.registry SRV
  registry --store etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379   # a replica over etcd

Logs go to stderr; RUST_LOG=debug also shows each lease granted and attached.";

/// TTL flags take 1 ms to 7 days: a lease meant to outlive a week is not a
/// lease, and the bound keeps `now + TTL` far from the clock's limits.
fn ttl_ms() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=7 * 24 * 3600 * 1000)
}

/// A byte count of at least `min` (and at most 16 TiB).
fn bytes_flag(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..=(1 << 44))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    support::logging::init();
    let args = Args::parse();
    anyhow::ensure!(
        args.min_ttl_ms <= args.max_ttl_ms,
        "need --min-ttl-ms <= --max-ttl-ms (got {} and {})",
        args.min_ttl_ms,
        args.max_ttl_ms
    );
    let config = Config {
        ttl: Ttl {
            default: Duration::from_millis(args.default_ttl_ms),
            min: Duration::from_millis(args.min_ttl_ms),
            max: Duration::from_millis(args.max_ttl_ms),
        },
        tokens: registry::tokens::policy(
            args.write_token,
            args.read_token,
            args.token_file.as_deref(),
        )?,
        tls: args.tls.server_config()?,
        quotas: Quotas {
            instances_per_lease: args.max_instances_per_lease,
            instances_per_service: args.max_instances_per_service,
        },
        peers: PeerConfig {
            watches_per_connection: args.max_watches_per_connection,
            registrations_per_sec: args.max_registrations_per_sec_per_ip,
        },
        watch: WatchLimits {
            buffer_bytes: args.watch_buffer_bytes,
            memory_bytes: args.watch_memory_bytes,
            resume_bytes: args.watch_resume_bytes.min(args.watch_buffer_bytes),
        },
        http: registry::http::HttpConfig {
            max_dashboard_clients: args.max_dashboard_clients,
        },
        dns: args.dns.map(|addr| registry::dns::DnsConfig {
            addr,
            domain: args.dns_domain.clone(),
            max_tcp_connections: args.dns_max_tcp_connections,
        }),
        store: args.store.clone(),
        etcd_tls: registry::store::etcd_client::tls_config(
            args.etcd_ca.as_deref(),
            args.etcd_cert.as_deref(),
            args.etcd_key.as_deref(),
        )?,
    };
    // A bad zone name is refused before anything listens.
    registry::dns::parse_domain(&args.dns_domain)?;
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("no local address")?;
    tracing::info!(
        ttl = ?config.ttl,
        tls = config.tls.is_some(),
        quotas = ?config.quotas,
        peers = ?config.peers,
        watch = ?config.watch,
        mutual_tls = args.tls.tls_require_client_cert,
        "configuration"
    );
    let http = match args.http {
        Some(addr) => {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--http)"))?;
            println!(
                "registry http on {}",
                http.local_addr().context("no local address")?
            );
            Some(http)
        }
        None => None,
    };
    // The store first (etcd connected and loaded): the ready line means
    // ready to serve.
    let backend = registry::Backend::open(&config).await?;
    // The ready line: scripts and tests wait for it (on stdout, not a log).
    println!("registry listening on {local}");
    std::io::stdout().flush().context("stdout")?;
    registry::serve(listener, http, config, backend, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// A future that resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are
/// installed right away, before the ready line is printed: a signal sent as
/// soon as that line appears must stop the registry cleanly, not kill it.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut signals = Signals::install().context("cannot handle SIGINT and SIGTERM")?;
    Ok(async move {
        match signals.recv().await {
            Signal::Interrupt => tracing::info!("Ctrl-C received"),
            Signal::Terminate => tracing::info!("SIGTERM received"),
        }
    })
}
