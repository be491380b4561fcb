//! Watch resume: a client whose stream broke asks for the changes after the
//! last revision it applied (`resume_revision` + `registry_id`) and gets
//! exactly those, or a fresh snapshot when they cannot be served.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::Registry;

/// Opens a Watch of everything that resumes after `revision` of `registry_id`.
async fn resume(
    client: &mut Client,
    revision: u64,
    registry_id: &str,
) -> tonic::Streaming<pb::WatchResponse> {
    client
        .watch(pb::WatchRequest {
            resume_revision: revision,
            registry_id: registry_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// A watcher follows, its stream breaks while changes go on, and it resumes
/// from its last revision: it gets an acceptance, then exactly the changes
/// it missed (the replica's checks catch a gap or a duplicate), and ends up
/// equal to what the registry holds.
#[tokio::test]
async fn a_broken_watch_resumes_from_its_last_revision_with_no_gap_and_no_duplicate() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    for i in 0..5 {
        register(&mut client, &lease, instance("alpha", &format!("a{i}"), 1)).await;
    }
    let mut stream = watch(&mut client, &[]).await;
    let mut replica = Replica::default();
    follow_until(&mut stream, &mut replica, |r| r.resets == 1 && !r.more).await;
    register(&mut client, &lease, instance("alpha", "a5", 1)).await;
    follow_until(&mut stream, &mut replica, |r| r.instances.len() == 6).await;
    drop(stream);

    // Missed: an add, an update, a removal.
    register(&mut client, &lease, instance("beta", "b0", 1)).await;
    let mut changed = instance("alpha", "a0", 1);
    changed.weight = Some(7);
    register(&mut client, &lease, changed).await;
    deregister(&mut client, &lease, "alpha", "a1")
        .await
        .unwrap();

    let mut stream = resume(&mut client, replica.revision, &replica.registry_id).await;
    let accepted = next(&mut stream).await;
    assert!(!accepted.reset, "resumed, not a snapshot: {accepted:?}");
    assert!(accepted.events.is_empty());
    assert_eq!(accepted.revision, replica.revision);
    assert_eq!(accepted.registry_id, replica.registry_id);
    let before = replica.log.len();
    follow_until(&mut stream, &mut replica, |r| {
        !r.instances.contains_key(&("alpha".into(), "a1".into()))
    })
    .await;
    assert_eq!(replica.resets, 1, "no second snapshot");
    let kinds: Vec<_> = replica.log[before..].iter().map(|e| e.kind()).collect();
    use pb::event::Kind;
    assert_eq!(kinds, [Kind::Added, Kind::Updated, Kind::Removed]);
    let (_, truth) = everything(&mut client).await;
    let mine: Vec<_> = replica.instances.values().cloned().collect();
    assert_eq!(mine, truth);

    // And it goes on following.
    register(&mut client, &lease, instance("beta", "b1", 1)).await;
    follow_until(&mut stream, &mut replica, |r| r.instances.len() == 7).await;
}

/// What cannot be resumed gets a snapshot, as a new watcher would: another
/// registry's id, a revision this registry has not reached, changes that
/// are no longer held (`--watch-resume-bytes 0`).
#[tokio::test]
async fn a_resume_that_cannot_be_served_gets_a_fresh_snapshot() {
    let registry = Registry::start(&["--watch-resume-bytes", "0"]);
    let mut client = registry.client().await;
    let lease = grant(&mut client, LONG_TTL).await;
    register(&mut client, &lease, instance("alpha", "a0", 1)).await;
    let mut stream = watch(&mut client, &[]).await;
    let first = next(&mut stream).await;
    assert!(first.reset);
    drop(stream);
    register(&mut client, &lease, instance("alpha", "a1", 1)).await;

    let cases = [
        (
            first.revision,
            "not-this-registry".to_string(),
            "another registry",
        ),
        (
            first.revision + 100,
            first.registry_id.clone(),
            "a future revision",
        ),
        (
            first.revision,
            first.registry_id.clone(),
            "changes no longer held",
        ),
    ];
    for (revision, id, why) in cases {
        let mut stream = resume(&mut client, revision, &id).await;
        let message = next(&mut stream).await;
        assert!(message.reset, "{why}: a snapshot, got {message:?}");
        assert_eq!(message.events.len(), 2, "{why}: the whole state");
    }
}

/// A registry id longer than the documented bound is refused, naming the
/// field; the registry goes on serving.
#[tokio::test]
async fn a_registry_id_over_its_bound_is_invalid() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let status = client
        .watch(pb::WatchRequest {
            resume_revision: 1,
            registry_id: "x".repeat(129),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("registry_id: at most 128 bytes"),
        "{}",
        status.message()
    );
    let mut stream = watch(&mut client, &[]).await;
    assert!(next(&mut stream).await.reset);
}
