//! Server reflection as a generic tool from another language sees it:
//! Python's grpcio-reflection lists the services of the registry and of a
//! node host with each protocol version (v1, v1alpha) and resolves every
//! one of them, reflection and health included; a miss is an in-stream
//! error_response (NOT_FOUND) that leaves the stream open.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use testkit::Registry;

/// Runs the Python client against `target` with `version`; returns its
/// output after checking it resolved every name in `expect`.
fn python_resolves(target: SocketAddr, version: &str, expect: &[&str]) {
    let script = testkit::workspace_root().join("testkit/py/reflection_client.py");
    let mut cmd = std::process::Command::new(testkit::python3());
    cmd.arg(script).arg(target.to_string()).arg(version);
    let (status, stdout, stderr) = testkit::run(cmd, Duration::from_secs(60));
    assert!(
        status.success(),
        "{version} against {target}:\n{stdout}\n{stderr}"
    );
    for name in expect {
        assert!(
            stdout.contains(&format!("resolved {name}: ")),
            "{version}: {name} not resolved:\n{stdout}"
        );
    }
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
}

const FIXED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[test]
fn python_reflection_resolves_everything_on_the_registry() {
    let registry = Registry::start(&[]);
    let mut expect = FIXED.to_vec();
    expect.push("registry.v1.Registry");
    for version in ["v1", "v1alpha"] {
        python_resolves(registry.addr, version, &expect);
    }
}

#[test]
fn python_reflection_resolves_everything_on_a_node_host() {
    let registry = Registry::start(&[]);
    let node = common::node_with(
        &registry.addr.to_string(),
        "[plugins.calculator]\nweight = 2\n[plugins.echo]\nweight = 3\n",
        &[],
        &[],
    );
    let mut expect = FIXED.to_vec();
    expect.extend(["calculator.v1.Calculator", "echo.v1.Echo"]);
    for version in ["v1", "v1alpha"] {
        python_resolves(node.addr, version, &expect);
    }
}
