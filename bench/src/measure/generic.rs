//! Measure 5: Generic call overhead: calculator/Add on one node host, through the
//! client library's reflective path (a `DynamicMessage` built from the
//! descriptors the registry holds) and through a typed tonic client, each on
//! its own connection.
//!
//! The two sides are interleaved rather than run one after the other: on a
//! shared machine a burst of outside load otherwise lands in one side's window
//! and not the other's, and the p99 ratio swung from 0.5x to 1.6x between
//! identical runs. Latency: one caller alternates a typed and a generic call
//! (swapping which goes first each time), so both see the same moments.
//! Throughput: 16 concurrent callers, in alternating rounds (typed, generic,
//! generic, typed, ...) whose counts are summed per side.

use anyhow::{Context, Result};
use registry_proto::calculator::v1::{BinaryRequest, calculator_client::CalculatorClient};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

use super::{Ctx, closed_loop, error_note, record};
use crate::ours_client;
use crate::procs::NodeHostProc;
use crate::report::{Better, Figure};
use crate::stats::{Load, Summary};

const CONCURRENCY: usize = 16;
/// Throughput rounds per side; the run's duration is split between them.
const ROUNDS: u32 = 4;

type Typed = CalculatorClient<Channel>;

async fn typed_add(mut c: Typed, n: u64) -> (Typed, Result<()>) {
    let r = c
        .add(BinaryRequest {
            a: n as f64,
            b: 1.0,
        })
        .await
        .map(|_| ())
        .map_err(anyhow::Error::from);
    (c, r)
}

async fn generic_add(c: ours_client::Caller, n: u64) -> (ours_client::Caller, Result<()>) {
    let r = ours_client::add(&c, n as f64, 1.0).await;
    (c, r)
}

/// One caller, alternating typed and generic calls for `duration`.
async fn latency(typed: Typed, generic: ours_client::Caller, duration: Duration) -> (Load, Load) {
    let (mut t_load, mut g_load) = (Load::default(), Load::default());
    let (mut typed, mut generic) = (typed, generic);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        let typed_first = n.is_multiple_of(2);
        for typed_turn in [typed_first, !typed_first] {
            let t = Instant::now();
            if typed_turn {
                let (c, r) = typed_add(typed, n).await;
                typed = c;
                record(&mut t_load, t, r);
            } else {
                let (c, r) = generic_add(generic, n).await;
                generic = c;
                record(&mut g_load, t, r);
            }
        }
        n += 1;
    }
    t_load.elapsed = start.elapsed();
    g_load.elapsed = t_load.elapsed;
    (t_load, g_load)
}

/// Adds one throughput round to a side's total.
fn add_round(total: &mut Load, round: Load) {
    total.ops += round.ops;
    total.errors += round.errors;
    total.elapsed += round.elapsed;
}

/// `CONCURRENCY` callers per side, in `ROUNDS` alternating rounds per side.
async fn throughput(
    typed: &Typed,
    generic: &ours_client::Caller,
    duration: Duration,
) -> (Load, Load) {
    let round = duration / ROUNDS;
    let (mut t_total, mut g_total) = (Load::default(), Load::default());
    for i in 0..ROUNDS * 2 {
        // t g g t t g g t: each side goes first as often as second.
        if (i + 1) % 4 < 2 {
            let callers = (0..CONCURRENCY).map(|_| typed.clone()).collect();
            add_round(&mut t_total, closed_loop(callers, round, typed_add).await);
        } else {
            let callers = (0..CONCURRENCY).map(|_| generic.clone()).collect();
            add_round(&mut g_total, closed_loop(callers, round, generic_add).await);
        }
    }
    (t_total, g_total)
}

/// Both clients of `node` (registered with the registry at `registry`),
/// their connections and the descriptor cache warmed by one call each.
async fn clients(registry: &str, node: &NodeHostProc) -> Result<(Typed, ours_client::Caller)> {
    let caller = ours_client::caller(registry, &node.addr).await?;
    let typed = CalculatorClient::connect(format!("http://{}", node.addr)).await?;
    ours_client::add(&caller, 1.0, 2.0).await?;
    typed_add(typed.clone(), 1).await.1?;
    Ok((typed, caller))
}

/// Which path a [`call_loop`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// The typed tonic client.
    Typed,
    /// The client library's reflective path.
    Generic,
}

/// CPU time (user + system) a process has used so far, from
/// `/proc/<pid>/stat` (Linux).
fn cpu_time(pid: &str) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)?;
    stat_cpu_time(&stat).with_context(|| format!("reading {path}"))
}

/// The CPU time in a `/proc/PID/stat` line.
fn stat_cpu_time(stat: &str) -> Result<Duration> {
    // Fields after the command name, which is in parentheses and may hold
    // spaces and parentheses: utime and stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("no field {}", i + 3))?
            .parse()?)
    };
    // The kernel's USER_HZ, 100 on every Linux this runs on.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// One side only, `callers` concurrent callers for `duration` against a
/// node host of its own, after `pause` (time to attach a profiler): prints
/// the calls per second and the CPU time per call of this process, the
/// node host and the registry, so the two sides' costs can be told apart
/// where the measure sees only their throughput.
pub async fn call_loop(
    side: Side,
    callers: usize,
    duration: Duration,
    pause: Duration,
) -> Result<()> {
    let registry = crate::procs::RegistryProc::start()?;
    let node = NodeHostProc::start(&registry.addr)?;
    let (typed, caller) = clients(&registry.addr, &node).await?;
    println!("pid {} ready", std::process::id());
    tokio::time::sleep(pause).await;
    let pids = [
        ("bench", "self".to_string()),
        ("node-host", node.process.pid().to_string()),
        ("registry", registry.process.pid().to_string()),
    ];
    let before: Vec<Duration> = pids
        .iter()
        .map(|(_, p)| cpu_time(p))
        .collect::<Result<_>>()?;
    let load = match side {
        Side::Typed => closed_loop(vec![typed; callers], duration, typed_add).await,
        Side::Generic => closed_loop(vec![caller; callers], duration, generic_add).await,
    };
    let calls = load.ops.max(1) as f64;
    println!(
        "{side:?}: {} calls, {} errors, {:.0} calls/s",
        load.ops,
        load.errors,
        load.per_sec()
    );
    for ((name, pid), before) in pids.iter().zip(before) {
        let used = cpu_time(pid)? - before;
        println!(
            "  {name}: {:.2} µs CPU per call",
            used.as_secs_f64() * 1e6 / calls
        );
    }
    Ok(())
}

/// Runs both paths against one node host.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Figure>> {
    let node = NodeHostProc::start(&ctx.ours.addr)?;
    let (typed, caller) = clients(&ctx.ours.addr, &node).await?;
    tracing::info!("generic: one caller, typed and generic calls alternating");
    let (mut typed_one, mut generic_one) =
        latency(typed.clone(), caller.clone(), ctx.cfg.duration).await;
    tracing::info!("generic: {CONCURRENCY} concurrent callers, alternating rounds");
    let (typed_many, generic_many) = throughput(&typed, &caller, ctx.cfg.duration).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_user_plus_system_ticks() {
        // A command name with a space and a parenthesis; utime 250 and
        // stime 50 ticks.
        let line = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(stat_cpu_time(line).unwrap(), Duration::from_millis(3000));
        assert!(stat_cpu_time("42 (short) S 1").is_err());
    }

    #[test]
    fn cpu_time_of_this_process_grows_while_it_computes() {
        let before = cpu_time("self").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        while cpu_time("self").unwrap() <= before {
            assert!(Instant::now() < deadline, "no CPU time counted in 20 s");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }
}
