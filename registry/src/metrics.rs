//! The registry's Prometheus metrics, served at `/metrics` by [`crate::http`].
//!
//! One set per process ([`get`]): the hooks where things happen (a limit
//! refuses a call, a watcher is reset, a Watch stream opens) are one line
//! each and need no handle passed down to them. Gauges of the state
//! (instances per service, leases) are read from the [`Store`] at each
//! scrape; removals are counted from the registry's own watch by
//! [`crate::http::fleet`], which sees every change with its reason.
//!
//! Every metric is listed in README's "Metrics" table.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use registry_proto::registry::v1::{RemovalReason, ServiceSummary};
use support::metrics::GrpcMetrics;

use crate::error::Limit;

/// The registry's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// What `/metrics` renders.
    pub registry: Registry,
    /// `registry_grpc_*`: every call by method and status code, timed.
    pub grpc: GrpcMetrics,
    /// `registry_instances{service}`, set at each scrape.
    instances: IntGaugeVec,
    /// `registry_leases`, set at each scrape.
    leases: IntGauge,
    /// `registry_watchers`: open Watch streams.
    pub watchers: IntGauge,
    /// `registry_watch_log_bytes`: recent changes kept for watchers, set at
    /// each scrape.
    watch_log_bytes: IntGauge,
    /// `registry_watch_memory_bytes`: what watchers hold against
    /// `--watch-memory-bytes`, set at each scrape.
    watch_memory_bytes: IntGauge,
    /// `registry_watch_resets_total`: watchers that fell behind and were
    /// sent a fresh snapshot.
    pub watch_resets: IntCounter,
    /// `registry_watch_open_lock_max_seconds`: the longest a new watcher
    /// held the store's lock (writers and heartbeats wait meanwhile), set
    /// at each scrape from [`OPEN_LOCK_MAX_NANOS`].
    watch_open_lock_max: Gauge,
    /// `registry_instance_removals_total{reason}`.
    pub instance_removals: IntCounterVec,
    /// `registry_lease_removals_total{reason}`: leases that went with their
    /// instances (deregistration removes an instance, not its lease).
    pub lease_removals: IntCounterVec,
    /// `registry_refused_total{limit}`: calls refused by a limit.
    pub refused: IntCounterVec,
    /// `registry_dashboard_clients`: open dashboard event streams.
    pub dashboard_clients: IntGauge,
    /// `registry_dns_tcp_refused_total`: DNS-over-TCP connections closed
    /// at accept by `--dns-max-tcp-connections`.
    pub dns_tcp_refused: IntCounter,
    /// `registry_allocator_allocated_bytes` and `..._resident_bytes`: the
    /// allocator's own statistics, set at each scrape.
    allocated_bytes: IntGauge,
    resident_bytes: IntGauge,
}

fn build() -> prometheus::Result<Metrics> {
    let registry = Registry::new();
    let grpc = GrpcMetrics::new("registry", &registry)?;
    let instances = IntGaugeVec::new(
        Opts::new("registry_instances", "Instances registered, by service."),
        &["service"],
    )?;
    let leases = IntGauge::new("registry_leases", "Live leases.")?;
    let watchers = IntGauge::new("registry_watchers", "Open Watch streams.")?;
    let watch_log_bytes = IntGauge::new(
        "registry_watch_log_bytes",
        "Bytes of encoded recent changes kept for watchers (at most --watch-buffer-bytes).",
    )?;
    let watch_memory_bytes = IntGauge::new(
        "registry_watch_memory_bytes",
        "Bytes watchers hold against --watch-memory-bytes (streams and snapshots in progress).",
    )?;
    let watch_resets = IntCounter::new(
        "registry_watch_resets_total",
        "Watchers that fell behind and were sent a fresh snapshot instead.",
    )?;
    let watch_open_lock_max = Gauge::new(
        "registry_watch_open_lock_max_seconds",
        "Longest time one new Watch stream held the store's lock to take its snapshot and place (writers wait meanwhile), since start.",
    )?;
    let instance_removals = IntCounterVec::new(
        Opts::new(
            "registry_instance_removals_total",
            "Instances removed, by reason: expired, keepalive_closed, revoked, deregistered.",
        ),
        &["reason"],
    )?;
    let lease_removals = IntCounterVec::new(
        Opts::new(
            "registry_lease_removals_total",
            "Leases removed with their instances, by reason: expired, keepalive_closed, revoked.",
        ),
        &["reason"],
    )?;
    let refused = IntCounterVec::new(
        Opts::new(
            "registry_refused_total",
            "Calls refused with RESOURCE_EXHAUSTED, by the limit that refused them.",
        ),
        &["limit"],
    )?;
    let dashboard_clients = IntGauge::new(
        "registry_dashboard_clients",
        "Open event streams of the web dashboard.",
    )?;
    let dns_tcp_refused = IntCounter::new(
        "registry_dns_tcp_refused_total",
        "DNS-over-TCP connections closed at once because --dns-max-tcp-connections were open.",
    )?;
    let allocated_bytes = IntGauge::new(
        "registry_allocator_allocated_bytes",
        "Bytes allocated and not yet freed, by the allocator's own count.",
    )?;
    let resident_bytes = IntGauge::new(
        "registry_allocator_resident_bytes",
        "Bytes of memory pages the allocator holds (freed memory not yet returned to the system included).",
    )?;
    let build_info = IntGaugeVec::new(
        Opts::new("registry_build_info", "The registry's version; always 1."),
        &["version"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    for reason in REASONS {
        instance_removals.with_label_values(&[reason]).inc_by(0);
        if reason != "deregistered" {
            lease_removals.with_label_values(&[reason]).inc_by(0);
        }
    }
    for limit in Limit::ALL {
        refused.with_label_values(&[limit.label()]).inc_by(0);
    }
    for metric in [
        Box::new(instances.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(leases.clone()),
        Box::new(watchers.clone()),
        Box::new(watch_log_bytes.clone()),
        Box::new(watch_memory_bytes.clone()),
        Box::new(watch_resets.clone()),
        Box::new(watch_open_lock_max.clone()),
        Box::new(instance_removals.clone()),
        Box::new(lease_removals.clone()),
        Box::new(refused.clone()),
        Box::new(dashboard_clients.clone()),
        Box::new(dns_tcp_refused.clone()),
        Box::new(allocated_bytes.clone()),
        Box::new(resident_bytes.clone()),
        Box::new(build_info),
    ] {
        registry.register(metric)?;
    }
    Ok(Metrics {
        registry,
        grpc,
        instances,
        leases,
        watchers,
        watch_log_bytes,
        watch_memory_bytes,
        watch_resets,
        watch_open_lock_max,
        instance_removals,
        lease_removals,
        refused,
        dashboard_clients,
        dns_tcp_refused,
        allocated_bytes,
        resident_bytes,
    })
}

/// The reasons of `registry_instance_removals_total`, all exported from
/// the start (at 0) so a rate over them needs no special case.
pub const REASONS: [&str; 4] = ["expired", "keepalive_closed", "revoked", "deregistered"];

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // Only a duplicate or malformed name fails, which is a bug caught by
    // every test that scrapes.
    #[allow(clippy::expect_used)]
    build().expect("the registry's metrics are well-formed")
});

/// This process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// The label of a removal reason.
pub fn reason_label(reason: RemovalReason) -> &'static str {
    match reason {
        RemovalReason::LeaseExpired => "expired",
        RemovalReason::KeepaliveClosed => "keepalive_closed",
        RemovalReason::LeaseRevoked => "revoked",
        RemovalReason::Deregistered => "deregistered",
        RemovalReason::Unspecified => "unspecified",
    }
}

/// The longest lock hold of a new watcher so far, in nanoseconds: an
/// atomic maximum (a gauge has no `fetch_max`), copied to the gauge at
/// each scrape.
static OPEN_LOCK_MAX_NANOS: AtomicU64 = AtomicU64::new(0);

/// A new watcher held the store's lock for `held`.
pub fn watch_open_locked(held: Duration) {
    let nanos = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
    OPEN_LOCK_MAX_NANOS.fetch_max(nanos, Ordering::Relaxed);
}

/// Counts a call refused by `limit`.
pub fn refused(limit: Limit) {
    get().refused.with_label_values(&[limit.label()]).inc();
}

/// Counts an open Watch stream for as long as the guard lives.
pub fn watcher() -> Counted {
    Counted::new(&get().watchers)
}

/// Increments a gauge now and decrements it when dropped.
#[derive(Debug)]
pub struct Counted(IntGauge);

impl Counted {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: &IntGauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the gauges read at each scrape show (see `crate::http`, which
/// reads them from the store and the watch hub).
#[derive(Debug, Default)]
pub struct Gauges {
    /// Instances per service, as `ListServices` gives them.
    pub services: Vec<ServiceSummary>,
    /// Live leases.
    pub leases: usize,
    /// Bytes of the watch hub's log of recent changes.
    pub watch_log_bytes: usize,
    /// Bytes charged against the watch memory budget.
    pub watch_memory_bytes: usize,
}

/// Sets the gauges read from the state, then renders every metric.
pub fn render(gauges: &Gauges) -> String {
    let metrics = get();
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    metrics.watch_log_bytes.set(gauge(gauges.watch_log_bytes));
    metrics
        .watch_memory_bytes
        .set(gauge(gauges.watch_memory_bytes));
    if let Some(usage) = crate::allocator::usage() {
        metrics.allocated_bytes.set(gauge(usage.allocated));
        metrics.resident_bytes.set(gauge(usage.resident));
    }
    // Reset first: a service whose last instance went must not linger.
    metrics.instances.reset();
    for service in &gauges.services {
        metrics
            .instances
            .with_label_values(&[service.name.as_str()])
            .set(i64::from(service.instance_count));
    }
    metrics.leases.set(gauge(gauges.leases));
    let held = OPEN_LOCK_MAX_NANOS.load(Ordering::Relaxed);
    metrics.watch_open_lock_max.set(held as f64 / 1e9);
    support::metrics::render(&metrics.registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric() {
        let text = render(&Gauges {
            services: vec![ServiceSummary {
                name: "svc".into(),
                instance_count: 1,
                ..Default::default()
            }],
            leases: 1,
            ..Gauges::default()
        });
        for name in [
            "registry_instances{service=\"svc\"} 1",
            "registry_leases 1",
            "registry_watchers",
            "registry_watch_resets_total",
            "registry_watch_open_lock_max_seconds",
            "registry_instance_removals_total{reason=\"keepalive_closed\"} 0",
            "registry_lease_removals_total{reason=\"expired\"} 0",
            "registry_refused_total{limit=\"registrations_per_sec\"} 0",
            "registry_build_info{version=",
            "registry_grpc_requests_in_flight",
            "registry_dns_tcp_refused_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
