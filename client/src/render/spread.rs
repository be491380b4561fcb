//! The table printed after `call --repeat`: calls per instance, next to its
//! weight and the share the policy promises.

use crate::directory::address;
use crate::lb::PolicyKind;
use registry_proto::registry::v1::Instance;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The table for calls to `service` under `policy`: `served` counts the
/// calls each address served; `instances` are the service's instances now
/// (an address that served calls and has left shows with weight 0). A
/// weight of 0, drained or departed, is expected to take no calls.
pub fn spread_table(
    instances: &[Instance],
    service: &str,
    policy: PolicyKind,
    served: &BTreeMap<String, u32>,
    failures: u32,
) -> String {
    let mut weights: BTreeMap<String, u32> = instances
        .iter()
        .map(|i| (address(i), i.effective_weight()))
        .collect();
    for addr in served.keys() {
        weights.entry(addr.clone()).or_insert(0);
    }
    let total_calls: u32 = served.values().sum();
    // u64: the weights come from the registry, and their sum must not overflow.
    let total_weight: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let live = weights.values().filter(|w| **w > 0).count();
    let weighted = matches!(
        policy,
        PolicyKind::WeightedRandom | PolicyKind::WeightedRoundRobin
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{total_calls} calls to {service} ({}), {failures} failed",
        policy_name(policy)
    );
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>9} {:>7} {:>7}",
        "instance", "weight", "expected", "calls", "share"
    );
    for (addr, weight) in &weights {
        let expected = if *weight == 0 {
            0.0
        } else if weighted {
            f64::from(*weight) / total_weight as f64
        } else {
            1.0 / live as f64
        };
        let calls = served.get(addr).copied().unwrap_or(0);
        let share = f64::from(calls) / f64::from(total_calls.max(1));
        let _ = writeln!(
            out,
            "{addr:<24} {weight:>6} {:>8.1}% {calls:>7} {:>6.1}%",
            expected * 100.0,
            share * 100.0
        );
    }
    out
}

/// A policy's name as on the command line: `weighted-round-robin`.
pub fn policy_name(policy: PolicyKind) -> String {
    use clap::ValueEnum;
    policy
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(port: u32, weight: u32) -> Instance {
        Instance {
            host: "10.0.0.1".into(),
            port,
            weight: Some(weight),
            ..Default::default()
        }
    }

    #[test]
    fn shares_next_to_the_weights_and_departed_instances_at_weight_0() {
        let served: BTreeMap<String, u32> = [
            ("10.0.0.1:1".to_string(), 3),
            ("10.0.0.1:2".to_string(), 1),
            ("10.0.0.1:9".to_string(), 4),
        ]
        .into();
        let table = spread_table(
            &[inst(1, 3), inst(2, 1)],
            "calc",
            PolicyKind::WeightedRoundRobin,
            &served,
            2,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "8 calls to calc (weighted-round-robin), 2 failed");
        // 10.0.0.1:9 served calls and left: weight 0, expected none.
        assert_eq!(
            lines[1..],
            [
                "instance                 weight  expected   calls   share",
                "10.0.0.1:1                    3     75.0%       3   37.5%",
                "10.0.0.1:2                    1     25.0%       1   12.5%",
                "10.0.0.1:9                    0      0.0%       4   50.0%",
            ]
        );
        // Unweighted policies expect equal shares, but none for a drained
        // instance.
        let table = spread_table(
            &[inst(1, 3), inst(2, 1), inst(3, 0)],
            "calc",
            PolicyKind::Random,
            &BTreeMap::new(),
            0,
        );
        assert!(
            table.contains("10.0.0.1:1                    3     50.0%       0    0.0%"),
            "{table}"
        );
        assert!(
            table.contains("10.0.0.1:3                    0      0.0%       0    0.0%"),
            "{table}"
        );
    }
}
