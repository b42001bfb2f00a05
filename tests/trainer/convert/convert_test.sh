#!/usr/bin/env bash
# dsx convert end to end: train the tiny recipe for 2 steps, export its checkpoint in bf16 (one
# file) and in f32 (sharded, with an index), and check both directories with the reference
# `safetensors` package (check_hf_dir.py; skipped, exit 77, without it); a second export into the
# same directory is refused; the f32 export imports (from-hf) into a checkpoint a new run starts
# from (checkpoint.init_from).
#   convert_test.sh DSX SOURCE_DIR WORK_DIR
set -uo pipefail
dsx="$1" src="$2" work="$3"
py="$src/.venv/bin/python"
if [[ ! -x "$py" ]] || ! "$py" -c 'import safetensors, numpy' 2>/dev/null; then
  echo "SKIPPED: $py cannot import safetensors and numpy (tools/python-env.sh installs them)"
  exit 77
fi
rm -rf "$work" && mkdir -p "$work"
"$dsx" train "$src/recipes/tiny.yaml" --set train.steps=2 --set optim.schedule.warmup=1 --set logging.run_dir="$work/run" > "$work/train.log" 2>&1 ||
  { cat "$work/train.log"; echo "FAIL: training"; exit 1; }
check() {  # OUT_DIR, then the dsx convert arguments after it
  local out="$1"; shift
  local log
  log="$("$dsx" convert to-hf "$work/run/checkpoints" "$out" "$@" 2>&1)" || { echo "$log"; echo "FAIL: convert $*"; exit 1; }
  echo "$log"
  local params
  params="$(sed -n 's/^done: [0-9]* tensors (\([0-9]*\) parameters).*/\1/p' <<<"$log")"
  [[ -n "$params" ]] || { echo "FAIL: no parameter count in the output"; exit 1; }
  "$py" "$src/tests/trainer/convert/check_hf_dir.py" "$out" "$params" || { echo "FAIL: check_hf_dir $out"; exit 1; }
}
check "$work/hf-bf16"
check "$work/hf-f32" --dtype f32 --max-shard-gb 0.002
[[ -f "$work/hf-f32/model.safetensors.index.json" ]] || { echo "FAIL: the f32 export is not sharded"; exit 1; }
if out="$("$dsx" convert to-hf "$work/run/checkpoints" "$work/hf-bf16" 2>&1)"; then
  echo "FAIL: a second export into a full directory was accepted"; exit 1
fi
grep -q "exists and is not an empty directory" <<<"$out" || { echo "$out"; echo "FAIL: message"; exit 1; }
# and back: the f32 export imported as a checkpoint that a new run starts from
log="$("$dsx" convert from-hf "$work/hf-f32" "$work/imported" 2>&1)" || { echo "$log"; echo "FAIL: from-hf"; exit 1; }
echo "$log"
grep -q "^done: 171 tensors (1409280 parameters; 0 FP8 weights dequantized, 0 other tensors skipped)" <<<"$log" ||
  { echo "FAIL: from-hf should read every tensor of the tiny model's export"; exit 1; }
log="$("$dsx" train "$src/recipes/tiny.yaml" --set train.steps=2 --set optim.schedule.warmup=1 \
  --set checkpoint.init_from="$work/imported" --set logging.run_dir="$work/run-from-import" 2>&1)" ||
  { echo "$log"; echo "FAIL: training from the import"; exit 1; }
grep -q "initialised the model from $work/imported/step-000000" <<<"$log" || { echo "$log"; echo "FAIL: init line"; exit 1; }
echo "convert_test: passed"
