//! An instance's weight as the listings print it.

use registry_proto::registry::v1::Instance;

/// An instance's weight as `list` and `watch` print it: `5`, or
/// `0 (drained)` for one that is listed but takes no new calls.
pub fn weight_text(i: &Instance) -> String {
    match i.effective_weight() {
        0 => "0 (drained)".to_string(),
        w => w.to_string(),
    }
}
