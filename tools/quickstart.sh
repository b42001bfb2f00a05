#!/usr/bin/env bash
# From a fresh clone: install what is missing, build, and show the dsx command line.
#   tools/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,3p' "$0"; exit 0; fi
tools/setup.sh
build/release/bin/dsx --help
