//! The etcd store's connection, against a real etcd (testkit starts one;
//! the test fails, naming etcd-server, when there is no etcd binary).
#![allow(clippy::unwrap_used)]

use registry::store::etcd::{EtcdUrl, StoreUrl};
use registry::store::etcd_client::{EtcdClient, EtcdError, registry_id};
use testkit::etcd::Etcd;

fn url(s: &str) -> EtcdUrl {
    match s.parse::<StoreUrl>().unwrap() {
        StoreUrl::Etcd(url) => url,
        StoreUrl::Memory => panic!("{s} is not etcd"),
    }
}

#[tokio::test]
async fn connecting_learns_the_cluster_whose_id_every_replica_shares() {
    let etcd = Etcd::start();
    let store = url(&etcd.store("registry"));
    let a = EtcdClient::connect(&store, &Default::default())
        .await
        .unwrap();
    let b = EtcdClient::connect(&store, &Default::default())
        .await
        .unwrap();
    assert_ne!(a.cluster_id, 0);
    assert_eq!(a.cluster_id, b.cluster_id);
    assert_eq!(
        registry_id(a.cluster_id, &store.prefix),
        registry_id(b.cluster_id, &store.prefix)
    );
}

#[tokio::test]
async fn an_etcd_that_does_not_answer_is_an_error_naming_it() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = url(&format!("etcd://127.0.0.1:{port}/r"));
    let err = EtcdClient::connect(&store, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}
