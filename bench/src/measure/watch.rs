//! Measure 3: Watch propagation: the time from a change sent to the server to its
//! arrival at each of 1, 100, 1000 and 10 000 watchers of the service (etcd:
//! watches on the service's prefix; r-nacos: subscriptions, whose pushes a
//! connection hands to each of its watchers).
//!
//! The clock starts when the writer sends the change, so each sample also
//! holds the write itself (for etcd that includes its raft commit): the
//! bench cannot see the instant the server accepts it. Changes are sent one
//! at a time, the next only after every watcher got the previous one.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Ctx, of};
use crate::backend::{Backend, Change, System};
use crate::report::{Better, Figure};
use crate::stats::Summary;

/// Watchers share connections like real clients in few processes would;
/// one connection per watcher would measure the kernel more than the server.
/// At most [`WATCHERS_PER_CONNECTION`] each, so 10 000 watchers take 100
/// connections (HTTP/2 servers allow about 200 streams per connection).
const MAX_CONNECTIONS: usize = 50;
const WATCHERS_PER_CONNECTION: usize = 100;

async fn level(system: System, url: &str, watchers: usize, changes: usize) -> Result<Summary> {
    let service = format!("bench-watch-{watchers}");
    let mut conns = Vec::new();
    let connections = watchers
        .clamp(1, MAX_CONNECTIONS)
        .max(watchers.div_ceil(WATCHERS_PER_CONNECTION));
    for _ in 0..connections {
        conns.push(Backend::connect(system, url).await?);
    }
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut tasks = JoinSet::new();
    for w in 0..watchers {
        let mut conn = conns[w % conns.len()].clone();
        let service = service.clone();
        let ready_tx = ready_tx.clone();
        let seen_tx = seen_tx.clone();
        tasks.spawn(async move {
            let mut stream = match conn.watch(Some(&service)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("watch failed: {e:#}");
                    return;
                }
            };
            while let Some(Ok(batch)) = stream.next().await {
                let now = Instant::now();
                if batch.ready {
                    let _ = ready_tx.send(());
                }
                for change in batch.changes {
                    if let Change::Put(id) = change
                        && let Some(k) = id.strip_prefix("w-").and_then(|k| k.parse().ok())
                    {
                        let _ = seen_tx.send((k, now));
                    }
                }
            }
        });
    }
    drop(ready_tx);
    let wait = Duration::from_secs(30);
    for n in 0..watchers {
        tokio::time::timeout(wait, ready_rx.recv())
            .await
            .ok()
            .flatten()
            .with_context(|| format!("only {n} of {watchers} watchers started"))?;
    }

    let mut writer = Backend::connect(system, url).await?;
    let lease = writer.grant(Duration::from_secs(120)).await?;
    let mut samples = Vec::with_capacity(watchers * changes);
    for k in 0..changes {
        let sent = Instant::now();
        writer.register(&lease, &service, &format!("w-{k}")).await?;
        let mut arrived = 0;
        while arrived < watchers {
            let (got, at) = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
                .await
                .ok()
                .flatten()
                .with_context(|| format!("change {k} reached {arrived} of {watchers} watchers"))?;
            if got == k {
                arrived += 1;
                samples.push(at.saturating_duration_since(sent));
            }
        }
    }
    tasks.abort_all();
    writer.revoke(&lease).await?;
    match Summary::of(&mut samples) {
        Some(s) => Ok(s),
        None => bail!("no change was timed"),
    }
}

/// KeepAlive round trips idle and under watch load, on every system.
async fn heartbeats(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let size = super::heartbeat::Size::new(ctx.cfg.quick);
    let mut results = Vec::new();
    // A lease kept alive by a stream: ours and etcd's (r-nacos has none).
    for (system, url) in ctx
        .systems()
        .into_iter()
        .filter(|(s, _)| matches!(s, System::Ours | System::Etcd))
    {
        tracing::info!(
            "watch: heartbeats of {} under {} watchers",
            system.name(),
            size.watchers
        );
        results.push((system, super::heartbeat::measure(system, &url, size).await?));
    }
    let pick = |system: System, loaded: bool, stat: fn(Summary) -> f64| {
        results
            .iter()
            .find(|(s, _)| *s == system)
            .map(|(_, h)| stat(if loaded { h.loaded } else { h.idle }))
    };
    for (loaded, what) in [
        (false, "idle".to_string()),
        (
            true,
            format!("under {} watchers + snapshots", size.watchers),
        ),
    ] {
        for (label, stat) in [
            ("p50", (|s: Summary| s.p50_ms) as fn(Summary) -> f64),
            ("p99", |s: Summary| s.p99_ms),
            ("max", |s: Summary| s.max_ms),
        ] {
            let mut f = Figure::new(
                "watch",
                format!("KeepAlive round trip {label}, {what}"),
                "ms",
                Better::Lower,
                pick(System::Ours, loaded, stat),
            )
            .vs("etcd", pick(System::Etcd, loaded, stat));
            if loaded {
                f = f.note(format!(
                    "{} heartbeats, {} instances; a writer changing them, 8 clients taking full snapshots in a loop",
                    size.heartbeats, size.instances
                ));
            }
            figures.push(f);
        }
    }
    Ok(())
}

/// Runs every watcher level on every system.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &watchers in &ctx.cfg.watchers {
        let mut results = Vec::new();
        for (system, url) in ctx.systems() {
            tracing::info!("watch: {} with {watchers} watchers", system.name());
            let s = level(system, &url, watchers, ctx.cfg.watch_changes).await?;
            results.push((system, s));
        }
        let ours = of(&results, System::Ours);
        let etcd = of(&results, System::Etcd);
        let store = of(&results, System::EtcdStore);
        let rnacos = of(&results, System::Rnacos);
        let name = |p: &str| {
            format!(
                "{p}, {watchers} watcher{}",
                if watchers == 1 { "" } else { "s" }
            )
        };
        for (label, pick) in [
            ("p50", (|s: Summary| s.p50_ms) as fn(Summary) -> f64),
            ("p99", |s: Summary| s.p99_ms),
            ("max", |s: Summary| s.max_ms),
        ] {
            let f = Figure::new("watch", name(label), "ms", Better::Lower, ours.map(pick))
                .vs("etcd", etcd.map(pick));
            let f = ctx.etcd_store_column(f, store.map(pick));
            let mut f = ctx.rnacos_column(f, rnacos.map(pick));
            if label == "p99" && watchers >= 10_000 {
                f = f.target("< 50 ms", ours.map(|s| s.p99_ms < 50.0));
            } else if label == "p99" && watchers >= 1000 {
                f = f.target("< 10 ms", ours.map(|s| s.p99_ms < 10.0));
            }
            if (label == "p50" || label == "p99") && (100..10_000).contains(&watchers) {
                let ratio = ours.zip(etcd).map(|(o, e)| pick(o) <= 0.7 * pick(e));
                f = f.target("<= 0.7x etcd", ratio);
            }
            if label == "max" {
                f = f.note(format!(
                    "{} changes x {watchers} watchers",
                    ctx.cfg.watch_changes
                ));
            }
            figures.push(f);
        }
    }
    heartbeats(ctx, &mut figures).await?;
    // The same change reaching an xDS client (an ADS stream subscribed to
    // the service's endpoints), beside the Watch figure of one watcher.
    tracing::info!("watch: xDS, 1 client");
    let xds = super::xds::propagation(&ctx.ours.url, ctx.cfg.watch_changes).await?;
    let watch = |label: &str| {
        figures
            .iter()
            .find(|f| f.group == "watch" && f.name == format!("{label}, 1 watcher"))
            .and_then(|f| f.ours)
    };
    let (watch_p50, watch_p99) = (watch("p50"), watch("p99"));
    for (label, ours, reference) in [
        ("p50", xds.p50_ms, watch_p50),
        ("p99", xds.p99_ms, watch_p99),
    ] {
        let f = Figure::new(
            "watch",
            format!("xDS push {label}, 1 ADS client"),
            "ms",
            Better::Lower,
            Some(ours),
        )
        .vs("our Watch, 1 watcher", reference)
        .note(format!(
            "registration to its ClusterLoadAssignment at an ADS stream; {} changes",
            ctx.cfg.watch_changes
        ));
        figures.push(ctx.rnacos_none(f, "it serves no xDS"));
    }
    Ok(figures)
}
