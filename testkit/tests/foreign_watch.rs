//! The Watch stream as a client in another language sees it: Python's
//! grpcio, with stubs generated from `registry.proto` by grpcio-tools,
//! reads a snapshot, an Added and a Removed event, and gets the refusals
//! of a request over the size limit (RESOURCE_EXHAUSTED) and of a bad
//! service name (INVALID_ARGUMENT), each naming the problem. The registry
//! writes Watch responses itself (pre-encoded bytes with their gRPC
//! prefix, `registry::service::WithWatch`), so a client that is not tonic
//! is the check that they are gRPC as every client reads it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use testkit::Registry;

#[test]
fn python_grpcio_follows_a_watch_and_reads_its_refusals() {
    let registry = Registry::start(&[]);
    let out = tempfile::tempdir().unwrap();
    let root = testkit::workspace_root();
    let mut cmd = std::process::Command::new(testkit::python3());
    cmd.arg(root.join("testkit/py/watch_client.py"))
        .arg(registry.addr.to_string())
        .arg(root.join("proto/proto"))
        .arg(out.path());
    let (status, stdout, stderr) = testkit::run(cmd, Duration::from_secs(60));
    assert!(status.success(), "{stdout}\n{stderr}");
    for line in [
        "snapshot: reset at revision 1 with ['py-1']",
        "change: [('ADDED', 'py-2')] at revision 2",
        "change: [('REMOVED', 'py-1')] at revision 3",
        "refused RESOURCE_EXHAUSTED: the WatchRequest is larger than the 8388608 bytes",
        "refused INVALID_ARGUMENT: services[0]",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
}
