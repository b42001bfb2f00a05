#!/usr/bin/env bash
# `dsx launch --launcher slurm --dry-run` writes the sbatch script and submits nothing: the
# script's #SBATCH directives and srun line must match the layout, and a fake sbatch first on
# PATH must not have run. A CPU job gets one-thread exports (the user's value wins), a CUDA job
# one GPU per rank and no exports.
#   slurm_dry_run.sh DSX RECIPE WORK
set -u
dsx=$1 recipe=$2 work=$3
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work" && mkdir -p "$work"
export DSX_FAKE_SLURM_LOG=$work/fake-slurm.log
output=""
fail() {
  echo "FAIL: $*"
  echo "--- dsx launch output:"
  echo "$output"
  exit 1
}
# launch NAME [ARG...]: a dry run writing $work/NAME/launch.sbatch; sets $script.
launch() {
  local name=$1
  shift
  script=$work/$name/launch.sbatch
  output=$(PATH="$here/fake_bin:$PATH" "$dsx" launch "$recipe" --launcher slurm --dry-run \
    --set "logging.run_dir=$work/$name" "$@" 2>&1)
  local code=$?
  [ $code -eq 0 ] || fail "exit code $code"
  [ -f "$script" ] || fail "no script $script"
  grep -qF "dry run, nothing submitted" <<<"$output" || fail "no dry-run notice"
}
expect_line() { grep -qxF -- "$1" "$script" || fail "$script lacks the line: $1"; }
refuse_line() { ! grep -qF -- "$1" "$script" || fail "$script has: $1"; }

export OMP_NUM_THREADS=3  # the user's own value is what the ranks get
unset OPENBLAS_NUM_THREADS
launch cpu --nodes 2 --partition debug --time 00:10:00 --set parallel.dp=4 --set train.micro_batch=2
expect_line "#!/bin/bash"
expect_line "#SBATCH --job-name=dsx-tiny"
expect_line "#SBATCH --nodes=2"
expect_line "#SBATCH --ntasks-per-node=2"
expect_line "#SBATCH --partition=debug"
expect_line "#SBATCH --time=00:10:00"
expect_line "#SBATCH --output=$work/cpu/slurm-%j.out"
expect_line "set -euo pipefail"
expect_line "cd $PWD"
expect_line "export OMP_NUM_THREADS=3"
expect_line "export OPENBLAS_NUM_THREADS=1"
expect_line "srun $(readlink -f "$dsx") train $recipe --set logging.run_dir=$work/cpu --set parallel.dp=4 --set train.micro_batch=2"
refuse_line "--gpus-per-node"
refuse_line "--account"

launch cuda --set model.device=cuda --set parallel.dp=2 --ranks-per-node 2
expect_line "#SBATCH --nodes=1"
expect_line "#SBATCH --ntasks-per-node=2"
expect_line "#SBATCH --gpus-per-node=2"
refuse_line "export OMP_NUM_THREADS"

[ ! -e "$DSX_FAKE_SLURM_LOG" ] || fail "--dry-run ran sbatch: $(cat "$DSX_FAKE_SLURM_LOG")"
echo "ok: $work/cpu/launch.sbatch and $work/cuda/launch.sbatch"
