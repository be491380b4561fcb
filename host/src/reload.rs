//! Hot reload: watch the configuration file and apply its changes.
//!
//! The watch is on the file's PARENT directory, filtered by file name:
//! editors and `sed -i` replace a file by writing a temporary one and
//! renaming it over the original, which a watch on the file itself (its old
//! inode) would miss. Any event except a mere access counts; events are
//! debounced, because one save is often several events.
//!
//! A file that does not parse is reported (`file:line: problem`) and
//! ignored: the last good configuration stays in force, nothing is
//! deregistered. So is a file that is no regular file (a FIFO, a device, a
//! directory) or is too large ([`crate::config::read_text`]).
//!
//! The file is read on a blocking thread, with no lock held: whatever the
//! file system does, heartbeats, calls, commands and SIGTERM go on. Reads
//! are numbered, and one that finishes after a newer read was applied is
//! dropped, so a slow read can never undo a newer edit.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

use crate::config::{Config, ConfigError, read_text};
use crate::node::Node;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(120);

/// Why the watch could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {dir}: {source}")]
pub struct WatchError {
    /// The directory that was to be watched.
    dir: String,
    /// What notify said.
    #[source]
    source: notify::Error,
}

/// A running watch. Dropping it stops watching.
pub struct ConfigWatcher {
    /// Keeps the OS watch alive.
    _watcher: RecommendedWatcher,
    /// The reload task.
    task: JoinHandle<()>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `path`; every change is loaded and applied to `node`.
pub fn spawn(
    path: PathBuf,
    node: Arc<Node>,
    known: Vec<&'static str>,
) -> Result<ConfigWatcher, WatchError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name: OsString = path.file_name().map(OsString::from).unwrap_or_default();

    // notify calls back on its own thread; an unbounded channel never blocks
    // it, and the debounce below collapses bursts.
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // A watch error or a rescan request (e.g. the inotify queue
        // overflowed) names no path but may hide a change to the file: read
        // it again (a no-op when unchanged).
        let event = match event {
            Ok(event) if !event.need_rescan() => event,
            _ => {
                let _ = tx.send(());
                return;
            }
        };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = tx.send(());
        }
    })
    .map_err(|source| WatchError {
        dir: dir.display().to_string(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError {
            dir: dir.display().to_string(),
            source,
        })?;

    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait until the events stop for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            reload(&path, &node, &known).await;
        }
    });
    Ok(ConfigWatcher {
        _watcher: watcher,
        task,
    })
}

/// Reads `path` on a blocking thread (see [`read_text`]).
pub async fn read(path: &Path) -> Result<String, ConfigError> {
    let owned = path.to_path_buf();
    match tokio::task::spawn_blocking(move || read_text(&owned)).await {
        Ok(result) => result,
        Err(e) => Err(ConfigError {
            file: path.display().to_string(),
            line: None,
            problem: format!("reading failed: {e}"),
        }),
    }
}

/// Loads `path` and applies it, or reports why not. The file is read first,
/// off the runtime and with no lock held; it is then parsed with the
/// configuration in force locked, so concurrent reloads (the watcher's, and
/// the one at start) apply one after the other, each from the last, and a
/// read older than one already handled is dropped.
pub async fn reload(path: &Path, node: &Node, known: &[&str]) {
    let reads = node.reads();
    let ticket = reads.start();
    let text = read(path).await;
    let file = path.display().to_string();
    node.update(|current| {
        // Under the configuration lock: no other reload is between this
        // check and the update.
        if reads.handle(ticket).is_err() {
            debug!("{file}: a newer read is already handled; dropping this one");
            return None;
        }
        match text.and_then(|text| Config::parse(&text, &file, known, Some(current))) {
            Err(e) => {
                crate::metrics::reload_refused(&e);
                error!("{e}; keeping the last good configuration");
                None
            }
            Ok(new) if new == *current => {
                debug!("{file} changed on disk, same configuration");
                None
            }
            Ok(new) => {
                crate::metrics::reload_applied();
                info!("{file} loaded: {new}");
                Some(new)
            }
        }
    })
    .await;
}
