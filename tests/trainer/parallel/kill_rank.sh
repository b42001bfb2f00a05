#!/bin/sh
# SIGKILL one rank of a running `mpirun -np 4 dsx train` (EP4) mid-training and check that the
# whole job ends non-zero within parallel.comm_timeout_s + 10 s, naming the dead rank, and that
# no dsx process of the job is left behind.
#
#   kill_rank.sh DSX MPIEXEC WORK VICTIM TIMEOUT_S
set -u
dsx=$1 mpiexec=$2 work=$3 victim=$4 timeout_s=$5
recipe="$(dirname "$0")/../../../recipes/tiny.yaml"
run="$work/kill_rank"
rm -rf "$run" && mkdir -p "$run"
out="$run/output.txt"
fail() { cat "$out"; echo "FAIL: $*"; exit 1; }
# shellcheck source=rank_helpers.sh
. "$(dirname "$0")/rank_helpers.sh"

timeout -s KILL 300 "$mpiexec" --oversubscribe --bind-to none -np 4 "$dsx" train "$recipe" \
  --set parallel.dp=4 --set parallel.ep=4 --set parallel.comm_timeout_s="$timeout_s" \
  --set train.steps=100000 --set train.global_batch=8 --set train.micro_batch=1 --set train.seq_len=32 \
  --set logging.interval=1 --set checkpoint.interval=100000 --set logging.run_dir="$run" >"$out" 2>&1 &
job=$!

# Wait until training is under way (two steps logged), then kill the victim rank.
wait_for_steps "$out" 2
pid=$(rank_pid "$dsx" "$recipe" "$victim")
[ -n "$pid" ] || fail "no process of rank $victim found"
start_ns=$(date +%s%N)
kill -KILL "$pid"
wait "$job"
rc=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
limit_ms=$(( (timeout_s + 10) * 1000 ))
echo "---- exit status $rc, $elapsed_ms ms after SIGKILL of rank $victim (limit $limit_ms ms)"
[ "$rc" -ne 0 ] || fail "the job exited 0"
[ "$elapsed_ms" -le "$limit_ms" ] || fail "the job took $elapsed_ms ms to end"
grep -Eq "process rank $victim .*signal 9|Never arrived: ranks \[$victim\]" "$out" || fail "the dead rank is not named"
sleep 1
if pgrep -f "$dsx train $recipe" >/dev/null; then pgrep -af "$dsx train $recipe"; fail "processes left behind"; fi
tail -5 "$out"
echo "PASS"
