#!/bin/sh
# Runs one fault scenario of comm_check under mpirun and checks how the job ends:
#   run_fault.sh MPIEXEC COMM_CHECK NP MODE VICTIM TIMEOUT_S MAX_SECONDS REGEX
# Passes when the job exits non-zero within MAX_SECONDS, its output matches REGEX (which names
# the victim rank), and no comm_check process of this scenario is left behind.
set -u
mpiexec=$1 bin=$2 np=$3 mode=$4 victim=$5 timeout_s=$6 max_seconds=$7 regex=$8
out=$(mktemp)
trap 'rm -f "$out"' EXIT

start_ns=$(date +%s%N)
# The outer timeout only guards ctest against a job that never ends; it fails the test.
timeout -s KILL $((max_seconds + 30)) "$mpiexec" -np "$np" --oversubscribe --bind-to none \
  "$bin" "$mode" "$victim" "$timeout_s" >"$out" 2>&1
rc=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
cat "$out"
echo "---- exit status $rc after $elapsed_ms ms (limit $max_seconds s)"

fail() { echo "FAIL: $*"; exit 1; }
[ "$rc" -ne 0 ] || fail "the job exited 0"
[ "$elapsed_ms" -le $((max_seconds * 1000)) ] || fail "the job took $elapsed_ms ms"
grep -Eq "$regex" "$out" || fail "the output does not match: $regex"
sleep 1
if pgrep -f "$bin $mode $victim $timeout_s" >/dev/null; then
  pgrep -af "$bin $mode $victim $timeout_s"
  fail "processes left behind"
fi
echo "PASS"
