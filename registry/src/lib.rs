//! The service registry: the authority on which service instances exist.
//!
//! Nodes grant themselves a lease, register instances under it and keep it
//! alive over a KeepAlive stream; when the stream breaks or heartbeats stop
//! for a TTL, the lease and its instances go. Clients list, resolve, fetch
//! descriptors, and watch a stream of changes with strictly increasing
//! revisions. The protocol is `proto/proto/registry/v1/registry.proto`.
//!
//! A call goes: [`service`] validates it ([`validate`]), applies it to the
//! shared [`store::Store`], which runs it on the [`state::State`] under one
//! lock and hands the resulting events to its [`store::Publish`] sink (the
//! watch hub, [`watch`]) before releasing it; errors become gRPC statuses in
//! one place ([`error`]).
//! Optional access tokens and TLS come from the `support` crate (`registry-support`),
//! shared with the node host and the client.
//!
//! # Layout
//! - [`state`]: the state machine: services, instances, leases, revisions,
//!   interned descriptors. Pure and synchronous; every mutation returns its
//!   events.
//! - [`lease`]: leases and their deadlines ([`lease::Leases`]), and how a
//!   lease ends (revoked, its KeepAlive stream closed, expired): one place,
//!   depending on nothing else in the crate.
//! - [`store`]: the shared handle: state behind one lock, changes handed to
//!   a [`store::Publish`] sink under it (it knows nothing of watchers), and
//!   the lease sweeper, the one task that expires leases at their deadline.
//!   [`store::Writes`] is the seam writes go through (the memory store
//!   applies them to that state; reads and Watch always come from it);
//!   `store/etcd.rs`: the etcd store's `--store etcd://...` URL and its key
//!   layout (lease records with a hash of the secret, content-addressed
//!   descriptor chunks); `store/etcd_client.rs`: the connection to etcd
//!   (every endpoint, optional TLS) and the cluster identity that becomes
//!   the registry id shared by every replica, over
//!   `store/etcd_failover.rs` (one member at a time, the next as soon as
//!   it fails); `store/etcd_store.rs`: the
//!   etcd store itself (`--store etcd://...`): writes as etcd
//!   transactions, the local store a mirror fed by a watch of the prefix,
//!   registry leases backed by etcd leases and adopted by another replica
//!   when theirs dies.
//! - [`watch`]: the fan-out to watchers: `encode.rs` (messages written to
//!   bytes once, with their gRPC prefix, sent as they are), `hub.rs` (the shared
//!   log of changes, snapshot jobs, the memory budget), `mod.rs` (one
//!   watcher's stream: snapshot, changes, falling behind).
//! - [`validate`]: every request field checked, and every fixed limit
//!   (sizes, counts) as a documented constant.
//! - [`limits`]: the limits an operator tunes by flag: instances per lease
//!   and per service, Watch streams per connection, registrations per
//!   second per peer (an IPv4 address or an IPv6 /64).
//! - [`error`]: every failure, and its gRPC status code.
//! - [`service`]: the gRPC service: validate, apply, answer; Watch's response
//!   body written from the encoded messages ([`service::WithWatch`]).
//! - [`server`]: serving it with health and reflection, and shutting down.
//! - [`tokens`]: access tokens from flags or a `--token-file`.
//! - [`metrics`]: the Prometheus metrics, one set per process.
//! - [`http`]: the `--http` listener: `/metrics` and the live dashboard
//!   (`http/fleet.rs`: the fleet as the dashboard sees it, from the
//!   registry's own watch; `http/assets/`: page, script, style).
//! - [`xds`]: the registry as an xDS control plane (ADS) for proxyless
//!   gRPC clients dialing `xds:///SERVICE`.
//! - [`dns`]: the DNS interface (`--dns`): A, AAAA and SRV records of
//!   `SERVICE.service.DOMAIN`, answered from xDS's view of the registry.
//! - [`config`]: what an operator can tune: TTLs, tokens, TLS, limits.
//! - [`allocator`]: the binary's allocator (jemalloc, which returns freed
//!   memory to the system) and its statistics for `/metrics`.
//! - [`cli`]: the command line's flags and the [`Config`] they make;
//!   `bin/registry.rs` parses them and serves.

#![warn(missing_docs, unreachable_pub)]

pub mod allocator;
pub mod cli;
pub mod config;
pub mod dns;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod tokens;
pub mod validate;
pub mod watch;
pub mod xds;

pub use config::Config;
pub use server::{Backend, run, run_with_http, serve};
