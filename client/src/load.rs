//! `call --repeat N`: the same call made N times, some at once, counting
//! which instance served each, for the spread table
//! ([`render::spread_table`](crate::render::spread_table)).
//!
//! Ctrl-C or SIGTERM ends a long run early, as `ping` does: no new call
//! starts, those in flight finish, and the outcome covers what was made. A
//! second signal leaves at once (exit status 130).

use crate::call::{CallError, Caller, Reply, method_name};
use crate::directory::address;
use crate::resolve::Target;
use futures::StreamExt as _;
use prost_reflect::DynamicMessage;
use std::collections::BTreeMap;
use support::{AbortOnDropHandle, CancellationToken, Signals};

/// How many calls, and how many at once.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Calls to make in all.
    pub calls: u32,
    /// Calls in flight at once (at least 1).
    pub concurrency: u32,
}

/// What a run made.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Calls served, by instance address.
    pub served: BTreeMap<String, u32>,
    /// Calls that failed.
    pub failures: u32,
    /// The first failure, if any.
    pub first_error: Option<CallError>,
}

impl Outcome {
    /// Calls made (served or failed): fewer than asked after a signal.
    pub fn made(&self) -> u32 {
        self.served.values().sum::<u32>() + self.failures
    }
}

/// Calls `target` with `requests` as `load` says. `on_first_reply` sees the
/// replies of the first call that succeeds as soon as it does, so a watcher
/// can tell the calls are under way.
pub async fn run(
    caller: &Caller,
    target: &Target,
    requests: &[DynamicMessage],
    load: Load,
    mut on_first_reply: impl FnMut(&[DynamicMessage]),
) -> Outcome {
    let one_call = |_| {
        let requests = requests.to_vec();
        async move {
            let called = caller.call_messages(target, requests).await?;
            let replies =
                collect_replies(called.reply)
                    .await
                    .map_err(|status| CallError::Status {
                        // As the Caller names it in its own errors.
                        method: method_name(&target.method),
                        instance: address(&called.instance),
                        status,
                    })?;
            // Counted as in flight until here (least-loaded).
            drop(called.guard);
            Ok::<_, CallError>((address(&called.instance), replies))
        }
    };
    let stop = CancellationToken::new();
    let _on_signal = AbortOnDropHandle::new(tokio::spawn({
        let stop = stop.clone();
        async move {
            // Neither signal can be caught: the run is never stopped early.
            let Ok(mut signals) = Signals::install() else {
                return;
            };
            signals.recv().await;
            stop.cancel();
            signals.recv().await;
            std::process::exit(130);
        }
    }));
    let mut calls = futures::stream::iter(0..load.calls)
        .take_while(|_| futures::future::ready(!stop.is_cancelled()))
        .map(one_call)
        .buffer_unordered(load.concurrency.max(1) as usize);
    let mut outcome = Outcome::default();
    let mut printed = false;
    while let Some(result) = calls.next().await {
        match result {
            Ok((addr, replies)) => {
                *outcome.served.entry(addr).or_default() += 1;
                if !printed {
                    printed = true;
                    on_first_reply(&replies);
                }
            }
            Err(e) => {
                outcome.failures += 1;
                outcome.first_error.get_or_insert(e);
            }
        }
    }
    outcome
}

/// Every message of a reply (one for a unary method).
async fn collect_replies(reply: Reply) -> Result<Vec<DynamicMessage>, tonic::Status> {
    match reply {
        Reply::Unary(msg) => Ok(vec![msg]),
        Reply::Stream(mut stream) => {
            let mut all = Vec::new();
            while let Some(msg) = stream.message().await? {
                all.push(msg);
            }
            Ok(all)
        }
    }
}
