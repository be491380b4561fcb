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
}
