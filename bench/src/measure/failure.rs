//! Measure 4: Failure detection, timed at a watcher:
//!
//! - kill -9: a node host (ours) or a process holding an etcd lease with
//!   keepalives (etcd's equivalent of a node) is killed; the clock runs from
//!   the signal to the REMOVED (etcd: DELETE) event. Our registry ties a
//!   lease to its KeepAlive stream, so the broken connection revokes it at
//!   once; etcd leases are not tied to a connection, so etcd can only wait
//!   for the TTL. etcd-store: the same node host, registered with our
//!   registry over etcd (whose holding replica revokes the etcd lease when
//!   the stream breaks). r-nacos's equivalent of a node is a child holding a Nacos
//!   connection with an ephemeral instance on it: Nacos too removes a
//!   connection's instances when it breaks, then pushes to subscribers.
//! - lease expiry: a lease is granted with a TTL, an instance registered
//!   under it, and no heartbeat is ever sent; the clock runs from the grant
//!   to the event. Shown as is and as lateness past the granted TTL. Nacos
//!   2.x has no equivalent: its ephemeral instances have no TTL.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{Stream, StreamExt};
use tokio::time::timeout;

use super::{Ctx, of};
use crate::backend::{Backend, Change, Lease, System, WatchBatch, WatchStream};
use crate::procs::{NodeHostProc, RegistryProc};
use crate::report::{Better, Figure};
use crate::stats::{Summary, ms};

/// How long a node host runs after its instance appears before it is killed.
const SETTLE: Duration = Duration::from_millis(250);

/// Reads `stream` until `want` returns true for a change; returns when.
async fn wait_for(
    stream: &mut (impl Stream<Item = Result<WatchBatch>> + Unpin),
    limit: Duration,
    mut want: impl FnMut(&Change) -> bool,
) -> Result<(Instant, Change)> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let batch = tokio::time::timeout_at(deadline, stream.next())
            .await
            .context("timed out waiting for a watch event")?
            .context("the watch stream ended")??;
        let now = Instant::now();
        if let Some(c) = batch.changes.into_iter().find(|c| want(c)) {
            return Ok((now, c));
        }
    }
}

/// A live watch on `service`: returns once the watcher is ready.
async fn watcher(system: System, url: &str, service: &str) -> Result<WatchStream> {
    let mut b = Backend::connect(system, url).await?;
    let mut stream = b.watch(Some(service)).await?;
    loop {
        let batch = timeout(Duration::from_secs(10), stream.next())
            .await
            .context("watch did not start")?
            .context("watch ended at start")??;
        if batch.ready {
            return Ok(stream);
        }
    }
}

/// One kill -9 on our side (memory store or etcd store): node host up,
/// registered, killed.
async fn kill_ours(registry: &RegistryProc) -> Result<Duration> {
    let mut stream = watcher(System::Ours, &registry.url, "calculator").await?;
    let mut node = NodeHostProc::start(&registry.addr)?;
    let (_, added) = wait_for(&mut stream, Duration::from_secs(10), |c| {
        matches!(c, Change::Put(_))
    })
    .await?;
    let Change::Put(id) = added else {
        bail!("unexpected change")
    };
    // A node that has been up for a moment: its KeepAlive stream is attached
    // by now (killing it within a millisecond of registering can beat the
    // attachment, and then only the TTL removes it).
    tokio::time::sleep(SETTLE).await;
    let t0 = Instant::now();
    node.process.kill9();
    let (at, _) = wait_for(&mut stream, Duration::from_secs(30), |c| {
        *c == Change::Removed(id.clone())
    })
    .await?;
    Ok(at - t0)
}

/// One kill -9 of a child of this bench (its hidden `helper` command, with
/// `extra` arguments) holding instance `holder-REPEAT` of `bench-kill` on
/// `system`: from the signal to the removal at a watcher. Also the line
/// the child printed once holding (it contains `holding`).
async fn kill_holder(
    system: System,
    url: &str,
    repeat: usize,
    helper: &str,
    extra: &[&str],
    holding: &str,
) -> Result<(Duration, String)> {
    let service = "bench-kill";
    let id = format!("holder-{repeat}");
    let mut stream = watcher(system, url, service).await?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args([helper, "--url", url, "--service", service, "--id", &id])
        .args(extra);
    let mut holder = testkit::Process::spawn(helper, cmd);
    let line = holder.wait_for_line(holding, Duration::from_secs(20));
    wait_for(&mut stream, Duration::from_secs(10), |c| {
        *c == Change::Put(id.clone())
    })
    .await?;
    let t0 = Instant::now();
    holder.kill9();
    let (at, _) = wait_for(&mut stream, Duration::from_secs(60), |c| {
        *c == Change::Removed(id.clone())
    })
    .await?;
    Ok((at - t0, line))
}

/// One kill -9 on etcd's side: a child holding a lease with keepalives.
/// Also the TTL etcd granted.
async fn kill_etcd(url: &str, repeat: usize) -> Result<(Duration, Duration)> {
    let extra = ["--ttl-s", "1"];
    let (took, line) = kill_holder(
        System::Etcd,
        url,
        repeat,
        "hold-etcd-lease",
        &extra,
        "holding lease",
    )
    .await?;
    let granted = line
        .split("ttl ")
        .nth(1)
        .and_then(|s| s.trim_end_matches('s').trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default();
    Ok((took, granted))
}

/// One kill -9 on r-nacos's side: a child holding a Nacos connection with an
/// ephemeral instance on it.
async fn kill_rnacos(url: &str, repeat: usize) -> Result<Duration> {
    let (took, _) = kill_holder(
        System::Rnacos,
        url,
        repeat,
        "hold-rnacos-instance",
        &[],
        "holding instance",
    )
    .await?;
    Ok(took)
}

/// The hidden `hold-rnacos-instance` helper: opens a Nacos connection,
/// registers an ephemeral instance on it, prints `holding instance <id>` and
/// keeps the connection (answering the server's probes) until killed.
pub async fn hold_rnacos_instance(url: &str, service: &str, id: &str) -> Result<()> {
    let mut b = Backend::connect(System::Rnacos, url).await?;
    let lease = b.grant(Duration::ZERO).await?;
    b.register(&lease, service, id).await?;
    println!("holding instance {id}");
    std::future::pending::<()>().await;
    drop(b);
    Ok(())
}

/// One lease expiry: grant, register, never heartbeat.
async fn expiry(
    system: System,
    url: &str,
    ttl: Duration,
    repeat: usize,
) -> Result<(Duration, Lease)> {
    let service = "bench-expiry";
    let id = format!("e-{repeat}");
    let mut stream = watcher(system, url, service).await?;
    let mut b = Backend::connect(system, url).await?;
    let t0 = Instant::now();
    let lease = b.grant(ttl).await?;
    b.register(&lease, service, &id).await?;
    let (at, _) = wait_for(&mut stream, lease.ttl + Duration::from_secs(30), |c| {
        *c == Change::Removed(id.clone())
    })
    .await?;
    Ok((at - t0, lease))
}

/// The hidden `hold-etcd-lease` helper: grants a lease, registers under it,
/// keeps it alive every TTL/3, and prints `holding lease <id> ttl <n>s`.
pub async fn hold_etcd_lease(url: &str, service: &str, id: &str, ttl_s: u64) -> Result<()> {
    use crate::etcdpb::{LeaseKeepAliveRequest, lease_client::LeaseClient};
    let mut b = Backend::connect(System::Etcd, url).await?;
    let lease = b.grant(Duration::from_secs(ttl_s)).await?;
    b.register(&lease, service, id).await?;
    let mut client = LeaseClient::connect(url.to_string()).await?;
    let lease_id = lease.id;
    let every = (lease.ttl / 3).max(Duration::from_millis(100));
    let beats = futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(every).await;
        Some((LeaseKeepAliveRequest { id: lease_id }, ()))
    });
    let first = futures::stream::once(async move { LeaseKeepAliveRequest { id: lease_id } });
    let mut replies = client
        .lease_keep_alive(first.chain(beats))
        .await?
        .into_inner();
    println!("holding lease {lease_id} ttl {}s", lease.ttl.as_secs());
    while replies.message().await?.is_some() {}
    Ok(())
}

fn summary_of(samples: &mut [Duration]) -> Option<Summary> {
    Summary::of(samples)
}

/// Runs both failure measures.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Figure>> {
    let repeats = ctx.cfg.repeats;
    let mut figures = Vec::new();

    // kill -9
    let mut ours = Vec::new();
    for r in 0..repeats {
        tracing::info!("failure: kill -9 of a node host ({}/{repeats})", r + 1);
        ours.push(kill_ours(&ctx.ours).await?);
    }
    let mut store = Vec::new();
    if let Some(registry) = &ctx.etcd_store {
        for r in 0..repeats {
            tracing::info!(
                "failure: kill -9 of a node host of the registry over etcd ({}/{repeats})",
                r + 1
            );
            store.push(kill_ours(registry).await?);
        }
    }
    let mut etcd = Vec::new();
    let mut etcd_ttl = Duration::ZERO;
    if let Some(e) = &ctx.etcd {
        for r in 0..repeats {
            tracing::info!(
                "failure: kill -9 of an etcd lease holder ({}/{repeats})",
                r + 1
            );
            let (d, ttl) = kill_etcd(&e.url, r).await?;
            etcd.push(d);
            etcd_ttl = ttl;
        }
    }
    let mut rnacos = Vec::new();
    if let Some(r) = &ctx.rnacos {
        for n in 0..repeats {
            tracing::info!(
                "failure: kill -9 of an r-nacos connection holder ({}/{repeats})",
                n + 1
            );
            rnacos.push(kill_rnacos(&r.url, n).await?);
        }
    }
    let runs = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut each = format!("ours, each run (ms): {}", runs(&ours));
    if ctx.etcd_store.is_some() {
        each.push_str(&format!("; etcd-store: {}", runs(&store)));
    }
    if ctx.rnacos.is_some() {
        each.push_str(&format!("; r-nacos: {}", runs(&rnacos)));
    }
    let ours_s = summary_of(&mut ours);
    let etcd_s = summary_of(&mut etcd);
    let store_s = summary_of(&mut store);
    let rnacos_s = summary_of(&mut rnacos);
    let summary = |system| match system {
        System::Ours => ours_s,
        System::Etcd => etcd_s,
        System::EtcdStore => store_s,
        System::Rnacos => rnacos_s,
    };
    figures.push(
        ctx.figure(
            "failure",
            "kill -9 to REMOVED, median",
            "ms",
            Better::Lower,
            |system| summary(system).map(|s| s.p50_ms),
        )
        .note(if ctx.etcd.is_some() {
            format!(
                "{repeats} runs, killed {} ms after ADDED; etcd holder lease TTL {} s \
                 (keepalive every TTL/3)",
                SETTLE.as_millis(),
                etcd_ttl.as_secs()
            )
        } else {
            format!(
                "{repeats} runs, killed {} ms after ADDED",
                SETTLE.as_millis()
            )
        })
        .note(if ctx.rnacos.is_some() {
            "r-nacos holder killed as soon as its instance was seen"
        } else {
            ""
        }),
    );
    figures.push(
        ctx.figure(
            "failure",
            "kill -9 to REMOVED, max",
            "ms",
            Better::Lower,
            |system| summary(system).map(|s| s.max_ms),
        )
        .target("< 100 ms", ours_s.map(|s| s.max_ms < 100.0))
        .note(each),
    );

    // lease expiry; Nacos 2.x instances have no TTL to expire.
    let mut results = Vec::new();
    let with_ttl = ctx
        .systems()
        .into_iter()
        .filter(|(s, _)| *s != System::Rnacos);
    for (system, url) in with_ttl {
        let mut took = Vec::new();
        let mut late = Vec::new();
        let mut granted = Duration::ZERO;
        for r in 0..repeats {
            tracing::info!(
                "failure: lease expiry on {} ({}/{repeats})",
                system.name(),
                r + 1
            );
            let (d, lease) = expiry(system, &url, ctx.cfg.expiry_ttl, r).await?;
            granted = lease.ttl;
            took.push(d);
            late.push(d.saturating_sub(lease.ttl));
        }
        results.push((
            system,
            (summary_of(&mut took), summary_of(&mut late), granted),
        ));
    }
    let ours = of(&results, System::Ours);
    let etcd = of(&results, System::Etcd);
    let store = of(&results, System::EtcdStore);
    let ttl_note = |x: Option<(Option<Summary>, Option<Summary>, Duration)>| {
        x.map(|(_, _, t)| format!("{:.0} ms", ms(t)))
            .unwrap_or_else(|| "-".into())
    };
    let asked = format!(
        "asked TTL {} ms; granted: ours {}, etcd {}{}",
        ctx.cfg.expiry_ttl.as_millis(),
        ttl_note(ours),
        ttl_note(etcd),
        if ctx.etcd_store.is_some() {
            format!(", etcd-store {}", ttl_note(store))
        } else {
            String::new()
        }
    );
    let no_ttl = "its ephemeral instances have no TTL: they live as long as their \
                  connection, which it probes after 15 s without traffic";
    let f = Figure::new(
        "failure",
        "lease grant to REMOVED, median",
        "ms",
        Better::Lower,
        ours.and_then(|(t, _, _)| t).map(|s| s.p50_ms),
    )
    .vs("etcd", etcd.and_then(|(t, _, _)| t).map(|s| s.p50_ms))
    .note(asked);
    let f = ctx.etcd_store_column(f, store.and_then(|(t, _, _)| t).map(|s| s.p50_ms));
    figures.push(ctx.rnacos_none(f, no_ttl));
    let f = Figure::new(
        "failure",
        "lease expiry lateness past TTL, max",
        "ms",
        Better::Lower,
        ours.and_then(|(_, l, _)| l).map(|s| s.max_ms),
    )
    .vs("etcd", etcd.and_then(|(_, l, _)| l).map(|s| s.max_ms));
    let f = ctx.etcd_store_column(f, store.and_then(|(_, l, _)| l).map(|s| s.max_ms));
    figures.push(ctx.rnacos_none(f, no_ttl));
    Ok(figures)
}
