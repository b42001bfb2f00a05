#!/bin/sh
# Run a few GRPO steps of recipes/tiny-grpo.yaml under mpirun with one data-parallel layout and
# compare them with the single-process run of the same settings (compare_grpo_runs.cpp: every
# metrics line and every tensor of the final checkpoint).
#
#   run_grpo_layout.sh DSX MPIEXEC COMPARE WORK NAME REFERENCE NP RTOL [--set key=value ...]
#
# NP = 0 runs without mpirun and compares nothing (a reference run; REFERENCE is ignored);
# otherwise WORK/REFERENCE must hold the single-process run of the same overrides. The settings
# exercise every step-wide quantity the ranks must reduce: DAPO dynamic sampling with refill
# rounds (kept groups numbered across ranks; 1-digit addition after a short SFT leaves 40-60 %
# of the groups with equal rewards), scale_rewards: batch (the step's reward std), the dapo token
# normalisation, a KL term to a reference model (β > 0), μ = 2 updates per step (clipping), an
# evaluation split unevenly (3 held-out prompts over 2 ranks) and the rollout metrics (accuracy
# is not 0).
set -eu
dsx=$1 mpiexec=$2 compare=$3 work=$4 name=$5 reference=$6 np=$7 rtol=$8
shift 8
recipe="$(dirname "$0")/../../../recipes/tiny-grpo.yaml"
common="--set train.steps=3 --set grpo.addition.digits=1 --set grpo.sft_steps=80 --set grpo.sft_lr=5e-3
        --set grpo.sft_batch=16 --set grpo.prompts_per_step=4
        --set grpo.group_size=4 --set grpo.max_completion_length=24 --set grpo.dynamic_sampling=true
        --set grpo.resample_rounds=1 --set grpo.scale_rewards=batch --set grpo.beta=0.04 --set grpo.mu=2
        --set grpo.eval.count=3 --set grpo.eval.samples=2 --set grpo.eval.interval=2 --set logging.interval=1
        --set checkpoint.resume=never --set logging.run_dir=$work/$name"
rm -rf "${work:?}/$name"
mkdir -p "$work"
if [ "$np" = 0 ]; then
  # shellcheck disable=SC2086
  "$dsx" grpo "$recipe" $common "$@"
  exit 0
fi
# shellcheck disable=SC2086
"$mpiexec" --oversubscribe --bind-to none -np "$np" "$dsx" grpo "$recipe" $common "$@" >"$work/$name.out" 2>&1 || {
  cat "$work/$name.out"
  exit 1
}
cat "$work/$name.out"
# Rank 0 alone prints: one banner, one final line.
for line in "dsx grpo:" "done:"; do
  n=$(grep -c "^$line" "$work/$name.out" || true)
  [ "$n" = 1 ] || { echo "expected one line starting with '$line', got $n"; exit 1; }
done
exec "$compare" "$work/$reference" "$work/$name" "$rtol"
