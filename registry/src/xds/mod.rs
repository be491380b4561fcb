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
//! - [`cache`]: one follower of the registry's watch for all streams (and
//!   for [`crate::dns`]), running only while one of them is open; the
//!   instances are read from the store, each resource encoded once per
//!   version read.
//! - [`stream`]: the protocol of one stream: subscriptions, versions,
//!   nonces, ACK and NACK.
//! - this file: the gRPC service and its limits.
//!
//! # Limits (what a client controls)
//! - ADS streams per connection: counted with Watch streams,
//!   `--max-watches-per-connection` (default
//!   [`crate::limits::DEFAULT_WATCHES_PER_CONNECTION`]); and each is
//!   charged to the watch memory budget like a Watch stream
//!   (`--watch-memory-bytes`, [`crate::watch::STREAM_CHARGE`] each).
//! - What a stream holds: a response is built only when the transport
//!   asks for one (HTTP/2 has room), from the newest snapshot, so a client
//!   that stops reading holds one response, never a queue of them.
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
use std::collections::VecDeque;
use std::net::SocketAddr;

use support::CancellationToken;
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::limits::{PeerLimits, WatchGuard};
use crate::watch::Watchers;
use crate::watch::hub::Charge;
use crate::xds::cache::{Follower, Snapshot};
use crate::xds::stream::AdsStream;
pub use crate::xds::stream::{CONTROL_PLANE_ID, MAX_NAMES_PER_TYPE};

/// Largest DiscoveryRequest accepted: [`MAX_NAMES_PER_TYPE`] names of the
/// longest service name (128 bytes) plus a client's node description fit
/// many times over.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The ADS service.
#[derive(Debug, Clone)]
pub struct XdsService {
    /// The newest state, followed while some stream is open.
    follower: Follower,
    /// Counts ADS streams per connection, with Watch streams.
    peers: PeerLimits,
    /// Whose memory budget ADS streams are charged to, as Watch streams.
    watchers: Watchers,
    /// Cancelled at shutdown: every stream ends.
    shutdown: CancellationToken,
}

impl XdsService {
    /// Serves the snapshots of `follower`, counting streams in `peers`
    /// and charging them to the watch budget of `watchers`.
    pub fn new(
        follower: Follower,
        watchers: Watchers,
        peers: PeerLimits,
        shutdown: CancellationToken,
    ) -> XdsService {
        XdsService {
            follower,
            peers,
            watchers,
            shutdown,
        }
    }

    /// As a tonic service, with [`MAX_REQUEST_BYTES`] enforced.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<XdsService> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(crate::validate::MAX_RESPONSE_SIZE)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One ADS stream being served.
struct Ads {
    /// Its protocol state.
    ads: AdsStream,
    /// The client's requests.
    requests: Streaming<DiscoveryRequest>,
    /// The newest state.
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Cancelled at shutdown.
    shutdown: CancellationToken,
    /// Responses decided but not yet taken by the transport (at most one
    /// per type).
    pending: VecDeque<DiscoveryResponse>,
    /// For logs.
    peer: Option<SocketAddr>,
    /// Set once the stream has ended (after an error, nothing follows).
    done: bool,
    /// Counts the stream against --max-watches-per-connection.
    _guard: WatchGuard,
    /// Counts it against the watch memory budget (--watch-memory-bytes).
    _charge: Charge,
}

impl Ads {
    /// The next response, `None` when the stream is over.
    async fn next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(response) = self.pending.pop_front() {
                return Some(Ok(response));
            }
            let peer = self.peer;
            let request = tokio::select! {
                next = self.requests.next() => match next {
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
                        self.done = true;
                        return Some(Err(status));
                    }
                    Some(Err(status)) => {
                        tracing::debug!(?peer, %status, "xDS stream broke");
                        return None;
                    }
                    None => return None,
                },
                changed = self.snapshots.changed() => if changed.is_err() { return None } else { None },
                () = self.shutdown.cancelled() => return None,
            };
            if let Some(request) = request
                && let Err(status) = self.ads.request(request)
            {
                tracing::warn!(?peer, %status, "xDS stream ended: a limit was passed");
                self.done = true;
                return Some(Err(status));
            }
            let snapshot = self.snapshots.borrow_and_update().clone();
            // Before the follower's first snapshot nothing is known yet
            // (not even that a service is missing): answer once it is in.
            if snapshot.ready {
                self.pending.extend(self.ads.responses(&snapshot));
            }
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let guard = self.peers.open_watch(request.remote_addr())?;
        let charge = self.watchers.hub().charge_stream()?;
        let peer = request.remote_addr();
        tracing::debug!(?peer, "xDS stream opened");
        let ads = Ads {
            ads: AdsStream::default(),
            requests: request.into_inner(),
            snapshots: self.follower.subscribe(),
            shutdown: self.shutdown.clone(),
            pending: VecDeque::new(),
            peer,
            done: false,
            _guard: guard,
            _charge: charge,
        };
        // No task and no queue: the transport polls the stream when HTTP/2
        // has room, and only then is the next response built, from the
        // newest snapshot. A client that stops reading costs one response.
        let stream = futures::stream::unfold(ads, |mut ads| async move {
            ads.next().await.map(|item| (item, ads))
        });
        Ok(Response::new(Box::pin(stream)))
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
