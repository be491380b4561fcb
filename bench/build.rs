//! Compiles the Nacos 2.x client protocol r-nacos speaks (`proto/nacos`) with
//! protox, as `etcd-api` does etcd's: building the bench needs no `protoc`.

#[path = "../etcd-api/client_stubs.rs"]
mod client_stubs;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    client_stubs::compile("nacos/nacos_grpc_service.proto")
}
