//! Pure: a snapshot sent in parts joined into one message, and one watch
//! message applied to a [`Snapshot`], with the changes it made.

use super::snapshot::{ByService, Change, ChangeKind, RemovalCause, Snapshot};
use prost::Message as _;
use registry_proto::registry::v1::event::Kind as EventKindPb;
use registry_proto::registry::v1::{Instance, WatchResponse};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The most a snapshot sent in parts may hold before the client gives up on
/// it. A registry that never ends one (`more` set forever) would otherwise
/// make the client hold every part it sends. Generous: the count is the
/// registry's own cap on instances (`MAX_INSTANCES`), and a million
/// instances of 500 bytes each is under the byte cap, so only a registry
/// that misbehaves meets these.
pub(super) const SNAPSHOT_LIMITS: SnapshotLimits = SnapshotLimits {
    instances: 1_000_000,
    bytes: 512 * 1024 * 1024,
};

/// Caps on a snapshot being joined from its parts.
#[derive(Debug, Clone, Copy)]
pub(super) struct SnapshotLimits {
    /// Instances, over all parts.
    instances: usize,
    /// Encoded (wire) size, over all parts.
    bytes: usize,
}

/// A snapshot being joined from its parts.
#[derive(Debug, Default)]
pub(super) struct Partial {
    /// The parts so far, joined: the first part with the events of the others.
    head: Option<WatchResponse>,
    /// Their encoded size.
    bytes: usize,
    /// How many parts.
    parts: usize,
}

/// Joins the parts of a snapshot the registry sent in several messages
/// (`more` on all but the last; the first has `reset`, the others carry only
/// further instances): returns a message once it is complete, `None` while
/// parts are missing. Applied part by part, the first part would replace the
/// whole copy and the others be dropped as events of a revision already seen.
///
/// Fails, dropping what was joined, when the parts so far hold more than
/// `limits` allow: the watch then ends with that error and is reconnected.
pub(super) fn join_parts(
    partial: &mut Partial,
    msg: WatchResponse,
    limits: SnapshotLimits,
) -> Result<Option<WatchResponse>, String> {
    let msg = match partial.head.take() {
        Some(mut head) if !msg.reset => {
            partial.bytes = partial.bytes.saturating_add(msg.encoded_len());
            partial.parts += 1;
            head.events.extend(msg.events);
            head.more = msg.more;
            head
        }
        // No snapshot under way, or a new one starts (the unfinished one
        // is dropped). Sized only when it is the first of several parts:
        // an ordinary event message is not measured.
        _ => {
            partial.bytes = if msg.reset && msg.more {
                msg.encoded_len()
            } else {
                0
            };
            partial.parts = 1;
            msg
        }
    };
    if !(msg.reset && msg.more) {
        return Ok(Some(msg));
    }
    let over = if msg.events.len() > limits.instances {
        Some(format!("{} instances", limits.instances))
    } else if partial.bytes > limits.bytes {
        Some(format!("{} bytes", limits.bytes))
    } else {
        None
    };
    if let Some(limit) = over {
        let (instances, bytes, parts) = (msg.events.len(), partial.bytes, partial.parts);
        *partial = Partial::default();
        return Err(format!(
            "the registry's snapshot is still unfinished after {parts} parts ({instances} instances, {bytes} bytes), over the client's limit of {limit}"
        ));
    }
    partial.head = Some(msg);
    Ok(None)
}

/// What applying one watch message did.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// The real changes, in order.
    pub(super) changes: Vec<Change>,
    /// Whether instances were set aside as stale (start the grace timer).
    pub(super) stale_set_aside: bool,
}

/// Whether two records describe the same thing for a caller (lease and
/// revision are bookkeeping).
fn same(a: &Instance, b: &Instance) -> bool {
    a.host == b.host
        && a.port == b.port
        && a.weight == b.weight
        && a.metadata == b.metadata
        && a.proto_service == b.proto_service
}

/// Applies one watch message to a snapshot. Pure, for testing.
pub(super) fn apply(snap: &mut Snapshot, msg: WatchResponse) -> Outcome {
    let mut out = Outcome::default();
    if msg.reset {
        let restarted = !snap.registry_id.is_empty() && snap.registry_id != msg.registry_id;
        let mut fresh: BTreeMap<String, BTreeMap<String, Instance>> = BTreeMap::new();
        for ev in msg.events {
            if let Some(i) = ev.instance {
                fresh
                    .entry(i.service.clone())
                    .or_default()
                    .insert(i.instance_id.clone(), i);
            }
        }
        let old = std::mem::take(&mut snap.live);
        // Edited as maps and rebuilt once: a reset can touch every instance.
        let mut stale: BTreeMap<String, BTreeMap<String, Instance>> =
            std::mem::take(&mut snap.stale)
                .into_iter()
                .map(|(service, list)| {
                    let m = list
                        .iter()
                        .map(|i| (i.instance_id.clone(), i.clone()))
                        .collect();
                    (service, m)
                })
                .collect();
        // Gone: stale after a restart (maybe not re-registered yet), else removed.
        for (service, instances) in &old {
            for inst in instances.iter() {
                let id = &inst.instance_id;
                if fresh.get(service).is_some_and(|m| m.contains_key(id)) {
                    continue;
                }
                if restarted {
                    stale
                        .entry(service.clone())
                        .or_default()
                        .insert(id.clone(), inst.clone());
                    out.stale_set_aside = true;
                } else {
                    out.changes.push(Change {
                        kind: ChangeKind::Removed(RemovalCause::Resync),
                        instance: inst.clone(),
                    });
                }
            }
        }
        // New or changed.
        for (service, instances) in &fresh {
            let mut stale_here = stale.get_mut(service);
            for (id, inst) in instances {
                let was_stale = stale_here.as_mut().and_then(|m| m.remove(id));
                let changed = match find(&old, service, id).or(was_stale.as_ref()) {
                    None => Some(ChangeKind::Added),
                    Some(b) if same(b, inst) => None,
                    Some(_) => Some(ChangeKind::Updated),
                };
                if let Some(kind) = changed {
                    out.changes.push(Change {
                        kind,
                        instance: inst.clone(),
                    });
                }
            }
        }
        snap.stale = stale
            .into_iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(service, m)| (service, m.into_values().collect()))
            .collect();
        snap.live = fresh
            .into_iter()
            .map(|(service, m)| (service, m.into_values().collect()))
            .collect();
        snap.registry_id = msg.registry_id;
        snap.revision = msg.revision;
        snap.synced = true;
        return out;
    }
    if msg.registry_id != snap.registry_id && !msg.registry_id.is_empty() {
        // Events from another registry without a reset: cannot be applied to
        // this copy. The registry always resets first, so this is defensive.
        tracing::warn!("watch events from an unexpected registry; ignoring");
        return out;
    }
    for ev in msg.events {
        if ev.revision <= snap.revision {
            continue; // a duplicate, or older than our copy
        }
        snap.revision = ev.revision;
        let (kind, reason) = (ev.kind(), ev.reason());
        let Some(inst) = ev.instance else { continue };
        let service = inst.service.clone();
        let id = inst.instance_id.clone();
        match kind {
            EventKindPb::Added | EventKindPb::Updated => {
                let before = find(&snap.live, &service, &id)
                    .or_else(|| find(&snap.stale, &service, &id))
                    .cloned();
                unstale(snap, &service, &id);
                upsert(&mut snap.live, inst.clone());
                match before {
                    Some(b) if same(&b, &inst) => {}
                    Some(_) => out.changes.push(Change {
                        kind: ChangeKind::Updated,
                        instance: inst,
                    }),
                    None => out.changes.push(Change {
                        kind: ChangeKind::Added,
                        instance: inst,
                    }),
                }
            }
            EventKindPb::Removed => {
                if let Some(before) = remove(&mut snap.live, &service, &id) {
                    out.changes.push(Change {
                        kind: ChangeKind::Removed(RemovalCause::Registry(reason)),
                        instance: before,
                    });
                }
            }
            EventKindPb::Unspecified => {}
        }
    }
    snap.revision = snap.revision.max(msg.revision);
    out
}

fn unstale(snap: &mut Snapshot, service: &str, id: &str) {
    remove(&mut snap.stale, service, id);
}

/// Where `id` is (`Ok`) or would go (`Err`) in a list sorted by instance id.
fn position(list: &[Instance], id: &str) -> Result<usize, usize> {
    list.binary_search_by(|i| i.instance_id.as_str().cmp(id))
}

/// The instance `id` of `service`, if present.
fn find<'a>(map: &'a ByService, service: &str, id: &str) -> Option<&'a Instance> {
    let list = map.get(service)?;
    position(list, id).ok().map(|at| &list[at])
}

/// Adds or replaces `inst` in its service's list. The list is rebuilt (the
/// old one may be shared with published snapshots): O(instances of the
/// service) per change, which keeps lookups, far more frequent, free.
fn upsert(map: &mut ByService, inst: Instance) {
    let list = map
        .entry(inst.service.clone())
        .or_insert_with(|| Arc::from([]));
    let mut items = list.to_vec();
    match position(&items, &inst.instance_id) {
        Ok(at) => items[at] = inst,
        Err(at) => items.insert(at, inst),
    }
    *list = items.into();
}

/// Removes instance `id` of `service`, dropping the service when it was the
/// last; returns it.
fn remove(map: &mut ByService, service: &str, id: &str) -> Option<Instance> {
    let list = map.get_mut(service)?;
    let at = position(list, id).ok()?;
    let mut items = list.to_vec();
    let gone = items.remove(at);
    if items.is_empty() {
        map.remove(service);
    } else {
        *list = items.into();
    }
    Some(gone)
}

#[cfg(test)]
pub(super) mod fixtures {
    //! Watch messages for the tests of this module and of `watch`.

    use registry_proto::registry::v1::event::Kind as EventKindPb;
    use registry_proto::registry::v1::{Event, Instance, WatchResponse};

    pub(in crate::directory) fn inst(service: &str, port: u32, weight: u32) -> Instance {
        Instance {
            service: service.into(),
            instance_id: format!("127.0.0.1:{port}"),
            host: "127.0.0.1".into(),
            port,
            weight: Some(weight),
            ..Default::default()
        }
    }

    pub(in crate::directory) fn event(kind: EventKindPb, revision: u64, i: Instance) -> Event {
        Event {
            kind: kind as i32,
            revision,
            instance: Some(i),
            reason: 0,
        }
    }

    pub(in crate::directory) fn reset(
        id: &str,
        revision: u64,
        instances: Vec<Instance>,
    ) -> WatchResponse {
        let added = instances
            .into_iter()
            .map(|i| event(EventKindPb::Added, revision, i))
            .collect();
        WatchResponse {
            reset: true,
            revision,
            ..events(id, added)
        }
    }

    /// Fields not named here keep their defaults, so a field added to the
    /// message does not break these helpers.
    pub(in crate::directory) fn events(id: &str, events: Vec<Event>) -> WatchResponse {
        let revision = events.iter().map(|e| e.revision).max().unwrap_or(0);
        WatchResponse {
            revision,
            registry_id: id.into(),
            events,
            ..WatchResponse::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{event, events, inst, reset};

    /// A snapshot after registry `r1`'s reset at revision 5 with `instances`.
    fn synced(instances: Vec<Instance>) -> Snapshot {
        let mut s = Snapshot::default();
        apply(&mut s, reset("r1", 5, instances));
        s
    }

    /// One event from registry `r1`.
    fn one(kind: EventKindPb, revision: u64, instance: Instance) -> WatchResponse {
        events("r1", vec![event(kind, revision, instance)])
    }
    use super::*;
    use registry_proto::registry::v1::RemovalReason;

    fn kinds(out: &Outcome) -> Vec<(ChangeKind, u32)> {
        out.changes
            .iter()
            .map(|c| (c.kind, c.instance.port))
            .collect()
    }

    fn ports(snap: &Snapshot, service: &str) -> Vec<u32> {
        snap.instances(service).iter().map(|i| i.port).collect()
    }

    #[test]
    fn reset_then_events_keep_an_exact_copy() {
        let mut s = Snapshot::default();
        let out = apply(
            &mut s,
            reset("r1", 5, vec![inst("calc", 1, 1), inst("echo", 2, 1)]),
        );
        assert_eq!(
            kinds(&out),
            vec![(ChangeKind::Added, 1), (ChangeKind::Added, 2)]
        );
        assert_eq!(s.services(), vec!["calc", "echo"]);
        let out = apply(
            &mut s,
            events(
                "r1",
                vec![
                    event(EventKindPb::Added, 6, inst("calc", 3, 2)),
                    event(EventKindPb::Updated, 7, inst("calc", 1, 9)),
                ],
            ),
        );
        assert_eq!(
            kinds(&out),
            vec![(ChangeKind::Added, 3), (ChangeKind::Updated, 1)]
        );
        assert_eq!(ports(&s, "calc"), vec![1, 3]);
        assert_eq!(s.instances("calc")[0].weight, Some(9));
        let mut removal = event(EventKindPb::Removed, 8, inst("echo", 2, 1));
        removal.reason = RemovalReason::LeaseExpired as i32;
        let out = apply(&mut s, events("r1", vec![removal]));
        assert_eq!(
            kinds(&out),
            vec![(
                ChangeKind::Removed(RemovalCause::Registry(RemovalReason::LeaseExpired)),
                2
            )]
        );
        assert_eq!(s.services(), vec!["calc"]);
        assert_eq!(s.revision, 8);
    }

    #[test]
    fn lookups_share_one_list_until_the_service_changes() {
        let mut s = synced(vec![inst("calc", 2, 1), inst("calc", 1, 1)]);
        let first = s.instances("calc");
        assert!(Arc::ptr_eq(&first, &s.instances("calc")));
        assert_eq!(ports(&s, "calc"), vec![1, 2], "sorted by instance id");
        // Another service changing leaves this list alone...
        apply(&mut s, one(EventKindPb::Added, 6, inst("echo", 3, 1)));
        assert!(Arc::ptr_eq(&first, &s.instances("calc")));
        // ...its own change makes a new one, and the old one is unchanged.
        apply(&mut s, one(EventKindPb::Added, 7, inst("calc", 0, 1)));
        assert_eq!(ports(&s, "calc"), vec![0, 1, 2]);
        assert_eq!(first.len(), 2);
        assert!(s.instances("nothing").is_empty());
    }

    #[test]
    fn duplicates_and_no_op_updates_are_dropped() {
        let mut s = synced(vec![inst("calc", 1, 1)]);
        // Same revision again, and an older one: ignored.
        let out = apply(&mut s, one(EventKindPb::Updated, 5, inst("calc", 1, 7)));
        assert!(out.changes.is_empty());
        assert_eq!(s.instances("calc")[0].weight, Some(1));
        // A newer update that changes nothing a caller sees.
        let mut relabelled = inst("calc", 1, 1);
        relabelled.lease_id = 99;
        let out = apply(&mut s, one(EventKindPb::Updated, 6, relabelled));
        assert!(out.changes.is_empty());
        // Removing what is not there.
        let out = apply(&mut s, one(EventKindPb::Removed, 7, inst("calc", 5, 1)));
        assert!(out.changes.is_empty());
        assert_eq!(s.revision, 7);
    }

    #[test]
    fn reconnect_to_the_same_registry_diffs_the_snapshot() {
        let mut s = synced(vec![inst("calc", 1, 1), inst("calc", 2, 1)]);
        let out = apply(
            &mut s,
            reset("r1", 9, vec![inst("calc", 2, 4), inst("calc", 3, 1)]),
        );
        assert_eq!(
            kinds(&out),
            vec![
                (ChangeKind::Removed(RemovalCause::Resync), 1),
                (ChangeKind::Updated, 2),
                (ChangeKind::Added, 3)
            ]
        );
        assert!(!out.stale_set_aside);
    }

    #[test]
    fn restarted_registry_keeps_stale_fallbacks_until_reregistered() {
        let mut s = synced(vec![inst("calc", 1, 1), inst("echo", 2, 1)]);
        // The new registry knows nothing yet.
        let out = apply(&mut s, reset("r2", 0, vec![]));
        assert!(out.changes.is_empty());
        assert!(out.stale_set_aside);
        assert_eq!(ports(&s, "calc"), vec![1]);
        assert!(s.is_stale("calc"));
        assert_eq!(s.services(), vec!["calc", "echo"]);
        // calc registers again on the new registry (revision restarts at 1).
        let out = apply(
            &mut s,
            events("r2", vec![event(EventKindPb::Added, 1, inst("calc", 1, 1))]),
        );
        assert!(out.changes.is_empty(), "same instance: no change");
        assert!(!s.is_stale("calc"));
        assert_eq!(ports(&s, "calc"), vec![1]);
        // echo is still a stale fallback.
        assert!(s.is_stale("echo"));
        assert_eq!(ports(&s, "echo"), vec![2]);
    }

    #[test]
    fn a_snapshot_in_several_messages_is_applied_whole() {
        let mut s = synced(vec![inst("calc", 1, 1)]);
        let mut first = reset("r1", 9, vec![inst("calc", 1, 1), inst("calc", 2, 1)]);
        first.more = true;
        let mut middle = one(EventKindPb::Added, 9, inst("calc", 3, 1));
        middle.more = true;
        let last = one(EventKindPb::Added, 9, inst("echo", 4, 1));
        let mut partial = Partial::default();
        let mut join = |msg| join_parts(&mut partial, msg, SNAPSHOT_LIMITS).expect("within limits");
        assert!(join(first).is_none());
        assert!(join(middle).is_none());
        let whole = join(last).expect("complete");
        let out = apply(&mut s, whole);
        // Nothing removed, the instances of every part added.
        assert_eq!(
            kinds(&out),
            vec![
                (ChangeKind::Added, 2),
                (ChangeKind::Added, 3),
                (ChangeKind::Added, 4)
            ]
        );
        assert_eq!(ports(&s, "calc"), vec![1, 2, 3]);
        assert_eq!(ports(&s, "echo"), vec![4]);
        assert_eq!(s.revision, 9);

        // A new snapshot replaces an unfinished one; plain events pass.
        let mut unfinished = reset("r1", 10, vec![inst("calc", 7, 1)]);
        unfinished.more = true;
        assert!(join(unfinished).is_none());
        let fresh = join(reset("r1", 11, vec![inst("calc", 8, 1)])).expect("complete");
        assert_eq!(fresh.events.len(), 1);
        let plain = one(EventKindPb::Added, 12, inst("calc", 9, 1));
        assert!(join(plain).is_some());
        assert!(partial.head.is_none());
    }

    #[test]
    fn a_snapshot_that_never_ends_fails_at_the_limit() {
        let limits = SnapshotLimits {
            instances: 10,
            bytes: 100_000,
        };
        let part = |n: u32| {
            let mut msg = one(EventKindPb::Added, 9, inst("calc", n, 1));
            msg.more = true;
            msg
        };
        let mut partial = Partial::default();
        let mut first = reset("r1", 9, vec![inst("calc", 0, 1)]);
        first.more = true;
        assert_eq!(join_parts(&mut partial, first, limits), Ok(None));
        // `more` forever: held up to the limit, then an error naming it.
        for n in 1..10 {
            assert_eq!(
                join_parts(&mut partial, part(n), limits),
                Ok(None),
                "part {n}"
            );
        }
        let err = join_parts(&mut partial, part(10), limits).expect_err("over the count");
        assert!(
            err.starts_with(
                "the registry's snapshot is still unfinished after 11 parts (11 instances, "
            ),
            "{err}"
        );
        assert!(
            err.ends_with("over the client's limit of 10 instances"),
            "{err}"
        );
        // What was held is dropped.
        assert!(partial.head.is_none());

        // The same by size: parts of a little over 1000 bytes against a
        // limit of 5000, which the fifth part crosses.
        let limits = SnapshotLimits {
            instances: 1_000_000,
            bytes: 5000,
        };
        let big = |n: u32| {
            let mut i = inst("calc", n, 1);
            i.metadata.insert("k".into(), "x".repeat(1000));
            i
        };
        let mut first = reset("r1", 9, vec![big(0)]);
        first.more = true;
        let mut partial = Partial::default();
        let mut outcomes = Vec::new();
        outcomes.push(join_parts(&mut partial, first, limits));
        for n in 1..5 {
            let mut msg = one(EventKindPb::Added, 9, big(n));
            msg.more = true;
            outcomes.push(join_parts(&mut partial, msg, limits));
        }
        assert_eq!(outcomes[..4], [Ok(None), Ok(None), Ok(None), Ok(None)]);
        let err = outcomes[4].clone().expect_err("over the size");
        assert!(
            err.ends_with("over the client's limit of 5000 bytes"),
            "{err}"
        );
    }

    #[test]
    fn live_instances_shadow_stale_ones() {
        let mut s = synced(vec![inst("calc", 1, 1)]);
        apply(&mut s, reset("r2", 1, vec![inst("calc", 7, 1)]));
        assert_eq!(ports(&s, "calc"), vec![7]);
    }
}
