//! The etcd store (`registry --store etcd://...`) against a real etcd that
//! the test starts: replicas over one cluster and prefix serve one
//! registry; leases end as with the memory store; a replica's death loses
//! no lease; a restart of every replica loses nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::Registry;
use testkit::etcd::Etcd;

/// A registry over `etcd`'s prefix `prefix`.
fn replica(etcd: &Etcd, prefix: &str) -> Registry {
    Registry::start(&["--store", &etcd.store(prefix)])
}

/// Waits for the first snapshot into a new replica copy.
async fn synced(stream: &mut tonic::Streaming<pb::WatchResponse>) -> Replica {
    let mut copy = Replica::default();
    follow_until(stream, &mut copy, |r| r.resets == 1 && !r.more).await;
    copy
}

#[tokio::test]
async fn a_write_on_one_replica_is_read_and_watched_on_another() {
    let etcd = Etcd::start();
    let a = replica(&etcd, "r");
    let b = replica(&etcd, "r");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut stream = watch(&mut cb, &[]).await;
    let mut copy = synced(&mut stream).await;

    let lease = grant(&mut ca, LONG_TTL).await;
    let registered = register(&mut ca, &lease, instance("calc", "c1", 7001)).await;
    // Read your writes on the replica that took it...
    assert_eq!(ids(&mut ca, "calc").await, ["c1"]);
    // ...and the same instance, same revision, everywhere.
    follow_until(&mut stream, &mut copy, |r| r.instances.len() == 1).await;
    let seen = &copy.instances[&("calc".to_string(), "c1".to_string())];
    assert_eq!(seen.revision, registered.revision);
    assert_eq!(
        resolve(&mut cb, "calc").await[0].revision,
        registered.revision
    );

    // Ownership holds across replicas: another lease cannot take it.
    let other = grant(&mut cb, LONG_TTL).await;
    let err = cb
        .register(register_request(&other, instance("calc", "c1", 7001)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // A wrong secret is refused by a replica that did not grant the lease.
    let mut forged = lease.clone();
    forged.secret = "0".repeat(32);
    let err = cb
        .register(register_request(&forged, instance("calc", "c2", 7002)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // An update and a deregistration on B reach A's watcher in order.
    let mut sa = watch(&mut ca, &[]).await;
    let mut copy_a = synced(&mut sa).await;
    let mut changed = instance("calc", "c1", 7001);
    changed.weight = Some(4);
    register(&mut cb, &lease, changed).await;
    register(&mut cb, &lease, instance("calc", "c3", 7003)).await;
    deregister(&mut cb, &lease, "calc", "c3").await.unwrap();
    follow_until(&mut sa, &mut copy_a, |r| r.log.len() == 3).await;
    use pb::event::Kind;
    let kinds: Vec<_> = copy_a.log.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, [Kind::Updated, Kind::Added, Kind::Removed]);
    assert_eq!(copy_a.log[2].reason(), pb::RemovalReason::Deregistered);
    assert_eq!(copy_a.instances.len(), 1);
}

#[tokio::test]
async fn a_broken_keepalive_stream_removes_its_instances_at_once_on_every_replica() {
    let etcd = Etcd::start();
    let a = replica(&etcd, "r");
    let b = replica(&etcd, "r");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let lease = grant(&mut ca, LONG_TTL).await;
    for i in 0..3 {
        register(
            &mut ca,
            &lease,
            instance("calc", &format!("c{i}"), 7000 + i),
        )
        .await;
    }
    let keepalive = keep_alive(&mut ca, &lease).await;
    let mut stream = watch(&mut cb, &[]).await;
    let mut copy = synced(&mut stream).await;
    // B follows A a moment behind.
    follow_until(&mut stream, &mut copy, |r| r.instances.len() == 3).await;
    let before = copy.log.len();

    let broke = Instant::now();
    drop(keepalive);
    follow_until(&mut stream, &mut copy, |r| r.instances.is_empty()).await;
    println!(
        "TIMING etcd store: KeepAlive stream closed -> REMOVED at a watcher on another replica: {:?}",
        broke.elapsed()
    );
    assert!(
        copy.log[before..]
            .iter()
            .all(|e| e.reason() == pb::RemovalReason::KeepaliveClosed),
        "{:?}",
        copy.log
    );
    // The lease is gone everywhere.
    let err = cb
        .register(register_request(&lease, instance("calc", "c9", 7009)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

#[tokio::test]
async fn a_lease_without_heartbeats_expires_after_the_registry_ttl_not_etcds() {
    let etcd = Etcd::start();
    let a = replica(&etcd, "r");
    let mut client = a.client().await;
    // 300 ms: etcd's own lease would last 3 s (rounded up, plus the margin).
    let lease = grant(&mut client, 300).await;
    register(&mut client, &lease, instance("calc", "c1", 7001)).await;
    let mut stream = watch(&mut client, &[]).await;
    let mut copy = synced(&mut stream).await;
    let granted = Instant::now();
    follow_until(&mut stream, &mut copy, |r| r.instances.is_empty()).await;
    let took = granted.elapsed();
    println!("TIMING etcd store: 300 ms lease without heartbeats -> REMOVED: {took:?}");
    assert!(
        took < Duration::from_millis(2500),
        "expired by etcd, not the registry: {took:?}"
    );
    assert_eq!(copy.log[0].reason(), pb::RemovalReason::LeaseExpired);
}

#[tokio::test]
async fn when_the_replica_holding_a_lease_dies_another_adopts_it_and_nothing_is_removed() {
    let etcd = Etcd::start();
    let mut a = replica(&etcd, "r");
    let b = replica(&etcd, "r");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let lease = grant(&mut ca, 1000).await;
    register(&mut ca, &lease, instance("calc", "c1", 7001)).await;
    let keepalive = keep_alive(&mut ca, &lease).await;
    let mut stream = watch(&mut cb, &[]).await;
    let mut copy = synced(&mut stream).await;
    follow_until(&mut stream, &mut copy, |r| r.instances.len() == 1).await;
    let before = copy.log.len();

    a.process.kill9();
    drop(keepalive);
    // The node's KeepAlive moves to B with the same lease and secret.
    let mut moved = keep_alive(&mut cb, &lease).await;
    let stop = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        moved.send(&lease).await;
        let answer = moved.responses.message().await.unwrap().unwrap();
        assert_eq!(answer.lease_id, lease.id);
        // Nothing was removed at the watcher meanwhile.
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(1), stream.message()).await
        {
            copy.apply(message.unwrap().unwrap());
        }
    }
    assert_eq!(
        copy.log.len(),
        before,
        "changes while failing over: {:?}",
        &copy.log[before..]
    );
    assert_eq!(ids(&mut cb, "calc").await, ["c1"]);
    // B now enforces the lease: its stream breaking removes the instance.
    drop(moved);
    follow_until(&mut stream, &mut copy, |r| r.instances.is_empty()).await;
    assert_eq!(
        copy.log[before].reason(),
        pb::RemovalReason::KeepaliveClosed
    );
}

#[tokio::test]
async fn a_watcher_resumes_on_another_replica_from_its_last_revision() {
    let etcd = Etcd::start();
    let a = replica(&etcd, "r");
    let b = replica(&etcd, "r");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let lease = grant(&mut ca, LONG_TTL).await;
    register(&mut ca, &lease, instance("calc", "c0", 7000)).await;
    let mut stream = watch(&mut ca, &[]).await;
    let mut copy = synced(&mut stream).await;
    register(&mut ca, &lease, instance("calc", "c1", 7001)).await;
    follow_until(&mut stream, &mut copy, |r| r.instances.len() == 2).await;
    drop(stream);

    // Missed while away: an add, an update, a removal of several at once.
    let other = grant(&mut ca, LONG_TTL).await;
    register(&mut ca, &other, instance("db", "d0", 7100)).await;
    register(&mut ca, &other, instance("db", "d1", 7101)).await;
    let mut changed = instance("calc", "c0", 7000);
    changed.weight = Some(3);
    register(&mut ca, &lease, changed).await;
    ca.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: other.id,
        lease_secret: other.secret.clone(),
    })
    .await
    .unwrap();

    let mut stream = cb
        .watch(pb::WatchRequest {
            resume_revision: copy.revision,
            registry_id: copy.registry_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let accepted = next(&mut stream).await;
    assert!(
        !accepted.reset,
        "resumed on B, not a snapshot: {accepted:?}"
    );
    assert_eq!(accepted.revision, copy.revision);
    let before = copy.log.len();
    follow_until(&mut stream, &mut copy, |r| r.log.len() == before + 5).await;
    use pb::event::Kind;
    let kinds: Vec<_> = copy.log[before..].iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        [
            Kind::Added,
            Kind::Added,
            Kind::Updated,
            Kind::Removed,
            Kind::Removed
        ]
    );
    assert_eq!(copy.resets, 1, "no second snapshot");
    let (_, everything) = everything(&mut cb).await;
    assert_eq!(everything.len(), copy.instances.len());
}

#[tokio::test]
async fn every_replica_restarted_finds_the_state_intact() {
    let etcd = Etcd::start();
    let a = replica(&etcd, "r");
    let mut ca = a.client().await;
    let lease = grant(&mut ca, LONG_TTL).await;
    let mut descriptors_registered = register_request(&lease, instance("calc", "c0", 7000));
    descriptors_registered.file_descriptor_set = testkit::descriptors_defining("calc.Calc");
    ca.register(descriptors_registered).await.unwrap();
    for i in 1..4 {
        register(
            &mut ca,
            &lease,
            instance("calc", &format!("c{i}"), 7000 + i),
        )
        .await;
    }
    let before = resolve(&mut ca, "calc").await;
    drop(ca);
    drop(a);

    let b = replica(&etcd, "r");
    let mut cb = b.client().await;
    assert_eq!(
        resolve(&mut cb, "calc").await,
        before,
        "same instances, same revisions"
    );
    let got = cb
        .get_descriptors(pb::GetDescriptorsRequest {
            service: "calc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.file_descriptor_set,
        testkit::descriptors_defining("calc.Calc")
    );
    // The lease survived too: its owner carries on on the new replica.
    register(&mut cb, &lease, instance("calc", "c9", 7009)).await;
    assert_eq!(resolve(&mut cb, "calc").await.len(), 5);
}

#[tokio::test]
async fn an_unreachable_etcd_is_an_error_naming_it_and_the_registry_exits() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = testkit::command("registry");
    cmd.args(["--listen", "127.0.0.1:0", "--store"])
        .arg(format!("etcd://127.0.0.1:{port}/r"));
    let (status, out, err) = testkit::run(cmd, Duration::from_secs(30));
    assert!(!status.success());
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    // Never ready: scripts and balancers wait for the ready line.
    assert!(!out.contains("registry listening"), "{out}");
}

#[tokio::test]
async fn a_bad_store_url_is_refused_naming_the_problem() {
    let mut cmd = testkit::command("registry");
    cmd.args(["--store", "etcd://a:1/p/"]);
    let (status, _out, err) = testkit::run(cmd, Duration::from_secs(30));
    assert!(!status.success());
    assert!(err.contains("not ending in /"), "{err}");
}

#[tokio::test]
async fn a_replica_that_loses_etcd_refuses_heartbeats_and_ends_its_watches_with_unavailable() {
    const SIGSTOP: i32 = 19;
    const SIGCONT: i32 = 18;
    let etcd = Etcd::start();
    let a = replica(&etcd, "r");
    let mut client = a.client().await;
    let lease = grant(&mut client, 1000).await;
    register(&mut client, &lease, instance("calc", "c1", 7001)).await;
    let mut keepalive = keep_alive(&mut client, &lease).await;
    let mut stream = watch(&mut client, &[]).await;
    let mut copy = synced(&mut stream).await;
    assert_eq!(copy.instances.len(), 1);

    etcd.process.signal(SIGSTOP);
    let cut = Instant::now();
    // The watch ends with UNAVAILABLE...
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(message)) => copy.apply(message),
                Ok(None) => panic!("the watch ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the watch went on while etcd did not answer");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended}");
    println!(
        "TIMING etcd store: etcd stopped -> Watch ended UNAVAILABLE: {:?}",
        cut.elapsed()
    );
    // ...and so does the next heartbeat.
    keepalive.send(&lease).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), keepalive.responses.message())
        .await
        .expect("no answer to a heartbeat")
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    println!(
        "TIMING etcd store: etcd stopped -> heartbeat refused UNAVAILABLE: {:?}",
        cut.elapsed()
    );
    // A new watch is refused meanwhile; nothing was removed at the watcher.
    let err = client
        .watch(pb::WatchRequest::default())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(copy.log.is_empty(), "{:?}", copy.log);

    // Back: it serves again.
    etcd.process.signal(SIGCONT);
    testkit::eventually(Duration::from_secs(10), "serving again", || {
        let mut client = client.clone();
        async move {
            client
                .watch(pb::WatchRequest::default())
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_registrations_share_etcd_transactions() {
    const WRITERS: u32 = 40;
    let etcd = Etcd::start();
    let a = Registry::start(&[
        "--store",
        &etcd.store("r"),
        "--max-registrations-per-sec-per-ip",
        "0",
    ]);
    let mut client = a.client().await;
    let mut stream = watch(&mut client, &[]).await;
    let mut copy = synced(&mut stream).await;
    let leases: Vec<Lease> = {
        let mut leases = Vec::new();
        for _ in 0..4 {
            leases.push(grant(&mut client, LONG_TTL).await);
        }
        leases
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            let (mut client, lease) = (client.clone(), leases[n as usize % 4].clone());
            tokio::spawn(async move {
                register(
                    &mut client,
                    &lease,
                    instance("calc", &format!("c{n}"), 7000 + n),
                )
                .await
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    follow_until(&mut stream, &mut copy, |r| {
        r.instances.len() == WRITERS as usize
    })
    .await;
    // Registrations that arrived while a transaction was in flight went
    // together in the next one: several changes in one etcd revision.
    let shared = copy
        .log
        .iter()
        .filter(|e| e.revision & ((1 << 20) - 1) != 0)
        .count();
    println!("etcd store: {shared} of {WRITERS} registrations rode in another's transaction");
    assert!(
        shared > 0,
        "every registration had a transaction of its own"
    );
    assert_eq!(resolve(&mut client, "calc").await.len(), WRITERS as usize);
}

#[tokio::test]
async fn an_etcd_endpoint_that_is_down_is_passed_over_and_no_request_fails() {
    // A member killed, as the replica sees it: one endpoint of the
    // `--store` URL refuses connections. Listed first and last, so the
    // replica meets it whichever endpoint it starts on.
    let etcd = Etcd::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for (n, hosts) in [
        format!("{dead},{}", etcd.endpoint),
        format!("{},{dead}", etcd.endpoint),
    ]
    .iter()
    .enumerate()
    {
        let mut registry = Registry::start(&["--store", &format!("etcd://{hosts}/d{n}")]);
        let mut client = registry.client().await;
        let lease = grant(&mut client, 0).await;
        let alive = keep_alive(&mut client, &lease).await;
        for i in 0..40u32 {
            alive.send(&lease).await;
            let request = register_request(&lease, instance("calc", &format!("c{i}"), 7000 + i));
            if let Err(status) = client.register(request).await {
                panic!("{hosts}: register {i} failed: {status}");
            }
        }
        assert_eq!(ids(&mut client, "calc").await.len(), 40, "{hosts}");
        let lines = registry.process.lines();
        assert!(
            !lines.iter().any(|l| l.contains("etcd does not answer")),
            "{hosts}: the replica took etcd for lost: {lines:?}"
        );
        assert!(registry.process.is_running(), "{hosts}");
    }
}

/// Turns etcd's auth on: `root` (etcd wants it before auth is enabled) and
/// `reg`, whose role may read and write the keys under `/PREFIX/` only.
async fn enable_auth(etcd: &Etcd, prefix: &str) {
    use etcd_api::pb::{self as e, auth_client::AuthClient};
    let mut auth = AuthClient::connect(etcd.url()).await.unwrap();
    for (name, password) in [("root", "root-pw"), ("reg", "reg-pw")] {
        auth.user_add(e::AuthUserAddRequest {
            name: name.into(),
            password: password.into(),
            options: None,
        })
        .await
        .unwrap();
    }
    for role in ["root", "registry"] {
        auth.role_add(e::AuthRoleAddRequest { name: role.into() })
            .await
            .unwrap();
    }
    let key = format!("/{prefix}/").into_bytes();
    auth.role_grant_permission(e::AuthRoleGrantPermissionRequest {
        name: "registry".into(),
        perm: Some(e::Permission {
            perm_type: e::permission::Type::Readwrite as i32,
            range_end: etcd_api::prefix_end(&key),
            key,
        }),
    })
    .await
    .unwrap();
    for (user, role) in [("root", "root"), ("reg", "registry")] {
        auth.user_grant_role(e::AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        })
        .await
        .unwrap();
    }
    auth.auth_enable(e::AuthEnableRequest {}).await.unwrap();
}

/// `registry --store etcd://.../PREFIX --etcd-user reg` with `password` in
/// REGISTRY_ETCD_PASSWORD (none: unset), to completion or to its ready line.
fn with_user(etcd: &Etcd, prefix: &str, password: Option<&str>) -> testkit::RegistryBuilder {
    let mut builder =
        Registry::launch().args(["--store", &etcd.store(prefix), "--etcd-user", "reg"]);
    if let Some(password) = password {
        builder = builder.env("REGISTRY_ETCD_PASSWORD", password);
    }
    builder
}

#[tokio::test]
async fn with_etcd_auth_a_replica_serves_as_its_user_and_a_refused_one_says_why() {
    // --auth-token-ttl=1: a token unused for a second is dropped by etcd.
    let etcd = Etcd::start_with(&["--auth-token-ttl=1"]);
    enable_auth(&etcd, "auth").await;

    let a = with_user(&etcd, "auth", Some("reg-pw")).start();
    let b = with_user(&etcd, "auth", Some("reg-pw")).start();
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut stream = watch(&mut cb, &[]).await;
    let mut copy = synced(&mut stream).await;
    let lease = grant(&mut ca, LONG_TTL).await;
    register(&mut ca, &lease, instance("calc", "c1", 7001)).await;
    follow_until(&mut stream, &mut copy, |r| r.instances.len() == 1).await;
    assert_eq!(ids(&mut cb, "calc").await, ["c1"]);

    // Stalled past the token's TTL: etcd forgot it, and the replica gets
    // a new one rather than going on refused.
    const SIGSTOP: i32 = 19;
    const SIGCONT: i32 = 18;
    a.process.signal(SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.process.signal(SIGCONT);
    let mut c = 2;
    testkit::eventually(PROMPTLY, "a write through the stalled replica", || {
        let mut ca = ca.clone();
        let lease = lease.clone();
        c += 1;
        let id = format!("c{c}");
        async move {
            ca.register(register_request(&lease, instance("calc", &id, 7002)))
                .await
                .ok()
        }
    })
    .await;
    a.process.wait_for_line("etcd token renewed", PROMPTLY);

    // Without the user, with a wrong password: the registry exits naming
    // the problem, before its ready line.
    let run = |password: Option<&str>, user: bool| {
        let mut cmd = testkit::command("registry");
        cmd.args(["--listen", "127.0.0.1:0", "--store", &etcd.store("auth")]);
        if user {
            cmd.args(["--etcd-user", "reg"]);
        }
        if let Some(password) = password {
            cmd.env("REGISTRY_ETCD_PASSWORD", password);
        }
        let (status, out, err) = testkit::run(cmd, Duration::from_secs(30));
        assert!(!status.success(), "{out}{err}");
        assert!(!out.contains("registry listening"), "{out}");
        err
    };
    let err = run(None, false);
    assert!(
        err.contains("user name is empty") && err.contains("--etcd-user"),
        "{err}"
    );
    let err = run(Some("wrong"), true);
    assert!(
        err.contains("refused user \"reg\"") && err.contains("authentication failed"),
        "{err}"
    );
    let err = run(None, true);
    assert!(err.contains("no password"), "{err}");
    // Outside its prefix the user may do nothing.
    let mut cmd = testkit::command("registry");
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--store",
        &etcd.store("elsewhere"),
        "--etcd-user",
        "reg",
    ])
    .env("REGISTRY_ETCD_PASSWORD", "reg-pw");
    let (status, _, err) = testkit::run(cmd, Duration::from_secs(30));
    assert!(!status.success());
    assert!(err.contains("permission denied"), "{err}");
}

#[tokio::test]
async fn a_replica_behind_etcds_compaction_catches_up_without_a_restart() {
    const SIGSTOP: i32 = 19;
    const SIGCONT: i32 = 18;
    let mut etcd = Etcd::start();
    let a = replica(&etcd, "c");
    let b = replica(&etcd, "c");
    let mut ca = a.client().await;
    let mut stream = watch(&mut ca, &[]).await;
    let mut copy = synced(&mut stream).await;
    let mut cb = b.client().await;
    let lease = grant(&mut cb, LONG_TTL).await;
    register(&mut cb, &lease, instance("calc", "stays", 7001)).await;
    register(&mut cb, &lease, instance("calc", "goes", 7002)).await;
    follow_until(&mut stream, &mut copy, |r| r.instances.len() == 2).await;

    // A frozen while etcd restarts under it (its etcd watch breaks), then
    // changes it does not see, and etcd's history of them compacted away.
    a.process.signal(SIGSTOP);
    etcd.restart();
    testkit::eventually(PROMPTLY, "a write through B after etcd's restart", || {
        let mut cb = cb.clone();
        let lease = lease.clone();
        async move {
            cb.register(register_request(&lease, instance("calc", "new", 7003)))
                .await
                .ok()
        }
    })
    .await;
    deregister(&mut cb, &lease, "calc", "goes").await.unwrap();
    let mut kv = etcd_api::pb::kv_client::KvClient::connect(etcd.url())
        .await
        .unwrap();
    let now = kv
        .range(etcd_api::pb::RangeRequest {
            key: b"/".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    kv.compact(etcd_api::pb::CompactionRequest {
        revision: now,
        physical: true,
    })
    .await
    .unwrap();
    a.process.signal(SIGCONT);

    // A catches up from the prefix as it is, and its watcher gets the
    // difference as changes: no restart, no snapshot.
    let key = |id: &str| ("calc".to_string(), id.to_string());
    follow_until(&mut stream, &mut copy, |r| {
        r.instances.contains_key(&key("new")) && !r.instances.contains_key(&key("goes"))
    })
    .await;
    assert_eq!(copy.resets, 1, "the watcher took a snapshot again");
    assert!(copy.instances.contains_key(&key("stays")));
    a.process
        .wait_for_line("etcd compacted the history this replica missed", PROMPTLY);
    // And A serves writes again, seen on B.
    testkit::eventually(PROMPTLY, "a write through A after catching up", || {
        let mut ca = ca.clone();
        let lease = lease.clone();
        async move {
            ca.register(register_request(&lease, instance("calc", "on-a", 7004)))
                .await
                .ok()
        }
    })
    .await;
    let mut on_b = ids(&mut cb, "calc").await;
    on_b.sort();
    assert_eq!(on_b, ["new", "on-a", "stays"]);
}
