//! The plugins this node host can serve: the one list of them.
//!
//! Adding a plugin: write `plugins/<name>.rs` implementing
//! [`crate::plugin::Plugin`] (its `.proto` goes in `proto/proto/`),
//! declare the module below and add one line to [`all`]. A plugin in
//! another language needs no code here: see [`external`].

use std::sync::Arc;

use crate::plugin::Plugin;

pub mod calculator;
pub mod echo;
pub mod external;

/// Every plugin this build knows, in a fixed order. `services.toml` may
/// mount any of them by name.
pub fn all() -> Vec<Arc<dyn Plugin>> {
    vec![
        Arc::new(calculator::CalculatorPlugin),
        Arc::new(echo::EchoPlugin),
    ]
}

/// The names of [`all`] plugins, for error messages and `--help`.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|p| p.name()).collect()
}
