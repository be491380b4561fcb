//! The registration task and reloads against a fake registry whose calls
//! can be made slow, to catch what a real registry answers too fast to show:
//! a change that arrives while a call is in flight.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use node_host::config::{PluginConfig, WeightSource};
use node_host::node::{FixedByFlags, Node};
use node_host::registration::{Registrar, Settings};
use registry_proto::registry::v1::registry_server::{Registry, RegistryServer};
use registry_proto::registry::v1::{
    DeregisterRequest, DeregisterResponse, GetDescriptorsRequest, GetDescriptorsResponse,
    GrantLeaseRequest, GrantLeaseResponse, Instance, KeepAliveRequest, KeepAliveResponse,
    ListServicesRequest, ListServicesResponse, RegisterRequest, RegisterResponse, ResolveRequest,
    ResolveResponse, RevokeLeaseRequest, RevokeLeaseResponse, UpdateRequest, UpdateResponse,
    WatchRequest, WatchResponse,
};
use support::Connector;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// Longer than any wait below is allowed to take, shorter than the
/// registration task's RPC timeout (2 s).
const SLOW: Duration = Duration::from_millis(800);
const WAIT: Duration = Duration::from_secs(3);

/// What the fake registry holds and is doing.
#[derive(Default)]
struct State {
    /// Services registered (one node, so one instance each).
    held: BTreeSet<String>,
    /// Register calls running, by service.
    in_flight: BTreeMap<String, u32>,
    /// Register calls received, by service.
    registers: BTreeMap<String, u32>,
    /// Deregister calls running.
    deregistering: u32,
    /// The weight each held service was registered with.
    weights: BTreeMap<String, u32>,
    /// A weight Register refuses with INVALID_ARGUMENT (a registry with
    /// tighter limits than the node knows).
    refuse_weight: Option<u32>,
}

/// How long the fake takes to answer each kind of call.
#[derive(Clone, Copy, Default)]
struct Delays {
    grant: Duration,
    register: Duration,
    deregister: Duration,
}

/// A registry that answers like the real one, only after its [`Delays`].
#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    delays: Delays,
    /// Ends every KeepAlive stream and forgets everything: a restart.
    restart: Arc<tokio::sync::Notify>,
}

impl Fake {
    async fn start(delays: Delays) -> (Fake, SocketAddr) {
        let fake = Fake {
            state: Arc::default(),
            delays,
            restart: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(RegistryServer::new(fake.clone()))
            .serve_with_incoming(TcpIncoming::from(listener));
        tokio::spawn(server);
        (fake, addr)
    }

    fn holds(&self, service: &str) -> bool {
        self.state.lock().unwrap().held.contains(service)
    }

    fn in_flight(&self, service: &str) -> u32 {
        let state = self.state.lock().unwrap();
        state.in_flight.get(service).copied().unwrap_or(0)
    }

    fn weight(&self, service: &str) -> Option<u32> {
        self.state.lock().unwrap().weights.get(service).copied()
    }

    fn registers(&self, service: &str) -> u32 {
        let state = self.state.lock().unwrap();
        state.registers.get(service).copied().unwrap_or(0)
    }
}

#[tonic::async_trait]
impl Registry for Fake {
    async fn grant_lease(
        &self,
        _: Request<GrantLeaseRequest>,
    ) -> Result<Response<GrantLeaseResponse>, Status> {
        tokio::time::sleep(self.delays.grant).await;
        Ok(Response::new(GrantLeaseResponse {
            lease_id: 1,
            lease_secret: "secret".into(),
            ttl_ms: 10_000,
        }))
    }

    type KeepAliveStream = ReceiverStream<Result<KeepAliveResponse, Status>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut beats = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        let restart = self.restart.clone();
        tokio::spawn(async move {
            loop {
                let beat = tokio::select! {
                    beat = beats.message() => beat,
                    () = restart.notified() => {
                        let _ = tx.send(Err(Status::not_found("lease 1 not found"))).await;
                        break;
                    }
                };
                let Ok(Some(beat)) = beat else { break };
                let answer = KeepAliveResponse {
                    lease_id: beat.lease_id,
                    ttl_ms: 10_000,
                };
                if tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
            // Like the real registry: the lease dies with its stream.
            let mut state = state.lock().unwrap();
            state.held.clear();
            state.weights.clear();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn revoke_lease(
        &self,
        _: Request<RevokeLeaseRequest>,
    ) -> Result<Response<RevokeLeaseResponse>, Status> {
        let mut state = self.state.lock().unwrap();
        let removed = u32::try_from(state.held.len()).unwrap();
        state.held.clear();
        Ok(Response::new(RevokeLeaseResponse { removed }))
    }

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let instance = request.into_inner().instance.unwrap_or_default();
        let service = instance.service.clone();
        {
            let mut state = self.state.lock().unwrap();
            *state.in_flight.entry(service.clone()).or_default() += 1;
            *state.registers.entry(service.clone()).or_default() += 1;
        }
        tokio::time::sleep(self.delays.register).await;
        let mut state = self.state.lock().unwrap();
        *state.in_flight.entry(service.clone()).or_default() -= 1;
        if state.refuse_weight.is_some() && state.refuse_weight == instance.weight {
            return Err(Status::invalid_argument(format!(
                "instance.weight: at most {} on this registry",
                instance.effective_weight() - 1
            )));
        }
        state
            .weights
            .insert(service.clone(), instance.effective_weight());
        state.held.insert(service);
        Ok(Response::new(RegisterResponse {
            instance: Some(Instance {
                instance_id: format!("{}:{}", instance.host, instance.port),
                ..instance
            }),
            revision: 1,
        }))
    }

    async fn update(&self, _: Request<UpdateRequest>) -> Result<Response<UpdateResponse>, Status> {
        Err(Status::unimplemented("not used by node-host"))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let service = request.into_inner().service;
        self.state.lock().unwrap().deregistering += 1;
        tokio::time::sleep(self.delays.deregister).await;
        self.state.lock().unwrap().deregistering -= 1;
        if self.state.lock().unwrap().held.remove(&service) {
            Ok(Response::new(DeregisterResponse { revision: 2 }))
        } else {
            Err(Status::not_found(service))
        }
    }

    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Err(Status::unimplemented("not used by node-host"))
    }

    async fn resolve(
        &self,
        _: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        Err(Status::unimplemented("not used by node-host"))
    }

    async fn get_descriptors(
        &self,
        _: Request<GetDescriptorsRequest>,
    ) -> Result<Response<GetDescriptorsResponse>, Status> {
        Err(Status::unimplemented("not used by node-host"))
    }

    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not used by node-host"))
    }
}

fn registrar(registry: SocketAddr) -> Registrar {
    Registrar::spawn(Settings {
        registry: registry.to_string(),
        advertised: "127.0.0.1:7000".parse().unwrap(),
        lease_ttl_ms: None,
        plugins: node_host::plugins::all(),
        connector: Connector::plaintext(),
    })
}

fn weight(weight: u32) -> PluginConfig {
    PluginConfig {
        weight,
        weight_source: WeightSource::Configured,
        metadata: BTreeMap::new(),
        external: None,
    }
}

/// Waits until the fake is in the middle of a Register of `service`.
async fn register_in_flight(fake: &Fake, service: &str) {
    testkit::eventually(WAIT, &format!("a Register of {service} in flight"), || {
        let in_flight = fake.in_flight(service);
        async move { (in_flight > 0).then_some(()) }
    })
    .await;
}

/// A fake registry whose Register is slow, and a registrar that has just
/// asked it to register echo: the Register is on its way.
async fn echo_register_in_flight() -> (Fake, Registrar) {
    let (fake, addr) = Fake::start(Delays {
        register: SLOW,
        ..Delays::default()
    })
    .await;
    let registrar = registrar(addr);
    registrar.upsert("echo", weight(3));
    register_in_flight(&fake, "echo").await;
    (fake, registrar)
}

/// The node's reload removes a plugin it added a moment before, while the
/// Register is still on its way: `remove` must not return (and the node
/// must not stop serving it) before the registry has let go of it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_during_the_register_returns_once_the_registry_let_go() {
    let (fake, registrar) = echo_register_in_flight().await;

    assert!(
        registrar.remove("echo", WAIT).await,
        "removal not confirmed"
    );
    assert_eq!(fake.in_flight("echo"), 0, "remove returned mid-Register");
    assert!(
        !fake.holds("echo"),
        "remove returned, the registry holds echo"
    );
    assert!(registrar.registered().is_empty());
    // And it stays so: nothing was left to land later.
    tokio::time::sleep(SLOW).await;
    assert!(!fake.holds("echo"));
    assert_eq!(fake.registers("echo"), 1);
}

/// `u` while a Register is in flight: same race, every plugin at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_during_the_register_returns_once_nothing_is_held() {
    let (fake, registrar) = echo_register_in_flight().await;

    assert!(registrar.pause(WAIT).await, "pause not confirmed");
    assert_eq!(fake.in_flight("echo"), 0, "pause returned mid-Register");
    assert!(
        !fake.holds("echo"),
        "pause returned, the registry holds echo"
    );

    // `r` brings it back, and says so only once it is there.
    assert!(registrar.resume(WAIT).await, "resume not confirmed");
    assert!(fake.holds("echo"));
}

/// A removal while the session is still starting (here: a slow
/// GrantLease) needs no call: it is confirmed at once, and the session
/// then registers only what is still wanted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_before_the_lease_is_granted_is_confirmed_at_once() {
    let (fake, addr) = Fake::start(Delays {
        grant: Duration::from_millis(1500),
        ..Delays::default()
    })
    .await;
    let registrar = registrar(addr);
    registrar.upsert("echo", weight(3));
    registrar.upsert("calculator", weight(5));
    // Well within the GrantLease delay.
    assert!(
        registrar.remove("echo", Duration::from_millis(700)).await,
        "removal before any registration not confirmed"
    );
    assert!(
        registrar
            .wait_until(WAIT, |r| r.contains_key("calculator"))
            .await,
        "calculator never registered"
    );
    assert!(fake.holds("calculator"));
    assert!(!fake.holds("echo"));
    assert_eq!(fake.registers("echo"), 0, "a removed plugin was registered");
}

/// Two reloads at once (the watcher's, and the one at start) while a third
/// holds the configuration (a removal waiting for a slow Deregister): they
/// must apply one after the other, the second from the first's result, not
/// both from the same old one. Else each draws its own random weight for a
/// plugin that names none, and the registry sees the weight flap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_apply_one_after_the_other() {
    let (fake, addr) = Fake::start(Delays {
        deregister: SLOW,
        ..Delays::default()
    })
    .await;
    let (node, _routes) = Node::build(
        node_host::plugins::all(),
        "127.0.0.1:7000".parse().unwrap(),
        node_host::node::Registry {
            addr: addr.to_string(),
            lease_ttl_ms: None,
            connector: Connector::plaintext(),
        },
        FixedByFlags::default(),
    )
    .await
    .unwrap();
    let dir = testkit::TempDir::new("slow-registry-reload");
    let path = Arc::new(dir.path().join("services.toml"));
    let known = Arc::new(node_host::plugins::names());
    let reload = |node: &Arc<Node>| {
        let (node, path, known) = (node.clone(), path.clone(), known.clone());
        tokio::spawn(async move { node_host::reload::reload(&path, &node, &known).await })
    };

    std::fs::write(&*path, "[plugins.echo]\nweight = 3\n").unwrap();
    reload(&node).await.unwrap();
    assert!(
        node.registrar()
            .wait_until(WAIT, |r| r.contains_key("echo"))
            .await
    );

    // Removing echo holds the configuration while Deregister is slow.
    std::fs::write(&*path, "").unwrap();
    let removing = reload(&node);
    testkit::eventually(WAIT, "a Deregister in flight", || {
        let busy = fake.state.lock().unwrap().deregistering > 0;
        async move { busy.then_some(()) }
    })
    .await;
    let before = node.registrar().desired().generation;
    // Meanwhile the file gains both plugins, neither with a weight, and two
    // reloads queue up behind the first.
    std::fs::write(&*path, "[plugins.calculator]\n[plugins.echo]\n").unwrap();
    let first = reload(&node);
    let second = reload(&node);
    for handle in [removing, first, second] {
        handle.await.unwrap();
    }

    let config = node.config().await;
    let want = config.plugins.clone();
    assert_eq!(want.len(), 2);
    assert!(
        node.registrar()
            .wait_until(WAIT, |r| node_host::registration::registered_matches(
                r, &want
            ))
            .await,
        "the registry does not hold the configuration in force"
    );
    // Two changes asked of the registration task: the two additions, each
    // with its one drawn weight. The second reload found the file as the
    // first left it and changed nothing (not a weight drawn anew).
    assert_eq!(node.registrar().desired().plugins, want);
    assert_eq!(
        node.registrar().desired().generation - before,
        2,
        "a reload re-weighted what the previous one added"
    );
    assert!(fake.registers("calculator") >= 1);
}

/// A registry with tighter limits than the node knows refuses an update:
/// the node keeps the settings it accepted before registered, reports the
/// new ones as not registered, and registers the accepted ones again after
/// the registry restarts (not the refused ones, and not nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_keeps_the_last_accepted_settings_across_a_restart() {
    let (fake, addr) = Fake::start(Delays::default()).await;
    fake.state.lock().unwrap().refuse_weight = Some(3);
    let registrar = registrar(addr);
    registrar.upsert("calculator", weight(7));
    assert!(
        registrar
            .wait_until(WAIT, |r| r.get("calculator") == Some(&weight(7)))
            .await
    );

    registrar.upsert("calculator", weight(3));
    let want = registrar.desired().plugins;
    assert!(
        !registrar
            .wait_until(Duration::from_millis(500), |r| {
                node_host::registration::registered_matches(r, &want)
            })
            .await,
        "a refused update is not reported as registered"
    );
    assert_eq!(registrar.registered().get("calculator"), Some(&weight(7)));
    assert_eq!(fake.weight("calculator"), Some(7));

    // The registry restarts, losing everything: 7 comes back, 3 is tried
    // once more (its limits may have changed) and refused again.
    let registers = fake.registers("calculator");
    fake.restart.notify_waiters();
    testkit::eventually(WAIT, "calculator registered again", || {
        let (weight, registers_now) = (fake.weight("calculator"), fake.registers("calculator"));
        async move { (weight == Some(7) && registers_now > registers).then_some(()) }
    })
    .await;
    assert_eq!(registrar.registered().get("calculator"), Some(&weight(7)));
    registrar.shutdown(WAIT).await;
}
