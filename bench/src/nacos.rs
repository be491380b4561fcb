//! A client of the Nacos 2.x gRPC protocol as r-nacos serves it, written for
//! the bench from the protocol (`proto/nacos/nacos_grpc_service.proto`): the
//! same tonic stack as the other backends, so the columns differ only in the
//! server.
//!
//! The protocol in short: every call carries a `Payload` whose
//! `metadata.type` names a request class and whose body is that request as
//! JSON. A client opens one connection: `ServerCheckRequest` (unary), then a
//! `BiRequestStream` that starts with `ConnectionSetupRequest`. The server
//! ties unary calls to that stream by the client's address, so both must
//! share one HTTP/2 connection ([`Conn`] keeps them on one `Channel`).
//! Ephemeral instances registered with `InstanceRequest` belong to the
//! connection and are removed when the stream ends; `SubscribeServiceRequest`
//! answers with the service's state and makes the server push
//! `NotifySubscriberRequest` (the whole new state) on the stream after each
//! change, which the client acknowledges. The server also probes an idle
//! connection with `ClientDetectionRequest` and closes it if unanswered.
//!
//! Nacos names an instance by `ip:port`; the bench's instances are named by
//! an id. An id maps to a fixed `ip:port` (a hash of it, [`addr_of`]) and
//! travels in the instance's metadata (`id`), so watchers see the same ids as
//! with the other backends.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::nacospb::{
    Any, Metadata, Payload, bi_request_stream_client::BiRequestStreamClient,
    request_client::RequestClient,
};

/// Nacos's default group and namespace: the bench uses no others.
const GROUP: &str = "DEFAULT_GROUP";
const NAMESPACE: &str = "public";
/// Nacos's result code for success.
const SUCCESS: u16 = 200;
/// r-nacos's error code for a unary call on a connection it does not know
/// (yet, right after the stream opens; or any more, after it closed).
const UNREGISTERED: u16 = 301;
/// What the bench says it is in ConnectionSetupRequest.
const CLIENT_VERSION: &str = "registry-bench";
/// Large enough for the whole state of a big service in one push.
const MAX_MESSAGE: usize = 1 << 30;

/// One instance as Nacos returns it (the fields the bench reads).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Host {
    /// Address: part of Nacos's identity of an instance.
    pub ip: String,
    /// Port: the rest of it.
    pub port: u32,
    /// Weight.
    pub weight: f64,
    /// Whether the server counts it healthy.
    pub healthy: bool,
    /// Whether it takes traffic.
    pub enabled: bool,
    /// Free-form metadata; the bench's instance id is under `id`.
    pub metadata: Option<HashMap<String, String>>,
}

impl Host {
    /// The bench's id of this instance (`ip#port` for one it did not make).
    pub fn id(&self) -> String {
        self.metadata
            .as_ref()
            .and_then(|m| m.get("id").cloned())
            .unwrap_or_else(|| format!("{}#{}", self.ip, self.port))
    }

    /// What a change to the instance would change (its id aside).
    fn fingerprint(&self) -> (u32, u64, bool, bool, String) {
        (
            self.port,
            self.weight.to_bits(),
            self.healthy,
            self.enabled,
            self.ip.clone(),
        )
    }
}

/// A service's state: what a query, a subscription and each push carry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceInfo {
    /// Every instance (r-nacos sends the healthy ones).
    pub hosts: Option<Vec<Host>>,
    /// When the server built this state (ms since the epoch).
    pub last_ref_time: i64,
}

impl ServiceInfo {
    /// The instances, empty when the server sent none.
    pub fn hosts(&self) -> &[Host] {
        self.hosts.as_deref().unwrap_or_default()
    }
}

/// What changed between two states of a service, by instance id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Added or changed.
    pub put: Vec<String>,
    /// Gone.
    pub removed: Vec<String>,
}

/// A subscriber's view of one service: turns the full states Nacos pushes
/// into changes, as Nacos's own clients do.
#[derive(Debug, Default)]
pub struct Tracker {
    known: HashMap<String, (u32, u64, bool, bool, String)>,
    last_ref_time: i64,
}

impl Tracker {
    /// Applies a state; a state older than the last one applied changes
    /// nothing (a push can cross the subscription's own answer).
    pub fn apply(&mut self, info: &ServiceInfo) -> Diff {
        let mut diff = Diff::default();
        if info.last_ref_time < self.last_ref_time {
            return diff;
        }
        self.last_ref_time = info.last_ref_time;
        let mut next = HashMap::with_capacity(info.hosts().len());
        for h in info.hosts() {
            let id = h.id();
            let print = h.fingerprint();
            if self.known.get(&id) != Some(&print) {
                diff.put.push(id.clone());
            }
            next.insert(id, print);
        }
        diff.removed = self
            .known
            .keys()
            .filter(|id| !next.contains_key(*id))
            .cloned()
            .collect();
        self.known = next;
        diff
    }
}

/// The fixed `ip:port` the bench registers instance `id` under: 48 bits of
/// a hash of the id, so distinct ids of one service practically never share
/// an address (1 in 10^5 for 100 000 ids) and re-registering an id updates
/// the same instance, as with the other backends.
pub fn addr_of(id: &str) -> (String, u32) {
    // `DefaultHasher::new` has fixed keys: the same id maps to the same
    // address in every process of one build (the kill -9 helper is another
    // process).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    let v = h.finish();
    let ip = format!(
        "{}.{}.{}.{}",
        (v >> 56) & 0xff,
        (v >> 48) & 0xff,
        (v >> 40) & 0xff,
        (v >> 32) & 0xff
    );
    // Port 0 is not an address: 1..=65535.
    let port = 1 + ((v & 0xffff) as u32 % 65535);
    (ip, port)
}

/// Listeners of pushes, by service name.
type Listeners = Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Arc<ServiceInfo>>>>>;

/// What every clone of a [`Conn`] shares.
struct Shared {
    /// The bi-stream's sending half: dropping it ends the stream, and with
    /// it the server's connection and every instance registered on it.
    stream: Mutex<Option<mpsc::Sender<Payload>>>,
    /// Watchers of each subscribed service.
    listeners: Arc<Listeners>,
    /// Request ids.
    next_id: AtomicU64,
    /// The server's name for this connection (from ServerCheckResponse).
    connection_id: String,
}

/// One Nacos connection: the bi-stream and the unary client on one HTTP/2
/// connection. Clones share it; it closes when the last clone drops or on
/// [`Conn::close`].
#[derive(Clone)]
pub struct Conn {
    unary: RequestClient<Channel>,
    shared: Arc<Shared>,
}

/// The JSON header fields of every request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Common<'a> {
    module: &'a str,
    request_id: String,
    headers: HashMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InstanceBody<'a> {
    ip: &'a str,
    port: u32,
    weight: f64,
    healthy: bool,
    enabled: bool,
    ephemeral: bool,
    cluster_name: &'a str,
    service_name: &'a str,
    metadata: HashMap<&'a str, &'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InstanceRequest<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    namespace: &'a str,
    service_name: &'a str,
    group_name: &'a str,
    r#type: &'a str,
    instance: InstanceBody<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceRequest<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    namespace: &'a str,
    service_name: &'a str,
    group_name: &'a str,
    /// ServiceQueryRequest only.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'a str>,
    /// ServiceQueryRequest only.
    #[serde(skip_serializing_if = "Option::is_none")]
    healthy_only: Option<bool>,
    /// SubscribeServiceRequest only.
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribe: Option<bool>,
    /// SubscribeServiceRequest only.
    #[serde(skip_serializing_if = "Option::is_none")]
    clusters: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SetupRequest<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    client_version: &'a str,
    tenant: &'a str,
    labels: HashMap<&'a str, &'a str>,
}

/// The answer the client sends back on the stream for a server request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Ack<'a> {
    result_code: u16,
    error_code: u16,
    message: &'a str,
    request_id: &'a str,
}

/// The fields of any response the bench reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Response {
    result_code: u16,
    error_code: u16,
    message: Option<String>,
    connection_id: Option<String>,
    service_info: Option<ServiceInfo>,
}

/// The fields of a request the server sends on the stream.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ServerRequest {
    request_id: Option<String>,
    service_name: Option<String>,
    service_info: Option<ServiceInfo>,
}

/// A payload of `kind` carrying `body` as JSON.
fn payload(kind: &str, body: &impl Serialize) -> Result<Payload> {
    Ok(Payload {
        metadata: Some(Metadata {
            r#type: kind.to_string(),
            client_ip: "127.0.0.1".to_string(),
            headers: HashMap::new(),
        }),
        body: Some(Any {
            type_url: String::new(),
            value: serde_json::to_vec(body)?,
        }),
    })
}

/// The type and decoded body of a payload.
fn decode<T: DeserializeOwned + Default>(p: &Payload) -> Result<(&str, T)> {
    let kind = p.metadata.as_ref().map_or("", |m| m.r#type.as_str());
    let value = p.body.as_ref().map_or(&[][..], |b| b.value.as_slice());
    if value.is_empty() {
        return Ok((kind, T::default()));
    }
    let body = serde_json::from_slice(value)
        .with_context(|| format!("r-nacos sent a {kind} that is not the JSON expected"))?;
    Ok((kind, body))
}

impl Conn {
    /// Opens a connection to r-nacos's gRPC port at `url`
    /// (`http://ip:port`) and waits until the server knows it.
    pub async fn connect(channel: Channel) -> Result<Conn> {
        let mut unary = RequestClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let check = Common {
            module: "internal",
            request_id: String::new(),
            headers: HashMap::new(),
        };
        let reply = unary
            .request(payload("ServerCheckRequest", &check)?)
            .await
            .context("r-nacos ServerCheckRequest")?
            .into_inner();
        let (_, reply): (_, Response) = decode(&reply)?;
        let connection_id = reply.connection_id.unwrap_or_default();

        let (tx, rx) = mpsc::channel::<Payload>(64);
        let listeners: Arc<Listeners> = Arc::default();
        let shared = Arc::new(Shared {
            stream: Mutex::new(Some(tx.clone())),
            listeners: listeners.clone(),
            next_id: AtomicU64::new(1),
            connection_id,
        });
        let conn = Conn { unary, shared };
        let setup = SetupRequest {
            common: conn.common("internal"),
            client_version: CLIENT_VERSION,
            tenant: "",
            labels: HashMap::from([("source", "sdk"), ("module", "naming")]),
        };
        tx.send(payload("ConnectionSetupRequest", &setup)?)
            .await
            .context("the bi-stream closed at once")?;
        let mut bi = BiRequestStreamClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let incoming = bi
            .request_bi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .context("r-nacos requestBiStream")?
            .into_inner();
        // The reader must not keep the stream open by itself: it holds only
        // a weak sender, for its answers.
        tokio::spawn(read_stream(incoming, tx.downgrade(), listeners));
        drop(tx);

        // The server registers the connection when the stream opens, but a
        // unary call can overtake that: wait until one is accepted.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match conn
                .clone()
                .call("HealthCheckRequest", &conn.common("internal"))
                .await
            {
                Ok(_) => return Ok(conn),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("r-nacos never accepted the connection"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn common(&self, module: &'static str) -> Common<'static> {
        Common {
            module,
            request_id: self
                .shared
                .next_id
                .fetch_add(1, Ordering::Relaxed)
                .to_string(),
            headers: HashMap::new(),
        }
    }

    /// One unary request and the server's answer, success or not.
    async fn send(&mut self, kind: &str, body: &impl Serialize) -> Result<(String, Response)> {
        let reply = self
            .unary
            .request(payload(kind, body)?)
            .await
            .with_context(|| format!("r-nacos {kind}"))?
            .into_inner();
        let (reply_kind, reply): (_, Response) = decode(&reply)?;
        Ok((reply_kind.to_string(), reply))
    }

    /// One unary request; a response that is not a success is an error
    /// naming the server's code and message.
    async fn call(&mut self, kind: &str, body: &impl Serialize) -> Result<Response> {
        let (reply_kind, reply) = self.send(kind, body).await?;
        if reply.result_code != SUCCESS {
            bail!(
                "r-nacos answered {kind} with {reply_kind} {} (code {}): {}",
                reply.result_code,
                reply.error_code,
                reply.message.as_deref().unwrap_or("")
            );
        }
        Ok(reply)
    }

    /// An InstanceRequest of `kind` (`registerInstance`; the bench never
    /// needs `deregisterInstance`: ending the connection removes its
    /// instances, as the other backends' lease revocation does).
    async fn instance(&mut self, kind: &str, service: &str, id: &str) -> Result<()> {
        let (ip, port) = addr_of(id);
        let req = InstanceRequest {
            common: self.common("naming"),
            namespace: NAMESPACE,
            service_name: service,
            group_name: GROUP,
            r#type: kind,
            instance: InstanceBody {
                ip: &ip,
                port,
                weight: 1.0,
                healthy: true,
                enabled: true,
                ephemeral: true,
                cluster_name: "DEFAULT",
                service_name: service,
                metadata: HashMap::from([("id", id)]),
            },
        };
        self.call("InstanceRequest", &req).await.map(|_| ())
    }

    /// Registers instance `id` of `service` as an ephemeral instance of this
    /// connection.
    pub async fn register(&mut self, service: &str, id: &str) -> Result<()> {
        self.instance("registerInstance", service, id).await
    }

    fn service_request<'a>(&self, service: &'a str) -> ServiceRequest<'a> {
        ServiceRequest {
            common: self.common("naming"),
            namespace: NAMESPACE,
            service_name: service,
            group_name: GROUP,
            cluster: None,
            healthy_only: None,
            subscribe: None,
            clusters: None,
        }
    }

    /// The instances of `service`, read from the server (ServiceQueryRequest).
    pub async fn query(&mut self, service: &str) -> Result<ServiceInfo> {
        let req = ServiceRequest {
            cluster: Some(""),
            healthy_only: Some(false),
            ..self.service_request(service)
        };
        let reply = self.call("ServiceQueryRequest", &req).await?;
        reply
            .service_info
            .context("r-nacos answered ServiceQueryRequest without serviceInfo")
    }

    /// Subscribes to `service`: its current state, then every state the
    /// server pushes after a change. Watchers of one service on one
    /// connection share the server's subscription (Nacos keeps one per
    /// connection and service); each gets every push.
    pub async fn subscribe(
        &mut self,
        service: &str,
    ) -> Result<(ServiceInfo, mpsc::UnboundedReceiver<Arc<ServiceInfo>>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Listen before asking, so no push after the answer is missed.
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_string())
            .or_default()
            .push(tx);
        let req = ServiceRequest {
            subscribe: Some(true),
            clusters: Some(""),
            ..self.service_request(service)
        };
        let reply = self.call("SubscribeServiceRequest", &req).await?;
        let info = reply
            .service_info
            .context("r-nacos answered SubscribeServiceRequest without serviceInfo")?;
        Ok((info, rx))
    }

    /// Subscribes to each of `services` on this connection, `in_flight` at a
    /// time (Nacos has no subscription to everything): how many instances
    /// their answers held in all.
    pub async fn subscribe_each(&self, services: &[String], in_flight: usize) -> Result<usize> {
        let answers = futures::stream::iter(services.iter().map(|s| {
            let mut c = self.clone();
            async move { c.subscribe(s).await.map(|(info, _)| info.hosts().len()) }
        }))
        .buffer_unordered(in_flight.max(1))
        .collect::<Vec<_>>()
        .await;
        answers.into_iter().sum()
    }

    /// Ends the connection (the server then removes every instance
    /// registered on it) and waits until the server has let it go.
    pub async fn close(&mut self) -> Result<()> {
        let had = self
            .shared
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if had.is_none() {
            return Ok(());
        }
        drop(had);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let common = self.common("internal");
            match self.send("HealthCheckRequest", &common).await {
                Ok((_, r)) if r.error_code == UNREGISTERED => return Ok(()),
                _ if Instant::now() > deadline => bail!(
                    "r-nacos still knows connection {} 10 s after it closed",
                    self.shared.connection_id
                ),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
}

/// Reads what the server sends on the stream: hands pushes to the watchers
/// of their service and answers every server request (a probe left
/// unanswered would make the server close the connection).
async fn read_stream(
    mut incoming: tonic::Streaming<Payload>,
    answer: mpsc::WeakSender<Payload>,
    listeners: Arc<Listeners>,
) {
    while let Some(Ok(p)) = incoming.next().await {
        let (kind, req): (String, ServerRequest) = match decode(&p) {
            Ok((k, r)) => (k.to_string(), r),
            Err(e) => {
                tracing::warn!("{e:#}");
                continue;
            }
        };
        if kind == "NotifySubscriberRequest"
            && let (Some(service), Some(info)) = (req.service_name, req.service_info)
        {
            let info = Arc::new(info);
            let mut map = listeners.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = map.get_mut(&service) {
                list.retain(|tx| tx.send(info.clone()).is_ok());
            }
        }
        let reply = match kind.as_str() {
            "NotifySubscriberRequest" => "NotifySubscriberResponse",
            "ClientDetectionRequest" => "ClientDetectionResponse",
            // ConnectResetRequest asks the client to move to another server:
            // there is only one here.
            _ => continue,
        };
        let ack = Ack {
            result_code: SUCCESS,
            error_code: 0,
            message: "",
            request_id: req.request_id.as_deref().unwrap_or(""),
        };
        let Some(tx) = answer.upgrade() else { break };
        if let Ok(p) = payload(reply, &ack) {
            let _ = tx.send(p).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, weight: f64) -> Host {
        let (ip, port) = addr_of(id);
        Host {
            ip,
            port,
            weight,
            healthy: true,
            enabled: true,
            metadata: Some(HashMap::from([("id".to_string(), id.to_string())])),
        }
    }

    fn info(t: i64, hosts: Vec<Host>) -> ServiceInfo {
        ServiceInfo {
            hosts: Some(hosts),
            last_ref_time: t,
        }
    }

    #[test]
    fn tracker_turns_states_into_changes() {
        let mut t = Tracker::default();
        let d = t.apply(&info(1, vec![host("a", 1.0), host("b", 1.0)]));
        assert_eq!(d.put.len(), 2);
        assert!(d.removed.is_empty());
        // b changes weight, a goes, c comes.
        let d = t.apply(&info(2, vec![host("b", 2.0), host("c", 1.0)]));
        let mut put = d.put.clone();
        put.sort();
        assert_eq!(put, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(d.removed, vec!["a".to_string()]);
        // The same state again changes nothing.
        assert_eq!(
            t.apply(&info(3, vec![host("b", 2.0), host("c", 1.0)])),
            Diff::default()
        );
    }

    #[test]
    fn tracker_ignores_an_older_state() {
        let mut t = Tracker::default();
        t.apply(&info(10, vec![host("a", 1.0)]));
        assert_eq!(t.apply(&info(9, vec![])), Diff::default());
        assert_eq!(t.apply(&info(11, vec![])).removed, vec!["a".to_string()]);
    }

    #[test]
    fn ids_map_to_fixed_distinct_addresses() {
        assert_eq!(addr_of("c1-7"), addr_of("c1-7"));
        let addrs: std::collections::HashSet<_> = (0..100_000)
            .map(|i| addr_of(&format!("inst-{i}")))
            .collect();
        assert_eq!(addrs.len(), 100_000);
        assert!(addrs.iter().all(|(_, port)| (1..=65535).contains(port)));
    }

    #[test]
    fn a_host_without_our_id_is_named_by_its_address() {
        let h = Host {
            ip: "10.0.0.1".into(),
            port: 8080,
            ..Host::default()
        };
        assert_eq!(h.id(), "10.0.0.1#8080");
    }

    #[test]
    fn server_json_decodes() {
        // A push as r-nacos 0.8 sends it (fields it adds are ignored).
        let body = br#"{"module":"naming","requestId":"7","headers":{},
            "namespace":"public","serviceName":"svc","groupName":"DEFAULT_GROUP",
            "serviceInfo":{"name":"svc","groupName":"DEFAULT_GROUP","clusters":"",
            "cacheMillis":10000,"lastRefTime":1700000000000,"checksum":"",
            "allIPs":false,"reachProtectionThreshold":false,
            "hosts":[{"instanceId":"1.2.3.4#80","ip":"1.2.3.4","port":80,
            "weight":1.0,"healthy":true,"enabled":true,"ephemeral":true,
            "clusterName":"DEFAULT","serviceName":"DEFAULT_GROUP@@svc",
            "metadata":{"id":"w-3"}}]}}"#;
        let p = Payload {
            metadata: Some(Metadata {
                r#type: "NotifySubscriberRequest".into(),
                ..Metadata::default()
            }),
            body: Some(Any {
                type_url: String::new(),
                value: body.to_vec(),
            }),
        };
        let (kind, req): (_, ServerRequest) = decode(&p).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(kind, "NotifySubscriberRequest");
        assert_eq!(req.request_id.as_deref(), Some("7"));
        assert_eq!(req.service_name.as_deref(), Some("svc"));
        let info = req.service_info.unwrap_or_default();
        assert_eq!(info.hosts()[0].id(), "w-3");
        assert_eq!(info.last_ref_time, 1_700_000_000_000);
    }

    #[test]
    fn requests_carry_the_fields_the_server_requires() {
        // r-nacos rejects an InstanceRequest without groupName, and its
        // instance needs ip, port, weight, healthy, enabled and ephemeral.
        let req = InstanceRequest {
            common: Common {
                module: "naming",
                request_id: "1".into(),
                headers: HashMap::new(),
            },
            namespace: NAMESPACE,
            service_name: "svc",
            group_name: GROUP,
            r#type: "registerInstance",
            instance: InstanceBody {
                ip: "1.2.3.4",
                port: 80,
                weight: 1.0,
                healthy: true,
                enabled: true,
                ephemeral: true,
                cluster_name: "DEFAULT",
                service_name: "svc",
                metadata: HashMap::from([("id", "x")]),
            },
        };
        let v = serde_json::to_value(&req).unwrap_or_default();
        assert_eq!(v["groupName"], "DEFAULT_GROUP");
        assert_eq!(v["requestId"], "1");
        assert_eq!(v["type"], "registerInstance");
        for field in ["ip", "port", "weight", "healthy", "enabled", "ephemeral"] {
            assert!(!v["instance"][field].is_null(), "{field} missing: {v}");
        }
        assert_eq!(v["instance"]["metadata"]["id"], "x");
    }
}
