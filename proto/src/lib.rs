//! Generated code and descriptors for the registry protocol and the bundled
//! plugins.
//!
//! Every `.proto` file under `proto/proto/` is compiled by `build.rs`; each
//! package gets a module here and a `*_DESCRIPTORS` constant holding the
//! encoded `FileDescriptorSet` of that file and its imports: the bytes a node
//! sends to the registry so clients can learn its methods at run time.
//!
//! Only the protocol: the generated code, the descriptors, [`descriptors`]
//! (descriptor sets from the network, decoded without panicking) and
//! [`limits`] (the protocol's field limits, for the registry and the
//! nodes). What the binaries share beyond it (TLS, tokens, the registry
//! connector, backoff, signals, logging) is the `registry-support` crate.
//!
//! # Layout
//! - `proto/`: the `.proto` files, compiled by `build.rs` with protox.
//! - [`registry`], [`calculator`], [`echo`]: the generated code.
//! - [`descriptors`]: decoding descriptor sets received from the network.
//! - [`limits`]: the fixed field limits of the protocol.

#![warn(missing_docs)]

pub mod descriptors;
pub mod limits;

/// `registry.v1`: the registry service and its messages.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod registry {
    pub mod v1 {
        tonic::include_proto!("registry.v1");
    }
}

/// `calculator.v1`: the calculator plugin.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod calculator {
    pub mod v1 {
        tonic::include_proto!("calculator.v1");
    }
}

/// `echo.v1`: the echo plugin.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod echo {
    pub mod v1 {
        tonic::include_proto!("echo.v1");
    }
}

impl registry::v1::Instance {
    /// The weight to balance by: the field as sent, or
    /// [`limits::DEFAULT_WEIGHT`] when it is absent (a peer that never sets
    /// it). Prefer this to prost's `weight()`, which reads an absent field
    /// as 0.
    pub fn effective_weight(&self) -> u32 {
        self.weight.unwrap_or(limits::DEFAULT_WEIGHT)
    }
}

/// Descriptors of `registry/v1/registry.proto`.
pub const REGISTRY_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/registry.v1.fds.bin"));
/// Descriptors of `calculator/v1/calculator.proto`.
pub const CALCULATOR_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/calculator.v1.fds.bin"));
/// Descriptors of `echo/v1/echo.proto`.
pub const ECHO_DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo.v1.fds.bin"));
/// Descriptors of every file above together.
pub const ALL_DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/all.fds.bin"));
