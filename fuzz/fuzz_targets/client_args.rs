//! See `registry_client::fuzzing` for the input format and the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    registry_client::fuzzing::args(data);
});
