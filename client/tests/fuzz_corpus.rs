//! Replays the committed fuzz corpus of the `client_args` target (and any saved
//! regressions) through the same function the fuzzer calls, so every input
//! it ever kept is re-checked by `cargo test`. See fuzz/README.md.

#[test]
fn corpus_and_regressions_pass() {
    testkit::replay_fuzz_corpus("client_args", registry_client::fuzzing::args);
}
