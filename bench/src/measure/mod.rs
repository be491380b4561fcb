//! The six measures of issue 7, one file each, and what they share: the
//! running systems and a closed-loop load generator.

pub mod failure;
pub mod generic;
pub mod heartbeat;
pub mod register;
pub mod resolve;
pub mod scale;
pub mod watch;
pub mod xds;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::task::JoinSet;

use crate::Config;
use crate::backend::System;
use crate::procs::{EtcdProc, RegistryProc, RnacosProc};
use crate::report::{Better, Figure};
use crate::stats::Load;

/// The systems under test, shared by the measures (the scale measure starts
/// fresh ones, so memory figures start from an empty process).
pub struct Ctx {
    /// Counts and durations.
    pub cfg: Config,
    /// Our registry.
    pub ours: RegistryProc,
    /// Our registry over `etcd` (`--store etcd://...`), started afresh for
    /// each measure under a prefix of its own ([`Ctx::fresh_etcd_store`]).
    /// Before `etcd`, so it is killed first (fields drop in order).
    pub etcd_store: Option<RegistryProc>,
    /// etcd, when installed and not disabled.
    pub etcd: Option<EtcdProc>,
    /// The etcd binary, to start fresh ones.
    pub etcd_bin: Option<PathBuf>,
    /// Where etcd data directories go.
    pub etcd_data: PathBuf,
    /// r-nacos, when installed and not disabled.
    pub rnacos: Option<RnacosProc>,
    /// The rnacos binary, to start fresh ones.
    pub rnacos_bin: Option<PathBuf>,
    /// Where r-nacos data directories go.
    pub rnacos_data: PathBuf,
}

impl Ctx {
    /// Starts our registry and, when their binaries are given, etcd and
    /// r-nacos.
    pub async fn new(
        cfg: Config,
        etcd_bin: Option<PathBuf>,
        etcd_data: PathBuf,
        rnacos_bin: Option<PathBuf>,
        rnacos_data: PathBuf,
    ) -> Result<Ctx> {
        let ours = RegistryProc::start()?;
        let etcd = match &etcd_bin {
            Some(bin) => Some(EtcdProc::start(bin, &etcd_data).await?),
            None => None,
        };
        let rnacos = match &rnacos_bin {
            Some(bin) => Some(RnacosProc::start(bin, &rnacos_data).await?),
            None => None,
        };
        Ok(Ctx {
            cfg,
            ours,
            etcd,
            etcd_store: None,
            etcd_bin,
            etcd_data,
            rnacos,
            rnacos_bin,
            rnacos_data,
        })
    }

    /// Replaces our registry over etcd by a new one whose keys are under a
    /// prefix no earlier measure used (`/bench-<measure>-<n>`), so every
    /// measure starts from an empty state, as on the memory store. Without
    /// etcd, or with `running` false (a measure that does not use it, and
    /// the scale measure, which stops etcd), none runs.
    pub fn fresh_etcd_store(&mut self, measure: &str, running: bool) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        self.etcd_store = None;
        if let (true, Some(etcd)) = (running, &self.etcd) {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let prefix = format!("/bench-{measure}-{n}");
            tracing::info!("etcd-store: our registry over etcd under {prefix}");
            self.etcd_store = Some(RegistryProc::over_etcd(&etcd.url, &prefix)?);
        }
        Ok(())
    }

    /// Each running system with its URL: ours first, then etcd and our
    /// registry over it.
    pub fn systems(&self) -> Vec<(System, String)> {
        let mut v = vec![(System::Ours, self.ours.url.clone())];
        if let Some(e) = &self.etcd {
            v.push((System::Etcd, e.url.clone()));
        }
        if let Some(s) = &self.etcd_store {
            v.push((System::EtcdStore, s.url.clone()));
        }
        if let Some(r) = &self.rnacos {
            v.push((System::Rnacos, r.url.clone()));
        }
        v
    }

    /// `f` with etcd-store's column (`value`, and its ratio to etcd's, the
    /// reference: call after `vs("etcd", ..)`) when etcd takes part in
    /// this run.
    pub fn etcd_store_column(&self, f: Figure, value: Option<f64>) -> Figure {
        if self.etcd_bin.is_some() {
            f.and_over_reference(System::EtcdStore.name(), value)
        } else {
            f
        }
    }

    /// `f` with r-nacos's column (`value`, and our ratio to it) when r-nacos
    /// takes part in this run.
    pub fn rnacos_column(&self, f: Figure, value: Option<f64>) -> Figure {
        if self.rnacos_bin.is_some() {
            f.and(System::Rnacos.name(), value)
        } else {
            f
        }
    }

    /// Figure `name` of `group` with a column for each system taking part:
    /// `value` of ours, of etcd (the reference), then of etcd-store and
    /// r-nacos as [`Ctx::etcd_store_column`] and [`Ctx::rnacos_column`] add
    /// them.
    pub fn figure(
        &self,
        group: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        better: Better,
        value: impl Fn(System) -> Option<f64>,
    ) -> Figure {
        let f = Figure::new(group, name, unit, better, value(System::Ours))
            .vs("etcd", value(System::Etcd));
        let f = self.etcd_store_column(f, value(System::EtcdStore));
        self.rnacos_column(f, value(System::Rnacos))
    }

    /// `f` with r-nacos's column saying it has no equivalent, and why, when
    /// r-nacos takes part in this run.
    pub fn rnacos_none(&self, f: Figure, why: &str) -> Figure {
        if self.rnacos_bin.is_some() {
            f.none_for(System::Rnacos.name(), why)
        } else {
            f
        }
    }
}

/// Adds one timed operation's outcome to `load` (the first failure is
/// logged; later ones are only counted).
pub fn record(load: &mut Load, started: Instant, result: Result<()>) {
    match result {
        Ok(()) => {
            load.ops += 1;
            load.latencies.push(started.elapsed());
        }
        Err(e) => {
            if load.errors == 0 {
                tracing::warn!("operation failed: {e:#}");
            }
            load.errors += 1;
        }
    }
}

/// Runs one task per element of `states` for `duration`, each calling `op`
/// back to back (a closed loop: a client sends its next request when the
/// previous one is answered), and adds up what they did. `op` takes the
/// client's state and its sequence number and hands the state back with the
/// result, so its future can be `'static`.
pub async fn closed_loop<S, F, Fut>(states: Vec<S>, duration: Duration, op: F) -> Load
where
    S: Send + 'static,
    F: Fn(S, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (S, Result<()>)> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for mut state in states {
        let op = op.clone();
        tasks.spawn(async move {
            let mut load = Load::default();
            let mut n = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                let (s, r) = op(state, n).await;
                state = s;
                n += 1;
                record(&mut load, t, r);
            }
            load
        });
    }
    let mut total = Load::default();
    while let Some(r) = tasks.join_next().await {
        if let Ok(load) = r {
            total.ops += load.ops;
            total.errors += load.errors;
            total.latencies.extend(load.latencies);
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// A note for a figure whose load saw errors.
pub fn error_note(load: &Load) -> String {
    if load.errors == 0 {
        String::new()
    } else {
        format!("{} operations failed", load.errors)
    }
}

/// `Some(value)` of a system in a per-system result list.
pub fn of<T: Copy>(results: &[(System, T)], system: System) -> Option<T> {
    results.iter().find(|(s, _)| *s == system).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_loop_counts_successes_and_errors() {
        let load = closed_loop(
            vec![0u32, 1u32],
            Duration::from_millis(50),
            |s, n| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let r = if n % 2 == 0 {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("odd"))
                };
                (s, r)
            },
        )
        .await;
        assert!(load.ops > 0 && load.errors > 0);
        assert_eq!(load.latencies.len() as u64, load.ops);
        assert!(load.elapsed >= Duration::from_millis(50));
    }
}
