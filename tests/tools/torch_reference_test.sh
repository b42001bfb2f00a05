#!/usr/bin/env bash
# tools/bench/torch_deepseek_v3.py on the CPU: the tiny recipe for 2 steps, and its parameter
# counts against dsx's rules (the script prints "totals match" when transformers' model and
# dsx's spec list agree). Needs torch, transformers and pyyaml: taken from $DSX_TORCH_PYTHON,
# else <repo>/.venv (tools/python-env.sh); without them the test prints why and exits 77
# (ctest: skipped). The GPU run is tools/gpu/run_all.sh's.
#   torch_reference_test.sh SOURCE_DIR
set -uo pipefail
src="$(cd "$1" && pwd)"
py="${DSX_TORCH_PYTHON:-$src/.venv/bin/python}"
if [[ ! -x "$py" ]] || ! "$py" -c 'import torch, transformers, yaml' 2>/dev/null; then
  echo "SKIPPED: $py cannot import torch, transformers and yaml (PyTorch's CPU wheel is gigabytes; set" \
    "DSX_TORCH_PYTHON to a python that has them)"
  exit 77
fi
out="$("$py" "$src/tools/bench/torch_deepseek_v3.py" "$src/recipes/tiny.yaml" --device cpu --steps 2 --warmup 1 2>&1)"
rc=$?
echo "$out"
[[ $rc -eq 0 ]] || { echo "FAIL: exit $rc"; exit 1; }
grep -q "totals match" <<<"$out" || { echo "FAIL: transformers' parameter count differs from dsx's"; exit 1; }
grep -qE "^torch_deepseek_v3: [0-9.]+ tokens/s" <<<"$out" || { echo "FAIL: no tokens/s line"; exit 1; }
echo "torch_reference: passed"
