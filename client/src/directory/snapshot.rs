//! The directory's view: [`Snapshot`] (instances by service, live and
//! stale) and the [`Change`]s between one view and the next.

use registry_proto::registry::v1::{Instance, RemovalReason};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Why an instance left the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalCause {
    /// The registry said so, for this reason.
    Registry(RemovalReason),
    /// It was missing from a fresh snapshot after a reconnect.
    Resync,
    /// The registry restarted and it did not register again within the grace
    /// period.
    NotReregistered,
}

impl fmt::Display for RemovalCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemovalCause::Registry(RemovalReason::Deregistered) => "deregistered",
            RemovalCause::Registry(RemovalReason::LeaseExpired) => "lease expired",
            RemovalCause::Registry(RemovalReason::LeaseRevoked) => "lease revoked",
            RemovalCause::Registry(RemovalReason::KeepaliveClosed) => "node disconnected",
            RemovalCause::Registry(RemovalReason::Unspecified) => "removed",
            RemovalCause::Resync => "gone while disconnected",
            RemovalCause::NotReregistered => "not re-registered after a registry restart",
        })
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new instance.
    Added,
    /// Weight, address or metadata changed.
    Updated,
    /// Gone.
    Removed(RemovalCause),
}

/// One change to the directory, as broadcast to subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The instance after the change (before it, when removed).
    pub instance: Instance,
}

/// One service's instances, sorted by instance id: an immutable list shared
/// by every snapshot (and every caller) until the service changes, when a new
/// list is built. Looking instances up is therefore a reference-count
/// increment, not a copy.
pub type Instances = Arc<[Instance]>;

/// Instances by service; each list sorted by instance id.
pub(super) type ByService = BTreeMap<String, Instances>;

/// An immutable view of the directory at one moment. Cloning it is cheap:
/// the per-service lists are shared.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The registry process this view came from ("" before the first).
    pub registry_id: String,
    /// The registry revision this view reflects.
    pub revision: u64,
    /// Whether a first snapshot has been received.
    pub synced: bool,
    /// Whether the watch stream is currently up.
    pub connected: bool,
    /// Live instances by service, each list sorted by instance id.
    pub(super) live: ByService,
    /// Instances a previous registry process knew and the current one does
    /// not (yet), kept until the grace period ends.
    pub(super) stale: ByService,
}

impl Snapshot {
    /// The instances to use for `service`, sorted by instance id: the live
    /// ones, or, if it has none, the stale ones from before a registry
    /// restart. Empty if neither. The list is shared, not copied.
    pub fn instances(&self, service: &str) -> Instances {
        match self.live.get(service) {
            Some(l) if !l.is_empty() => l.clone(),
            _ => self
                .stale
                .get(service)
                .cloned()
                .unwrap_or_else(|| Arc::from([])),
        }
    }

    /// Whether `service`'s instances are stale fallbacks.
    pub fn is_stale(&self, service: &str) -> bool {
        self.live.get(service).is_none_or(|l| l.is_empty())
            && self.stale.get(service).is_some_and(|l| !l.is_empty())
    }

    /// Whether `service` has stale instances, used or not (shadowed by live
    /// ones): while it does, its [`instances`](Self::instances) can change
    /// with no [`Change`] of its own.
    pub fn has_stale(&self, service: &str) -> bool {
        self.stale.get(service).is_some_and(|l| !l.is_empty())
    }

    /// Every service with at least one usable instance, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .live
            .iter()
            .chain(&self.stale)
            .filter(|(_, l)| !l.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The protobuf service `service`'s instances serve, if they say.
    pub fn proto_service(&self, service: &str) -> Option<String> {
        self.instances(service)
            .iter()
            .map(|i| &i.proto_service)
            .find(|p| !p.is_empty())
            .cloned()
    }

    /// Every usable instance, as `Added` changes (the state a new watcher
    /// starts from).
    pub fn as_changes(&self) -> Vec<Change> {
        self.services()
            .iter()
            .flat_map(|s| self.instances(s).to_vec())
            .map(|instance| Change {
                kind: ChangeKind::Added,
                instance,
            })
            .collect()
    }
}

/// `host:port` of an instance, with brackets around an IPv6 host.
pub fn address(instance: &Instance) -> String {
    // Built by hand, not with `format!`: every call makes one per instance
    // of its service (about 2 900 instructions with `format!`, 700 so).
    let host = instance.host.as_str();
    let bracket = host.contains(':') && !host.starts_with('[');
    let mut port = itoa::Buffer::new();
    let port = port.format(instance.port);
    let mut out = String::with_capacity(host.len() + port.len() + 3);
    if bracket {
        out.push('[');
    }
    out.push_str(host);
    if bracket {
        out.push(']');
    }
    out.push(':');
    out.push_str(port);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let mut i = Instance {
            host: "10.0.0.1".into(),
            port: 80,
            ..Default::default()
        };
        assert_eq!(address(&i), "10.0.0.1:80");
        i.host = "::1".into();
        assert_eq!(address(&i), "[::1]:80");
        i.host = "[fe80::1]".into();
        i.port = 65535;
        assert_eq!(address(&i), "[fe80::1]:65535");
        i.host = "node-a.local".into();
        i.port = 0;
        assert_eq!(address(&i), "node-a.local:0");
    }
}
