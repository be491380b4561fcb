//! The plugins answer over gRPC with the typed clients; an unmounted plugin
//! answers UNIMPLEMENTED; health and reflection (v1, v1alpha) follow mounting.
#![allow(clippy::unwrap_used)]

mod common;

use common::{CHANGE, Node};
use futures::StreamExt;
use registry_proto::calculator::v1::BinaryRequest;
use registry_proto::calculator::v1::calculator_client::CalculatorClient;
use registry_proto::echo::v1::echo_client::EchoClient;
use registry_proto::echo::v1::{EchoRequest, EchoStreamRequest};
use testkit::Registry;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CALC_ONLY: &str = "[plugins.calculator]\nweight = 7\n";

fn req(a: f64, b: f64) -> BinaryRequest {
    BinaryRequest { a, b }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calculator_answers_and_refuses_non_finite_results() {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, CALC_ONLY);
    let mut calc = CalculatorClient::new(node.channel().await);
    assert_eq!(
        calc.add(req(2.0, 3.5)).await.unwrap().into_inner().value,
        5.5
    );
    assert_eq!(
        calc.subtract(req(2.0, 3.5))
            .await
            .unwrap()
            .into_inner()
            .value,
        -1.5
    );
    assert_eq!(
        calc.multiply(req(-2.0, 3.5))
            .await
            .unwrap()
            .into_inner()
            .value,
        -7.0
    );
    assert_eq!(
        calc.divide(req(7.0, 2.0)).await.unwrap().into_inner().value,
        3.5
    );

    let e = calc.divide(req(1.0, 0.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "divide(a=1, b=0): division by zero");
    let e = calc.multiply(req(1e308, 10.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("overflows to inf"), "{}", e.message());
    let e = calc.add(req(f64::NAN, 1.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("operand a is NaN"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_answers_once_and_as_a_stream_and_says_who_served() {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, "[plugins.echo]\nweight = 1\n");
    let mut echo = EchoClient::new(node.channel().await);
    let r = echo
        .echo(EchoRequest {
            message: "hello".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.message, "hello");
    assert_eq!(r.served_by, node.addr.to_string());

    let stream = echo
        .echo_stream(EchoStreamRequest {
            message: "tick".into(),
            count: 3,
            interval_ms: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let replies: Vec<_> = stream.collect().await;
    assert_eq!(replies.len(), 3);
    for r in replies {
        assert_eq!(r.unwrap().message, "tick");
    }
    // count 0 means 1.
    let zero: Vec<_> = echo
        .echo_stream(EchoStreamRequest {
            message: "once".into(),
            count: 0,
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(zero.len(), 1);

    for (count, interval_ms, needle) in [(1001, 0, "count"), (1, 10_001, "interval_ms")] {
        let e = echo
            .echo_stream(EchoStreamRequest {
                message: "x".into(),
                count,
                interval_ms,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(needle), "{}", e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_collects_a_client_stream_and_chats_message_by_message() {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, "[plugins.echo]\nweight = 1\n");
    let mut echo = EchoClient::new(node.channel().await);
    let msg = |m: &str| EchoRequest { message: m.into() };

    let joined = echo
        .echo_collect(futures::stream::iter([
            msg("one"),
            msg("two"),
            msg("three"),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.message, "one two three");
    assert_eq!(joined.served_by, node.addr.to_string());
    let none = echo
        .echo_collect(futures::stream::iter(Vec::new()))
        .await
        .unwrap();
    assert_eq!(none.into_inner().message, "");

    // Over the limits: RESOURCE_EXHAUSTED naming the limit.
    let e = echo
        .echo_collect(futures::stream::iter(vec![msg(""); 1001]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(e.message(), "EchoCollect takes at most 1000 messages");
    let big = "x".repeat(40_000);
    let e = echo
        .echo_collect(futures::stream::iter([msg(&big), msg(&big)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(
        e.message(),
        "EchoCollect joins at most 65536 bytes; message 2 would make it 80001"
    );

    // Each reply comes before the next message is even sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = echo
        .echo_chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for word in ["a", "b", "c"] {
        tx.send(msg(word)).await.unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!(reply.message, word);
        assert_eq!(reply.served_by, node.addr.to_string());
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmounted_plugin_is_unimplemented_and_health_follows_mounting() {
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, CALC_ONLY);
    let channel = node.channel().await;
    let mut echo = EchoClient::new(channel.clone());
    let e = echo
        .echo(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    assert_eq!(
        e.message(),
        "service echo.v1.Echo is not mounted on this node"
    );

    let health = HealthClient::new(channel.clone());
    let status = |name: &str| {
        let mut health = health.clone();
        let name = name.to_string();
        async move {
            health
                .check(HealthCheckRequest { service: name })
                .await
                .unwrap()
                .into_inner()
                .status()
        }
    };
    assert_eq!(status("").await, ServingStatus::Serving);
    assert_eq!(
        status("calculator.v1.Calculator").await,
        ServingStatus::Serving
    );
    assert_eq!(status("calculator").await, ServingStatus::Serving);
    assert_eq!(status("echo.v1.Echo").await, ServingStatus::NotServing);
    let e = health
        .clone()
        .check(HealthCheckRequest {
            service: "nope.v1.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Swap: mount echo, unmount calculator.
    node.write_config("[plugins.echo]\nweight = 1\n");
    testkit::eventually(CHANGE, "echo serving, calculator not", || {
        let status = &status;
        async move {
            (status("echo.v1.Echo").await == ServingStatus::Serving
                && status("calculator.v1.Calculator").await == ServingStatus::NotServing)
                .then_some(())
        }
    })
    .await;
    echo.echo(EchoRequest {
        message: "hi".into(),
    })
    .await
    .unwrap();
    let e = CalculatorClient::new(channel)
        .add(req(1.0, 1.0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_the_mounted_plugins() {
    use tonic_reflection::pb::{v1, v1alpha};
    let registry = Registry::start(&[]);
    let node = Node::start(registry.addr, CALC_ONLY);
    let channel = node.channel().await;

    let list = |channel: tonic::transport::Channel| async move {
        let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut answers = client
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answer.message_response
        else {
            panic!("unexpected answer {answer:?}");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    };
    // Only what is mounted is listed.
    assert_eq!(
        list(channel.clone()).await,
        [
            "calculator.v1.Calculator",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"
        ]
    );
    node.write_config("[plugins.calculator]\nweight = 7\n[plugins.echo]\nweight = 1\n");
    testkit::eventually(CHANGE, "echo listed by reflection", || {
        let channel = channel.clone();
        async move {
            list(channel)
                .await
                .contains(&"echo.v1.Echo".to_string())
                .then_some(())
        }
    })
    .await;

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "calculator.v1.Calculator".into(),
            ),
        ),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        answer.message_response
    else {
        panic!("unexpected answer {answer:?}");
    };
    assert_eq!(files.file_descriptor_proto.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_the_plugins() {
    let registry = Registry::start(&[]);
    let (node, ca, _dir) = common::tls_node(registry.addr, CALC_ONLY);
    // Registered as usual (the registry link itself is plaintext here).
    let mut client = registry.client().await;
    common::wait_for_weights(&mut client, node.addr, &[("calculator", 7)]).await;

    let channel = ca.channel(node.addr, "localhost").await;
    let r = CalculatorClient::new(channel)
        .add(req(20.0, 22.0))
        .await
        .unwrap();
    assert_eq!(r.into_inner().value, 42.0);
    // Plaintext is refused (at connect or at the call).
    let plain = match tonic::transport::Channel::from_shared(node.url())
        .unwrap()
        .connect()
        .await
    {
        Ok(channel) => CalculatorClient::new(channel)
            .add(req(1.0, 1.0))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(plain);
}
