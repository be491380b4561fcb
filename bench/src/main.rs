//! `bench`: measures our registry, node host and generic client, side by side
//! with etcd and r-nacos doing the same job, and prints the figures as a
//! table (or JSON).
//!
//! It starts everything it measures itself: our `registry` and `node-host`
//! (built next to the bench by the same `cargo` profile) and, when their
//! binaries are found, a single-member etcd (and our registry over it, the
//! etcd store, afresh for each measure) and an r-nacos, each on a scratch
//! data directory and free loopback ports.
//!
//! # Layout
//! - `backend`: the operations of a measure (lease, register, resolve, watch)
//!   for every system, so each measure is written once.
//! - `nacos`: a client of the Nacos 2.x gRPC protocol (connection set-up,
//!   instances, queries, subscriptions and their pushes), for r-nacos.
//! - `procs`: starting the binaries, etcd and r-nacos, reading a process's
//!   memory.
//! - `measure/*`: one file per figure group of issue 7.
//! - `stats`: percentiles and throughput; `report`: the table and JSON.
//! - `profile`: hidden helpers that run one measure's workload against a
//!   server started by hand, for a profiler attached to that server.
//! - `etcdpb`: etcd's gRPC API, from the `etcd-api` crate (compiled with
//!   protox: no protoc needed); `nacospb`: the Nacos protocol, compiled from
//!   `proto/nacos/nacos_grpc_service.proto` by `build.rs`, the same way.

/// jemalloc, not glibc's malloc, for the load the bench generates: after
/// the watch measure's 10 000 watchers, glibc's malloc took about 16 % of
/// the bench's time during the scale load (`_int_malloc`,
/// `malloc_consolidate`; 7 % when the scale measure ran alone) and the
/// load it could put on the registry fell by a third. It also changes the
/// generic measure: the typed client gains about a third, the generic path
/// less (BENCHMARKS.md, "The bench's allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod backend;
mod measure;
mod nacos;
mod ours_client;
mod procs;
mod profile;
mod report;
mod stats;

/// etcd's gRPC API (the subset in `etcd-api/proto/etcdserverpb/rpc.proto`).
use etcd_api::pb as etcdpb;

/// The Nacos 2.x gRPC protocol (`proto/nacos/nacos_grpc_service.proto`; it
/// has no package, hence the file name `_`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod nacospb {
    tonic::include_proto!("_");
}

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::measure::Ctx;
use crate::report::Figure;

/// Examples shown at the end of `--help`.
const EXAMPLES: &str = "\
Examples:
  cargo run --release -p bench                       # everything, table (a few minutes)
  cargo run --release -p bench -- --quick            # every measure, small counts
  cargo run --release -p bench -- --only watch --watchers 1000
  cargo run --release -p bench -- --json > bench.json
  cargo run --release -p bench -- --no-etcd --no-rnacos   # our side only
  cargo install rnacos --version 0.8.8 --root ~/.local     # then r-nacos is measured too

Child processes log at `warn`; set BENCH_CHILD_LOG=info (a RUST_LOG filter) to
see more of what the registry and node hosts do. RUST_LOG sets the bench's own
progress logs (on stderr).";

/// Benchmarks the registry, the node host and the generic client against etcd
/// and r-nacos.
///
/// Run it from the workspace with `cargo run --release -p bench` (add `--` and
/// flags after it). It builds and starts our `registry` and `node-host`
/// itself, starts `etcd` when it is installed (`apt-get install etcd-server`)
/// and, over it, our registry with `--store etcd://...` (the etcd-store
/// column), and `rnacos` when it is installed (`cargo install rnacos`),
/// runs each measure on every system with the same workload, and prints one
/// row per figure: our value, etcd's (or the typed tonic client's, for the
/// generic call), their ratio, etcd-store's value and its ratio to etcd,
/// r-nacos's value and our ratio to it, and the goal from issue 7. "↑"
/// marks figures where higher is better, "↓" where lower is.
///
/// A full run takes a few minutes; `--quick` runs every measure with small
/// counts in well under a minute (CI uses it to keep the program working; its
/// numbers mean little).
#[derive(Debug, Parser)]
#[command(version, about, long_about, after_long_help = EXAMPLES)]
struct Args {
    /// Small counts and short runs (under a minute, even in a debug build).
    #[arg(long)]
    quick: bool,

    /// Print the results as JSON on stdout instead of a table (progress
    /// still goes to stderr).
    #[arg(long)]
    json: bool,

    /// Run only these measures (comma-separated). Default: all of them.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Measure>,

    /// Do not start etcd even if it is installed: report our side only
    /// (and no etcd-store column: our registry over that etcd).
    #[arg(long)]
    no_etcd: bool,

    /// The etcd binary to start. Default: `etcd` on PATH.
    #[arg(long, value_name = "PATH")]
    etcd_bin: Option<PathBuf>,

    /// Where etcd keeps its data (a fresh subdirectory is made and removed).
    /// Default: /dev/shm when it exists, so etcd's fsyncs hit memory like
    /// our in-memory registry does, else the system temp directory. Point it
    /// at a disk to see etcd with real durability.
    #[arg(long, value_name = "DIR")]
    etcd_data_dir: Option<PathBuf>,

    /// Do not start r-nacos even if it is installed.
    #[arg(long)]
    no_rnacos: bool,

    /// The r-nacos server binary to start. Default: `rnacos` on PATH
    /// (`cargo install rnacos --version 0.8.8` builds it).
    #[arg(long, value_name = "PATH")]
    rnacos_bin: Option<PathBuf>,

    /// Where r-nacos keeps its data (a fresh subdirectory is made and
    /// removed). Default: /dev/shm when it exists, as for etcd.
    #[arg(long, value_name = "DIR")]
    rnacos_data_dir: Option<PathBuf>,

    /// How long each throughput level runs, in milliseconds. Default: 2000,
    /// or 200 with --quick.
    #[arg(long, value_name = "MS")]
    duration_ms: Option<u64>,

    /// Concurrent clients for the register throughput levels (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
    clients: Vec<usize>,

    /// Watcher counts for the watch propagation levels (comma-separated).
    /// Default: 1,100,1000, or 1,10,50 with --quick.
    #[arg(long, value_delimiter = ',')]
    watchers: Vec<usize>,

    /// Changes timed at each watch propagation level (one at a time, the
    /// next once every watcher got the last). Default: 50, or 5 with
    /// --quick; more gives a profiler a longer steady stretch.
    #[arg(long, value_name = "N")]
    watch_changes: Option<usize>,

    /// Instances in the scale measure. Default: 100000, or 2000 with --quick.
    #[arg(long)]
    scale_instances: Option<usize>,

    /// Services the scale measure spreads its instances over. Default: 1000,
    /// or 20 with --quick.
    #[arg(long)]
    scale_services: Option<usize>,

    /// How many times each failure-detection measure is repeated. Default:
    /// 5, or 1 with --quick.
    #[arg(long)]
    repeats: Option<usize>,

    /// TTL of the lease in the lease-expiry measure, in milliseconds (etcd
    /// counts whole seconds and rounds up to its own minimum; the report
    /// shows what each system granted).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    expiry_ttl_ms: u64,

    /// Use the `registry` and `node-host` already next to the bench instead
    /// of running `cargo build` for them first.
    #[arg(long)]
    no_build: bool,

    #[command(subcommand)]
    helper: Option<Helper>,
}

/// The measures of issue 7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Measure {
    /// 1. Instances registered per second under a lease, by N clients.
    Register,
    /// 2. Resolve throughput and latency: from the server and the local copy.
    Resolve,
    /// 3. Time for a change to reach 1, 100, 1000 and 10 000 watchers.
    Watch,
    /// 4. kill -9 of a node host, and lease expiry, to the REMOVED event.
    Failure,
    /// 5. Generic (reflective) calls against a typed tonic client.
    Generic,
    /// 6. 100 000 instances in 1 000 services: memory, snapshot, resolve.
    Scale,
}

/// Internal helpers the bench starts as child processes.
#[derive(Debug, Subcommand)]
enum Helper {
    /// Holds an etcd lease with keepalives until killed (the etcd side of the
    /// kill -9 measure: what a node host does, for etcd).
    #[command(hide = true)]
    HoldEtcdLease {
        #[command(flatten)]
        holder: Holder,
        /// Lease TTL in seconds.
        #[arg(long)]
        ttl_s: u64,
    },
    /// Holds a Nacos connection with one ephemeral instance registered on
    /// it until killed (the r-nacos side of the kill -9 measure).
    #[command(hide = true)]
    HoldRnacosInstance {
        #[command(flatten)]
        holder: Holder,
    },
    /// Registers instances of one service and resolves it back to back on
    /// one connection (the resolve latency measure), for a profiler
    /// attached to the server.
    #[command(hide = true)]
    ResolveLoop {
        #[command(flatten)]
        server: Server,
        /// Instances of the service.
        #[arg(long, default_value_t = 10)]
        instances: usize,
        /// Resolve calls.
        #[arg(long, default_value_t = 20_000)]
        calls: u64,
    },
    /// Starts a registry and a node host, then calls calculator/Add from
    /// one side of the generic measure only (typed or generic), and prints
    /// calls/s and each process's CPU time per call: for a profiler
    /// attached to this process, and to split the generic measure's gap.
    #[command(hide = true)]
    CallLoop {
        /// Which client: `typed` or `generic`.
        #[arg(long, value_enum)]
        side: measure::generic::Side,
        /// Concurrent callers.
        #[arg(long, default_value_t = 16)]
        callers: usize,
        /// How long to call, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
        /// Pause before calling, in milliseconds (to attach a profiler).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// Loads instances, then takes full snapshots one after another (the
    /// scale measure's), for a profiler attached to the server.
    #[command(hide = true)]
    SnapshotLoop {
        #[command(flatten)]
        server: Server,
        /// Instances to load.
        #[arg(long, default_value_t = 100_000)]
        instances: usize,
        /// Services they are spread over.
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Snapshots to take.
        #[arg(long, default_value_t = 10)]
        snapshots: usize,
        /// Pause between loading and the first snapshot, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        pause_ms: u64,
    },
}

/// What a kill -9 holder helper holds, and where.
#[derive(Debug, clap::Args)]
struct Holder {
    /// The server's URL: etcd's client URL, r-nacos's gRPC URL.
    #[arg(long)]
    url: String,
    /// Service to register under.
    #[arg(long)]
    service: String,
    /// Instance id to register.
    #[arg(long)]
    id: String,
}

/// The server a profiling helper drives.
#[derive(Debug, clap::Args)]
struct Server {
    /// `ours`, `etcd` or `r-nacos`.
    #[arg(long)]
    system: String,
    /// The server's gRPC URL.
    #[arg(long)]
    url: String,
}

/// Counts and durations of one run, from the flags.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Whether this is a `--quick` run.
    pub quick: bool,
    /// Length of each throughput level.
    pub duration: Duration,
    /// Register throughput levels (concurrent clients).
    pub clients: Vec<usize>,
    /// Watch propagation levels (watchers).
    pub watchers: Vec<usize>,
    /// Changes timed per watch level.
    pub watch_changes: usize,
    /// Instances of the service the resolve measure reads.
    pub resolve_instances: usize,
    /// Concurrent clients of the resolve throughput figure.
    pub resolve_clients: usize,
    /// Repeats of each failure-detection measure.
    pub repeats: usize,
    /// TTL asked for in the lease-expiry measure.
    pub expiry_ttl: Duration,
    /// Instances in the scale measure.
    pub scale_instances: usize,
    /// Services in the scale measure.
    pub scale_services: usize,
}

impl Config {
    fn from_args(a: &Args) -> Config {
        let q = a.quick;
        Config {
            quick: q,
            duration: Duration::from_millis(a.duration_ms.unwrap_or(if q { 200 } else { 2000 })),
            clients: a.clients.clone(),
            watchers: if a.watchers.is_empty() {
                if q {
                    vec![1, 10, 50]
                } else {
                    vec![1, 100, 1000, 10_000]
                }
            } else {
                a.watchers.clone()
            },
            watch_changes: a.watch_changes.unwrap_or(if q { 5 } else { 50 }).max(1),
            resolve_instances: 10,
            resolve_clients: 16,
            repeats: a.repeats.unwrap_or(if q { 1 } else { 5 }).max(1),
            expiry_ttl: Duration::from_millis(a.expiry_ttl_ms),
            scale_instances: a.scale_instances.unwrap_or(if q { 2000 } else { 100_000 }),
            scale_services: a.scale_services.unwrap_or(if q { 20 } else { 1000 }).max(1),
        }
    }
}

/// The machine the figures were measured on.
#[derive(Debug, Serialize)]
struct Machine {
    /// Logical CPUs.
    cpus: usize,
    /// CPU model from /proc/cpuinfo.
    cpu_model: String,
    /// Total memory from /proc/meminfo.
    mem_total: String,
    /// Debug or release build of the bench (our binaries use the same).
    profile: &'static str,
}

impl Machine {
    fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        };
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: field(&cpuinfo, "model name"),
            mem_total: field(&meminfo, "MemTotal"),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    machine: Machine,
    config: &'a Config,
    etcd: Option<String>,
    rnacos: Option<String>,
    figures: &'a [Figure],
}

fn main() -> Result<()> {
    support::logging::init();
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    if let Some(Helper::HoldEtcdLease {
        holder: Holder { url, service, id },
        ttl_s,
    }) = &args.helper
    {
        return rt.block_on(measure::failure::hold_etcd_lease(url, service, id, *ttl_s));
    }
    if let Some(Helper::HoldRnacosInstance {
        holder: Holder { url, service, id },
    }) = &args.helper
    {
        return rt.block_on(measure::failure::hold_rnacos_instance(url, service, id));
    }
    if let Some(Helper::ResolveLoop {
        server: Server { system, url },
        instances,
        calls,
    }) = &args.helper
    {
        let system = profile::system(system)?;
        return rt.block_on(profile::resolve_loop(system, url, *instances, *calls));
    }
    if let Some(Helper::SnapshotLoop {
        server: Server { system, url },
        instances,
        services,
        snapshots,
        pause_ms,
    }) = &args.helper
    {
        let system = profile::system(system)?;
        let pause = Duration::from_millis(*pause_ms);
        return rt.block_on(profile::snapshot_loop(
            system, url, *instances, *services, *snapshots, pause,
        ));
    }
    if let Some(Helper::CallLoop {
        side,
        callers,
        duration_ms,
        pause_ms,
    }) = &args.helper
    {
        procs::ensure_binaries(true)?;
        return rt.block_on(measure::generic::call_loop(
            *side,
            *callers,
            Duration::from_millis(*duration_ms),
            Duration::from_millis(*pause_ms),
        ));
    }
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let config = Config::from_args(&args);
    procs::ensure_binaries(args.no_build)?;

    let etcd_bin = if args.no_etcd {
        None
    } else {
        let found = procs::find_etcd(args.etcd_bin.as_deref());
        if found.is_none() {
            eprintln!(
                "etcd not found: only our side is measured. Install it with \
                 `apt-get install etcd-server` (Debian/Ubuntu) or pass --etcd-bin PATH."
            );
        }
        found
    };
    let memory_dir = || {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    };
    let etcd_data = args.etcd_data_dir.clone().unwrap_or_else(memory_dir);
    let version = etcd_bin.as_deref().map(procs::etcd_version);
    let rnacos_bin = if args.no_rnacos {
        None
    } else {
        let found = procs::find_program("rnacos", args.rnacos_bin.as_deref());
        if found.is_none() {
            eprintln!(
                "rnacos not found: r-nacos is not measured. Install it with \
                 `cargo install rnacos --version 0.8.8` (about 6 minutes on 2 cores) \
                 or pass --rnacos-bin PATH."
            );
        }
        found
    };
    let rnacos_data = args.rnacos_data_dir.clone().unwrap_or_else(memory_dir);
    let rnacos_version = rnacos_bin.as_deref().map(procs::rnacos_version);

    let measures: Vec<Measure> = if args.only.is_empty() {
        Measure::value_variants().to_vec()
    } else {
        args.only.clone()
    };
    let mut ctx = Ctx::new(config.clone(), etcd_bin, etcd_data, rnacos_bin, rnacos_data).await?;
    let mut figures = Vec::new();
    for m in measures {
        // Our registry over etcd takes part in the measures issue 16 names.
        let etcd_store = matches!(
            m,
            Measure::Register | Measure::Resolve | Measure::Watch | Measure::Failure
        );
        if let Err(e) = ctx.fresh_etcd_store(measure_name(m), etcd_store) {
            tracing::error!("our registry over etcd did not start: {e:#}");
            figures.push(
                Figure::new(
                    measure_name(m),
                    "etcd-store",
                    "",
                    report::Better::Higher,
                    None,
                )
                .note(format!("not measured: {e:#}")),
            );
        }
        tracing::info!("measuring {m:?}");
        let result = match m {
            Measure::Register => measure::register::run(&mut ctx).await,
            Measure::Resolve => measure::resolve::run(&mut ctx).await,
            Measure::Watch => measure::watch::run(&mut ctx).await,
            Measure::Failure => measure::failure::run(&mut ctx).await,
            Measure::Generic => measure::generic::run(&mut ctx).await,
            Measure::Scale => measure::scale::run(&mut ctx).await,
        };
        match result {
            Ok(f) => figures.extend(f),
            Err(e) => {
                // One broken measure should not hide the others' figures.
                tracing::error!("measure {m:?} failed: {e:#}");
                figures.push(
                    Figure::new(measure_name(m), "failed", "", report::Better::Higher, None)
                        .note(format!("{e:#}")),
                );
            }
        }
    }
    drop(ctx);

    if args.json {
        let out = JsonReport {
            machine: Machine::probe(),
            config: &config,
            etcd: version,
            rnacos: rnacos_version,
            figures: &figures,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let m = Machine::probe();
        println!(
            "\n{} build, {} CPUs ({}), {} RAM; reference: {}; also: {}\n",
            m.profile,
            m.cpus,
            m.cpu_model,
            m.mem_total,
            version.as_deref().unwrap_or("etcd not run"),
            rnacos_version.as_deref().unwrap_or("r-nacos not run")
        );
        print!("{}", report::table(&figures));
    }
    Ok(())
}

fn measure_name(m: Measure) -> &'static str {
    match m {
        Measure::Register => "register",
        Measure::Resolve => "resolve",
        Measure::Watch => "watch",
        Measure::Failure => "failure",
        Measure::Generic => "generic",
        Measure::Scale => "scale",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_is_small_and_full_is_the_issue() {
        let quick = Config::from_args(&Args::parse_from(["bench", "--quick"]));
        assert!(quick.scale_instances <= 10_000 && quick.duration <= Duration::from_millis(500));
        let full = Config::from_args(&Args::parse_from(["bench"]));
        assert_eq!(full.clients, vec![1, 16, 128]);
        assert_eq!(full.watchers, vec![1, 100, 1000, 10_000]);
        assert_eq!((full.scale_instances, full.scale_services), (100_000, 1000));
    }

    #[test]
    fn only_takes_a_list() {
        let a = Args::parse_from(["bench", "--only", "register,scale"]);
        assert_eq!(a.only, vec![Measure::Register, Measure::Scale]);
    }

    #[test]
    fn help_is_valid() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
