//! Whatever is put in place of services.toml (a FIFO, a device, a directory,
//! a huge file), the node refuses it by name, keeps its lease and its last
//! good configuration, keeps serving, and still stops on SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{CHANGE, Node, resolve, wait_for_weights};
use registry_proto::calculator::v1::BinaryRequest;
use registry_proto::calculator::v1::calculator_client::CalculatorClient;
use testkit::Registry;

/// A short lease, so a node that stops heartbeating loses it within the test.
const CALC: &str = "lease_ttl_ms = 600\n[plugins.calculator]\nweight = 7\n";

/// Puts `make`'s result in place of the node's services.toml (built beside
/// it, then renamed over it, as an editor would), and checks that the node
/// says `why`, keeps its lease and serves, then stops on SIGTERM.
async fn survives(make: impl FnOnce(&Path), why: &str) {
    let registry = Registry::start(&[]);
    let mut node = Node::start(registry.addr, CALC);
    let mut client = registry.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7)]).await;
    let lease = resolve(&mut client, "calculator").await[0].lease_id;

    let from = node.process.line_count();
    let tmp = node.dir.join("replacement");
    make(&tmp);
    if tmp.is_dir() {
        // rename(2) cannot put a directory over a file.
        std::fs::remove_file(&node.config).unwrap();
    }
    std::fs::rename(&tmp, &node.config).unwrap();
    let (_, line) = node.process.wait_for_line_after(from, why, CHANGE);
    assert!(
        line.contains("services.toml") && line.contains("keeping the last good configuration"),
        "{line}"
    );

    // Five TTLs later: the same lease still holds the same registration, and
    // the node still answers on its port.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let calc = resolve(&mut client, "calculator").await;
    assert_eq!(calc.len(), 1, "{calc:?}");
    assert_eq!(calc[0].lease_id, lease, "the node lost its lease");
    assert_eq!(calc[0].weight, Some(7));
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        CalculatorClient::new(node.channel().await)
            .add(BinaryRequest { a: 2.0, b: 3.0 })
            .await
    })
    .await
    .expect("the node does not answer on its port")
    .unwrap();
    assert_eq!(reply.into_inner().value, 5.0);

    // SIGTERM stops it within a second (two here, for a loaded CI machine;
    // a wedged node never stops).
    node.process.signal(15);
    let status = node.process.wait_exit(Duration::from_secs(2));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_place_of_the_config_is_refused() {
    survives(
        |path| {
            let status = std::process::Command::new("mkfifo")
                .arg(path)
                .status()
                .unwrap();
            assert!(status.success());
        },
        "is a FIFO",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_to_dev_zero_is_refused() {
    survives(
        |path| std::os::unix::fs::symlink("/dev/zero", path).unwrap(),
        "is a character device",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_in_place_of_the_config_is_refused() {
    survives(|path| std::fs::create_dir(path).unwrap(), "is a directory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_over_the_size_cap_is_refused() {
    // Valid TOML all the way (comments), so only the size is wrong.
    let line = format!("# {}\n", "x".repeat(1021));
    let big = format!("{CALC}{}", line.repeat(1025));
    survives(
        move |path| std::fs::write(path, big).unwrap(),
        "is larger than 1048576 bytes",
    )
    .await;
}

#[test]
fn a_fifo_at_start_is_a_clear_error() {
    let dir = common::TempDir::new("node-host-test");
    let path = dir.join("services.toml");
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let mut cmd = testkit::command("node-host");
    cmd.arg("--config")
        .arg(&path)
        .args(["--registry", "127.0.0.1:1"]);
    let (status, _, stderr) = testkit::run(cmd, Duration::from_secs(10));
    assert!(!status.success());
    assert!(stderr.contains("services.toml: is a FIFO"), "{stderr}");
}
