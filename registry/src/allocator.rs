//! The registry binary's allocator: jemalloc, which gives freed memory
//! back to the system, and what it says it holds.
//!
//! Why not glibc's malloc: after 1000 Watch streams that never read closed
//! (testkit/tests/watch_attack.rs), the registry's own count of what
//! watchers hold went back to its pre-attack value while RSS stayed at the
//! attack's peak (178 MB before, 347 MB during and 8 s after): glibc keeps
//! freed memory in its per-thread arenas. jemalloc, with a background
//! thread and the short decay set in `.cargo/config.toml`, returns it
//! within about a second.

use tikv_jemalloc_ctl::{epoch, stats};

/// The allocator the `registry` binary installs (`#[global_allocator]`).
pub use tikv_jemallocator::Jemalloc as Allocator;

/// What the allocator holds now, by its own statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes the program has allocated and not freed.
    pub allocated: usize,
    /// Bytes of pages the allocator holds in memory (what it adds to RSS).
    pub resident: usize,
}

/// The allocator's statistics now; `None` if it cannot give them. Only
/// meaningful in a program whose global allocator is [`Allocator`].
pub fn usage() -> Option<Usage> {
    // The statistics are cached until the epoch moves on.
    epoch::advance().ok()?;
    Some(Usage {
        allocated: stats::allocated::read().ok()?,
        resident: stats::resident::read().ok()?,
    })
}
