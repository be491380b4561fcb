//! Compiles the vendored subset of etcd's gRPC API (`proto/etcdserverpb`) with
//! protox, so building needs neither `protoc` nor the etcd-client crate
//! (whose build script would require `protoc`).

#[path = "client_stubs.rs"]
mod client_stubs;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    client_stubs::compile("etcdserverpb/rpc.proto")
}
