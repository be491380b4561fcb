//! Register, deregister, list, resolve and descriptors against the real
//! binary.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::Registry;
use tonic::Code;

#[tokio::test]
async fn register_list_resolve_deregister() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    assert_ne!(lease.id, 0);
    assert_eq!(lease.secret.len(), 32);

    let mut calc = instance("calculator", "", 7001);
    calc.weight = None;
    let r = register(&mut client, &lease, calc).await;
    let stored = r.instance.unwrap();
    assert_eq!(
        stored.instance_id, "127.0.0.1:7001",
        "default id is host:port"
    );
    assert_eq!(stored.weight, Some(1), "an absent weight is stored as 1");
    assert_eq!(stored.lease_id, lease.id);
    assert_eq!(stored.revision, r.revision);
    let mut b = instance("calculator", "b", 7002);
    b.weight = Some(5);
    register(&mut client, &lease, b).await;
    register(&mut client, &lease, instance("echo", "e1", 7003)).await;

    let list = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.instance_count))
        .collect();
    assert_eq!(names, [("calculator", 2), ("echo", 1)]);
    if !testkit::etcd::under_test() {
        assert_eq!(list.revision, 3);
    }

    assert_eq!(
        ids(&mut client, "calculator").await,
        ["127.0.0.1:7001", "b"],
        "sorted by instance_id"
    );
    assert!(ids(&mut client, "nobody").await.is_empty());

    // Registering again under the same lease updates in place.
    let mut b2 = instance("calculator", "b", 7002);
    b2.weight = Some(9);
    let r = register(&mut client, &lease, b2).await;
    assert_eq!(r.instance.unwrap().weight, Some(9));
    assert_eq!(ids(&mut client, "calculator").await.len(), 2);

    deregister(&mut client, &lease, "calculator", "b")
        .await
        .unwrap();
    assert_eq!(ids(&mut client, "calculator").await, ["127.0.0.1:7001"]);
    let err = deregister(&mut client, &lease, "calculator", "b")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    deregister(&mut client, &lease, "echo", "e1").await.unwrap();
    let list = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.services.len(),
        1,
        "a service without instances is not listed"
    );

    let revoked = client
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.id,
            lease_secret: lease.secret.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.removed, 1);
    assert!(everything(&mut client).await.0.is_empty());
}

#[tokio::test]
async fn update_changes_weight_and_metadata() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    let mut i = instance("echo", "e", 1);
    i.metadata.insert("zone".into(), "a".into());
    register(&mut client, &lease, i).await;
    let update = |weight: Option<u32>, replace: bool| pb::UpdateRequest {
        lease_id: lease.id,
        lease_secret: lease.secret.clone(),
        service: "echo".into(),
        instance_id: "e".into(),
        weight,
        replace_metadata: replace,
        metadata: [("zone".to_string(), "b".to_string())].into(),
    };
    let r = client
        .update(update(Some(7), true))
        .await
        .unwrap()
        .into_inner();
    let stored = r.instance.unwrap();
    assert_eq!(stored.weight, Some(7));
    assert_eq!(stored.metadata["zone"], "b");
    let err = client.update(update(Some(7), false)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // 0 drains: stored and returned as 0 (not the default 1), still listed,
    // until a weight brings it back.
    let mut drain = update(Some(0), false);
    drain.metadata.clear();
    let r = client.update(drain).await.unwrap().into_inner();
    assert_eq!(r.instance.unwrap().weight, Some(0));
    let listed = client
        .resolve(pb::ResolveRequest {
            service: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(listed.len(), 1, "a drained instance stays listed");
    assert_eq!(listed[0].weight, Some(0));
    let mut undrain = update(Some(3), false);
    undrain.metadata.clear();
    let r = client.update(undrain).await.unwrap().into_inner();
    assert_eq!(r.instance.unwrap().weight, Some(3));
    let mut missing = update(None, true);
    missing.instance_id = "nope".into();
    assert_eq!(
        client.update(missing).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn descriptors_round_trip() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    let mut calc = instance("calculator", "c", 7001);
    calc.proto_service = "calculator.v1.Calculator".into();
    let mut request = register_request(&lease, calc);
    request.file_descriptor_set = registry_proto::CALCULATOR_DESCRIPTORS.to_vec();
    client.register(request).await.unwrap();

    let d = testkit::calls::descriptors(&mut client, "calculator").await;
    assert_eq!(d.proto_service, "calculator.v1.Calculator");
    assert_eq!(
        d.file_descriptor_set,
        registry_proto::CALCULATOR_DESCRIPTORS
    );
    let list = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.services[0].proto_service, "calculator.v1.Calculator");

    // No descriptors registered / no such service: NOT_FOUND.
    register(&mut client, &lease, instance("echo", "e", 7002)).await;
    for service in ["echo", "nobody"] {
        let err = client
            .get_descriptors(pb::GetDescriptorsRequest {
                service: service.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{service}");
    }
}
