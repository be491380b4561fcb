//! The one logging setup every binary uses: `tracing` to stderr (stdout is
//! left to what a binary prints for people and scripts), filtered by
//! `RUST_LOG`, `info` when it is unset or does not parse. hickory's DNS
//! server logs every query at `info`; it is held at `warn` unless
//! `RUST_LOG` names it (`RUST_LOG=info,hickory_server=info`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(filter(std::env::var("RUST_LOG").ok().as_deref()))
        .with_writer(std::io::stderr)
        .init();
}

fn filter(rust_log: Option<&str>) -> EnvFilter {
    let mut directives = rust_log.unwrap_or("info").to_string();
    if !directives.contains("hickory") {
        directives.push_str(",hickory_server=warn");
    }
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn"))
}
