//! A configuration the registry would refuse is refused by the node when it
//! loads it, with its line, and the last good one stays registered: also
//! after a registry restart, when everything is registered again.
#![allow(clippy::unwrap_used)]

mod common;

use common::{CHANGE, Node, resolve, wait_for_weights};
use testkit::Registry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_five_metadata_entries_are_refused_and_survive_a_registry_restart() {
    let mut first = Registry::start(&[]);
    let addr = first.addr;
    let node = Node::start(addr, "[plugins.calculator]\nweight = 7\n");
    let mut client = first.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7)]).await;

    // One entry over the registry's limit (registry_proto::limits).
    let entries: String = (0..65).map(|i| format!("k{i} = \"v\"\n")).collect();
    let from = node.process.line_count();
    node.write_config(&format!(
        "[plugins.calculator]\nweight = 3\n\n[plugins.calculator.metadata]\n{entries}"
    ));
    let (_, line) = node.process.wait_for_line_after(
        from,
        "services.toml:4: plugin `calculator`: metadata: at most 64 entries (the registry's limit), got 65; keeping the last good configuration",
        CHANGE,
    );
    assert!(line.contains("ERROR"), "{line}");
    let calc = resolve(&mut client, "calculator").await;
    assert_eq!(calc.len(), 1);
    assert_eq!(calc[0].weight, Some(7));
    assert!(calc[0].metadata.is_empty());

    // A registry restart: the calculator comes back, as last accepted.
    first.process.kill9();
    node.process
        .wait_for_line_after(from, "still serving, retrying", CHANGE);
    let second = Registry::start_on(&addr.to_string(), &[]);
    let mut client = second.client().await;
    wait_for_weights(&mut client, node.addr, &[("calculator", 7)]).await;
    assert!(
        resolve(&mut client, "calculator").await[0]
            .metadata
            .is_empty()
    );
    assert!(
        node.process.lines()[from..]
            .iter()
            .all(|l| !l.contains("weight 3")),
        "the refused settings were never applied"
    );
}
