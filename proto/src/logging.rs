//! The one logging setup every binary uses: `tracing` to stderr (stdout is
//! left to what a binary prints for people and scripts), filtered by
//! `RUST_LOG`, `info` when it is unset or does not parse.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
