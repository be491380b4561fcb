//! Bad inputs, table-driven, with the real binaries: protobuf fields,
//! oversized payloads, limits and floods against a running registry, and
//! bad TOML files and command-line arguments given to each binary. Each one
//! must produce its documented error (gRPC code, or a non-zero exit, and a
//! message fragment) while a well-behaved node host keeps its instances
//! (Resolve before and after) and stays callable.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use registry_proto::registry::v1 as pb;
use testkit::{Registry, eventually};
use tonic::Code;

/// One gRPC call to make.
enum Call {
    Register(pb::RegisterRequest),
    Update(pb::UpdateRequest),
    Deregister(pb::DeregisterRequest),
    Resolve(pb::ResolveRequest),
    Descriptors(pb::GetDescriptorsRequest),
    Watch(pb::WatchRequest),
    Revoke(pb::RevokeLeaseRequest),
}

async fn call(client: &mut support::RegistryConn, call: Call) -> Result<(), tonic::Status> {
    match call {
        Call::Register(r) => client.register(r).await.map(drop),
        Call::Update(r) => client.update(r).await.map(drop),
        Call::Deregister(r) => client.deregister(r).await.map(drop),
        Call::Resolve(r) => client.resolve(r).await.map(drop),
        Call::Descriptors(r) => client.get_descriptors(r).await.map(drop),
        Call::Watch(r) => client.watch(r).await.map(drop),
        Call::Revoke(r) => client.revoke_lease(r).await.map(drop),
    }
}

/// Where bad clients connect from (the well-behaved node is on 127.0.0.1).
const BAD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Where the flood comes from.
const FLOOD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const RATE: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_each_get_their_documented_error_and_a_good_node_loses_nothing() {
    let rate = RATE.to_string();
    let registry = Registry::start(&[
        "--max-instances-per-lease",
        "3",
        "--max-instances-per-service",
        "5",
        "--max-watches-per-connection",
        "2",
        "--max-registrations-per-sec-per-ip",
        &rate,
    ]);
    let mut node = node_with(&registry.addr.to_string(), BOTH, &[], &[]);
    let mut viewer = conn(registry.addr, None, None).await;
    let before = eventually(CHANGE, "the node's two instances", || {
        let mut v = viewer.clone();
        async move { Some(instances(&mut v).await).filter(|i| i.len() == 2) }
    })
    .await;

    let mut bad = conn(registry.addr, Some(BAD_IP), None).await;
    let lease = bad
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    let (id, secret) = (lease.lease_id, lease.lease_secret.clone());
    let base = || register_request(id, &secret, "bad", "b1", BAD_IP);
    let with = |f: &dyn Fn(&mut pb::Instance)| {
        let mut r = base();
        f(r.instance.as_mut().unwrap());
        Call::Register(r)
    };
    let meta = |n: usize, len: usize| {
        move |i: &mut pb::Instance| {
            for k in 0..n {
                i.metadata.insert(format!("k{k}"), "v".repeat(len));
            }
        }
    };
    let update = || pb::UpdateRequest {
        lease_id: id,
        lease_secret: secret.clone(),
        service: "calculator".into(),
        instance_id: before[0].instance_id.clone(),
        ..Default::default()
    };
    let calc = registry_proto::CALCULATOR_DESCRIPTORS.to_vec();
    use Code::{InvalidArgument as Invalid, NotFound, PermissionDenied, ResourceExhausted};
    let table: Vec<(&str, Call, Code, &str)> = vec![
        (
            "Register lease_id 0",
            Call::Register(pb::RegisterRequest {
                lease_id: 0,
                ..base()
            }),
            Invalid,
            "lease_id: required",
        ),
        (
            "Register without lease_secret",
            Call::Register(pb::RegisterRequest {
                lease_secret: String::new(),
                ..base()
            }),
            Invalid,
            "lease_secret: required",
        ),
        (
            "Register without instance",
            Call::Register(pb::RegisterRequest {
                instance: None,
                ..base()
            }),
            Invalid,
            "instance: required",
        ),
        (
            "Register unknown lease",
            Call::Register(pb::RegisterRequest {
                lease_id: 12345,
                ..base()
            }),
            NotFound,
            "lease 12345 not found",
        ),
        (
            "Register empty service",
            with(&|i| i.service = String::new()),
            Invalid,
            "instance.service: required",
        ),
        (
            "Register service with a slash",
            with(&|i| i.service = "a/b".into()),
            Invalid,
            "instance.service: only [A-Za-z0-9._-]",
        ),
        (
            "Register service starting with _",
            with(&|i| i.service = "_x".into()),
            Invalid,
            "instance.service: must start with",
        ),
        (
            "Register 129-char service",
            with(&|i| i.service = "s".repeat(129)),
            Invalid,
            "instance.service: at most 128",
        ),
        (
            "Register instance_id with a tab",
            with(&|i| i.instance_id = "a\tb".into()),
            Invalid,
            "instance.instance_id: only printable ASCII",
        ),
        (
            "Register 129-char instance_id",
            with(&|i| i.instance_id = "i".repeat(129)),
            Invalid,
            "instance.instance_id: at most 128",
        ),
        (
            "Register empty host",
            with(&|i| i.host = String::new()),
            Invalid,
            "instance.host: required",
        ),
        (
            "Register host with spaces",
            with(&|i| i.host = "no spaces".into()),
            Invalid,
            "instance.host: not an IP address",
        ),
        (
            "Register 254-char host",
            with(&|i| i.host = "h".repeat(254)),
            Invalid,
            "instance.host: at most 253",
        ),
        (
            "Register port 0",
            with(&|i| i.port = 0),
            Invalid,
            "instance.port: must be 1..=65535, got 0",
        ),
        (
            "Register port 70000",
            with(&|i| i.port = 70_000),
            Invalid,
            "instance.port: must be 1..=65535, got 70000",
        ),
        (
            "Register weight 1001",
            with(&|i| i.weight = Some(1001)),
            Invalid,
            "instance.weight: must be 0..=1000",
        ),
        (
            "Register 65 metadata entries",
            with(&meta(65, 1)),
            Invalid,
            "instance.metadata: at most 64 entries",
        ),
        (
            "Register 1025-byte metadata value",
            with(&meta(1, 1025)),
            Invalid,
            "values must be at most 1024 bytes",
        ),
        (
            "Register 20 KB of metadata",
            with(&meta(20, 1000)),
            Invalid,
            "at most 16384 bytes of keys and values",
        ),
        (
            "Register empty metadata key",
            with(&|i| {
                i.metadata.insert(String::new(), "v".into());
            }),
            Invalid,
            "keys must be 1..=128 bytes",
        ),
        (
            "Register proto_service without descriptors",
            with(&|i| i.proto_service = "calculator.v1.Calculator".into()),
            Invalid,
            "file_descriptor_set: required when instance.proto_service is set",
        ),
        (
            "Register garbage descriptors",
            Call::Register(pb::RegisterRequest {
                file_descriptor_set: b"garbage".to_vec(),
                ..base()
            }),
            Invalid,
            "file_descriptor_set: not a valid FileDescriptorSet",
        ),
        (
            "Register 4 MiB + 1 descriptors",
            Call::Register(pb::RegisterRequest {
                file_descriptor_set: vec![0; 4 * 1024 * 1024 + 1],
                ..base()
            }),
            Invalid,
            "file_descriptor_set: at most 4194304 bytes",
        ),
        (
            "Register proto_service the descriptors lack",
            {
                let mut r = base();
                r.instance.as_mut().unwrap().proto_service = "echo.v1.Echo".into();
                r.file_descriptor_set = calc.clone();
                Call::Register(r)
            },
            Invalid,
            "instance.proto_service: \"echo.v1.Echo\" is not defined",
        ),
        (
            "Register descriptors of an unsupported syntax",
            Call::Register(pb::RegisterRequest {
                file_descriptor_set: testkit::descriptors_with_syntax("S", "editions"),
                ..base()
            }),
            Invalid,
            "unsupported syntax \"editions\"",
        ),
        (
            "Register a 513-byte proto_service",
            {
                let long = "S".repeat(511);
                let mut r = base();
                r.instance.as_mut().unwrap().proto_service = format!("p.{long}");
                r.file_descriptor_set = testkit::descriptors_defining(&long);
                Call::Register(r)
            },
            Invalid,
            "instance.proto_service: at most 512 bytes",
        ),
        (
            "Register request over 8 MiB",
            Call::Register(pb::RegisterRequest {
                file_descriptor_set: vec![0; 9 * 1024 * 1024],
                ..base()
            }),
            ResourceExhausted,
            "too large",
        ),
        (
            "Register shadowing the node's instance",
            {
                let mut r = base();
                let i = r.instance.as_mut().unwrap();
                i.service = "calculator".into();
                i.instance_id = before[0].instance_id.clone();
                Call::Register(r)
            },
            PermissionDenied,
            "belongs to another lease",
        ),
        (
            "Update weight 5000",
            Call::Update(pb::UpdateRequest {
                weight: Some(5000),
                ..update()
            }),
            Invalid,
            "weight: must be 0..=1000",
        ),
        (
            "Update metadata without replace_metadata",
            Call::Update(pb::UpdateRequest {
                metadata: [("k".to_string(), "v".to_string())].into(),
                ..update()
            }),
            Invalid,
            "metadata: given without replace_metadata",
        ),
        (
            "Update the node's instance",
            Call::Update(pb::UpdateRequest {
                weight: Some(9),
                ..update()
            }),
            PermissionDenied,
            "belongs to another lease",
        ),
        (
            "Update a missing instance",
            Call::Update(pb::UpdateRequest {
                instance_id: "nope".into(),
                weight: Some(2),
                ..update()
            }),
            NotFound,
            "instance \"nope\" of service \"calculator\" not found",
        ),
        (
            "Deregister without instance_id",
            Call::Deregister(pb::DeregisterRequest {
                lease_id: id,
                lease_secret: secret.clone(),
                service: "calculator".into(),
                instance_id: String::new(),
            }),
            Invalid,
            "instance_id: required",
        ),
        (
            "Deregister the node's instance with its lease id, guessed secret",
            Call::Deregister(pb::DeregisterRequest {
                lease_id: before[0].lease_id,
                lease_secret: "guess".into(),
                service: "calculator".into(),
                instance_id: before[0].instance_id.clone(),
            }),
            PermissionDenied,
            "wrong lease_secret",
        ),
        (
            "Resolve a bad service name",
            Call::Resolve(pb::ResolveRequest {
                service: "bad name".into(),
            }),
            Invalid,
            "service: only [A-Za-z0-9._-]",
        ),
        (
            "GetDescriptors of no service",
            Call::Descriptors(pb::GetDescriptorsRequest {
                service: String::new(),
            }),
            Invalid,
            "service: required",
        ),
        (
            "GetDescriptors of an unknown service",
            Call::Descriptors(pb::GetDescriptorsRequest {
                service: "ghost".into(),
            }),
            NotFound,
            "service \"ghost\" not found",
        ),
        (
            "Watch 1025 services",
            Call::Watch(pb::WatchRequest {
                services: (0..1025).map(|i| format!("s{i}")).collect(),
                ..Default::default()
            }),
            Invalid,
            "services: at most 1024",
        ),
        (
            "Watch a bad service name",
            Call::Watch(pb::WatchRequest {
                services: vec!["ok".into(), "not ok".into()],
                ..Default::default()
            }),
            Invalid,
            "services[1]:",
        ),
        (
            "RevokeLease without secret",
            Call::Revoke(pb::RevokeLeaseRequest {
                lease_id: id,
                lease_secret: String::new(),
            }),
            Invalid,
            "lease_secret: required",
        ),
        (
            "RevokeLease of the node's lease, guessed secret",
            Call::Revoke(pb::RevokeLeaseRequest {
                lease_id: before[0].lease_id,
                lease_secret: "guess".into(),
            }),
            PermissionDenied,
            "wrong lease_secret",
        ),
    ];
    let mut count = 0;
    for (what, c, code, fragment) in table {
        let err = call(&mut bad, c).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(fragment),
            "{what}: expected {fragment:?} in {:?}",
            err.message()
        );
        println!(
            "BAD INPUT {what}: {:?} {}",
            err.code(),
            err.message().chars().take(100).collect::<String>()
        );
        count += 1;
    }

    // Limits reached one step at a time.
    let mut limits = 0;
    for n in 0..3 {
        call(
            &mut bad,
            Call::Register(register_request(
                id,
                &secret,
                "quota",
                &format!("q{n}"),
                BAD_IP,
            )),
        )
        .await
        .unwrap();
    }
    let err = call(
        &mut bad,
        Call::Register(register_request(id, &secret, "quota", "q3", BAD_IP)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), ResourceExhausted);
    assert!(
        err.message().contains("instances per lease")
            && err.message().contains("--max-instances-per-lease"),
        "{err:?}"
    );
    println!("BAD INPUT 4th instance under one lease: {}", err.message());
    limits += 1;
    let other = bad
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    for n in 3..5 {
        call(
            &mut bad,
            Call::Register(register_request(
                other.lease_id,
                &other.lease_secret,
                "quota",
                &format!("q{n}"),
                BAD_IP,
            )),
        )
        .await
        .unwrap();
    }
    let err = call(
        &mut bad,
        Call::Register(register_request(
            other.lease_id,
            &other.lease_secret,
            "quota",
            "q5",
            BAD_IP,
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), ResourceExhausted);
    assert!(
        err.message().contains("instances per service")
            && err.message().contains("--max-instances-per-service"),
        "{err:?}"
    );
    println!("BAD INPUT 6th instance of one service: {}", err.message());
    limits += 1;
    let _w1 = bad.watch(pb::WatchRequest::default()).await.unwrap();
    let _w2 = bad.watch(pb::WatchRequest::default()).await.unwrap();
    let err = bad.watch(pb::WatchRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), ResourceExhausted);
    assert!(
        err.message().contains("watch streams per connection")
            && err.message().contains("--max-watches-per-connection"),
        "{err:?}"
    );
    println!("BAD INPUT 3rd watch on one connection: {}", err.message());
    limits += 1;
    // A burst far over the rate from one address.
    let mut flood = conn(registry.addr, Some(FLOOD_IP), None).await;
    let fl = flood
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner();
    let mut refused = None;
    for n in 0..(RATE * 3) {
        // Same id each time: an upsert, so only the rate can refuse it.
        let r = call(
            &mut flood,
            Call::Register(register_request(
                fl.lease_id,
                &fl.lease_secret,
                "flood",
                "f",
                FLOOD_IP,
            )),
        )
        .await;
        if let Err(e) = r {
            refused = Some((n, e));
            break;
        }
    }
    let (n, err) = refused.expect("a burst of 3x the rate was never refused");
    assert_eq!(err.code(), ResourceExhausted);
    assert!(
        err.message().contains("registrations per second per peer")
            && err.message().contains("--max-registrations-per-sec-per-ip"),
        "{err:?}"
    );
    println!(
        "BAD INPUT registration burst (refused after {n}): {}",
        err.message()
    );
    limits += 1;
    // Leases draw from the same budget: the flooding peer gets no more.
    let mut refused = None;
    for n in 0..(RATE * 3) {
        if let Err(e) = flood
            .grant_lease(pb::GrantLeaseRequest { ttl_ms: 300_000 })
            .await
        {
            refused = Some((n, e));
            break;
        }
    }
    let (n, err) = refused.expect("a burst of 3x the rate in leases was never refused");
    assert_eq!(err.code(), ResourceExhausted);
    assert!(
        err.message()
            .contains("registrations per second per peer (Register and GrantLease calls)"),
        "{err:?}"
    );
    println!(
        "BAD INPUT lease burst (refused after {n}): {}",
        err.message()
    );
    limits += 1;
    count += limits;

    // A bad edit of the good node's own file: reported with its line, ignored.
    let config = node.dir.join("services.toml");
    let cursor = node.process.line_count();
    std::fs::write(&config, "[plugins.calculator]\nweight = 5000\n").unwrap();
    let (_, line) = node
        .process
        .wait_for_line_after(cursor, "weight 5000 is out of range", CHANGE);
    assert!(line.contains("services.toml:2"), "{line}");
    println!("BAD INPUT node file edited to weight 5000: {line}");
    count += 1;

    // Bad files and arguments given to each binary: a clear error, exit non-zero.
    let dir = TempDir::new("security-test");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let unknown_plugin = file("unknown.toml", "[plugins.calcualtor]\n");
    let not_toml = file("garbage.toml", "[plugins.calculator\nweight = \n");
    let weight_over = file("over.toml", "[plugins.calculator]\nweight = 1001\n");
    let empty_key = file("key.toml", "[plugins.echo]\nmetadata = { \"\" = \"x\" }\n");
    let good = file("good.toml", CALC);
    let bad_tokens = file("tokens.toml", "writ = \"x\"\n");
    let spaced_token = file("spaced.toml", "read = \"a b\"\n");
    let reg = registry.addr.to_string();
    let cases: Vec<(&str, &str, Vec<&str>, &str)> = vec![
        (
            "node-host: unknown plugin in the file",
            "node-host",
            vec!["--config", &unknown_plugin],
            "unknown.toml:1: unknown plugin `calcualtor`",
        ),
        (
            "node-host: file that is not TOML",
            "node-host",
            vec!["--config", &not_toml],
            "garbage.toml:1",
        ),
        (
            "node-host: weight 1001 in the file",
            "node-host",
            vec!["--config", &weight_over],
            "weight 1001 is out of range 0..=1000",
        ),
        (
            "node-host: empty metadata key",
            "node-host",
            vec!["--config", &empty_key],
            "metadata keys must not be empty",
        ),
        (
            "node-host: --port 70000",
            "node-host",
            vec!["--port", "70000"],
            "70000",
        ),
        (
            "node-host: --tls-cert without --tls-key",
            "node-host",
            vec!["--config", &good, "--tls-cert", "x.pem"],
            "--tls-cert needs --tls-key",
        ),
        (
            "registry: --token-file with an unknown key",
            "registry",
            vec!["--listen", "127.0.0.1:0", "--token-file", &bad_tokens],
            "unknown field `writ`",
        ),
        (
            "registry: --token-file missing",
            "registry",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                "/nonexistent/tokens.toml",
            ],
            "cannot read --token-file",
        ),
        (
            "registry: token with a space in the file",
            "registry",
            vec!["--listen", "127.0.0.1:0", "--token-file", &spaced_token],
            "read token (from --token-file",
        ),
        (
            "registry: --write-token with a space",
            "registry",
            vec!["--listen", "127.0.0.1:0", "--write-token", "a b"],
            "write token (from --write-token) must be printable ASCII",
        ),
        (
            "registry: --min-ttl-ms 0",
            "registry",
            vec!["--listen", "127.0.0.1:0", "--min-ttl-ms", "0"],
            "invalid value '0' for '--min-ttl-ms <MS>': 0 is not in 1..=604800000",
        ),
        (
            "registry: --min-ttl-ms above --max-ttl-ms",
            "registry",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--min-ttl-ms",
                "5000",
                "--max-ttl-ms",
                "1000",
            ],
            "need --min-ttl-ms <= --max-ttl-ms (got 5000 and 1000)",
        ),
        (
            "registry: --listen not an address",
            "registry",
            vec!["--listen", "nowhere"],
            "invalid value 'nowhere' for '--listen",
        ),
        (
            "registry: --max-instances-per-lease=-1",
            "registry",
            vec!["--max-instances-per-lease=-1"],
            "invalid value '-1' for '--max-instances-per-lease",
        ),
        (
            "registry: --tls-require-client-cert without --tls-ca",
            "registry",
            vec!["--listen", "127.0.0.1:0", "--tls-require-client-cert"],
            "--tls-ca",
        ),
        (
            "client: --registry without a port",
            "client",
            vec!["--registry", "nohost", "list"],
            "invalid registry address `nohost`",
        ),
        (
            "client: --tls-ca file missing",
            "client",
            vec![
                "--registry",
                &reg,
                "--tls-ca",
                "/nonexistent/ca.pem",
                "list",
            ],
            "cannot read --tls-ca /nonexistent/ca.pem",
        ),
        (
            "client: --token with a space",
            "client",
            vec!["--registry", &reg, "--token", "a b", "list"],
            "printable ASCII without spaces",
        ),
        (
            "client: unknown field",
            "client",
            vec!["--registry", &reg, "call", "calculator/Add", "c=1"],
            "no field `c` in calculator.v1.BinaryRequest",
        ),
        (
            "client: wrong type",
            "client",
            vec!["--registry", &reg, "call", "calculator/Add", "a=x"],
            "field `a` of calculator.v1.BinaryRequest expects a double",
        ),
        (
            "client: malformed JSON",
            "client",
            vec!["--registry", &reg, "call", "calculator/Add", "{\"a\": 1,"],
            "malformed JSON",
        ),
        (
            "client: unknown service",
            "client",
            vec!["--registry", &reg, "call", "nosuch/Add"],
            "no service `nosuch` is registered",
        ),
        (
            "client: unknown method",
            "client",
            vec!["--registry", &reg, "call", "calculator/Nope"],
            "no method `Nope`",
        ),
        (
            "client: target without a slash",
            "client",
            vec!["--registry", &reg, "call", "calculator"],
            "expected SERVICE/METHOD",
        ),
        (
            "client: --repeat 0",
            "client",
            vec![
                "--registry",
                &reg,
                "call",
                "calculator/Add",
                "--repeat",
                "0",
            ],
            "--repeat",
        ),
    ];
    for (what, bin, args, fragment) in cases {
        let mut cmd = testkit::command(bin);
        for var in [
            "REGISTRY_TOKEN",
            "TLS_CA",
            "TLS_CERT",
            "TLS_KEY",
            "REGISTRY_ADDR",
        ] {
            cmd.env_remove(var);
        }
        cmd.args(&args);
        let (status, _, stderr) = testkit::run(cmd, Duration::from_secs(30));
        assert!(!status.success(), "{what}: exited 0");
        assert!(
            stderr.contains(fragment),
            "{what}: expected {fragment:?} in:\n{stderr}"
        );
        println!("BAD INPUT {what}: exit {:?}", status.code());
        count += 1;
    }

    // The well-behaved node lost nothing and is still callable.
    assert_eq!(
        instances(&mut viewer).await,
        before,
        "the node's instances changed"
    );
    let (status, out, _) = client(
        registry.addr,
        &["call", "calculator/Add", "a=2", "b=3"],
        &[],
    );
    assert!(status.success() && out.contains('5'), "{out}");
    assert!(node.process.is_running());
    println!("{count} distinct bad inputs refused as documented");
    assert!(count >= 30, "{count}");
}
