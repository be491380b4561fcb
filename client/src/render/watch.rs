//! `watch`: one line per change to the registry.

use super::weight::weight_text;
use crate::directory::{Change, ChangeKind, address};

/// `+ calculator 10.0.0.1:5000 weight=5`, `~ ...` when updated, or
/// `- ... (lease expired)` with the cause when removed.
pub fn change_line(change: &Change) -> String {
    let i = &change.instance;
    match change.kind {
        ChangeKind::Added => format!("+ {} {} weight={}", i.service, address(i), weight_text(i)),
        ChangeKind::Updated => format!("~ {} {} weight={}", i.service, address(i), weight_text(i)),
        ChangeKind::Removed(cause) => format!("- {} {} ({cause})", i.service, address(i)),
    }
}

/// What `watch` says on stderr when the registry connection goes down or
/// comes back.
pub fn connection_line(connected: bool) -> &'static str {
    if connected {
        "! reconnected to the registry"
    } else {
        "! registry unreachable; retrying (keeping the last known state)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::RemovalCause;
    use registry_proto::registry::v1::{Instance, RemovalReason};

    #[test]
    fn one_line_per_change_with_the_cause_of_a_removal() {
        let instance = Instance {
            service: "calc".into(),
            host: "::1".into(),
            port: 5,
            weight: Some(2),
            ..Default::default()
        };
        let line = |kind| {
            change_line(&Change {
                kind,
                instance: instance.clone(),
            })
        };
        assert_eq!(line(ChangeKind::Added), "+ calc [::1]:5 weight=2");
        assert_eq!(line(ChangeKind::Updated), "~ calc [::1]:5 weight=2");
        let drained = Change {
            kind: ChangeKind::Updated,
            instance: Instance {
                weight: Some(0),
                ..instance.clone()
            },
        };
        assert_eq!(change_line(&drained), "~ calc [::1]:5 weight=0 (drained)");
        let expired = RemovalCause::Registry(RemovalReason::LeaseExpired);
        assert_eq!(
            line(ChangeKind::Removed(expired)),
            "- calc [::1]:5 (lease expired)"
        );
    }
}
