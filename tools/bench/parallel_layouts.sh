#!/bin/sh
# Parallel layouts of the same ranks measured against each other in one session: the tiny recipe
# trained under mpirun as data parallel, data + expert parallel and tensor parallel (and one
# process as the baseline), the runs interleaved (A B C ... A B C ...) so load changes on a shared
# machine hit every variant alike. Reports, per layout, the fastest and the median step time
# (from metrics.jsonl, the first steps dropped), the median share of the step blocked on
# communication, MoE all-to-all bytes per step, rank 0's peak tensor memory, the final loss, and
# the step times relative to the first layout. Every layout trains on the same global batch, so a
# lower step time is more tokens/s; the losses agree to ~1e-7 over the first steps and may drift
# apart slowly after (the parallel_train tests check six steps).
#
#   tools/bench/parallel_layouts.sh [--dsx PATH] [--ranks N] [--steps N] [--rounds N] [--work DIR]
#                                   [--layouts "single dp dp_ep tp tp_sp tp_dp"]
#                                   [-- extra dsx train arguments, e.g. --set model.hidden_size=256]
#
# Layouts (N = --ranks): single = one process; dp = DP N; dp_ep = DP N with EP N; tp = TP N;
# tp_sp = TP N with sequence parallelism; tp_dp = TP 2 x DP N/2.
set -eu

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  echo "defaults: --dsx build/release/bin/dsx --ranks 2 --steps 40 --rounds 2 --work /tmp/dsx_bench_layouts"
}

dsx=build/release/bin/dsx ranks=2 steps=40 rounds=2 work=/tmp/dsx_bench_layouts
layouts="single dp dp_ep tp"
while [ $# -gt 0 ]; do
  case "$1" in
    --help | -h) usage; exit 0 ;;
    --dsx) dsx=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --layouts) layouts=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "parallel_layouts.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$dsx" ] || { echo "parallel_layouts.sh: no dsx binary at $dsx (build it or pass --dsx)" >&2; exit 2; }
recipe="$(dirname "$0")/../../recipes/tiny.yaml"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$work"

# the recipe overrides of a layout
overrides() {
  case "$1" in
    single) echo "" ;;
    dp) echo "--set parallel.dp=$ranks" ;;
    dp_ep) echo "--set parallel.dp=$ranks --set parallel.ep=$ranks" ;;
    tp) echo "--set parallel.tp=$ranks" ;;
    tp_sp) echo "--set parallel.tp=$ranks --set parallel.sequence_parallel=true" ;;
    tp_dp) echo "--set parallel.tp=2 --set parallel.dp=$((ranks / 2))" ;;
    *) echo "parallel_layouts.sh: unknown layout $1 (see --help)" >&2; exit 2 ;;
  esac
}

# median, field (metrics.jsonl)
. "$(dirname "$0")/metrics_lib.sh"

round=1
while [ "$round" -le "$rounds" ]; do
  for layout in $layouts; do
    run="$work/$layout-$round"
    rm -rf "$run"
    echo "round $round/$rounds: $layout" >&2
    np=$ranks
    [ "$layout" = single ] && np=1
    # shellcheck disable=SC2046,SC2086
    mpirun --oversubscribe --bind-to none -np "$np" "$dsx" train "$recipe" $(overrides "$layout") \
      --set train.steps="$steps" --set optim.schedule.warmup=1 --set checkpoint.interval=0 \
      --set logging.interval=1 --set logging.run_dir="$run" "$@" > "$run.log" 2>&1 ||
      { echo "$layout failed, see $run.log" >&2; exit 1; }
  done
  round=$((round + 1))
done

skip=5  # warm-up steps (first allocations, page faults)
printf '%-8s %8s %8s %8s %12s %9s %20s %7s %7s\n' layout "best s" "median" "comm %" "a2a MB/step" "peak MB" \
  "final loss" "best" "median"
base_best="" base_median=""
for layout in $layouts; do
  runs=$(for r in $(seq 1 "$rounds"); do echo "$work/$layout-$r/metrics.jsonl"; done)
  best=$(for f in $runs; do field "$f" step_s $skip; done | sort -g | head -n 1)
  step=$(for f in $runs; do field "$f" step_s $skip; done | median)
  comm=$(for f in $runs; do field "$f" exposed_comm_fraction $skip; done | median)
  a2a=$(for f in $runs; do field "$f" moe_a2a_bytes $skip; done | median)
  peak=$(for f in $runs; do field "$f" device_peak_bytes $skip; done | sort -g | tail -n 1)
  loss=$(tail -n 1 "$work/$layout-1/metrics.jsonl" | field /dev/stdin loss 0)
  [ -n "$base_best" ] || base_best=$best base_median=$step
  printf '%-8s %8.4f %8.4f %8.1f %12.2f %9.1f %20s %7.3f %7.3f\n' "$layout" "$best" "$step" \
    "$(echo "${comm:-0}" | awk '{ print 100 * $1 }')" "$(echo "${a2a:-0}" | awk '{ print $1 / 1e6 }')" \
    "$(echo "${peak:-0}" | awk '{ print $1 / 1e6 }')" "$loss" \
    "$(echo "$best $base_best" | awk '{ print $1 / $2 }')" "$(echo "$step $base_median" | awk '{ print $1 / $2 }')"
done
