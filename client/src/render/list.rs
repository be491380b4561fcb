//! `list`: the registered services and their instances.

use super::weight::weight_text;
use crate::directory::{Snapshot, address};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The table `list` prints: each service with its protobuf name and its
/// instances (address, weight, metadata sorted by key).
pub fn list_text(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let services = snapshot.services();
    if services.is_empty() {
        out.push_str("no services registered\n");
    }
    for service in services {
        let instances = snapshot.instances(&service);
        let proto = snapshot
            .proto_service(&service)
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        let stale = if snapshot.is_stale(&service) {
            " [stale: registry restarted]"
        } else {
            ""
        };
        let plural = if instances.len() == 1 { "" } else { "s" };
        let _ = writeln!(
            out,
            "{service}{proto}: {} instance{plural}{stale}",
            instances.len()
        );
        for i in instances.iter() {
            let mut line = format!("  {:<22} weight={}", address(i), weight_text(i));
            if i.instance_id != address(i) {
                let _ = write!(line, " id={}", i.instance_id);
            }
            let metadata: BTreeMap<_, _> = i.metadata.iter().collect();
            for (k, v) in metadata {
                let _ = write!(line, " {k}={v}");
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// What `list --json` prints, for the registry at `registry`.
pub fn list_json(registry: &str, snapshot: &Snapshot) -> serde_json::Value {
    let services: Vec<serde_json::Value> = snapshot
        .services()
        .iter()
        .map(|s| {
            let instances: Vec<serde_json::Value> = snapshot
                .instances(s)
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "instance_id": i.instance_id,
                        "host": i.host,
                        "port": i.port,
                        "address": address(i),
                        "weight": i.effective_weight(),
                        "drained": i.effective_weight() == 0,
                        "metadata": i.metadata.iter().collect::<BTreeMap<_, _>>(),
                    })
                })
                .collect();
            serde_json::json!({
                "name": s,
                "proto_service": snapshot.proto_service(s).unwrap_or_default(),
                "stale": snapshot.is_stale(s),
                "instances": instances,
            })
        })
        .collect();
    serde_json::json!({
        "registry": registry,
        "registry_id": snapshot.registry_id,
        "revision": snapshot.revision,
        "services": services,
    })
}
