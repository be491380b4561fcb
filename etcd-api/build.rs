//! Compiles the vendored subset of etcd's gRPC API (`proto/etcdserverpb`) with
//! protox, so building needs neither `protoc` nor the etcd-client crate
//! (whose build script would require `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = root.join("etcdserverpb").join("rpc.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([&file], [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
