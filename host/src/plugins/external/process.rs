//! One run of an external plugin's program: start it, copy its output into
//! the node's log, keep the last lines of its stderr, stop it.
//!
//! The program runs in its own process group (so a Ctrl-C typed at the
//! node's terminal reaches the node, which then stops its plugins in order,
//! not the plugins directly), in the configuration file's directory, with
//! `PLUGIN_LISTEN` set and its stdin a pipe from the node.
//!
//! No plugin outlives its node, even one killed with SIGKILL:
//! - it is started through util-linux's `setpriv --pdeathsig KILL`, so the
//!   kernel kills it when the node dies (`PR_SET_PDEATHSIG`; setting it
//!   directly would need `unsafe` code between fork and exec, which this
//!   workspace forbids). The parent of record is the thread that spawned
//!   it: tokio's worker threads, which live as long as the node;
//! - its stdin reaches end-of-file when the node dies, for a plugin that
//!   watches it (the contract asks plugins to exit then; it also covers a
//!   machine without `setpriv`, where the node warns once).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tracing::{info, warn};

use crate::config::{ExternalSpec, PLUGIN_LISTEN};

/// Lines of a plugin's stderr kept for error messages (the last ones).
pub const STDERR_TAIL_LINES: usize = 20;
/// How long an exited plugin's last stderr lines are waited for.
pub const STDERR_DRAIN: Duration = Duration::from_millis(250);
/// Bytes of one output line copied to the log and kept; the rest of a
/// longer line is dropped (a plugin cannot make the node buffer a line
/// without end).
pub const MAX_LINE_BYTES: usize = 2048;

/// The last lines a plugin wrote to stderr, at most [`STDERR_TAIL_LINES`]
/// of at most [`MAX_LINE_BYTES`] each.
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == STDERR_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect()
    }

    /// For an error message: `; its last stderr lines: a | b`, or nothing.
    pub fn describe(&self) -> String {
        let lines = self.lines();
        if lines.is_empty() {
            "; it wrote nothing to stderr".to_string()
        } else {
            format!("; its last stderr lines: {}", lines.join(" | "))
        }
    }
}

/// A running plugin program.
pub struct Running {
    /// The process.
    child: Child,
    /// Its pid (also its process group's id).
    pub pid: u32,
    /// The end of its stdin: dropped, the plugin sees end-of-file.
    stdin: Option<ChildStdin>,
    /// Its recent stderr.
    tail: Tail,
    /// The task copying its stderr, which ends at end-of-file.
    stderr: Option<tokio::task::JoinHandle<()>>,
}

/// Whether `setpriv --pdeathsig` can be used here (checked once).
fn have_setpriv() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        let found = find_in_path("setpriv").is_some();
        if !found {
            warn!(
                "setpriv (util-linux) not found: external plugins that do not exit when their stdin closes would outlive a node-host killed with SIGKILL"
            );
        }
        found
    })
}

/// `program` looked up in `PATH`, as a shell would.
fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The program to run: a name without `/` is looked up in `PATH`, a
/// relative path is relative to the configuration file's directory.
fn resolve(program: &str, dir: &Path) -> Result<PathBuf, String> {
    if program.contains('/') {
        // Absolute: the program starts in `dir`, which may itself be relative.
        let path = std::path::absolute(dir.join(program)).unwrap_or_else(|_| dir.join(program));
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("program `{}` not found", path.display()))
        }
    } else {
        find_in_path(program).ok_or_else(|| format!("program `{program}` not found in PATH"))
    }
}

impl Running {
    /// Starts `spec` for plugin `name`, told to serve on `listen`.
    pub fn start(name: &str, spec: &ExternalSpec, listen: &str) -> Result<Running, String> {
        let first = spec.command.first().map(String::as_str).unwrap_or_default();
        let program = resolve(first, &spec.dir)?;
        let mut cmd = if have_setpriv() {
            let mut cmd = Command::new("setpriv");
            cmd.arg("--pdeathsig").arg("KILL").arg("--").arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        cmd.args(spec.command.iter().skip(1))
            .envs(&spec.env)
            .env(PLUGIN_LISTEN, listen)
            .current_dir(&spec.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", program.display()))?;
        let pid = child.id().unwrap_or_default();
        let tail = Tail::default();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(copy_lines(name.to_string(), out, None));
        }
        let stderr = child
            .stderr
            .take()
            .map(|err| tokio::spawn(copy_lines(name.to_string(), err, Some(tail.clone()))));
        Ok(Running {
            stdin: child.stdin.take(),
            child,
            pid,
            tail,
            stderr,
        })
    }

    /// Once it exited: `; its last stderr lines: ...`, after reading what
    /// is still in the pipe (at most [`STDERR_DRAIN`]: a child of the
    /// plugin may hold the pipe open).
    pub async fn last_stderr(&mut self) -> String {
        if let Some(task) = self.stderr.take() {
            let _ = tokio::time::timeout(STDERR_DRAIN, task).await;
        }
        self.tail.describe()
    }

    /// Waits for the process to exit (cancel safe).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Stops it: closes its stdin and sends its process group SIGTERM,
    /// then SIGKILL if it is still there after `grace`. Returns how it
    /// ended.
    pub async fn stop(&mut self, grace: Duration) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return describe_exit(status);
        }
        self.stdin = None;
        let group = Pid::from_raw(i32::try_from(self.pid).unwrap_or(0));
        let _ = killpg(group, Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => describe_exit(status),
            _ => {
                let _ = killpg(group, Signal::SIGKILL);
                let _ = self.child.kill().await;
                format!("killed with SIGKILL after a {grace:?} grace period")
            }
        }
    }
}

/// An exit status in words.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("was killed by {s}"),
            Err(_) => format!("was killed by signal {signal}"),
        },
        _ => format!("ended ({status})"),
    }
}

/// Copies `stream` to the log line by line, as `plugin NAME: line`, keeping
/// the lines in `tail` too when given. Lines are cut at [`MAX_LINE_BYTES`].
async fn copy_lines(name: String, stream: impl AsyncRead + Unpin, tail: Option<Tail>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_bounded_line(&mut reader, &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        info!("plugin {name}: {text}");
        if let Some(tail) = &tail {
            tail.push(text.to_string());
        }
    }
}

/// Reads one line into `line`, keeping at most [`MAX_LINE_BYTES`] of it
/// and skipping the rest. Returns the bytes read (0 at end of stream).
async fn read_bounded_line(
    reader: &mut (impl AsyncBufReadExt + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut read = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(read);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        reader.consume(used);
        read += used;
        if done {
            return Ok(read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let tail = Tail::default();
        assert_eq!(tail.describe(), "; it wrote nothing to stderr");
        for i in 0..100 {
            tail.push(format!("line {i}"));
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), STDERR_TAIL_LINES);
        assert_eq!(lines[0], "line 80");
        assert_eq!(lines[STDERR_TAIL_LINES - 1], "line 99");
    }

    #[tokio::test]
    async fn a_long_line_is_cut_and_the_next_one_read_whole() {
        let mut input = vec![b'x'; MAX_LINE_BYTES * 3];
        input.extend_from_slice(b"\nshort\n");
        let mut reader = BufReader::with_capacity(64, input.as_slice());
        let mut line = Vec::new();
        let n = read_bounded_line(&mut reader, &mut line).await.unwrap_or(0);
        assert_eq!(n, MAX_LINE_BYTES * 3 + 1);
        assert_eq!(line.len(), MAX_LINE_BYTES);
        line.clear();
        read_bounded_line(&mut reader, &mut line).await.unwrap_or(0);
        assert_eq!(line, b"short\n");
    }
}
