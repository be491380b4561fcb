//! Starting the systems under test: our binaries (found next to the bench's
//! own executable, as `testkit` does), and `etcd` and `rnacos`, each on a
//! scratch data directory and free loopback ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::Process;

use crate::backend::{Backend, System};

/// The workspace binaries the bench starts.
pub const OUR_BINARIES: [(&str, &str); 2] = [("registry", "registry"), ("node-host", "node-host")];

/// Directory of the running executable: cargo puts every binary of a
/// profile side by side there.
fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the bench executable")?;
    let dir = exe
        .parent()
        .context("the bench executable has no directory")?
        .to_path_buf();
    // Under `cargo test` the executable sits one level deeper, in deps/.
    Ok(if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    })
}

/// Makes sure `registry` and `node-host` exist next to the bench, built by the
/// same profile, by running `cargo build` for them when the workspace is at
/// hand (a no-op when they are fresh). Without cargo, binaries already there
/// are used as they are.
pub fn ensure_binaries(skip_build: bool) -> Result<()> {
    let dir = exe_dir()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profile_dir = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // cargo names the dev profile's directory "debug".
    let profile = if profile_dir == "debug" {
        "dev"
    } else {
        profile_dir
    };
    if !skip_build && workspace.join("Cargo.toml").exists() && !profile.is_empty() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = dir.parent().context("no target directory")?;
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace)
            .env("CARGO_TARGET_DIR", target_dir)
            .args(["build", "--quiet", "--profile", profile]);
        for (package, bin) in OUR_BINARIES {
            cmd.args(["-p", package, "--bin", bin]);
        }
        tracing::info!("building the binaries under test: {cmd:?}");
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::warn!("cargo build of the binaries under test failed ({s})"),
            Err(e) => tracing::warn!("cannot run cargo ({e}); using the binaries as they are"),
        }
    }
    for (_, bin) in OUR_BINARIES {
        let path = dir.join(bin);
        if !path.exists() {
            bail!(
                "{} not found: build it with `cargo build --release --workspace` \
                 (or run the bench through `cargo run --release -p bench`)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Two distinct free TCP ports on loopback (free when we looked; the OS could
/// hand one out again before the child binds it, which is unlikely enough
/// for a bench). Both listeners are held until both ports are known, so the
/// two cannot be the same.
pub fn free_ports() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// Resident memory of a process in bytes, from /proc/<pid>/status (VmRSS).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_vm_rss(&status).context("no VmRSS line in /proc/<pid>/status")
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `RUST_LOG` of our children: quiet unless the user asked otherwise
/// (`BENCH_CHILD_LOG`), because testkit echoes every child line to stderr.
fn child_log() -> String {
    std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into())
}

/// The registry flags that lift its per-peer, per-lease and per-service
/// limits (0 = no limit): every registry the bench starts runs with them.
pub const NO_LIMITS: [&str; 6] = [
    "--max-registrations-per-sec-per-ip",
    "0",
    "--max-instances-per-lease",
    "0",
    "--max-instances-per-service",
    "0",
];

/// A running `registry`.
pub struct RegistryProc {
    /// The child; killed when dropped.
    pub process: Process,
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// `127.0.0.1:port`, for `--registry` flags.
    pub addr: String,
}

impl RegistryProc {
    /// Starts our registry (memory store) on a free loopback port and waits
    /// for its ready line.
    pub fn start() -> Result<RegistryProc> {
        // Said explicitly: testkit's launcher would put it over etcd when
        // TESTKIT_ETCD is set in the environment.
        RegistryProc::with_store("memory")
    }

    /// Starts our registry over the etcd whose client API is `etcd_url`
    /// (`http://127.0.0.1:PORT`), its keys under `prefix` (`/name`): the
    /// etcd store (`--store etcd://...`), on a free loopback port.
    pub fn over_etcd(etcd_url: &str, prefix: &str) -> Result<RegistryProc> {
        let endpoint = etcd_url
            .strip_prefix("http://")
            .with_context(|| format!("etcd URL {etcd_url} is not http://"))?;
        RegistryProc::with_store(&format!("etcd://{endpoint}{prefix}"))
    }

    fn with_store(store: &str) -> Result<RegistryProc> {
        // The registry's protective limits (registrations per second from one
        // IP, instances per lease and per service) exist to stop one machine
        // starving others; the bench is one machine measuring raw capacity,
        // so it lifts them (0 = no limit), as the registry's --help advises
        // for load tests.
        let registry = testkit::Registry::launch()
            .log(&child_log())
            .args(NO_LIMITS)
            .args([
                // Watch propagation goes up to 10 000 watchers on 100
                // connections: past the default 64 streams per connection and
                // the default watch memory (4096 streams at 512 KiB each).
                "--max-watches-per-connection",
                "0",
                "--watch-memory-bytes",
                "17179869184",
                "--store",
                store,
            ])
            .start();
        let addr = registry.addr.to_string();
        Ok(RegistryProc {
            process: registry.process,
            url: format!("http://{addr}"),
            addr,
        })
    }
}

/// A running `node-host` serving the calculator plugin.
pub struct NodeHostProc {
    /// The child; killed when dropped.
    pub process: Process,
    /// Where it serves, `ip:port`.
    pub addr: String,
    /// Keeps its config file alive.
    _config: testkit::TempDir,
}

impl NodeHostProc {
    /// Starts a node host with only the calculator mounted, registered with
    /// the registry at `registry` (`ip:port`).
    pub fn start(registry: &str) -> Result<NodeHostProc> {
        // Everything in the file, so the flags the bench relies on are only
        // `--config`; the loopback address keeps the measure off the LAN.
        let toml = format!(
            "registry = \"{registry}\"\nadvertise = \"127.0.0.1\"\nport = 0\n\n\
             [plugins.calculator]\nweight = 1\n\n[plugins.echo]\nenabled = false\n"
        );
        let node = testkit::NodeHost::launch(registry, &toml)
            .no_registry_flag()
            .advertise(None)
            .log(&child_log())
            .start();
        Ok(NodeHostProc {
            addr: node.addr.to_string(),
            process: node.process,
            _config: node.dir,
        })
    }
}

pub use testkit::TempDir;

/// A running single-member etcd.
pub struct EtcdProc {
    /// The child; killed when dropped.
    pub process: Process,
    /// `http://127.0.0.1:port` of its client API.
    pub url: String,
    /// Its data directory, removed after the child is killed (field order).
    _data: TempDir,
}

/// Finds `etcd`: the given path, or the first `etcd` on PATH.
pub fn find_etcd(explicit: Option<&Path>) -> Option<PathBuf> {
    find_program("etcd", explicit)
}

/// Finds program `name`: the given path, or the first `name` on PATH.
pub fn find_program(name: &str, explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.exists().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl EtcdProc {
    /// Starts etcd with its data in a fresh directory under `data_base`, on
    /// free loopback ports, and waits until it answers a read.
    pub async fn start(bin: &Path, data_base: &Path) -> Result<EtcdProc> {
        let data = TempDir::new_in(data_base, "etcd");
        let (client_port, peer_port) = free_ports()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(bin);
        cmd.arg("--name=bench")
            .arg(format!("--data-dir={}", data.path().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=bench={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn");
        let mut process = Process::spawn("etcd", cmd);
        wait_answering(
            &mut process,
            "etcd",
            System::Etcd,
            &client,
            Duration::from_secs(20),
            Duration::from_millis(50),
        )
        .await?;
        Ok(EtcdProc {
            process,
            url: client,
            _data: data,
        })
    }
}

/// A running r-nacos with its defaults, but its ports and data directory.
pub struct RnacosProc {
    /// The child; killed when dropped.
    pub process: Process,
    /// `http://127.0.0.1:port` of its gRPC port (the Nacos 2.x protocol).
    pub url: String,
    /// Its data directory, removed after the child is killed (field order).
    _data: TempDir,
}

impl RnacosProc {
    /// Starts `rnacos` with its data in a fresh directory under `data_base`,
    /// on free loopback ports, and waits until it answers a query on a
    /// Nacos connection.
    pub async fn start(bin: &Path, data_base: &Path) -> Result<RnacosProc> {
        let data = TempDir::new_in(data_base, "rnacos");
        // Its HTTP, gRPC and console ports, all held until all are known.
        let held: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()?;
        drop(held);
        let mut cmd = Command::new(bin);
        cmd.env("RUST_LOG", child_log());
        // r-nacos reads a `.env` file from its working directory: the
        // scratch directory has none.
        cmd.current_dir(data.path())
            .env("RNACOS_HTTP_PORT", ports[0].to_string())
            .env("RNACOS_GRPC_PORT", ports[1].to_string())
            .env("RNACOS_HTTP_CONSOLE_PORT", ports[2].to_string())
            .env("RNACOS_SDK_HOST", "127.0.0.1")
            .env("RNACOS_CONSOLE_HOST", "127.0.0.1")
            .env("RNACOS_DATA_DIR", data.path())
            .env("RNACOS_CONFIG_DB_DIR", data.path());
        let mut process = Process::spawn("rnacos", cmd);
        let url = format!("http://127.0.0.1:{}", ports[1]);
        wait_answering(
            &mut process,
            "rnacos",
            System::Rnacos,
            &url,
            Duration::from_secs(30),
            Duration::from_millis(100),
        )
        .await?;
        Ok(RnacosProc {
            process,
            url,
            _data: data,
        })
    }
}

/// Polls `system` at `url` (a resolve of `probe`) every `poll` until it
/// answers, for at most `within`; fails at once if `process` (`name`) exits.
async fn wait_answering(
    process: &mut Process,
    name: &str,
    system: System,
    url: &str,
    within: Duration,
    poll: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if !process.is_running() {
            bail!("{name} exited at start; its output is above");
        }
        if let Ok(mut b) = Backend::connect(system, url).await
            && b.resolve("probe").await.is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} did not answer within {} s", within.as_secs());
        }
        tokio::time::sleep(poll).await;
    }
}

/// The first line `bin --version` prints, `None` when it cannot run.
fn version_line(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

/// `etcd 3.4.23`, from `etcd --version`.
pub fn etcd_version(bin: &Path) -> String {
    version_line(bin)
        .map(|l| l.replace("etcd Version:", "etcd").trim().to_string())
        .unwrap_or_else(|| "etcd (unknown version)".into())
}

/// `rnacos 0.8.8`, from `rnacos --version`.
pub fn rnacos_version(bin: &Path) -> String {
    version_line(bin)
        .map(|l| l.trim().replace("rnacos", "r-nacos"))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "r-nacos (unknown version)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tregistry\nVmPeak:\t  2000 kB\nVmRSS:\t  1234 kB\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn own_rss_is_readable() {
        let rss = rss_bytes(std::process::id()).unwrap_or(0);
        assert!(rss > 0);
    }

    #[test]
    fn temp_dirs_are_removed() {
        let path = {
            let d = TempDir::new("test");
            assert!(d.path().is_dir());
            d.path().to_path_buf()
        };
        assert!(!path.exists());
    }
}
