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
