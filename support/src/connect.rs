//! How a process connects to the registry and to instances: TLS from
//! [`TlsArgs`], the endpoint's timeouts and HTTP/2 keepalive (see
//! [`TlsArgs::endpoint`]), and the token the registry is shown.
//!
//! One [`Connector`] is built from the flags at start (which reads the
//! certificate files, so a wrong path fails at once) and handed to
//! everything that opens a connection: the node host's registrar, the
//! client's directory, calls, reflection and balanced channels. TLS then
//! applies to every connection, not only the registry's.
//!
//! ```no_run
//! # fn demo() -> Result<(), support::SecurityError> {
//! use support::{Connector, TlsArgs};
//! let tls = TlsArgs { tls_ca: Some("ca.pem".into()), ..TlsArgs::default() };
//! let connector = Connector::new(tls, Some("read-token"))?;
//! let registry = connector.registry(connector.endpoint("registry.lan:50051")?.connect_lazy());
//! # drop(registry); Ok(()) }
//! ```
//!
//! # Several registry replicas
//! A registry setting may list several replicas, `a:50051,b:50051,c:50051`
//! ([`split_addrs`]). [`Connector::replicas`] turns the list into
//! [`Replicas`]: one lazily connected client per address and which one is
//! in use, starting at a random one so that nodes and clients spread over
//! the replicas. A failure moves everyone to the next address
//! ([`Replicas::failed`]); one-shot calls go round the list at once
//! ([`Replicas::call`]), long-lived streams (a node's KeepAlive, a client's
//! Watch) with a [`Rotation`]: the next address at once, a backoff pause
//! only after a full round of failures.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use registry_proto::registry::v1::registry_client::RegistryClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::auth::BearerToken;
use crate::backoff::Backoff;
use crate::error::SecurityError;
use crate::tls::TlsArgs;

/// Most addresses one registry setting may list. Replica sets are a handful
/// of machines; a longer list is a mistake (a pasted file, say), and every
/// address costs a connection attempt in each round of failures.
pub const MAX_REGISTRY_ADDRS: usize = 16;

/// The registry client every binary uses: a channel plus its token.
pub type RegistryConn = RegistryClient<InterceptedService<Channel, BearerToken>>;

/// Wraps a channel into a [`RegistryConn`] that sends `token` on each call.
pub fn registry_client(channel: Channel, token: BearerToken) -> RegistryConn {
    RegistryClient::with_interceptor(channel, token)
        // A descriptor set may be 4 MiB by itself; with the rest of a
        // Register or GetDescriptors message that is over tonic's default
        // limit of 4 MiB. A Resolve of a very large service may be up to the
        // registry's 64 MiB reply limit.
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024)
}

/// TLS settings and the registry token. The default is plaintext with no
/// token (the local demo).
#[derive(Clone, Debug, Default)]
pub struct Connector {
    /// `--tls-ca` (turns TLS on and is the CA servers must be signed by),
    /// and `--tls-cert`/`--tls-key` (the client certificate, for mutual TLS).
    tls: TlsArgs,
    /// Sent as `authorization: Bearer ...` on every registry call.
    token: BearerToken,
}

impl Connector {
    /// Plaintext, no token.
    pub fn plaintext() -> Connector {
        Connector::default()
    }

    /// A connector with these TLS settings and this token (`None` or empty:
    /// none). Reads the certificate files once now, so a wrong path fails
    /// here rather than on the first call.
    pub fn new(tls: TlsArgs, token: Option<&str>) -> Result<Connector, SecurityError> {
        tls.identity()?;
        tls.ca()?;
        Ok(Connector {
            tls,
            token: BearerToken::new(token)?,
        })
    }

    /// Whether connections use TLS (`--tls-ca` given).
    pub fn uses_tls(&self) -> bool {
        self.tls.client_uses_tls()
    }

    /// An endpoint for `addr` (`HOST:PORT` or a URL): TLS verifying that the
    /// server's certificate names HOST when TLS is on.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, SecurityError> {
        self.tls.endpoint(addr)
    }

    /// A registry client over `channel` that sends the token.
    pub fn registry(&self, channel: Channel) -> RegistryConn {
        registry_client(channel, self.token.clone())
    }

    /// The replicas `list` names (`HOST:PORT[,HOST:PORT...]`, see
    /// [`split_addrs`]), each endpoint passed through `tune` (timeouts of
    /// the caller's own) and lazily connected. Fails on the first address
    /// that does not parse, naming it.
    pub fn replicas(
        &self,
        list: &str,
        tune: impl Fn(Endpoint) -> Endpoint,
    ) -> Result<Replicas, SecurityError> {
        let targets = split_addrs(list)?
            .into_iter()
            .map(|addr| {
                let endpoint = tune(self.endpoint(&addr)?);
                let conn = self.registry(endpoint.connect_lazy());
                Ok(Target {
                    addr,
                    endpoint,
                    conn,
                })
            })
            .collect::<Result<Vec<_>, SecurityError>>()?;
        let start = rand::random_range(0..targets.len());
        Ok(Replicas {
            targets: targets.into(),
            current: Arc::new(AtomicUsize::new(start)),
        })
    }
}

/// Splits a registry setting into its addresses: comma-separated, spaces
/// around each ignored. Refuses an empty list or entry, the same address
/// twice and more than [`MAX_REGISTRY_ADDRS`], naming the problem.
pub fn split_addrs(list: &str) -> Result<Vec<String>, SecurityError> {
    let bad = |reason: String| SecurityError::Address {
        addr: list.to_string(),
        reason,
    };
    let addrs: Vec<String> = list.split(',').map(|a| a.trim().to_string()).collect();
    if addrs.iter().any(String::is_empty) {
        return Err(bad(
            "an empty address in the list (expected HOST:PORT[,HOST:PORT...])".into(),
        ));
    }
    if addrs.len() > MAX_REGISTRY_ADDRS {
        return Err(bad(format!(
            "{} addresses; at most {MAX_REGISTRY_ADDRS}",
            addrs.len()
        )));
    }
    for (i, addr) in addrs.iter().enumerate() {
        if addrs[..i].contains(addr) {
            return Err(bad(format!("{addr} is listed twice")));
        }
    }
    Ok(addrs)
}

/// One address of a [`Replicas`] set.
#[derive(Clone)]
struct Target {
    /// As given, for messages.
    addr: String,
    /// For callers that want a connection of their own (a node host makes
    /// a fresh one per session).
    endpoint: Endpoint,
    /// Lazily connected; clones share one HTTP/2 connection.
    conn: RegistryConn,
}

/// The registry replicas a process may use, and which one it uses now.
/// Cheap to clone; clones share the choice, so a failure one user notices
/// moves every user on.
#[derive(Clone)]
pub struct Replicas {
    /// In the order given.
    targets: Arc<[Target]>,
    /// Index of the replica in use.
    current: Arc<AtomicUsize>,
}

impl fmt::Debug for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replicas")
            .field("addrs", &self.list())
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

/// One replica, as [`Replicas::current`] hands it out.
#[derive(Clone, Copy)]
pub struct Replica<'a> {
    /// Its position in the list, for [`Replicas::failed`].
    pub index: usize,
    target: &'a Target,
}

impl<'a> Replica<'a> {
    /// Its address, as given.
    pub fn addr(&self) -> &'a str {
        &self.target.addr
    }

    /// Its endpoint (TLS and the caller's timeouts), for a connection of
    /// the caller's own.
    pub fn endpoint(&self) -> &'a Endpoint {
        &self.target.endpoint
    }

    /// A client on its shared, lazily connected channel.
    pub fn conn(&self) -> RegistryConn {
        self.target.conn.clone()
    }
}

impl Replicas {
    /// How many addresses (at least one).
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Never: a set has at least one address.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The addresses, comma-separated as given, for messages.
    pub fn list(&self) -> String {
        let addrs: Vec<&str> = self.targets.iter().map(|t| t.addr.as_str()).collect();
        addrs.join(",")
    }

    /// The first address, for choices that need one (which local address
    /// reaches the registry).
    pub fn first(&self) -> &str {
        &self.targets[0].addr
    }

    /// The replica in use.
    pub fn current(&self) -> Replica<'_> {
        let index = self.current.load(Ordering::Relaxed) % self.targets.len();
        Replica {
            index,
            target: &self.targets[index],
        }
    }

    /// Moves on from replica `index` to the next one, unless another user
    /// already moved on from it (two users noticing the same failure must
    /// not skip a replica). Returns the replica now in use.
    pub fn failed(&self, index: usize) -> Replica<'_> {
        let next = (index + 1) % self.targets.len();
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
        self.current()
    }

    /// Runs a unary call on the replica in use, and on the next ones while
    /// they answer UNAVAILABLE (down, unreachable, cut off from its store),
    /// at most once each. When every one failed, the status is UNAVAILABLE
    /// and names every address tried with its error (with one address:
    /// its own status, as it came).
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(RegistryConn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut tried = Vec::new();
        let mut last = None;
        for _ in 0..self.len() {
            let replica = self.current();
            match call(replica.conn()).await {
                Err(status) if status.code() == Code::Unavailable => {
                    let why = status_line(&status);
                    tracing::debug!(registry = replica.addr(), "unavailable: {why}");
                    tried.push((replica.addr().to_string(), why));
                    last = Some(status);
                    self.failed(replica.index);
                }
                other => return other.map(tonic::Response::into_inner),
            }
        }
        match last {
            Some(status) if tried.len() == 1 => Err(status),
            _ => Err(Status::unavailable(all_failed(&tried))),
        }
    }
}

/// A status's message with its deepest cause ("tcp connect error:
/// Connection refused (os error 111)"): tonic's message alone for a
/// connection failure does not say what failed.
pub fn status_line(status: &Status) -> String {
    let mut line = status.message().to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut deepest = None;
    while let Some(error) = cause {
        deepest = Some(error);
        cause = error.source();
    }
    if let Some(error) = deepest {
        let text = error.to_string();
        if !line.contains(&text) {
            line = if line.is_empty() {
                text
            } else {
                format!("{line}: {text}")
            };
        }
    }
    line
}

/// "no registry replica answered (a:1: why; b:2: why)" for what failed,
/// (address, why); the one error as it is when there is one replica (the
/// caller names the address already).
fn all_failed(tried: &[(String, String)]) -> String {
    match tried {
        [(_, why)] => why.clone(),
        _ => {
            let each: Vec<String> = tried.iter().map(|(a, why)| format!("{a}: {why}")).collect();
            format!("no registry replica answered ({})", each.join("; "))
        }
    }
}

/// Failure bookkeeping for a loop that keeps a stream open on one replica
/// at a time (a node's KeepAlive, a client's Watch): after a failure the
/// next replica is tried at once, and only once every replica has failed
/// in a row does the loop pause, for a [`Backoff`] delay. With one address,
/// every failure is a full round: the plain backoff of a single registry.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The pause after each full round of failures.
    backoff: Backoff,
    /// What failed since the last success, (address, why), this round only.
    round: Vec<(String, String)>,
    /// What the last full round of failures saw.
    last_round: Vec<(String, String)>,
}

impl Rotation {
    /// A rotation pausing for `backoff`'s delays between rounds.
    pub fn new(backoff: Backoff) -> Rotation {
        Rotation {
            backoff,
            round: Vec::new(),
            last_round: Vec::new(),
        }
    }

    /// Records that the replica `index` of `replicas` failed with `why`,
    /// and moves `replicas` on to the next one. Returns the pause before
    /// trying it: `None` to try at once, `Some` once a full round failed.
    pub fn failed(
        &mut self,
        replicas: &Replicas,
        index: usize,
        why: impl fmt::Display,
    ) -> Option<Duration> {
        let addr = replicas.targets[index % replicas.len()].addr.clone();
        self.round.push((addr, why.to_string()));
        replicas.failed(index);
        if self.round.len() < replicas.len() {
            return None;
        }
        self.last_round = std::mem::take(&mut self.round);
        Some(self.backoff.next_delay())
    }

    /// A stream is up again: the next failure starts a new round, with the
    /// shortest pause.
    pub fn succeeded(&mut self) {
        self.round.clear();
        self.backoff.reset();
    }

    /// Full rounds failed since the last success.
    pub fn rounds_failed(&self) -> u32 {
        self.backoff.failures()
    }

    /// The longest pause between rounds.
    pub fn max_pause(&self) -> Duration {
        self.backoff.max()
    }

    /// What the last full round of failures saw, every address with its
    /// error (one address: its error alone).
    pub fn last_round(&self) -> String {
        all_failed(&self.last_round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_and_bad_ones_are_named() {
        assert_eq!(
            split_addrs("a:1, b:2 ,c:3").expect("valid"),
            vec!["a:1", "b:2", "c:3"]
        );
        assert_eq!(split_addrs("a:1").expect("valid"), vec!["a:1"]);
        for (list, why) in [
            ("", "empty address"),
            ("a:1,,b:2", "empty address"),
            ("a:1,", "empty address"),
            ("a:1,b:2,a:1", "a:1 is listed twice"),
        ] {
            let err = split_addrs(list).expect_err(list).to_string();
            assert!(err.contains(why), "{list}: {err}");
        }
        let many: Vec<String> = (0..=MAX_REGISTRY_ADDRS)
            .map(|i| format!("h{i}:1"))
            .collect();
        let err = split_addrs(&many.join(","))
            .expect_err("too many")
            .to_string();
        assert!(err.contains("17 addresses; at most 16"), "{err}");
        let most = &many[..MAX_REGISTRY_ADDRS];
        assert_eq!(
            split_addrs(&most.join(",")).expect("at the limit").len(),
            16
        );
    }

    #[tokio::test]
    async fn a_bad_address_in_a_list_is_named() {
        let c = Connector::plaintext();
        let err = c.replicas("a:1,nohost", |e| e).expect_err("no port");
        assert!(err.to_string().contains("\"nohost\""), "{err}");
        let set = c.replicas("a:1,b:2,c:3", |e| e).expect("valid");
        assert_eq!(set.len(), 3);
        assert_eq!(set.list(), "a:1,b:2,c:3");
        assert_eq!(set.first(), "a:1");
    }

    #[tokio::test]
    async fn failing_moves_on_once_and_wraps() {
        let set = Connector::plaintext()
            .replicas("a:1,b:2,c:3", |e| e)
            .expect("valid");
        let start = set.current().index;
        let next = set.failed(start).index;
        assert_eq!(next, (start + 1) % 3);
        // A second user noticing the same failure does not skip one.
        assert_eq!(set.failed(start).index, next);
        assert_eq!(set.failed(next).index, (start + 2) % 3);
        // Clones share the choice.
        let clone = set.clone();
        clone.failed(set.current().index);
        assert_eq!(clone.current().index, start);
        assert_eq!(set.current().index, start);
    }

    #[tokio::test]
    async fn a_rotation_pauses_only_after_a_full_round() {
        let set = Connector::plaintext()
            .replicas("a:1,b:2,c:3", |e| e)
            .expect("valid");
        let mut rotation = Rotation::new(
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).without_jitter(),
        );
        let mut pauses = Vec::new();
        for _ in 0..6 {
            let i = set.current().index;
            pauses.push(rotation.failed(&set, i, "refused").map(|d| d.as_millis()));
        }
        assert_eq!(pauses, vec![None, None, Some(100), None, None, Some(200)]);
        assert_eq!(rotation.rounds_failed(), 2);
        let round = rotation.last_round();
        for addr in ["a:1: refused", "b:2: refused", "c:3: refused"] {
            assert!(round.contains(addr), "{round}");
        }
        // A success starts afresh: a full round again before any pause.
        let i = set.current().index;
        rotation.failed(&set, i, "refused");
        rotation.succeeded();
        let mut pauses = Vec::new();
        for _ in 0..3 {
            let i = set.current().index;
            pauses.push(rotation.failed(&set, i, "refused").map(|d| d.as_millis()));
        }
        assert_eq!(pauses, vec![None, None, Some(100)]);
    }

    #[tokio::test]
    async fn one_address_pauses_after_every_failure() {
        let set = Connector::plaintext()
            .replicas("a:1", |e| e)
            .expect("valid");
        let mut rotation = Rotation::new(
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).without_jitter(),
        );
        assert_eq!(
            rotation.failed(&set, 0, "x"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            rotation.failed(&set, 0, "x"),
            Some(Duration::from_millis(200))
        );
        assert_eq!(rotation.last_round(), "x");
    }

    #[tokio::test]
    async fn a_call_goes_round_every_replica_and_names_them_all() {
        // Two loopback ports where nothing listens: refused at once.
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        let (a, b) = (free(), free());
        let set = Connector::plaintext()
            .replicas(&format!("{a},{b}"), |e| {
                e.connect_timeout(Duration::from_secs(1))
            })
            .expect("valid");
        let mut calls = 0;
        let status = set
            .call(|mut conn| {
                calls += 1;
                async move {
                    conn.get_descriptors(registry_proto::registry::v1::GetDescriptorsRequest {
                        service: "x".into(),
                    })
                    .await
                }
            })
            .await
            .expect_err("nothing listens");
        assert_eq!(calls, 2);
        assert_eq!(status.code(), Code::Unavailable);
        let message = status.message();
        assert!(
            message.starts_with("no registry replica answered ("),
            "{message}"
        );
        assert!(message.contains(&format!("{a}: ")), "{message}");
        assert!(message.to_lowercase().contains("refused"), "{message}");
        assert!(message.contains(&format!("{b}: ")), "{message}");
    }

    #[test]
    fn default_is_plaintext() {
        let c = Connector::plaintext();
        assert!(!c.uses_tls());
        let e = c.endpoint("127.0.0.1:1").expect("valid");
        assert_eq!(e.uri().scheme_str(), Some("http"));
    }

    #[test]
    fn missing_files_and_bad_tokens_fail_early() {
        let tls = TlsArgs {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..TlsArgs::default()
        };
        let err = Connector::new(tls, None).expect_err("no such file");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let err = Connector::new(TlsArgs::default(), Some("a b")).expect_err("space");
        assert!(matches!(err, SecurityError::BadToken), "{err}");
    }
}
