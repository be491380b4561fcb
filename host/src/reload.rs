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
//! deregistered.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

use crate::config::Config;
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

/// Loads `path` and applies it, or reports why not. The file is read with
/// the configuration in force locked, so concurrent reloads (the watcher's,
/// and the one at start) apply one after the other, each from the last.
pub async fn reload(path: &Path, node: &Node, known: &[&str]) {
    node.update(|current| match Config::load(path, known, Some(current)) {
        Err(e) => {
            error!("{e}; keeping the last good configuration");
            None
        }
        Ok(new) if new == *current => {
            debug!("{} changed on disk, same configuration", path.display());
            None
        }
        Ok(new) => {
            info!("{} reloaded: {new}", path.display());
            Some(new)
        }
    })
    .await;
}
