//! Replays the committed fuzz corpus of the `registry_requests` target (and any
//! saved regressions) through the same function the fuzzer calls, so every
//! input it ever kept is re-checked by `cargo test`. See fuzz/README.md.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// The files directly under `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_and_regressions_pass() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = files(&fuzz.join("corpus/registry_requests"));
    assert!(!corpus.is_empty(), "empty corpus in {}", fuzz.display());
    let regressions = files(&fuzz.join("regressions/registry_requests"));
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap();
        // A panic here names the input: replay it with
        // `cargo fuzz run -s none registry_requests <file>`.
        eprintln!("{}", path.display());
        registry::fuzzing::requests(&data);
    }
}
