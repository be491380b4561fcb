//! A gRPC node host: serves the plugins `services.toml` mounts, registers
//! each with the registry under one lease, and follows changes to the file
//! and commands on the terminal without restarting.
//!
//! # Layout
//! - [`plugin`]: the [`Plugin`](plugin::Plugin) trait: name, proto service,
//!   descriptors, and how to add its tonic service to the router.
//! - [`plugins`]: the one list of plugins ([`plugins::all`]); one file each
//!   ([`plugins::calculator`], [`plugins::echo`]); [`plugins::external`]:
//!   programs in any language named in `services.toml`, run, supervised,
//!   and their calls forwarded.
//! - [`gate`]: the on/off gate in front of each plugin, which lets a plugin
//!   be mounted and unmounted while the server runs.
//! - [`config`]: `services.toml` parsing and checking, errors as
//!   `file:line: problem`.
//! - [`diff`]: old configuration vs new, as a list of actions.
//! - [`node`]: applies those actions: gates, health, registration, in a
//!   safe order.
//! - [`reflection`]: server reflection v1 and v1alpha, listing what is
//!   mounted.
//! - [`registration`]: the lease, heartbeats, reconciliation toward the
//!   desired registrations, failover to the next registry replica with the
//!   same lease, retry with backoff.
//! - [`metrics`]: the Prometheus metrics and the `--http` listener that
//!   serves them.
//! - [`addr`]: which IP to advertise.
//! - [`reload`]: the file watcher behind hot reload.
//! - [`stdin`]: the `u` / `r` / `q` terminal commands.
//! - [`run`]: the whole life of a node host, used by the `node-host` binary.

#![warn(missing_docs, unreachable_pub)]

pub mod addr;
pub mod config;
pub mod diff;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod metrics;
pub mod node;
pub mod plugin;
pub mod plugins;
pub mod reflection;
pub mod registration;
pub mod reload;
pub mod run;
pub mod stdin;
