#!/bin/sh
# The tiny recipe trained on the GPU against the same run on the CPU (ctest gpu.train_tiny).
#
#   gpu_train.sh DSX COMPARE_RUNS WORK STEPS RTOL [MPIEXEC [NP [--set key=value ...]]]
#
# With MPIEXEC the GPU run is `MPIEXEC -np NP dsx train` (NP = 1 by default), which takes the
# multi-rank path; the overrides (a layout, e.g. --set parallel.pp=2) apply to the GPU run only.
# Several ranks share the one GPU: each gets its own NCCL host id (NCCL refuses two ranks of one
# host on one device otherwise) and NCCL talks over sockets on lo.
# Exits 77 (ctest: Skipped) with the reason where this machine or build has no usable GPU.
# Both runs are f32 with fp32 GEMMs; they differ only in summation order (cuBLAS, block
# reductions) and in the rare router top-k choices that such 1e-7 differences flip, so the
# loss curves agree to RTOL relative at every logged step (see tests/trainer/gpu_train.cmake).
set -eu
dsx=$1 compare=$2 work=$3 steps=$4 rtol=$5 mpiexec=${6:-} np=${7:-1}
[ $# -le 7 ] || { shift 7; layout="$*"; }
layout=${layout:-}
launch=""
if [ -n "$mpiexec" ]; then
  command -v "$mpiexec" >/dev/null 2>&1 || { echo "SKIPPED: $mpiexec is not on this machine"; exit 77; }
  launch="$mpiexec --oversubscribe --bind-to none -np $np"
  # OpenMPI refuses to start as root (the lent GPU machines run commands as root) unless told.
  [ "$(id -u)" != 0 ] || launch="$launch --allow-run-as-root"
  [ "$np" -le 1 ] || export NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 NCCL_MNNVL_ENABLE=0
fi
recipe="$(dirname "$0")/../../recipes/tiny.yaml"
common="--set train.steps=$steps --set logging.interval=1 --set checkpoint.interval=0 --set checkpoint.resume=never"
rm -rf "${work:?}" && mkdir -p "$work"
if [ -n "$mpiexec" ] && [ "$np" -gt 1 ]; then  # each rank its own NCCL host id, then dsx
  printf '#!/bin/sh\nNCCL_HOSTID="dsx-rank-${OMPI_COMM_WORLD_RANK:-0}" exec "$@"\n' >"$work/own_host_id.sh"
  chmod +x "$work/own_host_id.sh"
  launch="$launch $work/own_host_id.sh"
fi
# shellcheck disable=SC2086
if ! $launch "$dsx" train "$recipe" $common $layout --set model.device=cuda --set logging.run_dir="$work/cuda" \
    >"$work/cuda.log" 2>&1; then
  if grep -q -e "no usable GPU" -e "built without CUDA" "$work/cuda.log"; then
    echo "SKIPPED: $(grep -o -e 'device cuda: .*' "$work/cuda.log" | head -1)"
    exit 77
  fi
  cat "$work/cuda.log"
  exit 1
fi
tail -n 3 "$work/cuda.log"
# shellcheck disable=SC2086
"$dsx" train "$recipe" $common --set logging.run_dir="$work/cpu" >"$work/cpu.log" 2>&1 || { cat "$work/cpu.log"; exit 1; }
exec "$compare" "$work/cpu" "$work/cuda" "$rtol" losses-only
