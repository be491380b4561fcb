//! Access tokens and TLS on the real binary.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use registry_proto::registry::v1 as pb;
use support::{BearerToken, TlsArgs, registry_client};
use testkit::Registry;
use tonic::Code;

#[tokio::test]
async fn tokens_guard_writes_and_reads() {
    let registry = Registry::start(&["--write-token", "w-secret", "--read-token", "r-secret"]);
    let channel = tonic::transport::Channel::from_shared(registry.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with =
        |token: Option<&str>| registry_client(channel.clone(), BearerToken::new(token).unwrap());

    let err = with(None)
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: LONG_TTL })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = with(Some("r-secret"))
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: LONG_TTL })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the read token cannot write"
    );

    let mut writer = with(Some("w-secret"));
    let lease = writer
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: LONG_TTL })
        .await
        .unwrap()
        .into_inner();
    let lease = Lease {
        id: lease.lease_id,
        secret: lease.lease_secret,
    };
    writer
        .register(register_request(&lease, instance("svc", "a", 1)))
        .await
        .unwrap();

    let resolve = pb::ResolveRequest {
        service: "svc".into(),
    };
    let err = with(None).resolve(resolve.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = with(Some("wrong"))
        .resolve(resolve.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    for token in ["r-secret", "w-secret"] {
        let found = with(Some(token))
            .resolve(resolve.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.instances.len(), 1, "{token}");
    }

    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca() {
    let dir = std::env::temp_dir().join(format!("registry-tls-{}", std::process::id()));
    let ca = testkit::certs::TestCa::new(&dir, "test");
    let server = ca.server("registry", &["127.0.0.1", "localhost"]);
    let registry = Registry::start(&[
        "--tls-cert",
        server.cert.to_str().unwrap(),
        "--tls-key",
        server.key.to_str().unwrap(),
    ]);
    let tls = TlsArgs {
        tls_ca: Some(ca.ca_pem.clone()),
        ..TlsArgs::default()
    };
    let channel = tls
        .endpoint(&registry.addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = registry_client(channel, BearerToken::none());
    let lease = client
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: LONG_TTL })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(lease.lease_id, 0);

    // A plaintext client gets nowhere.
    let plain = tonic::transport::Channel::from_shared(registry.url())
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        let err = pb::registry_client::RegistryClient::new(plain)
            .list_services(pb::ListServicesRequest {})
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let dir = std::env::temp_dir().join(format!("registry-mtls-{}", std::process::id()));
    let ca = testkit::certs::TestCa::new(&dir, "mtls");
    let server = ca.server("registry", &["127.0.0.1"]);
    let node = ca.client("node");
    let registry = Registry::start(&[
        "--tls-cert",
        server.cert.to_str().unwrap(),
        "--tls-key",
        server.key.to_str().unwrap(),
        "--tls-ca",
        ca.ca_pem.to_str().unwrap(),
        "--tls-require-client-cert",
    ]);
    let addr = registry.addr.to_string();
    let list = |tls: TlsArgs| {
        let addr = addr.clone();
        async move {
            let channel = tls.endpoint(&addr).unwrap().connect().await?;
            let result = registry_client(channel, BearerToken::none())
                .list_services(pb::ListServicesRequest {})
                .await;
            Ok::<_, tonic::transport::Error>(result.is_ok())
        }
    };
    let anonymous = TlsArgs {
        tls_ca: Some(ca.ca_pem.clone()),
        ..TlsArgs::default()
    };
    assert!(
        !matches!(list(anonymous).await, Ok(true)),
        "a client without a certificate must be refused"
    );
    let with_cert = TlsArgs {
        tls_ca: Some(ca.ca_pem.clone()),
        tls_cert: Some(node.cert.clone()),
        tls_key: Some(node.key.clone()),
        ..TlsArgs::default()
    };
    assert!(
        list(with_cert).await.unwrap(),
        "a client with a certificate is served"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
