//! The `registry` command line: its flags ([`Args`], with `--help`'s
//! text) and the [`Config`] they make. The binary parses, then serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use support::TlsArgs;
use thiserror::Error;

use crate::Config;
use crate::config::Ttl;
use crate::limits::{self, PeerConfig, Quotas};
use crate::store::etcd_failover::Credentials;
use crate::watch::{self, WatchLimits};

/// The service registry: nodes register their service instances here under
/// leases kept alive by heartbeats; clients list, resolve and watch them.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, after_help = EXAMPLES)]
pub struct Args {
    /// Address to listen on. Port 0 picks a free port; the address actually
    /// used is printed as `registry listening on <ip>:<port>`.
    #[arg(long, default_value = "0.0.0.0:50051", value_name = "IP:PORT")]
    pub listen: SocketAddr,
    /// TTL, in milliseconds, of a lease whose GrantLease asks for 0. Nodes
    /// heartbeat every TTL/3; a node whose heartbeats stop for this long
    /// loses its instances.
    #[arg(long, default_value_t = 1500, value_name = "MS", value_parser = ttl_ms())]
    pub default_ttl_ms: u64,
    /// Shortest TTL granted, in milliseconds; shorter requests are raised.
    #[arg(long, default_value_t = 100, value_name = "MS", value_parser = ttl_ms())]
    pub min_ttl_ms: u64,
    /// Longest TTL granted, in milliseconds; longer requests are lowered.
    #[arg(long, default_value_t = 300_000, value_name = "MS", value_parser = ttl_ms())]
    pub max_ttl_ms: u64,
    /// Token that calls changing state (leases, register, update,
    /// deregister) must carry as `authorization: Bearer <token>`. Default:
    /// none, anyone may write.
    #[arg(long, env = "REGISTRY_WRITE_TOKEN", hide_env_values = true)]
    pub write_token: Option<String>,
    /// Token that reading calls (list, resolve, descriptors, watch) must
    /// carry; the write token is accepted too. Default: none, anyone may
    /// read. Health and reflection stay open.
    #[arg(long, env = "REGISTRY_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
    /// TOML file with the tokens (`write = "..."`, `read = "..."`, both
    /// optional), kept out of `ps` and shell history. --write-token and
    /// --read-token (or their environment variables) win over it.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Most instances one lease may hold; more is RESOURCE_EXHAUSTED. 0: no
    /// limit.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_INSTANCES_PER_LEASE)]
    pub max_instances_per_lease: usize,
    /// Most instances one service may have; more is RESOURCE_EXHAUSTED. 0:
    /// no limit.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_INSTANCES_PER_SERVICE)]
    pub max_instances_per_service: usize,
    /// Most Watch streams open at once on one connection; more is
    /// RESOURCE_EXHAUSTED. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_WATCHES_PER_CONNECTION)]
    pub max_watches_per_connection: usize,
    /// Register and GrantLease calls per second accepted from one peer (a token bucket
    /// holding one second's worth); more is RESOURCE_EXHAUSTED, so a flood
    /// from one machine cannot starve the others. A peer is an IPv4 address
    /// or an IPv6 /64. 4096 peers are tracked; while all of them are active,
    /// further peers share one bucket of this size. 0: no limit (load tests
    /// from one machine).
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_REGISTRATIONS_PER_SEC)]
    pub max_registrations_per_sec_per_ip: u32,
    /// How far, in bytes of encoded changes, a Watch stream may lag behind
    /// before it has "fallen behind": it then gets a fresh snapshot when it
    /// reads again, and if it falls behind again while taking that
    /// snapshot, its stream ends with RESOURCE_EXHAUSTED. Also the most the
    /// registry keeps of recent changes, whatever the number of watchers.
    #[arg(long, value_name = "BYTES", default_value_t = watch::DEFAULT_BUFFER_BYTES,
          value_parser = bytes_flag(65_536))]
    pub watch_buffer_bytes: usize,
    /// Memory all Watch streams together may hold: each open stream counts
    /// 512 KiB (what HTTP/2 may buffer for a peer that does not read), each
    /// snapshot in progress its copy of the state. A Watch that would go
    /// over it is refused with RESOURCE_EXHAUSTED. The default allows 4096
    /// streams.
    #[arg(long, value_name = "BYTES", default_value_t = watch::DEFAULT_MEMORY_BYTES,
          value_parser = bytes_flag(1_048_576))]
    pub watch_memory_bytes: usize,
    /// Changes the registry keeps after every watcher took them, so that a
    /// watcher whose stream broke can resume from its last revision
    /// (WatchRequest.resume_revision) instead of taking a fresh snapshot;
    /// one it cannot serve from them gets a snapshot. At most
    /// --watch-buffer-bytes; 0 turns resuming off.
    #[arg(long, value_name = "BYTES", default_value_t = watch::DEFAULT_RESUME_BYTES,
          value_parser = bytes_flag(0))]
    pub watch_resume_bytes: usize,
    /// Also serve HTTP on this address: Prometheus metrics at /metrics and
    /// a live dashboard of the fleet at /. Off by default. With a read
    /// token set, these need it too (open /?token=TOKEN once). The address
    /// used is printed as `registry http on <ip>:<port>`.
    #[arg(long, value_name = "IP:PORT")]
    pub http: Option<SocketAddr>,
    /// Most dashboards (event streams) open at once on --http; more are
    /// refused with 503.
    #[arg(long, value_name = "N", default_value_t = crate::http::DEFAULT_MAX_DASHBOARD_CLIENTS)]
    pub max_dashboard_clients: usize,
    /// Also answer DNS on this address, UDP and TCP (e.g. 127.0.0.1:8600):
    /// A, AAAA and SRV records of SERVICE.service.DOMAIN, TTL 2 s. Off by
    /// default. Logged as `DNS listening (UDP and TCP) addr=<ip>:<port>`
    /// once bound.
    #[arg(long, value_name = "IP:PORT")]
    pub dns: Option<SocketAddr>,
    /// The DNS zone answered for with --dns: names are SERVICE.service.DOMAIN.
    #[arg(long, value_name = "DOMAIN", default_value = crate::dns::DEFAULT_DOMAIN)]
    pub dns_domain: String,
    /// Most DNS-over-TCP connections open at once with --dns; one past
    /// that is closed as soon as it is accepted (UDP is not affected).
    #[arg(long, value_name = "N", default_value_t = crate::dns::DEFAULT_MAX_TCP_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub dns_max_tcp_connections: usize,
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
    pub store: crate::store::etcd::StoreUrl,
    /// PEM CA certificate that etcd's certificate must chain to (TLS to
    /// etcd; without it, --store talks plaintext).
    #[arg(long, value_name = "PATH")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate presented to etcd (with --etcd-key), for an
    /// etcd started with --client-cert-auth.
    #[arg(long, value_name = "PATH", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user the registry authenticates as, for an etcd with auth
    /// enabled (`etcdctl auth enable`); it needs read and write on the
    /// --store prefix. Its password comes from REGISTRY_ETCD_PASSWORD or
    /// --etcd-password-file, never from a flag (`ps` would show it).
    #[arg(long, value_name = "NAME", env = "REGISTRY_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// File holding --etcd-user's password (one line; a trailing newline
    /// is dropped). REGISTRY_ETCD_PASSWORD wins over it.
    #[arg(long, value_name = "PATH", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// TLS on the registry's own port (--tls-cert, --tls-key, ...).
    #[command(flatten)]
    pub tls: TlsArgs,
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
  REGISTRY_ETCD_PASSWORD=... registry --store etcd://10.0.0.1:2379 --etcd-user registry

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

/// Why the flags make no configuration.
#[derive(Debug, Error)]
pub enum FlagError {
    /// The TTL bounds are crossed.
    #[error("need --min-ttl-ms <= --max-ttl-ms (got {min} and {max})")]
    TtlBounds {
        /// --min-ttl-ms.
        min: u64,
        /// --max-ttl-ms.
        max: u64,
    },
    /// A token flag or the token file.
    #[error(transparent)]
    Tokens(#[from] crate::tokens::TokenError),
    /// The TLS flags.
    #[error(transparent)]
    Tls(#[from] support::SecurityError),
    /// The etcd TLS flags.
    #[error(transparent)]
    Etcd(#[from] crate::store::etcd_client::EtcdError),
    /// --dns-domain.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// --etcd-user without a password, or an unreadable password file.
    #[error("--etcd-user {user:?}: {problem}")]
    EtcdPassword {
        /// --etcd-user.
        user: String,
        /// What is wrong.
        problem: String,
    },
}

impl Args {
    /// The registry's configuration; reads the token and TLS files.
    pub fn config(&self) -> Result<Config, FlagError> {
        if self.min_ttl_ms > self.max_ttl_ms {
            return Err(FlagError::TtlBounds {
                min: self.min_ttl_ms,
                max: self.max_ttl_ms,
            });
        }
        // A bad zone name is refused before anything listens.
        crate::dns::parse_domain(&self.dns_domain)?;
        Ok(Config {
            ttl: Ttl {
                default: Duration::from_millis(self.default_ttl_ms),
                min: Duration::from_millis(self.min_ttl_ms),
                max: Duration::from_millis(self.max_ttl_ms),
            },
            tokens: crate::tokens::policy(
                self.write_token.clone(),
                self.read_token.clone(),
                self.token_file.as_deref(),
            )?,
            tls: self.tls.server_config()?,
            quotas: Quotas {
                instances_per_lease: self.max_instances_per_lease,
                instances_per_service: self.max_instances_per_service,
            },
            peers: PeerConfig {
                watches_per_connection: self.max_watches_per_connection,
                registrations_per_sec: self.max_registrations_per_sec_per_ip,
            },
            watch: WatchLimits {
                buffer_bytes: self.watch_buffer_bytes,
                memory_bytes: self.watch_memory_bytes,
                resume_bytes: self.watch_resume_bytes.min(self.watch_buffer_bytes),
            },
            http: crate::http::HttpConfig {
                max_dashboard_clients: self.max_dashboard_clients,
            },
            dns: self.dns.map(|addr| crate::dns::DnsConfig {
                addr,
                domain: self.dns_domain.clone(),
                max_tcp_connections: self.dns_max_tcp_connections,
            }),
            store: self.store.clone(),
            etcd_access: crate::store::etcd_client::EtcdAccess {
                tls: crate::store::etcd_client::tls_config(
                    self.etcd_ca.as_deref(),
                    self.etcd_cert.as_deref(),
                    self.etcd_key.as_deref(),
                )?,
                credentials: self.etcd_credentials(std::env::var("REGISTRY_ETCD_PASSWORD").ok())?,
            },
        })
    }

    /// --etcd-user with its password: `from_env` (REGISTRY_ETCD_PASSWORD)
    /// or --etcd-password-file's first line.
    fn etcd_credentials(&self, from_env: Option<String>) -> Result<Option<Credentials>, FlagError> {
        let Some(user) = &self.etcd_user else {
            return Ok(None);
        };
        let problem = |problem: String| FlagError::EtcdPassword {
            user: user.clone(),
            problem,
        };
        let password = match (from_env, &self.etcd_password_file) {
            (Some(password), _) => password,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| problem(format!("{}: {e}", path.display())))?;
                text.lines().next().unwrap_or_default().to_string()
            }
            (None, None) => {
                return Err(problem(
                    "no password: set REGISTRY_ETCD_PASSWORD or --etcd-password-file".into(),
                ));
            }
        };
        if password.is_empty() {
            return Err(problem("the password is empty".into()));
        }
        Ok(Some(Credentials {
            user: user.clone(),
            password,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("registry").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn crossed_ttl_bounds_are_refused_naming_both_flags() {
        let err = parse(&["--min-ttl-ms", "500", "--max-ttl-ms", "400"])
            .config()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "need --min-ttl-ms <= --max-ttl-ms (got 500 and 400)"
        );
    }

    #[test]
    fn the_etcd_password_comes_from_the_environment_or_a_file() {
        let args = parse(&["--etcd-user", "reg"]);
        let err = args.etcd_credentials(None).unwrap_err().to_string();
        assert!(err.contains("\"reg\": no password"), "{err}");
        let from_env = args.etcd_credentials(Some("pw".into())).unwrap().unwrap();
        assert_eq!(
            (from_env.user.as_str(), from_env.password.as_str()),
            ("reg", "pw")
        );
        let err = args.etcd_credentials(Some(String::new())).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");

        let dir = testkit::TempDir::new("cli");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let file = file.to_str().unwrap();
        let args = parse(&["--etcd-user", "reg", "--etcd-password-file", file]);
        let from_file = args.etcd_credentials(None).unwrap().unwrap();
        assert_eq!(from_file.password, "from-file");
        // The environment wins.
        let both = args.etcd_credentials(Some("env".into())).unwrap().unwrap();
        assert_eq!(both.password, "env");
        let missing = parse(&[
            "--etcd-user",
            "reg",
            "--etcd-password-file",
            "/nonexistent/pw",
        ]);
        let err = missing.etcd_credentials(None).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/pw"), "{err}");
        // No user, no credentials, whatever the environment says.
        assert!(
            parse(&[])
                .etcd_credentials(Some("pw".into()))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn resuming_keeps_within_the_watch_buffer() {
        let config = parse(&[
            "--watch-buffer-bytes",
            "70000",
            "--watch-resume-bytes",
            "90000",
        ])
        .config()
        .unwrap();
        assert_eq!(config.watch.resume_bytes, 70_000);
    }
}
