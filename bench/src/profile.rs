//! Hidden helpers that drive one server with one workload and nothing else,
//! so that a profiler (`perf record -p`, `valgrind --tool=callgrind`)
//! attached to that server sees only that workload: the resolve latency
//! measure's loop (one client, back to back) and the scale measure's full
//! snapshot. They talk to a server started by hand; BENCHMARKS.md shows the
//! commands. The generic measure's one-sided loop (`bench call-loop`)
//! lives beside that measure, in `measure::generic`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::backend::{self, Backend, System};
use crate::measure::scale::{self, service_name};
use crate::stats::Summary;

/// Long enough for any profile; the process ends (and with it r-nacos's
/// connection) or revokes before.
const LEASE_TTL: Duration = Duration::from_secs(300);

/// The system named `name` (`ours`, `etcd`, `r-nacos`).
pub fn system(name: &str) -> Result<System> {
    Ok(match name {
        "ours" => System::Ours,
        "etcd" => System::Etcd,
        "r-nacos" | "rnacos" => System::Rnacos,
        other => bail!("unknown system {other}: ours, etcd or r-nacos"),
    })
}

/// Registers `instances` instances of one service, then resolves it
/// `calls` times back to back on a connection of its own (the resolve
/// latency measure, one client) and prints how long that took.
pub async fn resolve_loop(system: System, url: &str, instances: usize, calls: u64) -> Result<()> {
    let service = "bench-resolve";
    let mut writer = Backend::connect(system, url).await?;
    let lease = writer.grant(LEASE_TTL).await?;
    for i in 0..instances {
        writer.register(&lease, service, &format!("r-{i}")).await?;
    }
    let mut reader = Backend::connect(system, url).await?;
    // Warm the connection before the loop the profile is about.
    reader.resolve(service).await?;
    println!("resolving {calls} times");
    let mut samples = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        let n = reader.resolve(service).await?;
        samples.push(t.elapsed());
        if n != instances {
            bail!("resolved {n} instances, expected {instances}");
        }
    }
    let took = start.elapsed();
    let s = Summary::of(&mut samples).context("no call made")?;
    println!(
        "{calls} resolves in {:.3} s ({:.0}/s), p50 {:.3} ms, p99 {:.3} ms",
        took.as_secs_f64(),
        calls as f64 / took.as_secs_f64(),
        s.p50_ms,
        s.p99_ms
    );
    writer.revoke(&lease).await?;
    Ok(())
}

/// Loads `instances` instances spread over `services` services (16
/// clients, one lease per service), prints `loaded`, waits `pause` (time to
/// attach a profiler), then takes `snapshots` full snapshots one after the
/// other as the scale measure does (ours: a Watch of everything until its
/// snapshot; etcd: a range read of the whole prefix; r-nacos: a
/// subscription to each service, 64 in flight) and prints each one's time.
pub async fn snapshot_loop(
    system: System,
    url: &str,
    instances: usize,
    services: usize,
    snapshots: usize,
    pause: Duration,
) -> Result<()> {
    let services = services.max(1);
    // Kept: r-nacos's instances live as long as the loaders' connections.
    let held = scale::load_services(system, url, 16, services, instances).await?;
    println!("loaded {instances} instances");
    tokio::time::sleep(pause).await;
    let all: Vec<String> = (0..services).map(service_name).collect();
    for k in 0..snapshots {
        let mut b = Backend::connect(system, url).await?;
        let t0 = Instant::now();
        let got = match &mut b {
            Backend::Etcd { kv, .. } => backend::range(kv, None).await?.len(),
            Backend::Rnacos(c) => c.subscribe_each(&all, 64).await?,
            Backend::Ours(..) => b.snapshot_size().await?,
        };
        let took = t0.elapsed();
        if got != instances {
            bail!("snapshot {k} held {got} instances, expected {instances}");
        }
        println!(
            "snapshot {k}: {got} instances in {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
    }
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systems_by_name() {
        assert_eq!(system("ours").ok(), Some(System::Ours));
        assert_eq!(system("r-nacos").ok(), Some(System::Rnacos));
        assert!(system("consul").is_err());
    }
}
