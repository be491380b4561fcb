//! The one way tests and the bench start `registry` and `node-host`.
//!
//! Every child gets a clean environment ([`command`] removes what the
//! binaries read from it, so a developer's `REGISTRY_TOKEN` cannot leak into
//! a test), its files in a [`TempDir`], and is waited for until its ready
//! line. The builders take the flags a test varies; the defaults are what
//! almost every test wants (loopback, a free port, advertise 127.0.0.1).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Process, READY_TIMEOUT, addr_from_line, bin_path};

/// Environment variables our binaries read. A test sets the ones it means
/// to with [`RegistryBuilder::env`] / [`NodeHostBuilder::env`]; the test's
/// own environment never reaches the child.
pub const BINARY_ENV: [&str; 10] = [
    "REGISTRY_ADDR",
    "REGISTRY_STORE",
    "REGISTRY_ETCD_USER",
    "REGISTRY_ETCD_PASSWORD",
    "REGISTRY_TOKEN",
    "REGISTRY_WRITE_TOKEN",
    "REGISTRY_READ_TOKEN",
    "TLS_CERT",
    "TLS_KEY",
    "TLS_CA",
];

/// A `Command` for a workspace binary: a clean environment (see
/// [`BINARY_ENV`]) and logs at a level useful in failures (`RUST_LOG`, when
/// the test run sets it, is passed on).
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin_path(name));
    for var in BINARY_ENV {
        cmd.env_remove(var);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd
}

/// A scratch directory (config files, certificates), removed when dropped.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// A new directory under the system's temporary directory, its name
    /// starting with `what`.
    pub fn new(what: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), what)
    }

    /// A new directory under `base` (the bench puts etcd's data where the
    /// user says), its name starting with `what`.
    pub fn new_in(base: &Path, what: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{what}-"))
            .tempdir_in(base)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot make a temporary directory for {what} in {}: {e}",
                    base.display()
                )
            });
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.path().join(name)
    }
}

/// A `registry` process.
pub struct Registry {
    /// The process itself.
    pub process: Process,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Where it serves `/metrics` and the dashboard, with
    /// [`RegistryBuilder::http`].
    pub http: Option<SocketAddr>,
}

/// How to start a [`Registry`]: [`Registry::launch`].
#[must_use]
pub struct RegistryBuilder {
    listen: String,
    http: Option<String>,
    child: Child,
}

/// What both builders pass to their child the same way: extra flags, its
/// environment, `RUST_LOG`, and the command that runs it.
#[derive(Default)]
struct Child {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log: Option<String>,
    cmd: Option<Command>,
}

impl Child {
    /// The command to run `program` with, before any flag.
    fn command(&mut self, program: &str) -> Command {
        self.cmd.take().unwrap_or_else(|| command(program))
    }

    /// Adds the extra flags and the environment to `cmd`.
    fn finish(self, cmd: &mut Command) {
        cmd.args(&self.args).envs(self.env);
        if let Some(level) = self.log {
            cmd.env("RUST_LOG", level);
        }
    }
}

/// The builder methods that only fill [`Child`], written once for both
/// builders.
macro_rules! child_methods {
    ($program:literal) => {
        /// An environment variable for the child.
        pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
            self.child.env.push((key.into(), value.into()));
            self
        }

        /// `RUST_LOG` for the child (the bench keeps its children quiet).
        pub fn log(mut self, level: &str) -> Self {
            self.child.log = Some(level.into());
            self
        }

        #[doc = concat!("Runs it as `cmd` (e.g. inside a network namespace: `ip netns exec HOST ", $program, "`) instead of [`command`]`(\"", $program, "\")`.")]
        pub fn command(mut self, cmd: Command) -> Self {
            self.child.cmd = Some(cmd);
            self
        }
    };
}

impl Registry {
    /// Starts a registry on `127.0.0.1:0` with extra flags.
    pub fn start(extra_args: &[&str]) -> Registry {
        Registry::launch().args(extra_args).start()
    }

    /// Starts a registry listening on `listen` (use port 0 for a free one).
    pub fn start_on(listen: &str, extra_args: &[&str]) -> Registry {
        Registry::launch().listen(listen).args(extra_args).start()
    }

    /// A registry to start on `127.0.0.1:0`, no other flags yet.
    pub fn launch() -> RegistryBuilder {
        RegistryBuilder {
            listen: "127.0.0.1:0".into(),
            http: None,
            child: Child::default(),
        }
    }

    /// `http://ip:port`, for tonic.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected gRPC client for it.
    pub async fn client(
        &self,
    ) -> registry_proto::registry::v1::registry_client::RegistryClient<tonic::transport::Channel>
    {
        registry_proto::registry::v1::registry_client::RegistryClient::connect(self.url())
            .await
            .unwrap()
    }
}

impl RegistryBuilder {
    /// `--listen ADDR` (port 0: a free one).
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.into();
        self
    }

    /// `--http ADDR` (port 0: a free one); [`Registry::http`] says where.
    pub fn http(mut self, addr: &str) -> Self {
        self.http = Some(addr.into());
        self
    }

    /// More flags.
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.child
            .args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    child_methods!("registry");

    /// Starts it and waits for its ready line.
    pub fn start(mut self) -> Registry {
        let mut cmd = self.child.command("registry");
        cmd.arg("--listen").arg(&self.listen);
        if let Some(http) = &self.http {
            cmd.arg("--http").arg(http);
        }
        crate::etcd::store_hook(&mut cmd, &self.child.args);
        self.child.finish(&mut cmd);
        let process = Process::spawn("registry", cmd);
        let http = self
            .http
            .map(|_| addr_from_line(&process.wait_for_line("registry http on", READY_TIMEOUT)));
        let addr = addr_from_line(&process.wait_for_line("registry listening on", READY_TIMEOUT));
        Registry {
            process,
            addr,
            http,
        }
    }
}

/// A `node-host` process with its `services.toml` in a private directory.
pub struct NodeHost {
    /// The process itself.
    pub process: Process,
    /// The address it advertises (its ready line's).
    pub addr: SocketAddr,
    /// Where it serves `/metrics`, with [`NodeHostBuilder::http`].
    pub http: Option<SocketAddr>,
    /// Its services.toml.
    pub config: PathBuf,
    /// The directory holding it (removed when the node is dropped).
    pub dir: TempDir,
}

/// How to start a [`NodeHost`]: [`NodeHost::launch`].
#[must_use]
pub struct NodeHostBuilder {
    registry: Option<String>,
    toml: String,
    advertise: Option<String>,
    http: bool,
    child: Child,
}

impl NodeHost {
    /// Starts a node host registering with `registry`, `toml` as its file,
    /// advertising 127.0.0.1.
    pub fn start(registry: impl ToString, toml: &str) -> NodeHost {
        NodeHost::launch(registry, toml).start()
    }

    /// Like [`NodeHost::start`] with extra flags; `--advertise 127.0.0.1`
    /// unless `extra` names an `--advertise` of its own.
    pub fn start_with(registry: impl ToString, toml: &str, extra: &[&str]) -> NodeHost {
        NodeHost::launch(registry, toml).args(extra).start()
    }

    /// A node host to start with `--registry REGISTRY` and `toml` as its
    /// file, advertising 127.0.0.1.
    pub fn launch(registry: impl ToString, toml: &str) -> NodeHostBuilder {
        NodeHostBuilder {
            registry: Some(registry.to_string()),
            toml: toml.into(),
            advertise: Some("127.0.0.1".into()),
            http: false,
            child: Child::default(),
        }
    }

    /// Replaces the configuration file in place (a plain write).
    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.config, toml).unwrap();
    }

    /// Replaces the configuration file the way editors do: write a temporary
    /// file beside it and rename it over.
    pub fn rename_config_over(&self, toml: &str) {
        let tmp = self.dir.join(".services.toml.swp");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// `http://addr` of the node, for typed plugin clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A plaintext channel to the node.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

impl NodeHostBuilder {
    /// No `--registry` flag: the file (or the node's default) says where.
    pub fn no_registry_flag(mut self) -> Self {
        self.registry = None;
        self
    }

    /// `--advertise IP` instead of 127.0.0.1; `None`: no flag, the node
    /// picks its address.
    pub fn advertise(mut self, ip: Option<&str>) -> Self {
        self.advertise = ip.map(str::to_owned);
        self
    }

    /// `--http 127.0.0.1:0`, unless the file sets `http`;
    /// [`NodeHost::http`] says where.
    pub fn http(mut self) -> Self {
        self.http = true;
        self
    }

    /// More flags (an `--advertise` among them replaces the default one).
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        for arg in args {
            let arg = arg.as_ref();
            if arg == "--advertise" {
                self.advertise = None;
            }
            self.child.args.push(arg.to_owned());
        }
        self
    }

    child_methods!("node-host");

    /// Writes the file, starts the node and waits as told.
    pub fn start(mut self) -> NodeHost {
        let dir = TempDir::new("node-host");
        let config = dir.join("services.toml");
        std::fs::write(&config, &self.toml).unwrap();
        let mut cmd = self.child.command("node-host");
        cmd.arg("--config").arg(&config);
        if let Some(registry) = &self.registry {
            cmd.arg("--registry").arg(registry);
        }
        if let Some(ip) = &self.advertise {
            cmd.arg("--advertise").arg(ip);
        }
        let in_file = self.toml.lines().any(|line| {
            let line = line.trim_start();
            line.starts_with("http ") || line.starts_with("http=")
        });
        let http = self.http && !in_file;
        if http {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        self.child.finish(&mut cmd);
        let process = Process::spawn("node-host", cmd);
        let http = self
            .http
            .then(|| addr_from_line(&process.wait_for_line("node-host http on", READY_TIMEOUT)));
        let addr = addr_from_line(&process.wait_for_line("node-host serving on", READY_TIMEOUT));
        NodeHost {
            process,
            addr,
            http,
            config,
            dir,
        }
    }
}
