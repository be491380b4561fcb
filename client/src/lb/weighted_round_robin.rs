//! Smooth weighted round robin (the nginx algorithm).
//!
//! Each endpoint has a running score. On every pick, each score grows by its
//! endpoint's weight; the highest score wins and drops by the total weight.
//! Over any `total` consecutive picks with a fixed set, each endpoint is
//! picked exactly `weight` times, and the picks interleave: weights 5,1,1 give
//! `a a b a c a a`, not `a a a a a b c`.

use super::policy::{Endpoint, KeyMap, Pick, Policy, live};
use std::sync::Mutex;

/// Stateful smooth weighted round robin. Scores are kept per endpoint key, so
/// when the set changes the survivors keep their place in the rotation and a
/// newcomer starts at zero. A drained endpoint (weight 0) is out of the
/// rotation as if it had left; undrained, it rejoins at zero.
#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    /// Score per endpoint key. A std mutex: held only for the few
    /// arithmetic steps of one pick, never across an await.
    scores: Mutex<KeyMap<i64>>,
}

impl Policy for WeightedRoundRobin {
    fn pick(&self, endpoints: &[Endpoint<'_>]) -> Option<Pick> {
        let n = live(endpoints).count();
        if n == 0 {
            return None;
        }
        let mut scores = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        // Forget endpoints that left or were drained, so a key that returns
        // starts afresh and the map does not grow without bound.
        if scores.len() != n || live(endpoints).any(|(_, e)| !scores.contains_key(e.key)) {
            scores.retain(|k, _| live(endpoints).any(|(_, e)| e.key == k));
            // Rebalance so the scores sum to zero again: a departed endpoint
            // takes its score with it, which would otherwise bias the rest.
            let kept = scores.len() as i64;
            if kept > 0 {
                let mean = scores.values().sum::<i64>() / kept;
                scores.values_mut().for_each(|s| *s -= mean);
            }
            // Newcomers start at zero. Done here, on a change only, so a
            // pick over an unchanged set allocates no key.
            for (_, e) in live(endpoints) {
                if !scores.contains_key(e.key) {
                    scores.insert(e.key.to_string(), 0);
                }
            }
        }
        let total: i64 = live(endpoints)
            .map(|(_, e)| e.effective_weight() as i64)
            .sum();
        let mut best: Option<(usize, i64)> = None;
        for (i, ep) in live(endpoints) {
            // Every live key was inserted above.
            let Some(score) = scores.get_mut(ep.key) else {
                continue;
            };
            *score += ep.effective_weight() as i64;
            if best.is_none_or(|(_, b)| *score > b) {
                best = Some((i, *score));
            }
        }
        let (index, _) = best?;
        if let Some(score) = scores.get_mut(endpoints[index].key) {
            *score -= total;
        }
        Some(Pick::index(index))
    }

    fn name(&self) -> &'static str {
        "weighted-round-robin"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::test_support::*;

    fn sequence(policy: &WeightedRoundRobin, eps: &[Endpoint<'_>], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| policy.pick(eps).expect("non-empty").index)
            .collect()
    }

    #[test]
    fn exact_proportions_over_every_cycle() {
        let keys = keys(3);
        let weights = [5, 1, 3];
        let eps = endpoints(&keys, &weights);
        let wrr = WeightedRoundRobin::default();
        // 300 cycles of total weight 9: each cycle on its own is exact.
        for cycle in 0..300 {
            let seq = sequence(&wrr, &eps, 9);
            for (i, &w) in weights.iter().enumerate() {
                let got = seq.iter().filter(|&&x| x == i).count();
                assert_eq!(got, w as usize, "cycle {cycle}: {seq:?}");
            }
        }
    }

    #[test]
    fn smooth_not_bursty() {
        let keys = keys(3);
        let eps = endpoints(&keys, &[5, 1, 1]);
        let wrr = WeightedRoundRobin::default();
        assert_eq!(sequence(&wrr, &eps, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_never_repeat_an_instance() {
        let keys = keys(4);
        let eps = endpoints(&keys, &[2, 2, 2, 2]);
        let wrr = WeightedRoundRobin::default();
        let seq = sequence(&wrr, &eps, 4000);
        assert!(seq.windows(2).all(|w| w[0] != w[1]), "repeat in {seq:?}");
    }

    #[test]
    fn stays_exact_after_the_set_changes() {
        let keys = keys(3);
        let wrr = WeightedRoundRobin::default();
        let all = endpoints(&keys, &[3, 2, 1]);
        let _ = sequence(&wrr, &all, 4); // mid-cycle
        // e1 leaves: the others keep their rotation and, after one settling
        // cycle, the shares are exact again.
        let two = vec![all[0], all[2]];
        let _ = sequence(&wrr, &two, 4);
        for _ in 0..100 {
            let seq = sequence(&wrr, &two, 4);
            assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 3, "{seq:?}");
        }
        // e1 comes back: everyone gets a share again.
        // Bounded scores mean each count is within one of exact.
        let counts = counts(&wrr, &all, 6000);
        for (got, want) in counts.iter().zip([3000, 2000, 1000]) {
            assert!(got.abs_diff(want) <= 1, "{counts:?}");
        }
    }

    #[test]
    fn a_drained_endpoint_gets_nothing_and_its_share_back_when_undrained() {
        let keys = keys(3);
        let wrr = WeightedRoundRobin::default();
        let all = endpoints(&keys, &[3, 2, 1]);
        let _ = sequence(&wrr, &all, 4); // mid-cycle
        let mut drained = all.clone();
        drained[1].weight = 0;
        // One settling cycle, then exact 3:1 shares with e1 never picked.
        let _ = sequence(&wrr, &drained, 4);
        for _ in 0..100 {
            let seq = sequence(&wrr, &drained, 4);
            assert!(!seq.contains(&1), "{seq:?}");
            assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 3, "{seq:?}");
        }
        let counts = counts(&wrr, &all, 6000);
        for (got, want) in counts.iter().zip([3000, 2000, 1000]) {
            assert!(got.abs_diff(want) <= 1, "{counts:?}");
        }
        assert!(wrr.pick(&endpoints(&keys, &[0, 0, 0])).is_none());
    }
}
