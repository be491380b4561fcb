//! Limits an operator can tune, so one client cannot take the registry from
//! the others: instances per lease and per service (checked by the state),
//! Watch streams per connection and registrations per second per peer
//! (checked here, before a call reaches the state's lock).
//!
//! Every limit is a flag of the `registry` binary with a documented default;
//! `0` turns a limit off. A refusal is RESOURCE_EXHAUSTED and its message
//! names the limit and its flag. The fixed limits (request size, metadata,
//! descriptors) are constants in [`crate::validate`] and [`crate::server`].
//!
//! # Registrations per peer
//! A peer is an IPv4 address or an IPv6 /64 (one host usually owns a whole
//! /64, so counting IPv6 addresses one by one would give it billions of
//! budgets); an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
//! dual-stack listener reports for an IPv4 client) counts as that IPv4
//! address. Each peer has a token bucket holding one second's worth, which
//! both Register and GrantLease draw from: a node takes one lease per
//! session, so this costs it nothing, and a peer cannot fill the
//! registry-wide lease cap faster than it could register.
//!
//! At most [`MAX_TRACKED_PEERS`] peers have a bucket of their own. When the
//! table is full, peers idle long enough to have a full bucket again are
//! forgotten (which changes nothing for them), at most once per
//! [`REFILL`]: the scan is paid once a second, not on every call. A new
//! peer that still finds the table full of active peers is charged to one
//! bucket shared by all such peers, so a flood from many addresses gets one
//! peer's budget between them, and the tracked peers keep theirs.
//!
//! Why not `governor`: its keyed limiter grows a map entry per key until
//! `retain_recent` is called and has no notion of a capped table whose
//! overflow shares one bucket, which is what bounds the memory a flood from
//! many addresses can take here; and it runs on its own clock, while these
//! buckets run on tokio's, so the tests pause and advance time.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Limit};

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
/// Peers with a registration bucket of their own: bounds the memory many
/// source addresses can take. Peers beyond it share one bucket.
pub const MAX_TRACKED_PEERS: usize = 4096;
/// How long an empty bucket takes to fill (it holds one second's worth):
/// a peer idle this long has a full bucket, so forgetting it is harmless,
/// and one sweep per period forgets every idle peer.
pub const REFILL: Duration = Duration::from_secs(1);

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
            return Err(Error::limit(
                Limit::InstancesPerLease,
                format!(
                    "instances per lease: lease {lease_id} already holds {held} (max {max}, \
                 --max-instances-per-lease)"
                ),
            ));
        }
        Ok(())
    }

    /// Refuses one more instance in a service that has `count`.
    pub fn check_service(&self, service: &str, count: usize) -> Result<(), Error> {
        let max = self.instances_per_service;
        if max != 0 && count >= max {
            return Err(Error::limit(
                Limit::InstancesPerService,
                format!(
                    "instances per service: {service:?} already has {count} (max {max}, \
                 --max-instances-per-service)"
                ),
            ));
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
    /// Register calls per second from one peer (an IPv4 address or an IPv6
    /// /64), as a token bucket holding one second's worth
    /// (`--max-registrations-per-sec-per-ip`). Peers beyond
    /// [`MAX_TRACKED_PEERS`] active ones share one such bucket.
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

/// Whom a registration is charged to: an IPv4 address, or the /64 prefix
/// of an IPv6 address (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    /// An IPv4 address, also when it came IPv4-mapped in IPv6.
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl From<IpAddr> for PeerKey {
    fn from(ip: IpAddr) -> PeerKey {
        // to_canonical: `::ffff:a.b.c.d` is an IPv4 client of a dual-stack
        // listener, and must share the bucket of `a.b.c.d`.
        match ip.to_canonical() {
            IpAddr::V4(v4) => PeerKey::V4(v4),
            IpAddr::V6(v6) => PeerKey::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::V4(v4) => v4.fmt(f),
            PeerKey::V6Prefix(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(*prefix) << 64))
            }
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

impl Bucket {
    /// A bucket holding `capacity`, as an unknown peer gets.
    fn full(capacity: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: capacity,
            at: now,
        }
    }

    /// The tokens held at `now` (the bucket refills `capacity` per second).
    fn tokens_at(&self, capacity: f64, now: Instant) -> f64 {
        let refill = now.duration_since(self.at).as_secs_f64() * capacity;
        (self.tokens + refill).min(capacity)
    }

    /// How long until the bucket holds one token again (after a refused
    /// [`take`](Self::take) at `now`).
    fn refill_wait(&self, capacity: f64, now: Instant) -> Duration {
        let missing = (1.0 - self.tokens_at(capacity, now)).max(0.0);
        Duration::from_secs_f64(missing / capacity)
    }

    /// Takes one token at `now`; false when there is none.
    fn take(&mut self, capacity: f64, now: Instant) -> bool {
        self.tokens = self.tokens_at(capacity, now);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The registration buckets: one per tracked peer, one shared by the rest.
#[derive(Debug, Default)]
struct Buckets {
    /// At most [`MAX_TRACKED_PEERS`] peers' own buckets.
    tracked: HashMap<PeerKey, Bucket>,
    /// Shared by every peer that found `tracked` full of active peers;
    /// created full on first use.
    overflow: Option<Bucket>,
    /// When idle peers were last swept out of `tracked`: a sweep scans the
    /// whole table under the lock, so it runs at most once per [`REFILL`].
    last_sweep: Option<Instant>,
}

impl Buckets {
    /// The bucket `peer` is charged to at `now`, and whether it is the
    /// shared overflow bucket.
    fn bucket(&mut self, peer: PeerKey, capacity: f64, now: Instant) -> (&mut Bucket, bool) {
        let own = self.tracked.contains_key(&peer) || {
            if self.tracked.len() >= MAX_TRACKED_PEERS {
                self.sweep(capacity, now);
            }
            self.tracked.len() < MAX_TRACKED_PEERS
        };
        if own {
            let bucket = self
                .tracked
                .entry(peer)
                .or_insert_with(|| Bucket::full(capacity, now));
            (bucket, false)
        } else {
            let bucket = self
                .overflow
                .get_or_insert_with(|| Bucket::full(capacity, now));
            (bucket, true)
        }
    }

    /// Forgets the peers whose bucket is full again (they have been idle),
    /// unless a sweep ran less than [`REFILL`] ago: any bucket fills within
    /// [`REFILL`], so a peer that stays idle is forgotten by the next sweep
    /// anyway, and sweeping more often would pay a whole scan per call
    /// while a flood finds the table full.
    fn sweep(&mut self, capacity: f64, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|last| now.duration_since(last) < REFILL)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.tracked
            .retain(|_, b| b.tokens_at(capacity, now) < capacity);
    }
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
    /// Registration buckets by peer. A std mutex: held for a hash lookup
    /// and a few arithmetic operations (and, at most once a second, a scan
    /// of at most [`MAX_TRACKED_PEERS`] entries), never across an await.
    buckets: Mutex<Buckets>,
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

    /// Takes one registration (a Register or a GrantLease) from the bucket of `peer` (see the module
    /// docs for what a peer is), or refuses. A call whose peer is unknown
    /// (not over TCP) is not limited.
    pub fn check_register(&self, peer: Option<SocketAddr>) -> Result<(), Error> {
        self.check_register_at(peer.map(|p| p.ip()), Instant::now())
    }

    fn check_register_at(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Error> {
        let rate = self.config.registrations_per_sec;
        let Some(ip) = ip.filter(|_| rate != 0) else {
            return Ok(());
        };
        let peer = PeerKey::from(ip);
        let capacity = f64::from(rate);
        let mut buckets = lock(&self.shared.buckets);
        let (bucket, shared) = buckets.bucket(peer, capacity, now);
        if bucket.take(capacity, now) {
            return Ok(());
        }
        let retry_after = bucket.refill_wait(capacity, now);
        drop(buckets);
        // A refusal that passes by itself: it carries the wait (RetryInfo
        // in the status details), which is what the node host retries on.
        let message = if shared {
            format!(
                "registrations per second from untracked peers: {peer} is not tracked \
                 because {MAX_TRACKED_PEERS} active peers already are, and the untracked \
                 ones share one budget of {rate}/s, which is spent \
                 (--max-registrations-per-sec-per-ip; 0 disables it); slow down and retry"
            )
        } else {
            format!(
                "registrations per second per peer (Register and GrantLease calls): \
                 {peer} sent more than {rate}/s \
                 (--max-registrations-per-sec-per-ip, counted per IPv4 address or IPv6 /64; \
                 0 disables it); slow down and retry"
            )
        };
        Err(Error::RateLimit {
            message,
            retry_after,
        })
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
            return Err(Error::limit(
                Limit::WatchesPerConnection,
                format!(
                    "watch streams per connection: {open} already open from {peer} (max {max}, \
                 --max-watches-per-connection); one stream can watch many services"
                ),
            ));
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
        assert_eq!(tracked(&limits), 1);
    }

    fn tracked(limits: &PeerLimits) -> usize {
        lock(&limits.shared.buckets).tracked.len()
    }

    /// An address of its own /64 for each `n`.
    fn v6(n: u32) -> Option<IpAddr> {
        let [a, b, c, d] = n.to_be_bytes();
        Some(IpAddr::from([
            0x20, 0x01, 0x0d, 0xb8, a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 1,
        ]))
    }

    /// Fills the table with `MAX_TRACKED_PEERS` peers (10.x.y.z), each of
    /// which registers once at `at`: all active.
    fn fill(limits: &PeerLimits, at: Instant) {
        for i in 0..MAX_TRACKED_PEERS as u32 {
            let addr = IpAddr::from((0x0a00_0000 | i).to_be_bytes());
            limits.check_register_at(Some(addr), at).unwrap();
        }
        assert_eq!(tracked(limits), MAX_TRACKED_PEERS);
    }

    #[test]
    fn the_table_never_exceeds_its_cap() {
        let limits = PeerLimits::new(PeerConfig::default());
        let t0 = Instant::now();
        let peers = 3 * MAX_TRACKED_PEERS as u32;
        // Twice, two seconds apart (so the second pass sweeps out the
        // first), three tables' worth of new addresses registering twice.
        for (pass, at) in [t0, t0 + Duration::from_secs(2)].into_iter().enumerate() {
            let first = pass as u32 * peers;
            let mut accepted = 0;
            for n in first..first + peers {
                for _ in 0..2 {
                    accepted += usize::from(limits.check_register_at(v6(n), at).is_ok());
                }
                assert!(tracked(&limits) <= MAX_TRACKED_PEERS, "after {n}");
            }
            assert_eq!(tracked(&limits), MAX_TRACKED_PEERS);
            // The tracked peers' own budgets, plus one shared second's
            // worth for all the others.
            let shared = DEFAULT_REGISTRATIONS_PER_SEC as usize;
            assert_eq!(accepted, 2 * MAX_TRACKED_PEERS + shared, "pass {pass}");
        }
    }

    #[test]
    fn untracked_peers_share_one_bucket_and_the_message_says_so() {
        let limits = PeerLimits::new(PeerConfig {
            registrations_per_sec: 10,
            ..PeerConfig::default()
        });
        let t0 = Instant::now();
        fill(&limits, t0);
        // Ten new addresses take the one shared budget of ten...
        for n in 0..10 {
            limits.check_register_at(v6(n), t0).unwrap();
        }
        assert_eq!(tracked(&limits), MAX_TRACKED_PEERS);
        // ...so an eleventh, never seen before, is refused.
        let err = limits.check_register_at(v6(10), t0).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let message = err.to_string();
        for part in [
            "registrations per second from untracked peers",
            "2001:db8:0:a::/64 is not tracked",
            "4096 active peers",
            "one budget of 10/s",
            "--max-registrations-per-sec-per-ip",
        ] {
            assert!(message.contains(part), "{part:?} not in {message}");
        }
        // The shared bucket refills like any other: 100 ms buys one more,
        // for whichever new address comes first.
        let t1 = t0 + Duration::from_millis(100);
        limits.check_register_at(v6(11), t1).unwrap();
        assert!(limits.check_register_at(v6(0), t1).is_err());
        assert_eq!(tracked(&limits), MAX_TRACKED_PEERS);
    }

    #[test]
    fn tracked_peers_keep_their_budget_during_a_flood_from_new_addresses() {
        let limits = PeerLimits::new(PeerConfig {
            registrations_per_sec: 10,
            ..PeerConfig::default()
        });
        let t0 = Instant::now();
        fill(&limits, t0);
        for step in 0..30u32 {
            let at = t0 + Duration::from_millis(u64::from(step) * 100);
            // The tracked peers register once per 100 ms each, their own
            // rate: never refused, and never idle, so never forgotten.
            for i in 0..MAX_TRACKED_PEERS as u32 {
                let addr = IpAddr::from((0x0a00_0000 | i).to_be_bytes());
                limits
                    .check_register_at(Some(addr), at)
                    .unwrap_or_else(|e| panic!("step {step}: {e}"));
            }
            // The flood: 1000 new /64s every 100 ms. Between them they get
            // one peer's budget: ten at first, then one per 100 ms.
            let flood_ok = (0..1000)
                .filter(|n| limits.check_register_at(v6(step * 1000 + n), at).is_ok())
                .count();
            assert_eq!(flood_ok, if step == 0 { 10 } else { 1 }, "step {step}");
            assert_eq!(tracked(&limits), MAX_TRACKED_PEERS);
        }
        // None of the flood's 30 000 addresses took a tracked peer's place.
        assert!(
            lock(&limits.shared.buckets)
                .tracked
                .keys()
                .all(|k| matches!(k, PeerKey::V4(_)))
        );
    }

    #[test]
    fn idle_peers_are_swept_at_most_once_per_refill_period() {
        let limits = PeerLimits::new(PeerConfig {
            registrations_per_sec: 10,
            ..PeerConfig::default()
        });
        let t0 = Instant::now();
        fill(&limits, t0);
        // Every peer is active: the sweep forgets none, the newcomer shares.
        limits.check_register_at(v6(0), t0).unwrap();
        assert_eq!(tracked(&limits), MAX_TRACKED_PEERS);
        // 500 ms on, every bucket is full again (10/s refills 1 in 100 ms),
        // but the last sweep was under a second ago: no new scan.
        let t1 = t0 + Duration::from_millis(500);
        limits.check_register_at(v6(1), t1).unwrap();
        assert_eq!(tracked(&limits), MAX_TRACKED_PEERS);
        // A second after the last sweep: every idle peer is forgotten, and
        // the newcomer gets a bucket of its own.
        let t2 = t0 + REFILL;
        limits.check_register_at(v6(2), t2).unwrap();
        assert_eq!(tracked(&limits), 1);
        assert!(
            lock(&limits.shared.buckets)
                .tracked
                .contains_key(&PeerKey::from(v6(2).unwrap()))
        );
    }

    #[test]
    fn ipv6_peers_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let limits = PeerLimits::new(PeerConfig {
            registrations_per_sec: 2,
            ..PeerConfig::default()
        });
        let t0 = Instant::now();
        let addr = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // Two addresses of one /64 share its two tokens.
        limits
            .check_register_at(addr("2001:db8:1:2::1"), t0)
            .unwrap();
        limits
            .check_register_at(addr("2001:db8:1:2:ffff:ffff:ffff:ffff"), t0)
            .unwrap();
        let err = limits
            .check_register_at(addr("2001:db8:1:2::99"), t0)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("calls): 2001:db8:1:2::/64 sent more than 2/s"),
            "{err}"
        );
        // The next /64 is another peer.
        limits
            .check_register_at(addr("2001:db8:1:3::1"), t0)
            .unwrap();
        // An IPv4 client of a dual-stack listener is its IPv4 address.
        limits.check_register_at(addr("192.0.2.1"), t0).unwrap();
        limits
            .check_register_at(addr("::ffff:192.0.2.1"), t0)
            .unwrap();
        let err = limits.check_register_at(addr("192.0.2.1"), t0).unwrap_err();
        assert!(err.to_string().contains("calls): 192.0.2.1 sent"), "{err}");
        // Three peers: the /64s and the IPv4 address.
        assert_eq!(tracked(&limits), 3);
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
