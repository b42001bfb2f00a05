#!/bin/sh
# Train the tiny recipe under mpirun with one parallel layout and compare it with the
# single-process reference run (every step's loss and the final checkpoint's tensors).
#
#   run_layout.sh DSX MPIEXEC COMPARE_RUNS WORK NAME NP RTOL [--set key=value ...]
#
# RTOL ending in "L" (e.g. 2e-2L) compares the losses only.
# NP = 0 runs without mpirun (the reference itself, or a single-process resume).
# WORK/reference (WORK/$DSX_LAYOUT_REFERENCE when set) must hold the reference run unless NAME
# starts with "reference" (then this run is one).
set -eu
dsx=$1 mpiexec=$2 compare=$3 work=$4 name=$5 np=$6 rtol=$7
shift 7
recipe="$(dirname "$0")/../../../recipes/tiny.yaml"
common="--set train.steps=6 --set train.global_batch=8 --set train.micro_batch=1 --set train.seq_len=32
        --set optim.schedule.warmup=1 --set logging.interval=1 --set checkpoint.interval=3
        --set checkpoint.keep_last=5 --set logging.run_dir=$work/$name"
case "$name" in resume-*) ;; *) rm -rf "${work:?}/$name" ;; esac
mkdir -p "$work"
if [ "$np" = 0 ]; then
  # shellcheck disable=SC2086
  "$dsx" train "$recipe" $common "$@"
else
  # shellcheck disable=SC2086
  "$mpiexec" --oversubscribe --bind-to none -np "$np" "$dsx" train "$recipe" $common "$@"
fi
case "$name" in reference*) exit 0 ;; esac
reference="$work/${DSX_LAYOUT_REFERENCE:-reference}"
case "$*" in
  *logging.rank_logs=true*)  # every rank wrote its own log with its step lines
    for r in $(seq 0 $((np - 1))); do
      log=$(printf '%s/%s/logs/rank-%05d.log' "$work" "$name" "$r")
      grep -q "^step *6/6" "$log" || { echo "missing or incomplete $log"; exit 1; }
    done ;;
esac
case "$*" in
  *parallel.pp=[2-9]*)  # every step names each stage's share of the step blocked on communication
    pp=$(echo "$*" | sed 's/.*parallel\.pp=\([0-9]*\).*/\1/')
    shares=$(tail -n 1 "$work/$name/metrics.jsonl" | sed -n 's/.*"exposed_comm_fraction_by_stage":\[\([^]]*\)\].*/\1/p')
    [ "$(echo "$shares" | awk -F, '{ print NF }')" = "$pp" ] ||
      { echo "metrics.jsonl: exposed_comm_fraction_by_stage is [$shares], not $pp shares"; exit 1; } ;;
esac
case "$rtol" in
  *L) exec "$compare" "$reference" "$work/$name" "${rtol%L}" losses-only ;;
  *) exec "$compare" "$reference" "$work/$name" "$rtol" ;;
esac
