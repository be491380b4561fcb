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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::config::Config;
use crate::diff::{Action, diff};
use crate::gate::Switch;
use crate::plugin::{Plugin, PluginContext};
use crate::reflection::Reflection;
use crate::registration::{Registrar, Settings};
use registry_proto::security::{BearerToken, TlsArgs};

/// How long a removal waits for the registry to confirm the deregistration
/// before the plugin stops being served anyway (the registry may be down).
pub const DEREGISTER_WAIT: Duration = Duration::from_secs(3);

/// Problems building the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A plugin's descriptors could not be loaded into server reflection.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct Registry {
    /// Its `host:port`.
    pub addr: String,
    /// Lease TTL to ask for; `None` takes the registry's default.
    pub lease_ttl_ms: Option<u64>,
    /// TLS towards it.
    pub tls: TlsArgs,
    /// Its write token.
    pub token: BearerToken,
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
    reflection: Reflection,
    /// The registration task.
    registrar: Registrar,
    /// The configuration in force. A tokio mutex: held across the awaits of
    /// one reload so two reloads never interleave.
    current: Mutex<Config>,
    /// Whether a configuration was applied yet (the first one is no change).
    applied: AtomicBool,
}

impl Node {
    /// Builds the node and the routes to serve: every plugin behind a closed
    /// gate, gRPC health, server reflection v1 and v1alpha. Starts the
    /// registration task, with nothing to register until [`apply`](Self::apply).
    pub async fn build(
        plugins: Vec<Arc<dyn Plugin>>,
        advertised: SocketAddr,
        registry: Registry,
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
        let reflection = Reflection::add_to(&mut routes, descriptors, &[])?;

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
        let registrar = Registrar::spawn(Settings {
            registry: registry.addr,
            advertised,
            lease_ttl_ms: registry.lease_ttl_ms,
            plugins,
            tls: registry.tls,
            token: registry.token,
        });
        let node = Node {
            mounts,
            health,
            reflection,
            registrar,
            current: Mutex::new(Config::default()),
            applied: AtomicBool::new(false),
        };
        Ok((Arc::new(node), routes.routes()))
    }

    /// The configuration in force.
    pub async fn config(&self) -> Config {
        self.current.lock().await.clone()
    }

    /// The registration task's handle (for `u`, `r`, `q`).
    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// Makes `new` the configuration in force, applying only the difference.
    pub async fn apply(&self, new: Config) {
        let mut current = self.current.lock().await;
        if self.applied.load(Ordering::Relaxed) {
            warn_restart_only(&current, &new);
        }
        let actions = diff(&current.plugins, &new.plugins);
        for action in actions {
            match action {
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
                    info!(
                        "plugin {name} added: mounted, registering with weight {}",
                        plugin.weight
                    );
                    self.registrar.upsert(&name, plugin);
                }
                Action::Update { name, plugin } => {
                    info!(
                        "plugin {name} changed: updating in place to weight {} metadata {:?}",
                        plugin.weight, plugin.metadata
                    );
                    self.registrar.upsert(&name, plugin);
                }
            }
        }
        *current = new;
        self.applied.store(true, Ordering::Relaxed);
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
fn warn_restart_only(current: &Config, new: &Config) {
    let changed = [
        ("registry", current.registry != new.registry),
        ("advertise", current.advertise != new.advertise),
        ("port", current.port != new.port),
        ("lease_ttl_ms", current.lease_ttl_ms != new.lease_ttl_ms),
    ];
    for (what, differs) in changed {
        if differs {
            warn!("`{what}` changed: takes effect when node-host restarts");
        }
    }
}

/// The names a plugin's health is reported under: its full protobuf service
/// name (what gRPC health checkers ask for) and its registry name.
fn health_names(plugin: &dyn Plugin) -> [&'static str; 2] {
    [plugin.proto_service(), plugin.name()]
}
