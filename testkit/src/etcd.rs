//! A real single-member `etcd` for tests: free loopback ports, a scratch
//! data directory, killed (SIGKILL) when dropped. A test that needs it and
//! finds no `etcd` fails, naming the package that provides it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

use crate::{Process, READY_TIMEOUT, TempDir};

/// A running etcd. See the module docs.
pub struct Etcd {
    /// The process; killed when dropped (before `data` is removed: field
    /// order).
    pub process: Process,
    /// `127.0.0.1:PORT` of its client API.
    pub endpoint: String,
    /// Its data directory.
    data: TempDir,
    /// Its peer URL (kept for a restart on the same data).
    peer: String,
    /// Flags it was started with beyond the ports and the data directory.
    extra: Vec<String>,
}

/// The `etcd` binary: `$ETCD_BIN`, else the first `etcd` on `PATH`. Panics
/// with what to install when there is none.
pub fn etcd_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("etcd"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "this test needs etcd and there is no `etcd` on PATH (nor $ETCD_BIN): \
                 run scripts/test-deps.sh, or `apt-get install etcd-server`"
            )
        })
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until it serves clients.
    pub fn start() -> Etcd {
        Etcd::start_with(&[])
    }

    /// [`Etcd::start`] with more of etcd's flags (`--auth-token-ttl=1`).
    pub fn start_with(extra: &[&str]) -> Etcd {
        let data = TempDir::new("etcd");
        let endpoint = format!("127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let process = spawn(data.path(), &endpoint, &peer, &extra);
        Etcd {
            process,
            endpoint,
            data,
            peer,
            extra,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.endpoint)
    }

    /// The registry's `--store` for this etcd, its keys under `prefix`.
    pub fn store(&self, prefix: &str) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoint,
            prefix.trim_start_matches('/')
        )
    }

    /// SIGKILL, then the same member started again on its data and ports.
    pub fn restart(&mut self) {
        self.process.kill9();
        self.process = spawn(self.data.path(), &self.endpoint, &self.peer, &self.extra);
    }
}

fn spawn(data: &std::path::Path, endpoint: &str, peer: &str, extra: &[String]) -> Process {
    let client = format!("http://{endpoint}");
    let mut cmd = Command::new(etcd_bin());
    cmd.arg("--name=test")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=test={peer}"))
        .arg("--logger=zap")
        .arg("--log-level=info")
        .args(extra);
    let process = Process::spawn("etcd", cmd);
    // etcd 3.4's zap logger: "serving client traffic insecurely" (or "securely").
    process.wait_for_line("serving client traffic", READY_TIMEOUT);
    process
}

/// `TESTKIT_ETCD=HOST:PORT` runs every [`crate::Registry`] a test starts
/// over that etcd (each under a prefix of its own) instead of in memory, so
/// the registry's behavioural tests run against both stores
/// (`scripts/test.sh` runs them a second time so). A registry started with
/// its own `--store` keeps it.
pub fn store_hook(cmd: &mut Command, extra_args: &[std::ffi::OsString]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(endpoint) = std::env::var_os("TESTKIT_ETCD") else {
        return;
    };
    if extra_args
        .iter()
        .any(|a| a.to_string_lossy().starts_with("--store"))
    {
        return;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    cmd.arg("--store").arg(format!(
        "etcd://{}/t{}-{n}",
        endpoint.to_string_lossy(),
        std::process::id()
    ));
}

/// Whether the registries tests start run over etcd (`TESTKIT_ETCD`, see
/// [`store_hook`]). Revisions are then etcd's (`etcd_revision << 20 |
/// index`), not 1, 2, 3...: a test asserting the memory store's exact
/// numbering asserts it only without etcd (the order is checked either way).
pub fn under_test() -> bool {
    std::env::var_os("TESTKIT_ETCD").is_some()
}
