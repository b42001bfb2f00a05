#!/usr/bin/env bash
# The weight EMA through the real binary: a run with optim.ema_decay writes ema.* tensors, which
# `dsx convert to-hf --ema` exports (with "weight EMA" said); a run without the EMA is refused by
# `dsx convert to-hf --ema` and `dsx generate --ema`, naming the checkpoint, before anything else.
#   ema_test.sh DSX SOURCE_DIR WORK_DIR
set -uo pipefail
dsx="$1" src="$2" work="$3"
rm -rf "$work" && mkdir -p "$work"
fail() { echo "FAIL: $*"; exit 1; }
train() {  # RUN_DIR, then --set overrides
  local run="$1"; shift
  "$dsx" train "$src/recipes/tiny.yaml" --set train.steps=2 --set optim.schedule.warmup=1 \
    --set logging.run_dir="$run" "$@" > "$run.log" 2>&1 || { cat "$run.log"; fail "training $run"; }
}
train "$work/with" --set optim.ema_decay=0.5
train "$work/without"

out="$("$dsx" checkpoint inspect "$work/with/checkpoints" 2>&1)" || { echo "$out"; fail "inspect"; }
grep -q "ema.model.embed_tokens.weight" <<<"$out" || { echo "$out"; fail "no ema.* tensors in the checkpoint"; }
out="$("$dsx" convert to-hf --ema --dtype f32 "$work/with/checkpoints" "$work/hf-ema" 2>&1)" || { echo "$out"; fail "convert --ema"; }
grep -q "weight EMA" <<<"$out" || { echo "$out"; fail "convert does not say it exports the EMA"; }
[[ -f "$work/hf-ema/model.safetensors" ]] || fail "no model.safetensors"

for cmd in "convert to-hf --ema $work/without/checkpoints $work/hf-none" \
           "generate --ema --checkpoint $work/without/checkpoints --prompt 1"; do
  # shellcheck disable=SC2086
  out="$("$dsx" $cmd 2>&1)"
  code=$?
  [[ $code -eq 2 ]] || { echo "$out"; fail "dsx $cmd exited $code, expected 2"; }
  grep -q -- "--ema: $work/without/checkpoints/step-000002 holds no weight EMA" <<<"$out" || { echo "$out"; fail "message of dsx $cmd"; }
done
echo "ema_test: passed"
