//! The library against a real registry and real node hosts: discovery,
//! failover, registry outages and the balanced channel.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use prost_reflect::DynamicMessage;
use registry_client::args::{parse_args, parse_requests};
use registry_client::call::{CallOptions, Caller, Reply};
use registry_client::codec::{DynamicCodec, method_path};
use registry_client::descriptors::Descriptors;
use registry_client::lb::PolicyKind;
use registry_client::resolve::resolve;
use registry_client::{Directory, balanced_channel};
use registry_proto::registry::v1::{GrantLeaseRequest, Instance, RegisterRequest};
use std::collections::BTreeSet;
use std::time::Duration;
use testkit::{READY_TIMEOUT, Registry, eventually};

async fn synced(registry: &Registry) -> Directory {
    let directory = Directory::connect(&registry.addr.to_string()).unwrap();
    directory.wait_synced(READY_TIMEOUT).await.unwrap();
    directory
}

async fn wait_for(directory: &Directory, service: &str, n: usize) {
    eventually(
        READY_TIMEOUT,
        &format!("{n} instances of {service}"),
        || async { (directory.instances(service).len() == n).then_some(()) },
    )
    .await;
}

/// A unary call of `method` with `args` over `grpc`, as any generic client
/// makes it: a path, a codec for `DynamicMessage`.
async fn unary_call(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &prost_reflect::MethodDescriptor,
    args: &[&str],
) -> Result<DynamicMessage, tonic::Status> {
    let request = parse_args(&method.input(), args).unwrap();
    let reply = grpc
        .unary(
            tonic::Request::new(request),
            method_path(method).unwrap(),
            DynamicCodec::new(method.output()),
        )
        .await?;
    Ok(reply.into_inner())
}

/// Whether 40 calls in a row of echo's `method` over `grpc` are served by
/// exactly the addresses `want` (`None` if not, or if one fails): polled
/// until they are.
async fn served_by(
    mut grpc: tonic::client::Grpc<tonic::transport::Channel>,
    method: prost_reflect::MethodDescriptor,
    want: BTreeSet<String>,
) -> Option<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        grpc.ready().await.ok()?;
        let reply = unary_call(&mut grpc, &method, &["message=hi"]).await.ok()?;
        seen.insert(reply.get_field_by_name("served_by")?.as_str()?.to_string());
    }
    (seen == want).then_some(seen)
}

/// A registry with two node hosts serving `plugin` (weight 1 each), and a
/// directory that lists both.
async fn two_nodes(plugin: &str) -> (Registry, Node, Node, Directory, Descriptors) {
    let registry = Registry::start(&[]);
    let config = format!("[plugins.{plugin}]\nweight = 1\n");
    let first = Node::start(registry.addr, &config);
    let second = Node::start(registry.addr, &config);
    let directory = synced(&registry).await;
    let descriptors = Descriptors::new(directory.clone());
    wait_for(&directory, plugin, 2).await;
    (registry, first, second, directory, descriptors)
}

fn unary(reply: Reply) -> DynamicMessage {
    match reply {
        Reply::Unary(m) => m,
        Reply::Stream(_) => panic!("expected a unary reply"),
    }
}

fn f64_field(msg: &DynamicMessage, name: &str) -> f64 {
    msg.get_field_by_name(name)
        .and_then(|v| v.as_f64())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_known_services_keep_working_with_the_registry_stopped() {
    let mut registry = Registry::start(&[]);
    let _node = Node::start(registry.addr, &both(1, 1));
    let directory = synced(&registry).await;
    let descriptors = Descriptors::new(directory.clone());
    wait_for(&directory, "calculator", 1).await;
    wait_for(&directory, "echo", 1).await;
    let caller = Caller::new(directory.clone(), CallOptions::default());
    for target in ["calculator/Add", "echo/Echo"] {
        let target = resolve(&descriptors, target).await.unwrap();
        let request = parse_args(&target.method.input(), &[] as &[&str]).unwrap();
        caller.call(&target, request).await.unwrap();
    }

    registry.process.kill9();
    eventually(READY_TIMEOUT, "the directory notices", || async {
        (!directory.snapshot().connected).then_some(())
    })
    .await;

    // Resolution comes from the local copy and the descriptor cache, and a
    // typo is still a typo (not "registry unreachable").
    let err = resolve(&descriptors, "calculator/Nope").await.unwrap_err();
    assert!(err.to_string().contains("no method `Nope`"), "{err}");
    let target = resolve(&descriptors, "calculator.v1.Calculator/Multiply")
        .await
        .unwrap();
    let request = parse_args(&target.method.input(), &["a=6", "b=7"]).unwrap();
    let called = caller.call(&target, request).await.unwrap();
    assert_eq!(f64_field(&unary(called.reply), "value"), 42.0);
    let target = resolve(&descriptors, "echo/Echo").await.unwrap();
    let request = parse_args(&target.method.input(), &["message=still here"]).unwrap();
    let reply = unary(caller.call(&target, request).await.unwrap().reply);
    assert_eq!(
        reply.get_field_by_name("message").unwrap().as_str(),
        Some("still here")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_right_after_a_node_is_killed_succeeds_on_another() {
    let (mut registry, mut dead, alive, directory, descriptors) = two_nodes("calculator").await;
    let target = resolve(&descriptors, "calculator/Add").await.unwrap();
    let request = parse_args(&target.method.input(), &["a=1", "b=2"]).unwrap();

    // Stop the registry first, so the directory keeps listing the node we
    // are about to kill: the caller must find out by itself.
    registry.process.kill9();
    dead.process.kill9();
    assert_eq!(directory.instances("calculator").len(), 2);

    let caller = Caller::new(
        directory.clone(),
        CallOptions {
            policy: PolicyKind::WeightedRoundRobin,
            ..CallOptions::default()
        },
    );
    let mut retried = 0;
    for _ in 0..10 {
        let called = caller.call(&target, request.clone()).await.unwrap();
        assert_eq!(called.instance.port, u32::from(alive.addr.port()));
        assert_eq!(f64_field(&unary(called.reply), "value"), 3.0);
        retried += usize::from(called.attempts == 2);
    }
    assert!(
        retried > 0,
        "round robin must have picked the dead node at least once"
    );

    // Without retries, picking the dead node is an error that names it.
    let no_retry = Caller::new(
        directory.clone(),
        CallOptions {
            retry: false,
            ..CallOptions::default()
        },
    );
    let mut failures = Vec::new();
    for _ in 0..4 {
        if let Err(e) = no_retry.call(&target, request.clone()).await {
            failures.push(e.to_string());
        }
    }
    assert!(!failures.is_empty());
    assert!(failures[0].contains(&dead.addr.to_string()), "{failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_calls_to_a_killed_node_are_retried_before_any_reply() {
    let (mut registry, mut dead, alive, directory, descriptors) = two_nodes("echo").await;
    let collect = resolve(&descriptors, "echo/EchoCollect").await.unwrap();
    let chat = resolve(&descriptors, "echo/EchoChat").await.unwrap();
    let requests = parse_requests(&chat.method, &[r#"{"message": "a"} {"message": "b"}"#]).unwrap();
    // As above: the directory still lists the node about to be killed.
    registry.process.kill9();
    dead.process.kill9();
    let caller = Caller::new(directory.clone(), CallOptions::default());
    let mut retried = 0;
    for _ in 0..4 {
        // Client streaming: the one reply, the messages joined.
        let called = caller
            .call_messages(&collect, requests.clone())
            .await
            .unwrap();
        assert_eq!(called.instance.port, u32::from(alive.addr.port()));
        let reply = unary(called.reply);
        assert_eq!(
            reply.get_field_by_name("message").unwrap().as_str(),
            Some("a b")
        );
        retried += usize::from(called.attempts == 2);

        // Bidirectional: one reply per message.
        let called = caller.call_messages(&chat, requests.clone()).await.unwrap();
        assert_eq!(called.instance.port, u32::from(alive.addr.port()));
        retried += usize::from(called.attempts == 2);
        let Reply::Stream(mut replies) = called.reply else {
            panic!("expected a stream of replies")
        };
        let mut got = Vec::new();
        while let Some(reply) = replies.message().await.unwrap() {
            got.push(
                reply
                    .get_field_by_name("message")
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(got, ["a", "b"]);
    }
    assert!(
        retried > 0,
        "round robin must have picked the dead node at least once"
    );

    // One request message only where the method takes exactly one.
    let echo = resolve(&descriptors, "echo/Echo").await.unwrap();
    let err = caller.call_messages(&echo, requests).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "echo.v1.Echo/Echo is a unary method: it takes exactly one request message, got 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_channel_follows_the_registry() {
    let registry = Registry::start(&[]);
    let a = Node::start(registry.addr, &both(1, 1));
    let directory = synced(&registry).await;
    let descriptors = Descriptors::new(directory.clone());
    wait_for(&directory, "echo", 1).await;
    let echo = descriptors.get("echo").await.unwrap();
    let method = echo.methods().find(|m| m.name() == "Echo").unwrap();
    let calculator = descriptors.get("calculator").await.unwrap();
    let add = calculator.methods().find(|m| m.name() == "Add").unwrap();

    // A few lines: a channel, a generic codec, a path.
    let channel = balanced_channel(&directory, "calculator");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let reply = unary_call(&mut grpc, &add, &["a=2", "b=40"]).await.unwrap();
    assert_eq!(f64_field(&reply, "value"), 42.0);

    // A second node joins: the echo channel spreads over both.
    let mut b = Node::start(registry.addr, &both(1, 1));
    wait_for(&directory, "echo", 2).await;
    let grpc = tonic::client::Grpc::new(balanced_channel(&directory, "echo"));
    let served_by = |want: BTreeSet<String>| served_by(grpc.clone(), method.clone(), want);
    let a_and_b: BTreeSet<String> = [a.addr.to_string(), b.addr.to_string()].into();
    let seen = eventually(READY_TIMEOUT, "calls served by both nodes", || {
        served_by(a_and_b.clone())
    })
    .await;
    assert_eq!(seen.len(), 2);

    // The second node dies: once the registry drops it, the channel does too.
    b.process.kill9();
    wait_for(&directory, "echo", 1).await;
    let only_a: BTreeSet<String> = [a.addr.to_string()].into();
    eventually(READY_TIMEOUT, "calls served by the survivor only", || {
        served_by(only_a.clone())
    })
    .await;
    drop(grpc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_registry_restart_the_balanced_channel_drops_stale_instances_once_live_ones_return()
{
    let mut registry = Registry::start(&[]);
    let addr = registry.addr;
    let a = Node::start(addr, "[plugins.echo]\nweight = 1\n");
    let mut b = Node::start(addr, "[plugins.echo]\nweight = 1\n");
    // A grace period longer than the test: B must leave the channel because
    // A is live again, not because the period ended.
    let directory = Directory::with_grace(&addr.to_string(), Duration::from_secs(600)).unwrap();
    directory.wait_synced(READY_TIMEOUT).await.unwrap();
    wait_for(&directory, "echo", 2).await;
    let descriptors = Descriptors::new(directory.clone());
    let echo = descriptors.get("echo").await.unwrap();
    let method = echo.methods().find(|m| m.name() == "Echo").unwrap();
    let grpc = tonic::client::Grpc::new(balanced_channel(&directory, "echo"));
    let a_and_b: BTreeSet<String> = [a.addr.to_string(), b.addr.to_string()].into();
    eventually(READY_TIMEOUT, "calls served by both nodes", || {
        served_by(grpc.clone(), method.clone(), a_and_b.clone())
    })
    .await;

    // The registry goes, then B, unseen: the directory still lists B.
    let old_id = directory.snapshot().registry_id.clone();
    registry.process.kill9();
    eventually(READY_TIMEOUT, "the directory notices", || async {
        (!directory.snapshot().connected).then_some(())
    })
    .await;
    b.process.kill9();
    let _registry = Registry::start_on(&addr.to_string(), &[]);
    // A registers with the new registry; B cannot, and stays as a stale
    // fallback that the live A shadows: no change is broadcast for it.
    eventually(READY_TIMEOUT, "A live on the new registry", || async {
        let s = directory.snapshot();
        (s.registry_id != old_id && !s.is_stale("echo") && s.instances("echo").len() == 1)
            .then_some(())
    })
    .await;
    assert!(directory.snapshot().has_stale("echo"));
    let only_a: BTreeSet<String> = [a.addr.to_string()].into();
    eventually(
        READY_TIMEOUT,
        "calls served by A only, none failing",
        || served_by(grpc.clone(), method.clone(), only_a.clone()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_registry_leaves_stale_fallbacks_for_a_grace_period() {
    let mut registry = Registry::start(&[]);
    let addr = registry.addr;
    let instance = Instance {
        service: "ghost".into(),
        host: "127.0.0.1".into(),
        port: 9,
        weight: Some(2),
        ..Default::default()
    };
    let _lease = register_by_hand(&registry, 1500, instance, Vec::new()).await;
    let directory = Directory::with_grace(&addr.to_string(), Duration::from_secs(2)).unwrap();
    directory.wait_synced(READY_TIMEOUT).await.unwrap();
    wait_for(&directory, "ghost", 1).await;
    let old_id = directory.snapshot().registry_id.clone();

    // The registry restarts on the same address, empty: nobody registers
    // `ghost` again.
    registry.process.kill9();
    let _registry = Registry::start_on(&addr.to_string(), &[]);
    let snapshot = eventually(READY_TIMEOUT, "the new registry's snapshot", || async {
        let s = directory.snapshot();
        (s.connected && s.registry_id != old_id).then_some(s)
    })
    .await;
    // Still usable, marked stale...
    assert_eq!(snapshot.instances("ghost").len(), 1, "{snapshot:?}");
    assert!(snapshot.is_stale("ghost"));
    // ...until the grace period ends.
    eventually(
        Duration::from_secs(10),
        "the stale instance dropped",
        || async { directory.instances("ghost").is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_sent_in_several_messages_arrives_whole() {
    let registry = Registry::start(&[]);
    let mut client = registry.client().await;
    let lease = client
        .grant_lease(GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    // 120 instances of about 15 KiB of metadata each: a snapshot of about
    // 1.8 MiB, which the registry sends in messages of about 1 MiB.
    const N: u32 = 120;
    let metadata: std::collections::HashMap<String, String> = (0..15)
        .map(|k| (format!("k{k}"), "x".repeat(1000)))
        .collect();
    for n in 0..N {
        client
            .register(RegisterRequest {
                lease_id: lease.lease_id,
                lease_secret: lease.lease_secret.clone(),
                instance: Some(Instance {
                    service: "big".into(),
                    instance_id: format!("i{n:03}"),
                    host: "127.0.0.1".into(),
                    port: 10_000 + n,
                    weight: Some(1),
                    metadata: metadata.clone(),
                    ..Default::default()
                }),
                file_descriptor_set: Vec::new(),
            })
            .await
            .unwrap();
    }
    // A directory started now receives them all as its first snapshot.
    let directory = synced(&registry).await;
    assert_eq!(directory.instances("big").len(), N as usize);
}
