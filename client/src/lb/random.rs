//! Uniform random choice.

use super::policy::{Endpoint, Pick, Policy};
use rand::Rng;

/// Picks uniformly at random; weights are ignored. Stateless.
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl Policy for Random {
    fn pick(&self, endpoints: &[Endpoint<'_>]) -> Option<Pick> {
        if endpoints.is_empty() {
            return None;
        }
        Some(Pick::index(rand::rng().random_range(0..endpoints.len())))
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
}
