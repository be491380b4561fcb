//! Random choice proportional to weight.

use super::policy::{Endpoint, Pick, Policy, live};
use rand::Rng;

/// Picks endpoint `i` with probability `weight_i / total`: never a drained
/// one (weight 0). Stateless, so correct on average but bursty over short
/// runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct WeightedRandom;

impl Policy for WeightedRandom {
    fn pick(&self, endpoints: &[Endpoint<'_>]) -> Option<Pick> {
        let total: u64 = endpoints.iter().map(Endpoint::effective_weight).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = rand::rng().random_range(0..total);
        for (i, ep) in endpoints.iter().enumerate() {
            let w = ep.effective_weight();
            if ticket < w {
                return Some(Pick::index(i));
            }
            ticket -= w;
        }
        // Unreachable: the tickets cover exactly 0..total.
        live(endpoints).last().map(|(i, _)| Pick::index(i))
    }

    fn name(&self) -> &'static str {
        "weighted-random"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::test_support::*;

    #[test]
    fn spreads_in_proportion_to_weight() {
        let keys = keys(3);
        let eps = endpoints(&keys, &[3, 1, 6]);
        let counts = counts(&WeightedRandom, &eps, 10_000);
        assert_binomial(&counts, &[0.3, 0.1, 0.6]);
    }

    #[test]
    fn never_picks_a_drained_endpoint() {
        let keys = keys(3);
        let eps = endpoints(&keys, &[1, 0, 3]);
        let counts = counts(&WeightedRandom, &eps, 4000);
        assert_eq!(counts[1], 0, "{counts:?}");
        assert_binomial(&counts, &[0.25, 0.0, 0.75]);
        assert!(WeightedRandom.pick(&endpoints(&keys, &[0, 0, 0])).is_none());
    }
}
