//! The node: the plugins' gates, their health, and the registration task,
//! driven by configuration changes and terminal commands.
//!
//! Every change goes through [`Node::apply`], which turns the difference
//! between the configuration in force and the new one into
//! [actions](crate::diff::Action) and applies them in an order that never
//! lists a service the node does not serve:
//! - removed: deregister, THEN close the gate (the registry stops sending
//!   clients before the node stops answering; if the registry does not
//!   confirm within [`DEREGISTER_WAIT`], the gate closes anyway and the
//!   deregistration is retried);
//! - added: open the gate, THEN register;
//! - changed weight or metadata: register again under the same lease (an
//!   in-place update: the instance never disappears).
//!
//! External plugins (a table with `command`) are handed to
//! [`ExternalPlugins`]: added, one is started and mounted once healthy;
//! removed, it is deregistered, then stopped; a changed program is a
//! removal and an addition. Calls to their services reach them through the
//! router's fallback ([`Forwarder`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Mutex;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::diff::{Action, diff};
use crate::gate::Switch;
use crate::plugin::{Plugin, PluginContext};
use crate::plugins::external::forward::{Forwarder, Table};
use crate::plugins::external::{self, ExternalPlugins, Mounter};
use crate::reflection::Reflection;
use crate::registration::{Registrar, Settings};
use support::Connector;

/// How long a removal waits for the registry to confirm the deregistration
/// before the plugin stops being served anyway (the registry may be down).
pub const DEREGISTER_WAIT: Duration = Duration::from_secs(3);

/// Problems building the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A plugin's descriptors could not be loaded into server reflection.
    #[error("server reflection: {0}")]
    Reflection(#[from] support::reflection::ReflectionError),
}

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct Registry {
    /// Its `host:port`.
    pub addr: String,
    /// Lease TTL to ask for; `None` takes the registry's default.
    pub lease_ttl_ms: Option<u64>,
    /// TLS towards it, and its write token.
    pub connector: Connector,
}

/// Which restart-only settings the command line sets. The file's values for
/// them are ignored, at start and after any edit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedByFlags {
    /// `--registry` (or `REGISTRY_ADDR`).
    pub registry: bool,
    /// `--advertise`.
    pub advertise: bool,
    /// `--port`.
    pub port: bool,
    /// `--http`.
    pub http: bool,
}

/// One known plugin and its gate.
struct Mount {
    /// The plugin.
    plugin: Arc<dyn Plugin>,
    /// Its gate's switch.
    switch: Switch,
}

/// A running node host's state.
pub struct Node {
    /// Every known plugin, by name, with its gate.
    mounts: BTreeMap<&'static str, Mount>,
    /// Health statuses: one per plugin, following its gate.
    health: HealthReporter,
    /// Server reflection, listing the mounted plugins.
    reflection: Arc<Reflection>,
    /// The registration task.
    registrar: Arc<Registrar>,
    /// The external plugins running.
    external: ExternalPlugins,
    /// The configuration in force. A tokio mutex: held across the awaits of
    /// one reload so two reloads never interleave.
    current: Mutex<Config>,
    /// The first configuration applied: the file's restart-only settings
    /// the node started with. Unset until then (the first one is no change).
    started: OnceLock<Config>,
    /// Restart-only settings the flags set, whose file values do nothing.
    fixed: FixedByFlags,
    /// Numbers the configuration file's reads (see `crate::reload`).
    reads: crate::config::Reads,
}

impl Node {
    /// Builds the node and the routes to serve: every plugin behind a closed
    /// gate, gRPC health, server reflection v1 and v1alpha. Starts the
    /// registration task, with nothing to register until [`apply`](Self::apply).
    /// `fixed` says which file settings the command line overrode, so edits
    /// to them are not reported as needing a restart.
    pub async fn build(
        plugins: Vec<Arc<dyn Plugin>>,
        advertised: SocketAddr,
        registry: Registry,
        fixed: FixedByFlags,
    ) -> Result<(Arc<Node>, Routes), NodeError> {
        Node::build_with(
            plugins,
            advertised,
            registry,
            fixed,
            external::Options::default(),
        )
        .await
    }

    /// [`build`](Self::build), with settings for the external plugins.
    pub async fn build_with(
        plugins: Vec<Arc<dyn Plugin>>,
        advertised: SocketAddr,
        registry: Registry,
        fixed: FixedByFlags,
        external_options: external::Options,
    ) -> Result<(Arc<Node>, Routes), NodeError> {
        let ctx = PluginContext {
            advertised: advertised.to_string(),
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);

        // Reflection knows every plugin's descriptors, and lists the
        // mounted ones (none yet).
        let descriptors = std::iter::once(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .chain(plugins.iter().map(|p| p.descriptors()))
            .collect();
        let reflection = Arc::new(Reflection::add_to(&mut routes, descriptors, &[])?);

        let mut mounts = BTreeMap::new();
        for plugin in &plugins {
            let switch = Switch::new();
            plugin.add_to(&mut routes, switch.clone(), &ctx);
            for name in health_names(plugin.as_ref()) {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            mounts.insert(
                plugin.name(),
                Mount {
                    plugin: plugin.clone(),
                    switch,
                },
            );
        }
        let builtin = plugins
            .iter()
            .map(|p| p.proto_service().to_string())
            .collect();
        let registrar = Arc::new(Registrar::spawn(Settings {
            registry: registry.addr,
            advertised,
            lease_ttl_ms: registry.lease_ttl_ms,
            plugins,
            connector: registry.connector,
        }));
        let table = Table::default();
        let mounter = Mounter::new(
            registrar.clone(),
            health.clone(),
            reflection.clone(),
            table.clone(),
            builtin,
        );
        let node = Node {
            mounts,
            health,
            reflection,
            registrar,
            external: ExternalPlugins::new(mounter, external_options),
            current: Mutex::new(Config::default()),
            started: OnceLock::new(),
            fixed,
            reads: Default::default(),
        };
        // Any service no built-in route serves goes to the forwarder: an
        // external plugin's, or UNIMPLEMENTED.
        let router = routes
            .routes()
            .into_axum_router()
            .fallback_service(Forwarder::new(table));
        let node = Arc::new(node);
        Node::follow_plugin_health(&node);
        Ok((node, Routes::from(router)))
    }

    /// The configuration in force.
    pub async fn config(&self) -> Config {
        self.current.lock().await.clone()
    }

    /// Every plugin this node knows of (built in, in the file, or still
    /// registered), and whether it is registered now: what `/metrics`
    /// shows as `node_plugin_registered`.
    pub fn plugin_states(&self) -> std::collections::BTreeMap<String, bool> {
        let registered = self.registrar().registered();
        let desired = self.registrar().desired();
        crate::plugins::names()
            .into_iter()
            .map(str::to_owned)
            .chain(desired.plugins.keys().cloned())
            .chain(registered.keys().cloned())
            .map(|plugin| {
                let on = registered.contains_key(&plugin);
                (plugin, on)
            })
            .collect()
    }

    /// The numbering of the configuration file's reads.
    pub fn reads(&self) -> &crate::config::Reads {
        &self.reads
    }

    /// The registration task's handle (for `u`, `r`, `q`).
    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// Stops every external plugin (SIGTERM, grace, SIGKILL), for shutdown:
    /// call it after the lease is revoked.
    pub async fn stop_external(&self) {
        self.external.stop_all().await;
    }

    /// Makes `new` the configuration in force, applying only the difference.
    pub async fn apply(&self, new: Config) {
        self.update(|_| Some(new)).await;
    }

    /// Computes the next configuration from the one in force and applies
    /// it (`None`: keep it), all under one lock. A reload must read the file
    /// under the lock too: two reloads that both started from the same
    /// configuration would each draw their own random weights, and the
    /// one that read the file first could apply last, undoing a newer edit.
    pub async fn update(&self, next: impl FnOnce(&Config) -> Option<Config>) {
        let mut current = self.current.lock().await;
        let Some(new) = next(&current) else {
            return;
        };
        match self.started.get() {
            Some(started) => warn_restart_only(started, &current, &new, self.fixed),
            None => {
                // Under the lock: no other apply can have set it meanwhile.
                let _ = self.started.set(new.clone());
            }
        }
        let actions = diff(&current.plugins, &new.plugins);
        for action in actions {
            match action {
                Action::Remove { name } if self.external.has(&name) => {
                    self.external.stop(&name).await;
                    info!("plugin {name} removed: deregistered, then stopped");
                }
                Action::Add { name, plugin } if plugin.external.is_some() => {
                    info!("plugin {name} added: starting its program");
                    self.external.start(&name, plugin);
                }
                Action::Update { name, plugin } if self.external.has(&name) => {
                    info!(
                        "plugin {name} changed: weight {} metadata {:?}",
                        plugin.weight, plugin.metadata
                    );
                    self.external.update(&name, plugin).await;
                }
                Action::Remove { name } => {
                    let confirmed = self.registrar.remove(&name, DEREGISTER_WAIT).await;
                    self.set_mounted(&name, false).await;
                    if confirmed {
                        info!("plugin {name} removed: deregistered, then unmounted");
                    } else {
                        warn!(
                            "plugin {name} removed: unmounted; the registry did not confirm the deregistration in time (it is retried)"
                        );
                    }
                }
                Action::Add { name, plugin } => {
                    self.set_mounted(&name, true).await;
                    if self.plugin_serving(&name) {
                        info!(
                            "plugin {name} added: mounted, registering with weight {}",
                            plugin.weight
                        );
                        self.registrar.upsert(&name, plugin);
                    } else {
                        self.set_health(&name, ServingStatus::NotServing).await;
                        info!("plugin {name} added: mounted, NOT_SERVING: registered once it is");
                    }
                }
                Action::Update { name, plugin } => {
                    info!(
                        "plugin {name} changed: updating in place to weight {} metadata {:?}",
                        plugin.weight, plugin.metadata
                    );
                    if self.plugin_serving(&name) {
                        self.registrar.upsert(&name, plugin);
                    }
                }
            }
        }
        *current = new;
    }

    /// Whether built-in plugin `name` says it can serve (one without its own
    /// health always can).
    fn plugin_serving(&self, name: &str) -> bool {
        self.mounts
            .get(name)
            .and_then(|m| m.plugin.health())
            .is_none_or(|h| *h.borrow())
    }

    async fn set_health(&self, name: &str, status: ServingStatus) {
        if let Some(mount) = self.mounts.get(name) {
            for health_name in health_names(mount.plugin.as_ref()) {
                self.health.set_service_status(health_name, status).await;
            }
        }
    }

    /// Follows the health of the built-in plugins that report one: NOT_SERVING
    /// deregisters a mounted one (it stays mounted), SERVING registers it
    /// again with the settings in force.
    fn follow_plugin_health(node: &Arc<Node>) {
        for (name, mount) in &node.mounts {
            let Some(mut health) = mount.plugin.health() else {
                continue;
            };
            let (name, node) = (*name, Arc::downgrade(node));
            tokio::spawn(async move {
                while health.changed().await.is_ok() {
                    let serving = *health.borrow_and_update();
                    let Some(node) = node.upgrade() else { return };
                    let current = node.current.lock().await;
                    let Some(config) = current.plugins.get(name) else {
                        continue;
                    };
                    if serving {
                        node.set_health(name, ServingStatus::Serving).await;
                        node.registrar.upsert(name, config.clone());
                        info!("plugin {name} is SERVING again: registered");
                    } else {
                        node.registrar.forget(name);
                        node.set_health(name, ServingStatus::NotServing).await;
                        warn!("plugin {name} is NOT_SERVING: deregistered, still mounted");
                    }
                }
            });
        }
    }

    /// Opens or closes a plugin's gate, and sets its health to match.
    async fn set_mounted(&self, name: &str, mounted: bool) {
        let Some(mount) = self.mounts.get(name) else {
            return;
        };
        mount.switch.set(mounted);
        let status = if mounted {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for health_name in health_names(mount.plugin.as_ref()) {
            self.health.set_service_status(health_name, status).await;
        }
        let listed: Vec<&str> = self
            .mounts
            .values()
            .filter(|m| m.switch.is_mounted())
            .map(|m| m.plugin.proto_service())
            .collect();
        if let Err(e) = self.reflection.list(&listed) {
            // Descriptors were loaded once already, so this cannot really
            // fail; if it did, the previous listing stays.
            warn!("server reflection not updated: {e}");
        }
    }
}

/// Warns about settings a reload cannot change: the node's address and its
/// registry link are fixed for its lifetime.
fn warn_restart_only(started: &Config, current: &Config, new: &Config, fixed: FixedByFlags) {
    for change in restart_only_changes(started, current, new, fixed) {
        match change {
            RestartOnly::NeedsRestart(message) => warn!("{message}"),
            RestartOnly::Overridden(message) => debug!("{message}"),
        }
    }
}

/// A restart-only setting the file changed.
#[derive(Debug, PartialEq, Eq)]
enum RestartOnly {
    /// It takes effect when node-host restarts.
    NeedsRestart(String),
    /// A flag sets it: the file's value does nothing, now or after a restart.
    Overridden(String),
}

/// The restart-only settings `current` -> `new` changes in the file. One
/// that changed back to the value the node `started` with needs nothing: it
/// is what runs.
fn restart_only_changes(
    started: &Config,
    current: &Config,
    new: &Config,
    fixed: FixedByFlags,
) -> Vec<RestartOnly> {
    fn show<T: std::fmt::Display>(value: Option<&T>) -> String {
        value.map_or_else(|| "unset".to_string(), |v| format!("`{v}`"))
    }
    type Value = fn(&Config) -> String;
    let settings: [(&str, Option<&str>, Value); 5] = [
        ("registry", fixed.registry.then_some("--registry"), |c| {
            show(c.registry.as_ref())
        }),
        ("advertise", fixed.advertise.then_some("--advertise"), |c| {
            show(c.advertise.as_ref())
        }),
        ("port", fixed.port.then_some("--port"), |c| {
            show(c.port.as_ref())
        }),
        ("http", fixed.http.then_some("--http"), |c| {
            show(c.http.as_ref())
        }),
        // No flag sets the lease TTL.
        ("lease_ttl_ms", None, |c| show(c.lease_ttl_ms.as_ref())),
    ];
    let mut changes = Vec::new();
    for (name, flag, value) in settings {
        let (was, now) = (value(current), value(new));
        if was == now {
            continue;
        }
        changes.push(match flag {
            Some(flag) => RestartOnly::Overridden(format!(
                "`{name}` changed in the configuration file from {was} to {now}: no effect, {flag} overrides it"
            )),
            None if now == value(started) => continue,
            None => RestartOnly::NeedsRestart(format!(
                "`{name}` changed in the configuration file from {was} to {now}: it takes effect when node-host restarts"
            )),
        });
    }
    changes
}

/// The names a plugin's health is reported under: its full protobuf service
/// name (what gRPC health checkers ask for) and its registry name.
fn health_names(plugin: &dyn Plugin) -> [&'static str; 2] {
    [plugin.proto_service(), plugin.name()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(registry: Option<&str>, port: Option<u16>, lease_ttl_ms: Option<u64>) -> Config {
        Config {
            registry: registry.map(str::to_string),
            port,
            lease_ttl_ms,
            ..Config::default()
        }
    }

    fn needs_restart(changes: &[RestartOnly]) -> Vec<&str> {
        changes
            .iter()
            .filter_map(|c| match c {
                RestartOnly::NeedsRestart(m) => Some(m.as_str()),
                RestartOnly::Overridden(_) => None,
            })
            .collect()
    }

    #[test]
    fn restart_only_warns_for_file_values_no_flag_overrides() {
        let started = config(Some("10.0.0.1:50051"), Some(7000), Some(900));
        let edited = config(Some("10.0.0.2:50051"), Some(7001), Some(1500));

        // No flags: every edited setting needs a restart, named with both
        // values.
        let changes = restart_only_changes(&started, &started, &edited, FixedByFlags::default());
        assert_eq!(
            needs_restart(&changes),
            [
                "`registry` changed in the configuration file from `10.0.0.1:50051` to `10.0.0.2:50051`: it takes effect when node-host restarts",
                "`port` changed in the configuration file from `7000` to `7001`: it takes effect when node-host restarts",
                "`lease_ttl_ms` changed in the configuration file from `900` to `1500`: it takes effect when node-host restarts",
            ]
        );

        // --registry and --port set: their file values do nothing, before or
        // after a restart; only the lease TTL (no flag) still needs one.
        let fixed = FixedByFlags {
            registry: true,
            advertise: false,
            port: true,
            http: false,
        };
        let changes = restart_only_changes(&started, &started, &edited, fixed);
        assert_eq!(
            needs_restart(&changes),
            [
                "`lease_ttl_ms` changed in the configuration file from `900` to `1500`: it takes effect when node-host restarts"
            ]
        );
        assert_eq!(
            changes[0],
            RestartOnly::Overridden(
                "`registry` changed in the configuration file from `10.0.0.1:50051` to `10.0.0.2:50051`: no effect, --registry overrides it".into()
            )
        );
        assert_eq!(changes.len(), 3);
    }

    #[test]
    fn restart_only_is_quiet_when_nothing_restart_only_changed() {
        let started = config(None, Some(7000), None);
        let edited = config(None, Some(7001), None);
        // A reload that only touches plugins, after the port was edited
        // before: no warning again for the port.
        let mut plugins_only = edited.clone();
        plugins_only.plugins.insert(
            "echo".into(),
            crate::config::PluginConfig {
                weight: 2,
                weight_source: crate::config::WeightSource::Configured,
                metadata: BTreeMap::new(),
                external: None,
            },
        );
        let none = FixedByFlags::default();
        assert!(restart_only_changes(&started, &edited, &plugins_only, none).is_empty());
        // Back to the value the node started with: that is what runs.
        assert!(restart_only_changes(&started, &edited, &started, none).is_empty());
        // Unset -> set is a change too.
        let changes = restart_only_changes(
            &started,
            &started,
            &config(Some("h:1"), Some(7000), None),
            none,
        );
        assert_eq!(
            needs_restart(&changes),
            [
                "`registry` changed in the configuration file from unset to `h:1`: it takes effect when node-host restarts"
            ]
        );
    }
}
