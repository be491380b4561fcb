//! Replays the committed fuzz corpus of the `registry_requests` target (and any saved
//! regressions) through the same function the fuzzer calls, so every input
//! it ever kept is re-checked by `cargo test`. See fuzz/README.md.

#[test]
fn corpus_and_regressions_pass() {
    testkit::replay_fuzz_corpus("registry_requests", registry::fuzzing::requests);
}
