//! The registry's DNS interface (`--dns`), asked by `dig` (Debian's
//! dnsutils): A and SRV answers with their targets, NXDOMAIN, NODATA, a
//! truncated UDP answer that `dig` then retries over TCP, and malformed
//! packets that leave the registry serving.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use registry_proto::registry::v1 as pb;
use testkit::Registry;

/// A registry with DNS on a free port, and that port's address.
fn registry() -> (Registry, SocketAddr) {
    registry_with(&[])
}

/// [`registry`] with more flags, and `--http` on a free port.
fn registry_with(extra: &[&str]) -> (Registry, SocketAddr) {
    let mut args = vec!["--dns", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let registry = Registry::launch().http("127.0.0.1:0").args(&args).start();
    let line = registry
        .process
        .wait_for_line("DNS listening", testkit::READY_TIMEOUT);
    // The log line may carry colour codes around `addr=`.
    let plain: String = strip_ansi(&line);
    let addr = plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {plain:?}"));
    (registry, addr.parse().unwrap())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Registers `(service, host, port, weight)` under one long lease.
async fn register(registry: &Registry, instances: &[(&str, &str, u32, u32)]) {
    let mut client = registry.client().await;
    let lease = client
        .grant_lease(pb::GrantLeaseRequest { ttl_ms: 120_000 })
        .await
        .unwrap()
        .into_inner();
    for (service, host, port, weight) in instances {
        client
            .register(pb::RegisterRequest {
                lease_id: lease.lease_id,
                lease_secret: lease.lease_secret.clone(),
                instance: Some(pb::Instance {
                    service: service.to_string(),
                    host: host.to_string(),
                    port: *port,
                    weight: Some(*weight),
                    ..Default::default()
                }),
                file_descriptor_set: Vec::new(),
            })
            .await
            .unwrap();
    }
}

/// What dig printed: the status, the header flags, and the records of the
/// answer and additional sections (`name ttl class type data...`).
struct Dig {
    status: String,
    flags: String,
    answers: Vec<Vec<String>>,
    additionals: Vec<Vec<String>>,
    text: String,
}

fn dig(dns: SocketAddr, args: &[&str]) -> Dig {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", dns.ip()))
        .arg("-p")
        .arg(dns.port().to_string())
        .args(["+tries=1", "+time=3"])
        .args(args);
    let (status, text, _) = testkit::run(cmd, Duration::from_secs(20));
    assert!(status.success(), "dig failed: {text}");
    let mut section = "";
    let mut out = Dig {
        status: String::new(),
        flags: String::new(),
        answers: Vec::new(),
        additionals: Vec::new(),
        text: text.clone(),
    };
    for line in text.lines() {
        if let Some(rest) = line.split_once("status: ") {
            out.status = rest.1.split(',').next().unwrap().to_string();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            out.flags = rest.split(';').next().unwrap().to_string();
        }
        if line.starts_with(";; ") && line.ends_with("SECTION:") {
            section = if line.contains("ANSWER") {
                "answer"
            } else if line.contains("ADDITIONAL") {
                "additional"
            } else {
                "other"
            };
            continue;
        }
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        let fields: Vec<String> = line.split_whitespace().map(String::from).collect();
        match section {
            "answer" => out.answers.push(fields),
            "additional" => out.additionals.push(fields),
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn dig_gets_a_srv_nxdomain_nodata_and_truncation() {
    let (registry, dns) = registry();
    register(
        &registry,
        &[
            ("calculator", "127.0.0.1", 7001, 3),
            ("calculator", "127.0.0.2", 7002, 1),
        ],
    )
    .await;
    // 100 instances: far more A records than fit in 512 bytes.
    let hosts: Vec<String> = (1..=100).map(|i| format!("10.1.0.{i}")).collect();
    let big: Vec<(&str, &str, u32, u32)> =
        hosts.iter().map(|h| ("big", h.as_str(), 80, 1)).collect();
    register(&registry, &big).await;

    let a = dig(dns, &["calculator.service.registry", "A"]);
    assert_eq!(a.status, "NOERROR", "{}", a.text);
    assert!(a.flags.contains("aa"), "authoritative: {}", a.text);
    let mut ips: Vec<&str> = a.answers.iter().map(|r| r[4].as_str()).collect();
    ips.sort();
    assert_eq!(ips, ["127.0.0.1", "127.0.0.2"], "{}", a.text);
    assert!(
        a.answers.iter().all(|r| r[1] == "2" && r[3] == "A"),
        "TTL 2 s: {}",
        a.text
    );

    let srv = dig(dns, &["calculator.service.registry", "SRV"]);
    assert_eq!(srv.status, "NOERROR", "{}", srv.text);
    // name ttl IN SRV priority weight port target
    let mut records: Vec<(String, String, String)> = srv
        .answers
        .iter()
        .map(|r| (r[5].clone(), r[6].clone(), r[7].clone()))
        .collect();
    records.sort();
    assert_eq!(
        records,
        [
            ("1".into(), "7002".into(), "7f000002.addr.registry.".into()),
            ("3".into(), "7001".into(), "7f000001.addr.registry.".into()),
        ],
        "{}",
        srv.text
    );
    // Each target resolves in the additional section.
    for (_, _, target) in &records {
        assert!(
            srv.additionals
                .iter()
                .any(|r| &r[0] == target && r[3] == "A"),
            "{target} in the additional section: {}",
            srv.text
        );
    }

    let nx = dig(dns, &["nosuch.service.registry", "A"]);
    assert_eq!(nx.status, "NXDOMAIN", "{}", nx.text);
    assert!(
        nx.text.contains("SOA"),
        "the SOA for negative caching: {}",
        nx.text
    );

    let txt = dig(dns, &["calculator.service.registry", "TXT"]);
    assert_eq!(
        (txt.status.as_str(), txt.answers.len()),
        ("NOERROR", 0),
        "{}",
        txt.text
    );

    let outside = dig(dns, &["example.com", "A"]);
    assert_eq!(outside.status, "REFUSED", "{}", outside.text);

    // Over UDP without EDNS (512 bytes): cut, with TC set.
    let udp = dig(dns, &["+ignore", "+noedns", "big.service.registry", "A"]);
    assert!(
        udp.flags.split_whitespace().any(|f| f == "tc"),
        "TC: {}",
        udp.text
    );
    assert!(
        !udp.answers.is_empty() && udp.answers.len() < 64,
        "{}",
        udp.text
    );
    // 64 SRV records and their targets do not fit its EDNS size (1232)
    // either: dig retries over TCP by itself and gets the capped answer.
    let tcp = dig(dns, &["big.service.registry", "SRV"]);
    assert!(
        tcp.text.contains("Truncated, retrying in TCP mode"),
        "{}",
        tcp.text
    );
    assert_eq!(tcp.answers.len(), 64, "capped at 64: {}", tcp.text);
    assert_eq!(tcp.additionals.len(), 64, "{}", tcp.text);
    let tcp_only = dig(dns, &["+tcp", "calculator.service.registry", "A"]);
    assert_eq!(tcp_only.answers.len(), 2, "{}", tcp_only.text);
}

#[tokio::test]
async fn malformed_packets_leave_the_registry_serving() {
    let (mut registry, dns) = registry();
    register(&registry, &[("calculator", "127.0.0.1", 7001, 1)]).await;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut junk: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0; 3],
        vec![0xff; 12],
        // One question claimed, none there.
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0],
        // A name whose compression pointer points at itself.
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1,
        ],
        // A label longer than the packet.
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 63, b'a',
        ],
        // A response (QR set): never answered (no reflection).
        vec![0x12, 0x34, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0xab; 4000],
    ];
    // And a few hundred pseudo-random packets.
    let mut x: u32 = 0x9e37_79b9;
    for n in 0..300 {
        let len = 12 + (n % 60);
        junk.push(
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x & 0xff) as u8
                })
                .collect(),
        );
    }
    for packet in &junk {
        udp.send_to(packet, dns).unwrap();
    }
    // The same over TCP: a length prefix promising more than is sent, then
    // garbage, then a closed connection.
    {
        use std::io::Write;
        let mut tcp = std::net::TcpStream::connect(dns).unwrap();
        tcp.write_all(&[0xff, 0xff, 1, 2, 3]).unwrap();
        let mut tcp = std::net::TcpStream::connect(dns).unwrap();
        tcp.write_all(&[0, 12]).unwrap();
        tcp.write_all(&[0xff; 12]).unwrap();
    }
    // FORMERR (or nothing) came back, never a crash.
    let mut buf = [0u8; 4096];
    let mut replies = 0;
    while let Ok((n, _)) = udp.recv_from(&mut buf) {
        assert!(n >= 12);
        replies += 1;
    }
    eprintln!("{} malformed packets sent, {replies} replies", junk.len());
    assert!(registry.process.is_running(), "the registry is still up");
    let a = dig(dns, &["calculator.service.registry", "A"]);
    assert_eq!(a.status, "NOERROR", "{}", a.text);
    assert_eq!(a.answers.len(), 1, "{}", a.text);
    let a = dig(dns, &["+tcp", "calculator.service.registry", "A"]);
    assert_eq!(a.answers.len(), 1, "{}", a.text);
    // The gRPC side too.
    let mut client = registry.client().await;
    client
        .list_services(pb::ListServicesRequest::default())
        .await
        .unwrap();
}

/// A query for `name` A, framed for TCP (two length bytes first).
fn tcp_query(id: u16, name: &str) -> Vec<u8> {
    let mut message = id.to_be_bytes().to_vec();
    // RD; one question.
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    // The root, type A, class IN.
    message.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend(message);
    framed
}

/// What became of a query sent on a held TCP connection.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A reply with this id, this RCODE and this many answers.
    Answered { id: u16, rcode: u8, answers: u16 },
    /// The server closed the connection (EOF or reset) without replying.
    Closed,
}

/// Sends one A query on `stream` and reads its reply (up to 10 s).
fn ask_tcp(stream: &mut std::net::TcpStream, id: u16) -> Outcome {
    use std::io::{ErrorKind, Read, Write};
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let closed = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
        )
    };
    if let Err(e) = stream.write_all(&tcp_query(id, "calculator.service.registry")) {
        assert!(closed(&e), "write: {e}");
        return Outcome::Closed;
    }
    let mut len = [0u8; 2];
    if let Err(e) = stream.read_exact(&mut len) {
        assert!(closed(&e), "no reply and not closed within 10 s: {e}");
        return Outcome::Closed;
    }
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).unwrap();
    assert!(reply.len() >= 12, "{reply:?}");
    Outcome::Answered {
        id: u16::from_be_bytes([reply[0], reply[1]]),
        rcode: reply[3] & 0x0f,
        answers: u16::from_be_bytes([reply[6], reply[7]]),
    }
}

/// `dig +tcp` without asserting it succeeded: whether it got an answer,
/// and what it printed.
fn dig_tcp(dns: SocketAddr) -> (bool, String) {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", dns.ip()))
        .arg("-p")
        .arg(dns.port().to_string())
        .args([
            "+tries=1",
            "+time=3",
            "+tcp",
            "calculator.service.registry",
            "A",
        ]);
    let (status, text, _) = testkit::run(cmd, Duration::from_secs(20));
    (status.success() && text.contains("status: NOERROR"), text)
}

#[tokio::test]
async fn tcp_connections_past_the_cap_are_closed_while_udp_keeps_answering() {
    const CAP: u16 = 8;
    let (mut registry, dns) = registry_with(&["--dns-max-tcp-connections", "8"]);
    register(&registry, &[("calculator", "127.0.0.1", 7001, 1)]).await;
    let served = |id| Outcome::Answered {
        id,
        rcode: 0,
        answers: 1,
    };

    // CAP connections, each shown to hold its place by an answered query.
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    for id in 0..CAP {
        let mut stream = std::net::TcpStream::connect(dns).unwrap();
        assert_eq!(ask_tcp(&mut stream, id), served(id), "connection {id}");
        held.push(stream);
    }
    // Past the cap: closed by the registry, never answered.
    for id in 100..105 {
        let mut stream = std::net::TcpStream::connect(dns).unwrap();
        assert_eq!(ask_tcp(&mut stream, id), Outcome::Closed, "connection {id}");
    }
    let (answered, text) = dig_tcp(dns);
    assert!(!answered, "dig +tcp past the cap: {text}");
    // Each of the 5 and dig's one connection counted.
    let metrics = testkit::http::get(registry.http.unwrap(), "/metrics", &[]).body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "registry_dns_tcp_refused_total 6"),
        "{metrics}"
    );
    // UDP is not held up by the TCP connections.
    let a = dig(dns, &["calculator.service.registry", "A"]);
    assert_eq!(
        (a.status.as_str(), a.answers.len()),
        ("NOERROR", 1),
        "{}",
        a.text
    );
    // The held connections are still open and served: the cap refused
    // the others, not the idle timeout.
    for (id, stream) in (200..).zip(held.iter_mut()) {
        assert_eq!(ask_tcp(stream, id), served(id));
    }

    // Half of them close: dig +tcp gets in (once the registry has seen
    // them go; within 10 s).
    held.truncate(usize::from(CAP / 2));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (answered, text) = dig_tcp(dns);
        if answered {
            assert!(text.contains("127.0.0.1"), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dig +tcp not served after connections closed: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (id, stream) in (300..).zip(held.iter_mut()) {
        assert_eq!(ask_tcp(stream, id), served(id));
    }
    let a = dig(dns, &["calculator.service.registry", "A"]);
    assert_eq!(a.answers.len(), 1, "{}", a.text);

    // The registry kept running, with what was registered.
    assert!(registry.process.is_running(), "the registry is still up");
    let mut client = registry.client().await;
    let services = client
        .list_services(pb::ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(&str, u32)> = services
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.instance_count))
        .collect();
    assert_eq!(names, [("calculator", 1)], "{services:?}");
}

#[test]
fn a_bad_domain_is_refused_before_listening() {
    let mut cmd = testkit::command("registry");
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--dns",
        "127.0.0.1:0",
        "--dns-domain",
        "bad_name",
    ]);
    let (status, out, err) = testkit::run(cmd, Duration::from_secs(20));
    assert!(!status.success());
    assert!(!out.contains("listening"), "{out}");
    assert!(err.contains("--dns-domain \"bad_name\""), "{err}");
}
