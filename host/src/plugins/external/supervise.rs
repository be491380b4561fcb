//! One external plugin's life, in one task: start the program, learn its
//! service, wait for it to be healthy, mount and register it, follow its
//! health, and start it again when it dies, with backoff.
//!
//! - Healthy (SERVING): routed, registered, the node's health says SERVING.
//! - NOT_SERVING: deregistered (calls still reach it, the plugin answers
//!   as it likes), registered again when SERVING.
//! - Died: deregistered at once, calls fail `UNAVAILABLE` (clients retry
//!   elsewhere), started again after [`RESTART_START`] doubling to
//!   [`RESTART_MAX`]; the delay starts over once it stayed up
//!   [`STABLE_AFTER`]. From [`CRASH_LOOP`] failures in a row on it is
//!   reported as crash-looping, at every failure.
//! - A plugin whose reflection is wrong for us (several services, none, the
//!   one `service =` names is absent, a service another plugin serves) is
//!   stopped and not started again until its table changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use support::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::{error, info, warn};

use super::discover::{DiscoverError, Discovered, discover};
use super::health::{self, Health};
use super::process::{Running, describe_exit};
use super::{Mounter, Options};
use crate::config::{ExternalSpec, PluginConfig};

/// First delay before starting a failed plugin again.
pub const RESTART_START: Duration = Duration::from_millis(250);
/// Longest delay between two starts: at most one start every 30 s for a
/// plugin that keeps failing.
pub const RESTART_MAX: Duration = Duration::from_secs(30);
/// Up this long, a plugin's next failure waits [`RESTART_START`] again.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Failures in a row from which a plugin is reported as crash-looping.
pub const CRASH_LOOP: u32 = 3;
/// How long a broken health stream waits for the process to exit, so that
/// a death is reported as one.
const EXIT_GRACE: Duration = Duration::from_millis(50);
/// Pause between attempts to reach a starting plugin's reflection.
const POLL: Duration = Duration::from_millis(50);

/// What the node asks of a plugin's task.
pub(super) enum Control {
    /// New weight or metadata (same program).
    Update(PluginConfig),
    /// Stop: deregister (unless `deregistered` already), SIGTERM, grace,
    /// SIGKILL; answer when done.
    Stop {
        deregistered: bool,
        done: oneshot::Sender<()>,
    },
}

/// How one run of the program ended.
enum End {
    /// Asked to stop; done.
    Stopped(oneshot::Sender<()>),
    /// Failed; worth starting again. `up` is how long it was healthy.
    Failed { why: String, up: Duration },
    /// Wrong for us; start it again only when its table changes.
    Wrong(String),
}

/// A plugin's task state.
pub(super) struct Supervisor {
    pub(super) name: String,
    pub(super) config: PluginConfig,
    pub(super) spec: ExternalSpec,
    pub(super) mounter: Mounter,
    pub(super) options: Arc<Options>,
    pub(super) control: mpsc::Receiver<Control>,
    /// Where this plugin's sockets go (one per start).
    pub(super) socket_dir: PathBuf,
}

impl Supervisor {
    pub(super) async fn run(mut self) {
        // Exact delays (no jitter): one plugin, nothing to spread out.
        let mut backoff = Backoff::new(RESTART_START, RESTART_MAX).without_jitter();
        let mut starts = 0u64;
        loop {
            starts += 1;
            let end = self.one_run(starts).await;
            let why = match end {
                End::Stopped(done) => {
                    let _ = done.send(());
                    return;
                }
                End::Wrong(why) => {
                    error!(
                        "plugin {}: {why}; not started again until [plugins.{}] changes",
                        self.name, self.name
                    );
                    self.idle_until_stopped().await;
                    return;
                }
                End::Failed { why, up } => {
                    if up >= STABLE_AFTER {
                        backoff.reset();
                    }
                    why
                }
            };
            let delay = backoff.next_delay();
            let failures = backoff.failures();
            crate::metrics::plugin_restarted(&self.name);
            if failures >= CRASH_LOOP {
                error!(
                    "plugin {} is crash-looping ({failures} failures in a row): {why}; next start in {delay:?}",
                    self.name
                );
            } else {
                warn!(
                    "plugin {}: {why}; starting it again in {delay:?}",
                    self.name
                );
            }
            let deadline = Instant::now() + delay;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    control = self.control.recv() => match control {
                        Some(Control::Update(config)) => self.config = config,
                        Some(Control::Stop { done, .. }) => {
                            self.mounter.unmount(&self.name);
                            let _ = done.send(());
                            return;
                        }
                        None => return,
                    },
                }
            }
        }
    }

    /// After a wrong plugin: wait for the node to stop this task.
    async fn idle_until_stopped(&mut self) {
        self.mounter.unmount(&self.name);
        while let Some(control) = self.control.recv().await {
            match control {
                Control::Update(config) => self.config = config,
                Control::Stop { done, .. } => {
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    /// One start of the program, until it dies or is stopped.
    async fn one_run(&mut self, start: u64) -> End {
        let socket = self.socket_dir.join(format!("{start}.sock"));
        let _ = std::fs::remove_file(&socket);
        let listen = format!("unix:{}", socket.display());
        let mut process = match Running::start(&self.name, &self.spec, &listen) {
            Ok(p) => p,
            Err(why) => {
                return End::Failed {
                    why,
                    up: Duration::ZERO,
                };
            }
        };
        info!(
            "plugin {} started: pid {}, serving on {listen}",
            self.name, process.pid
        );
        let channel = connect(socket.clone());
        let end = self.serve(&mut process, channel).await;
        let grace = self.options.stop_grace;
        let end = match end {
            Ended::Exited(why, up) => End::Failed {
                why: format!("{why}{}", process.last_stderr().await),
                up,
            },
            Ended::Failed(why) => {
                let how = process.stop(grace).await;
                End::Failed {
                    why: format!("{why} (stopped: it {how}){}", process.last_stderr().await),
                    up: Duration::ZERO,
                }
            }
            Ended::Wrong(why) => {
                process.stop(grace).await;
                End::Wrong(why)
            }
            Ended::Stop(done) => {
                // Stopped while starting, it may hold its service already.
                self.mounter.unmount(&self.name);
                let how = process.stop(grace).await;
                info!("plugin {} stopped: it {how}", self.name);
                End::Stopped(done)
            }
        };
        let _ = std::fs::remove_file(&socket);
        end
    }

    /// Brings the started plugin up and follows it.
    async fn serve(&mut self, process: &mut Running, channel: Channel) -> Ended {
        let timeout = self.options.start_timeout;
        let started = Instant::now();
        // 1. Its service, from reflection.
        let found = {
            let wanted = self.spec.service.clone();
            let name = self.name.clone();
            let ch = channel.clone();
            let discovering = async move {
                loop {
                    match discover(ch.clone(), wanted.as_deref(), &name).await {
                        Err(DiscoverError::NotReady(why)) => {
                            if started.elapsed() >= timeout {
                                return Err(DiscoverError::NotReady(why));
                            }
                            tokio::time::sleep(POLL).await;
                        }
                        other => return other,
                    }
                }
            };
            match self.until_exit(process, discovering).await {
                Err(ended) => return ended,
                Ok(Ok(found)) => found,
                Ok(Err(DiscoverError::Wrong(why))) => return Ended::Wrong(why),
                Ok(Err(DiscoverError::NotReady(why))) => {
                    return Ended::Failed(format!(
                        "no answer from its server reflection within {timeout:?} (start timeout): {why}"
                    ));
                }
            }
        };
        let Discovered { service, files } = found;
        if let Err(other) = self.mounter.claim(&self.name, &service, &files) {
            return Ended::Wrong(format!(
                "its service {service} is already served by {other}"
            ));
        }
        let descriptors: Arc<[u8]> = files.encode_to_vec().into();

        // 2. Healthy within what is left of the start timeout.
        let mut health = health::follow(channel.clone(), service.clone());
        let left = timeout.saturating_sub(started.elapsed());
        let healthy = async {
            let waited = tokio::time::timeout(left, health.wait_for(|h| *h == Health::Serving));
            if matches!(waited.await, Ok(Ok(_))) {
                Ok(())
            } else {
                Err(health.borrow().clone())
            }
        };
        match self.until_exit(process, healthy).await {
            Err(ended) => {
                self.mounter.unmount(&self.name);
                return ended;
            }
            Ok(Err(last)) => {
                self.mounter.unmount(&self.name);
                let said = match last {
                    Health::Unknown => "its health service never answered".to_string(),
                    Health::NotServing(why) => why,
                    Health::Serving => "SERVING came too late".to_string(),
                };
                return Ended::Failed(format!(
                    "not SERVING within {timeout:?} (start timeout): {said}"
                ));
            }
            Ok(Ok(())) => {}
        }

        // 3. Mounted: route, register, follow.
        self.mounter.route_up(&self.name, &service, channel);
        let up_since = Instant::now();
        let mut registered = true;
        self.mounter
            .register(&self.name, &self.config, &service, descriptors.clone())
            .await;
        info!(
            "plugin {} ({service}) is SERVING: mounted, registered with weight {}",
            self.name, self.config.weight
        );
        loop {
            let exited = tokio::select! {
                status = process.wait() => Some(status),
                changed = health.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let now = health.borrow_and_update().clone();
                    match (now, registered) {
                        (Health::Serving, false) => {
                            registered = true;
                            self.mounter
                                .register(&self.name, &self.config, &service, descriptors.clone())
                                .await;
                            info!("plugin {} is SERVING again: registered", self.name);
                            None
                        }
                        (Health::NotServing(why), true) => {
                            // A broken health stream is most often the
                            // process dying: report that, if it is.
                            match tokio::time::timeout(EXIT_GRACE, process.wait()).await {
                                Ok(status) => Some(status),
                                Err(_) => {
                                    registered = false;
                                    self.mounter.deregister(&self.name, &service).await;
                                    warn!("plugin {}: {why}: deregistered until it is SERVING again", self.name);
                                    None
                                }
                            }
                        }
                        _ => None,
                    }
                }
                control = self.control.recv() => match control {
                    Some(Control::Update(config)) => {
                        self.config = config;
                        if registered {
                            self.mounter
                                .register(&self.name, &self.config, &service, descriptors.clone())
                                .await;
                        }
                        None
                    }
                    Some(Control::Stop { deregistered, done }) => {
                        if !deregistered {
                            self.mounter.remove(&self.name, &service).await;
                        }
                        self.mounter.unmount(&self.name);
                        return Ended::Stop(done);
                    }
                    None => return Ended::Stop(oneshot::channel().0),
                },
            };
            if let Some(status) = exited {
                // Out of the registry first: its callers go elsewhere.
                self.mounter.down(&self.name, &service).await;
                let how = match status {
                    Ok(s) => describe_exit(s),
                    Err(e) => format!("cannot be waited for: {e}"),
                };
                return Ended::Exited(format!("it {how}"), up_since.elapsed());
            }
        }
    }

    /// Runs `work` until it ends, the process exits or the node says stop.
    async fn until_exit<T>(
        &mut self,
        process: &mut Running,
        work: impl Future<Output = T>,
    ) -> Result<T, Ended> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                status = process.wait() => {
                    let how = match status {
                        Ok(s) => describe_exit(s),
                        Err(e) => format!("cannot be waited for: {e}"),
                    };
                    return Err(Ended::Exited(format!("it {how} before it was SERVING"), Duration::ZERO));
                }
                control = self.control.recv() => match control {
                    Some(Control::Update(config)) => self.config = config,
                    Some(Control::Stop { done, .. }) => return Err(Ended::Stop(done)),
                    None => return Err(Ended::Stop(oneshot::channel().0)),
                },
            }
        }
    }
}

/// How serving a started plugin ended.
enum Ended {
    /// The process exited by itself: why, and how long it was SERVING.
    Exited(String, Duration),
    /// It did not come up; it is still running.
    Failed(String),
    /// It is wrong for us; still running.
    Wrong(String),
    /// The node said stop.
    Stop(oneshot::Sender<()>),
}

/// A channel to the plugin's socket, connected on first use (the plugin
/// may not listen yet) and again after a failure.
fn connect(socket: PathBuf) -> Channel {
    // The URI is not used to connect (the connector is), only as the
    // `:authority` of requests.
    let endpoint = Endpoint::from_static("http://plugin.local")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
        let socket = socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(socket).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    }))
}
