//! External plugins: programs in any language that the node runs, mounts on
//! its own port and registers, as HashiCorp's go-plugin does (the contract
//! for a plugin's author is in README's "Writing a plugin in any language").
//!
//! A `[plugins.NAME]` table with `command` names the program. The node
//! starts it with `PLUGIN_LISTEN=unix:PATH` (a socket in a directory only
//! the node's user can enter), learns its one service and descriptors from
//! its server reflection, waits for its health to say SERVING, then routes
//! that service's calls to it ([`forward`]), lists it in the node's health
//! and reflection, and registers it under the node's lease. From then on it
//! follows the plugin's health and its process ([`supervise`]).
//!
//! # Layout
//! - [`process`]: starting, logging and stopping one run of the program;
//!   why no plugin outlives its node.
//! - [`discover`]: its service and descriptors from its reflection.
//! - [`health`]: following its health.
//! - [`forward`]: the router's fallback that forwards calls to it.
//! - [`supervise`]: its life: start, mount, follow, restart with backoff.
//!
//! # Bounds (defaults)
//! - at most [`MAX_EXTERNAL_PLUGINS`](crate::config::MAX_EXTERNAL_PLUGINS)
//!   external plugins per node (so processes; a plugin's own children are
//!   its business), checked when the file is read;
//! - start timeout 10 s ([`Options::start_timeout`], `--plugin-start-timeout-ms`),
//!   stop grace 3 s ([`Options::stop_grace`]);
//! - restarts: 250 ms doubling to 30 s, so a crash-looping plugin starts at
//!   most twice a minute once it is reported;
//! - stderr: the last [`STDERR_TAIL_LINES`](process::STDERR_TAIL_LINES)
//!   lines of [`MAX_LINE_BYTES`](process::MAX_LINE_BYTES) each are kept for
//!   error messages; every line goes to the log, cut at that length.

pub mod discover;
pub mod forward;
pub mod health;
pub mod process;
pub mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost_types::FileDescriptorSet;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::warn;

use crate::config::PluginConfig;
use crate::reflection::Reflection;
use crate::registration::Registrar;
use forward::{Route, Table};
use supervise::{Control, Supervisor};

/// How long a removal waits for the registry to confirm the
/// deregistration before the plugin is stopped anyway.
pub const REMOVE_WAIT: Duration = Duration::from_secs(3);

/// Settings of every external plugin of a node.
#[derive(Debug, Clone)]
pub struct Options {
    /// From start to SERVING (reflection answered, health SERVING).
    pub start_timeout: Duration,
    /// From SIGTERM to SIGKILL when stopping one.
    pub stop_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            start_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(3),
        }
    }
}

/// What the node gives its external plugins: the parts of it that mounting
/// one touches.
#[derive(Clone)]
pub struct Mounter {
    /// Registration.
    pub registrar: Arc<Registrar>,
    /// The node's health service.
    pub health: HealthReporter,
    /// The node's server reflection.
    pub reflection: Arc<Reflection>,
    /// Where external calls go.
    pub table: Table,
    /// Full names of the built-in plugins' services, which an external one
    /// may not take.
    pub builtin: Arc<Vec<String>>,
    /// Each plugin's claimed service and its descriptors, by plugin name.
    claimed: Arc<Mutex<HashMap<String, (String, FileDescriptorSet)>>>,
}

impl Mounter {
    /// A mounter over the node's parts.
    pub fn new(
        registrar: Arc<Registrar>,
        health: HealthReporter,
        reflection: Arc<Reflection>,
        table: Table,
        builtin: Vec<String>,
    ) -> Mounter {
        Mounter {
            registrar,
            health,
            reflection,
            table,
            builtin: Arc::new(builtin),
            claimed: Arc::default(),
        }
    }

    /// Takes `service` for `plugin` (calls fail UNAVAILABLE until it is
    /// up); the name of who has it already otherwise.
    fn claim(&self, plugin: &str, service: &str, files: &FileDescriptorSet) -> Result<(), String> {
        if self.builtin.iter().any(|s| s == service) {
            return Err("a built-in plugin".into());
        }
        let down = Route::Down {
            plugin: plugin.to_string(),
        };
        self.table
            .set(service, down)
            .map_err(|other| format!("plugin {other}"))?;
        let mut claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        claimed.insert(plugin.to_string(), (service.to_string(), files.clone()));
        Ok(())
    }

    /// Routes the plugin's calls to `channel` and lists it in reflection.
    fn route_up(&self, plugin: &str, service: &str, channel: Channel) {
        let up = Route::Up {
            plugin: plugin.to_string(),
            channel,
        };
        let _ = self.table.set(service, up);
        let files = {
            let claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
            claimed.get(plugin).map(|(_, f)| f.clone())
        };
        if let Err(e) = self.reflection.set_runtime(service, files) {
            warn!("plugin {plugin}: not listed in server reflection: {e}");
        }
    }

    async fn set_health(&self, plugin: &str, service: &str, status: ServingStatus) {
        for name in [service, plugin] {
            self.health.set_service_status(name, status).await;
        }
    }

    /// Registers it (or updates its registration) and says SERVING.
    async fn register(
        &self,
        plugin: &str,
        config: &PluginConfig,
        service: &str,
        descriptors: Arc<[u8]>,
    ) {
        self.set_health(plugin, service, ServingStatus::Serving)
            .await;
        self.registrar
            .upsert_runtime(plugin, config.clone(), service, descriptors);
    }

    /// Deregisters it (not waiting for the registry) and says NOT_SERVING.
    async fn deregister(&self, plugin: &str, service: &str) {
        self.registrar.forget(plugin);
        self.set_health(plugin, service, ServingStatus::NotServing)
            .await;
    }

    /// It died: deregistered at once; calls fail UNAVAILABLE.
    async fn down(&self, plugin: &str, service: &str) {
        self.registrar.forget(plugin);
        let down = Route::Down {
            plugin: plugin.to_string(),
        };
        let _ = self.table.set(service, down);
        self.set_health(plugin, service, ServingStatus::NotServing)
            .await;
    }

    /// Deregisters it and waits (at most [`REMOVE_WAIT`]) for the registry
    /// to confirm, before the caller stops it.
    async fn remove(&self, plugin: &str, service: &str) {
        if !self.registrar.remove(plugin, REMOVE_WAIT).await {
            warn!(
                "plugin {plugin}: the registry did not confirm the deregistration in time; stopping it anyway (it is retried)"
            );
        }
        self.set_health(plugin, service, ServingStatus::NotServing)
            .await;
    }

    /// Forgets it: no route, not listed, not registered.
    fn unmount(&self, plugin: &str) {
        self.registrar.forget(plugin);
        let claimed = {
            let mut claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
            claimed.remove(plugin)
        };
        if let Some((service, _)) = claimed {
            self.table.remove(&service);
            if let Err(e) = self.reflection.set_runtime(&service, None) {
                warn!("plugin {plugin}: still listed in server reflection: {e}");
            }
            let health = self.health.clone();
            let plugin = plugin.to_string();
            tokio::spawn(async move {
                for name in [service.as_str(), plugin.as_str()] {
                    health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
            });
        }
    }
}

/// A running plugin's task.
struct Handle {
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<()>,
}

/// The node's external plugins, by name.
pub struct ExternalPlugins {
    mounter: Mounter,
    options: Arc<Options>,
    /// The private directory of the plugins' sockets.
    dir: PathBuf,
    /// Numbers the plugins' socket directories.
    next_id: Mutex<u64>,
    running: Mutex<BTreeMap<String, Handle>>,
}

impl ExternalPlugins {
    /// No plugin yet; sockets will go under a fresh private directory.
    pub fn new(mounter: Mounter, options: Options) -> ExternalPlugins {
        let dir = std::env::temp_dir().join(format!("node-host-{}-plugins", std::process::id()));
        ExternalPlugins {
            mounter,
            options: Arc::new(options),
            dir,
            next_id: Mutex::new(0),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether `name` is an external plugin this node runs.
    pub fn has(&self, name: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.contains_key(name)
    }

    /// Starts plugin `name` (`config.external` says how).
    pub fn start(&self, name: &str, config: PluginConfig) {
        let Some(spec) = config.external.clone() else {
            return;
        };
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        if id == 1 {
            remove_stale_dirs(self.dir.parent());
        }
        let socket_dir = self.dir.join(id.to_string());
        if let Err(e) = make_private_dir(&self.dir).and_then(|()| make_private_dir(&socket_dir)) {
            tracing::error!(
                "plugin {name}: cannot create {}: {e}; not started",
                socket_dir.display()
            );
            return;
        }
        let (control, rx) = mpsc::channel(16);
        let supervisor = Supervisor {
            name: name.to_string(),
            config,
            spec,
            mounter: self.mounter.clone(),
            options: self.options.clone(),
            control: rx,
            socket_dir: socket_dir.clone(),
        };
        let task = tokio::spawn(async move {
            supervisor.run().await;
            let _ = std::fs::remove_dir_all(&socket_dir);
        });
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(name.to_string(), Handle { control, task });
    }

    /// New weight or metadata for `name`.
    pub async fn update(&self, name: &str, config: PluginConfig) {
        let control = {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.get(name).map(|h| h.control.clone())
        };
        if let Some(control) = control {
            let _ = control.send(Control::Update(config)).await;
        }
    }

    /// Stops `name`: deregistered (confirmed, or [`REMOVE_WAIT`]), then
    /// SIGTERM, the grace period, SIGKILL.
    pub async fn stop(&self, name: &str) {
        let handle = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.remove(name)
        };
        if let Some(handle) = handle {
            stop(handle, false).await;
        }
    }

    /// Stops every plugin at once, after the node revoked its lease (so no
    /// deregistration each).
    pub async fn stop_all(&self) {
        let handles: Vec<Handle> = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *running).into_values().collect()
        };
        futures::future::join_all(handles.into_iter().map(|h| stop(h, true))).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Asks a plugin's task to stop and waits until it has.
async fn stop(handle: Handle, deregistered: bool) {
    let (done, stopped) = oneshot::channel();
    let asked = handle
        .control
        .send(Control::Stop { deregistered, done })
        .await;
    if asked.is_ok() {
        let _ = stopped.await;
    }
    let _ = handle.task.await;
}

/// Removes the socket directories of node hosts that are gone (killed with
/// SIGKILL, they could not clean up): `node-host-PID-plugins` whose PID
/// is not running.
fn remove_stale_dirs(tmp: Option<&std::path::Path>) {
    let Some(entries) = tmp.and_then(|t| std::fs::read_dir(t).ok()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("node-host-"))
            .and_then(|n| n.strip_suffix("-plugins"))
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Creates `dir` (if missing) readable only by this user: the sockets in it
/// accept anyone who can reach them.
fn make_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}
