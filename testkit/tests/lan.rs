//! Multi-host tests on a LAN of network namespaces (testkit::netns): first
//! the harness itself, then the registry, node hosts and client as separate
//! machines.
//!
//! Each test needs root and iproute2; without them it prints SKIPPED (or
//! fails under CI=true). Timings are printed as `TIMING name=value` lines.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use testkit::READY_TIMEOUT;
use testkit::netns::{Lan, lan_or_skip};

const PROBE_PORT: u16 = 7000;

/// Sends lines on `session` until one of them is echoed; returns how long
/// it took. Each attempt waits the probe's own timeout.
fn echo_until_through(session: &mut testkit::Process, tag: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let cursor = session.line_count();
        session.send_line(&format!("{tag}{n}"));
        let (_, line) = session.wait_for_line_after(cursor, "", Duration::from_secs(10));
        if line.starts_with("echo ") {
            // Some echo came back (maybe of an earlier line): the link works.
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "no echo within {within:?}");
    }
}

#[test]
fn harness_hosts_reach_each_other_and_cut_drops_silently() {
    let Some(lan) = lan_or_skip(2) else { return };
    let (a, b) = (lan.host(0), lan.host(1));
    assert_ne!(a.ip(), b.ip());
    let listener = a.spawn(
        "listen",
        "lan-probe",
        &["listen", &format!("0.0.0.0:{PROBE_PORT}")],
    );
    listener.wait_for_line("listening on", READY_TIMEOUT);
    let target = format!("{}:{PROBE_PORT}", a.ip());

    // B reaches A by its LAN address, and so does the test process (via the bridge).
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &target, "3000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "connected");
    let addr: SocketAddr = target.parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    // A port where nothing listens: refused at once, not hung.
    let other = format!("{}:{}", a.ip(), PROBE_PORT + 1);
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &other, "3000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "refused");

    // A long-lived connection B -> A.
    let mut session = b.spawn("session", "lan-probe", &["connect", &target, "700"]);
    session.wait_for_line("connected", READY_TIMEOUT);
    session.send_line("before");
    session.wait_for_line("echo before", Duration::from_secs(5));

    lan.cut(a);
    let cut_at = session.line_count();
    session.send_line("during");
    let (_, line) = session.wait_for_line_after(cut_at, "", Duration::from_secs(10));
    assert_eq!(line, "timeout", "a cut link must drop silently");
    // New connections time out: no RST, no refusal.
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &target, "700"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "timeout");
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_err());

    lan.heal(a);
    // The connection made before the cut survived it: no reset reached B.
    let took = echo_until_through(&mut session, "after", Duration::from_secs(20));
    println!("TIMING harness_heal_to_echo_ms={}", took.as_millis());
    let lines = session.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l == "reset" || l == "closed" || l.starts_with("error")),
        "the connection saw an error: {lines:?}"
    );
    let (_, out, _) = b.run(
        "lan-probe",
        &["connect", &target, "3000"],
        Duration::from_secs(10),
    );
    assert_eq!(out.trim(), "connected");
}

/// Lists namespaces and links, for checking what a LAN left behind.
fn ip_show() -> String {
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&ns.stdout).into_owned() + &String::from_utf8_lossy(&links.stdout)
}

#[test]
fn harness_drop_removes_everything_and_new_removes_leftovers() {
    // A leftover of a killed run: namespace and bridge owned by a pid that
    // cannot exist (above any pid_max).
    let dead = "tklan254-p999999999-h0";
    if std::process::Command::new("ip")
        .args(["netns", "add", dead])
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: no ip tool");
    }
    let _ = std::process::Command::new("ip")
        .args(["link", "add", "name", "tkbr254", "type", "bridge"])
        .status();
    let _ = std::process::Command::new("ip")
        .args([
            "link",
            "set",
            "tkbr254",
            "alias",
            "testkit-lan pid=999999999",
        ])
        .status();

    let Some(lan) = lan_or_skip(3) else { return };
    let names: Vec<String> = lan.hosts().iter().map(|h| h.netns().to_string()).collect();
    let bridge = lan.bridge().to_string();
    let shown = ip_show();
    assert!(
        !shown.contains(dead),
        "leftover namespace not removed:\n{shown}"
    );
    assert!(
        !shown.contains("tkbr254:"),
        "leftover bridge not removed:\n{shown}"
    );
    for n in &names {
        assert!(shown.contains(n.as_str()), "{n} missing:\n{shown}");
    }
    // A process inside a host does not keep its namespace alive past Drop.
    let _sleeper = lan
        .host(0)
        .spawn("listen", "lan-probe", &["listen", "0.0.0.0:7001"]);
    drop(lan);
    let shown = ip_show();
    for n in &names {
        assert!(!shown.contains(n.as_str()), "{n} left behind:\n{shown}");
    }
    assert!(
        !shown.contains(&format!("{bridge}:")),
        "{bridge} left behind:\n{shown}"
    );
}

#[test]
fn harness_parallel_lans_get_distinct_subnets() {
    let Some(one) = lan_or_skip(1) else { return };
    let two = Lan::new(1).unwrap();
    assert_ne!(one.gateway(), two.gateway());
    assert_ne!(one.host(0).ip(), two.host(0).ip());
    assert_ne!(one.bridge(), two.bridge());
}
