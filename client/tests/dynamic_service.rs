//! A service this crate has never seen: its .proto is compiled here, at test
//! time, served by an in-test server that answers generically, registered
//! with its descriptors, and called through the `client` binary. A second
//! copy registers without descriptors: the client falls back to the
//! instance's server reflection.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value};
use registry_client::codec::DynamicCodec;
use registry_proto::registry::v1::Instance;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use testkit::Registry;

const GREETER_PROTO: &str = r#"
syntax = "proto3";
package greeter.v1;

enum Mood { MOOD_UNSPECIFIED = 0; CHEERFUL = 1; GRUMPY = 2; }

message GreetRequest {
  string name = 1;
  Mood mood = 2;
  uint32 times = 3;
}

message GreetReply {
  string greeting = 1;
}

service Greeter {
  rpc Greet(GreetRequest) returns (GreetReply);
}
"#;

/// Compiles the greeter proto with protox into an encoded FileDescriptorSet.
fn greeter_descriptors() -> Vec<u8> {
    let dir = testkit::TempDir::new("greeter");
    std::fs::write(dir.join("greeter.proto"), GREETER_PROTO).unwrap();
    let set = protox::compile([dir.join("greeter.proto")], [dir.path()]).unwrap();
    prost::Message::encode_to_vec(&set)
}

/// Answers greeter.v1.Greeter/Greet from descriptors alone.
#[derive(Clone)]
struct Greeter {
    input: MessageDescriptor,
    output: MessageDescriptor,
}

impl tonic::server::NamedService for Greeter {
    const NAME: &'static str = "greeter.v1.Greeter";
}

impl tonic::server::UnaryService<DynamicMessage> for Greeter {
    type Response = DynamicMessage;
    type Future = std::future::Ready<Result<tonic::Response<DynamicMessage>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<DynamicMessage>) -> Self::Future {
        let req = request.into_inner();
        let name = req
            .get_field_by_name("name")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mood = req
            .get_field_by_name("mood")
            .and_then(|v| v.as_enum_number())
            .unwrap_or(0);
        let times = req
            .get_field_by_name("times")
            .and_then(|v| v.as_u32())
            .unwrap_or(0)
            .max(1);
        let word = if mood == 2 { "hmpf" } else { "hello" };
        let mut reply = DynamicMessage::new(self.output.clone());
        reply.set_field_by_name(
            "greeting",
            Value::String(vec![format!("{word}, {name}"); times as usize].join("; ")),
        );
        std::future::ready(Ok(tonic::Response::new(reply)))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Greeter {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if request.uri().path() != "/greeter.v1.Greeter/Greet" {
                return Ok(tonic::Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(DynamicCodec::new(this.input.clone()));
            Ok(grpc.unary(this, request).await)
        })
    }
}

/// Serves the greeter (and reflection) on a free loopback port.
async fn serve(descriptors: &[u8]) -> SocketAddr {
    let pool = DescriptorPool::decode(descriptors).unwrap();
    let greeter = Greeter {
        input: pool.get_message_by_name("greeter.v1.GreetRequest").unwrap(),
        output: pool.get_message_by_name("greeter.v1.GreetReply").unwrap(),
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .build_v1()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(greeter)
            .add_service(reflection)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// Registers `service` at `addr` under a lease kept alive in the background.
async fn register(registry: &Registry, service: &str, addr: SocketAddr, descriptors: Vec<u8>) {
    let proto_service = if descriptors.is_empty() {
        ""
    } else {
        "greeter.v1.Greeter"
    };
    let instance = Instance {
        service: service.into(),
        host: addr.ip().to_string(),
        port: u32::from(addr.port()),
        weight: Some(1),
        proto_service: proto_service.into(),
        ..Default::default()
    };
    register_by_hand(registry, 0, instance, descriptors).await;
}

/// Runs the client off the async runtime (it blocks).
async fn client_async(
    registry: SocketAddr,
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        client(registry, &args)
    })
    .await
    .unwrap()
}

fn greeting(out: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(out).unwrap();
    v["greeting"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_never_seen_before_is_callable_from_its_registered_descriptors() {
    let registry = Registry::start(&[]);
    let descriptors = greeter_descriptors();
    let addr = serve(&descriptors).await;
    register(&registry, "greeter", addr, descriptors).await;

    let (status, out, err) =
        client_async(registry.addr, &["call", "greeter/Greet", "name=Ada"]).await;
    assert!(status.success(), "{err}");
    assert_eq!(greeting(&out), "hello, Ada");

    let (status, out, err) = client_async(
        registry.addr,
        &[
            "call",
            "greeter.v1.Greeter/Greet",
            r#"{"name": "Bob", "mood": "GRUMPY", "times": 2}"#,
        ],
    )
    .await;
    assert!(status.success(), "{err}");
    assert_eq!(greeting(&out), "hmpf, Bob; hmpf, Bob");

    let (status, _, err) =
        client_async(registry.addr, &["call", "greeter/Greet", "mood=SAD"]).await;
    assert!(!status.success());
    assert!(
        err.contains("values: MOOD_UNSPECIFIED, CHEERFUL, GRUMPY"),
        "{err}"
    );

    let (status, out, err) = client_async(registry.addr, &["describe", "greeter"]).await;
    assert!(status.success(), "{err}");
    assert!(
        out.contains("name (string), mood (enum greeter.v1.Mood), times (uint32)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_registered_descriptors_the_client_asks_the_instance_by_reflection() {
    let registry = Registry::start(&[]);
    let addr = serve(&greeter_descriptors()).await;
    register(&registry, "shy-greeter", addr, Vec::new()).await;

    let (status, out, err) = client_async(
        registry.addr,
        &["call", "shy-greeter/Greet", "name=Cy", "mood=CHEERFUL"],
    )
    .await;
    assert!(status.success(), "{err}");
    assert_eq!(greeting(&out), "hello, Cy");
}
