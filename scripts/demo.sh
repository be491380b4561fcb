#!/usr/bin/env bash
# Brings the whole system up on this machine: a registry, two node hosts with
# different services.toml files and weights, then shows what the client sees.
# When .venv has Python with the gRPC packages (scripts/test-deps.sh makes
# it), a third node mounts the Python example plugin (examples/plugins) beside
# the calculator. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY_ADDR:-127.0.0.1:50051}
export REGISTRY_ADDR=$REGISTRY
logs=$(mktemp -d)
pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping: ${pids[*]}"
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "logs were in $logs"
}
trap stop INT TERM EXIT

cargo build --quiet --workspace --bins
bin=target/debug

"$bin/registry" --listen "$REGISTRY" --http "${DASHBOARD:-127.0.0.1:8080}" >"$logs/registry.log" 2>&1 &
pids+=($!)
until grep -q "listening on" "$logs/registry.log"; do sleep 0.1; done

for node in a b; do
  # A copy of the example, so editing it (hot reload) leaves the repo alone.
  cp "examples/node-$node.toml" "$logs/node-$node.toml"
  "$bin/node-host" --config "$logs/node-$node.toml" </dev/null >"$logs/node-$node.log" 2>&1 &
  pids+=($!)
done
for node in a b; do
  until grep -q "serving on" "$logs/node-$node.log"; do sleep 0.1; done
done

# Node C: an external plugin in Python, run by node-host from its table.
py=.venv/bin/python3
plugin=no
if [ -x "$py" ] && "$py" -c "import grpc, grpc_tools, grpc_health.v1, grpc_reflection" 2>/dev/null; then
  sed -e "s|\"../../.venv/bin/python3\"|\"$PWD/$py\"|" \
      -e "s|\"inventory.py\"|\"$PWD/examples/plugins/inventory.py\"|" \
      examples/plugins/services.toml >"$logs/node-c.toml"
  "$bin/node-host" --config "$logs/node-c.toml" </dev/null >"$logs/node-c.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    grep -q "plugin inventory .* is SERVING" "$logs/node-c.log" && { plugin=yes; break; }
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
wait
