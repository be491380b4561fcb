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
//! `names`, `codec`, `lb`, which use nothing of this crate).
//! - [`connect`]: TLS and the registry token ([`Connector`]), for the
//!   registry and every instance.
//! - [`status`]: a gRPC status as one readable line.
//! - [`directory`]: a live local copy of the registry's instances (Watch),
//!   reconnection with backoff, stale fallbacks after a registry restart
//!   (`directory/{mod,watch,apply}.rs`: types and handle, the watch task,
//!   the pure snapshot joining and `apply`).
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
pub mod connect;
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
pub use connect::Connector;
pub use descriptors::Descriptors;
pub use directory::Directory;

#[cfg(test)]
pub(crate) mod test_protos {
    //! Protos compiled at test time, so unit tests need no generated code.

    use prost_reflect::DescriptorPool;
    use protox::file::{File, FileResolver};

    struct Sources(&'static [(&'static str, &'static str)]);

    impl FileResolver for Sources {
        fn open_file(&self, name: &str) -> Result<File, protox::Error> {
            match self.0.iter().find(|(n, _)| *n == name) {
                Some((n, src)) => File::from_source(n, src),
                None => Err(protox::Error::file_not_found(name)),
            }
        }
    }

    fn compile(sources: &'static [(&'static str, &'static str)]) -> DescriptorPool {
        let mut compiler = protox::Compiler::with_file_resolver(Sources(sources));
        compiler.include_imports(true);
        for (name, _) in sources {
            compiler.open_file(name).expect("test proto compiles");
        }
        DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice()).expect("valid")
    }

    /// A copy of the calculator's interface.
    pub(crate) fn calculator_pool() -> DescriptorPool {
        compile(&[(
            "calculator.proto",
            r#"syntax = "proto3"; package calculator.v1;
            service Calculator {
              rpc Add(BinaryRequest) returns (Result);
              rpc Subtract(BinaryRequest) returns (Result);
              rpc Multiply(BinaryRequest) returns (Result);
              rpc Divide(BinaryRequest) returns (Result);
            }
            message BinaryRequest { double a = 1; double b = 2; }
            message Result { double value = 1; }"#,
        )])
    }

    /// A service with every kind of field and method.
    pub(crate) fn shop_pool() -> DescriptorPool {
        compile(&[
            (
                "common.proto",
                r#"syntax = "proto3"; package shop.v1; message Address { string city = 1; }"#,
            ),
            (
                "shop.proto",
                r#"syntax = "proto3"; package shop.v1; import "common.proto";
                enum Color { COLOR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }
                message Order {
                  uint64 item_id = 1; int32 quantity = 2; Color color = 3; bool gift = 4;
                  repeated string tags = 5; string note = 6; Address address = 7;
                  map<string, int32> labels = 8; bytes blob = 9; float ratio = 10; sint64 delta = 11;
                }
                service Shop {
                  rpc Place(Order) returns (Order);
                  rpc Watch(Order) returns (stream Order);
                  rpc Upload(stream Order) returns (Order);
                  rpc Chat(stream Order) returns (stream Order);
                }"#,
            ),
        ])
    }
}
