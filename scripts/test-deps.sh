#!/usr/bin/env bash
# Installs what the tests drive besides our own binaries, when it is missing:
# Debian packages (as root), a Python virtualenv at .venv with the gRPC
# packages from PyPI, and the npm packages under testkit/js. Idempotent:
# a second run installs nothing. Called by .ci/run; run it once by hand
# before `cargo test --workspace` on a new machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: command -> package.
declare -A apt_pkgs=(
  [ip]=iproute2 [etcd]=etcd-server [dig]=dnsutils [promtool]=prometheus
  [chromium]=chromium [chromedriver]=chromium-driver [node]=nodejs [npm]=npm
  [tmux]=tmux
)
need=()
for cmd in "${!apt_pkgs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("${apt_pkgs[$cmd]}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test-deps: installing ${need[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${need[@]}") >/tmp/test-deps-apt.log 2>&1 \
      || { echo "test-deps: apt-get failed:"; tail -20 /tmp/test-deps-apt.log; exit 1; }
  else
    echo "test-deps: missing ${need[*]} (run this script as root to install them)"
  fi
fi

# Python: one virtualenv for every test that runs a Python gRPC program.
py_pkgs=(grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf selenium)
stamp=.venv/.installed
want="${py_pkgs[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "test-deps: python virtualenv .venv (${py_pkgs[*]})"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "${py_pkgs[@]}"
  echo "$want" >"$stamp"
fi

# npm packages, pinned by testkit/js/package-lock.json when present.
if [ -f testkit/js/package.json ] && [ ! -d testkit/js/node_modules ]; then
  echo "test-deps: npm packages in testkit/js"
  (cd testkit/js && if [ -f package-lock.json ]; then npm ci --silent; else npm install --silent; fi)
fi
