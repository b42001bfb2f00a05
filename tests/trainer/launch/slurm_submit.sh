#!/usr/bin/env bash
# `dsx launch --launcher slurm` submits its script with the sbatch on PATH: here a fake one
# (fake_bin/) that records its arguments and runs the script with a fake srun recording its
# own. The run directory holds a space and a single quote, so the srun line only gives the
# ranks the right arguments if dsx quoted them correctly for the shell.
#   slurm_submit.sh DSX RECIPE WORK
set -u
dsx=$1 recipe=$2 work=$3
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work" && mkdir -p "$work"
export DSX_FAKE_SLURM_LOG=$work/fake-slurm.log
run_dir="$work/it's a run"
output=$(PATH="$here/fake_bin:$PATH" "$dsx" launch "$recipe" --launcher slurm --job-name launch-test \
  --set parallel.dp=2 --set "logging.run_dir=$run_dir" --stop-after 1 2>&1)
code=$?
fail() {
  echo "FAIL: $*"
  echo "--- dsx launch output:"
  echo "$output"
  echo "--- $DSX_FAKE_SLURM_LOG:"
  cat "$DSX_FAKE_SLURM_LOG" 2>/dev/null
  exit 1
}
[ $code -eq 0 ] || fail "exit code $code"
script=$run_dir/launch.sbatch
grep -qxF "sbatch-arg: $script" "$DSX_FAKE_SLURM_LOG" || fail "sbatch was not given $script"
grep -qxF "#SBATCH --output=\"$run_dir/slurm-%j.out\"" "$script" || fail "no quoted --output line in $script"
ls "$run_dir" | grep -q '\.tmp\.' && fail "a temporary file is left in $run_dir"

expected=("$(readlink -f "$dsx")" train "$recipe" --set parallel.dp=2 --set "logging.run_dir=$run_dir" --stop-after 1)
mapfile -t got < <(sed -n 's/^srun-arg: //p' "$DSX_FAKE_SLURM_LOG")
[ "${#got[@]}" -eq "${#expected[@]}" ] || fail "srun got ${#got[@]} arguments, expected ${#expected[@]}"
for i in "${!expected[@]}"; do
  [ "${got[$i]}" = "${expected[$i]}" ] || fail "srun argument $i is '${got[$i]}', expected '${expected[$i]}'"
done
echo "ok: sbatch $script; srun ${got[*]}"
