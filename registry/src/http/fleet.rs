//! The fleet as the dashboard shows it, kept up to date from the registry's
//! own watch (the same stream a `Watch` call gets): every instance with the
//! time its lease was first seen and the time it last changed, and a feed
//! of the latest changes with their reasons. Each change is turned into
//! JSON once and fanned out to every open dashboard.
//!
//! It also counts removals by reason for `/metrics`, since the watch is
//! where every removal shows with its reason.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use registry_proto::registry::v1 as pb;
use registry_proto::registry::v1::RemovalReason;
use registry_proto::registry::v1::event::Kind;
use serde_json::{Value, json};
use support::CancellationToken;
use tokio::sync::broadcast;
use tokio_stream::StreamExt;

use crate::metrics;
use crate::watch::Watchers;

/// How long the view waits before opening its watch again.
pub const REOPEN_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// How many changes the feed keeps (the newest).
pub const FEED_LEN: usize = 200;

/// How many change messages a dashboard may fall behind before it is sent
/// a fresh snapshot instead.
pub const FANOUT_CAPACITY: usize = 1024;

/// What a dashboard is sent after its snapshot.
#[derive(Debug, Clone)]
pub enum Update {
    /// The changes of one watch message, as a JSON array.
    Changes(Arc<str>),
    /// The view was rebuilt from a fresh snapshot: send a new snapshot.
    Reset,
}

/// The shared view. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fleet {
    view: Arc<Mutex<View>>,
    updates: broadcast::Sender<Update>,
}

#[derive(Debug, Default)]
struct View {
    /// Instances by (service, instance id).
    instances: HashMap<(String, String), Entry>,
    /// When each live lease was first seen (ms since the epoch), and how
    /// many instances it holds in this view.
    leases: HashMap<u64, (u64, usize)>,
    /// The newest changes, oldest first, as JSON.
    feed: VecDeque<Value>,
    /// Revision of the last message applied.
    revision: u64,
    /// Snapshot parts received so far (`more` set on all but the last).
    pending: Vec<pb::Event>,
}

#[derive(Debug)]
struct Entry {
    instance: pb::Instance,
    /// When it last changed (ms since the epoch).
    changed: u64,
}

/// Now, in ms since the epoch (what the browser's `Date.now()` counts).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Fleet {
    /// Starts following the registry's watch until `shutdown` is cancelled
    /// (the stream itself ends at [`Watchers::close`], which `serve` calls
    /// on the same shutdown).
    pub fn spawn(watchers: Watchers, shutdown: CancellationToken) -> Fleet {
        let fleet = Fleet {
            view: Arc::default(),
            updates: broadcast::channel(FANOUT_CAPACITY).0,
        };
        let follower = fleet.clone();
        tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                // A stream that ends (it could not keep up) or cannot open
                // (the watch memory budget is spent) is opened again: its
                // first message is a fresh snapshot.
                match watchers.open(BTreeSet::new()) {
                    Ok(stream) => {
                        let mut stream = std::pin::pin!(stream);
                        while let Some(Ok(message)) = stream.next().await {
                            match message.decode() {
                                Ok(message) => follower.apply(message),
                                Err(e) => tracing::error!("dashboard watch: {e}"),
                            }
                        }
                    }
                    Err(status) => tracing::warn!("dashboard watch: {}", status.message()),
                }
                tokio::time::sleep(REOPEN_DELAY).await;
            }
        });
        fleet
    }

    fn lock(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The whole view as JSON, and a receiver of every update after it.
    pub fn subscribe(&self) -> (String, broadcast::Receiver<Update>) {
        let view = self.lock();
        let receiver = self.updates.subscribe();
        let instances: Vec<Value> = view
            .instances
            .values()
            .map(|e| instance_json(&e.instance, &view.leases, e.changed))
            .collect();
        let snapshot = json!({
            "now": now_ms(),
            "revision": view.revision,
            "instances": instances,
            "feed": view.feed,
        });
        (snapshot.to_string(), receiver)
    }

    fn apply(&self, message: pb::WatchResponse) {
        let now = now_ms();
        let mut view = self.lock();
        if message.reset || !view.pending.is_empty() {
            view.pending.extend(message.events);
            if message.more {
                return;
            }
            let events = std::mem::take(&mut view.pending);
            view.rebuild(events, now);
            view.revision = message.revision;
            let _ = self.updates.send(Update::Reset);
            return;
        }
        let mut changes = Vec::with_capacity(message.events.len());
        let mut leases_removed: BTreeSet<(u64, &'static str)> = BTreeSet::new();
        for event in message.events {
            let removal = (event.kind() == Kind::Removed).then(|| event.reason());
            if let Some(reason) = removal {
                let label = metrics::reason_label(reason);
                metrics::get()
                    .instance_removals
                    .with_label_values(&[label])
                    .inc();
                if reason != RemovalReason::Deregistered
                    && let Some(i) = &event.instance
                {
                    leases_removed.insert((i.lease_id, label));
                }
            }
            if let Some(change) = view.change(event, now) {
                changes.push(change);
            }
        }
        for (_, label) in leases_removed {
            metrics::get()
                .lease_removals
                .with_label_values(&[label])
                .inc();
        }
        view.revision = message.revision;
        if changes.is_empty() {
            return;
        }
        for change in &changes {
            if view.feed.len() == FEED_LEN {
                view.feed.pop_front();
            }
            view.feed.push_back(change.clone());
        }
        let json: Arc<str> = Value::Array(changes).to_string().into();
        // An error only means no dashboard is open.
        let _ = self.updates.send(Update::Changes(json));
    }
}

impl View {
    /// Replaces the view with a snapshot; lease times of leases still
    /// there are kept.
    fn rebuild(&mut self, events: Vec<pb::Event>, now: u64) {
        let old_leases = std::mem::take(&mut self.leases);
        let old = std::mem::take(&mut self.instances);
        for event in events {
            let Some(instance) = event.instance else {
                continue;
            };
            let key = (instance.service.clone(), instance.instance_id.clone());
            let changed = old
                .get(&key)
                .filter(|e| e.instance == instance)
                .map_or(now, |e| e.changed);
            let since = old_leases.get(&instance.lease_id).map_or(now, |l| l.0);
            self.leases.entry(instance.lease_id).or_insert((since, 0)).1 += 1;
            self.instances.insert(key, Entry { instance, changed });
        }
    }

    /// Applies one event; returns it as a feed entry.
    fn change(&mut self, event: pb::Event, now: u64) -> Option<Value> {
        let kind = event.kind();
        let reason = event.reason();
        let instance = event.instance?;
        let key = (instance.service.clone(), instance.instance_id.clone());
        let (kind_name, why) = match kind {
            Kind::Added => {
                self.leases.entry(instance.lease_id).or_insert((now, 0)).1 += 1;
                ("added", "registered".to_string())
            }
            Kind::Updated => {
                let why = match self.instances.get(&key) {
                    Some(old) => describe_update(&old.instance, &instance),
                    None => "updated".to_string(),
                };
                ("updated", why)
            }
            Kind::Removed => {
                if let Some(lease) = self.leases.get_mut(&instance.lease_id) {
                    lease.1 = lease.1.saturating_sub(1);
                }
                (
                    "removed",
                    match reason {
                        RemovalReason::KeepaliveClosed => "crash: keepalive closed",
                        RemovalReason::LeaseExpired => "lease expired",
                        RemovalReason::LeaseRevoked => "lease revoked",
                        RemovalReason::Deregistered => "deregistered",
                        RemovalReason::Unspecified => "removed",
                    }
                    .to_string(),
                )
            }
            Kind::Unspecified => return None,
        };
        let json = json!({
            "kind": kind_name,
            "reason": why,
            "at": now,
            "revision": event.revision,
            "instance": instance_json(&instance, &self.leases, now),
        });
        if kind == Kind::Removed {
            self.instances.remove(&key);
            if self
                .leases
                .get(&instance.lease_id)
                .is_some_and(|l| l.1 == 0)
            {
                self.leases.remove(&instance.lease_id);
            }
        } else {
            self.instances.insert(
                key,
                Entry {
                    instance,
                    changed: now,
                },
            );
        }
        Some(json)
    }
}

/// What an update changed, in words: `weight 3 → 7`, `metadata`, ...
fn describe_update(old: &pb::Instance, new: &pb::Instance) -> String {
    let mut what = Vec::new();
    if old.effective_weight() != new.effective_weight() {
        what.push(format!(
            "weight {} → {}{}",
            old.effective_weight(),
            new.effective_weight(),
            if new.effective_weight() == 0 {
                " (drained)"
            } else {
                ""
            }
        ));
    }
    if old.metadata != new.metadata {
        what.push("metadata changed".to_string());
    }
    if old.host != new.host || old.port != new.port {
        what.push(format!(
            "address {}:{} → {}:{}",
            old.host, old.port, new.host, new.port
        ));
    }
    if old.lease_id != new.lease_id {
        what.push("new lease".to_string());
    }
    if what.is_empty() {
        "updated".to_string()
    } else {
        what.join(", ")
    }
}

fn instance_json(i: &pb::Instance, leases: &HashMap<u64, (u64, usize)>, changed: u64) -> Value {
    json!({
        "service": i.service,
        "id": i.instance_id,
        "host": i.host,
        "port": i.port,
        "weight": i.effective_weight(),
        "drained": i.effective_weight() == 0,
        "metadata": i.metadata,
        "proto": i.proto_service,
        "lease": i.lease_id.to_string(),
        "leaseSince": leases.get(&i.lease_id).map(|l| l.0),
        "changed": changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(weight: u32) -> pb::Instance {
        pb::Instance {
            service: "calc".into(),
            instance_id: "a".into(),
            host: "10.0.0.1".into(),
            port: 7,
            weight: Some(weight),
            lease_id: 9,
            ..Default::default()
        }
    }

    fn event(kind: Kind, weight: u32, reason: RemovalReason) -> pb::Event {
        pb::Event {
            kind: kind.into(),
            revision: 1,
            instance: Some(instance(weight)),
            reason: reason as i32,
        }
    }

    #[test]
    fn changes_carry_their_reasons_and_the_lease_time_is_kept() {
        let mut view = View::default();
        let added = view
            .change(event(Kind::Added, 3, RemovalReason::Unspecified), 1000)
            .unwrap();
        assert_eq!(added["reason"], "registered");
        assert_eq!(added["instance"]["leaseSince"], 1000);
        let updated = view
            .change(event(Kind::Updated, 7, RemovalReason::Unspecified), 2000)
            .unwrap();
        assert_eq!(updated["reason"], "weight 3 → 7");
        assert_eq!(updated["instance"]["leaseSince"], 1000);
        assert_eq!(updated["instance"]["changed"], 2000);
        let removed = view
            .change(
                event(Kind::Removed, 7, RemovalReason::KeepaliveClosed),
                3000,
            )
            .unwrap();
        assert_eq!(removed["reason"], "crash: keepalive closed");
        assert!(view.instances.is_empty() && view.leases.is_empty());
    }

    #[test]
    fn a_snapshot_in_parts_is_applied_whole_then_changes_are_fanned_out() {
        let fleet = Fleet {
            view: Arc::default(),
            updates: broadcast::channel(4).0,
        };
        let mut updates = fleet.updates.subscribe();
        let part = |id: &str, more: bool, reset: bool| {
            let mut e = event(Kind::Added, 1, RemovalReason::Unspecified);
            if let Some(i) = e.instance.as_mut() {
                i.instance_id = id.into();
            }
            pb::WatchResponse {
                reset,
                revision: 5,
                events: vec![e],
                more,
                ..Default::default()
            }
        };
        fleet.apply(part("a", true, true));
        assert!(
            fleet.lock().instances.is_empty(),
            "half a snapshot is not applied"
        );
        fleet.apply(part("b", false, false));
        assert_eq!(fleet.lock().instances.len(), 2);
        assert!(matches!(updates.try_recv(), Ok(Update::Reset)));

        let mut removed = event(Kind::Removed, 1, RemovalReason::LeaseRevoked);
        removed.revision = 6;
        if let Some(i) = removed.instance.as_mut() {
            i.instance_id = "a".into();
        }
        fleet.apply(pb::WatchResponse {
            revision: 6,
            events: vec![removed],
            ..Default::default()
        });
        match updates.try_recv() {
            Ok(Update::Changes(json)) => assert!(json.contains("lease revoked"), "{json}"),
            other => panic!("{other:?}"),
        }
        let (snapshot, _) = fleet.subscribe();
        let snapshot: Value = serde_json::from_str(&snapshot).unwrap();
        assert_eq!(snapshot["revision"], 6);
        assert_eq!(snapshot["instances"].as_array().unwrap().len(), 1);
        assert_eq!(snapshot["feed"][0]["reason"], "lease revoked");
        // Lease ids are strings: JavaScript numbers lose u64 precision.
        assert_eq!(snapshot["instances"][0]["lease"], "9");
    }

    #[test]
    fn a_rebuild_keeps_what_did_not_change() {
        let mut view = View::default();
        view.change(event(Kind::Added, 3, RemovalReason::Unspecified), 1000);
        view.rebuild(
            vec![event(Kind::Added, 3, RemovalReason::Unspecified)],
            5000,
        );
        let entry = view.instances.values().next().unwrap();
        assert_eq!(entry.changed, 1000);
        assert_eq!(view.leases[&9], (1000, 1));
        view.rebuild(
            vec![event(Kind::Added, 4, RemovalReason::Unspecified)],
            6000,
        );
        assert_eq!(view.instances.values().next().unwrap().changed, 6000);
    }
}
