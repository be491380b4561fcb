//! Ownership: only an instance's own lease, with its secret, may change it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::Registry;
use tonic::Code;

#[tokio::test]
async fn another_lease_cannot_touch_an_instance() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let owner = grant(&mut client, LONG_TTL).await;
    let other = grant(&mut client, LONG_TTL).await;
    let mut original = instance("svc", "x", 7000);
    original.weight = Some(3);
    register(&mut client, &owner, original).await;
    let before = everything(&mut client).await;

    // The owner's lease with another lease's secret.
    let stolen = Lease {
        id: owner.id,
        secret: other.secret.clone(),
    };
    let err = client
        .register(register_request(&stolen, instance("svc", "y", 7001)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = deregister(&mut client, &stolen, "svc", "x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Another lease shadowing the same instance id.
    let mut shadow = instance("svc", "x", 9999);
    shadow.weight = Some(1000);
    let err = client
        .register(register_request(&other, shadow))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("another lease"), "{}", err.message());

    // Another lease updating or removing it.
    let err = client
        .update(pb::UpdateRequest {
            lease_id: other.id,
            lease_secret: other.secret.clone(),
            service: "svc".into(),
            instance_id: "x".into(),
            weight: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = deregister(&mut client, &other, "svc", "x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Revoking the other lease leaves it alone too.
    client
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: other.id,
            lease_secret: other.secret.clone(),
        })
        .await
        .unwrap();

    assert_eq!(everything(&mut client).await, before, "nothing changed");
    let x = &resolve(&mut client, "svc").await[0];
    assert_eq!((x.port, x.weight, x.lease_id), (7000, Some(3), owner.id));

    // Once the owner lets go, another lease may take the id.
    deregister(&mut client, &owner, "svc", "x").await.unwrap();
    let third = grant(&mut client, LONG_TTL).await;
    let taken = register(&mut client, &third, instance("svc", "x", 1)).await;
    assert_eq!(taken.instance.unwrap().lease_id, third.id);
}
