#!/usr/bin/env bash
# Runs every test: installs what the tests drive when it is missing
# (scripts/test-deps.sh: etcd, a Python virtualenv, npm packages, ...), then
# `cargo test --workspace`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
exec cargo test --workspace "$@"
