#!/usr/bin/env bash
# Creates or updates the Python virtual environment used by reference checks and benchmarks
# (never by dsx itself): <repo>/.venv with Hugging Face `tokenizers`, `safetensors` and numpy.
#   tools/python-env.sh            quiet; prints one line saying what it did
#   tools/python-env.sh --help
# Idempotent: when .venv already imports every package it returns at once. When the package
# registry cannot be reached it prints the reason and still exits 0, so callers (tests) can
# skip with that reason instead of failing.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PACKAGES=(tokenizers safetensors numpy)
MODULES=(tokenizers safetensors numpy)

case "${1:-}" in
  -h | --help)
    sed -n '2,7p' "$0"
    exit 0
    ;;
  "") ;;
  *)
    echo "python-env.sh: unknown option $1 (see --help)" >&2
    exit 2
    ;;
esac

VENV=.venv
PY="$VENV/bin/python"

imports_ok() {
  local stmt=""
  for m in "${MODULES[@]}"; do stmt+="import $m;"; done
  [[ -x "$PY" ]] && "$PY" -c "$stmt" >/dev/null 2>&1
}

if imports_ok; then
  echo "python-env: $VENV ready ($("$PY" -c 'import tokenizers, safetensors; print("tokenizers", tokenizers.__version__, "safetensors", safetensors.__version__)'))"
  exit 0
fi

if ! command -v python3 >/dev/null 2>&1; then
  echo "python-env: python3 not found; install python3 and python3-venv"
  exit 0
fi

if [[ ! -x "$PY" ]]; then
  if ! log=$(python3 -m venv "$VENV" 2>&1); then
    echo "python-env: could not create $VENV (is python3-venv installed?): $(tail -n 1 <<<"$log")"
    rm -rf "$VENV"
    exit 0
  fi
fi

# Short timeouts and one retry: an unreachable registry should cost seconds, not minutes.
if ! log=$("$PY" -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 20 \
  "${PACKAGES[@]}" 2>&1); then
  echo "python-env: pip could not install ${PACKAGES[*]}: $(grep -m1 -E 'ERROR|error' <<<"$log" || tail -n 1 <<<"$log")"
  exit 0
fi

if imports_ok; then
  echo "python-env: installed ${PACKAGES[*]} into $VENV"
else
  echo "python-env: ${PACKAGES[*]} installed but cannot be imported by $PY"
fi
exit 0
