//! Serving the registry on a listener: the Registry service, the standard
//! gRPC health service, server reflection (v1 and v1alpha, since some
//! tools speak only the older one) and xDS (ADS, see [`crate::xds`]), until
//! a shutdown future resolves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use registry_proto::registry::v1::registry_server::RegistryServer;
use support::{AuthLayer, CancellationToken};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tower::util::MapResponseLayer;

use crate::config::Config;
use crate::limits::PeerLimits;
use crate::service::{RegistryService, WithWatch};
use crate::store::Writes;
use crate::store::etcd::StoreUrl;
use crate::store::etcd_store::EtcdStore;
use crate::watch::Watchers;
use crate::xds::XdsService;

/// Largest request accepted: a 4 MiB descriptor set plus the rest of a
/// Register fits; anything larger is refused before it is decoded.
pub const MAX_MESSAGE_SIZE: usize = 8 * 1024 * 1024;

/// How often an idle HTTP/2 connection is pinged, so a peer that vanished
/// without closing (cut cable, frozen host) is noticed and its KeepAlive
/// streams end.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is dropped.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for open calls before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// tonic refuses a request over [`MAX_MESSAGE_SIZE`] with OUT_OF_RANGE;
/// the protocol documents RESOURCE_EXHAUSTED for a limit reached. The
/// registry itself never answers OUT_OF_RANGE, so every such status is this
/// refusal (sent as a headers-only response, before any message).
fn too_large_is_resource_exhausted(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    const OUT_OF_RANGE: &str = "11"; // tonic::Code::OutOfRange
    const RESOURCE_EXHAUSTED: &str = "8"; // tonic::Code::ResourceExhausted
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|v| v == OUT_OF_RANGE)
    {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static(RESOURCE_EXHAUSTED),
        );
    }
    response
}

/// The runtime the registry serves on: tokio's multi-thread scheduler,
/// without its LIFO slot when built with `--cfg tokio_unstable` (the
/// workspace's `.cargo/config.toml` sets it).
///
/// Why: a change wakes every watcher's stream at once. With the LIFO slot,
/// each stream's send wakes its connection's task, which then runs next and
/// writes that one frame to the socket: one `writev` per watcher (`perf
/// stat` counted ~1 450 per change at 1000 watchers on 50 connections).
/// Without it the connection's task runs after the streams woken before it
/// and writes all their frames at once; in `bench --only watch` that alone
/// took a change's p50 at 1000 watchers from 3.2 to 2.7 ms (BENCHMARKS.md).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service rejected the embedded descriptors (a build bug).
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] support::reflection::ReflectionError),
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The DNS interface could not start.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The etcd store could not start.
    #[error(transparent)]
    Etcd(#[from] crate::store::etcd_client::EtcdError),
}

/// Serves a registry with `config` on `listener` until `shutdown` resolves,
/// then ends every open stream and returns once the calls have finished (at
/// most [`SHUTDOWN_GRACE`] later).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with_http(listener, None, config, shutdown).await
}

/// [`run`], also serving metrics and the dashboard on `http` ([`crate::http`]).
pub async fn run_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let backend = Backend::open(&config).await?;
    serve(listener, http, config, backend, shutdown).await
}

/// The state a registry serves: its own memory, or a mirror of etcd with
/// the store its writes go to. Opened before the registry says it listens,
/// so a replica whose etcd does not answer fails at once, naming it, and is
/// never reported ready.
pub struct Backend {
    watchers: Watchers,
    writes: Option<Arc<dyn Writes>>,
    _etcd: Option<crate::store::etcd_store::EtcdGuard>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("etcd", &self.writes.is_some())
            .finish()
    }
}

impl Backend {
    /// The memory store, or the etcd store of `config.store` (connected,
    /// loaded and following etcd).
    pub async fn open(config: &Config) -> Result<Backend, ServeError> {
        Ok(match &config.store {
            StoreUrl::Memory => Backend {
                watchers: Watchers::new(config.ttl, config.quotas, config.watch),
                writes: None,
                _etcd: None,
            },
            StoreUrl::Etcd(url) => {
                let (etcd, watchers, guard) = EtcdStore::start(
                    url,
                    &config.etcd_access,
                    config.ttl,
                    config.quotas,
                    config.watch,
                )
                .await?;
                let writes: Arc<dyn Writes> = Arc::new(etcd);
                Backend {
                    watchers,
                    writes: Some(writes),
                    _etcd: Some(guard),
                }
            }
        })
    }
}

/// [`run_with_http`] over a [`Backend`] already open.
pub async fn serve(
    listener: TcpListener,
    http: Option<TcpListener>,
    config: Config,
    backend: Backend,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Backend {
        watchers,
        writes,
        _etcd,
    } = backend;
    let store = watchers.store().clone();
    let _sweeper = store.spawn_sweeper();
    // Cancelled once, at shutdown: every task and stream holding a clone ends.
    let stop = CancellationToken::new();
    // Every Watch stream (ours, the dashboard's, xDS's) ends with it.
    watchers.close_on(stop.clone());
    if let Some(http) = http {
        let serve = crate::http::serve(
            http,
            watchers.clone(),
            config.tokens.clone(),
            config.http,
            stop.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("HTTP listener: {e}");
            }
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    // Answers like grpc-go's reflection (see support::reflection):
    // generic tools resolve every listed service with either version.
    let reflection = support::reflection::Reflection::new(
        &[
            registry_proto::REGISTRY_DESCRIPTORS,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ],
        &["registry.v1.Registry", "grpc.health.v1.Health"],
    )?;

    if let Some(mut lost) = writes.as_ref().and_then(|w| w.lost()) {
        // NOT_SERVING while the store is lost, so health-checking balancers
        // and operators see it.
        let health = health.clone();
        tokio::spawn(async move {
            while lost.changed().await.is_ok() {
                if *lost.borrow_and_update() {
                    health
                        .set_not_serving::<RegistryServer<RegistryService>>()
                        .await;
                } else {
                    health
                        .set_serving::<RegistryServer<RegistryService>>()
                        .await;
                }
            }
        });
    }
    let peers = PeerLimits::new(config.peers);
    let follower = crate::xds::cache::Follower::new(watchers.clone(), stop.clone());
    let _dns = match config.dns {
        Some(dns) => Some(crate::dns::start(dns, follower.subscribe(), stop.clone()).await?),
        None => None,
    };
    let xds =
        XdsService::new(follower, watchers.clone(), peers.clone(), stop.clone()).into_server();
    let mut service = RegistryService::new(watchers, stop.clone(), peers);
    if let Some(writes) = writes {
        service = service.with_writes(writes);
    }
    let registry = RegistryServer::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(crate::validate::MAX_RESPONSE_SIZE);
    let registry = WithWatch::new(registry, service, MAX_MESSAGE_SIZE);

    tracing::info!(registry_id = store.registry_id(), "registry serving");
    let signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            health
                .set_not_serving::<RegistryServer<RegistryService>>()
                .await;
            stop.cancel();
        }
    };
    let mut builder = Server::builder();
    if let Some(tls) = config.tls {
        builder = builder.tls_config(tls)?;
    }
    if !config.tokens.is_open() {
        tracing::info!(
            write = config.tokens.write.is_some(),
            read = config.tokens.read.is_some(),
            "access tokens required"
        );
    }
    let serve = builder
        // Outermost, so that calls the layers below refuse count too.
        .layer(crate::metrics::get().grpc.layer())
        .layer(AuthLayer::new(config.tokens))
        .layer(MapResponseLayer::new(
            too_large_is_resource_exhausted as fn(_) -> _,
        ))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .add_service(registry)
        .add_service(health_service)
        .add_service(reflection.v1())
        .add_service(reflection.v1alpha())
        .add_service(xds)
        .serve_with_incoming_shutdown(
            // The builder's tcp_nodelay applies only to listeners it binds
            // itself: set it here, or Nagle holds small replies for the
            // peer's delayed ACK (~40 ms per Resolve).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        );
    let grace = async move {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = serve => result?,
        () = grace => tracing::warn!("calls still open after {SHUTDOWN_GRACE:?}; stopping anyway"),
    }
    Ok(())
}
