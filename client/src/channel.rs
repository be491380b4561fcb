//! A tonic [`Channel`] that follows the registry: for programs that have
//! generated stubs and only want discovery.
//!
//! The directory's snapshots are turned into `Change::Insert` / `Change::Remove`
//! for [`Channel::balance_channel`], diffing against what the channel already
//! has, so an update that changes nothing sends nothing. The channel balances
//! with tower's power of two choices and ignores weights; for weighted
//! policies use [`Caller`](crate::call::Caller).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use registry_client::{balanced_channel, Directory};
//! let directory = Directory::connect("127.0.0.1:50051")?;
//! directory.wait_synced(std::time::Duration::from_secs(3)).await?;
//! let channel = balanced_channel(&directory, "calculator");
//! // Any generated client works on it, e.g.
//! // CalculatorClient::new(channel).add(BinaryRequest { a: 1.0, b: 2.0 }).await?;
//! # let _ = channel; Ok(()) }
//! ```

use crate::directory::{Directory, address};
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::transport::channel::Change;

/// A channel balancing over the instances of `service`, kept up to date
/// from `directory` for as long as the channel lives. Must be called within
/// a tokio runtime.
///
/// Calls made while the service has no instance wait until one appears (or
/// until the request's own timeout).
pub fn balanced_channel(directory: &Directory, service: &str) -> Channel {
    let (channel, tx) = Channel::balance_channel::<String>(64);
    let directory = directory.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let mut snapshots = directory.snapshots();
        let mut active: BTreeSet<String> = BTreeSet::new();
        loop {
            let wanted: BTreeSet<String> = snapshots
                .borrow_and_update()
                .instances(&service)
                .iter()
                .map(address)
                .collect();
            for gone in active.difference(&wanted) {
                if tx.send(Change::Remove(gone.clone())).await.is_err() {
                    return;
                }
            }
            for new in wanted.difference(&active) {
                let endpoint = match directory.connector().endpoint(new) {
                    Ok(endpoint) => endpoint.connect_timeout(Duration::from_secs(1)),
                    Err(e) => {
                        tracing::warn!(address = %new, "skipping an instance: {e}");
                        continue;
                    }
                };
                if tx
                    .send(Change::Insert(new.clone(), endpoint))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            active = wanted;
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                // Every clone of the channel was dropped.
                () = tx.closed() => return,
            }
        }
    });
    channel
}
