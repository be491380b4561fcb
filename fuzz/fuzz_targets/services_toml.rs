//! See `node_host::fuzzing` for the input format and the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    node_host::fuzzing::services_toml(data);
});
