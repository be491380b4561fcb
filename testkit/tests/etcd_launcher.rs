//! The testkit's etcd: it serves, and a restart keeps its data.
#![allow(clippy::unwrap_used)]

use etcd_api::pb::{PutRequest, RangeRequest, kv_client::KvClient};
use testkit::etcd::Etcd;

#[tokio::test]
async fn etcd_serves_and_keeps_its_data_across_a_restart() {
    let mut etcd = Etcd::start();
    let mut kv = KvClient::connect(etcd.url()).await.unwrap();
    kv.put(PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    etcd.restart();
    let mut kv = KvClient::connect(etcd.url()).await.unwrap();
    let got = kv
        .range(RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(got.kvs[0].value, b"v");
    assert!(etcd.store("p").starts_with("etcd://127.0.0.1:"));
}
