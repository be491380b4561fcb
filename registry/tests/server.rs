//! The server around the service: message size limit, health, reflection,
//! clean shutdown on signals.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use testkit::Registry;
use tonic::Code;

async fn channel(registry: &Registry) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(registry.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_oversized_request_is_refused_and_the_registry_keeps_serving() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    let mut request = register_request(&lease, instance("svc", "big", 1));
    request.file_descriptor_set = vec![0; 9 * 1024 * 1024];
    let err = client.register(request).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");

    // Same connection and a new one both still work.
    register(&mut client, &lease, instance("svc", "small", 1)).await;
    let mut fresh = registry.client().await;
    assert_eq!(ids(&mut fresh, "svc").await, ["small"]);
}

#[tokio::test]
async fn health_answers_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let registry = Registry::start(&[]);
    let mut health = HealthClient::new(channel(&registry).await);
    for service in ["", "registry.v1.Registry"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_registry_in_v1_and_v1alpha() {
    let registry = Registry::start(&[]);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut v1 = ServerReflectionClient::new(channel(&registry).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = v1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"registry.v1.Registry".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest as Req, server_reflection_client::ServerReflectionClient as Alpha,
        server_reflection_request::MessageRequest as AlphaRequest,
        server_reflection_response::MessageResponse as AlphaResponse,
    };
    let mut alpha = Alpha::new(channel(&registry).await);
    let request = Req {
        host: String::new(),
        message_request: Some(AlphaRequest::FileContainingSymbol(
            "registry.v1.Registry".into(),
        )),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap().message_response;
    assert!(
        matches!(response, Some(AlphaResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{response:?}"
    );
}

// Multi-threaded: the test blocks a thread waiting for the exit, and the
// client's connection must still answer the server's goodbye meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_ctrl_c_stop_it_cleanly_even_with_open_streams() {
    for signal in [15, 2] {
        let mut registry = Registry::start(&[]);
        let mut client = registry.client().await;
        let lease = grant(&mut client, LONG_TTL).await;
        let _ka = keep_alive(&mut client, &lease).await;
        let mut stream = watch(&mut client, &[]).await;
        stream.message().await.unwrap().unwrap();
        registry.process.signal(signal);
        let status = registry.process.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "signal {signal}: {status:?}");
        // The open watch was ended by the server, not left hanging.
        let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
        assert!(matches!(end, Ok(Ok(None)) | Ok(Err(_))), "{end:?}");
    }
}

#[tokio::test]
async fn help_documents_the_flags() {
    let mut cmd = testkit::command("registry");
    cmd.arg("--help");
    let (status, stdout, _) = testkit::run(cmd, Duration::from_secs(10));
    assert!(status.success());
    for flag in [
        "--listen",
        "--default-ttl-ms",
        "--min-ttl-ms",
        "--max-ttl-ms",
        "--write-token",
        "--read-token",
        "--token-file",
        "--max-instances-per-lease",
        "--max-instances-per-service",
        "--max-watches-per-connection",
        "--max-registrations-per-sec-per-ip",
        "--tls-cert",
        "--tls-key",
        "--tls-ca",
        "--tls-require-client-cert",
        "0.0.0.0:50051",
        "1500",
    ] {
        assert!(stdout.contains(flag), "--help lacks {flag}:\n{stdout}");
    }
}

#[tokio::test]
async fn a_busy_port_or_bad_flags_fail_with_a_clear_message() {
    let first = Registry::start(&[]);
    let mut cmd = testkit::command("registry");
    cmd.args(["--listen", &first.addr.to_string()]);
    let (status, stdout, stderr) = testkit::run(cmd, Duration::from_secs(10));
    assert!(!status.success());
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");

    let mut cmd = testkit::command("registry");
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--min-ttl-ms",
        "500",
        "--max-ttl-ms",
        "100",
    ]);
    let (status, _, stderr) = testkit::run(cmd, Duration::from_secs(10));
    assert!(!status.success());
    assert!(stderr.contains("--min-ttl-ms"), "{stderr}");

    // A TTL beyond a week (here u64::MAX, which would overflow the clock)
    // is refused by name, with the range.
    let mut cmd = testkit::command("registry");
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--max-ttl-ms",
        &u64::MAX.to_string(),
    ]);
    let (status, stdout, stderr) = testkit::run(cmd, Duration::from_secs(10));
    assert!(!status.success());
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("--max-ttl-ms") && stderr.contains("1..=604800000"),
        "{stderr}"
    );
}
