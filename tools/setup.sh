#!/usr/bin/env bash
# Installs the Debian packages dsx needs (only the missing ones), then configures and builds.
#   tools/setup.sh [--no-build] [--preset release|debug-asan]
# Idempotent: a second run installs nothing and rebuilds only what changed (ccache).
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=release
BUILD=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --preset) PRESET="$2"; shift ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config python3 python3-venv
  libopenmpi-dev openmpi-bin libhdf5-dev libyaml-cpp-dev catch2 libopenblas-dev
  nlohmann-json3-dev libcli11-dev libfmt-dev libonig-dev
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[[ $BUILD -eq 1 ]] || exit 0
# ccache keys on paths relative to the checkout, so fresh clones (CI) reuse earlier builds.
export CCACHE_BASEDIR="$PWD"
cmake --preset "$PRESET" >/dev/null
time_start=$(date +%s)
cmake --build --preset "$PRESET"
echo "setup: built build/$PRESET in $(( $(date +%s) - time_start )) s"
