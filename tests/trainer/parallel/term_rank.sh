#!/bin/sh
# SIGTERM (what Slurm sends before a time limit) to ONE rank of a running `mpirun -np 2 dsx train`
# with two pipeline stages: every rank stops at the same step boundary, the job exits 0 with a
# complete checkpoint of that step, and the same command resumes from it and ends where an
# uninterrupted single-process run of the recipe ends (every step's loss, every tensor).
#
#   term_rank.sh DSX MPIEXEC COMPARE_RUNS WORK VICTIM
set -u
dsx=$1 mpiexec=$2 compare=$3 work=$4 victim=$5
recipe="$(dirname "$0")/../../../recipes/tiny.yaml"
run="$work/term_rank" reference="$work/term_rank_reference"
rm -rf "$run" "$reference" && mkdir -p "$run"
out="$run/output.txt"
fail() { cat "$out"; echo "FAIL: $*"; exit 1; }
# shellcheck source=rank_helpers.sh
. "$(dirname "$0")/rank_helpers.sh"
common="--set train.steps=40 --set train.global_batch=8 --set train.micro_batch=1 --set train.seq_len=32
        --set optim.schedule.warmup=1 --set logging.interval=1 --set checkpoint.interval=1000
        --set checkpoint.keep_last=5"

# shellcheck disable=SC2086
"$dsx" train "$recipe" $common --set logging.run_dir="$reference" >"$run/reference.txt" 2>&1 ||
  { cat "$run/reference.txt"; echo "FAIL: the reference run"; exit 1; }

pipeline() {  # the pipeline-parallel run, in the background; $! is its mpirun
  # shellcheck disable=SC2086
  timeout -s KILL 300 "$mpiexec" --oversubscribe --bind-to none -np 2 "$dsx" train "$recipe" $common \
    --set parallel.pp=2 --set logging.run_dir="$run" >>"$out" 2>&1 &
}
pipeline
job=$!
wait_for_steps "$out" 2
pid=$(rank_pid "$dsx" "$recipe" "$victim")
[ -n "$pid" ] || fail "no process of rank $victim found"
kill -TERM "$pid"
wait "$job"
rc=$?
[ "$rc" -eq 0 ] || fail "the job exited $rc after SIGTERM of rank $victim"
stopped=$(sed -n 's/^stopped by signal at step \([0-9]*\); checkpoint saved$/\1/p' "$out")
[ -n "$stopped" ] || fail "no 'stopped by signal at step N; checkpoint saved' line"
[ "$stopped" -lt 40 ] || fail "the run was not stopped early (step $stopped)"
ckpt=$(printf '%s/checkpoints/step-%06d' "$run" "$stopped")
[ -f "$ckpt/manifest.json" ] || fail "no complete checkpoint $ckpt"
echo "---- rank $victim got SIGTERM; both stages stopped at step $stopped with $ckpt"

pipeline
wait $!
rc=$?
[ "$rc" -eq 0 ] || fail "the resumed job exited $rc"
grep -q "resumed from .*step-$(printf '%06d' "$stopped") at step $stopped" "$out" || fail "did not resume from step $stopped"
tail -3 "$out"
exec "$compare" "$reference" "$run" 1e-5
