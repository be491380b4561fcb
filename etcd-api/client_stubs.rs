//! The build step `etcd-api` and `bench` share: tonic client stubs for a
//! foreign gRPC API vendored under the crate's `proto/`, compiled with
//! protox so that building needs no `protoc`. Each build script includes
//! this file with `#[path]`: a crate of its own for one function would be
//! one more build dependency to compile first.

use std::path::PathBuf;

/// Compiles `proto/<file>` (and what it imports from `proto/`) into client
/// stubs in `OUT_DIR`.
pub fn compile(file: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([root.join(file)], [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
