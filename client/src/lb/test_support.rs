//! Helpers for the policies' tests.

use super::policy::{Endpoint, Policy};

/// `n` endpoint keys: `e0`, `e1`, ...
pub(crate) fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("e{i}")).collect()
}

/// Endpoints over `keys` with the given weights.
pub(crate) fn endpoints<'a>(keys: &'a [String], weights: &[u32]) -> Vec<Endpoint<'a>> {
    keys.iter()
        .zip(weights)
        .map(|(key, &weight)| Endpoint { key, weight })
        .collect()
}

/// Counts how often each index is picked in `n` picks.
pub(crate) fn counts(policy: &dyn Policy, eps: &[Endpoint<'_>], n: usize) -> Vec<usize> {
    let mut counts = vec![0; eps.len()];
    for _ in 0..n {
        let pick = policy.pick(eps).expect("non-empty");
        counts[pick.index] += 1;
    }
    counts
}

/// Asserts each count is within 5 binomial standard deviations of
/// `n * p_i`: a false failure has probability below 1e-6 per endpoint.
pub(crate) fn assert_binomial(counts: &[usize], probabilities: &[f64]) {
    let n: usize = counts.iter().sum();
    for (i, (&c, &p)) in counts.iter().zip(probabilities).enumerate() {
        let mean = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (c as f64 - mean).abs() <= 5.0 * sigma + 1.0,
            "endpoint {i}: {c} picks, expected {mean:.1} ± {:.1} (counts {counts:?})",
            5.0 * sigma
        );
    }
}
