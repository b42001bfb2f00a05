#!/usr/bin/env bash
# Everything a GPU session runs, in one command, within a time budget (docs/GPU.md):
#   bash tools/gpu/run_all.sh [PHASE...]
# PHASEs (default all, in this order): tests bench train torch kernels
#   tests    every ctest test labelled gpu: the CUDA ops against the CPU ops (dsx_gpu_tests),
#            the NCCL communicator under the bundled mpirun, gpu.train_tiny (the tiny recipe
#            on cuda vs cpu, loss curves compared), ... (prebuilt: tools/gpu/gpu_tests.py runs
#            the relocated ctest list; standalone: ctest -L gpu)
#   bench    the CUDA benchmarks (bench_cuda_*, each with its defaults)
#   train    dsx train recipes/h100-bench.yaml without MTP (as the PyTorch model has none),
#            then with it: tokens/s, MFU, peak memory
#   torch    tools/bench/torch_deepseek_v3.py on recipes/h100-bench.yaml, then any other
#            tools/bench/torch_*.py with its defaults
#   kernels  standalone builds only: the CPU kernel tests (on the reference BLAS there)
# Executables: the prebuilt ones carried in .gpu/dsx-gpu.tar.xz (tools/gpu/pack.sh) with their
# bundled libraries, or else a standalone build made here (preset cuda-standalone: kernels,
# GPU tests, CUDA benchmarks; no dsx binary, so no training runs). DSX_GPU_MODE=prebuilt or
# standalone forces one.
# Environment: OUT (logs; default ./gpu-out), DSX_GPU_BUDGET_S (default 540: the whole run;
# a session's command may take 600 s, so run the phases in two calls when all do not fit),
# DSX_BENCH_STEPS (h100-bench steps, default 12), DSX_TORCH_STEPS (default 8),
# DSX_TORCH_COMPILE (1 = try torch.compile, default 1), DSX_BENCH_MICRO_BATCH (both models' micro-batch;
# default the recipe's, and 1 if dsx runs out of memory with it).
# Output: $OUT/summary.txt (also printed at the end), $OUT/{tests,bench,train,torch}.log,
# $OUT/build.log, $OUT/results.tar.gz (metrics.jsonl of every run, JSON results, env).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
root="$PWD"
start=$(date +%s)
budget=${DSX_GPU_BUDGET_S:-540}
OUT="${OUT:-$root/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
keep="$OUT/keep"  # collected into results.tar.gz at the end
mkdir -p "$keep"
summary="$OUT/summary.txt"
: >"$summary"
# The lent machine runs commands as root, which OpenMPI's mpirun refuses unless told: the NCCL
# tests set these in their ctest environment, gpu.train_tiny_mpi_np1 and others do not.
if [[ "$(id -u)" == 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# The machine's own library path, for python3 (torch): the bundle's env.sh puts older copies of
# libstdc++, OpenSSL, zlib, ... first, which are for dsx's executables only.
host_ld_path="${LD_LIBRARY_PATH:-}"

phases=("$@")
[[ ${#phases[@]} -gt 0 ]] || phases=(tests bench train torch kernels)
wants() { local p; for p in "${phases[@]}"; do [[ "$p" == "$1" ]] && return 0; done; return 1; }
left() { echo $((budget - ($(date +%s) - start))); }
say() { echo "$*" | tee -a "$summary"; }
# run_limited SECONDS LOG CMD...: runs CMD with at most SECONDS (and never past the budget),
# appending its output to LOG; returns its exit code (124 = timed out).
run_limited() {
  local limit=$1 log=$2 rem
  shift 2
  rem=$(($(left) - 10))
  ((limit > rem)) && limit=$rem
  if ((limit < 5)); then
    echo "(skipped: the time budget is spent) $*" >>"$log"
    return 124
  fi
  echo "\$ $* (limit ${limit}s)" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
}

# --- environment ----------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)  host: $(uname -n)  $(uname -r)"
  grep -m1 "model name" /proc/cpuinfo
  echo "cores: $(nproc)  memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')  glibc: $(ldd --version | head -n 1 | awk '{print $NF}')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v cmake >/dev/null && cmake --version | head -n 1
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1
  python3 -c 'import nvidia, os; [print("pip nvidia:", p) for p in nvidia.__path__]' 2>&1 | head -n 3
  python3 -m pip list 2>/dev/null | grep -iE '^nvidia-|^torch ' # the CUDA libraries env.sh will find first
} >"$keep/env.txt" 2>&1
say "== GPU session $(date -u +%FT%TZ): $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"

# --- executables: prebuilt (carried) or standalone (built here) -------------------------------
mode="${DSX_GPU_MODE:-}"
pkg=""
if [[ "$mode" != standalone && -f "$root/.gpu/dsx-gpu.tar.xz" ]]; then
  unpack="${TMPDIR:-/tmp}/dsx-gpu-run"
  rm -rf "$unpack" && mkdir -p "$unpack"
  if tar -C "$unpack" -xJf "$root/.gpu/dsx-gpu.tar.xz"; then
    pkg="$unpack/dsx-gpu"
    # shellcheck disable=SC1091
    source "$pkg/runtime/env.sh"
    cat "$pkg/BUILD_INFO" >>"$keep/env.txt"
    cp "$pkg/runtime/MANIFEST.txt" "$keep/bundle-manifest.txt"
    { echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; ldd "$pkg/bin/dsx"; } >"$keep/ldd-dsx.txt" 2>&1
    if grep -qE "not found|version .* not found" "$keep/ldd-dsx.txt" || ! "$pkg/bin/dsx" --help >/dev/null 2>>"$keep/ldd-dsx.txt"; then
      say "prebuilt: bin/dsx cannot run here (see ldd-dsx.txt in results.tar.gz): $(grep -m2 'not found' "$keep/ldd-dsx.txt" | tr -s ' \t' ' ')"
      [[ "$mode" == prebuilt ]] && exit 1
      pkg=""
    else
      mode=prebuilt
      say "prebuilt: $(head -n 1 "$pkg/BUILD_INFO")"
    fi
  fi
fi
build="$root/build/cuda-standalone"
if [[ -z "$pkg" ]]; then
  mode=standalone
  say "standalone: building kernels, GPU tests and CUDA benchmarks (preset cuda-standalone) in $build"
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  catch2=()
  [[ -f "$root/.gpu/include/catch2/catch.hpp" ]] && catch2=(-DDSX_CATCH2_INCLUDE_DIR="$root/.gpu/include")
  # Only the H100's architecture: halves nvcc's work in a session that has minutes.
  if run_limited 300 "$OUT/build.log" cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DDSX_STANDALONE_CUDA=ON -DDSX_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real "${catch2[@]}" &&
    run_limited 420 "$OUT/build.log" cmake --build "$build" -j "$(nproc)"; then
    say "standalone: built in $(($(date +%s) - start)) s"
  else
    say "standalone: BUILD FAILED (build.log):"
    grep -m 15 -E "error|Error" "$OUT/build.log" | tee -a "$summary"
  fi
  # The build links cuDNN by its path; cuDNN dlopens its sub-libraries, cuBLAS may come from pip.
  pip_libs="$(python3 -c 'import nvidia, glob; print(":".join(d for p in nvidia.__path__ for d in glob.glob(p + "/*/lib") + glob.glob(p + "/*/*/lib")))' 2>/dev/null)"
  export LD_LIBRARY_PATH="${pip_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [[ "$mode" == prebuilt ]]; then
  dsx="$pkg/bin/dsx" bench_dir="$pkg/bench"
else
  dsx="" bench_dir="$build/bench"
fi

# --- GPU tests ----------------------------------------------------------------------------------
if wants tests; then
  log="$OUT/tests.log"
  : >"$log"
  if [[ "$mode" == prebuilt ]]; then
    work="${TMPDIR:-/tmp}/dsx-gpu-tests"
    rm -rf "$work" && mkdir -p "$work"
    python3 "$root/tools/gpu/gpu_tests.py" run "$pkg/gpu-tests.json" "$pkg" "$root" "$work" \
      --budget-s $(($(left) - 30)) --log "$log" | tee "$keep/tests-summary.txt"
    say "tests: $(tail -n 1 "$keep/tests-summary.txt")"
  elif [[ -f "$build/CTestTestfile.cmake" ]]; then
    run_limited 400 "$log" ctest --test-dir "$build" -L gpu --output-on-failure --timeout 300
    grep -E "^ *[0-9]+/[0-9]+ Test|tests passed|tests failed" "$log" >"$keep/tests-summary.txt"
    say "tests: $(grep -E 'tests passed|tests failed' "$log" | tail -n 1); skipped: $(grep -c 'Skipped' "$log")"
  else
    say "tests: no build to test"
  fi
fi

# --- CUDA benchmarks ------------------------------------------------------------------------------
if wants bench; then
  log="$OUT/bench.log"
  : >"$log"
  n=0
  for b in "$bench_dir"/bench_cuda_*; do
    [[ -x "$b" ]] || continue
    n=$((n + 1))
    run_limited 120 "$log" "$b"
    rc=$?
    say "bench: $(basename "$b") exit $rc; last lines:"
    tail -n 6 "$log" | sed 's/^/  /' | tee -a "$summary"
  done
  ((n > 0)) || say "bench: no bench_cuda_* executables"
fi

# --- training runs (prebuilt dsx only) -------------------------------------------------------------
# train_run NAME LIMIT RECIPE [--set ...]: one dsx train, metrics kept; prints its last step line.
train_run() {
  local name=$1 limit=$2 recipe=$3 rc
  shift 3
  local dir="$OUT/runs/$name"
  rm -rf "$dir"
  (cd "$OUT" && run_limited "$limit" "$OUT/train.log" "$dsx" train "$root/$recipe" --set logging.run_dir="$dir" \
    --set checkpoint.interval=0 "$@")
  rc=$?
  [[ -f "$dir/metrics.jsonl" ]] && cp "$dir/metrics.jsonl" "$keep/metrics-$name.jsonl"
  if ((rc == 0)); then
    say "train $name: $(grep -E '^step ' "$OUT/train.log" | tail -n 1)"
  else
    say "train $name: exit $rc; $(tail -n 2 "$OUT/train.log" | tr '\n' ' ')"
  fi
  return $rc
}
if wants train; then
  : >"$OUT/train.log"
  if [[ -z "$dsx" ]]; then
    say "train: skipped (standalone build has no dsx binary; carry .gpu from tools/gpu/pack.sh)"
  else
    bsteps=${DSX_BENCH_STEPS:-12}
    bench=(--set train.steps="$bsteps" --set optim.schedule.warmup=$((bsteps / 4 + 1)))
    # The recipe's micro_batch 2 was sized from CPU measurements (~70 GiB of 79.6 at the peak):
    # if the GPU runs out of memory, measure both models at micro_batch 1 instead
    # (DSX_BENCH_MICRO_BATCH forces one; the torch phase reads the choice from $OUT/micro_batch).
    mb=(${DSX_BENCH_MICRO_BATCH:+--set train.micro_batch=$DSX_BENCH_MICRO_BATCH})
    if ! train_run h100-bench-nomtp 180 recipes/h100-bench.yaml "${bench[@]}" "${mb[@]}" \
      --set model.num_nextn_predict_layers=0 && tail -n 20 "$OUT/train.log" | grep -qi 'out of memory'; then
      say "train: out of memory at the recipe's micro_batch; again with micro_batch 1"
      mb=(--set train.micro_batch=1)
      train_run h100-bench-nomtp-mb1 180 recipes/h100-bench.yaml "${bench[@]}" "${mb[@]}" \
        --set model.num_nextn_predict_layers=0
    fi
    [[ ${#mb[@]} -gt 0 ]] && echo "${mb[1]#train.micro_batch=}" >"$OUT/micro_batch"
    train_run h100-bench 150 recipes/h100-bench.yaml "${bench[@]}" "${mb[@]}"
  fi
fi

# --- PyTorch references ---------------------------------------------------------------------------
if wants torch; then
  log="$OUT/torch.log"
  : >"$log"
  py=(env LD_LIBRARY_PATH="$host_ld_path" python3)
  if "${py[@]}" -c 'import torch, transformers, yaml' 2>>"$log"; then
    compile=()
    [[ "${DSX_TORCH_COMPILE:-1}" == 1 ]] && compile=(--compile)
    torch_mb=()  # the micro-batch the dsx runs used, when not the recipe's
    [[ -f "$OUT/micro_batch" ]] && torch_mb=(--micro-batch "$(cat "$OUT/micro_batch")")
    run_limited 240 "$log" "${py[@]}" "$root/tools/bench/torch_deepseek_v3.py" "$root/recipes/h100-bench.yaml" \
      --steps "${DSX_TORCH_STEPS:-8}" --warmup 3 "${compile[@]}" "${torch_mb[@]}" --json "$keep/torch_deepseek_v3.json"
    rc=$?
    say "torch deepseek_v3: exit $rc; $(grep -E '^(torch_deepseek_v3:|dsx count)' "$log" | tr '\n' ' ')"
    for s in "$root"/tools/bench/torch_*.py; do
      [[ "$(basename "$s")" == torch_deepseek_v3.py ]] && continue
      run_limited 120 "$log" "${py[@]}" "$s"
      say "torch $(basename "$s"): exit $?; $(tail -n 3 "$log" | tr '\n' ' ')"
    done
  else
    say "torch: python3 cannot import torch, transformers and yaml (torch.log)"
  fi
fi

# --- CPU kernel tests of the standalone build ----------------------------------------------------
if wants kernels && [[ "$mode" == standalone && -f "$build/CTestTestfile.cmake" ]]; then
  run_limited 120 "$OUT/tests.log" ctest --test-dir "$build" -L kernels --output-on-failure -j "$(nproc)"
  say "kernels (CPU, standalone build): $(grep -E 'tests passed|tests failed' "$OUT/tests.log" | tail -n 1)"
fi

# --- results --------------------------------------------------------------------------------------
say "== done in $(($(date +%s) - start)) s of a ${budget} s budget ($mode)"
cp "$summary" "$keep/"
tar -C "$OUT" -czf "$OUT/results.tar.gz" keep 2>/dev/null && rm -rf "$keep"
rm -rf "$OUT/runs"
echo "---- summary ($OUT/summary.txt) ----"
cat "$summary"
