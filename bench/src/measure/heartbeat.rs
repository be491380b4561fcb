//! Heartbeats under watch load (part of measure 3): the round trip of one
//! node's KeepAlive (a heartbeat sent on its stream to the response for it)
//! with the server idle, then while [`WATCHERS`] watchers of every service
//! follow a stream of changes and new watchers keep taking full snapshots.
//! A node's lease must never expire because of other clients' load; this
//! shows how much of its TTL that load costs it. etcd: LeaseKeepAlive under
//! the same load of prefix watches and range reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use registry_proto::registry::v1::KeepAliveRequest;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::backend::{Backend, Lease, System};
use crate::etcdpb::LeaseKeepAliveRequest;
use crate::stats::Summary;

/// Watchers of every service that follow the changes (over
/// [`CONNECTIONS`] connections), in a full run.
pub const WATCHERS: usize = 1000;
const CONNECTIONS: usize = 10;
/// Services the instances are spread over.
const SERVICES: usize = 100;
/// Clients that open a watcher of everything, take its snapshot and drop
/// it, over and over.
const SNAPSHOTTERS: usize = 8;
/// One heartbeat every this long.
const INTERVAL: Duration = Duration::from_millis(10);

/// How much load: a full run, or a `--quick` one.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Watchers following the changes.
    pub watchers: usize,
    /// Instances in the state (so a snapshot is some work).
    pub instances: usize,
    /// Heartbeats timed in each phase.
    pub heartbeats: usize,
}

impl Size {
    pub fn new(quick: bool) -> Size {
        if quick {
            Size {
                watchers: 50,
                instances: 500,
                heartbeats: 20,
            }
        } else {
            Size {
                watchers: WATCHERS,
                instances: 2000,
                heartbeats: 150,
            }
        }
    }
}

/// Heartbeat round trips idle, then under load.
pub struct Heartbeats {
    pub idle: Summary,
    pub loaded: Summary,
}

/// One node's lease and its keep-alive stream.
enum KeepAlive {
    Ours {
        tx: mpsc::Sender<KeepAliveRequest>,
        rx: tonic::Streaming<registry_proto::registry::v1::KeepAliveResponse>,
        request: KeepAliveRequest,
    },
    Etcd {
        tx: mpsc::Sender<LeaseKeepAliveRequest>,
        rx: tonic::Streaming<crate::etcdpb::LeaseKeepAliveResponse>,
        id: i64,
    },
}

impl KeepAlive {
    /// Opens the stream with a first heartbeat (etcd sends its response
    /// headers only with its first response) and takes its response.
    async fn open(backend: &mut Backend, lease: &Lease) -> Result<KeepAlive> {
        let mut opened = match backend {
            Backend::Ours(c, _) => {
                let request = KeepAliveRequest {
                    lease_id: lease.id as u64,
                    lease_secret: lease.secret.clone(),
                };
                let (tx, rx) = mpsc::channel(1);
                tx.send(request.clone()).await?;
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                let rx = c.keep_alive(stream).await?.into_inner();
                KeepAlive::Ours { tx, rx, request }
            }
            Backend::Etcd { lease: client, .. } => {
                let (tx, rx) = mpsc::channel(1);
                tx.send(LeaseKeepAliveRequest { id: lease.id }).await?;
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                let rx = client.lease_keep_alive(stream).await?.into_inner();
                KeepAlive::Etcd {
                    tx,
                    rx,
                    id: lease.id,
                }
            }
            Backend::Rnacos(_) => bail!("r-nacos has no lease keep-alive stream"),
        };
        match &mut opened {
            KeepAlive::Ours { rx, .. } => {
                rx.message().await?.context("KeepAlive ended")?;
            }
            KeepAlive::Etcd { rx, .. } => {
                rx.message().await?.context("LeaseKeepAlive ended")?;
            }
        }
        Ok(opened)
    }

    /// One heartbeat, timed to its response.
    async fn beat(&mut self) -> Result<Duration> {
        let sent = Instant::now();
        match self {
            KeepAlive::Ours { tx, rx, request } => {
                tx.send(request.clone()).await?;
                rx.message().await?.context("KeepAlive ended")?;
            }
            KeepAlive::Etcd { tx, rx, id } => {
                tx.send(LeaseKeepAliveRequest { id: *id }).await?;
                let r = rx.message().await?.context("LeaseKeepAlive ended")?;
                if r.ttl <= 0 {
                    bail!("etcd says the lease is gone");
                }
            }
        }
        Ok(sent.elapsed())
    }

    async fn phase(&mut self, heartbeats: usize) -> Result<Summary> {
        let mut samples = Vec::with_capacity(heartbeats);
        for _ in 0..heartbeats {
            samples.push(self.beat().await?);
            tokio::time::sleep(INTERVAL).await;
        }
        Summary::of(&mut samples).context("no heartbeat timed")
    }
}

/// Fills the state, times heartbeats idle, then under load.
pub async fn measure(system: System, url: &str, size: Size) -> Result<Heartbeats> {
    let Size {
        watchers,
        instances,
        heartbeats,
    } = size;
    let mut loader = Backend::connect(system, url).await?;
    let lease = loader.grant(Duration::from_secs(300)).await?;
    let mut fill = JoinSet::new();
    for part in 0..16 {
        let (mut c, lease) = (loader.clone(), lease.clone());
        fill.spawn(async move {
            for i in (part..instances).step_by(16) {
                c.register(&lease, &format!("hb-{}", i % SERVICES), &format!("i-{i}"))
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = fill.join_next().await {
        r??;
    }

    // The node: its own connection on its own thread and runtime, as a
    // node host is its own process: the bench's 1000 watchers decoding
    // their streams must not delay its heartbeats in the bench's queue.
    let (idle_tx, idle_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let node_url = url.to_string();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = idle_tx.send(Err(anyhow::Error::from(e)));
                return;
            }
        };
        runtime.block_on(async move {
            let opened = async {
                let mut node = Backend::connect(system, &node_url).await?;
                let node_lease = node.grant(Duration::from_secs(10)).await?;
                let keep_alive = KeepAlive::open(&mut node, &node_lease).await?;
                Ok::<_, anyhow::Error>((node, keep_alive))
            };
            let (_node, mut keep_alive) = match opened.await {
                Ok(o) => o,
                Err(e) => {
                    let _ = idle_tx.send(Err(e));
                    return;
                }
            };
            let _ = idle_tx.send(keep_alive.phase(heartbeats).await);
            if go_rx.await.is_ok() {
                let _ = done_tx.send(keep_alive.phase(heartbeats).await);
            }
        });
    });
    let idle = idle_rx.await.context("the node thread died")??;

    let stop = Arc::new(AtomicBool::new(false));
    let mut load: JoinSet<Result<()>> = JoinSet::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(Backend::connect(system, url).await?);
    }
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    for w in 0..watchers {
        let mut conn = conns[w % CONNECTIONS].clone();
        let ready_tx = ready_tx.clone();
        load.spawn(async move {
            let mut stream = conn.watch(None).await?;
            while let Some(batch) = stream.next().await {
                if batch?.ready {
                    let _ = ready_tx.send(());
                }
            }
            Ok(())
        });
    }
    drop(ready_tx);
    for n in 0..watchers {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .ok()
            .flatten()
            .with_context(|| format!("only {n} of {watchers} watchers started"))?;
    }
    // Changes for every watcher, as fast as one writer goes.
    {
        let (mut c, lease, stop) = (loader.clone(), lease.clone(), stop.clone());
        load.spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                c.register(&lease, &format!("hb-{}", n % SERVICES), &format!("i-{n}"))
                    .await?;
                n = (n + 1) % instances;
            }
            Ok(())
        });
    }
    // Full snapshots, over and over (etcd: range reads of everything).
    for _ in 0..SNAPSHOTTERS {
        let (mut c, stop) = (Backend::connect(system, url).await?, stop.clone());
        load.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match &mut c {
                    Backend::Ours(..) => {
                        let mut stream = c.watch(None).await?;
                        while let Some(batch) = stream.next().await {
                            if batch?.ready {
                                break;
                            }
                        }
                    }
                    Backend::Etcd { kv, .. } => {
                        crate::backend::range(kv, None).await?;
                    }
                    Backend::Rnacos(_) => bail!("not measured on r-nacos"),
                }
            }
            Ok(())
        });
    }
    let _ = go_tx.send(());
    let loaded = match done_rx.await {
        Ok(loaded) => loaded,
        Err(_) => Err(anyhow::anyhow!("the node thread died")),
    };
    stop.store(true, Ordering::Relaxed);
    load.abort_all();
    while let Some(r) = load.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!("heartbeat load: {e:#}");
        }
    }
    let _ = loader.revoke(&lease).await;
    Ok(Heartbeats {
        idle,
        loaded: loaded?,
    })
}
