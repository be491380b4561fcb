#!/usr/bin/env bash
# Runs every test: installs what the tests drive when it is missing
# (scripts/test-deps.sh: etcd, a Python virtualenv, npm packages, ...), then
# `cargo test --workspace`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
cargo test --workspace "$@"
# The registry's behavioural tests once more, every registry over one real
# etcd (each under its own prefix: testkit's TESTKIT_ETCD hook), so both
# stores pass the same suite. Its data lives in /dev/shm: tmpfs, no fsync.
if [ $# -eq 0 ]; then
  echo "test.sh: the registry's behavioural tests over etcd (--store etcd://...)"
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  etcd_dir=$(mktemp -d /dev/shm/test-etcd.XXXXXX)
  client_port=$(free_port)
  peer_port=$(free_port)
  etcd --name test --data-dir "$etcd_dir" \
    --listen-client-urls "http://127.0.0.1:$client_port" --advertise-client-urls "http://127.0.0.1:$client_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "test=http://127.0.0.1:$peer_port" >"$etcd_dir.log" 2>&1 &
  etcd_pid=$!
  trap 'kill "$etcd_pid" 2>/dev/null; rm -rf "$etcd_dir" "$etcd_dir.log"' EXIT
  for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$client_port") 2>/dev/null && break
    sleep 0.1
  done
  TESTKIT_ETCD="127.0.0.1:$client_port" cargo test -p registry \
    --test basics --test leases --test ownership --test validation --test security \
    --test server --test watch --test watch_resume
  kill "$etcd_pid" 2>/dev/null || true
  rm -rf "$etcd_dir" "$etcd_dir.log"
fi
# The multi-host tests need root (network namespaces): they are #[ignore]d,
# so a run without root lists them as ignored, never as passed. As root
# (CI is) they run here, after a full run (no arguments).
if [ $# -eq 0 ] && [ "$(id -u)" = 0 ]; then
  echo "test.sh: the tests that need root (network namespaces)"
  exec cargo test -p testkit -p node-host --test lan --test security --test ha -- --ignored
fi
[ "$(id -u)" = 0 ] || echo "test.sh: not root: the LAN tests (ignored above) did not run; run this script as root to run them"
