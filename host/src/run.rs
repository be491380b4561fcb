//! A node host's life, start to finish: load the configuration, pick the
//! address, serve, register, follow file changes and terminal commands, and
//! shut down cleanly on `q`, SIGINT or SIGTERM.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::node::{FixedByFlags, Node, NodeError, Registry};
use crate::reload::WatchError;
use crate::stdin::Command;
use crate::{addr, plugins, reload, stdin};
use support::{CancellationToken, Connector, SecurityError, Signals, TlsArgs};

/// The registry address used when neither flags nor file name one.
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:50051";
/// How long shutdown waits for the registry to confirm the lease revocation.
pub const REVOKE_WAIT: Duration = Duration::from_secs(3);
/// How long shutdown waits for in-flight calls (a long EchoStream, say).
pub const DRAIN_WAIT: Duration = Duration::from_secs(15);

/// What the command line says; `None` leaves the file's value (or the
/// default) in force.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file.
    pub config: PathBuf,
    /// `--registry`: one address, or several replicas' comma-separated.
    pub registry: Option<String>,
    /// `--advertise`.
    pub advertise: Option<IpAddr>,
    /// `--port`.
    pub port: Option<u16>,
    /// TLS: `--tls-cert`/`--tls-key` turn it on for this node's listener
    /// (and are the client certificate towards the registry); `--tls-ca`
    /// makes the registry connection use TLS.
    pub tls: TlsArgs,
    /// `--token`: the registry's write token.
    pub token: Option<String>,
    /// `--plugin-start-timeout-ms`: how long an external plugin may take
    /// to be SERVING.
    pub plugin_start_timeout: Duration,
    /// `--http`: where to serve `/metrics`; `None`: nowhere.
    pub http: Option<SocketAddr>,
}

/// Why the node host could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics port could not be bound.
    #[error("cannot serve metrics on {addr} (--http, or http in the file): {source}")]
    HttpBind {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The node could not be built.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The configuration file cannot be watched.
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    /// TLS or token settings are unusable.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The gRPC server task panicked.
    #[error("gRPC server task: {0}")]
    ServerTask(tokio::task::JoinError),
}

/// Runs the node host until `q`, SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<(), RunError> {
    // First of all: a signal that arrives while starting must shut down
    // cleanly too, not kill the process.
    let mut signals = Signals::install().map_err(RunError::Signal)?;
    let known = plugins::names();
    // Off the runtime, like every later read (see `reload`).
    let text = reload::read(&opts.config).await?;
    let config = Config::parse(&text, &opts.config.display().to_string(), &known, None)?;
    let registry = opts
        .registry
        .clone()
        .or_else(|| config.registry.clone())
        .unwrap_or_else(|| DEFAULT_REGISTRY.to_string());
    // Check security settings before anything starts, so mistakes end the
    // process at once rather than in a retry loop.
    let server_tls = opts.tls.server_config()?;
    let connector = Connector::new(opts.tls.clone(), opts.token.as_deref())?;
    let replicas = connector.replicas(&registry, |e| e)?;
    // Replicas sit on one network: the route to the first is the route to all.
    let ip = addr::advertise_ip(opts.advertise.or(config.advertise), replicas.first()).await;
    let port = opts.port.or(config.port).unwrap_or(0);
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
    };
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| RunError::Bind { addr: bind, source })?;
    let port = listener
        .local_addr()
        .map_err(|source| RunError::Bind { addr: bind, source })?
        .port();
    let advertised = SocketAddr::new(ip, port);

    let (node, routes) = Node::build_with(
        plugins::all(),
        advertised,
        Registry {
            addr: registry.clone(),
            lease_ttl_ms: config.lease_ttl_ms,
            connector,
        },
        FixedByFlags {
            registry: opts.registry.is_some(),
            advertise: opts.advertise.is_some(),
            port: opts.port.is_some(),
            http: opts.http.is_some(),
        },
        crate::plugins::external::Options {
            start_timeout: opts.plugin_start_timeout,
            ..Default::default()
        },
    )
    .await?;
    let http = match opts.http.or(config.http) {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::HttpBind { addr, source })?,
        ),
        None => None,
    };
    // Outermost: every call counts, those refused by the gates too.
    let mut builder = tonic::transport::Server::builder().layer(crate::metrics::get().grpc.layer());
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls)?;
    }
    let stop = CancellationToken::new();
    let mut server = tokio::spawn(builder.add_routes(routes).serve_with_incoming_shutdown(
        // Not the builder's tcp_nodelay: it only reaches listeners tonic
        // binds itself. Without it, Nagle delays small replies ~40 ms.
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        stop.clone().cancelled_owned(),
    ));
    info!("{}: {config}", opts.config.display());
    node.apply(config).await;
    let watcher = reload::spawn(opts.config.clone(), node.clone(), known.clone())?;
    // The file may have changed between the first read and the start of the
    // watch: read it once more (a no-op when unchanged).
    reload::reload(&opts.config, &node, &known).await;
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(http) = http {
        if let Ok(addr) = http.local_addr() {
            stdin::say(format_args!("node-host http on {addr}"));
        }
        let plugins = {
            let node = node.clone();
            move || node.plugin_states()
        };
        let serve = crate::metrics::serve(http, plugins, async {
            let _ = http_stopped.await;
        });
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                warn!("HTTP listener: {e}");
            }
        });
    }
    stdin::say(format_args!("node-host serving on {advertised}"));
    info!("registering with the registry at {registry}; type `help` for commands");
    let mut commands = stdin::read_commands();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            cmd = commands.recv(), if stdin_open => match cmd {
                Some(Command::Quit) => break,
                Some(cmd) => stdin::execute(cmd, &node).await,
                None => stdin_open = false,
            },
            signal = signals.recv() => { info!("{signal}: shutting down"); break }
            result = &mut server => {
                // The server only ends by itself on an error or a panic: stop
                // being listed, then fail (a supervisor restarting on failure
                // must see a non-zero exit).
                node.registrar().shutdown(REVOKE_WAIT).await;
                node.stop_external().await;
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(RunError::ServerTask(e)),
                };
            }
        }
    }

    drop(watcher);
    let removed = node.registrar().shutdown(REVOKE_WAIT).await;
    stdin::say(format_args!(
        "deregistered {removed} services; shutting down"
    ));
    // Deregistered already (the lease is gone): now stop the programs.
    node.stop_external().await;
    stop.cancel();
    match tokio::time::timeout(DRAIN_WAIT, &mut server).await {
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(_) => {}
        Err(_) => warn!("in-flight calls still running after {DRAIN_WAIT:?}; exiting anyway"),
    }
    let _ = http_stop.send(());
    stdin::say(format_args!("node-host stopped"));
    Ok(())
}
