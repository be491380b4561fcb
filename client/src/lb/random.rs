//! Uniform random choice.

use super::policy::{Endpoint, Pick, Policy, live};
use rand::Rng;

/// Picks uniformly at random among the endpoints that are not drained;
/// weights are otherwise ignored. Stateless.
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl Policy for Random {
    fn pick(&self, endpoints: &[Endpoint<'_>]) -> Option<Pick> {
        let n = live(endpoints).count();
        if n == 0 {
            return None;
        }
        let nth = rand::rng().random_range(0..n);
        live(endpoints).nth(nth).map(|(i, _)| Pick::index(i))
    }

    fn name(&self) -> &'static str {
        "random"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::test_support::*;

    #[test]
    fn spreads_uniformly_whatever_the_weights() {
        let keys = keys(4);
        let eps = endpoints(&keys, &[1, 10, 100, 1000]);
        let counts = counts(&Random, &eps, 8000);
        assert_binomial(&counts, &[0.25; 4]);
    }

    #[test]
    fn never_picks_a_drained_endpoint() {
        let keys = keys(3);
        let eps = endpoints(&keys, &[0, 5, 1]);
        let counts = counts(&Random, &eps, 4000);
        assert_eq!(counts[0], 0, "{counts:?}");
        assert_binomial(&counts[1..], &[0.5, 0.5]);
        assert!(Random.pick(&endpoints(&keys, &[0, 0, 0])).is_none());
    }
}
