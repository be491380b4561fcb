//! Test support shared by every crate's integration tests and the benchmarks.
//!
//! Tests drive the real binaries over real sockets. This crate finds those
//! binaries, starts them, reads what they print, and kills them when the test
//! ends, whether it passes, fails or panics.
//!
//! # Layout
//! - [`bin_path`]: where cargo put a workspace binary.
//! - [`Process`]: a running child whose output is captured line by line.
//! - [`Registry`], [`NodeHost`] (`launch.rs`): the one way tests and the
//!   bench start `registry` and `node-host`, with a clean environment
//!   ([`command`]) and their files in a [`TempDir`].
//! - [`calls`]: the registry calls every crate's tests make (Resolve,
//!   Watch), for a client with or without a token.
//! - [`certs`]: a CA and certificates made at run time for TLS tests.
//! - [`http`]: a minimal HTTP client (`/metrics`, Prometheus' API, event
//!   streams).
//! - [`xds`]: xDS requests as gRPC's own clients send them.
//! - [`netns`]: a LAN of network namespaces (one per host) for multi-host
//!   tests, a second LAN plugged into some of its hosts, and an etcd
//!   cluster with one member per host.
//! - [`python3`], [`workspace_root`]: third-party programs the tests drive
//!   (installed by `scripts/test-deps.sh`).
//!
//! # Contract with the binaries
//! Each binary prints one line on stdout once it is ready, which tests wait for:
//! - `registry listening on <ip>:<port>`
//! - `node-host serving on <advertised-ip>:<port>`
//!
//! With `--http`, each prints `registry http on <ip>:<port>` /
//! `node-host http on <ip>:<port>` before that.

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

pub mod calls;
pub mod certs;
pub mod etcd;
pub mod http;
mod launch;
pub mod netns;
pub mod xds;

pub use launch::{
    BINARY_ENV, NodeHost, NodeHostBuilder, Registry, RegistryBuilder, TempDir, command,
};

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Path of a binary of this workspace (`registry`, `node-host`, `client`, ...),
/// built by the same `cargo test` / `cargo build` as the running test.
///
/// Test executables live in `target/<profile>/deps/`; binaries one level up.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {} not found: run `cargo build --workspace --bins` (cargo test --workspace builds it too)",
        path.display()
    );
    path
}

/// The workspace's top directory (where `Cargo.toml` of the workspace is).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits one level below the workspace root")
        .to_path_buf()
}

/// The Python interpreter of the test virtualenv (`.venv`, with grpcio,
/// grpcio-health-checking, grpcio-reflection, grpcio-tools and selenium).
///
/// Panics with the command to run when it is missing: a test that needs it
/// fails and says why, it never passes without running.
pub fn python3() -> PathBuf {
    let path = workspace_root().join(".venv/bin/python3");
    assert!(
        path.exists(),
        "{} not found: run scripts/test-deps.sh first (it makes the Python virtualenv the tests use)",
        path.display()
    );
    path
}

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    closed_streams: u8,
}

/// A child process whose stdout and stderr are captured line by line (and
/// echoed to the test's stderr with a prefix, so a failing test shows them).
/// Killed with SIGKILL when dropped.
pub struct Process {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<(Mutex<Output>, Condvar)>,
}

impl Process {
    /// Starts `cmd` with piped stdin/stdout/stderr.
    pub fn spawn(name: &str, mut cmd: Command) -> Process {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, tag) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, "out"),
            (Box::new(stderr), "err"),
        ] {
            let output = output.clone();
            let prefix = format!("[{name} {tag}]");
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{prefix} {line}");
                    let (lock, cvar) = &*output;
                    lock.lock().unwrap().lines.push(line);
                    cvar.notify_all();
                }
                let (lock, cvar) = &*output;
                lock.lock().unwrap().closed_streams += 1;
                cvar.notify_all();
            });
        }
        Process {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            output,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line containing `needle` has been printed (on stdout or
    /// stderr) and returns it. Panics after `timeout`, showing what was printed.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_line_after(0, needle, timeout).1
    }

    /// Like [`wait_for_line`](Self::wait_for_line) but only looks at lines from
    /// index `from` on; returns the index after the match and the line.
    pub fn wait_for_line_after(
        &self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some((i, line)) = out
                .lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
            {
                return (i + 1, line.clone());
            }
            let now = Instant::now();
            if now >= deadline || out.closed_streams == 2 {
                panic!(
                    "{}: no line containing {needle:?} within {timeout:?}; it printed:\n{}",
                    self.name,
                    out.lines.join("\n")
                );
            }
            out = cvar.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// How many lines have been printed so far (a cursor for
    /// [`wait_for_line_after`](Self::wait_for_line_after)).
    pub fn line_count(&self) -> usize {
        self.output.0.lock().unwrap().lines.len()
    }

    /// Everything printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.output.0.lock().unwrap().lines.clone()
    }

    /// Writes one line to the process's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends a signal by number (e.g. 15 for SIGTERM, 2 for SIGINT).
    pub fn signal(&self, signal: i32) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "kill -{signal} {} failed",
            self.child.id()
        );
    }

    /// SIGKILL, then reaps the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion (e.g. `client list`) and returns its exit
/// status, stdout and stderr.
pub fn run(cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    run_with_stdin(cmd, None, timeout)
}

/// [`run`], writing `input` (if any) to the command's stdin, then closing it.
pub fn run_with_stdin(
    mut cmd: Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> (ExitStatus, String, String) {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write as _;
        // A child that exits without reading it all is not this helper's
        // failure: its status and output say what happened.
        let _ = stdin.write_all(input);
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "[run {cmd:?}] exit {:?}\n--stdout--\n{stdout}--stderr--\n{stderr}",
        out.status
    );
    (out.status, stdout, stderr)
}

/// Parses the address out of a ready line such as
/// `registry listening on 127.0.0.1:40123`.
pub fn addr_from_line(line: &str) -> SocketAddr {
    let word = line
        .split_whitespace()
        .last()
        .unwrap_or_else(|| panic!("empty ready line"));
    word.parse()
        .unwrap_or_else(|e| panic!("no address at the end of {line:?}: {e}"))
}

/// How long tests wait for a process to become ready. Generous: CI machines
/// are small and may be busy compiling.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `timeout` with `what` in the message. For conditions that become true
/// asynchronously (an instance appearing in the registry, say).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Feeds every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
/// to `check`, the same function the fuzz target calls, so `cargo test`
/// re-checks every input the fuzzer ever kept. Panics if the corpus is empty
/// (a moved directory must not turn the replay into a no-op).
pub fn replay_fuzz_corpus(target: &str, check: impl Fn(&[u8])) {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let files = |dir: PathBuf| -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    };
    let corpus = files(fuzz.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "empty fuzz corpus for {target} in {}",
        fuzz.display()
    );
    for path in corpus
        .iter()
        .chain(&files(fuzz.join("regressions").join(target)))
    {
        // A panic names the input: replay it with
        // `cargo fuzz run -s none <target> <file>` in fuzz/.
        eprintln!("{}", path.display());
        check(&std::fs::read(path).unwrap());
    }
}

/// An encoded `FileDescriptorSet` of one file in package `p` defining one
/// service, `name`, without methods: the least a Register can carry to name
/// its service's proto (validation tests).
pub fn descriptors_defining(name: &str) -> Vec<u8> {
    descriptors_with_syntax(name, "proto3")
}

/// [`descriptors_defining`] with the file's `syntax` set to `syntax`.
pub fn descriptors_with_syntax(name: &str, syntax: &str) -> Vec<u8> {
    use prost::Message;
    use prost_types::{FileDescriptorProto, FileDescriptorSet, ServiceDescriptorProto};
    FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("p.proto".into()),
            package: Some("p".into()),
            syntax: Some(syntax.into()),
            service: vec![ServiceDescriptorProto {
                name: Some(name.into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}
