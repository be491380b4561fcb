//! Limits an operator can tune, so one client cannot take the registry from
//! the others: instances per lease and per service (checked by the state),
//! Watch streams per connection and registrations per second per peer IP
//! (checked here, before a call reaches the state's lock).
//!
//! Every limit is a flag of the `registry` binary with a documented default;
//! `0` turns a limit off. A refusal is RESOURCE_EXHAUSTED and its message
//! names the limit and its flag. The fixed limits (request size, metadata,
//! descriptors) are constants in [`crate::validate`] and [`crate::server`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use crate::error::Error;

/// Default of `--max-instances-per-lease`: far more than a node serves,
/// few enough that one lease cannot fill the registry.
pub const DEFAULT_INSTANCES_PER_LEASE: usize = 10_000;
/// Default of `--max-instances-per-service`.
pub const DEFAULT_INSTANCES_PER_SERVICE: usize = 100_000;
/// Default of `--max-watches-per-connection`: a client needs one or a few.
pub const DEFAULT_WATCHES_PER_CONNECTION: usize = 64;
/// Default of `--max-registrations-per-sec-per-ip`: far above what nodes
/// restarting together need, low enough that a flood from one machine is
/// refused cheaply instead of queuing on the state's lock.
pub const DEFAULT_REGISTRATIONS_PER_SEC: u32 = 1000;
/// Peers tracked before idle ones are forgotten: bounds the memory many
/// source addresses can take.
const MAX_TRACKED_PEERS: usize = 4096;

/// Instance quotas, checked by [`crate::state::State::register`]. `0` means
/// no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Most instances one lease may hold (`--max-instances-per-lease`).
    pub instances_per_lease: usize,
    /// Most instances one service may have (`--max-instances-per-service`).
    pub instances_per_service: usize,
}

impl Default for Quotas {
    fn default() -> Quotas {
        Quotas {
            instances_per_lease: DEFAULT_INSTANCES_PER_LEASE,
            instances_per_service: DEFAULT_INSTANCES_PER_SERVICE,
        }
    }
}

impl Quotas {
    /// Refuses one more instance under a lease that holds `held`.
    pub fn check_lease(&self, lease_id: u64, held: usize) -> Result<(), Error> {
        let max = self.instances_per_lease;
        if max != 0 && held >= max {
            return Err(Error::Limit(format!(
                "instances per lease: lease {lease_id} already holds {held} (max {max}, \
                 --max-instances-per-lease)"
            )));
        }
        Ok(())
    }

    /// Refuses one more instance in a service that has `count`.
    pub fn check_service(&self, service: &str, count: usize) -> Result<(), Error> {
        let max = self.instances_per_service;
        if max != 0 && count >= max {
            return Err(Error::Limit(format!(
                "instances per service: {service:?} already has {count} (max {max}, \
                 --max-instances-per-service)"
            )));
        }
        Ok(())
    }
}

/// Per-peer limits. `0` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerConfig {
    /// Most Watch streams open at once on one connection
    /// (`--max-watches-per-connection`).
    pub watches_per_connection: usize,
    /// Register calls per second from one IP address, as a token bucket
    /// holding one second's worth (`--max-registrations-per-sec-per-ip`).
    pub registrations_per_sec: u32,
}

impl Default for PeerConfig {
    fn default() -> PeerConfig {
        PeerConfig {
            watches_per_connection: DEFAULT_WATCHES_PER_CONNECTION,
            registrations_per_sec: DEFAULT_REGISTRATIONS_PER_SEC,
        }
    }
}

/// A token bucket: `tokens` refill at the configured rate up to one
/// second's worth.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Registrations allowed right now.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

/// The per-peer bookkeeping. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct PeerLimits {
    /// What to enforce.
    config: PeerConfig,
    /// Shared counters.
    shared: Arc<Peers>,
}

#[derive(Debug, Default)]
struct Peers {
    /// Registration buckets by source IP. A std mutex: held for a few
    /// arithmetic operations, never across an await.
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// Open Watch streams by connection (the peer's socket address).
    watches: Mutex<HashMap<SocketAddr, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PeerLimits {
    /// Enforces `config`.
    pub fn new(config: PeerConfig) -> PeerLimits {
        PeerLimits {
            config,
            shared: Arc::default(),
        }
    }

    /// Takes one registration from `peer`'s bucket, or refuses. A call
    /// whose peer is unknown (not over TCP) is not limited.
    pub fn check_register(&self, peer: Option<SocketAddr>) -> Result<(), Error> {
        self.check_register_at(peer.map(|p| p.ip()), Instant::now())
    }

    fn check_register_at(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Error> {
        let rate = self.config.registrations_per_sec;
        let Some(ip) = ip.filter(|_| rate != 0) else {
            return Ok(());
        };
        let capacity = f64::from(rate);
        let mut buckets = lock(&self.shared.buckets);
        if buckets.len() >= MAX_TRACKED_PEERS && !buckets.contains_key(&ip) {
            // Forget peers idle long enough to have a full bucket again:
            // forgetting them changes nothing for them.
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * capacity < capacity
            });
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * capacity;
        bucket.tokens = (bucket.tokens + refill).min(capacity);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(Error::Limit(format!(
                "registrations per second per peer: {ip} sent more than {rate}/s \
                 (--max-registrations-per-sec-per-ip; 0 disables it); slow down and retry"
            )));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// Counts one more Watch stream on `peer`'s connection, or refuses; the
    /// guard uncounts it when the stream is dropped.
    pub fn open_watch(&self, peer: Option<SocketAddr>) -> Result<WatchGuard, Error> {
        let max = self.config.watches_per_connection;
        let Some(peer) = peer.filter(|_| max != 0) else {
            return Ok(WatchGuard(None));
        };
        let mut watches = lock(&self.shared.watches);
        let open = watches.entry(peer).or_insert(0);
        if *open >= max {
            return Err(Error::Limit(format!(
                "watch streams per connection: {open} already open from {peer} (max {max}, \
                 --max-watches-per-connection); one stream can watch many services"
            )));
        }
        *open += 1;
        Ok(WatchGuard(Some((self.shared.clone(), peer))))
    }
}

/// One counted Watch stream; uncounted when dropped.
#[derive(Debug)]
pub struct WatchGuard(Option<(Arc<Peers>, SocketAddr)>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some((peers, peer)) = self.0.take() {
            let mut watches = lock(&peers.watches);
            if let Some(open) = watches.get_mut(&peer) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    watches.remove(&peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn the_bucket_refills_at_the_rate_and_peers_are_separate() {
        let limits = PeerLimits::new(PeerConfig {
            registrations_per_sec: 10,
            ..PeerConfig::default()
        });
        let t0 = Instant::now();
        for _ in 0..10 {
            limits.check_register_at(ip(2), t0).unwrap();
        }
        let err = limits.check_register_at(ip(2), t0).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.to_string()
                .contains("--max-registrations-per-sec-per-ip"),
            "{err}"
        );
        // Another peer is not affected.
        limits.check_register_at(ip(1), t0).unwrap();
        // A tenth of a second later: one more.
        let t1 = t0 + Duration::from_millis(100);
        limits.check_register_at(ip(2), t1).unwrap();
        assert!(limits.check_register_at(ip(2), t1).is_err());
        // Unknown peers are not limited.
        for _ in 0..100 {
            limits.check_register_at(None, t1).unwrap();
        }
    }

    #[test]
    fn zero_disables_the_rate() {
        let limits = PeerLimits::new(PeerConfig {
            registrations_per_sec: 0,
            ..PeerConfig::default()
        });
        let t0 = Instant::now();
        for _ in 0..10_000 {
            limits.check_register_at(ip(2), t0).unwrap();
        }
    }

    #[test]
    fn idle_peers_are_forgotten_when_many_are_tracked() {
        let limits = PeerLimits::new(PeerConfig::default());
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_PEERS as u32 {
            limits
                .check_register_at(Some(IpAddr::from(i.to_be_bytes())), t0)
                .unwrap();
        }
        let later = t0 + Duration::from_secs(2);
        limits.check_register_at(ip(1), later).unwrap();
        assert_eq!(lock(&limits.shared.buckets).len(), 1);
    }

    #[test]
    fn watches_are_counted_per_connection_and_released() {
        let limits = PeerLimits::new(PeerConfig {
            watches_per_connection: 2,
            ..PeerConfig::default()
        });
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let g1 = limits.open_watch(Some(a)).unwrap();
        let _g2 = limits.open_watch(Some(a)).unwrap();
        let err = limits.open_watch(Some(a)).unwrap_err();
        assert!(
            err.to_string().contains("--max-watches-per-connection"),
            "{err}"
        );
        // Another connection of the same host has its own count.
        let _g3 = limits.open_watch(Some(b)).unwrap();
        drop(g1);
        let _g4 = limits.open_watch(Some(a)).unwrap();
    }

    #[test]
    fn quotas_name_their_flags_and_zero_disables() {
        let q = Quotas {
            instances_per_lease: 2,
            instances_per_service: 3,
        };
        assert!(q.check_lease(1, 1).is_ok());
        let err = q.check_lease(1, 2).unwrap_err();
        assert!(
            err.to_string().contains("--max-instances-per-lease"),
            "{err}"
        );
        let err = q.check_service("svc", 3).unwrap_err();
        assert!(
            err.to_string().contains("--max-instances-per-service"),
            "{err}"
        );
        assert!(q.check_service("svc", 2).is_ok());
        let off = Quotas {
            instances_per_lease: 0,
            instances_per_service: 0,
        };
        assert!(off.check_lease(1, usize::MAX - 1).is_ok());
        assert!(off.check_service("svc", usize::MAX - 1).is_ok());
    }
}
