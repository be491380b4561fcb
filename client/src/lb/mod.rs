//! Client-side load balancing: which instance of a service gets the next call.
//!
//! # The problem
//! The registry lists several instances of a service, each with a weight
//! (1..=1000) that says what share of the traffic it should take, or 0: the
//! instance is *drained*, still listed but taking no new calls (how an
//! operator empties a node before taking it down). Every policy skips
//! drained instances, the ones that ignore weights too. The client
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
mod policy;
mod random;
#[cfg(test)]
mod test_support;
mod weighted_random;
mod weighted_round_robin;

pub use least_loaded::LeastLoaded;
pub(crate) use policy::KeyMap;
pub use policy::{Endpoint, InFlightGuard, Pick, Policy};
pub use random::Random;
pub use weighted_random::WeightedRandom;
pub use weighted_round_robin::WeightedRoundRobin;

use std::sync::Arc;

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
    fn all_drained_gives_no_pick() {
        use clap::ValueEnum;
        let keys = test_support::keys(3);
        let eps = test_support::endpoints(&keys, &[0, 0, 0]);
        for kind in PolicyKind::value_variants() {
            assert!(kind.build().pick(&eps).is_none(), "{kind:?}");
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
