//! Measure 5: Generic call overhead: calculator/Add on one node host, through the
//! client library's reflective path (a `DynamicMessage` built from the
//! descriptors the registry holds) and through a typed tonic client. Both
//! run one call at a time (latency) and with 16 concurrent callers
//! (throughput), on one connection each.

use anyhow::Result;
use registry_proto::calculator::v1::{BinaryRequest, calculator_client::CalculatorClient};
use tonic::transport::Channel;

use super::{Ctx, closed_loop, error_note};
use crate::ours_client;
use crate::procs::NodeHostProc;
use crate::report::{Better, Figure};
use crate::stats::{Load, Summary};

const CONCURRENCY: usize = 16;

async fn typed(url: &str, ctx: &Ctx, callers: usize) -> Result<Load> {
    let client = CalculatorClient::connect(url.to_string()).await?;
    let states: Vec<CalculatorClient<Channel>> = (0..callers).map(|_| client.clone()).collect();
    Ok(
        closed_loop(states, ctx.cfg.duration, |mut c, n| async move {
            let r = c
                .add(BinaryRequest {
                    a: n as f64,
                    b: 1.0,
                })
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from);
            (c, r)
        })
        .await,
    )
}

async fn generic(caller: &ours_client::Caller, ctx: &Ctx, callers: usize) -> Result<Load> {
    let states: Vec<ours_client::Caller> = (0..callers).map(|_| caller.clone()).collect();
    Ok(closed_loop(states, ctx.cfg.duration, |c, n| async move {
        let r = ours_client::add(&c, n as f64, 1.0).await;
        (c, r)
    })
    .await)
}

/// Runs both paths against one node host.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Figure>> {
    let node = NodeHostProc::start(&ctx.ours.addr)?;
    let url = format!("http://{}", node.addr);
    let caller = ours_client::caller(&ctx.ours.addr, &node.addr).await?;

    tracing::info!("generic: one call at a time");
    // Warm both connections (and the descriptor cache) before timing.
    ours_client::add(&caller, 1.0, 2.0).await?;
    let mut typed_one = typed(&url, ctx, 1).await?;
    let mut generic_one = generic(&caller, ctx, 1).await?;
    tracing::info!("generic: {CONCURRENCY} concurrent callers");
    let typed_many = typed(&url, ctx, CONCURRENCY).await?;
    let generic_many = generic(&caller, ctx, CONCURRENCY).await?;
    drop(node);

    let t = Summary::of(&mut typed_one.latencies);
    let g = Summary::of(&mut generic_one.latencies);
    let notes: Vec<String> = [&typed_one, &generic_one, &typed_many, &generic_many]
        .iter()
        .map(|l| error_note(l))
        .filter(|n| !n.is_empty())
        .collect();
    Ok(vec![
        Figure::new(
            "generic",
            format!("calls/s, {CONCURRENCY} callers"),
            "calls/s",
            Better::Higher,
            Some(generic_many.per_sec()),
        )
        .vs("typed tonic", Some(typed_many.per_sec()))
        .note(notes.join(", ")),
        Figure::new(
            "generic",
            "latency p50, 1 caller",
            "ms",
            Better::Lower,
            g.map(|s| s.p50_ms),
        )
        .vs("typed tonic", t.map(|s| s.p50_ms)),
        Figure::new(
            "generic",
            "latency p99, 1 caller",
            "ms",
            Better::Lower,
            g.map(|s| s.p99_ms),
        )
        .vs("typed tonic", t.map(|s| s.p99_ms))
        .target(
            "<= 1.2x typed",
            g.zip(t).map(|(g, t)| g.p99_ms <= 1.2 * t.p99_ms),
        ),
    ])
}
