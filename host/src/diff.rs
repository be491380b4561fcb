//! What to do when the configuration changes: the difference between the
//! plugins in force and the plugins newly configured, as a list of actions.
//!
//! Pure: applying the actions is [`node`](crate::node)'s job. The order is
//! the order to apply them in: removals first (so a node never briefly
//! serves more than either configuration), then additions, then in-place
//! updates.

use std::collections::BTreeMap;

use crate::config::PluginConfig;

/// One step from the old configuration to the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The plugin is no longer configured: deregister it, then unmount it.
    Remove {
        /// Plugin name.
        name: String,
    },
    /// The plugin is newly configured: mount it, then register it.
    Add {
        /// Plugin name.
        name: String,
        /// Its settings.
        plugin: PluginConfig,
    },
    /// The plugin stays, with a different weight or metadata: update its
    /// registration in place (it keeps being served and listed).
    Update {
        /// Plugin name.
        name: String,
        /// Its new settings.
        plugin: PluginConfig,
    },
}

/// The actions that turn `old` into `new` (both: enabled plugins by name).
/// Plugins whose registration would not change produce no action. An
/// external plugin whose program changed (command, env, service, or
/// external/built-in itself) is removed and added again: its process
/// restarts.
pub fn diff(
    old: &BTreeMap<String, PluginConfig>,
    new: &BTreeMap<String, PluginConfig>,
) -> Vec<Action> {
    let restarted = |name: &String| {
        old.get(name)
            .zip(new.get(name))
            .is_some_and(|(before, after)| before.external != after.external)
    };
    let removed = old
        .keys()
        .filter(|name| !new.contains_key(*name) || restarted(name))
        .map(|name| Action::Remove { name: name.clone() });
    let added = new
        .iter()
        .filter(|(name, _)| !old.contains_key(*name) || restarted(name))
        .map(|(name, plugin)| Action::Add {
            name: name.clone(),
            plugin: plugin.clone(),
        });
    let updated = new
        .iter()
        .filter(|(name, plugin)| {
            !restarted(name)
                && old
                    .get(*name)
                    .is_some_and(|before| !before.same_registration(plugin))
        })
        .map(|(name, plugin)| Action::Update {
            name: name.clone(),
            plugin: plugin.clone(),
        });
    removed.chain(added).chain(updated).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WeightSource;

    fn plugin(weight: u32, meta: &[(&str, &str)]) -> PluginConfig {
        PluginConfig {
            weight,
            weight_source: WeightSource::Configured,
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            external: None,
        }
    }

    fn set(entries: &[(&str, PluginConfig)]) -> BTreeMap<String, PluginConfig> {
        entries
            .iter()
            .map(|(n, p)| (n.to_string(), p.clone()))
            .collect()
    }

    #[test]
    fn nothing_changed_means_nothing_to_do() {
        let a = set(&[
            ("calculator", plugin(3, &[("z", "1")])),
            ("echo", plugin(1, &[])),
        ]);
        assert_eq!(diff(&a, &a), vec![]);
        assert_eq!(diff(&BTreeMap::new(), &BTreeMap::new()), vec![]);
    }

    #[test]
    fn from_nothing_everything_is_added() {
        let new = set(&[("calculator", plugin(3, &[])), ("echo", plugin(1, &[]))]);
        assert_eq!(
            diff(&BTreeMap::new(), &new),
            vec![
                Action::Add {
                    name: "calculator".into(),
                    plugin: plugin(3, &[])
                },
                Action::Add {
                    name: "echo".into(),
                    plugin: plugin(1, &[])
                },
            ]
        );
    }

    #[test]
    fn removals_then_additions_then_updates() {
        let old = set(&[
            ("a", plugin(1, &[])),
            ("b", plugin(2, &[])),
            ("c", plugin(3, &[])),
        ]);
        let new = set(&[
            ("b", plugin(2, &[("k", "v")])),
            ("c", plugin(30, &[])),
            ("d", plugin(4, &[])),
        ]);
        assert_eq!(
            diff(&old, &new),
            vec![
                Action::Remove { name: "a".into() },
                Action::Add {
                    name: "d".into(),
                    plugin: plugin(4, &[])
                },
                Action::Update {
                    name: "b".into(),
                    plugin: plugin(2, &[("k", "v")])
                },
                Action::Update {
                    name: "c".into(),
                    plugin: plugin(30, &[])
                },
            ]
        );
    }

    #[test]
    fn weight_source_alone_is_no_change() {
        let old = set(&[("echo", plugin(5, &[]))]);
        let mut random = plugin(5, &[]);
        random.weight_source = WeightSource::Random;
        let new = set(&[("echo", random)]);
        assert_eq!(diff(&old, &new), vec![]);
    }

    #[test]
    fn a_changed_program_is_removed_then_added() {
        let external = |arg: &str| {
            let mut p = plugin(2, &[]);
            p.external = Some(crate::config::ExternalSpec {
                command: vec!["python3".into(), arg.into()],
                env: BTreeMap::new(),
                service: None,
                dir: ".".into(),
            });
            p
        };
        let old = set(&[("inv", external("a.py"))]);
        let mut reweighted = external("a.py");
        reweighted.weight = 9;
        assert_eq!(
            diff(&old, &set(&[("inv", reweighted.clone())])),
            vec![Action::Update {
                name: "inv".into(),
                plugin: reweighted
            }]
        );
        let new = set(&[("inv", external("b.py"))]);
        assert_eq!(
            diff(&old, &new),
            vec![
                Action::Remove { name: "inv".into() },
                Action::Add {
                    name: "inv".into(),
                    plugin: external("b.py")
                },
            ]
        );
    }

    #[test]
    fn everything_removed() {
        let old = set(&[("calculator", plugin(3, &[])), ("echo", plugin(1, &[]))]);
        assert_eq!(
            diff(&old, &BTreeMap::new()),
            vec![
                Action::Remove {
                    name: "calculator".into()
                },
                Action::Remove {
                    name: "echo".into()
                },
            ]
        );
    }
}
