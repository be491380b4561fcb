//! The bench against a real r-nacos: a short run of every measure with an
//! r-nacos equivalent gives an r-nacos figure for each of them (or says it
//! has no equivalent), so the Nacos protocol client works end to end:
//! connection set-up, registration, queries, subscriptions and their pushes,
//! and the removal of a killed connection's instance.
//!
//! r-nacos is not in CI (it takes minutes to build), so this test is ignored
//! by default. Run it with
//! `cargo install rnacos --version 0.8.8` (or `RNACOS_BIN=/path/to/rnacos`)
//! and `cargo test -p bench --test rnacos -- --ignored`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn rnacos_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RNACOS_BIN") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("rnacos"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "rnacos not found: `cargo install rnacos --version 0.8.8`, \
                 or set RNACOS_BIN"
            )
        })
}

#[test]
#[ignore = "needs rnacos (cargo install rnacos --version 0.8.8); run with --ignored"]
fn every_measure_with_an_equivalent_gets_an_rnacos_figure() {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_bench"));
    let mut cmd = Command::new(bench);
    let dir = bench.parent().unwrap();
    if dir.join("registry").exists() && dir.join("node-host").exists() {
        cmd.arg("--no-build");
    }
    cmd.arg("--rnacos-bin").arg(rnacos_bin()).args([
        "--quick",
        "--json",
        "--no-etcd",
        "--only",
        "register,resolve,watch,failure,scale",
        "--duration-ms",
        "200",
        "--clients",
        "1,4",
        "--watchers",
        "1,5",
    ]);
    let (status, stdout, _) = testkit::run(cmd, Duration::from_secs(300));
    assert!(status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        report["rnacos"].as_str().unwrap().starts_with("r-nacos"),
        "{}",
        report["rnacos"]
    );
    let figures = report["figures"].as_array().unwrap();
    let mut measured = Vec::new();
    for f in figures {
        let name = format!("{}: {}", f["group"], f["name"]);
        assert_ne!(f["name"], "failed", "{name}: {}", f["note"]);
        let Some(other) = f["others"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "r-nacos")
        else {
            continue;
        };
        if other["equivalent"] == true {
            let v = other["value"].as_f64();
            // Memory growth of a small load can round to nothing; every
            // time and rate is positive.
            let floor_ok = |v: f64| {
                if name.contains("RSS") {
                    v >= 0.0
                } else {
                    v > 0.0
                }
            };
            assert!(v.is_some_and(floor_ok), "{name}: r-nacos gave {v:?}");
            measured.push(name);
        } else {
            assert!(
                f["note"]
                    .as_str()
                    .unwrap()
                    .contains("r-nacos: no equivalent")
            );
        }
    }
    for want in [
        "register",
        "resolve",
        "watch",
        "kill -9 to REMOVED",
        "RSS per instance",
        "full snapshot",
    ] {
        assert!(
            measured.iter().any(|m| m.contains(want)),
            "no r-nacos figure for {want}: {measured:?}"
        );
    }
}
