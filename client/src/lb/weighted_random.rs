//! Random choice proportional to weight.

use super::policy::{Endpoint, Pick, Policy};
use rand::Rng;

/// Picks endpoint `i` with probability `weight_i / total`. Stateless, so
/// correct on average but bursty over short runs.
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
        Some(Pick::index(endpoints.len() - 1))
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
    fn zero_weight_counts_as_one() {
        let keys = keys(2);
        let eps = endpoints(&keys, &[0, 1]);
        let counts = counts(&WeightedRandom, &eps, 4000);
        assert_binomial(&counts, &[0.5, 0.5]);
    }
}
