//! Security end to end, with the real binaries (issue 8): ownership of
//! instances against a rogue client, access tokens, TLS and mutual TLS with
//! certificates made at run time (across loopback addresses and across
//! hosts of the LAN harness), and a flood from one peer that must not
//! starve another.
//!
//! The table of bad inputs lives in `tests/bad_inputs.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::netns::lan_for_test;
use testkit::{Registry, eventually};
use tonic::Code;

const WRITE: &str = "w-9f3c1d";
const READ: &str = "r-77a0be";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_client_cannot_deregister_update_or_shadow_a_nodes_instances() {
    let registry = Registry::start(&[]);
    let mut node = node_with(&registry.addr.to_string(), BOTH, &[], &[]);
    let mut viewer = conn(registry.addr, None, None).await;
    let owned = eventually(CHANGE, "the node's two instances", || {
        let mut v = viewer.clone();
        async move { Some(instances(&mut v).await).filter(|i| i.len() == 2) }
    })
    .await;
    let node_lease = owned[0].lease_id;

    // Another client on the same machine, from another address, with a
    // lease of its own.
    let mut rogue = conn(registry.addr, Some(ROGUE_IP), None).await;
    let lease = rogue
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    let (mine, secret) = (lease.lease_id, lease.lease_secret.clone());
    for victim in &owned {
        let (service, id) = (victim.service.clone(), victim.instance_id.clone());
        let update = |lease_id: u64, lease_secret: &str| pb::UpdateRequest {
            lease_id,
            lease_secret: lease_secret.to_string(),
            service: service.clone(),
            instance_id: id.clone(),
            weight: Some(1000),
            ..Default::default()
        };
        let deregister = |lease_id: u64, lease_secret: &str| pb::DeregisterRequest {
            lease_id,
            lease_secret: lease_secret.to_string(),
            service: service.clone(),
            instance_id: id.clone(),
        };
        let shadow = |lease_id: u64, lease_secret: &str| pb::RegisterRequest {
            lease_id,
            lease_secret: lease_secret.to_string(),
            instance: Some(pb::Instance {
                service: service.clone(),
                instance_id: id.clone(),
                host: ROGUE_IP.to_string(),
                port: 1,
                weight: Some(1000),
                ..Default::default()
            }),
            file_descriptor_set: Vec::new(),
        };
        // With its own lease: the instance belongs to another one.
        let refusals = [
            rogue.deregister(deregister(mine, &secret)).await.map(drop),
            rogue.update(update(mine, &secret)).await.map(drop),
            rogue.register(shadow(mine, &secret)).await.map(drop),
        ];
        for r in refusals {
            let err = r.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
            assert!(
                err.message().contains("belongs to another lease"),
                "{err:?}"
            );
        }
        // With the node's lease id (Resolve shows it) and a guessed secret.
        let guess = "0123456789abcdef0123456789abcdef";
        let refusals = [
            rogue
                .deregister(deregister(node_lease, guess))
                .await
                .map(drop),
            rogue.update(update(node_lease, guess)).await.map(drop),
            rogue.register(shadow(node_lease, guess)).await.map(drop),
            rogue
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: node_lease,
                    lease_secret: guess.into(),
                })
                .await
                .map(drop),
        ];
        for r in refusals {
            let err = r.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
            assert!(err.message().contains("wrong lease_secret"), "{err:?}");
        }
    }
    assert_eq!(instances(&mut viewer).await, owned, "nothing changed");
    let (status, out, _) = client(
        registry.addr,
        &["call", "calculator/Add", "a=2", "b=3"],
        &[],
    );
    assert!(status.success() && out.contains('5'), "{out}");

    // The owner's own commands still work.
    node.process.send_line("u");
    node.process
        .wait_for_line("unregistered 2 services", CHANGE);
    assert!(instances(&mut viewer).await.is_empty());
    node.process.send_line("r");
    node.process.wait_for_line("registered 2 services", CHANGE);
    wait_for_count(&mut viewer, 2).await;

    // And so does expiry: a frozen node stops heartbeating and loses its
    // instances; thawed, it registers them again.
    node.process.signal(19); // SIGSTOP
    wait_for_count(&mut viewer, 0).await;
    node.process.signal(18); // SIGCONT
    wait_for_count(&mut viewer, 2).await;

    node.process.send_line("q");
    assert!(node.process.wait_exit(Duration::from_secs(20)).success());
    assert!(instances(&mut viewer).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_each_missing_or_wrong_token_is_refused_and_named_never_shown() {
    let registry = Registry::start(&["--write-token", WRITE, "--read-token", READ]);
    let addr = registry.addr.to_string();
    let mut reader = conn(registry.addr, None, Some(READ)).await;

    // Nodes without a token, and with a wrong one: refused, nothing registered.
    let mut refused = Vec::new();
    for (extra, env, expect) in [
        (vec![], vec![], "none was sent"),
        (
            vec!["--token", "not-the-token"],
            vec![],
            "the token sent is not it",
        ),
        (
            vec![],
            vec![("REGISTRY_TOKEN", READ)],
            "the token sent is not it",
        ),
    ] {
        let node = node_with(&addr, CALC, &extra, &env);
        let line = node
            .process
            .wait_for_line("GrantLease needs the registry's write token", CHANGE);
        assert!(line.contains(expect), "{line}");
        // tonic words UNAUTHENTICATED so.
        assert!(
            line.contains("does not have valid authentication credentials"),
            "{line}"
        );
        refused.push(node);
    }
    for node in &refused {
        for line in node.process.lines() {
            assert!(
                !line.contains(WRITE) && !line.contains(READ),
                "a token leaked: {line}"
            );
        }
    }
    assert!(
        instances(&mut reader).await.is_empty(),
        "nothing registered"
    );

    // The right token, from the environment: registered.
    let good = node_with(&addr, CALC, &[], &[("REGISTRY_TOKEN", WRITE)]);
    wait_for_count(&mut reader, 1).await;
    let listed = instances(&mut reader).await;
    assert_eq!(listed[0].port, u32::from(good.addr.port()));

    // Clients: the read token, or the write token, or nothing at all.
    let (status, _, err) = client(registry.addr, &["list"], &[]);
    assert!(!status.success());
    assert!(
        err.contains("read token") && err.contains("none was sent"),
        "{err}"
    );
    assert!(!err.contains(READ) && !err.contains(WRITE), "{err}");
    let (status, _, err) = client(registry.addr, &["--token", "guess", "list"], &[]);
    assert!(!status.success());
    assert!(
        err.contains("read token") && err.contains("not it"),
        "{err}"
    );
    let (status, out, _) = client(registry.addr, &["list", "--token", READ], &[]);
    assert!(status.success() && out.contains("calculator"), "{out}");
    let (status, out, _) = client(registry.addr, &["list"], &[("REGISTRY_TOKEN", WRITE)]);
    assert!(status.success() && out.contains("calculator"), "{out}");
    let (status, out, _) = client(
        registry.addr,
        &["--token", READ, "call", "calculator/Add", "a=2", "b=3"],
        &[],
    );
    assert!(status.success() && out.contains('5'), "{out}");

    // The read token cannot write.
    let err = reader
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("write token"), "{err:?}");
    assert_eq!(instances(&mut reader).await, listed, "still there");
    for line in registry.process.lines() {
        assert!(
            !line.contains(WRITE) && !line.contains(READ),
            "a token leaked: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_a_file() {
    let dir = TempDir::new("security-test");
    let file = dir.join("tokens.toml");
    std::fs::write(&file, format!("write = \"{WRITE}\"\n")).unwrap();
    let registry = Registry::start(&["--token-file", file.to_str().unwrap()]);
    let addr = registry.addr.to_string();
    let none = node_with(&addr, CALC, &[], &[]);
    none.process
        .wait_for_line("GrantLease needs the registry's write token", CHANGE);
    let _good = node_with(&addr, CALC, &["--token", WRITE], &[]);
    // No read token in the file: anyone may read.
    let mut reader = conn(registry.addr, None, None).await;
    wait_for_count(&mut reader, 1).await;
    let (status, out, _) = client(registry.addr, &["list"], &[]);
    assert!(status.success() && out.contains("calculator"), "{out}");
}

/// Runs one TLS scenario: registry on `places[0]`, node host on
/// `places[1]`, client on `places[2]`, each with certificates for its own
/// address.
async fn tls_scenario(places: [Place<'_>; 3], dir: &TempDir) {
    let [reg_at, node_at, client_at] = places;
    let ca = testkit::certs::TestCa::new(dir.path(), "sec-ca");
    let reg_ip = reg_at.ip().to_string();
    let node_ip = node_at.ip().to_string();
    let reg_cert = ca.server("registry", &[&reg_ip]);
    let node_cert = ca.server_and_client("node", &[&node_ip]);
    let client_cert = ca.client("client");
    let wrong = ca.server("elsewhere", &["10.99.99.99", "elsewhere.example"]);
    let p = |path: &std::path::Path| path.to_str().unwrap().to_string();
    let tls = |c: &testkit::certs::CertFiles| {
        vec![
            "--tls-cert".to_string(),
            p(&c.cert),
            "--tls-key".to_string(),
            p(&c.key),
        ]
    };
    let ca_flag = vec!["--tls-ca".to_string(), p(&ca.ca_pem)];

    // TLS on both listeners, the node verifying the registry.
    let registry = reg_at.registry(&tls(&reg_cert));
    let node_flags: Vec<String> = [tls(&node_cert), ca_flag.clone()].concat();
    let node = node_at.node(registry.addr, &node_flags);
    let client = |extra: &[String], args: &[&str]| {
        let mut all: Vec<String> = extra.to_vec();
        all.extend(args.iter().map(|a| a.to_string()));
        client_at.client(registry.addr, &all)
    };
    let listed = |out: &str| out.contains("calculator") && out.contains(&node.addr.to_string());
    let out = eventually(CHANGE, "the client lists the node over TLS", || {
        let (status, out, _) = client(&ca_flag, &["list"]);
        std::future::ready(Some(out).filter(|o| status.success() && listed(o)))
    })
    .await;
    assert!(listed(&out));
    let (status, out, _) = client(&ca_flag, &["call", "calculator/Add", "a=2", "b=3"]);
    assert!(
        status.success() && out.contains('5'),
        "call over TLS: {out}"
    );

    // A plaintext client fails, and says TLS may be the reason.
    let (status, _, err) = client(&[], &["list", "--wait-ms", "1500"]);
    assert!(!status.success());
    assert!(err.contains("--tls-ca"), "{err}");

    // A registry whose certificate names another host is refused.
    let impostor = reg_at.registry(&tls(&wrong));
    let (status, _, err) = client_at.client(
        impostor.addr,
        &[
            ca_flag.clone(),
            vec!["list".into(), "--wait-ms".into(), "1500".into()],
        ]
        .concat(),
    );
    assert!(!status.success());
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    drop(impostor);

    // Mutual TLS: no client certificate, no service.
    let mtls: Vec<String> = [
        tls(&reg_cert),
        ca_flag.clone(),
        vec!["--tls-require-client-cert".into()],
    ]
    .concat();
    let registry = reg_at.registry(&mtls);
    let node = node_at.node(registry.addr, &node_flags);
    let with_cert: Vec<String> = [ca_flag.clone(), tls(&client_cert)].concat();
    let out = eventually(CHANGE, "the client lists the node over mutual TLS", || {
        let (status, out, _) = client_at.client(
            registry.addr,
            &[with_cert.clone(), vec!["list".into()]].concat(),
        );
        let found = status.success() && out.contains(&node.addr.to_string());
        std::future::ready(Some(out).filter(|_| found))
    })
    .await;
    assert!(out.contains("calculator"));
    let (status, out, _) = client_at.client(
        registry.addr,
        &[
            with_cert.clone(),
            ["call", "calculator/Add", "a=1", "b=1"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ]
        .concat(),
    );
    assert!(status.success() && out.contains('2'), "{out}");
    let (status, _, err) = client_at.client(
        registry.addr,
        &[
            ca_flag.clone(),
            vec!["list".into(), "--wait-ms".into(), "1500".into()],
        ]
        .concat(),
    );
    assert!(
        !status.success(),
        "a client without a certificate must be refused"
    );
    assert!(err.contains("--tls-cert"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_across_loopback_addresses() {
    let dir = TempDir::new("security-test");
    tls_scenario(
        [
            Place::Loopback(Ipv4Addr::new(127, 0, 0, 1)),
            Place::Loopback(Ipv4Addr::new(127, 0, 0, 3)),
            Place::Loopback(Ipv4Addr::new(127, 0, 0, 1)),
        ],
        &dir,
    )
    .await;
}

#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_across_hosts_of_the_lan() {
    let lan = lan_for_test(3);
    let dir = TempDir::new("security-test");
    tls_scenario(
        [
            Place::Lan(lan.host(0)),
            Place::Lan(lan.host(1)),
            Place::Lan(lan.host(2)),
        ],
        &dir,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_peer_does_not_starve_another() {
    const RATE: u32 = 50;
    let rate = RATE.to_string();
    let registry = Registry::start(&["--max-registrations-per-sec-per-ip", &rate]);
    let _node = node_with(&registry.addr.to_string(), BOTH, &[], &[]);
    let mut viewer = conn(registry.addr, None, None).await;
    let before = eventually(CHANGE, "the node's two instances", || {
        let mut v = viewer.clone();
        async move { Some(instances(&mut v).await).filter(|i| i.len() == 2) }
    })
    .await;

    // The flood: 8 workers registering as fast as they can from 127.0.0.2.
    let flooder = conn(registry.addr, Some(ROGUE_IP), None).await;
    let flood_lease = flooder
        .clone()
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    let stop = Instant::now() + Duration::from_secs(3);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8u32 {
        let mut c = flooder.clone();
        let lease = flood_lease.clone();
        workers.spawn(async move {
            let (mut ok, mut limited, mut sample) = (0u32, 0u32, String::new());
            let mut n = 0u32;
            while Instant::now() < stop {
                n += 1;
                let r = c
                    .register(register_request(
                        lease.lease_id,
                        &lease.lease_secret,
                        "flood",
                        &format!("f{w}-{n}"),
                        ROGUE_IP,
                    ))
                    .await;
                match r {
                    Ok(_) => ok += 1,
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        limited += 1;
                        sample = e.message().to_string();
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            (ok, limited, sample)
        });
    }
    // Meanwhile a well-behaved peer registers at a modest pace: never refused.
    let mut good = conn(registry.addr, None, None).await;
    let lease = good
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    let mut good_ok = 0;
    while Instant::now() < stop {
        good.register(register_request(
            lease.lease_id,
            &lease.lease_secret,
            "steady",
            &format!("s{good_ok}"),
            Ipv4Addr::LOCALHOST,
        ))
        .await
        .unwrap_or_else(|e| panic!("the well-behaved peer was refused: {e:?}"));
        good_ok += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ok, mut limited, mut sample) = (0, 0, String::new());
    while let Some(r) = workers.join_next().await {
        let (o, l, s) = r.unwrap();
        ok += o;
        limited += l;
        if !s.is_empty() {
            sample = s;
        }
    }
    println!("flood: {ok} accepted, {limited} refused; steady peer: {good_ok} accepted");
    assert!(limited > 0, "the flood was never limited");
    // One second's burst plus the rate over 3 s, with slack for timing.
    assert!(ok <= RATE * 5, "{ok} flood registrations accepted");
    assert!(
        sample.contains("--max-registrations-per-sec-per-ip"),
        "{sample}"
    );
    assert!(good_ok >= 10, "{good_ok}");
    assert_eq!(resolve(&mut viewer, "steady").await.len(), good_ok as usize);
    let now: Vec<_> = instances(&mut viewer).await;
    assert_eq!(now, before, "the node lost nothing");
}

/// The address a rogue or flooding client connects from.
const ROGUE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_flood_from_one_peer_is_limited_and_others_still_get_leases() {
    // Leases count against the same per-peer budget as registrations:
    // otherwise one peer could fill the registry-wide lease cap.
    const RATE: u32 = 20;
    let registry = Registry::start(&["--max-registrations-per-sec-per-ip", &RATE.to_string()]);
    let mut rogue = conn(registry.addr, Some(ROGUE_IP), None).await;
    let mut granted = 0u32;
    let mut refusal = None;
    // Three seconds' worth, as fast as one caller can ask.
    for _ in 0..RATE * 3 {
        match rogue
            .grant_lease(pb::GrantLeaseRequest { ttl_ms: 300_000 })
            .await
        {
            Ok(_) => granted += 1,
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let err = refusal.expect("a burst of leases beyond the rate was never refused");
    println!("lease flood: {granted} granted, then {err:?}");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("per second") && err.message().contains("127.0.0.2"),
        "{err:?}"
    );
    // The bucket holds one second's worth, plus what refilled meanwhile.
    assert!((RATE..RATE * 2).contains(&granted), "{granted} granted");

    // Another peer is not charged for the flood.
    let mut other = conn(registry.addr, Some(Ipv4Addr::LOCALHOST), None).await;
    let lease = other
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 10_000 })
        .await
        .expect("a lease for a peer that did not flood")
        .into_inner();
    assert!(lease.lease_id != 0 && !lease.lease_secret.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_slowed_down_by_the_rate_limit_registers_everything_anyway() {
    // One registration per second from any one address: the node's second
    // plugin is refused at first, and retried, not given up.
    let registry = Registry::start(&["--max-registrations-per-sec-per-ip", "1"]);
    let node = node_with(&registry.addr.to_string(), BOTH, &[], &[]);
    let mut viewer = conn(registry.addr, None, None).await;
    wait_for_count(&mut viewer, 2).await;
    node.process
        .wait_for_line("the registry asked to slow down", CHANGE);
}
