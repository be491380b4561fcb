//! Client-side load balancing: which instance of a service gets the next call.
//!
//! # The problem
//! The registry lists several instances of a service, each with a weight
//! (1..=1000) that says what share of the traffic it should take. The client
//! connects to instances directly, so the client decides where each call goes.
//! A policy makes that decision from the current list of [`Endpoint`]s; the
//! list changes as instances come and go, and a policy must cope with that.
//!
//! # Which policy when
//! - [`Random`] (`random`): stateless, uniform, ignores weights. Good when the
//!   instances are alike and the caller is short-lived (one CLI call).
//! - [`WeightedRandom`] (`weighted-random`): stateless, each instance chosen
//!   with probability weight / total. Right on average, but bursty: over a few
//!   calls an instance can be chosen many times in a row.
//! - [`WeightedRoundRobin`] (`weighted-round-robin`): stateful *smooth*
//!   weighted round robin (as in nginx). Over every cycle of `total weight`
//!   picks each instance gets exactly its weight, interleaved rather than in
//!   bursts. Best for a long-lived caller that wants the promised shares.
//! - [`LeastLoaded`] (`least-loaded`): power of two choices on the number of
//!   calls in flight per instance. Ignores weights; adapts to slow instances.
//!   Useful when calls overlap (many concurrent calls from one process).
//!
//! Every policy returns a [`Pick`]: hold it while the call runs, so policies
//! that count in-flight calls see the call end when it is dropped.

mod least_loaded;
mod random;
mod weighted_random;
mod weighted_round_robin;

pub use least_loaded::{InFlightGuard, LeastLoaded};
pub use random::Random;
pub use weighted_random::WeightedRandom;
pub use weighted_round_robin::WeightedRoundRobin;

use std::sync::Arc;

/// One candidate for a pick: an instance, identified by a stable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<'a> {
    /// Stable identity of the instance (stateful policies key their state by
    /// it, so it must not change while the instance lives), e.g. `host:port`.
    pub key: &'a str,
    /// Relative share of traffic; 0 is treated as 1, as the registry does.
    pub weight: u32,
}

impl Endpoint<'_> {
    /// The weight as used for balancing: at least 1.
    pub fn effective_weight(&self) -> u64 {
        u64::from(self.weight.max(1))
    }
}

/// The outcome of a pick: which endpoint, plus whatever must live as long as
/// the call (an in-flight counter for [`LeastLoaded`]).
#[derive(Debug)]
pub struct Pick {
    /// Index into the endpoint slice given to [`Policy::pick`].
    pub index: usize,
    /// Decrements the in-flight count of the chosen endpoint when dropped.
    pub guard: Option<InFlightGuard>,
}

impl Pick {
    /// A pick with nothing to hold.
    pub fn index(index: usize) -> Pick {
        Pick { index, guard: None }
    }
}

/// A load-balancing policy. Implementations are shared between concurrent
/// calls, hence `Send + Sync` and `&self`.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Chooses one of `endpoints`; `None` only when it is empty.
    fn pick(&self, endpoints: &[Endpoint<'_>]) -> Option<Pick>;

    /// The policy's name as on the command line.
    fn name(&self) -> &'static str;
}

/// The policies, by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PolicyKind {
    /// Uniform random choice; ignores weights.
    Random,
    /// Random choice with probability proportional to weight.
    WeightedRandom,
    /// Smooth weighted round robin: exact shares, no bursts.
    #[default]
    WeightedRoundRobin,
    /// Power of two choices on in-flight calls.
    LeastLoaded,
}

impl PolicyKind {
    /// A fresh policy of this kind.
    pub fn build(self) -> Arc<dyn Policy> {
        match self {
            PolicyKind::Random => Arc::new(Random),
            PolicyKind::WeightedRandom => Arc::new(WeightedRandom),
            PolicyKind::WeightedRoundRobin => Arc::new(WeightedRoundRobin::default()),
            PolicyKind::LeastLoaded => Arc::new(LeastLoaded::default()),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_and_names_itself_as_on_the_command_line() {
        use clap::ValueEnum;
        for kind in PolicyKind::value_variants() {
            let name = kind
                .to_possible_value()
                .expect("visible")
                .get_name()
                .to_string();
            assert_eq!(kind.build().name(), name);
        }
    }

    #[test]
    fn empty_set_gives_no_pick() {
        for kind in [
            PolicyKind::Random,
            PolicyKind::WeightedRandom,
            PolicyKind::WeightedRoundRobin,
            PolicyKind::LeastLoaded,
        ] {
            assert!(kind.build().pick(&[]).is_none(), "{kind:?}");
        }
    }
}
