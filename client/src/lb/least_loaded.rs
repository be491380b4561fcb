//! Least loaded by the power of two choices.
//!
//! Checking every endpoint's load on each pick costs O(n) and makes every
//! caller pile onto the same "least loaded" endpoint at once. Sampling two at
//! random and taking the less loaded one is nearly as good and avoids the herd
//! (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing").

use super::policy::{Endpoint, InFlightGuard, KeyMap, Pick, Policy, live};
use rand::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Power of two choices on the number of calls in flight per endpoint.
/// A call counts as in flight from its pick until its [`Pick`] is dropped.
/// Drained endpoints (weight 0) are never sampled; weights are otherwise
/// ignored.
#[derive(Debug, Default)]
pub struct LeastLoaded {
    /// In-flight counters by endpoint key. Counters are shared with the
    /// guards, which may outlive the endpoint's presence in the set.
    in_flight: Mutex<KeyMap<Arc<AtomicUsize>>>,
}

impl LeastLoaded {
    /// Calls currently in flight to the endpoint `key`.
    pub fn in_flight(&self, key: &str) -> usize {
        let map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).map_or(0, |c| c.load(Ordering::Acquire))
    }
}

impl Policy for LeastLoaded {
    fn pick(&self, endpoints: &[Endpoint<'_>]) -> Option<Pick> {
        let n = live(endpoints).count();
        if n == 0 {
            return None;
        }
        let (a, b) = if n == 1 {
            (0, 0)
        } else {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            // A second, distinct one.
            let b = (a + rng.random_range(1..n)) % n;
            (a, b)
        };
        // From the a-th and b-th live endpoints to their indices.
        let index_of = |nth: usize| live(endpoints).nth(nth).map_or(0, |(i, _)| i);
        let (a, b) = (index_of(a), index_of(b));
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        // Drop idle counters of endpoints that left; busy ones stay until
        // their guards finish.
        if map.len() > 2 * endpoints.len() {
            map.retain(|k, c| {
                c.load(Ordering::Acquire) > 0 || endpoints.iter().any(|e| e.key == k)
            });
        }
        let load = |i: usize, map: &KeyMap<Arc<AtomicUsize>>| {
            map.get(endpoints[i].key)
                .map_or(0, |c| c.load(Ordering::Acquire))
        };
        let index = if load(b, &map) < load(a, &map) { b } else { a };
        let key = endpoints[index].key;
        // Looked up before `entry`, which would allocate the key on every pick.
        let counter = match map.get(key) {
            Some(counter) => counter.clone(),
            None => map.entry(key.to_string()).or_default().clone(),
        };
        counter.fetch_add(1, Ordering::AcqRel);
        Some(Pick {
            index,
            guard: Some(InFlightGuard::new(counter)),
        })
    }

    fn name(&self) -> &'static str {
        "least-loaded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::test_support::*;

    #[test]
    fn prefers_the_idle_endpoint() {
        let keys = keys(2);
        let eps = endpoints(&keys, &[1, 1]);
        let p2c = LeastLoaded::default();
        // Make e0 busy with 5 calls in flight (picks over e0 alone share
        // its counter).
        let held: Vec<Pick> = (0..5)
            .map(|_| p2c.pick(&eps[..1]).expect("non-empty"))
            .collect();
        assert_eq!(p2c.in_flight("e0"), 5);
        // With two endpoints both are always sampled: e1 always wins.
        for _ in 0..2000 {
            let pick = p2c.pick(&eps).expect("non-empty");
            assert_eq!(pick.index, 1);
        }
        drop(held);
        assert_eq!(p2c.in_flight("e0"), 0);
        assert_eq!(p2c.in_flight("e1"), 0);
    }

    #[test]
    fn concurrent_calls_spread_evenly() {
        let keys = keys(4);
        let eps = endpoints(&keys, &[1, 1, 1, 1]);
        let p2c = LeastLoaded::default();
        // 4000 overlapping calls: the in-flight counts stay close (the gap
        // of two choices does not grow with the number of calls; uniform
        // random would drift apart by ~50 here).
        let held: Vec<Pick> = (0..4000)
            .map(|_| p2c.pick(&eps).expect("non-empty"))
            .collect();
        let loads: Vec<usize> = keys.iter().map(|k| p2c.in_flight(k)).collect();
        let (min, max) = (loads.iter().min(), loads.iter().max());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 12), "{loads:?}");
        drop(held);
    }

    #[test]
    fn sequential_calls_spread_uniformly() {
        let keys = keys(3);
        let eps = endpoints(&keys, &[1, 5, 9]);
        let counts = counts(&LeastLoaded::default(), &eps, 6000);
        assert_binomial(&counts, &[1.0 / 3.0; 3]);
    }

    #[test]
    fn never_picks_a_drained_endpoint() {
        let keys = keys(3);
        let p2c = LeastLoaded::default();
        // e1 is drained and idle, the least loaded of all: still never
        // picked, while the calls stay in flight.
        let eps = endpoints(&keys, &[1, 0, 1]);
        let held: Vec<Pick> = (0..3000)
            .map(|_| p2c.pick(&eps).expect("two live endpoints"))
            .collect();
        assert_eq!(p2c.in_flight("e1"), 0);
        assert!(p2c.in_flight("e0").abs_diff(p2c.in_flight("e2")) <= 12);
        drop(held);
        assert!(p2c.pick(&endpoints(&keys, &[0, 0, 0])).is_none());
        // Only one live endpoint left: it takes every call.
        let one = endpoints(&keys, &[0, 0, 7]);
        assert!((0..100).all(|_| p2c.pick(&one).map(|p| p.index) == Some(2)));
    }

    #[test]
    fn single_endpoint() {
        let keys = keys(1);
        let eps = endpoints(&keys, &[1]);
        assert_eq!(LeastLoaded::default().pick(&eps).map(|p| p.index), Some(0));
    }
}
