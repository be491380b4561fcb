//! The gRPC face of the registry: each call is validated
//! ([`crate::validate`]), applied to the store ([`crate::store`]), and its error turned
//! into a status ([`crate::error`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::registry_server::Registry;
use support::CancellationToken;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::limits::PeerLimits;
use crate::store::Writes;
use crate::validate;
use crate::watch::Watchers;
use crate::watch::encode::Encoded;

/// Numbers KeepAlive streams, so a lease knows which stream it is attached
/// to.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// The `registry.v1.Registry` service.
#[derive(Debug, Clone)]
pub struct RegistryService {
    /// Where writes go (reads and Watch are served by `watchers`' store).
    store: std::sync::Arc<dyn Writes>,
    /// Its watchers.
    watchers: Watchers,
    /// Cancelled when the server shuts down: long-lived streams (Watch,
    /// KeepAlive) end then, or graceful shutdown would wait for them forever.
    shutdown: CancellationToken,
    /// Per-peer limits: registration rate, Watch streams per connection.
    peers: PeerLimits,
}

impl RegistryService {
    /// Serves the registry of `watchers`, enforcing `peers`; streams end
    /// when `shutdown` is cancelled.
    pub fn new(
        watchers: Watchers,
        shutdown: CancellationToken,
        peers: PeerLimits,
    ) -> RegistryService {
        RegistryService {
            store: std::sync::Arc::new(watchers.store().clone()),
            watchers,
            shutdown,
            peers,
        }
    }

    /// Sends writes to `writes` instead of applying them to the local store
    /// (the etcd store, whose mirror is that local store).
    pub fn with_writes(mut self, writes: std::sync::Arc<dyn Writes>) -> RegistryService {
        self.store = writes;
        self
    }

    /// A Watch resuming from a revision of this registry (another replica
    /// of it, over etcd) first lets the local store reach that revision.
    async fn reach_resumed(&self, request: &Request<pb::WatchRequest>) {
        let request = request.get_ref();
        if request.resume_revision > 0
            && request.registry_id == self.watchers.store().registry_id()
            && request.resume_revision > self.watchers.store().read(|s| s.revision())
        {
            self.store.reach(request.resume_revision).await;
        }
    }

    /// A Watch call: its messages, already encoded.
    fn open_watch(&self, request: Request<pb::WatchRequest>) -> Result<BoxStream<Encoded>, Status> {
        let guard = self.peers.open_watch(request.remote_addr())?;
        let request = request.into_inner();
        let resume = validate::watch_resume(&request)?;
        let services = validate::watch(request)?;
        let stream = self.watchers.open_resumed(services, resume)?;
        let stream = until_lost(stream, self.store.lost())?;
        // The guard lives as long as the stream: dropping the stream (the
        // client went away) uncounts it.
        let counted = crate::metrics::watcher();
        let stream = stream.map(move |item| {
            let _counted = (&guard, &counted);
            item
        });
        Ok(Box::pin(stream))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A Watch stream that ends with UNAVAILABLE once `lost` turns true (the
/// replica lost its store: its watchers must move to another one rather
/// than be served a view that no longer changes). Refused at once if it
/// already is.
fn until_lost<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    lost: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<BoxStream<T>, Status> {
    let Some(mut lost) = lost else {
        return Ok(Box::pin(stream));
    };
    let unavailable =
        || Status::unavailable("this registry replica lost its store (etcd): use another replica");
    if *lost.borrow() {
        return Err(unavailable());
    }
    let mut ended = lost.clone();
    let stream = futures::StreamExt::take_until(stream, async move {
        let _ = lost.wait_for(|lost| *lost).await;
    });
    let last = futures::stream::once(async move { *ended.borrow_and_update() })
        .filter_map(move |lost| lost.then(|| Err(unavailable())));
    Ok(Box::pin(stream.chain(last)))
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn grant_lease(
        &self,
        request: Request<pb::GrantLeaseRequest>,
    ) -> Result<Response<pb::GrantLeaseResponse>, Status> {
        // A lease is a write too: without this, one peer could fill the
        // registry-wide lease cap with long leases and lock every node out.
        self.peers.check_register(request.remote_addr())?;
        let granted = self.store.grant_lease(request.into_inner().ttl_ms).await?;
        tracing::debug!(lease = granted.lease_id, ttl = ?granted.ttl, "lease granted");
        Ok(Response::new(pb::GrantLeaseResponse {
            lease_id: granted.lease_id,
            lease_secret: granted.lease_secret,
            ttl_ms: u64::try_from(granted.ttl.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    type KeepAliveStream = BoxStream<pb::KeepAliveResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(keep_alive(
            self.store.clone(),
            inbound,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let request = request.into_inner();
        validate::lease(request.lease_id, &request.lease_secret)?;
        let removed = self
            .store
            .revoke_lease(request.lease_id, &request.lease_secret)
            .await?;
        tracing::info!(lease = request.lease_id, removed, "lease revoked");
        Ok(Response::new(pb::RevokeLeaseResponse { removed }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        // Before validation: a flood is refused as cheaply as possible.
        self.peers.check_register(request.remote_addr())?;
        let request = validate::register(request.into_inner())?;
        let (instance, revision) = self.store.register(request).await?;
        tracing::info!(
            service = %instance.service,
            instance = %instance.instance_id,
            weight = instance.weight,
            lease = instance.lease_id,
            revision,
            "registered"
        );
        Ok(Response::new(pb::RegisterResponse {
            instance: Some(instance),
            revision,
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let request = validate::update(request.into_inner())?;
        let (instance, revision) = self.store.update(request).await?;
        tracing::info!(
            service = %instance.service,
            instance = %instance.instance_id,
            weight = instance.weight,
            revision,
            "updated"
        );
        Ok(Response::new(pb::UpdateResponse {
            instance: Some(instance),
            revision,
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let request = validate::deregister(request.into_inner())?;
        let (service, instance) = (request.service.clone(), request.instance_id.clone());
        let revision = self.store.deregister(request).await?;
        tracing::info!(%service, %instance, revision, "deregistered");
        Ok(Response::new(pb::DeregisterResponse { revision }))
    }

    async fn list_services(
        &self,
        _request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let (services, revision) = self.watchers.store().list_services();
        Ok(Response::new(pb::ListServicesResponse {
            services,
            revision,
        }))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let service = request.into_inner().service;
        validate::service_name("service", &service)?;
        let (instances, revision) = self.watchers.store().resolve(&service);
        Ok(Response::new(pb::ResolveResponse {
            instances,
            revision,
        }))
    }

    async fn get_descriptors(
        &self,
        request: Request<pb::GetDescriptorsRequest>,
    ) -> Result<Response<pb::GetDescriptorsResponse>, Status> {
        let service = request.into_inner().service;
        validate::service_name("service", &service)?;
        let (proto_service, bytes) = self.watchers.store().descriptors(&service)?;
        Ok(Response::new(pb::GetDescriptorsResponse {
            proto_service,
            // Copied outside the lock.
            file_descriptor_set: bytes.to_vec(),
        }))
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Only when served without [`WithWatch`] (which sends the encoded
        // messages as they are): decoded again, to fit the generated type.
        self.reach_resumed(&request).await;
        let stream = self
            .open_watch(request)?
            .map(|item| item.and_then(|m| m.decode()));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The path of the Watch method.
const WATCH_PATH: &str = "/registry.v1.Registry/Watch";

/// The Registry service with its Watch method served here: the messages,
/// encoded once with their gRPC prefix ([`Encoded`]), go to every watcher
/// as the very bytes the transport sends, which the generated server
/// (which encodes a `pb::WatchResponse` per watcher) cannot do, nor tonic's
/// own streaming path (which copies each message into a buffer of the
/// stream's: at 10 000 watchers that copy and its body layers were about a
/// tenth of the registry's samples in `perf`). Every other method goes to
/// the generated server.
#[derive(Debug, Clone)]
pub struct WithWatch<S> {
    /// The generated server.
    inner: S,
    /// Opens the Watch streams.
    service: RegistryService,
    /// Largest WatchRequest accepted.
    max_request: usize,
}

impl<S> WithWatch<S> {
    /// Serves Watch with `service` and everything else with `inner`.
    pub fn new(inner: S, service: RegistryService, max_request: usize) -> WithWatch<S> {
        WithWatch {
            inner,
            service,
            max_request,
        }
    }
}

impl<S> tonic::server::NamedService for WithWatch<S> {
    const NAME: &'static str = "registry.v1.Registry";
}

type HttpRequest = http::Request<tonic::body::Body>;
type HttpResponse = http::Response<tonic::body::Body>;

impl<S> tower::Service<HttpRequest> for WithWatch<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = Pin<
        Box<
            dyn std::future::Future<Output = Result<HttpResponse, std::convert::Infallible>> + Send,
        >,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return Box::pin(self.inner.call(request));
        }
        let service = self.service.clone();
        let max_request = self.max_request;
        Box::pin(async move {
            let opened = async {
                let request = watch_body::read_request(request, max_request).await?;
                service.reach_resumed(&request).await;
                service.open_watch(request)
            };
            Ok(match opened.await {
                Ok(stream) => watch_body::response(stream),
                // Headers only, as tonic answers a call refused at once.
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The Watch call on the wire: its request read, its response body made
/// of the [`Encoded`] messages as they are.
mod watch_body {
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    use bytes::{Buf, Bytes};
    use http_body::{Body, Frame};
    use http_body_util::BodyExt;
    use prost::Message;
    use registry_proto::registry::v1 as pb;
    use tonic::metadata::MetadataMap;
    use tonic::{Request, Status};

    use super::{BoxStream, Encoded};
    use crate::watch::encode::PREFIX;

    /// The one `WatchRequest` of a call, at most `max` bytes, with the
    /// call's metadata and extensions (the peer's address).
    pub(super) async fn read_request(
        request: super::HttpRequest,
        max: usize,
    ) -> Result<Request<pb::WatchRequest>, Status> {
        let (parts, body) = request.into_parts();
        let too_large = || {
            Status::resource_exhausted(format!(
                "the WatchRequest is larger than the {max} bytes a request may have"
            ))
        };
        let body = http_body_util::Limited::new(body, max.saturating_add(PREFIX))
            .collect()
            .await
            .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => too_large(),
                Err(e) => Status::cancelled(format!("the WatchRequest did not arrive: {e}")),
            })?
            .to_bytes();
        let message = framed_message(body)?;
        let message = pb::WatchRequest::decode(message)
            .map_err(|e| Status::invalid_argument(format!("WatchRequest does not decode: {e}")))?;
        Ok(Request::from_parts(
            MetadataMap::from_headers(parts.headers),
            parts.extensions,
            message,
        ))
    }

    /// The single message of a unary request body (gRPC framing).
    fn framed_message(mut body: Bytes) -> Result<Bytes, Status> {
        if body.len() < PREFIX {
            return Err(Status::invalid_argument(
                "the Watch call carries no WatchRequest",
            ));
        }
        let compressed = body.get_u8();
        let len = body.get_u32() as usize;
        if compressed != 0 {
            return Err(Status::unimplemented(
                "compressed requests are not supported: send the WatchRequest uncompressed",
            ));
        }
        if body.len() != len {
            return Err(Status::invalid_argument(format!(
                "the Watch call must carry exactly one WatchRequest ({len} bytes announced, {} sent)",
                body.len()
            )));
        }
        Ok(body)
    }

    /// The response: gRPC headers, then every message as it is, then the
    /// status in the trailers (OK at the end of the stream).
    pub(super) fn response(stream: BoxStream<Encoded>) -> super::HttpResponse {
        let body = WatchBody {
            stream,
            done: false,
        };
        let mut response = http::Response::new(tonic::body::Body::new(body));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }

    struct WatchBody {
        stream: BoxStream<Encoded>,
        done: bool,
    }

    impl WatchBody {
        fn trailers(&mut self, status: &Status) -> Option<Result<Frame<Bytes>, Status>> {
            self.done = true;
            let mut trailers = http::HeaderMap::new();
            Some(
                status
                    .add_header(&mut trailers)
                    .map(|()| Frame::trailers(trailers)),
            )
        }
    }

    impl Body for WatchBody {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if self.done {
                return Poll::Ready(None);
            }
            Poll::Ready(match ready!(self.stream.as_mut().poll_next(cx)) {
                Some(Ok(Encoded(bytes))) => Some(Ok(Frame::data(bytes))),
                Some(Err(status)) => self.trailers(&status),
                None => self.trailers(&Status::ok("")),
            })
        }

        fn is_end_stream(&self) -> bool {
            self.done
        }
    }
}

/// Serves one KeepAlive stream: answers each heartbeat, and revokes the
/// attached lease when the stream ends or breaks.
async fn keep_alive(
    store: std::sync::Arc<dyn Writes>,
    mut inbound: Streaming<pb::KeepAliveRequest>,
    tx: mpsc::Sender<Result<pb::KeepAliveResponse, Status>>,
    shutdown: CancellationToken,
) {
    let stream = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
    let mut attached: Option<u64> = None;
    let why = loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => {
                // The process is going away; so are its leases.
                return;
            }
            // The client stopped reading responses: as good as gone.
            _ = tx.closed() => break "the client went away".to_string(),
            message = inbound.message() => message,
        };
        let request = match message {
            Ok(Some(request)) => request,
            Ok(None) => break "the client closed the stream".to_string(),
            Err(status) => break format!("the stream broke: {}", status.message()),
        };
        let reply = heartbeat(&*store, &request, attached, stream).await;
        let failed = reply.is_err();
        if reply.is_ok() && attached.is_none() {
            tracing::debug!(
                lease = request.lease_id,
                stream,
                "lease attached to a KeepAlive stream"
            );
            attached = Some(request.lease_id);
        }
        if tx.send(reply).await.is_err() {
            break "the client went away".to_string();
        }
        if failed {
            break "a heartbeat was refused".to_string();
        }
    };
    if let Some(lease) = attached {
        match store.stream_closed(lease, stream).await {
            Some(removed) => {
                tracing::info!(
                    lease,
                    removed,
                    "KeepAlive stream ended ({why}): lease revoked"
                );
            }
            None => tracing::debug!(lease, "KeepAlive stream ended ({why}); lease already gone"),
        }
    }
}

async fn heartbeat(
    store: &dyn Writes,
    request: &pb::KeepAliveRequest,
    attached: Option<u64>,
    stream: u64,
) -> Result<pb::KeepAliveResponse, Status> {
    validate::lease(request.lease_id, &request.lease_secret)?;
    if let Some(lease) = attached
        && lease != request.lease_id
    {
        return Err(Error::invalid(
            "lease_id",
            format!(
                "this stream keeps lease {lease} alive, got {}: use one stream per lease",
                request.lease_id
            ),
        )
        .into());
    }
    let ttl = store
        .keep_alive(
            request.lease_id,
            &request.lease_secret,
            attached.is_none().then_some(stream),
        )
        .await?;
    tracing::trace!(lease = request.lease_id, ?ttl, "heartbeat");
    Ok(pb::KeepAliveResponse {
        lease_id: request.lease_id,
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
    })
}

/// Every refusal becomes its status here, so the ones a limit made are
/// counted once, whichever handler returned them.
impl From<Error> for Status {
    fn from(error: Error) -> Status {
        if let Some(limit) = error.refused_by() {
            crate::metrics::refused(limit);
        }
        error.status()
    }
}
