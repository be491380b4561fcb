//! Measure 6: Scale: 100 000 instances in 1 000 services, in a fresh registry (and a
//! fresh etcd), then:
//!
//! - memory per instance: growth of the server's resident memory (VmRSS)
//!   from empty to loaded, divided by the instances, next to the size of one
//!   instance's encoded payload;
//! - snapshot: how long a new watcher of every service waits for the full
//!   state (ours: the reset message of Watch; etcd sends no snapshot on a
//!   watch, so its equivalent is a range read of the whole prefix; Nacos
//!   subscribes to one service at a time, so its equivalent is a
//!   subscription to each service, [`SUBSCRIBE_IN_FLIGHT`] at a time, on one
//!   connection);
//! - resolve latency of one service (100 instances) at that size;
//! - ours only, on a second registry that serves `/metrics` (loaded with
//!   up to 100 000 instances): how long new watchers hold writers back. A
//!   writer re-registers one instance in a loop while new watchers of every
//!   service open one after another (each until its first message): its
//!   worst latency then, next to its worst latency with no watcher opening;
//!   and the longest a new watcher held the store's lock, as the registry
//!   itself timed it (`registry_watch_open_lock_max_seconds`), which is
//!   what writers wait for, without the wait for a free runtime thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use prost::Message;

use super::{Ctx, closed_loop, of};
use crate::Config;
use crate::backend::{self, Backend, System};
use crate::procs::{EtcdProc, NO_LIMITS, RegistryProc, RnacosProc, rss_bytes};
use crate::report::{Better, Figure};
use crate::stats::Summary;

/// Leases outlive the measure without heartbeats (our registry's default
/// maximum TTL is 300 s).
const LEASE_TTL: Duration = Duration::from_secs(300);
/// Concurrent registering clients.
const LOADERS: usize = 64;
/// Subscriptions a new r-nacos subscriber of every service has in flight.
const SUBSCRIBE_IN_FLIGHT: usize = 64;

/// Figures of one system.
#[derive(Clone, Copy)]
struct Scale {
    load_per_sec: f64,
    bytes_per_instance: f64,
    /// The same, [`SETTLE`] later.
    settled_bytes_per_instance: f64,
    snapshot_ms: f64,
    resolve: Option<Summary>,
    /// Writer latency max (ms) with no watcher opening, then while new
    /// watchers open (ours only).
    writer: Option<(f64, f64)>,
    /// The longest a new watcher held the store's lock, in ms (ours only).
    lock_ms: Option<f64>,
}

/// How long after the load the memory figure is read again.
const SETTLE: Duration = Duration::from_secs(3);

/// New watchers of everything opened while the writer runs.
const NEW_WATCHERS: usize = 20;

/// A writer's latencies (ms) while `during` runs.
async fn writer_latencies<F: std::future::Future<Output = Result<()>>>(
    url: &str,
    service: &'static str,
    during: F,
) -> Result<Vec<f64>> {
    let mut writer = Backend::connect(System::Ours, url).await?;
    let lease = writer.grant(LEASE_TTL).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut latencies = Vec::new();
        let mut n = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            // Alternating ids: every call is a real change, published.
            writer
                .register(&lease, service, &format!("w-{}", n % 2))
                .await?;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            n += 1;
        }
        Ok::<_, anyhow::Error>(latencies)
    });
    let outcome = during.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let latencies = task.await.context("the writer panicked")??;
    outcome?;
    Ok(latencies)
}

/// The writer's worst latency with nothing else going on, then while
/// [`NEW_WATCHERS`] new watchers of everything open one after another.
async fn writer_blocking(url: &str) -> Result<(f64, f64)> {
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let quiet = writer_latencies(url, "bench-writer-quiet", async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    })
    .await?;
    let url_owned = url.to_string();
    let busy = writer_latencies(url, "bench-writer-busy", async move {
        let Backend::Ours(mut client, _) = Backend::connect(System::Ours, &url_owned).await? else {
            bail!("not our registry");
        };
        for _ in 0..NEW_WATCHERS {
            let mut stream = client
                .watch(registry_proto::registry::v1::WatchRequest::default())
                .await?
                .into_inner();
            stream.message().await?.context("no snapshot")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await?;
    Ok((max(&quiet), max(&busy)))
}

/// The name of service number `s` of a load.
pub fn service_name(s: usize) -> String {
    format!("svc-{s:04}")
}

/// Loads `total` instances in `services` services, [`LOADERS`] clients
/// at a time; returns the rate (instances per second) and the loaders'
/// connections (r-nacos's instances live only as long as those).
async fn load(
    system: System,
    url: &str,
    services: usize,
    total: usize,
) -> Result<(f64, Vec<Backend>)> {
    let start = Instant::now();
    let held = load_services(system, url, LOADERS, services, total).await?;
    Ok((total as f64 / start.elapsed().as_secs_f64(), held))
}

/// Registers `total` instances in `services` services ([`service_name`],
/// instances `inst-NNN`) from `clients` connections, and returns those
/// connections (r-nacos's instances live only as long as them). Also the
/// load of the profiling helper's snapshot loop.
pub async fn load_services(
    system: System,
    url: &str,
    clients: usize,
    services: usize,
    total: usize,
) -> Result<Vec<Backend>> {
    let per_service = total.div_ceil(services);
    // One lease per service; loaders take services round robin.
    let mut loaders = Vec::new();
    for _ in 0..clients.min(services) {
        loaders.push(Backend::connect(system, url).await?);
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Each loader handles whole services: it grabs the next service number,
    // grants its lease, registers its instances one after another.
    let mut tasks = tokio::task::JoinSet::new();
    for mut b in loaders {
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let s = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if s >= services {
                    return Ok::<Backend, anyhow::Error>(b);
                }
                let lease = b.grant(LEASE_TTL).await?;
                let name = service_name(s);
                for i in 0..per_service {
                    if s * per_service + i >= total {
                        break;
                    }
                    b.register(&lease, &name, &format!("inst-{i:03}")).await?;
                }
            }
        });
    }
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        held.push(r.context("a loader panicked")??);
    }
    Ok(held)
}

async fn measure(system: System, url: &str, pid: u32, cfg: &Config) -> Result<Scale> {
    let services = cfg.scale_services;
    let total = cfg.scale_instances;
    // Settle: one connection open and used, so its buffers are in the
    // baseline rather than counted against the instances.
    let mut probe = Backend::connect(system, url).await?;
    probe.resolve("nothing").await?;
    let before = rss_bytes(pid)?;
    // Held to the end of the measure.
    let (load_per_sec, _held) = load(system, url, services, total).await?;
    let after = rss_bytes(pid)?;
    let bytes_per_instance = after.saturating_sub(before) as f64 / total as f64;
    // Again once an allocator's decay of freed pages (jemalloc: 1 s) has
    // passed: memory held, apart from memory freed but not yet returned.
    tokio::time::sleep(SETTLE).await;
    let settled = rss_bytes(pid)?.saturating_sub(before) as f64 / total as f64;

    // Snapshot to a new watcher of everything.
    let mut b = Backend::connect(system, url).await?;
    let t0 = Instant::now();
    let got = match (&mut b, system) {
        (Backend::Etcd { kv, .. }, System::Etcd) => backend::range(kv, None).await?.len(),
        (Backend::Rnacos(c), System::Rnacos) => {
            let all: Vec<String> = (0..services).map(service_name).collect();
            c.subscribe_each(&all, SUBSCRIBE_IN_FLIGHT).await?
        }
        _ => b.snapshot_size().await?,
    };
    let snapshot_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if got != total {
        bail!("the snapshot held {got} instances, expected {total}");
    }

    // Resolve latency of one service, one client, at this size.
    let one = vec![Backend::connect(system, url).await?];
    let mut lat = closed_loop(one, cfg.duration, move |mut b, n| async move {
        let name = service_name(n as usize % services);
        let r = b.resolve(&name).await.map(|_| ());
        (b, r)
    })
    .await;
    Ok(Scale {
        load_per_sec,
        bytes_per_instance,
        settled_bytes_per_instance: settled,
        snapshot_ms,
        resolve: Summary::of(&mut lat.latencies),
        writer: None,
        lock_ms: None,
    })
}

/// Instances loaded for the writer-blocking measure: the target
/// is at 100 000.
const BLOCKING_INSTANCES: usize = 100_000;

/// Ours only, on a registry of its own that serves `/metrics` (its
/// dashboard's own watch holds a copy of every instance, so the memory
/// figure is taken on one without it): loads up to [`BLOCKING_INSTANCES`],
/// times a writer while new watchers open, and reads the longest time one
/// new watcher held the store's lock, as the registry timed it
/// (`registry_watch_open_lock_max_seconds`). Returns the writer's maxima
/// (ms) and that lock time (ms).
async fn blocking(ctx: &Ctx) -> Result<((f64, f64), f64)> {
    let registry = testkit::Registry::launch()
        .log("warn")
        .http("127.0.0.1:0")
        // As `RegistryProc::start`: the per-peer and per-lease limits lifted.
        .args(NO_LIMITS)
        .start();
    let url = registry.url();
    let http = registry
        .http
        .context("the registry printed no http address")?;
    let total = ctx.cfg.scale_instances.min(BLOCKING_INSTANCES);
    let (_, _held) = load(System::Ours, &url, ctx.cfg.scale_services, total).await?;
    let writer = writer_blocking(&url).await?;
    let metrics = tokio::task::spawn_blocking(move || testkit::http::get(http, "/metrics", &[]))
        .await
        .context("the /metrics scrape panicked")?;
    let lock_s = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("registry_watch_open_lock_max_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("no registry_watch_open_lock_max_seconds in /metrics")?;
    Ok((writer, lock_s * 1000.0))
}

/// `measure` of a fresh process from `start` in place of the shared one in
/// `shared`, which is stopped meanwhile (two would share the CPU) and
/// started again, by `start`, once the fresh one is gone.
async fn in_place_of<P>(
    shared: &mut Option<P>,
    start: impl AsyncFn() -> Result<P>,
    measure: impl AsyncFnOnce(&P) -> Result<Scale>,
) -> Result<Scale> {
    *shared = None;
    let fresh = start().await?;
    let r = measure(&fresh).await?;
    drop(fresh);
    *shared = Some(start().await?);
    Ok(r)
}

/// Runs the scale measure on fresh processes of both systems.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Figure>> {
    let mut results = Vec::new();
    {
        tracing::info!(
            "scale: ours, {} instances in {} services",
            ctx.cfg.scale_instances,
            ctx.cfg.scale_services
        );
        let fresh = RegistryProc::start()?;
        let mut r = measure(System::Ours, &fresh.url, fresh.process.pid(), &ctx.cfg).await?;
        drop(fresh);
        tracing::info!("scale: ours, new watchers against a writer");
        let (writer, lock_ms) = blocking(ctx).await?;
        r.writer = Some(writer);
        r.lock_ms = Some(lock_ms);
        results.push((System::Ours, r));
    }
    let cfg = &ctx.cfg;
    if let Some(bin) = &ctx.etcd_bin {
        tracing::info!("scale: etcd");
        let data = &ctx.etcd_data;
        let r = in_place_of(
            &mut ctx.etcd,
            async || EtcdProc::start(bin, data).await,
            async |p: &EtcdProc| measure(System::Etcd, &p.url, p.process.pid(), cfg).await,
        )
        .await?;
        results.push((System::Etcd, r));
    }
    if let Some(bin) = &ctx.rnacos_bin {
        tracing::info!("scale: r-nacos");
        let data = &ctx.rnacos_data;
        let r = in_place_of(
            &mut ctx.rnacos,
            async || RnacosProc::start(bin, data).await,
            async |p: &RnacosProc| measure(System::Rnacos, &p.url, p.process.pid(), cfg).await,
        )
        .await?;
        results.push((System::Rnacos, r));
    }
    let ours = of(&results, System::Ours);
    let etcd = of(&results, System::Etcd);
    let rnacos = of(&results, System::Rnacos);
    // The payload is the instance as the registry stores and returns it,
    // output fields (lease id, revision) included, at realistic magnitudes.
    let stored = registry_proto::registry::v1::Instance {
        lease_id: 1 << 40,
        revision: ctx.cfg.scale_instances as u64,
        ..backend::instance(&service_name(0), "inst-000")
    };
    let payload = stored.encoded_len() as f64;
    let n = ctx.cfg.scale_instances;
    let s = ctx.cfg.scale_services;
    let figures = vec![
        Figure::new(
            "scale",
            format!("load {n} instances, {LOADERS} clients"),
            "inst/s",
            Better::Higher,
            ours.map(|r| r.load_per_sec),
        )
        .vs("etcd", etcd.map(|r| r.load_per_sec)),
        Figure::new(
            "scale",
            format!("RSS per instance ({s} services)"),
            "B",
            Better::Lower,
            ours.map(|r| r.bytes_per_instance),
        )
        .vs("etcd", etcd.map(|r| r.bytes_per_instance))
        .target(
            format!("<= payload {payload:.0} B + 200 B"),
            ours.map(|r| r.bytes_per_instance <= payload + 200.0),
        )
        .note(format!("encoded instance: {payload:.0} B")),
        Figure::new(
            "scale",
            format!(
                "settled RSS per instance, {} s after the load",
                SETTLE.as_secs()
            ),
            "B",
            Better::Lower,
            ours.map(|r| r.settled_bytes_per_instance),
        )
        .vs("etcd", etcd.map(|r| r.settled_bytes_per_instance))
        .note("freed memory the allocator had not returned yet is gone by then"),
        Figure::new(
            "scale",
            format!("full snapshot to a new watcher ({n} instances)"),
            "ms",
            Better::Lower,
            ours.map(|r| r.snapshot_ms),
        )
        .vs("etcd", etcd.map(|r| r.snapshot_ms))
        .target(
            if n >= 1_000_000 {
                "< 500 ms"
            } else {
                "< 50 ms"
            },
            ours.map(|r| r.snapshot_ms < if n >= 1_000_000 { 500.0 } else { 50.0 }),
        )
        .note("etcd: range read of the whole prefix"),
        Figure::new(
            "scale",
            "writer latency max, no watcher opening",
            "ms",
            Better::Lower,
            ours.and_then(|r| r.writer).map(|w| w.0),
        ),
        Figure::new(
            "scale",
            format!("writer latency max while {NEW_WATCHERS} new watchers of all open"),
            "ms",
            Better::Lower,
            ours.and_then(|r| r.writer).map(|w| w.1),
        )
        .target(
            "<= quiet max + 1 ms",
            ours.and_then(|r| r.writer).map(|w| w.1 <= w.0 + 1.0),
        ),
        Figure::new(
            "scale",
            format!(
                "store lock held by a new watcher of all, max ({} instances)",
                n.min(BLOCKING_INSTANCES)
            ),
            "ms",
            Better::Lower,
            ours.and_then(|r| r.lock_ms),
        )
        .target("<= 1 ms", ours.and_then(|r| r.lock_ms).map(|ms| ms <= 1.0))
        .note("timed in the registry: registry_watch_open_lock_max_seconds"),
        Figure::new(
            "scale",
            "resolve latency p50",
            "ms",
            Better::Lower,
            ours.and_then(|r| r.resolve).map(|s| s.p50_ms),
        )
        .vs("etcd", etcd.and_then(|r| r.resolve).map(|s| s.p50_ms)),
        Figure::new(
            "scale",
            "resolve latency p99",
            "ms",
            Better::Lower,
            ours.and_then(|r| r.resolve).map(|s| s.p99_ms),
        )
        .vs("etcd", etcd.and_then(|r| r.resolve).map(|s| s.p99_ms)),
    ];
    // r-nacos's column on the figures it has an equivalent of.
    let Some(r) = rnacos else {
        return Ok(figures);
    };
    Ok(figures
        .into_iter()
        .map(|f| {
            let value = match f.name.as_str() {
                name if name.starts_with("load ") => Some(r.load_per_sec),
                name if name.starts_with("RSS per instance") => Some(r.bytes_per_instance),
                name if name.starts_with("full snapshot") => Some(r.snapshot_ms),
                "resolve latency p50" => r.resolve.map(|s| s.p50_ms),
                "resolve latency p99" => r.resolve.map(|s| s.p99_ms),
                _ => return f,
            };
            let f = ctx.rnacos_column(f, value);
            if f.name.starts_with("full snapshot") {
                f.note(format!(
                    "r-nacos: a subscription to each service, {SUBSCRIBE_IN_FLIGHT} in flight"
                ))
            } else {
                f
            }
        })
        .collect())
}
