//! The registry as an xDS control plane for proxyless gRPC clients.
//!
//! `envoy.service.discovery.v3.AggregatedDiscoveryService` (ADS), state of
//! the world, on the registry's own port. Any gRPC library with an xDS
//! client (C++ core: Python, Ruby, PHP; Go; Java; Node's grpc-js-xds), given
//! a bootstrap file naming this registry, dials `xds:///SERVICE` and gets
//! the service's instances, weights included, and every change as it
//! happens. See the README's "xDS" section for the bootstrap file.
//!
//! # Layout
//! - [`resources`]: the Listener, Cluster and ClusterLoadAssignment of one
//!   service (weights travel as locality weights).
//! - [`cache`]: one follower of the store for all streams; each change is
//!   encoded once.
//! - [`stream`]: the protocol of one stream: subscriptions, versions,
//!   nonces, ACK and NACK.
//! - this file: the gRPC service and its limits.
//!
//! # Limits (what a client controls)
//! - ADS streams per connection: counted with Watch streams,
//!   `--max-watches-per-connection` (default
//!   [`crate::limits::DEFAULT_WATCHES_PER_CONNECTION`]).
//! - Names per resource type per stream: [`MAX_NAMES_PER_TYPE`]; more ends
//!   the stream with RESOURCE_EXHAUSTED.
//! - Size of one request: [`MAX_REQUEST_BYTES`]; larger is refused with
//!   RESOURCE_EXHAUSTED before it is decoded.
//! - Incremental (delta) xDS is not served: UNIMPLEMENTED, and gRPC clients
//!   use state of the world by default.

pub mod cache;
pub mod resources;
pub mod stream;

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::limits::PeerLimits;
use crate::xds::cache::Snapshot;
use crate::xds::stream::AdsStream;

/// Most resource names one stream may subscribe to per type (Listeners,
/// Clusters, assignments). A gRPC client subscribes to one of each per
/// service it dials.
pub const MAX_NAMES_PER_TYPE: usize = 1024;

/// Largest DiscoveryRequest accepted: [`MAX_NAMES_PER_TYPE`] names of the
/// longest service name (128 bytes) plus a client's node description fit
/// many times over.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How the registry names itself in responses (`control_plane.identifier`).
pub const CONTROL_PLANE_ID: &str = "registry";

/// The ADS service.
#[derive(Debug, Clone)]
pub struct XdsService {
    /// The newest state, from [`cache::follow`].
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Counts ADS streams per connection, with Watch streams.
    peers: PeerLimits,
    /// Turns true at shutdown: every stream ends.
    shutdown: watch::Receiver<bool>,
}

impl XdsService {
    /// Serves the snapshots of `snapshots`, counting streams in `peers`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        peers: PeerLimits,
        shutdown: watch::Receiver<bool>,
    ) -> XdsService {
        XdsService {
            snapshots,
            peers,
            shutdown,
        }
    }

    /// As a tonic service, with [`MAX_REQUEST_BYTES`] enforced.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<XdsService> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(crate::server::MAX_RESPONSE_SIZE)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let guard = self.peers.open_watch(request.remote_addr())?;
        let peer = request.remote_addr();
        let mut requests = request.into_inner();
        let mut snapshots = self.snapshots.clone();
        let mut shutdown = self.shutdown.clone();
        // A small queue: a client that does not read stops this task at
        // the next send, and the snapshot it then sends is the newest.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _guard = guard;
            let mut ads = AdsStream::default();
            tracing::debug!(?peer, "xDS stream opened");
            loop {
                let request = tokio::select! {
                    next = requests.next() => match next {
                        Some(Ok(request)) => Some(request),
                        // tonic's "message too large" on a request over
                        // MAX_REQUEST_BYTES: a limit, said as the registry
                        // says every limit.
                        Some(Err(status)) if status.code() == tonic::Code::OutOfRange => {
                            let status = Status::resource_exhausted(format!(
                                "xDS request too large (max {MAX_REQUEST_BYTES} bytes): {}",
                                status.message()
                            ));
                            tracing::warn!(?peer, %status, "xDS stream ended: a limit was passed");
                            let _ = tx.try_send(Err(status));
                            return;
                        }
                        Some(Err(status)) => {
                            tracing::debug!(?peer, %status, "xDS stream broke");
                            return;
                        }
                        None => return,
                    },
                    changed = snapshots.changed() => if changed.is_err() { return } else { None },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                if let Some(request) = request
                    && let Err(status) = ads.request(request)
                {
                    tracing::warn!(?peer, %status, "xDS stream ended: a limit was passed");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                for response in ads.responses(&snapshot) {
                    tokio::select! {
                        sent = tx.send(Ok(response)) => if sent.is_err() { return },
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "incremental (delta) xDS is not served; use state of the world \
             (StreamAggregatedResources), the default of gRPC's xDS clients",
        ))
    }
}
