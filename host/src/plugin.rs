//! The plugin trait: what a node host needs to know to serve a gRPC service
//! and announce it to the registry.
//!
//! A plugin is a name (what the registry lists, e.g. `calculator`), the full
//! protobuf name of the service it serves, the encoded descriptors of its
//! `.proto` file (sent to the registry and to server reflection, so clients
//! can call it without compiled-in stubs), and a way to add its tonic service
//! to the server's router behind a [`Gate`](crate::gate::Gate).
//!
//! The trait is object safe: the host keeps `Arc<dyn Plugin>`s in one list,
//! [`plugins::all`](crate::plugins::all).
//!
//! A plugin may also report its own health ([`Plugin::health`]), the same
//! way an external plugin's health service does: while it says it cannot
//! serve, the node keeps it mounted but deregistered and NOT_SERVING in the
//! node's health service. [`WithHealth`] gives any plugin such a switch
//! (tests use it on the echo plugin).

use std::sync::Arc;

use tokio::sync::watch;
use tonic::service::RoutesBuilder;

use crate::gate::Switch;

/// What a plugin may need to know about the node serving it.
#[derive(Debug, Clone)]
pub struct PluginContext {
    /// The address clients reach this node on, `ip:port` (the echo plugin
    /// reports it as `served_by`).
    pub advertised: String,
}

/// A service the node host can mount, serve and register.
pub trait Plugin: Send + Sync + 'static {
    /// The name the service is registered under and that `services.toml`
    /// uses, e.g. `"calculator"`.
    fn name(&self) -> &'static str;

    /// The full protobuf name of the gRPC service, e.g.
    /// `"calculator.v1.Calculator"`.
    fn proto_service(&self) -> &'static str;

    /// The encoded `FileDescriptorSet` defining [`proto_service`](Self::proto_service)
    /// and everything it imports.
    fn descriptors(&self) -> &'static [u8];

    /// Adds the plugin's tonic service to `routes`, wrapped in a gate that
    /// `switch` opens and closes. Called once, when the server is built.
    fn add_to(&self, routes: &mut RoutesBuilder, switch: Switch, ctx: &PluginContext);

    /// Whether it can serve, as it changes: `true` SERVING, `false`
    /// NOT_SERVING. `None` (the default): SERVING whenever mounted.
    fn health(&self) -> Option<watch::Receiver<bool>> {
        None
    }
}

/// A plugin with a health switch: `inner` as it is, reporting what the
/// switch says.
pub struct WithHealth {
    /// The plugin.
    inner: Arc<dyn Plugin>,
    /// Its health, as [`WithHealth::switch`]'s sender sets it.
    health: watch::Receiver<bool>,
}

impl WithHealth {
    /// `inner`, SERVING until the returned sender says `false`.
    pub fn switch(inner: Arc<dyn Plugin>) -> (WithHealth, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(true);
        (WithHealth { inner, health: rx }, tx)
    }
}

impl Plugin for WithHealth {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn proto_service(&self) -> &'static str {
        self.inner.proto_service()
    }

    fn descriptors(&self) -> &'static [u8] {
        self.inner.descriptors()
    }

    fn add_to(&self, routes: &mut RoutesBuilder, switch: Switch, ctx: &PluginContext) {
        self.inner.add_to(routes, switch, ctx);
    }

    fn health(&self) -> Option<watch::Receiver<bool>> {
        Some(self.health.clone())
    }
}
