#!/bin/sh
# Pipeline schedules and stage splits measured against each other in one session: the same
# recipe trained under mpirun with parallel.pp_schedule 1f1b, zero_bubble, dualpipev and
# interleaved_1f1b (2 chunks per rank), each
# with parallel.pp_split even and balanced, the runs interleaved (A B C ... A B C ...) so load
# changes on a shared machine hit every variant alike. Reports, per variant, the fastest and the
# median step time (from metrics.jsonl, the first steps dropped), the median share of rank 0's
# step blocked on communication, the final loss, and both step times' ratios to 1f1b with the
# even split. On a shared virtual machine single steps take up to 5x longer when a neighbour
# runs; the fastest step is what the variant costs undisturbed, the median what it got.
# The final losses agree to the last digits: every variant computes the same gradients (the
# parallel_train tests check the bits), only the printed loss sums the stages' parts in another
# order.
#
#   tools/bench/pipeline_schedules.sh [--dsx PATH] [--pp N] [--steps N] [--rounds N] [--work DIR]
#                                     [--schedules "1f1b zero_bubble dualpipev interleaved_1f1b"]
#                                     [--splits "even balanced"]
#                                     [-- extra dsx train arguments, e.g. --set model.hidden_size=256]
set -eu

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  echo "defaults: --dsx build/release/bin/dsx --pp 2 --steps 60 --rounds 2 --work /tmp/dsx_bench_pipeline"
}

dsx=build/release/bin/dsx pp=2 steps=60 rounds=2 work=/tmp/dsx_bench_pipeline
schedules="1f1b zero_bubble dualpipev interleaved_1f1b" splits="even balanced"
while [ $# -gt 0 ]; do
  case "$1" in
    --help | -h) usage; exit 0 ;;
    --dsx) dsx=$2; shift 2 ;;
    --pp) pp=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --schedules) schedules=$2; shift 2 ;;
    --splits) splits=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "pipeline_schedules.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$dsx" ] || { echo "pipeline_schedules.sh: no dsx binary at $dsx (build it or pass --dsx)" >&2; exit 2; }
recipe="$(dirname "$0")/../../recipes/tiny.yaml"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$work"

# median, field (metrics.jsonl)
. "$(dirname "$0")/metrics_lib.sh"

round=1
while [ "$round" -le "$rounds" ]; do
  for s in $schedules; do
    for split in $splits; do
      run="$work/$s-$split-$round"
      rm -rf "$run"
      echo "round $round/$rounds: $s, $split split" >&2
      # shellcheck disable=SC2086
      mpirun --oversubscribe --bind-to none -np "$pp" "$dsx" train "$recipe" --set parallel.pp="$pp" \
        --set parallel.pp_schedule="$s" --set parallel.pp_split="$split" --set train.steps="$steps" \
        --set train.micro_batch=1 --set optim.schedule.warmup=1 --set checkpoint.interval=0 \
        --set logging.interval=1 --set logging.run_dir="$run" "$@" > "$run.log" 2>&1 ||
        { echo "$s ($split) failed, see $run.log" >&2; exit 1; }
    done
  done
  round=$((round + 1))
done

skip=5  # warm-up steps (first allocations, page faults)
printf '%-16s %-9s %8s %8s %8s %20s %7s %7s\n' schedule split "best s" "median" "comm %" "final loss" "best" "median"
base_best="" base_median=""
for s in $schedules; do
  for split in $splits; do
    runs=$(for r in $(seq 1 "$rounds"); do echo "$work/$s-$split-$r/metrics.jsonl"; done)
    best=$(for f in $runs; do field "$f" step_s $skip; done | sort -g | head -n 1)
    step=$(for f in $runs; do field "$f" step_s $skip; done | median)
    comm=$(for f in $runs; do field "$f" exposed_comm_fraction $skip; done | median)
    loss=$(tail -n 1 "$work/$s-$split-1/metrics.jsonl" | field /dev/stdin loss 0)
    [ -n "$base_best" ] || base_best=$best base_median=$step
    printf '%-16s %-9s %8.4f %8.4f %8.1f %20s %7.3f %7.3f\n' "$s" "$split" "$best" "$step" \
      "$(echo "$comm" | awk '{ print 100 * $1 }')" "$loss" "$(echo "$best $base_best" | awk '{ print $1 / $2 }')" \
      "$(echo "$step $base_median" | awk '{ print $1 / $2 }')"
  done
done
