//! The node's side of the lease protocol: keep this node's plugins
//! registered for as long as it lives, whatever happens to the registry.
//!
//! One task owns everything that talks to the registry. It is told what
//! *should* be registered through a watch channel ([`Desired`]) and
//! reconciles toward it:
//!
//! 1. connect, grant one lease for the whole node, open the KeepAlive stream
//!    (a heartbeat every TTL/3);
//! 2. Register every desired plugin not registered yet or registered with
//!    other settings (Register is an upsert under the same lease: a weight
//!    change is an in-place UPDATED, with no gap), Deregister the ones no
//!    longer desired;
//! 3. wait for the desired state to change, or for the session to fail.
//!
//! Any failure (registry unreachable, stream broken, no KeepAlive answer
//! within the TTL) drops the session. The registry may be several replicas
//! (`--registry a:50051,b:50051`, see [`support::Replicas`]): the next
//! session goes to the next replica at once, and only after every replica
//! failed in a row is there a pause, an exponential backoff with jitter.
//! A new session first *resumes* the lease it had: a KeepAlive with the same
//! lease id and secret. Replicas that share a store (etcd) still hold the
//! lease and its instances, so nothing is registered again and no instance
//! goes away. Only when the registry says the lease is unknown (NOT_FOUND:
//! a registry restarted empty, a replica with a store of its own, a lease
//! that expired meanwhile) is a fresh lease granted and everything
//! registered again. Pausing (`u`) revokes the lease, which removes every
//! instance at once; shutting down (`q`) revokes it and ends the task.
//!
//! What is registered right now is published on a second watch channel
//! ([`Reached`]), with the [generation](Desired::generation) of the newest
//! desired state the task has caught up with, so callers can wait for a
//! change to reach the registry: a registration still in flight for an older
//! desired state is not mistaken for "not registered".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use registry_proto::registry::v1::{
    DeregisterRequest, GrantLeaseRequest, Instance, KeepAliveRequest, RegisterRequest,
    RegisterResponse, RevokeLeaseRequest,
};
use support::{AbortOnDropHandle, Backoff, Connector, RegistryConn, Replica, Rotation};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tracing::{debug, error, info, warn};

use crate::config::PluginConfig;
use crate::plugin::Plugin;

/// How long to wait for a TCP connection to the registry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one unary call to the registry may take before the link is
/// considered broken.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the registry may go silent (a stalled registry: SIGSTOP, a VM
/// pause) before this node gives up on its session, beyond the lease TTL
/// for heartbeat answers. A stalled registry renews every lease when it
/// resumes (see the registry's `lease` module), so a session kept through
/// the stall is still good; one dropped would be revoked, and the node's
/// instances would flap. With several replicas the node does not wait: it
/// moves to the next one after the TTL alone ([`REPLICA_SILENCE`]), where
/// its lease lives on (with a shared store) while the stalled one is out.
pub const STALL_TOLERANCE: Duration = Duration::from_secs(4);
/// How long past the lease TTL a silent replica is waited for, and its
/// HTTP/2 pings, when there are other replicas to go to.
pub const REPLICA_SILENCE: Duration = Duration::from_secs(1);
/// First pause after every registry replica failed in a row.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest pause between rounds of attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What should be registered. The registration task reconciles toward it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Plugins to register, by name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// `u` was typed: register nothing (the node keeps serving).
    pub paused: bool,
    /// The node is shutting down: revoke the lease and stop.
    pub shutdown: bool,
    /// Bumped by every change through the [`Registrar`], so a waiter can
    /// tell whether the task has acted on that change yet.
    pub generation: u64,
}

/// What is registered right now, by plugin name, as far as this node knows.
pub type Registered = BTreeMap<String, PluginConfig>;

/// What the registration task reports.
#[derive(Debug, Clone, Default)]
struct Reached {
    /// The newest desired generation the task has caught up with: nothing
    /// it does from now on (no call in flight either) serves an older one,
    /// and `registered` already reflects it.
    generation: u64,
    /// What is registered right now.
    registered: Registered,
}

/// Fixed facts the registration task needs.
#[derive(Clone)]
pub struct Settings {
    /// The registry's `host:port`, or several replicas' comma-separated
    /// (see [`support::connect::split_addrs`]).
    pub registry: String,
    /// The address this node advertises.
    pub advertised: SocketAddr,
    /// Lease TTL to ask for; `None` takes the registry's default.
    pub lease_ttl_ms: Option<u64>,
    /// Every plugin this node knows (for proto names and descriptors).
    pub plugins: Vec<Arc<dyn Plugin>>,
    /// TLS towards the registry (`--tls-ca`, and a client certificate),
    /// and its write token, sent on every call.
    pub connector: Connector,
}

/// Why a session with the registry ended badly.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("{what} failed: {}: {}", .status.code(), .status.message())]
    Rpc {
        what: &'static str,
        status: Box<Status>,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the KeepAlive stream ended")]
    KeepAliveEnded,
    #[error("no KeepAlive answer within the lease TTL and the stall tolerance ({0:?})")]
    KeepAliveSilent(Duration),
}

/// Runs one registry call with [`RPC_TIMEOUT`].
async fn call<T>(
    what: &'static str,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, SessionError> {
    match timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(SessionError::Rpc {
            what,
            status: Box::new(status),
        }),
        Err(_) => Err(SessionError::Timeout {
            what,
            after: RPC_TIMEOUT,
        }),
    }
}

/// The protobuf service and descriptors of plugins learned at run time (an
/// external plugin's, from its server reflection), by plugin name. Shared by
/// the [`Registrar`] handle and its task.
#[derive(Debug, Clone, Default)]
struct RuntimeServices(Arc<std::sync::RwLock<BTreeMap<String, Identity>>>);

/// A service's full protobuf name and encoded descriptors.
type Identity = (String, Arc<[u8]>);

impl RuntimeServices {
    fn set(&self, name: &str, proto_service: String, descriptors: Arc<[u8]>) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.insert(name.to_string(), (proto_service, descriptors));
    }

    fn get(&self, name: &str) -> Option<Identity> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned()
    }

    /// `name`'s service and descriptors: built in (`settings`), else
    /// learned at run time.
    fn identity(&self, settings: &Settings, name: &str) -> Option<(String, Vec<u8>)> {
        match settings.plugins.iter().find(|p| p.name() == name) {
            Some(plugin) => Some((
                plugin.proto_service().to_string(),
                plugin.descriptors().to_vec(),
            )),
            None => self
                .get(name)
                .map(|(service, descriptors)| (service, descriptors.to_vec())),
        }
    }
}

/// A handle on the registration task.
pub struct Registrar {
    /// The target state.
    desired: watch::Sender<Desired>,
    /// The state reached.
    reached: watch::Receiver<Reached>,
    /// The task, awaited on shutdown.
    task: tokio::sync::Mutex<Option<JoinHandle<u32>>>,
    /// Services of plugins the build does not know (external ones).
    runtime: RuntimeServices,
}

impl Registrar {
    /// Starts the registration task with nothing to register yet.
    pub fn spawn(settings: Settings) -> Registrar {
        let (desired, desired_rx) = watch::channel(Desired::default());
        let (reached_tx, reached) = watch::channel(Reached::default());
        let runtime = RuntimeServices::default();
        let task = tokio::spawn(run(settings, runtime.clone(), desired_rx, reached_tx));
        Registrar {
            desired,
            reached,
            task: tokio::sync::Mutex::new(Some(task)),
            runtime,
        }
    }

    /// The current target state.
    pub fn desired(&self) -> Desired {
        self.desired.borrow().clone()
    }

    /// What is registered right now.
    pub fn registered(&self) -> Registered {
        self.reached.borrow().registered.clone()
    }

    /// Changes the target state under a new generation; returns it.
    fn change(&self, f: impl FnOnce(&mut Desired)) -> u64 {
        let mut generation = 0;
        self.desired.send_modify(|d| {
            f(d);
            d.generation += 1;
            generation = d.generation;
        });
        generation
    }

    /// Registers `name` with `plugin`'s settings (or updates it in place).
    pub fn upsert(&self, name: &str, plugin: PluginConfig) {
        self.change(|d| {
            d.plugins.insert(name.to_string(), plugin);
        });
    }

    /// Registers `name`, a plugin this build does not know (an external
    /// one), as `proto_service` with `descriptors` (or updates it in place).
    pub fn upsert_runtime(
        &self,
        name: &str,
        plugin: PluginConfig,
        proto_service: &str,
        descriptors: Arc<[u8]>,
    ) {
        self.runtime
            .set(name, proto_service.to_string(), descriptors);
        self.upsert(name, plugin);
    }

    /// Deregisters `name` without waiting for the registry to confirm it.
    pub fn forget(&self, name: &str) {
        self.change(|d| {
            d.plugins.remove(name);
        });
    }

    /// Deregisters `name`; returns once the registry confirmed it (or no
    /// longer holds it), or after `wait` if it cannot be reached. A Register
    /// of `name` still in flight when this is called is waited for and
    /// undone: the caller may stop serving `name` once this returns true.
    pub async fn remove(&self, name: &str, wait: Duration) -> bool {
        let generation = self.change(|d| {
            d.plugins.remove(name);
        });
        self.wait_for(generation, wait, |r| !r.contains_key(name))
            .await
    }

    /// Deregisters everything (`u`) and keeps it so until [`resume`](Self::resume).
    /// Returns whether the registry holds nothing of ours within `wait`.
    pub async fn pause(&self, wait: Duration) -> bool {
        let generation = self.change(|d| d.paused = true);
        self.wait_for(generation, wait, Registered::is_empty).await
    }

    /// Registers everything again (`r`). Returns whether everything desired
    /// is registered within `wait`.
    pub async fn resume(&self, wait: Duration) -> bool {
        let generation = self.change(|d| d.paused = false);
        let want = self.desired().plugins;
        self.wait_for(generation, wait, |r| registered_matches(r, &want))
            .await
    }

    /// Revokes the lease (deregistering everything) and stops the task.
    /// Gives up waiting for the registry after `wait`. Returns how many
    /// instances the registry removed.
    pub async fn shutdown(&self, wait: Duration) -> u32 {
        self.change(|d| d.shutdown = true);
        let Some(mut task) = self.task.lock().await.take() else {
            return 0;
        };
        match timeout(wait, &mut task).await {
            Ok(removed) => removed.unwrap_or(0),
            Err(_) => {
                warn!(
                    "the registry did not confirm the lease revocation in {wait:?}; leaving anyway"
                );
                task.abort();
                0
            }
        }
    }

    /// Waits until the task has caught up with every change made so far
    /// and `done` holds for what is registered, at most `wait`.
    pub async fn wait_until(&self, wait: Duration, done: impl Fn(&Registered) -> bool) -> bool {
        let generation = self.desired.borrow().generation;
        self.wait_for(generation, wait, done).await
    }

    /// Waits until the task has caught up with `generation` and `done`
    /// holds, at most `wait`. The generation matters: before the task has
    /// seen a change, what it reports says nothing about that change.
    async fn wait_for(
        &self,
        generation: u64,
        wait: Duration,
        done: impl Fn(&Registered) -> bool,
    ) -> bool {
        let mut rx = self.reached.clone();
        timeout(
            wait,
            rx.wait_for(|r| r.generation >= generation && done(&r.registered)),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }
}

/// Whether `registered` holds exactly `want` (weights and metadata included).
pub fn registered_matches(registered: &Registered, want: &BTreeMap<String, PluginConfig>) -> bool {
    registered.len() == want.len()
        && want
            .iter()
            .all(|(n, p)| registered.get(n).is_some_and(|r| r.same_registration(p)))
}

/// How a session ended.
enum SessionEnd {
    /// Paused: the lease was revoked; wait for `r`.
    Paused,
    /// Shut down: the lease was revoked (with this many instances); stop.
    Shutdown(u32),
}

/// Reports that nothing is registered and no call is in flight, so every
/// change up to the newest desired state is trivially caught up with (a
/// removal needs no call; the next session acts on the newest state).
fn nothing_registered(reached: &watch::Sender<Reached>, desired: &watch::Receiver<Desired>) {
    let generation = desired.borrow().generation;
    reached.send_replace(Reached {
        generation,
        registered: Registered::new(),
    });
}

/// The registration task. Returns how many instances the final revocation
/// removed.
async fn run(
    settings: Settings,
    runtime: RuntimeServices,
    mut desired: watch::Receiver<Desired>,
    reached: watch::Sender<Reached>,
) -> u32 {
    // A single registry is waited for through a stall; of several, a
    // silent one is left for the next.
    let several = support::connect::split_addrs(&settings.registry).is_ok_and(|a| a.len() > 1);
    let stall = if several {
        REPLICA_SILENCE
    } else {
        STALL_TOLERANCE
    };
    let replicas = match settings.connector.replicas(&settings.registry, |endpoint| {
        endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            // HTTP/2 pings still find a dead link, but a stalled registry is
            // given `stall` to answer.
            .keep_alive_timeout(stall)
    }) {
        Ok(replicas) => replicas,
        Err(e) => {
            // `run::run` checks the addresses before starting: only a
            // library user passing a bad one gets here.
            error!(
                "registry {}: {e}; nothing will be registered",
                settings.registry
            );
            while desired.changed().await.is_ok() {
                if desired.borrow().shutdown {
                    break;
                }
            }
            return 0;
        }
    };
    let mut rotation = Rotation::new(Backoff::new(BACKOFF_START, BACKOFF_MAX));
    // The lease of the session that failed, and what it held: offered to
    // the next replica before anything is registered again.
    let mut carried: Option<Carried> = None;
    // The last settings the registry accepted for each plugin, kept across
    // sessions: what is registered again after a registry restart when it
    // refuses the newer ones.
    let mut accepted: BTreeMap<String, PluginConfig> = BTreeMap::new();
    loop {
        let want = desired.borrow_and_update().clone();
        if want.shutdown {
            return 0;
        }
        if want.paused {
            nothing_registered(&reached, &desired);
            if desired.changed().await.is_err() {
                return 0;
            }
            continue;
        }
        let replica = replicas.current();
        match session(
            &settings,
            replica,
            &runtime,
            &mut desired,
            &reached,
            &mut rotation,
            &mut accepted,
            &mut carried,
            stall,
        )
        .await
        {
            Ok(SessionEnd::Shutdown(removed)) => return removed,
            Ok(SessionEnd::Paused) => continue,
            Err(e) => {
                let e = with_causes(&e);
                // Whether the lease outlives the session is up to the next
                // replica (see `start`): until then, nothing is counted as
                // registered, so a removal meanwhile does not wait for it.
                nothing_registered(&reached, &desired);
                let Some(delay) = rotation.failed(&replicas, replica.index, &e) else {
                    warn!(
                        "registry {}: {e}; still serving, moving to {}",
                        replica.addr(),
                        replicas.current().addr()
                    );
                    continue;
                };
                let failures = rotation.rounds_failed();
                // The first failure and then every tenth: a registry that is
                // down for a minute should not flood the log.
                let why = match replicas.len() {
                    1 => format!("registry {}: {}", replica.addr(), rotation.last_round()),
                    _ => rotation.last_round(),
                };
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(
                        "{why}; still serving, retrying (every {:?} at most)",
                        rotation.max_pause()
                    );
                } else {
                    debug!("{why}; retrying in {delay:?}");
                }
                // Sleep, but stop at once for a shutdown or pause (checked
                // first too: one that came while the session was starting
                // is marked seen already).
                let deadline = Instant::now() + delay;
                loop {
                    {
                        let d = desired.borrow();
                        if d.shutdown || d.paused {
                            break;
                        }
                    }
                    tokio::select! {
                        () = sleep_until(deadline) => break,
                        changed = desired.changed() => {
                            if changed.is_err() {
                                return 0;
                            }
                            // A removal while the registry is unreachable is
                            // done already: say so now, not after the sleep.
                            nothing_registered(&reached, &desired);
                        }
                    }
                }
            }
        }
    }
}

/// Whether the registry said the lease is gone (NOT_FOUND): then no
/// replica has it, and offering it to the next one is a wasted call.
fn lease_gone(e: &SessionError) -> bool {
    matches!(e, SessionError::Rpc { status, .. } if status.code() == Code::NotFound)
}

/// An error with its causes, `a: b: c` (tonic's connection errors say
/// only "transport error" by themselves).
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        cause = e.source();
    }
    line
}

/// The lease of the current session.
#[derive(Debug, Clone)]
struct Lease {
    id: u64,
    secret: String,
    ttl: Duration,
    /// How long past the TTL a silent registry is waited for
    /// ([`STALL_TOLERANCE`] or [`REPLICA_SILENCE`]).
    stall: Duration,
}

/// One registered instance, as this node registered it.
struct Held {
    config: PluginConfig,
    instance_id: String,
}

/// What a failed session leaves for the next one to resume.
struct Carried {
    lease: Lease,
    held: BTreeMap<String, Held>,
}

/// A session ready to register: connected, lease granted (or resumed) and
/// attached to its KeepAlive stream.
struct Started {
    client: RegistryConn,
    lease: Lease,
    /// The heartbeat task; ends only with the reason the stream failed.
    /// Aborted when the session ends.
    heartbeat: AbortOnDropHandle<SessionError>,
    /// The lease is the one offered to resume, still known to the registry:
    /// its instances are still registered.
    resumed: bool,
}

/// Connects to `replica`, then resumes `resume` if the registry still knows
/// that lease, else grants a new one; returns once the lease is attached to
/// a KeepAlive stream.
async fn start(
    settings: &Settings,
    replica: Replica<'_>,
    resume: Option<&Lease>,
    stall: Duration,
) -> Result<Started, SessionError> {
    let registry = replica.addr();
    let channel = timeout(CONNECT_TIMEOUT * 2, replica.endpoint().connect())
        .await
        .map_err(|_| SessionError::Timeout {
            what: "connect",
            after: CONNECT_TIMEOUT * 2,
        })?
        .map_err(SessionError::Connect)?;
    let mut client = settings.connector.registry(channel);

    if let Some(lease) = resume {
        let lease = Lease {
            stall,
            ..lease.clone()
        };
        match attach(&client, &lease).await {
            Ok(heartbeat) => {
                info!(
                    "registry {registry}: lease {} resumed (ttl {:?})",
                    lease.id, lease.ttl
                );
                return Ok(Started {
                    client,
                    lease,
                    heartbeat,
                    resumed: true,
                });
            }
            // Unknown here (expired, or a registry with a store of its own)
            // or not ours any more: start afresh.
            Err(SessionError::Rpc { status, .. })
                if matches!(status.code(), Code::NotFound | Code::PermissionDenied) =>
            {
                info!(
                    "registry {registry}: lease {} is gone ({}); registering again",
                    lease.id,
                    status.message()
                );
            }
            Err(e) => return Err(e),
        }
    }

    let grant = call(
        "GrantLease",
        client.grant_lease(GrantLeaseRequest {
            ttl_ms: settings.lease_ttl_ms.unwrap_or(0),
        }),
    )
    .await?;
    crate::metrics::lease_granted();
    let lease = Lease {
        id: grant.lease_id,
        secret: grant.lease_secret,
        ttl: Duration::from_millis(grant.ttl_ms.max(1)),
        stall,
    };
    info!(
        "registry {registry}: lease {} granted (ttl {:?})",
        lease.id, lease.ttl
    );
    let heartbeat = attach(&client, &lease).await?;
    Ok(Started {
        client,
        lease,
        heartbeat,
        resumed: false,
    })
}

/// Starts heartbeating `lease` on a new KeepAlive stream; returns once the
/// registry answered the first heartbeat (the lease is then attached to the
/// stream), or why it did not.
async fn attach(
    client: &RegistryConn,
    lease: &Lease,
) -> Result<AbortOnDropHandle<SessionError>, SessionError> {
    let (attached_tx, attached_rx) = tokio::sync::oneshot::channel();
    let mut heartbeat = AbortOnDropHandle::new(tokio::spawn(keep_alive(
        client.clone(),
        lease.clone(),
        attached_tx,
    )));
    // Register only once the registry has attached the lease to our
    // KeepAlive stream: a crash right after registering is then noticed at
    // once (the stream breaks), not only when the TTL runs out.
    if attached_rx.await.is_err() {
        let ended = (&mut heartbeat).await;
        return Err(ended.unwrap_or(SessionError::KeepAliveEnded));
    }
    Ok(heartbeat)
}

/// One session on `replica`: grant (or resume `carried`), keep alive,
/// reconcile, until paused, shut down or broken. A broken session leaves
/// its lease and what it held in `carried`.
#[allow(clippy::too_many_arguments)]
async fn session(
    settings: &Settings,
    replica: Replica<'_>,
    runtime: &RuntimeServices,
    desired: &mut watch::Receiver<Desired>,
    reached: &watch::Sender<Reached>,
    rotation: &mut Rotation,
    accepted: &mut BTreeMap<String, PluginConfig>,
    carried: &mut Option<Carried>,
    stall: Duration,
) -> Result<SessionEnd, SessionError> {
    let registry = replica.addr();
    // Connecting may take seconds (and waiting for the KeepAlive answer
    // longer): nothing is registered yet, so a removal until then is done at
    // once. (If every handle is gone, the branch is off and the loop below
    // notices.)
    nothing_registered(reached, desired);
    let resume = carried.as_ref().map(|c| c.lease.clone());
    let starting = start(settings, replica, resume.as_ref(), stall);
    tokio::pin!(starting);
    let started = loop {
        tokio::select! {
            started = &mut starting => break started?,
            Ok(()) = desired.changed() => nothing_registered(reached, desired),
        }
    };
    let Started {
        mut client,
        lease,
        mut heartbeat,
        resumed,
    } = started;

    // Resumed: the registry still holds what the lease held.
    let mut held: BTreeMap<String, Held> = match carried.take() {
        Some(c) if resumed => c.held,
        _ => BTreeMap::new(),
    };
    if !held.is_empty() {
        reached.send_modify(|r| {
            r.registered = held
                .iter()
                .map(|(n, h)| (n.clone(), h.config.clone()))
                .collect();
        });
    }
    // Settings the registry refused for a reason retrying cannot fix
    // (INVALID_ARGUMENT, RESOURCE_EXHAUSTED): not retried until they change
    // (or the next session: the registry's limits may have changed).
    let mut refused: BTreeMap<String, PluginConfig> = BTreeMap::new();
    loop {
        let want = desired.borrow_and_update().clone();
        if want.shutdown || want.paused {
            let removed = revoke(&mut client, &lease).await;
            reached.send_replace(Reached {
                generation: want.generation,
                registered: Registered::new(),
            });
            info!(
                "registry {registry}: lease {} revoked, {removed} instances removed",
                lease.id
            );
            return Ok(if want.shutdown {
                SessionEnd::Shutdown(removed)
            } else {
                SessionEnd::Paused
            });
        }
        if let Err(e) = reconcile(
            settings,
            runtime,
            &mut client,
            &lease,
            &want.plugins,
            &mut held,
            &mut refused,
            accepted,
            reached,
        )
        .await
        {
            if !lease_gone(&e) {
                *carried = Some(Carried { lease, held });
            }
            return Err(e);
        }
        // Only now is this state fully reached: waiting for it until here
        // covers a Register that was in flight when a removal came in.
        reached.send_modify(|r| r.generation = want.generation);
        if rotation.rounds_failed() > 0 {
            info!(
                "registry {registry}: reachable again, {} services registered",
                held.len()
            );
        }
        rotation.succeeded();

        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    // Every handle is gone: the node is going away.
                    let removed = revoke(&mut client, &lease).await;
                    return Ok(SessionEnd::Shutdown(removed));
                }
            }
            ended = &mut heartbeat => {
                let e = ended.unwrap_or(SessionError::KeepAliveEnded);
                if !lease_gone(&e) {
                    *carried = Some(Carried { lease, held });
                }
                return Err(e);
            }
        }
    }
}

/// Brings the registry from `held` to `want` under `lease`. Settings the
/// registry refuses are not retried in this session; the plugin stays (or,
/// in a new session, is registered again) with the last settings the
/// registry `accepted`, if any.
#[allow(clippy::too_many_arguments)]
async fn reconcile(
    settings: &Settings,
    runtime: &RuntimeServices,
    client: &mut RegistryConn,
    lease: &Lease,
    want: &BTreeMap<String, PluginConfig>,
    held: &mut BTreeMap<String, Held>,
    refused: &mut BTreeMap<String, PluginConfig>,
    accepted: &mut BTreeMap<String, PluginConfig>,
    reached: &watch::Sender<Reached>,
) -> Result<(), SessionError> {
    // Published after every call, so waiters see each step as it lands
    // (under the generation reached before: this one is not reached yet).
    let publish = |held: &BTreeMap<String, Held>| {
        reached.send_modify(|r| {
            r.registered = held
                .iter()
                .map(|(n, h)| (n.clone(), h.config.clone()))
                .collect();
        });
    };
    let gone: Vec<String> = held
        .keys()
        .filter(|n| !want.contains_key(*n))
        .cloned()
        .collect();
    for name in gone {
        let Some(h) = held.get(&name) else { continue };
        let result = call(
            "Deregister",
            client.deregister(DeregisterRequest {
                lease_id: lease.id,
                lease_secret: lease.secret.clone(),
                service: name.clone(),
                instance_id: h.instance_id.clone(),
            }),
        )
        .await;
        match result {
            Ok(_) => info!("deregistered {name} ({})", h.instance_id),
            // Already gone: what we wanted.
            Err(SessionError::Rpc { status, .. }) if status.code() == Code::NotFound => {}
            Err(e) => return Err(e),
        }
        held.remove(&name);
        publish(held);
    }
    refused.retain(|name, config| want.get(name) == Some(config));
    accepted.retain(|name, _| want.contains_key(name));

    // A second pass registers the last accepted settings of plugins whose
    // new ones were just refused, where the registry holds nothing of them.
    for _pass in 0..2 {
        let mut again = false;
        for (name, wanted) in want {
            // Refused settings give way to the last accepted ones (if any).
            let falling_back = refused.get(name) == Some(wanted);
            let target = if falling_back {
                match accepted.get(name) {
                    Some(last) => last.clone(),
                    None => continue,
                }
            } else {
                wanted.clone()
            };
            if held
                .get(name)
                .is_some_and(|h| h.config.same_registration(&target))
            {
                continue;
            }
            let Some((proto_service, file_descriptor_set)) = runtime.identity(settings, name)
            else {
                // Neither built in nor learned at run time: nothing to register.
                continue;
            };
            let config = &target;
            let request = RegisterRequest {
                lease_id: lease.id,
                lease_secret: lease.secret.clone(),
                instance: Some(Instance {
                    service: name.clone(),
                    instance_id: String::new(),
                    host: settings.advertised.ip().to_string(),
                    port: u32::from(settings.advertised.port()),
                    weight: Some(config.weight),
                    metadata: config.metadata.clone().into_iter().collect(),
                    proto_service,
                    lease_id: 0,
                    revision: 0,
                }),
                file_descriptor_set,
            };
            let updating = held.contains_key(name);
            match register_paced(client, request).await {
                Ok(resp) => {
                    let instance_id = resp
                        .instance
                        .map(|i| i.instance_id)
                        .unwrap_or_else(|| settings.advertised.to_string());
                    info!(
                        "{} {name} ({instance_id}) weight {}{} metadata {:?}",
                        if updating { "updated" } else { "registered" },
                        config.weight,
                        if config.weight == 0 {
                            " (drained: listed, no new calls)"
                        } else {
                            ""
                        },
                        config.metadata
                    );
                    held.insert(
                        name.clone(),
                        Held {
                            config: config.clone(),
                            instance_id,
                        },
                    );
                    accepted.insert(name.clone(), config.clone());
                    publish(held);
                }
                Err(SessionError::Rpc { status, .. })
                    if matches!(
                        status.code(),
                        Code::InvalidArgument | Code::ResourceExhausted
                    ) =>
                {
                    let fallback = if falling_back {
                        // The last accepted settings are refused now too (the
                        // registry's limits changed): nothing left to offer.
                        error!(
                            "the registry now refuses the last settings it accepted for {name} (weight {}) too: {}: {}; not registered",
                            config.weight,
                            status.code(),
                            status.message()
                        );
                        accepted.remove(name);
                        None
                    } else {
                        refused.insert(name.clone(), config.clone());
                        let last = accepted.get(name).cloned();
                        let keeping = match &last {
                            Some(last) => format!(
                                "keeping the last settings it accepted (weight {} metadata {:?})",
                                last.weight, last.metadata
                            ),
                            None => "not registered".to_string(),
                        };
                        error!(
                            "the registry refused {name} with weight {} and {} metadata entries: {}: {}; {keeping}; the new settings are not in force (not retried until they change)",
                            config.weight,
                            config.metadata.len(),
                            status.code(),
                            status.message()
                        );
                        last
                    };
                    // In this session the registry still holds what it accepted
                    // before (a refused upsert changes nothing); in a new one
                    // it must be registered again.
                    if let Some(last) = fallback
                        && !held
                            .get(name)
                            .is_some_and(|h| h.config.same_registration(&last))
                    {
                        again = true;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if !again {
            break;
        }
    }
    Ok(())
}

/// How often a Register refused by the registry's per-peer rate limit is
/// tried again within the session, and the pause before the first retry
/// (doubled each time): the limit refills every second.
const RATE_LIMIT_RETRIES: u32 = 5;
const RATE_LIMIT_PAUSE: Duration = Duration::from_millis(100);

/// Register, retried after a pause when the registry's per-peer rate limit
/// refused it (the refusal that carries a `google.rpc.RetryInfo` detail):
/// unlike the other RESOURCE_EXHAUSTED refusals (a quota), that one passes
/// by itself (another process on this machine registering fast,
/// say), and giving up on the plugin until its settings change would be
/// wrong.
async fn register_paced(
    client: &mut RegistryConn,
    request: RegisterRequest,
) -> Result<RegisterResponse, SessionError> {
    // No jitter: the pause is what the registry's refill needs, and the
    // doubling is capped only by the number of retries.
    let mut pauses = Backoff::new(RATE_LIMIT_PAUSE, Duration::MAX).without_jitter();
    loop {
        let result = call("Register", client.register(request.clone())).await;
        match &result {
            Err(SessionError::Rpc { status, .. })
                if status.code() == Code::ResourceExhausted
                    && status.get_details_retry_info().is_some()
                    && pauses.failures() < RATE_LIMIT_RETRIES =>
            {
                let pause = pauses.next_delay();
                warn!("the registry asked to slow down; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
            }
            _ => return result,
        }
    }
}

/// Revokes the lease; returns how many instances went with it (0 when the
/// registry cannot be reached: the lease then dies with its KeepAlive stream
/// or its TTL anyway).
async fn revoke(client: &mut RegistryConn, lease: &Lease) -> u32 {
    match call(
        "RevokeLease",
        client.revoke_lease(RevokeLeaseRequest {
            lease_id: lease.id,
            lease_secret: lease.secret.clone(),
        }),
    )
    .await
    {
        Ok(r) => r.removed,
        Err(e) => {
            warn!("revoking lease {}: {e}", lease.id);
            0
        }
    }
}

/// Heartbeats `lease` every TTL/3 until the stream fails; returns why.
/// `attached` fires at the first answer: the lease is then bound to this
/// stream.
async fn keep_alive(
    mut client: RegistryConn,
    lease: Lease,
    attached: tokio::sync::oneshot::Sender<()>,
) -> SessionError {
    let mut attached = Some(attached);
    let (tx, rx) = mpsc::channel(4);
    let beat = KeepAliveRequest {
        lease_id: lease.id,
        lease_secret: lease.secret.clone(),
    };
    if tx.send(beat.clone()).await.is_err() {
        return SessionError::KeepAliveEnded;
    }
    let mut stream = match call("KeepAlive", client.keep_alive(ReceiverStream::new(rx))).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let period = (lease.ttl / 3).max(Duration::from_millis(10));
    let mut next_beat = Instant::now() + period;
    let mut last_answer = Instant::now();
    loop {
        tokio::select! {
            () = sleep_until(next_beat) => {
                next_beat += period;
                if tx.send(beat.clone()).await.is_err() {
                    return SessionError::KeepAliveEnded;
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(_)) => {
                    last_answer = Instant::now();
                    if let Some(attached) = attached.take() {
                        let _ = attached.send(());
                    }
                }
                Ok(None) => return SessionError::KeepAliveEnded,
                Err(status) => return SessionError::Rpc { what: "KeepAlive", status: Box::new(status) },
            },
            // A cut link shows as silence, not an error: give up once the
            // lease must have expired on the registry's side anyway, or the
            // registry is stalled for longer than it is given.
            () = sleep_until(last_answer + lease.ttl + lease.stall) => {
                return SessionError::KeepAliveSilent(lease.ttl + lease.stall);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WeightSource;

    #[test]
    fn matching_ignores_weight_source_but_not_weight() {
        let p = |w| PluginConfig {
            weight: w,
            weight_source: WeightSource::Configured,
            metadata: BTreeMap::new(),
            external: None,
        };
        let mut want = BTreeMap::new();
        want.insert("echo".to_string(), p(3));
        let mut reg = Registered::new();
        assert!(!registered_matches(&reg, &want));
        let mut random = p(3);
        random.weight_source = WeightSource::Random;
        reg.insert("echo".to_string(), random);
        assert!(registered_matches(&reg, &want));
        reg.insert("echo".to_string(), p(4));
        assert!(!registered_matches(&reg, &want));
    }
}
