//! `scripts/demo.sh` as a newcomer runs it: a second one while the first
//! runs fails within seconds with the registry's own error; SIGTERM stops
//! it cleanly at any moment, leaving nothing running.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use testkit::Process;

/// A loopback port nothing listens on (one the OS just handed out).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn demo(registry: SocketAddr, dashboard: SocketAddr) -> Command {
    let mut cmd = Command::new("bash");
    // As a person runs it: without the variables `cargo test` sets for its
    // tests, which would make the demo's own `cargo build` see a different
    // environment and rebuild crates whose build scripts watch it.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO") || key == "LD_LIBRARY_PATH" || key == "OUT_DIR" {
            cmd.env_remove(key);
        }
    }
    cmd.arg(testkit::workspace_root().join("scripts/demo.sh"))
        .env("REGISTRY_ADDR", registry.to_string())
        .env("DASHBOARD", dashboard.to_string());
    cmd
}

/// Nothing listens on `addr` any more (within a few seconds).
fn closed(addr: SocketAddr) {
    for _ in 0..100 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{addr} still accepts connections: something the demo started is still running");
}

#[test]
fn a_second_demo_fails_fast_with_the_registrys_error_and_sigterm_stops_the_first() {
    let (registry, dashboard) = (free_port(), free_port());
    let mut first = Process::spawn("demo-1", demo(registry, dashboard));
    first.wait_for_line("Registry and nodes are running", Duration::from_secs(300));

    // Less than the demo's own 30 s wait for a process to come up: it must
    // notice that the registry exited, not time out.
    let (status, stdout, stderr) = testkit::run(demo(registry, dashboard), Duration::from_secs(25));
    assert!(!status.success(), "{stdout}");
    assert!(stderr.contains("demo: registry exited:"), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
    // The first one is unharmed.
    assert!(first.is_running());
    TcpStream::connect(registry).unwrap();

    first.signal(15);
    let status = first.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(143), "{status:?}");
    first.wait_for_line("stopping:", Duration::from_secs(1));
    closed(registry);
    closed(dashboard);
}

#[test]
fn sigterm_during_start_up_stops_the_demo_and_everything_it_started() {
    let (registry, dashboard) = (free_port(), free_port());
    let mut demo = Process::spawn("demo", demo(registry, dashboard));
    // As soon as the registry is up, before the nodes are: mid start-up.
    for _ in 0..3000 {
        if TcpStream::connect(registry).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    demo.signal(15);
    let status = demo.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(143), "{status:?}");
    closed(registry);
    closed(dashboard);
}
