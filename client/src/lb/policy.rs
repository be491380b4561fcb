//! What every policy has in common: the [`Policy`] trait, the [`Endpoint`]s
//! it picks from, and the [`Pick`] it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A map keyed by an endpoint key or a service name, looked up at every
/// call. foldhash, seeded at random per process: without SipHash's
/// guarantee against crafted collisions, but its keys are registered
/// addresses and service names, at most as many as a service has
/// instances (or as a client calls services), so a crafted set could at
/// worst slow the picks of one service.
pub(crate) type KeyMap<V> = std::collections::HashMap<String, V, foldhash::fast::RandomState>;

/// One candidate for a pick: an instance, identified by a stable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<'a> {
    /// Stable identity of the instance (stateful policies key their state by
    /// it, so it must not change while the instance lives), e.g. `host:port`.
    pub key: &'a str,
    /// Relative share of traffic. 0 means drained: the instance is listed
    /// but no policy picks it for a new call.
    pub weight: u32,
}

impl Endpoint<'_> {
    /// The weight as used for balancing (0 for a drained endpoint).
    pub fn effective_weight(&self) -> u64 {
        u64::from(self.weight)
    }

    /// Whether it is drained (weight 0): listed, but taking no new calls.
    pub fn is_drained(&self) -> bool {
        self.weight == 0
    }
}

/// The endpoints a policy may pick, with their indices: every one that is
/// not drained.
pub(super) fn live<'s, 'a>(
    endpoints: &'s [Endpoint<'a>],
) -> impl Iterator<Item = (usize, &'s Endpoint<'a>)> + Clone {
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.is_drained())
}

/// The outcome of a pick: which endpoint, plus whatever must live as long as
/// the call (an in-flight counter for [`LeastLoaded`](super::LeastLoaded)).
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
    /// Chooses one of `endpoints` that is not drained (weight 0); `None`
    /// only when there is none (the slice is empty or all are drained).
    fn pick(&self, endpoints: &[Endpoint<'_>]) -> Option<Pick>;

    /// The policy's name as on the command line.
    fn name(&self) -> &'static str;
}

/// Counts one call in flight; decrements its endpoint's counter when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    /// The endpoint's counter.
    counter: Arc<AtomicUsize>,
}

impl InFlightGuard {
    /// Counts against `counter`, already incremented.
    pub(super) fn new(counter: Arc<AtomicUsize>) -> InFlightGuard {
        InFlightGuard { counter }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}
