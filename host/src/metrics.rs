//! The node host's Prometheus metrics, served at `/metrics` on
//! `node-host --http ADDR`.
//!
//! One set per process ([`get`]): the hooks where things happen (a reload
//! applied or refused, a lease granted) are one line each. The calls the
//! node serves are counted by the shared gRPC layer
//! (`support::metrics`) around every plugin; which plugins are
//! registered is read from the registrar at each scrape.
//!
//! Every metric is listed in README's "Metrics" table.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use support::metrics::GrpcMetrics;
use tokio::net::TcpListener;

use crate::config::ConfigError;

/// The node host's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// What `/metrics` renders.
    pub registry: Registry,
    /// `node_host_grpc_*`: calls served, by service, method and code, timed.
    pub grpc: GrpcMetrics,
    /// `node_host_plugin_registered{plugin}`: 1 while registered, set at
    /// each scrape.
    registered: IntGaugeVec,
    /// `node_host_reloads_total{outcome,reason}`.
    reloads: IntCounterVec,
    /// `node_host_lease_regrants_total`.
    regrants: IntCounter,
    /// Whether the first lease was granted (later ones are re-grants).
    granted_once: AtomicBool,
    /// `node_host_plugin_restarts_total{plugin}`: external plugin processes
    /// restarted.
    pub plugin_restarts: IntCounterVec,
}

/// Why a reload was refused: the `reason` label of
/// `node_host_reloads_total{outcome="refused"}`.
pub const REFUSAL_REASONS: [&str; 3] = ["unreadable", "unknown_plugin", "invalid"];

fn build() -> prometheus::Result<Metrics> {
    let registry = Registry::new();
    let grpc = GrpcMetrics::new("node_host", &registry)?;
    let registered = IntGaugeVec::new(
        Opts::new(
            "node_host_plugin_registered",
            "1 while the plugin is registered with the registry, 0 otherwise.",
        ),
        &["plugin"],
    )?;
    let reloads = IntCounterVec::new(
        Opts::new(
            "node_host_reloads_total",
            "Changes of services.toml: applied, or refused with a reason \
             (unreadable, unknown_plugin, invalid).",
        ),
        &["outcome", "reason"],
    )?;
    let regrants = IntCounter::new(
        "node_host_lease_regrants_total",
        "Leases granted after the first: the registry lost the node's lease \
         (restart, expiry) and the node registered again.",
    )?;
    let plugin_restarts = IntCounterVec::new(
        Opts::new(
            "node_host_plugin_restarts_total",
            "External plugin processes restarted after they exited.",
        ),
        &["plugin"],
    )?;
    let build_info = IntGaugeVec::new(
        Opts::new("node_host_build_info", "The node host's version; always 1."),
        &["version"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    reloads.with_label_values(&["applied", "none"]).inc_by(0);
    for reason in REFUSAL_REASONS {
        reloads.with_label_values(&["refused", reason]).inc_by(0);
    }
    for metric in [
        Box::new(registered.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(reloads.clone()),
        Box::new(regrants.clone()),
        Box::new(plugin_restarts.clone()),
        Box::new(build_info),
    ] {
        registry.register(metric)?;
    }
    Ok(Metrics {
        registry,
        grpc,
        registered,
        reloads,
        regrants,
        granted_once: AtomicBool::new(false),
        plugin_restarts,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // Only a duplicate or malformed name fails: a bug every scrape test sees.
    #[allow(clippy::expect_used)]
    build().expect("the node host's metrics are well-formed")
});

/// This process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// The reason label of a refused configuration.
pub fn refusal_reason(error: &ConfigError) -> &'static str {
    if error.problem.starts_with("cannot read") {
        "unreadable"
    } else if error.problem.contains("unknown plugin") {
        "unknown_plugin"
    } else {
        "invalid"
    }
}

/// Counts a configuration change that was applied.
pub fn reload_applied() {
    get().reloads.with_label_values(&["applied", "none"]).inc();
}

/// Counts a configuration change that was refused.
pub fn reload_refused(error: &ConfigError) {
    get()
        .reloads
        .with_label_values(&["refused", refusal_reason(error)])
        .inc();
}

/// Counts a lease granted; every one after the first is a re-grant.
pub fn lease_granted() {
    if get().granted_once.swap(true, Ordering::Relaxed) {
        get().regrants.inc();
    }
}

/// Counts an external plugin started again after it ended.
pub fn plugin_restarted(plugin: &str) {
    get().plugin_restarts.with_label_values(&[plugin]).inc();
}

/// Sets `node_plugin_registered{plugin}` from `plugins` (every plugin the
/// node knows of, and whether it is registered now), then renders every
/// metric.
pub fn render(plugins: &BTreeMap<String, bool>) -> String {
    let metrics = get();
    // Reset first: an external plugin taken out of the file must not linger.
    metrics.registered.reset();
    for (plugin, registered) in plugins {
        metrics
            .registered
            .with_label_values(&[plugin.as_str()])
            .set(i64::from(*registered));
    }
    support::metrics::render(&metrics.registry)
}

/// Serves `/metrics` on `listener` until `shutdown` resolves; `plugins`
/// gives [`render`]'s argument at each scrape.
pub async fn serve(
    listener: TcpListener,
    plugins: impl Fn() -> BTreeMap<String, bool> + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render(&plugins());
            async move {
                (
                    [(http::header::CONTENT_TYPE, support::metrics::TEXT_FORMAT)],
                    text,
                )
            }
        }),
    );
    support::metrics::serve_http(listener, router, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_may_set_the_http_address() {
        let known = ["calculator"];
        let c =
            crate::config::Config::parse("http = \"127.0.0.1:9101\"\n", "f", &known, None).unwrap();
        assert_eq!(c.http, Some("127.0.0.1:9101".parse().unwrap()));
        let e = crate::config::Config::parse("\nhttp = \"9101\"\n", "f", &known, None).unwrap_err();
        assert_eq!(e.to_string(), "f:2: http `9101` is not IP:PORT");
        assert_eq!(refusal_reason(&e), "invalid");
    }

    #[test]
    fn refusals_have_a_reason_from_the_fixed_set() {
        let error = |problem: &str| ConfigError {
            file: "services.toml".into(),
            line: Some(3),
            problem: problem.into(),
        };
        for (problem, reason) in [
            ("cannot read: No such file or directory", "unreadable"),
            (
                "unknown plugin `calcualtor`, known: calculator, echo",
                "unknown_plugin",
            ),
            ("weight 1001 is out of range 0..=1000", "invalid"),
            ("expected `=`", "invalid"),
        ] {
            let got = refusal_reason(&error(problem));
            assert_eq!(got, reason, "{problem}");
            assert!(REFUSAL_REASONS.contains(&got));
        }
    }
}
