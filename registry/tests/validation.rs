//! Every invalid request is refused with INVALID_ARGUMENT naming the field,
//! and changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::Registry;
use tonic::Code;

#[tokio::test]
async fn invalid_requests_name_the_field_and_change_nothing() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    register(&mut client, &lease, instance("svc", "keep", 7000)).await;
    let before = everything(&mut client).await;

    let base = || register_request(&lease, instance("svc", "new", 7001));
    let with = |f: &dyn Fn(&mut pb::Instance)| {
        let mut r = base();
        f(r.instance.as_mut().unwrap());
        r
    };
    let long_meta = |n: usize, value: usize| {
        move |i: &mut pb::Instance| {
            for k in 0..n {
                i.metadata.insert(format!("k{k}"), "v".repeat(value));
            }
        }
    };
    let cases: Vec<(&str, pb::RegisterRequest)> = vec![
        (
            "lease_id",
            pb::RegisterRequest {
                lease_id: 0,
                ..base()
            },
        ),
        (
            "lease_secret",
            pb::RegisterRequest {
                lease_secret: String::new(),
                ..base()
            },
        ),
        (
            "instance",
            pb::RegisterRequest {
                instance: None,
                ..base()
            },
        ),
        ("instance.service", with(&|i| i.service = String::new())),
        ("instance.service", with(&|i| i.service = "_svc".into())),
        ("instance.service", with(&|i| i.service = "a/b".into())),
        ("instance.service", with(&|i| i.service = "s".repeat(129))),
        (
            "instance.instance_id",
            with(&|i| i.instance_id = "x".repeat(129)),
        ),
        (
            "instance.instance_id",
            with(&|i| i.instance_id = "tab\there".into()),
        ),
        ("instance.host", with(&|i| i.host = String::new())),
        ("instance.host", with(&|i| i.host = "no spaces".into())),
        (
            "instance.host",
            with(&|i| i.host = format!("{}.com", "a".repeat(64))),
        ),
        ("instance.host", with(&|i| i.host = "h".repeat(254))),
        ("instance.port", with(&|i| i.port = 0)),
        ("instance.port", with(&|i| i.port = 70000)),
        ("instance.weight", with(&|i| i.weight = Some(1001))),
        ("instance.metadata", with(&long_meta(65, 1))),
        ("instance.metadata", with(&long_meta(20, 1000))),
        ("instance.metadata[\"k0\"]", with(&long_meta(1, 1025))),
        (
            "instance.metadata",
            with(&|i| {
                i.metadata.insert(String::new(), "v".into());
            }),
        ),
        (
            "instance.metadata",
            with(&|i| {
                i.metadata.insert("k".repeat(129), "v".into());
            }),
        ),
        (
            "file_descriptor_set",
            with(&|i| i.proto_service = "calculator.v1.Calculator".into()),
        ),
        (
            "file_descriptor_set",
            pb::RegisterRequest {
                file_descriptor_set: b"not a descriptor set".to_vec(),
                ..base()
            },
        ),
        (
            "file_descriptor_set",
            pb::RegisterRequest {
                file_descriptor_set: vec![0; 4 * 1024 * 1024 + 1],
                ..base()
            },
        ),
        (
            "instance.proto_service",
            pb::RegisterRequest {
                file_descriptor_set: registry_proto::CALCULATOR_DESCRIPTORS.to_vec(),
                ..with(&|i| i.proto_service = "echo.v1.Echo".into())
            },
        ),
        // A syntax prost-reflect cannot build (it used to panic on one).
        (
            "file_descriptor_set",
            pb::RegisterRequest {
                file_descriptor_set: testkit::descriptors_with_syntax("S", "editions"),
                ..base()
            },
        ),
        // Defined by its descriptors, but 513 bytes: every instance would
        // store it and every Resolve send it.
        (
            "instance.proto_service",
            pb::RegisterRequest {
                file_descriptor_set: testkit::descriptors_defining(&"S".repeat(511)),
                ..with(&|i| i.proto_service = format!("p.{}", "S".repeat(511)))
            },
        ),
    ];
    for (field, request) in cases {
        let err = client.register(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "expected the message to name {field}, got {:?}",
            err.message()
        );
    }
    let err = client
        .register(with(&|i| i.port = 70000))
        .await
        .unwrap_err();
    assert_eq!(err.message(), "instance.port: must be 1..=65535, got 70000");

    // The other calls.
    let update = || pb::UpdateRequest {
        lease_id: lease.id,
        lease_secret: lease.secret.clone(),
        service: "svc".into(),
        instance_id: "keep".into(),
        ..Default::default()
    };
    for (field, request) in [
        (
            "weight",
            pb::UpdateRequest {
                weight: Some(5000),
                ..update()
            },
        ),
        (
            "service",
            pb::UpdateRequest {
                service: "?".into(),
                ..update()
            },
        ),
        (
            "instance_id",
            pb::UpdateRequest {
                instance_id: String::new(),
                ..update()
            },
        ),
        (
            "metadata",
            pb::UpdateRequest {
                metadata: [("a".to_string(), "b".to_string())].into(),
                ..update()
            },
        ),
        (
            "lease_id",
            pb::UpdateRequest {
                lease_id: 0,
                ..update()
            },
        ),
    ] {
        let err = client.update(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {err:?}"
        );
    }
    let err = client
        .deregister(pb::DeregisterRequest {
            lease_id: lease.id,
            lease_secret: lease.secret.clone(),
            service: String::new(),
            instance_id: "keep".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("service:"), "{err:?}");
    let err = client
        .resolve(pb::ResolveRequest {
            service: "bad name".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("service:"));
    let err = client
        .get_descriptors(pb::GetDescriptorsRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("service:"));
    let err = client
        .watch(pb::WatchRequest {
            services: vec!["ok".into(), "not ok".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("services[1]:"), "{err:?}");
    let err = client
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.id,
            lease_secret: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("lease_secret:"));

    assert_eq!(everything(&mut client).await, before, "state untouched");
}
