#!/usr/bin/env bash
# Brings the whole system up on this machine: a registry, two node hosts with
# different services.toml files and weights, then shows what the client sees.
# When .venv has Python with the gRPC packages (scripts/test-deps.sh makes
# it), a third node mounts the Python example plugin (examples/plugins) beside
# the calculator. Ctrl-C (or SIGTERM) stops everything, at any moment.
#
# If a process does not come up (the port is taken by another demo, say),
# the script stops within seconds with that process's own error.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY_ADDR:-127.0.0.1:50051}
export REGISTRY_ADDR=$REGISTRY
logs=$(mktemp -d)
pids=()
stop() {
  local code=${1:-0}
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo
    echo "stopping: ${pids[*]}"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "logs were in $logs"
  exit "$code"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop $?' EXIT

# Waits for LINE in process PID's LOG, for at most 30 s; if the process
# exits or the time runs out, shows its log and stops the demo.
wait_for() {
  local line=$1 log=$2 pid=$3 what=$4
  for _ in $(seq 300); do
    grep -q "$line" "$log" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "demo: $what exited:" >&2
      show_error "$log"
      stop 1
    fi
    sleep 0.1
  done
  echo "demo: $what did not come up within 30 s:" >&2
  show_error "$log"
  stop 1
}

# The process's own error: its `Error:` lines (not a backtrace after them,
# when RUST_BACKTRACE is set), else the end of its log.
show_error() {
  local plain
  plain=$(sed 's/\x1b\[[0-9;]*m//g' "$1")
  if grep -q '^Error' <<<"$plain"; then
    sed -n '/^Error/,/^Stack backtrace/p' <<<"$plain" | grep -v '^Stack backtrace' | sed '/^$/d' >&2
  else
    tail -5 <<<"$plain" >&2
  fi
}

# In the background, so a signal stops the demo during the build too. (Its
# dependencies resolve as `cargo test`'s do, see tokio in Cargo.toml: a test
# run after the demo rebuilds only the workspace's own crates.)
cargo build --quiet --workspace --bins &
build=$!
pids+=($build)
wait $build || stop 1
pids=()
bin=target/debug

"$bin/registry" --listen "$REGISTRY" --http "${DASHBOARD:-127.0.0.1:8080}" >"$logs/registry.log" 2>&1 &
pids+=($!)
wait_for "listening on" "$logs/registry.log" $! registry

for node in a b; do
  # A copy of the example, so editing it (hot reload) leaves the repo alone.
  cp "examples/node-$node.toml" "$logs/node-$node.toml"
  "$bin/node-host" --config "$logs/node-$node.toml" </dev/null >"$logs/node-$node.log" 2>&1 &
  pids+=($!)
  eval "node_$node=$!"
done
wait_for "serving on" "$logs/node-a.log" "$node_a" "node-host a"
wait_for "serving on" "$logs/node-b.log" "$node_b" "node-host b"

# Node C: an external plugin in Python, run by node-host from its table.
py=.venv/bin/python3
plugin=no
if [ -x "$py" ] && "$py" -c "import grpc, grpc_tools, grpc_health.v1, grpc_reflection" 2>/dev/null; then
  sed -e "s|\"../../.venv/bin/python3\"|\"$PWD/$py\"|" \
      -e "s|\"inventory.py\"|\"$PWD/examples/plugins/inventory.py\"|" \
      examples/plugins/services.toml >"$logs/node-c.toml"
  "$bin/node-host" --config "$logs/node-c.toml" </dev/null >"$logs/node-c.log" 2>&1 &
  pids+=($!)
  node_c=$!
  for _ in $(seq 300); do
    grep -q "plugin inventory .* is SERVING" "$logs/node-c.log" && { plugin=yes; break; }
    kill -0 "$node_c" 2>/dev/null || break
    sleep 0.1
  done
  [ $plugin = yes ] || echo "the Python plugin did not start; see $logs/node-c.log"
else
  echo "(no Python plugin: $py with grpcio, grpcio-tools, grpcio-health-checking and"
  echo " grpcio-reflection is missing; scripts/test-deps.sh makes it)"
fi
sleep 0.5 # let the first registrations land

"$bin/client" list
echo
echo "Try, in another terminal:"
echo "  $bin/client call calculator/Add a=2 b=3"
echo "  $bin/client call calculator/Divide '{\"a\": 1, \"b\": 4}' --lb weighted-round-robin --repeat 12"
echo "  $bin/client call echo/Echo message=hello"
echo "  $bin/client watch            # then edit $logs/node-b.toml"
echo "  $bin/client                  # interactive prompt"
echo "  open http://${DASHBOARD:-127.0.0.1:8080}/   # live dashboard; Prometheus metrics at /metrics"
if [ $plugin = yes ]; then
  echo "  $bin/client call inventory/Put name=apple count=3      # the Python plugin"
  echo "  $bin/client call inventory/List                        # a stream of items"
  echo "  $bin/client describe inventory"
fi
echo
echo "Registry and nodes are running (logs in $logs). Ctrl-C stops them."
# Until a signal, or until one of them exits by itself (then say which).
set +e
wait -n "${pids[@]}"
echo "demo: a process exited; see $logs" >&2
stop 1
