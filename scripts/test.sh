#!/usr/bin/env bash
# Runs every test: installs what the tests drive when it is missing
# (scripts/test-deps.sh: etcd, a Python virtualenv, npm packages, ...), then
# `cargo test --workspace`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
cargo test --workspace "$@"
# The multi-host tests need root (network namespaces): they are #[ignore]d,
# so a run without root lists them as ignored, never as passed. As root
# (CI is) they run here, after a full run (no arguments).
if [ $# -eq 0 ] && [ "$(id -u)" = 0 ]; then
  echo "test.sh: the tests that need root (network namespaces)"
  exec cargo test -p testkit -p node-host --test lan --test security --test ha -- --ignored
fi
[ "$(id -u)" = 0 ] || echo "test.sh: not root: the LAN tests (ignored above) did not run; run this script as root to run them"
