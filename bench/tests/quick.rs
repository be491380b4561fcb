//! The bench binary end to end: a short run against the real registry prints
//! well-formed JSON with a figure for each measure asked for.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

#[test]
fn quick_json_run_reports_our_figures() {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_bench"));
    let mut cmd = Command::new(bench);
    // `cargo test --workspace` has built the binaries under test already;
    // only a lone `cargo test -p bench` needs the bench to build them.
    let dir = bench.parent().unwrap();
    if dir.join("registry").exists() && dir.join("node-host").exists() {
        cmd.arg("--no-build");
    }
    cmd.args([
        "--quick",
        "--json",
        "--no-etcd",
        "--only",
        "register,resolve,watch",
        "--duration-ms",
        "100",
        "--clients",
        "1,4",
        "--watchers",
        "1,5",
    ]);
    let (status, stdout, _) = testkit::run(cmd, Duration::from_secs(240));
    assert!(status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let figures = report["figures"].as_array().unwrap();
    for group in ["register", "resolve", "watch"] {
        let of_group: Vec<_> = figures.iter().filter(|f| f["group"] == group).collect();
        assert!(!of_group.is_empty(), "no {group} figure in {stdout}");
        for f in of_group {
            assert_ne!(f["name"], "failed", "{group} failed: {}", f["note"]);
        }
    }
    // Our side is measured; etcd was not asked for.
    let register = figures.iter().find(|f| f["group"] == "register").unwrap();
    assert!(register["ours"].as_f64().unwrap() > 0.0);
    assert!(register["reference"].is_null());
    assert_eq!(report["config"]["clients"], serde_json::json!([1, 4]));
}

/// The figure of `group` named `name` in a JSON report.
fn figure<'a>(figures: &'a [serde_json::Value], group: &str, name: &str) -> &'a serde_json::Value {
    figures
        .iter()
        .find(|f| f["group"] == group && f["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .unwrap_or_else(|| panic!("no {group}: {name} figure in {figures:?}"))
}

/// Issue 16's column: with etcd, our registry over etcd (`--store etcd://`)
/// is measured beside the memory store and raw etcd, with its ratio to raw
/// etcd, on register, resolve, watch and failure detection.
#[test]
fn quick_run_with_etcd_has_the_etcd_store_column() {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_bench"));
    let mut cmd = Command::new(bench);
    let dir = bench.parent().unwrap();
    if dir.join("registry").exists() && dir.join("node-host").exists() {
        cmd.arg("--no-build");
    }
    cmd.arg("--etcd-bin").arg(testkit::etcd::etcd_bin());
    cmd.args([
        "--quick",
        "--json",
        "--no-rnacos",
        "--only",
        "register,resolve,watch,failure",
        "--duration-ms",
        "100",
        "--clients",
        "1",
        "--watchers",
        "1",
    ]);
    let (status, stdout, _) = testkit::run(cmd, Duration::from_secs(240));
    assert!(status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let figures = report["figures"].as_array().unwrap();
    for (group, name) in [
        ("register", "1 client"),
        ("resolve", "server latency p50"),
        ("watch", "p50, 1 watcher"),
        ("failure", "kill -9 to REMOVED, median"),
        ("failure", "lease grant to REMOVED, median"),
    ] {
        let f = figure(figures, group, name);
        let store = f["others"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "etcd-store")
            .unwrap_or_else(|| panic!("{group}: {name} has no etcd-store column: {f}"));
        let (value, etcd) = (store["value"].as_f64(), f["reference"].as_f64());
        assert!(value.is_some_and(|v| v > 0.0), "{group}: {name}: {f}");
        assert!(etcd.is_some_and(|v| v > 0.0), "{group}: {name}: {f}");
        let ratio = store["ratio"].as_f64().unwrap();
        assert!((ratio - value.unwrap() / etcd.unwrap()).abs() < 1e-9, "{f}");
        assert_eq!(store["ratio_name"], "etcd-store/etcd");
    }
    // A lease over etcd expires after the registry's own TTL, not etcd's.
    let expiry = figure(figures, "failure", "lease grant to REMOVED, median");
    assert!(
        expiry["note"]
            .as_str()
            .unwrap()
            .contains("etcd-store 1000 ms"),
        "{expiry}"
    );
}

#[test]
fn help_names_every_measure() {
    let (status, stdout, _) = testkit::run(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_bench"));
            c.arg("--help");
            c
        },
        Duration::from_secs(30),
    );
    assert!(status.success());
    for word in [
        "register", "resolve", "watch", "failure", "generic", "scale", "--quick", "--json",
    ] {
        assert!(
            stdout.contains(word),
            "--help does not mention {word}:\n{stdout}"
        );
    }
}
