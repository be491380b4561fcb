//! Measure 1: Register throughput: instances registered per second under a lease, by
//! 1, 16 and 128 concurrent clients, each on its own connection with its own
//! lease. etcd: a put of the same encoded instance with a lease; r-nacos:
//! an InstanceRequest registering an ephemeral instance on the connection;
//! etcd-store: ours, over etcd.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::{Ctx, closed_loop, error_note, of};
use crate::backend::{Backend, System};
use crate::report::{Better, Figure};

/// Long enough to outlive a level without heartbeats; revoked right after.
const LEASE_TTL: Duration = Duration::from_secs(120);

/// Registers for `duration` with `clients` clients; returns instances/s and
/// how many failed.
async fn level(
    system: System,
    url: &str,
    clients: usize,
    duration: Duration,
) -> Result<(f64, String)> {
    let service: Arc<str> = format!("bench-register-{clients}").into();
    let mut states = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut b = Backend::connect(system, url).await?;
        let lease = b.grant(LEASE_TTL).await?;
        states.push((b, lease, i));
    }
    let leases: Vec<_> = states
        .iter()
        .map(|(b, l, _)| (b.clone(), l.clone()))
        .collect();
    let load = closed_loop(states, duration, move |(mut b, lease, i), n| {
        let service = service.clone();
        async move {
            let r = b.register(&lease, &service, &format!("c{i}-{n}")).await;
            ((b, lease, i), r)
        }
    })
    .await;
    // Revoking drops everything registered, so levels do not pile up.
    for (mut b, l) in leases {
        b.revoke(&l).await?;
    }
    Ok((load.per_sec(), error_note(&load)))
}

/// Runs every level on every system.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &clients in &ctx.cfg.clients {
        let mut results = Vec::new();
        let mut notes = Vec::new();
        for (system, url) in ctx.systems() {
            tracing::info!("register: {} with {clients} clients", system.name());
            let (rate, note) = level(system, &url, clients, ctx.cfg.duration).await?;
            results.push((system, rate));
            if !note.is_empty() {
                notes.push(format!("{}: {note}", system.name()));
            }
        }
        let ours = of(&results, System::Ours);
        let etcd = of(&results, System::Etcd);
        let met = ours.zip(etcd).map(|(o, e)| o >= 3.0 * e);
        let f = Figure::new(
            "register",
            format!("{clients} client{}", if clients == 1 { "" } else { "s" }),
            "inst/s",
            Better::Higher,
            ours,
        )
        .vs("etcd", etcd);
        let f = ctx.etcd_store_column(f, of(&results, System::EtcdStore));
        figures.push(
            ctx.rnacos_column(f, of(&results, System::Rnacos))
                .target(">= 3x etcd", met)
                .note(notes.join(", ")),
        );
    }
    Ok(figures)
}
