//! One etcd member at a time, and the next one as soon as it fails.
//!
//! tonic's `Channel::balance_list` keeps sending a share of the requests to
//! a member that was killed (its reconnecting endpoint still counts as
//! ready, and each request sent there fails with "tcp connect error"), so a
//! replica saw etcd as lost for seconds while two members of three
//! answered. [`Failover`] pins one member, like etcd's own clients do, and
//! moves to the next on the first transport failure, whether of a request
//! or of a stream already open (a Watch, a LeaseKeepAlive) whose connection
//! broke. Requests that were in flight fail once; the store's retries go to
//! the next member. It also carries etcd's auth token (`--etcd-user`) in
//! every request, and notes when etcd refused it, for a new one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::Frame;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};

/// A `tower::Service` over the channels of every member; see the module
/// docs. Cheap to clone: clones share the pinned member.
#[derive(Clone, Debug)]
pub struct Failover {
    members: Arc<Members>,
}

#[derive(Debug)]
struct Members {
    /// Each member's address (for logs) and its lazily connected channel.
    channels: Vec<(String, Channel)>,
    /// The member requests go to now.
    pinned: AtomicUsize,
    /// etcd's auth token, sent as `token` metadata with every request once
    /// [`Failover::authenticate`] got one.
    token: std::sync::RwLock<Option<http::HeaderValue>>,
    /// Set when a request was refused for its token: the next
    /// [`Failover::authenticate`] is due.
    token_refused: AtomicBool,
}

/// etcd's auth: a user and its password (`--etcd-user`). Debug shows the
/// user only.
#[derive(Clone)]
pub struct Credentials {
    /// The etcd user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The one call that goes without a token.
const AUTHENTICATE: &str = "/etcdserverpb.Auth/Authenticate";

impl Failover {
    /// A channel per endpoint, connected on first use. Starts on a member
    /// picked at random, so replicas spread over the cluster.
    pub fn new(endpoints: Vec<(String, Endpoint)>) -> Failover {
        let channels: Vec<(String, Channel)> = endpoints
            .into_iter()
            .map(|(host, endpoint)| (host, endpoint.connect_lazy()))
            .collect();
        let first = rand::random_range(0..channels.len().max(1));
        Failover {
            members: Arc::new(Members {
                channels,
                pinned: AtomicUsize::new(first),
                token: std::sync::RwLock::new(None),
                token_refused: AtomicBool::new(false),
            }),
        }
    }

    /// The member requests go to now: its index and address.
    pub fn pinned(&self) -> (usize, &str) {
        let i = self.members.pinned.load(Ordering::Acquire);
        (i, self.members.channels[i].0.as_str())
    }

    /// Moves on from member `failed` if requests still go there (many
    /// requests failing on one dead member move on once, not once each).
    pub fn failed(&self, failed: usize) {
        self.members.failed(failed);
    }

    /// Asks etcd for a token for `credentials` (on the pinned member, the
    /// next on a transport failure, like any call), and sends it with
    /// every request from now on.
    pub async fn authenticate(&self, credentials: &Credentials) -> Result<(), tonic::Status> {
        let mut auth = etcd_api::pb::auth_client::AuthClient::new(self.clone());
        let reply = auth
            .authenticate(etcd_api::pb::AuthenticateRequest {
                name: credentials.user.clone(),
                password: credentials.password.clone(),
            })
            .await?
            .into_inner();
        let token = http::HeaderValue::from_str(&reply.token)
            .map_err(|_| tonic::Status::internal("etcd sent a token that is no header value"))?;
        *self
            .members
            .token
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token);
        self.members.token_refused.store(false, Ordering::Release);
        Ok(())
    }

    /// True once etcd refused a request's token (it expired: etcd drops
    /// a simple token unused for `--auth-token-ttl`, a JWT at its expiry),
    /// until the next [`authenticate`](Self::authenticate).
    pub fn token_refused(&self) -> bool {
        self.members.token_refused.load(Ordering::Acquire)
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.channels.len()
    }

    /// True when there is no member (never, for a parsed `--store` URL).
    pub fn is_empty(&self) -> bool {
        self.members.channels.is_empty()
    }
}

impl Members {
    fn failed(&self, failed: usize) {
        let next = (failed + 1) % self.channels.len();
        if next != failed
            && self
                .pinned
                .compare_exchange(failed, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::warn!(
                failed = self.channels[failed].0.as_str(),
                next = self.channels[next].0.as_str(),
                "etcd member failed: moving to the next one"
            );
        }
    }
}

impl tower::Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call takes the pinned member's channel and waits for it there.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let members = self.members.clone();
        if request.uri().path() != AUTHENTICATE {
            let token = members
                .token
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if let Some(token) = token {
                request.headers_mut().insert("token", token);
            }
        }
        let index = members.pinned.load(Ordering::Acquire);
        let mut channel = members.channels[index].1.clone();
        Box::pin(async move {
            use tower::ServiceExt;
            let answer = match channel.ready().await {
                Ok(channel) => channel.call(request).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(response) => {
                    // A refusal comes before any message, its status in
                    // the headers (gRPC's trailers-only answer).
                    let unauthenticated = response
                        .headers()
                        .get("grpc-status")
                        .is_some_and(|code| code.as_bytes() == b"16");
                    if unauthenticated {
                        members.token_refused.store(true, Ordering::Release);
                    }
                    Ok(response.map(|body| {
                        Body::new(Watched {
                            body,
                            members,
                            index,
                        })
                    }))
                }
                Err(e) => {
                    members.failed(index);
                    Err(e)
                }
            }
        })
    }
}

/// A response body that moves on from its member if it breaks: a broken
/// connection under an open stream shows only here.
struct Watched {
    body: Body,
    members: Arc<Members>,
    index: usize,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.members.failed(self.index);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Failover {
        let endpoints = (1..=3)
            .map(|i| {
                let host = format!("127.0.0.{i}:2379");
                let endpoint = Endpoint::from_shared(format!("http://{host}")).unwrap();
                (host, endpoint)
            })
            .collect();
        Failover::new(endpoints)
    }

    #[tokio::test]
    async fn a_failure_moves_on_once_however_many_requests_saw_it() {
        let failover = three();
        let (first, _) = failover.pinned();
        failover.failed(first);
        failover.failed(first);
        let (second, _) = failover.pinned();
        assert_eq!(second, (first + 1) % 3);
        failover.failed(second);
        assert_eq!(failover.pinned().0, (first + 2) % 3);
        // Round the ring: back to the first.
        failover.failed((first + 2) % 3);
        assert_eq!(failover.pinned().0, first);
    }

    #[tokio::test]
    async fn one_member_stays_pinned() {
        let endpoint = Endpoint::from_static("http://127.0.0.1:2379");
        let failover = Failover::new(vec![("127.0.0.1:2379".into(), endpoint)]);
        failover.failed(0);
        assert_eq!(failover.pinned(), (0, "127.0.0.1:2379"));
    }
}
