//! Calling a method on one instance of a service, chosen by a policy.
//!
//! The [`Caller`] asks the [`Directory`] for the service's instances (a local
//! lookup), lets the service's [`Policy`] pick one, and calls it over a
//! cached per-instance channel. A call that fails with `UNAVAILABLE` (the
//! instance is down, or cannot be connected to within the connect timeout)
//! is retried once on another instance, unless retries are off: by default
//! methods are taken to be idempotent, since the caller cannot know whether
//! a request that never arrived was processed.
//!
//! Every kind of method can be called. A client-streaming or bidirectional
//! call takes all its request messages up front ([`Caller::call_messages`]),
//! so a retry can send them again. The retry rule is the same for every
//! kind: only while no response has been received. A unary or
//! client-streaming call has its one response at the end; a streaming
//! response is handed over once the stream is open, and an error after
//! that ends the stream instead of being retried (its replies may already
//! have been seen).

use crate::codec::DynamicCodec;
use crate::directory::{Directory, Instances, address};
use crate::lb::{Endpoint, InFlightGuard, KeyMap, Policy, PolicyKind};
use crate::names::streaming_kind;
use crate::resolve::Target;
use crate::status::status_text;
use futures::stream::iter;
use prost_reflect::{DynamicMessage, MethodDescriptor};
use registry_proto::registry::v1::Instance;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tonic::codec::Streaming;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Knobs of a [`Caller`]; `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// The load-balancing policy (default: weighted round robin).
    pub policy: PolicyKind,
    /// Retry once on another instance after `UNAVAILABLE` (default: true).
    pub retry: bool,
    /// How long to wait for a TCP connection to an instance (default: 1 s).
    pub connect_timeout: Duration,
    /// Deadline of a unary or client-streaming call (until its one
    /// response), or of opening a server-streaming or bidirectional stream
    /// (its response headers), not of the whole stream (default: 10 s). It
    /// is also sent as `grpc-timeout`, which a server may apply to the whole
    /// stream (tonic's does not).
    pub timeout: Duration,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            policy: PolicyKind::default(),
            retry: true,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Error)]
pub enum CallError {
    /// The service has no instance to call.
    #[error("service `{0}` has no instances")]
    NoInstances(String),
    /// Every instance of the service is drained (weight 0): listed, but
    /// taking no new calls. The status is UNAVAILABLE, as gRPC's own
    /// balancers say when no endpoint can take a call: draining is
    /// temporary, and the same call succeeds once one is undrained, so it
    /// is worth retrying with backoff (FAILED_PRECONDITION would tell the
    /// caller not to retry until it changes something itself).
    #[error("{}", status_text(.status))]
    Drained {
        /// The service called.
        service: String,
        /// UNAVAILABLE, naming the service and how many instances are
        /// drained.
        status: Status,
    },
    /// The instance answered with an error (or could not be reached).
    #[error("{method} on {instance} failed: {}", status_text(.status))]
    Status {
        /// Full method name.
        method: String,
        /// `host:port` of the instance.
        instance: String,
        /// What it said.
        status: Status,
    },
    /// A method that takes one request was given none or several.
    #[error("{method} is a {kind} method: it takes exactly one request message, got {count}")]
    RequestCount {
        /// Full method name.
        method: String,
        /// Its streaming kind.
        kind: &'static str,
        /// How many were given.
        count: usize,
    },
}

impl CallError {
    /// The gRPC status, if the call reached the point of having one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            CallError::Status { status, .. } | CallError::Drained { status, .. } => Some(status),
            CallError::NoInstances(_) | CallError::RequestCount { .. } => None,
        }
    }
}

/// What a call returned.
#[derive(Debug)]
pub enum Reply {
    /// The one reply of a unary or client-streaming method.
    Unary(DynamicMessage),
    /// The replies of a server-streaming or bidirectional method, as they
    /// arrive.
    Stream(Streaming<DynamicMessage>),
}

/// The request side of a call, by the method's kind.
#[derive(Debug, Clone)]
enum Requests {
    /// The one request of a unary or server-streaming method.
    One(DynamicMessage),
    /// The requests of a client-streaming or bidirectional method, sent in
    /// order, then the stream is closed.
    Many(Vec<DynamicMessage>),
}

/// The instance that served a call: it reads as an [`Instance`], and holds
/// the directory's shared list rather than a copy made at every call.
#[derive(Debug, Clone)]
pub struct Served {
    /// The service's instances when the call was made.
    list: Instances,
    /// Which one.
    index: usize,
}

impl std::ops::Deref for Served {
    type Target = Instance;

    fn deref(&self) -> &Instance {
        &self.list[self.index]
    }
}

/// A successful call.
#[derive(Debug)]
pub struct Called {
    /// The reply.
    pub reply: Reply,
    /// The instance that served it.
    pub instance: Served,
    /// Attempts made (2 after a retry).
    pub attempts: u32,
    /// Counts the call as in flight (for least-loaded) until dropped: keep it
    /// while consuming a stream.
    pub guard: Option<InFlightGuard>,
}

/// Calls methods on instances of registered services. Cheap to share.
#[derive(Debug)]
pub struct Caller {
    /// Where instances come from.
    directory: Directory,
    /// Options.
    options: CallOptions,
    /// One policy per service, so stateful policies keep per-service rotations.
    policies: Mutex<KeyMap<Arc<dyn Policy>>>,
    /// One channel per `host:port`, reused across calls and services.
    channels: Mutex<KeyMap<Channel>>,
    /// The `grpc-timeout` header every call sends, made once.
    grpc_timeout: Option<MetadataValue<Ascii>>,
}

/// The error of a call whose service has `count` instances, all drained.
fn drained(service: &str, count: usize) -> CallError {
    let (all, plural) = if count == 1 {
        ("its one instance is", "")
    } else {
        ("all its instances are", "s")
    };
    CallError::Drained {
        service: service.to_string(),
        status: Status::unavailable(format!(
            "service `{service}`: {all} drained (weight 0; {count} instance{plural} listed, none takes new calls)"
        )),
    }
}

impl Caller {
    /// A caller over `directory`.
    pub fn new(directory: Directory, options: CallOptions) -> Caller {
        let grpc_timeout = grpc_timeout(options.timeout);
        Caller {
            directory,
            options,
            policies: Mutex::default(),
            channels: Mutex::default(),
            grpc_timeout,
        }
    }

    /// The directory this caller uses.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Calls `target` with `request` on an instance picked by the policy
    /// (for a client-streaming or bidirectional method: a stream of this
    /// one message).
    pub async fn call(
        &self,
        target: &Target,
        request: DynamicMessage,
    ) -> Result<Called, CallError> {
        self.call_messages(target, vec![request]).await
    }

    /// Calls `target`, sending `requests` in order: exactly one for a unary
    /// or server-streaming method, any number (none included) for a
    /// client-streaming or bidirectional one, whose request stream is then
    /// closed.
    pub async fn call_messages(
        &self,
        target: &Target,
        requests: Vec<DynamicMessage>,
    ) -> Result<Called, CallError> {
        let request = if target.method.is_client_streaming() {
            Requests::Many(requests)
        } else {
            let count = requests.len();
            let Ok([one]) = <[DynamicMessage; 1]>::try_from(requests) else {
                return Err(CallError::RequestCount {
                    method: method_name(&target.method),
                    kind: streaming_kind(&target.method),
                    count,
                });
            };
            Requests::One(one)
        };
        let policy = self.policy(&target.service);
        let attempts = if self.options.retry { 2 } else { 1 };
        let mut tried: Vec<String> = Vec::new();
        let mut last_error = None;
        let mut request = Some(request);
        for attempt in 1..=attempts {
            let all = self.directory.instances(&target.service);
            let (keys, indices): (Vec<String>, Vec<usize>) = all
                .iter()
                .enumerate()
                .map(|(n, i)| (address(i), n))
                .filter(|(key, _)| !tried.contains(key))
                .unzip();
            let endpoints: Vec<Endpoint<'_>> = keys
                .iter()
                .zip(&indices)
                .map(|(key, &n)| Endpoint {
                    key,
                    weight: all[n].effective_weight(),
                })
                .collect();
            let Some(pick) = policy.pick(&endpoints) else {
                if last_error.is_none() && !endpoints.is_empty() {
                    last_error = Some(drained(&target.service, endpoints.len()));
                }
                break;
            };
            let instance = Served {
                list: all.clone(),
                index: indices[pick.index],
            };
            let addr = keys[pick.index].clone();
            // The last attempt gives the request away; earlier ones keep it
            // for the retry.
            let sent = if attempt < attempts {
                request.clone()
            } else {
                request.take()
            };
            let Some(sent) = sent else { break };
            match self.invoke(&addr, target, sent).await {
                Ok(reply) => {
                    return Ok(Called {
                        reply,
                        instance,
                        attempts: attempt,
                        guard: pick.guard,
                    });
                }
                Err(status) => {
                    let unavailable = is_unavailable(&status);
                    if unavailable {
                        // Reconnect from scratch next time.
                        self.lock_channels().remove(&addr);
                    }
                    tracing::debug!(instance = %addr, status = %status_text(&status), "call failed");
                    last_error = Some(CallError::Status {
                        method: method_name(&target.method),
                        instance: addr.clone(),
                        status,
                    });
                    if !unavailable {
                        break;
                    }
                    tried.push(addr);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| CallError::NoInstances(target.service.clone())))
    }

    async fn invoke(
        &self,
        addr: &str,
        target: &Target,
        request: Requests,
    ) -> Result<Reply, Status> {
        let channel = self.channel(addr)?;
        let path = target.path()?;
        let codec = DynamicCodec::new(target.method.output());
        let mut grpc = tonic::client::Grpc::new(channel);
        let streaming = target.method.is_server_streaming();
        let timeout = self.grpc_timeout.clone();
        let call = async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
            match (request, streaming) {
                (Requests::One(message), false) => grpc
                    .unary(timed(message, timeout), path, codec)
                    .await
                    .map(|r| Reply::Unary(r.into_inner())),
                (Requests::One(message), true) => grpc
                    .server_streaming(timed(message, timeout), path, codec)
                    .await
                    .map(|r| Reply::Stream(r.into_inner())),
                (Requests::Many(messages), false) => grpc
                    .client_streaming(timed(iter(messages), timeout), path, codec)
                    .await
                    .map(|r| Reply::Unary(r.into_inner())),
                (Requests::Many(messages), true) => grpc
                    .streaming(timed(iter(messages), timeout), path, codec)
                    .await
                    .map(|r| Reply::Stream(r.into_inner())),
            }
        };
        tokio::time::timeout(self.options.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "no reply within {:?}",
                    self.options.timeout
                )))
            })
    }

    fn policy(&self, service: &str) -> Arc<dyn Policy> {
        let mut policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up before `entry`, which would allocate the key on every call.
        if let Some(policy) = policies.get(service) {
            return policy.clone();
        }
        policies
            .entry(service.to_string())
            .or_insert_with(|| self.options.policy.build())
            .clone()
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, KeyMap<Channel>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.lock_channels();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = self
            .directory
            .connector()
            .endpoint(addr)
            .map_err(|e| Status::invalid_argument(format!("bad instance address {addr}: {e}")))?
            .connect_timeout(self.options.connect_timeout)
            .connect_lazy();
        if channels.len() >= CHANNELS_BEFORE_PRUNING {
            // Instances come and go: keep only the channels of those still
            // registered, or a long-lived caller collects one per departed
            // instance. Runs only when a new address is first called.
            let snapshot = self.directory.snapshot();
            let live: HashSet<String> = snapshot
                .services()
                .iter()
                .flat_map(|s| {
                    snapshot
                        .instances(s)
                        .iter()
                        .map(address)
                        .collect::<Vec<_>>()
                })
                .collect();
            channels.retain(|a, _| live.contains(a));
        }
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// How many cached channels a [`Caller`] holds before it drops those of
/// instances that are no longer registered.
const CHANNELS_BEFORE_PRUNING: usize = 64;

/// The longest timeout the `grpc-timeout` header can carry (8 digits of
/// hours): tonic panics on a longer one, and `--timeout-ms` accepts any u64.
const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(99_999_999 * 3600);

/// A request carrying `timeout` as its `grpc-timeout` header.
fn timed<T>(message: T, timeout: Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = timeout {
        request.metadata_mut().insert(GRPC_TIMEOUT, value);
    }
    request
}

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The `grpc-timeout` header for `timeout`, as tonic writes it: made once
/// per caller, since tonic would format it again at every call.
fn grpc_timeout(timeout: Duration) -> Option<MetadataValue<Ascii>> {
    let mut request = tonic::Request::new(());
    request.set_timeout(header_timeout(timeout));
    request.metadata().get(GRPC_TIMEOUT).cloned()
}

/// `timeout` as sent to the server, capped to what the header can carry (the
/// local deadline still uses the full value).
fn header_timeout(timeout: Duration) -> Duration {
    timeout.min(MAX_HEADER_TIMEOUT)
}

/// Whether a failure means the instance could not be reached or its
/// connection broke, rather than an answer from the service: `UNAVAILABLE`
/// (sent by a server that is shutting down or overloaded, or made by tonic
/// when it cannot connect), or any status tonic made from a transport error
/// ([`crate::status::is_transport_failure`]: a connection reset mid-request
/// surfaces as `UNKNOWN`/`INTERNAL`/`CANCELLED`).
pub fn is_unavailable(status: &Status) -> bool {
    status.code() == Code::Unavailable || crate::status::is_transport_failure(status)
}

/// A method as errors name it: `calculator.v1.Calculator/Divide`.
pub fn method_name(method: &MethodDescriptor) -> String {
    format!("{}/{}", method.parent_service().full_name(), method.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channels_of_departed_instances_are_dropped_once_many_are_cached() {
        // Nothing listens there: the directory stays empty, so no address
        // the caller has used is registered any more.
        let directory = Directory::connect("127.0.0.1:1").expect("valid address");
        let caller = Caller::new(directory, CallOptions::default());
        for port in 1..=200u16 {
            caller
                .channel(&format!("127.0.0.1:{port}"))
                .expect("valid address");
            assert!(caller.lock_channels().len() <= CHANNELS_BEFORE_PRUNING);
        }
        // The newest is kept: it is about to be called.
        assert!(caller.lock_channels().contains_key("127.0.0.1:200"));
    }

    #[tokio::test]
    async fn transport_failures_count_as_unavailable_whatever_their_code() {
        use registry_proto::echo::v1::EchoRequest;
        use registry_proto::echo::v1::echo_client::EchoClient;
        use tokio::io::AsyncReadExt;
        // A server that takes the connection and the request, then closes
        // the socket before answering: a connection broken mid-request.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            // The preface, SETTINGS and the request's frames: whatever comes
            // until the client has been quiet for 200 ms; then close.
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let broken = EchoClient::new(channel)
            .echo(EchoRequest::default())
            .await
            .unwrap_err();
        assert!(is_unavailable(&broken), "{broken:?}");

        // Nothing listens: refused at connect.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let refused = EchoClient::new(channel)
            .echo(EchoRequest::default())
            .await
            .unwrap_err();
        assert!(is_unavailable(&refused), "{refused:?}");
    }

    #[test]
    fn a_services_own_status_is_an_answer_whatever_its_message() {
        // As decoded from a server's trailers: no cause. Matching message
        // text (as before) took the first two for transport failures.
        for status in [
            Status::internal("h2 protocol error: stream reset"),
            Status::unknown("connection reset by the database"),
            Status::internal("database on fire"),
            Status::invalid_argument("connection reset"),
            Status::cancelled("operation was canceled"),
        ] {
            assert!(!is_unavailable(&status), "{status:?}");
        }
        assert!(is_unavailable(&Status::unavailable("shutting down")));
    }

    #[test]
    fn any_timeout_fits_the_grpc_timeout_header() {
        for timeout in [Duration::MAX, Duration::from_millis(u64::MAX)] {
            // Would panic ("duration is unrealistically large") uncapped.
            let mut request = tonic::Request::new(());
            request.set_timeout(header_timeout(timeout));
            assert_eq!(header_timeout(timeout), MAX_HEADER_TIMEOUT);
        }
        let ten = Duration::from_secs(10);
        assert_eq!(header_timeout(ten), ten);
        // The header made once per caller is the one tonic would write.
        let header = grpc_timeout(ten).expect("a grpc-timeout header");
        assert_eq!(header.to_str().ok(), Some("10000000u"));
    }
}
