//! Measure 2: Resolve: one service's instances read from the server (etcd: a range
//! read of the service's prefix; r-nacos: a ServiceQueryRequest; etcd-store:
//! ours over etcd, which answers from its mirror of etcd), as
//! throughput with 16 concurrent clients
//! and as the latency of one client; and from the client library's local
//! copy (a `Directory` kept current by a watch: no round trip).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{Ctx, closed_loop, error_note, of};
use crate::backend::{Backend, System};
use crate::report::{Better, Figure};
use crate::stats::Summary;

/// Server-side figures of one system.
#[derive(Clone, Copy)]
struct Server {
    per_sec: f64,
    latency: Option<Summary>,
}

async fn server(system: System, url: &str, ctx: &Ctx) -> Result<(Server, String)> {
    let service: Arc<str> = "bench-resolve".into();
    let mut writer = Backend::connect(system, url).await?;
    let lease = writer.grant(Duration::from_secs(120)).await?;
    for i in 0..ctx.cfg.resolve_instances {
        writer.register(&lease, &service, &format!("r-{i}")).await?;
    }
    let want = ctx.cfg.resolve_instances;
    let check = move |n: usize| {
        if n == want {
            Ok(())
        } else {
            Err(anyhow::anyhow!("resolved {n} instances, expected {want}"))
        }
    };

    // Throughput: many clients, each on its own connection.
    let mut states = Vec::new();
    for _ in 0..ctx.cfg.resolve_clients {
        states.push(Backend::connect(system, url).await?);
    }
    let svc = service.clone();
    let load = closed_loop(states, ctx.cfg.duration, move |mut b, _| {
        let svc = svc.clone();
        async move {
            let r = b.resolve(&svc).await.and_then(check);
            (b, r)
        }
    })
    .await;

    // Latency: one client alone, so queueing behind others does not count.
    let one = vec![Backend::connect(system, url).await?];
    let svc = service.clone();
    let mut alone = closed_loop(one, ctx.cfg.duration, move |mut b, _| {
        let svc = svc.clone();
        async move {
            let r = b.resolve(&svc).await.and_then(check);
            (b, r)
        }
    })
    .await;
    writer.revoke(&lease).await?;
    let mut note = error_note(&load);
    if alone.errors > 0 {
        note = format!("{note} {}", error_note(&alone));
    }
    Ok((
        Server {
            per_sec: load.per_sec(),
            latency: Summary::of(&mut alone.latencies),
        },
        note,
    ))
}

/// Lookups in the client library's local copy, on one thread.
async fn local(ctx: &Ctx) -> Result<(f64, Option<Summary>)> {
    let service = "bench-resolve-local";
    let mut writer = Backend::connect(System::Ours, &ctx.ours.url).await?;
    let lease = writer.grant(Duration::from_secs(120)).await?;
    for i in 0..ctx.cfg.resolve_instances {
        writer.register(&lease, service, &format!("r-{i}")).await?;
    }
    let dir = crate::ours_client::directory(&ctx.ours.addr).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::ours_client::lookup(&dir, service) != ctx.cfg.resolve_instances {
        if Instant::now() > deadline {
            bail!(
                "the local directory never showed the {} instances",
                ctx.cfg.resolve_instances
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Throughput: a tight loop, timed as a whole (timing each call would
    // cost as much as the call).
    let start = Instant::now();
    let mut calls = 0u64;
    let mut sink = 0usize;
    while start.elapsed() < ctx.cfg.duration {
        for _ in 0..1000 {
            sink = sink.wrapping_add(crate::ours_client::lookup(&dir, service));
        }
        calls += 1000;
    }
    let per_sec = calls as f64 / start.elapsed().as_secs_f64();
    // Latency: each call timed on its own (includes ~20 ns of clock reads).
    let mut samples = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let t = Instant::now();
        sink = sink.wrapping_add(crate::ours_client::lookup(&dir, service));
        samples.push(t.elapsed());
    }
    std::hint::black_box(sink);
    writer.revoke(&lease).await?;
    Ok((per_sec, Summary::of(&mut samples)))
}

/// Runs the server measure on both systems and the local one on ours.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Figure>> {
    let mut results = Vec::new();
    let mut notes = Vec::new();
    for (system, url) in ctx.systems() {
        tracing::info!("resolve: {} server", system.name());
        let (r, note) = server(system, &url, ctx).await?;
        results.push((system, r));
        if !note.trim().is_empty() {
            notes.push(format!("{}: {}", system.name(), note.trim()));
        }
    }
    let ours = of(&results, System::Ours);
    let etcd = of(&results, System::Etcd);
    let n = ctx.cfg.resolve_instances;
    let c = ctx.cfg.resolve_clients;
    let mut figures = vec![
        ctx.figure(
            "resolve",
            format!("server, {n} instances, {c} clients"),
            "ops/s",
            Better::Higher,
            |system| of(&results, system).map(|s| s.per_sec),
        )
        .target(
            ">= 2x etcd",
            ours.zip(etcd).map(|(o, e)| o.per_sec >= 2.0 * e.per_sec),
        )
        .note(notes.join(", ")),
    ];
    for (label, pick) in [
        ("p50", (|s: Summary| s.p50_ms) as fn(Summary) -> f64),
        ("p99", |s: Summary| s.p99_ms),
    ] {
        figures.push(ctx.figure(
            "resolve",
            format!("server latency {label}, 1 client"),
            "ms",
            Better::Lower,
            |system| of(&results, system).and_then(|s| s.latency).map(pick),
        ));
    }

    tracing::info!("resolve: local directory");
    match local(ctx).await {
        Ok((per_sec, lat)) => {
            // Nacos clients keep a copy too, but in their own libraries
            // (Java's ServiceInfoHolder): no server is involved.
            let why = "the copy lives in a Nacos client library, which the bench does not run";
            let f = Figure::new(
                "resolve",
                "local copy, 1 thread",
                "ops/s",
                Better::Higher,
                Some(per_sec),
            )
            .target(">= 1 000 000/s", Some(per_sec >= 1_000_000.0))
            .note("etcd has no client-side copy");
            figures.push(ctx.rnacos_none(f, why));
            let f = Figure::new(
                "resolve",
                "local copy latency p99",
                "µs",
                Better::Lower,
                lat.map(|s| s.p99_ms * 1000.0),
            );
            figures.push(ctx.rnacos_none(f, why));
        }
        Err(e) => figures.push(
            Figure::new("resolve", "local copy", "ops/s", Better::Higher, None)
                .note(format!("not measured: {e:#}")),
        ),
    }
    Ok(figures)
}
