//! A client for the service registry: discovery, client-side load balancing,
//! and calls to any registered gRPC service through its descriptors.
//!
//! Nothing here is compiled against a service's generated code: a service's
//! methods and messages are learned at run time from the descriptors its
//! instances registered (or, failing that, from their server reflection), so
//! a service this crate has never seen is callable as soon as it registers.
//!
//! # Layout
//! In layers: each module uses only those listed before it (and `status`,
//! `names`, `codec`, `lb`, which use nothing of this crate); no module uses
//! one that uses it back (`scripts/module-cycles.py client/src` checks).
//! - [`Connector`] (from the `registry-support` crate): TLS and the
//!   registry token, for the registry and every instance.
//! - [`status`]: a gRPC status as one readable line.
//! - [`directory`]: a live local copy of the registry's instances (Watch),
//!   failover between registry replicas, resuming from the last revision,
//!   reconnection with backoff, stale fallbacks after a registry restart
//!   (`directory/`: `mod.rs` the handle, `watch.rs` the watch task,
//!   `apply.rs` the pure snapshot joining and `apply`, `snapshot.rs` the
//!   types).
//! - [`descriptors`]: the descriptor cache ([`Descriptors`]): from the
//!   registry, else server reflection (`descriptors/reflection.rs`), kept,
//!   asked for again when a method is missing.
//! - [`resolve`]: `SERVICE/METHOD` to a method descriptor, with suggestions.
//! - [`names`]: how protobuf kinds, field types and method kinds are named.
//! - [`codec`]: the tonic codec for [`prost_reflect::DynamicMessage`].
//! - [`lb`]: load-balancing policies, one file per policy, named as on the
//!   command line (`random`, `weighted_random`, `weighted_round_robin`,
//!   `least_loaded`).
//! - [`call`]: picks an instance, calls it (any kind of method: unary,
//!   server, client or bidirectional streaming), retries once on
//!   `UNAVAILABLE` while no response has been received.
//! - [`channel`]: a balanced tonic `Channel` fed by the directory's changes,
//!   for programs with generated stubs that only want discovery.
//! - [`args`]: command-line arguments (JSON or `key=value`) into a request,
//!   or a sequence of requests for client-streaming methods; replies into
//!   JSON.
//! - [`render`]: what the `client` command prints (list, describe, the
//!   spread table, watch lines), as strings.
//! - [`load`]: `call --repeat`: many calls, counted per instance, stopped
//!   early by Ctrl-C or SIGTERM.
//! - [`commands`]: the commands (`list`, `describe`, `call`, `watch`), their
//!   clap arguments and their errors.
//! - [`repl`]: the interactive prompt with TAB completion.
//! - [`session`]: one run of `client`: connect, then a command or the prompt.
//! - `src/bin/client.rs`: the `client` flags, handed to [`session::run`].
//!
//! # Calling any method
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use registry_client::{args, call::{Caller, CallOptions, Reply}, resolve, Descriptors, Directory};
//! let directory = Directory::connect("127.0.0.1:50051")?;
//! directory.wait_synced(std::time::Duration::from_secs(3)).await?;
//! let descriptors = Descriptors::new(directory.clone());
//! let target = resolve::resolve(&descriptors, "calculator/Add").await?;
//! let request = args::parse_args(&target.method.input(), &["a=2", "b=3"])?;
//! let caller = Caller::new(directory, CallOptions::default());
//! let called = caller.call(&target, request).await?;
//! if let Reply::Unary(reply) = called.reply {
//!     println!("{} (from {}:{})", args::to_json(&reply), called.instance.host, called.instance.port);
//! }
//! # Ok(()) }
//! ```
//!
//! # Discovery only, with generated stubs
//! [`balanced_channel`] gives a tonic `Channel` over a service's instances
//! that follows the registry; see [`channel`].

#![warn(missing_docs, unreachable_pub)]

pub mod args;
pub mod call;
pub mod channel;
pub mod codec;
pub mod commands;
pub mod descriptors;
pub mod directory;
#[doc(hidden)]
pub mod fuzzing;
pub mod lb;
pub mod load;
pub mod names;
pub mod render;
pub mod repl;
pub mod resolve;
pub mod session;
pub mod status;

pub use channel::balanced_channel;
pub use descriptors::Descriptors;
pub use directory::Directory;
pub use support::Connector;

#[cfg(test)]
mod test_protos;
