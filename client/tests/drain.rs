//! Weight 0 drains a node: an edit of its services.toml to `weight = 0`
//! keeps it listed but sends it no new calls under every policy; back to a
//! weight, it gets traffic again; with every instance drained a call fails
//! UNAVAILABLE, naming the service. Real registry, node hosts and client.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use testkit::{READY_TIMEOUT, Registry};

const POLICIES: [&str; 4] = [
    "random",
    "weighted-random",
    "weighted-round-robin",
    "least-loaded",
];

/// Calls served per address by `call calculator/Add --repeat 200 --lb lb`,
/// read from its spread table; asserts none failed.
fn served(reg: std::net::SocketAddr, lb: &str) -> Vec<(String, String, u32)> {
    let out = client_ok(
        reg,
        &[
            "call",
            "calculator/Add",
            "a=1",
            "b=1",
            "--repeat",
            "200",
            "--lb",
            lb,
        ],
    );
    assert!(
        out.contains(&format!("200 calls to calculator ({lb}), 0 failed")),
        "{out}"
    );
    spread(&out)
}

/// Waits until `client list` shows `addr` with `weight=WEIGHT`.
fn wait_listed(reg: std::net::SocketAddr, addr: std::net::SocketAddr, weight: &str) -> String {
    let want = format!("weight={weight}");
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let out = client_ok(reg, &["list"]);
        let row = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(addr.to_string().as_str()));
        if row.is_some_and(|l| l.contains(&want)) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never listed with {want}:\n{out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_node_drained_in_services_toml_gets_no_calls_stays_listed_and_comes_back() {
    let registry = Registry::start(&[]);
    let reg = registry.addr;
    let watch = client_watch(reg);
    let drained = Node::start(reg, "[plugins.calculator]\nweight = 3\n");
    let other = Node::start(reg, "[plugins.calculator]\nweight = 1\n");
    wait_instances(reg, "calculator", 2);

    // 3 -> 0: an update in place, not a removal.
    drained.write_config("[plugins.calculator]\nweight = 0\n");
    watch.wait_for_line(
        &format!("~ calculator {} weight=0 (drained)", drained.addr),
        READY_TIMEOUT,
    );
    let list = wait_listed(reg, drained.addr, "0");
    assert!(
        list.contains("calculator (calculator.v1.Calculator): 2 instances"),
        "{list}"
    );
    assert!(list.contains("weight=0 (drained)"), "{list}");
    let v: serde_json::Value = serde_json::from_str(&client_ok(reg, &["list", "--json"])).unwrap();
    let instances = v["services"][0]["instances"].as_array().unwrap();
    let json = instances
        .iter()
        .find(|i| i["address"] == drained.addr.to_string().as_str())
        .unwrap();
    assert_eq!(
        (&json["weight"], &json["drained"]),
        (&0.into(), &true.into())
    );
    for lb in POLICIES {
        let rows = served(reg, lb);
        assert_eq!(calls_to(&rows, drained.addr), 0, "{lb}: {rows:?}");
        assert_eq!(calls_to(&rows, other.addr), 200, "{lb}: {rows:?}");
    }

    // 0 -> 3: traffic again, by weight.
    drained.write_config("[plugins.calculator]\nweight = 3\n");
    watch.wait_for_line(
        &format!("~ calculator {} weight=3", drained.addr),
        READY_TIMEOUT,
    );
    wait_listed(reg, drained.addr, "3");
    for lb in POLICIES {
        let rows = served(reg, lb);
        assert!(calls_to(&rows, drained.addr) > 0, "{lb}: {rows:?}");
    }
    let rows = served(reg, "weighted-round-robin");
    assert_eq!(
        (calls_to(&rows, drained.addr), calls_to(&rows, other.addr)),
        (150, 50),
        "{rows:?}"
    );

    // Both drained: a clear error naming the service, for every policy.
    other.write_config("[plugins.calculator]\nweight = 0\n");
    drained.write_config("[plugins.calculator]\nweight = 0\n");
    wait_listed(reg, drained.addr, "0");
    wait_listed(reg, other.addr, "0");
    for lb in POLICIES {
        let err = client_err(reg, &["call", "calculator/Add", "a=1", "b=1", "--lb", lb]);
        assert!(
            err.contains(
                "Unavailable: service `calculator`: all its instances are drained (weight 0; 2 instances listed, none takes new calls)"
            ),
            "{lb}: {err}"
        );
    }
    // Never removed along the way.
    assert!(
        !watch.lines().iter().any(|l| l.starts_with("- calculator")),
        "{:?}",
        watch.lines()
    );
}
