//! What every binary of the system shares beyond the protocol (which is
//! `registry-proto`): how it connects and secures its connections, how it
//! retries, how it stops, how it logs and how it exposes metrics.
//!
//! One place, so `registry`, `node-host` and `client` take the same flags
//! with the same meaning, and a fix here reaches all of them.
//!
//! # Layout
//! - [`error`]: [`SecurityError`], what can go wrong setting up TLS, tokens
//!   or an address.
//! - [`tls`]: [`TlsArgs`], the TLS flags of every binary, for a listener
//!   and for the endpoint of a connection (timeouts, HTTP/2 keepalive).
//! - [`auth`]: access tokens: [`BearerToken`] (sent by a client),
//!   [`TokenPolicy`] and [`AuthLayer`] (enforced by the registry).
//! - [`connect`]: [`Connector`], TLS and token together, and the registry
//!   client type [`RegistryConn`] every binary uses; [`Replicas`], a
//!   registry given as several addresses, with failover between them
//!   ([`Rotation`] for long-lived streams).
//! - [`backoff`]: [`Backoff`], exponential with jitter, for retry loops.
//! - [`signal`]: [`Signals`], SIGINT and SIGTERM, installed first thing.
//! - [`logging`]: the `RUST_LOG` setup of every binary.
//! - [`metrics`]: the gRPC metrics layer (calls by service, method and
//!   code, with latency) and `/metrics` serving, for the registry and the
//!   node host.
//! - [`reflection`]: server reflection v1 and v1alpha, answered as grpc-go
//!   does, for the registry and the node host.
//! - [`reflection_fetch`]: the other side: a service's descriptors fetched
//!   from a server's reflection (its file, then each import), bounded, for
//!   the client (instances without registered descriptors) and the node
//!   host (external plugins).
//! - Re-exported from `tokio-util`: [`CancellationToken`], the one shutdown
//!   signal (cloned to every task that must stop), and
//!   [`AbortOnDropHandle`], a task that dies with its owner.
//!
//! Modules point down: `connect` uses `tls`, `auth`, `backoff` and `error`; `tls` and
//! `auth` use `error`; the rest use nothing of this crate.

#![warn(missing_docs, unreachable_pub)]

pub mod auth;
pub mod backoff;
pub mod connect;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod reflection;
pub mod reflection_fetch;
pub mod signal;
pub mod tls;

pub use auth::{AuthLayer, BearerToken, TokenPolicy, constant_time_eq};
pub use backoff::Backoff;
pub use connect::{Connector, RegistryConn, Replica, Replicas, Rotation, registry_client};
pub use error::SecurityError;
pub use signal::{Signal, Signals};
pub use tls::TlsArgs;
pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::AbortOnDropHandle;
