//! Fuzzing entry point for `services.toml` parsing and the reload diff. The
//! `services_toml` cargo-fuzz target calls [`services_toml`], and
//! `tests/fuzz_corpus.rs` replays the committed corpus through it, so both
//! run the same code.

use std::collections::BTreeMap;

use crate::config::{Config, ConfigError, PluginConfig, RANDOM_WEIGHT_RANGE, WEIGHT_RANGE};
use crate::diff::{Action, diff};

/// The plugin names the fuzzed files may mount (those of this build).
const KNOWN: &[&str] = &["calculator", "echo"];

/// Separates the old file from the new one in a fuzz input.
const SEPARATOR: u8 = 0;

/// Splits `data` at the first NUL into an old and a new `services.toml`
/// (lossy UTF-8), parses both, and, when both parse, checks that the diff's
/// actions turn the old plugins into the new ones. Panics on a broken
/// invariant.
pub fn services_toml(data: &[u8]) {
    let (old, new) = match data.iter().position(|&b| b == SEPARATOR) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let old_text = String::from_utf8_lossy(old);
    let new_text = String::from_utf8_lossy(new);
    let old = parse(&old_text, None);
    // The new file is parsed as a reload: against the old configuration.
    let new = parse(&new_text, old.as_ref());
    if let (Some(old), Some(new)) = (old, new) {
        check_reload(&old, &new);
    }
}

/// Parses `text`, checking the result or the error; `None` on error.
fn parse(text: &str, previous: Option<&Config>) -> Option<Config> {
    match Config::parse(text, "services.toml", KNOWN, previous) {
        Ok(config) => {
            check_config(&config, previous);
            // Parsing is deterministic once random weights are kept.
            let again = Config::parse(text, "services.toml", KNOWN, Some(&config));
            assert_eq!(again.as_ref(), Ok(&config), "reparse differs");
            Some(config)
        }
        Err(e) => {
            check_error(text, &e);
            None
        }
    }
}

fn check_config(config: &Config, previous: Option<&Config>) {
    for (name, plugin) in &config.plugins {
        assert!(
            KNOWN.contains(&name.as_str()),
            "unknown plugin {name} accepted"
        );
        assert!(
            WEIGHT_RANGE.contains(&plugin.weight),
            "weight {}",
            plugin.weight
        );
        if plugin.weight_source == crate::config::WeightSource::Random {
            let kept = previous
                .and_then(|p| p.plugins.get(name))
                .filter(|p| p.weight_source == crate::config::WeightSource::Random);
            match kept {
                Some(p) => assert_eq!(p.weight, plugin.weight, "random weight not kept"),
                None => assert!(RANDOM_WEIGHT_RANGE.contains(&plugin.weight)),
            }
        }
        assert!(
            plugin.metadata.keys().all(|k| !k.is_empty()),
            "empty metadata key"
        );
    }
    if let Some(ttl) = config.lease_ttl_ms {
        assert!(ttl >= 1);
    }
    // The log line never panics.
    let _ = config.to_string();
}

fn check_error(text: &str, e: &ConfigError) {
    assert!(
        !e.problem.trim().is_empty(),
        "error without a message: {e:?}"
    );
    assert!(!e.to_string().is_empty());
    // Parsing text, every error comes with a line, and that line exists.
    let Some(line) = e.line else {
        panic!("error without a line: {e:?} for {text:?}");
    };
    let lines = text.split('\n').count();
    assert!(
        (1..=lines).contains(&line),
        "line {line} outside 1..={lines}: {e}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("services.toml:{line}: ")),
        "{e}"
    );
}

/// Applies the actions in order, checking each is legal where it stands,
/// and compares the outcome with `new`.
fn check_reload(old: &Config, new: &Config) {
    let actions = diff(&old.plugins, &new.plugins);
    let mut mounted: BTreeMap<String, PluginConfig> = old.plugins.clone();
    // Removals first, then additions, then updates.
    let mut phase = 0;
    for action in &actions {
        match action {
            Action::Remove { name } => {
                assert_eq!(phase, 0, "remove after add/update: {actions:?}");
                assert!(mounted.remove(name).is_some(), "remove of unmounted {name}");
            }
            Action::Add { name, plugin } => {
                assert!(phase <= 1, "add after update: {actions:?}");
                phase = 1;
                let before = mounted.insert(name.clone(), plugin.clone());
                assert!(before.is_none(), "add of mounted {name}");
            }
            Action::Update { name, plugin } => {
                phase = 2;
                let Some(before) = mounted.get_mut(name) else {
                    panic!("update of unmounted {name}");
                };
                assert!(
                    !before.same_registration(plugin),
                    "update that changes nothing"
                );
                *before = plugin.clone();
            }
        }
    }
    // What is mounted is the new set, up to where a weight came from
    // (which the registry never sees).
    assert_eq!(
        mounted.keys().collect::<Vec<_>>(),
        new.plugins.keys().collect::<Vec<_>>()
    );
    for (name, plugin) in &new.plugins {
        assert!(mounted[name].same_registration(plugin), "{name} differs");
    }
    // Nothing changes in a reload to the same configuration.
    assert!(diff(&new.plugins, &new.plugins).is_empty());
    if old.plugins == new.plugins {
        assert!(actions.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_is_this_builds_plugin_list() {
        assert_eq!(KNOWN, crate::plugins::names());
    }

    #[test]
    fn samples_run() {
        services_toml(b"");
        services_toml(b"[plugins.echo]\nweight = 3\n\0[plugins.calculator]\n");
        services_toml(b"[plugins.echo]\n\0[plugins.echo]\nmetadata = { a = \"b\" }\n");
        services_toml(b"port = 70000\0\xff\xfe");
        services_toml(b"[plugins.nope]\0[[[");
    }
}
